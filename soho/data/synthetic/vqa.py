"""VQA questions with answers defined by one scene graph, and ten annotators' answers to each."""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import numpy as np

from soho.data.synthetic.grammar import (
    absent_description,
    attribute_statement,
    choice,
    count_claim,
    count_phrase,
    cumulative_weights,
    draw_weighted,
    noun_phrase,
    partial_description,
    random_description,
    relation_statement,
    say,
    unique_description,
)
from soho.data.synthetic.logic import Description, answer
from soho.data.synthetic.vocabulary import (
    ATTRIBUTE_VALUES,
    INVERSE_RELATION,
    RELATION_WORDS,
    VQA_ANSWER_SYNONYMS,
    VQA_ANSWERS,
)

Question = Tuple[str, Tuple, str]
"""(text, program, question type)."""
_NOT_SHAPE = ("object", "item", "thing")  # "which shape does the small shape have?" reads badly


def _attribute(scene: Dict, rng: np.random.Generator, attribute: str) -> Optional[Question]:
    obj = choice(rng, scene["objects"])
    d = unique_description(obj, scene, rng, exclude=(attribute,))
    if d is None:
        return None
    the = noun_phrase(d, rng, "the", nouns=_NOT_SHAPE)
    colour = choice(rng, ("colour", "color"))
    templates = {
        "colour": (f"what {colour} is {the}?", f"what is the {colour} of {the}?", f"which {colour} does {the} have?",
                   f"{the} is what {colour}?"),
        "shape": (f"what shape is {the}?", f"what is the shape of {the}?", f"what kind of shape is {the}?",
                  f"which shape does {the} have?"),
        "size": (f"what size is {the}?", f"is {the} small or large?", f"how big is {the}?"),
    }[attribute]
    return choice(rng, templates), ("query", d, attribute), attribute


def _count(scene: Dict, rng: np.random.Generator) -> Question:
    d = partial_description(choice(rng, scene["objects"]), rng) if rng.random() < 0.7 else \
        (random_description(rng) if rng.random() < 0.4 else Description())
    pl = noun_phrase(d, rng, "", plural=True)
    text = choice(rng, (f"how many {pl} are there?", f"how many {pl} are in the image?",
                        f"how many {pl} can you see?", f"what is the number of {pl}?", f"how many {pl} are shown?"))
    return text, ("count", d), "count"


def _yes_no(scene: Dict, rng: np.random.Generator) -> Optional[Question]:
    want = bool(rng.random() < 0.5)  # balanced yes/no, so the prior alone scores 50 %
    kind = int(rng.integers(4))
    obj = choice(rng, scene["objects"])
    if kind == 0:
        d = partial_description(obj, rng) if want else absent_description(scene, rng)
        if d is None:
            return None
        text = choice(rng, (f"is there {noun_phrase(d, rng)}?", f"does the image contain {noun_phrase(d, rng)}?",
                            f"can you see {noun_phrase(d, rng)}?", f"are there any {noun_phrase(d, rng, '', True)}?"))
        claim = ("exists", d)
    elif kind == 1:
        made = count_claim(scene, rng, want)
        if made is None:
            return None
        d, n = made
        text = f"are there {count_phrase(n, d, rng)}?" if n > 1 else f"is there {count_phrase(n, d, rng)}?"
        claim = ("count", d, n)
    elif kind == 2:
        attribute = choice(rng, ("colour", "size", "shape"))
        value = obj[attribute] if want else choice(rng, [v for v in ATTRIBUTE_VALUES[attribute]
                                                         if v != obj[attribute]])
        made = attribute_statement(obj, attribute, value, scene, rng)
        if made is None:
            return None
        subject, _, rest = made[0].partition(" is ")
        if not rest:  # "looks"/"appears to be" wordings do not invert into a question
            return None
        text, claim = f"is {subject} {rest}?", made[1]
    else:
        if not scene["relations"]:
            return None
        fact = choice(rng, scene["relations"])
        predicate = fact["predicate"] if want else INVERSE_RELATION[fact["predicate"]]
        made = relation_statement(scene, fact, predicate, rng, definite=True)
        if made is None:
            return None
        _, da, _, db = made[1]
        text = f"is {noun_phrase(da, rng, 'the')} {say(rng, RELATION_WORDS[predicate])} {noun_phrase(db, rng, 'the')}?"
        claim = made[1]
    return text, ("verify", claim), "yes/no"


def _relation(scene: Dict, rng: np.random.Generator) -> Optional[Question]:
    if not scene["relations"]:
        return None
    fact = choice(rng, scene["relations"])
    anchor = next(o for o in scene["objects"] if o["id"] == fact["object"])
    d = unique_description(anchor, scene, rng)
    if d is None:
        return None
    rel = say(rng, RELATION_WORDS[fact["predicate"]])
    the = noun_phrase(d, rng, "the", nouns=_NOT_SHAPE)
    if rng.random() < 0.7:
        attribute = "shape"
        text = choice(rng, (f"what is {rel} {the}?", f"what shape is {rel} {the}?", f"which shape is {rel} {the}?"))
    else:
        attribute = "colour"
        text = choice(rng, (f"what colour is the object {rel} {the}?", f"what color is the shape {rel} {the}?"))
    program = ("query_related", fact["predicate"], d, attribute)
    return (text, program, "relation") if answer(program, scene) is not None else None


VQA_KINDS = ((functools.partial(_attribute, attribute="colour"), 2),
             (functools.partial(_attribute, attribute="shape"), 1.5),
             (functools.partial(_attribute, attribute="size"), 0.5),
             (_count, 2), (_yes_no, 3), (_relation, 1.5))
_VQA_CDF = cumulative_weights([w for _, w in VQA_KINDS])


def vqa_question(scene: Dict, rng: np.random.Generator) -> Question:
    """A question whose answer is defined (unique referents) and in ``VQA_ANSWERS``."""
    while True:
        made = VQA_KINDS[draw_weighted(rng, _VQA_CDF)][0](scene, rng)
        if made is not None and answer(made[1], scene) in VQA_ANSWERS:
            return made


def annotator_answers(canonical: str, rng: np.random.Generator, noise_fraction: float) -> List[str]:
    """Ten answers as in VQA v2: all the canonical one, or with 1-4 synonyms among them, so the
    soft score min(#matches / 3, 1) takes values below 1 for the synonyms."""
    answers = [canonical] * 10
    if rng.random() < noise_fraction:
        for position in rng.choice(10, size=int(rng.integers(1, 5)), replace=False):
            answers[int(position)] = choice(rng, VQA_ANSWER_SYNONYMS[canonical])
    return answers
