"""NLVR2 statements: a sentence about a (left, right) pair of scene graphs, true or false as asked."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from soho.data.synthetic.grammar import (
    Statement,
    absent_description,
    candidate_descriptions,
    choice,
    count_claim,
    count_phrase,
    count_subject,
    cumulative_weights,
    draw_weighted,
    is_or_are,
    noun_phrase,
    partial_description,
    random_description,
)
from soho.data.synthetic.logic import Description, count_comparison, pair_holds, presence

SIDES = ("left", "right")
TOTAL_TEMPLATES = ("there {be} {cnp} in total", "in total there {be} {cnp}", "the two images contain {cnp} altogether",
                   "together the images show {cnp}", "across both images there {be} {cnp}",
                   "the images contain {cnp} in total")
COMPARE_TEMPLATES = {
    "more": ("the {side} image has more {pl} than the {other} image", "the {side} image contains more {pl} than the "
             "{other} one", "there are more {pl} in the {side} image than in the {other} image"),
    "fewer": ("the {side} image has fewer {pl} than the {other} image", "the {side} image contains fewer {pl} than "
              "the {other} one", "there are fewer {pl} in the {side} image than in the {other} image"),
    "same": ("both images have the same number of {pl}", "the two images contain equally many {pl}",
             "the left and right images have the same number of {pl}"),
}
PRESENCE_TEMPLATES = {
    "both": ("both images contain {np}", "each image has at least one {sg}", "there is {np} in both images",
             "{np} appears in each image", "both pictures show {np}"),
    "exactly_one": ("exactly one image contains {np}", "only one of the images has {np}",
                    "{np} appears in just one of the two images", "one image has {np} and the other does not"),
    "neither": ("neither image contains {np}", "no image has {np}", "there is no {sg} in either image",
                "{np} appears in neither image"),
}
SIDES_TEMPLATES = ("the left image has {l} and the right image has {r}",
                   "there {lbe} {l} in the left image and {r} in the right one",
                   "the left picture shows {l}, while the right picture shows {r}",
                   "in the left image there {lbe} {l}, and in the right image there {rbe} {r}")


def _pair_description(left: Dict, right: Dict, rng: np.random.Generator) -> Description:
    """Mostly attributes of an object in one of the images, so statements are about what is there."""
    if rng.random() < 0.2:
        return random_description(rng)
    return count_subject(left["objects"] + right["objects"], rng)


def _total(left, right, rng, target: bool, form: str) -> Optional[Statement]:
    # As in grammar.count_claim: the number first, then a subject whose total fits the label.
    n = sum(len(_pair_description(left, right, rng).select(s)) for s in (left, right))
    pool = [d for d in candidate_descriptions(left["objects"] + right["objects"], rng)
            if (len(d.select(left)) + len(d.select(right)) == n) == target]
    if n == 0 or not pool:
        return None
    d = choice(rng, pool)
    return choice(rng, TOTAL_TEMPLATES).format(be=is_or_are(n), cnp=count_phrase(n, d, rng)), ("total", d, n)


def _compare(left, right, rng, target: bool, op: str) -> Optional[Statement]:
    pool = [d for d in candidate_descriptions(left["objects"] + right["objects"], rng)
            if (d.select(left) or d.select(right))
            and (count_comparison(len(d.select(left)), len(d.select(right))) == op) == target]
    if not pool:
        return None
    d, side = choice(rng, pool), choice(rng, SIDES)
    # "the right image has fewer X than the left" is the claim "left has more".
    said = {"more": "fewer", "fewer": "more", "same": "same"}[op] if side == "right" else op
    text = choice(rng, COMPARE_TEMPLATES[said]).format(side=side, other="left" if side == "right" else "right",
                                                       pl=noun_phrase(d, rng, "", plural=True))
    return text, ("compare", d, op)


def _presence(left, right, rng, target: bool, kind: str) -> Optional[Statement]:
    pool = [d for d in candidate_descriptions(left["objects"] + right["objects"], rng)[1:]  # "an object" is no test
            if (presence(d, left, right) == kind) == target]
    if not pool:
        return None
    d = choice(rng, pool)
    text = choice(rng, PRESENCE_TEMPLATES[kind]).format(np=noun_phrase(d, rng), sg=noun_phrase(d, rng, ""))
    return text, (kind, d)


def _side_fact(scene: Dict, rng: np.random.Generator, true: bool) -> Optional[Tuple[str, str, Tuple]]:
    """(phrase, verb, claim) about one image: ``two red objects`` or ``a star``, true or made false."""
    if rng.random() < 0.5:
        made = count_claim(scene, rng, true)
        if made is None:
            return None
        d, n = made
        return count_phrase(n, d, rng), is_or_are(n), ("count", d, n)
    d = partial_description(choice(rng, scene["objects"]), rng) if true else absent_description(scene, rng)
    return None if d is None else (noun_phrase(d, rng), "is", ("exists", d))


def _sides(left, right, rng, target: bool, form: str) -> Optional[Statement]:
    wrong = None if target else choice(rng, SIDES)
    facts = [_side_fact(scene, rng, side != wrong) for side, scene in zip(SIDES, (left, right))]
    if None in facts:
        return None
    (left_text, lbe, lc), (right_text, rbe, rc) = facts
    text = choice(rng, SIDES_TEMPLATES).format(l=left_text, r=right_text, lbe=lbe, rbe=rbe)
    return text, ("and", ("side", "left", lc), ("side", "right", rc))


NLVR2_FORMS = ((_total, "total", 2), (_compare, "more", 1), (_compare, "fewer", 1), (_compare, "same", 1),
               (_presence, "both", 1), (_presence, "exactly_one", 1), (_presence, "neither", 1),
               (_sides, "sides", 2))
_NLVR2_CDF = cumulative_weights([w for *_, w in NLVR2_FORMS])


def nlvr2_statement(left: Dict, right: Dict, rng: np.random.Generator, target: bool) -> Statement:
    """A statement about both images whose truth value is ``target`` (checked with
    ``soho.data.synthetic.logic.pair_holds``).

    The form ("exactly one image contains ...") is drawn first and only then a statement of
    that form with the wanted truth value, so every form is true about as often as false and
    the label cannot be read off the wording alone.
    """
    while True:
        build, form, _ = NLVR2_FORMS[draw_weighted(rng, _NLVR2_CDF)]
        for _ in range(20):
            made = build(left, right, rng, target, form)
            if made is not None and pair_holds(made[1], left, right) == target:
                return made
