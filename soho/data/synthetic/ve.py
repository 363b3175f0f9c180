"""Visual entailment hypotheses: entailed, contradicted or undecidable by one scene graph."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from soho.data.synthetic.grammar import (
    OBJECT_TEMPLATES,
    Statement,
    absent_description,
    attribute_statement,
    choice,
    count_claim,
    count_statement,
    full_description,
    noun_phrase,
    partial_description,
    relation_statement,
    unique_description,
)
from soho.data.synthetic.logic import Description, holds
from soho.data.synthetic.vocabulary import ATTRIBUTE_VALUES, ATTRIBUTES, INVERSE_RELATION

ABSENT_TEMPLATES = ("there is no {sg}", "there are no {pl}", "the image contains no {pl}",
                    "the picture does not show {np}", "no {sg} can be seen", "you cannot see {np}")
NEUTRAL_OBJECT_TEMPLATES = (
    "{ref} is made of {material}", "{ref} was cut out of {material}", "{ref} is {feel}",
    "{ref} feels {feel}", "{ref} belongs to {owner}", "{ref} smells like {smell}", "{ref} is {motion}",
    "{owner} painted {ref} {time}", "{ref} weighs more than a {thing}", "a {animal} is hiding behind {ref}",
)
NEUTRAL_SCENE_TEMPLATES = (
    "the picture was taken {time}", "this image was made by {owner}", "the image was printed on {material}",
    "it is {weather} outside", "the artist was {mood} when drawing this", "the shapes were drawn {time}",
    "this picture hangs in a {place}",
)
NEUTRAL_WORDS = {
    "material": ("wood", "metal", "glass", "paper", "plastic", "stone", "clay", "rubber"),
    "feel": ("heavy", "warm", "cold", "soft", "hard", "wet", "fragile", "expensive", "old", "sticky"),
    "owner": ("a child", "my neighbour", "the teacher", "an old man", "a famous artist", "a young student"),
    "smell": ("flowers", "soap", "fresh bread", "the sea"),
    "motion": ("spinning slowly", "about to fall", "floating in water", "vibrating", "melting"),
    "time": ("at night", "in the morning", "in winter", "on a sunny day", "yesterday", "last summer"),
    "thing": ("feather", "brick", "car", "coin"),
    "animal": ("cat", "mouse", "bird", "dog"),
    "weather": ("raining", "snowing", "windy", "hot"),
    "mood": ("happy", "sad", "tired", "bored"),
    "place": ("museum", "classroom", "kitchen", "gallery"),
}
"""Things the renderer never draws, so an image can neither confirm nor rule them out."""
VE_FORMS = ("exists", "absent", "count", "attribute", "relation")


def _exists_statement(d: Description, rng: np.random.Generator) -> Statement:
    return choice(rng, OBJECT_TEMPLATES).format(np=noun_phrase(d, rng)), ("exists", d)


def _absent_statement(scene: Dict, rng: np.random.Generator, d: Optional[Description] = None) -> Optional[Statement]:
    d = d or absent_description(scene, rng)
    if d is None:
        return None
    text = choice(rng, ABSENT_TEMPLATES).format(sg=noun_phrase(d, rng, ""), pl=noun_phrase(d, rng, "", plural=True),
                                                np=noun_phrase(d, rng))
    return text, ("absent", d)


def _statement(scene: Dict, rng: np.random.Generator, form: str, truth: bool) -> Optional[Statement]:
    """A hypothesis of the given form, true or provably false. The false ones: something absent,
    denying something present, a wrong count, a wrong attribute of a uniquely described object,
    a reversed relation between two uniquely described objects."""
    obj = choice(rng, scene["objects"])
    if form == "exists":
        d = partial_description(obj, rng) if truth else absent_description(scene, rng)
        return None if d is None else _exists_statement(d, rng)
    if form == "absent":
        return _absent_statement(scene, rng, None if truth else partial_description(obj, rng))
    if form == "count":
        made = count_claim(scene, rng, truth)
        return None if made is None else count_statement(*made, rng)
    if form == "attribute":
        attribute = choice(rng, ATTRIBUTES)
        value = obj[attribute] if truth else choice(rng, [v for v in ATTRIBUTE_VALUES[attribute]
                                                          if v != obj[attribute]])
        return attribute_statement(obj, attribute, value, scene, rng)
    if not scene["relations"]:
        return None
    fact = choice(rng, scene["relations"])
    predicate = fact["predicate"] if truth else INVERSE_RELATION[fact["predicate"]]
    return relation_statement(scene, fact, predicate, rng, definite=True)


def _neutral(scene: Dict, rng: np.random.Generator) -> Statement:
    fillers = {k: choice(rng, v) for k, v in NEUTRAL_WORDS.items()}
    if rng.random() < 0.25:
        return choice(rng, NEUTRAL_SCENE_TEMPLATES).format(**fillers), ("neutral", None)
    obj = choice(rng, scene["objects"])
    d = unique_description(obj, scene, rng)
    # Objects with a twin in the image cannot be singled out: talk about "one of the ...".
    ref = noun_phrase(d, rng, "the") if d is not None else \
        "one of the " + noun_phrase(full_description(obj), rng, "", plural=True)
    return choice(rng, NEUTRAL_OBJECT_TEMPLATES).format(ref=ref, **fillers), ("neutral", d or full_description(obj))


def ve_hypothesis(scene: Dict, rng: np.random.Generator, label: str) -> Statement:
    """A hypothesis with the given VE label: entailed (true), contradicted (false) or undecidable.

    Entailments and contradictions share their forms (drawn first, uniformly), so only the
    scene, not the wording, tells them apart.
    """
    if label == "neutral":
        return _neutral(scene, rng)
    truth = label == "entailment"
    while True:
        form = choice(rng, VE_FORMS)
        for _ in range(10):
            made = _statement(scene, rng, form, truth)
            if made is not None and holds(made[1], scene) == truth:
                return made
