"""The meaning of the generated text: descriptions, claims and VQA programs, evaluated on scene graphs.

Claims are tuples: ``("exists", d)``, ``("absent", d)``, ``("count", d, n)``, ``("attribute", d,
attr, value)`` (d picks exactly one object and it has that value), ``("related", d1, predicate,
d2)`` (some d1 is in that relation to some other d2), ``("background", kind)``, ``("and", claim,
...)``. Pair claims (NLVR2): ``("total", d, n)``, ``("compare", d, "more"|"fewer"|"same")`` (left
vs right), ``("both"|"exactly_one"|"neither", d)``, ``("side", "left"|"right", claim)``,
``("and", ...)``. ``("neutral", d)`` marks a VE hypothesis the image cannot decide, about an
object matching d (or the whole picture if None).

VQA programs: ``("query", d, attr)`` reads attr off the one object d picks; ``("count", d)``;
``("verify", claim)`` answers yes/no; ``("query_related", predicate, d, attr)`` reads attr off the
one object in that relation to the one object d picks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from soho.data.synthetic.vocabulary import ATTRIBUTES


@dataclass(frozen=True)
class Description:
    """The objects a noun phrase picks out; an attribute left as None matches anything."""

    shape: Optional[str] = None
    colour: Optional[str] = None
    size: Optional[str] = None

    def matches(self, obj: Dict) -> bool:
        return ((self.shape is None or obj["shape"] == self.shape)
                and (self.colour is None or obj["colour"] == self.colour)
                and (self.size is None or obj["size"] == self.size))

    def select(self, scene: Dict) -> List[Dict]:
        return [o for o in scene["objects"] if self.matches(o)]

    @property
    def attributes(self) -> Tuple[str, ...]:
        return tuple(a for a in ATTRIBUTES if getattr(self, a) is not None)


def claim_to_json(claim: Tuple) -> List:
    """A claim as JSON data (lists; a description as the mapping of its set attributes)."""
    return [claim_to_json(part) if isinstance(part, tuple) else
            {a: getattr(part, a) for a in part.attributes} if isinstance(part, Description) else part
            for part in claim]


def claim_from_json(data: List) -> Tuple:
    """The claim :func:`claim_to_json` wrote."""
    return tuple(claim_from_json(part) if isinstance(part, list) else
                 Description(**part) if isinstance(part, dict) else part for part in data)


def relax(claim: Tuple, attribute: str) -> Tuple:
    """The claim with ``attribute`` (shape, colour or size) left out of every description that names another
    attribute too: what it says when that attribute is not looked at. (A description of that attribute alone,
    "a red shape", keeps it: without it the claim would say nothing about the objects.)"""
    if claim[0] == "attribute" and claim[2] == attribute:  # "the red object is a triangle": one red object
        return ("count", relax_description(claim[1], attribute), 1)
    return tuple(relax(part, attribute) if isinstance(part, tuple) else
                 relax_description(part, attribute) if isinstance(part, Description) else part for part in claim)


def relax_description(description: Description, attribute: str) -> Description:
    if set(description.attributes) - {attribute}:
        return Description(**{a: getattr(description, a) for a in ATTRIBUTES if a != attribute})
    return description


def near_miss_table(claims: List[List], scenes: List[Dict]) -> List[List[bool]]:
    """Whether each claim is false of each scene but true once one attribute (shape, colour or size) is not
    looked at: the images that tell whether a model checks every attribute a caption names."""
    rows: Dict[str, List[bool]] = {}
    table = []
    for claim in claims:
        key = json.dumps(claim)
        if key not in rows:
            decoded = claim_from_json(claim)
            relaxed = [relax(decoded, attribute) for attribute in ATTRIBUTES]
            rows[key] = [not holds(decoded, scene) and any(holds(r, scene) for r in relaxed) for scene in scenes]
        table.append(rows[key])
    return table


def truth_table(claims: List[List], scenes: List[Dict]) -> List[List[bool]]:
    """Whether each claim (JSON data, as records store them) is true of each scene graph: (claims, scenes)."""
    rows: Dict[str, List[bool]] = {}
    table = []
    for claim in claims:
        # Captions repeat ("there is one object"): each distinct claim is evaluated once.
        key = json.dumps(claim)
        if key not in rows:
            decoded = claim_from_json(claim)
            rows[key] = [holds(decoded, scene) for scene in scenes]
        table.append(rows[key])
    return table


def related(scene: Dict, subject: Dict, predicate: str, obj: Dict) -> bool:
    return any(r["subject"] == subject["id"] and r["predicate"] == predicate and r["object"] == obj["id"]
               for r in scene["relations"])


def holds(claim: Tuple, scene: Dict) -> bool:
    """Whether a single-image claim is true of a scene graph (a closed world: what is not drawn is absent)."""
    kind = claim[0]
    if kind == "and":
        return all(holds(c, scene) for c in claim[1:])
    if kind == "exists":
        return bool(claim[1].select(scene))
    if kind == "absent":
        return not claim[1].select(scene)
    if kind == "count":
        return len(claim[1].select(scene)) == claim[2]
    if kind == "attribute":
        chosen = claim[1].select(scene)
        return len(chosen) == 1 and chosen[0][claim[2]] == claim[3]
    if kind == "related":
        _, first, predicate, second = claim
        return any(related(scene, a, predicate, b) for a in first.select(scene) for b in second.select(scene)
                   if a is not b)
    if kind == "background":
        return scene["background"] == claim[1]
    raise ValueError(f"not a single-image claim: {claim!r}")


def count_comparison(left: int, right: int) -> str:
    """``"more"``, ``"fewer"`` or ``"same"``: the left count against the right one."""
    return "more" if left > right else "fewer" if left < right else "same"


def presence(description: Description, left: Dict, right: Dict) -> str:
    """In how many of the two scenes ``description`` picks something: ``"neither"``, ``"exactly_one"``, ``"both"``."""
    found = bool(description.select(left)) + bool(description.select(right))
    return ("neither", "exactly_one", "both")[found]


def pair_holds(claim: Tuple, left: Dict, right: Dict) -> bool:
    """Whether an NLVR2 claim is true of a (left, right) pair of scene graphs."""
    kind = claim[0]
    if kind == "and":
        return all(pair_holds(c, left, right) for c in claim[1:])
    if kind == "side":
        return holds(claim[2], left if claim[1] == "left" else right)
    if kind == "total":
        return len(claim[1].select(left)) + len(claim[1].select(right)) == claim[2]
    if kind == "compare":
        return count_comparison(len(claim[1].select(left)), len(claim[1].select(right))) == claim[2]
    if kind in ("both", "exactly_one", "neither"):
        return presence(claim[1], left, right) == kind
    raise ValueError(f"not a pair claim: {claim!r}")


def answer(program: Tuple, scene: Dict) -> Optional[str]:
    """The answer to a VQA program, or None where its presupposition fails (nothing or several picked)."""
    kind = program[0]
    if kind == "count":
        return str(len(program[1].select(scene)))
    if kind == "verify":
        return "yes" if holds(program[1], scene) else "no"
    if kind == "query":
        chosen = program[1].select(scene)
        return chosen[0][program[2]] if len(chosen) == 1 else None
    if kind == "query_related":
        _, predicate, reference, attribute = program
        anchors = reference.select(scene)
        if len(anchors) != 1:
            return None
        found = [o for o in scene["objects"] if o is not anchors[0] and related(scene, o, predicate, anchors[0])]
        return found[0][attribute] if len(found) == 1 else None
    raise ValueError(f"not a VQA program: {program!r}")
