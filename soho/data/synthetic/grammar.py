"""The wording shared by captions, NLVR2 statements, VE hypotheses and VQA questions.

Random draws: :func:`choice`, weighted kinds (:func:`cumulative_weights`, :func:`draw_weighted`)
and :func:`say` (a surface word). Referring expressions: which :class:`Description` to use for
an object (part of its attributes, a unique one, one of nothing in the image). Phrases and
statements: noun phrases, counts, and the sentences about counts, attributes and relations that
several generators share; each statement comes with the claim it makes (``soho/data/synthetic/logic.py``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from soho.data.synthetic.logic import Description
from soho.data.synthetic.vocabulary import (
    ATTRIBUTES,
    COLOUR_WORDS,
    COLOURS,
    NUMBER_WORDS,
    OBJECT_NOUNS,
    RELATION_WORDS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
)

Statement = Tuple[str, Tuple]
"""(text, the claim it makes)."""

OBJECT_TEMPLATES = (
    "there is {np}", "{np}", "an image of {np}", "an image showing {np}", "a picture of {np}", "a photo of {np}",
    "a drawing of {np}", "an illustration of {np}", "this image contains {np}", "the picture includes {np}",
    "we can see {np}", "i can see {np}", "{np} is visible", "{np} can be seen", "a scene with {np}",
    "{np} is shown", "{np} is depicted here", "the image features {np}",
)
RELATION_TEMPLATES = ("{a} {rel} {b}", "there is {a} {rel} {b}", "{a} is {rel} {b}", "an image with {a} {rel} {b}",
                      "a picture of {a} {rel} {b}", "we can see {a} {rel} {b}", "{a} placed {rel} {b}")
DEFINITE_RELATION_TEMPLATES = ("{a} is {rel} {b}", "{a} sits {rel} {b}", "{a} lies {rel} {b}",
                               "{a} appears {rel} {b}", "{a} is located {rel} {b}", "{a} is positioned {rel} {b}")
COUNT_TEMPLATES = (
    "there {be} {cnp}", "there {be} {cnp} in the image", "there {be} {cnp} in total", "the picture contains {cnp}",
    "the image shows {cnp}", "an image with {cnp}", "{cnp} {be} visible", "{cnp} {be} shown", "we can see {cnp}",
    "i count {cnp}", "altogether there {be} {cnp}", "this picture has {cnp}",
)

ATTRIBUTE_SUBSETS = tuple(sorted((tuple(a for i, a in enumerate(ATTRIBUTES) if mask >> i & 1)
                                  for mask in range(1, 2 ** len(ATTRIBUTES))), key=len))
"""Every non-empty set of attributes, smallest first."""


# ----------------------------------------------------------------------------- random draws

def choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def cumulative_weights(weights: Sequence[float]) -> np.ndarray:
    """The normalised cumulative sum of ``weights``, for :func:`draw_weighted`."""
    cdf = np.cumsum(weights, dtype=np.float64) / np.sum(weights)
    cdf[-1] = 1.0  # rounding must never leave a draw past the end
    return cdf


def draw_weighted(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """An index drawn with the weights :func:`cumulative_weights` turned into ``cdf``."""
    return int(np.searchsorted(cdf, rng.random(), side="right"))


def say(rng: np.random.Generator, words: Sequence[str]) -> str:
    """A wording: the plain first one 60 % of the time, as people mostly use the common word."""
    if len(words) == 1 or rng.random() < 0.6:
        return words[0]
    return words[1 + int(rng.integers(len(words) - 1))]


# ----------------------------------------------------------------------------- phrases

def plural_of(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def with_article(article: str, phrase: str) -> str:
    if article == "a" and phrase[0] in "aeiou":
        article = "an"
    return f"{article} {phrase}" if article else phrase


def is_or_are(n: int) -> str:
    return "is" if n == 1 else "are"


def join_with_and(parts: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def noun_phrase(d: Description, rng: np.random.Generator, article: str = "a", plural: bool = False,
                nouns: Sequence[str] = OBJECT_NOUNS) -> str:
    """``a small red circle``, ``the cyan object``, ``large stars`` (size, colour, noun); ``nouns``
    name an object of any shape."""
    words = []
    if d.size:
        words.append(say(rng, SIZE_WORDS[d.size]))
    if d.colour:
        words.append(say(rng, COLOUR_WORDS[d.colour]))
    noun = say(rng, SHAPE_WORDS[d.shape]) if d.shape else say(rng, nouns)
    words.append(plural_of(noun) if plural else noun)
    return with_article(article, " ".join(words))


def count_phrase(n: int, d: Description, rng: np.random.Generator) -> str:
    """``no red circles``, ``a single star``, ``exactly three objects``."""
    if n == 0:
        return "no " + noun_phrase(d, rng, "", plural=True)
    if n == 1:
        return f"{choice(rng, ('one', 'one', 'a single', 'exactly one', 'only one'))} {noun_phrase(d, rng, '')}"
    exactly = choice(rng, ('', '', 'exactly ', 'precisely '))
    return f"{exactly}{NUMBER_WORDS[n]} {noun_phrase(d, rng, '', plural=True)}"


# ----------------------------------------------------------------------------- referring expressions

def full_description(obj: Dict) -> Description:
    return Description(obj["shape"], obj["colour"], obj["size"])


def partial_description(obj: Dict, rng: np.random.Generator, exclude: Sequence[str] = ()) -> Description:
    """Some of an object's attributes (at least one), the shape most often, as people name things."""
    keep = {a: a not in exclude and rng.random() < p for a, p in (("shape", 0.8), ("colour", 0.6), ("size", 0.35))}
    if not any(keep.values()):
        keep[next(a for a in ("shape", "colour", "size") if a not in exclude)] = True
    return Description(**{a: obj[a] if keep[a] else None for a in ATTRIBUTES})


def unique_description(obj: Dict, scene: Dict, rng: np.random.Generator,
                       exclude: Sequence[str] = ()) -> Optional[Description]:
    """A description that picks out ``obj`` alone (usually a shortest one), or None if none does."""
    options = []
    for subset in ATTRIBUTE_SUBSETS:
        d = Description(**{a: obj[a] for a in subset})
        if not set(subset) & set(exclude) and len(d.select(scene)) == 1:
            options.append(d)
    if not options:
        return None
    shortest = min(len(d.attributes) for d in options)
    # Mostly the shortest, as people say "the star" rather than "the small red star".
    if rng.random() < 0.7:
        options = [d for d in options if len(d.attributes) == shortest]
    return choice(rng, options)


def random_description(rng: np.random.Generator) -> Description:
    """Attributes drawn from the whole vocabulary, so usually of no object in the image."""
    d = Description(shape=choice(rng, SHAPES), colour=choice(rng, COLOURS) if rng.random() < 0.6 else None,
                    size=choice(rng, SIZES) if rng.random() < 0.2 else None)
    return d if rng.random() < 0.8 else Description(colour=choice(rng, COLOURS))


def absent_description(scene: Dict, rng: np.random.Generator) -> Optional[Description]:
    """A description of nothing in ``scene``, or None when ten random ones all picked something."""
    for _ in range(10):
        d = random_description(rng)
        if not d.select(scene):
            return d
    return None


def count_subject(objects: List[Dict], rng: np.random.Generator) -> Description:
    """What a count is about: some attributes of an object that is there, or all objects."""
    return Description() if rng.random() < 0.3 else partial_description(choice(rng, objects), rng)


def candidate_descriptions(objects: List[Dict], rng: np.random.Generator) -> List[Description]:
    """Every description of some object there, all objects, and one of (usually) nothing there.
    Kept in first-seen order: a set would iterate in a hash order that changes between processes."""
    found = dict.fromkeys([Description()] + [Description(**{a: o[a] for a in subset})
                                             for o in objects for subset in ATTRIBUTE_SUBSETS])
    found[random_description(rng)] = None
    return list(found)


def count_claim(scene: Dict, rng: np.random.Generator, truth: bool) -> Optional[Tuple[Description, int]]:
    """A subject and a number that is (``truth``) or is not its count in ``scene``.

    The number comes first, as the count of a random subject, and the subject is then chosen to
    fit: true and false claims then state each number equally often, so it gives nothing away.
    """
    n = len(count_subject(scene["objects"], rng).select(scene))
    pool = [d for d in candidate_descriptions(scene["objects"], rng) if (len(d.select(scene)) == n) == truth]
    return (choice(rng, pool), n) if pool else None


# ----------------------------------------------------------------------------- statements

def count_statement(d: Description, n: int, rng: np.random.Generator) -> Statement:
    text = choice(rng, COUNT_TEMPLATES).format(cnp=count_phrase(n, d, rng), be=is_or_are(n))
    return text, ("count", d, n)


def relation_statement(scene: Dict, fact: Dict, predicate: str, rng: np.random.Generator,
                       definite: bool) -> Optional[Statement]:
    """``{subject} {predicate} {object}`` for one fact's objects, with definite NPs only where unique."""
    by_id = {o["id"]: o for o in scene["objects"]}
    a, b = by_id[fact["subject"]], by_id[fact["object"]]
    rel = say(rng, RELATION_WORDS[predicate])
    if definite:
        da, db = unique_description(a, scene, rng), unique_description(b, scene, rng)
        if da is None or db is None:
            return None
        text = choice(rng, DEFINITE_RELATION_TEMPLATES).format(
            a=noun_phrase(da, rng, "the"), rel=rel, b=noun_phrase(db, rng, "the"))
    else:
        da, db = partial_description(a, rng), partial_description(b, rng)
        text = choice(rng, RELATION_TEMPLATES).format(a=noun_phrase(da, rng), rel=rel, b=noun_phrase(db, rng))
    return text, ("related", da, predicate, db)


def attribute_statement(obj: Dict, attribute: str, value: str, scene: Dict,
                        rng: np.random.Generator) -> Optional[Statement]:
    """``the circle is red``, ``the red object is a star``, ``the blue star is small``."""
    d = unique_description(obj, scene, rng, exclude=(attribute,))
    if d is None:
        return None
    subject = noun_phrase(d, rng, "the")
    if attribute == "shape":
        predicate = noun_phrase(Description(shape=value), rng, "a")
    elif attribute == "colour":
        predicate = say(rng, COLOUR_WORDS[value])
    else:
        predicate = say(rng, SIZE_WORDS[value])
    verb = choice(rng, ("is", "is", "looks", "appears to be")) if attribute != "shape" else "is"
    return f"{subject} {verb} {predicate}", ("attribute", d, attribute, value)
