"""Captions for pre-training and retrieval: true statements about one scene graph."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from soho.data.synthetic.grammar import (
    OBJECT_TEMPLATES,
    Statement,
    attribute_statement,
    choice,
    count_phrase,
    count_statement,
    cumulative_weights,
    draw_weighted,
    full_description,
    is_or_are,
    join_with_and,
    noun_phrase,
    partial_description,
    relation_statement,
    say,
    with_article,
)
from soho.data.synthetic.logic import Description
from soho.data.synthetic.vocabulary import ANY_BACKGROUND_WORDS, ATTRIBUTES, BACKGROUND_WORDS

LIST_TEMPLATES = ("{np}", "there is {np}", "an image of {np}", "a picture of {np}", "a photo of {np}",
                  "this image contains {np}", "we can see {np}", "{np} are visible", "a scene with {np}",
                  "the image features {np}", "{np} are shown")


def _caption_object(scene: Dict, rng: np.random.Generator) -> Statement:
    d = partial_description(choice(rng, scene["objects"]), rng)
    text, claim = choice(rng, OBJECT_TEMPLATES).format(np=noun_phrase(d, rng)), ("exists", d)
    if rng.random() < 0.25:
        if rng.random() < 0.5:
            word = say(rng, BACKGROUND_WORDS[scene["background"]])
            claim = ("and", claim, ("background", scene["background"]))
        else:
            word = choice(rng, ANY_BACKGROUND_WORDS)
        text += f" on {with_article('a', word)} background"
    return text, claim


def _caption_relation(scene: Dict, rng: np.random.Generator) -> Optional[Statement]:
    if not scene["relations"]:
        return None
    fact = choice(rng, scene["relations"])
    definite = rng.random() < 0.5
    return relation_statement(scene, fact, fact["predicate"], rng, definite) or \
        relation_statement(scene, fact, fact["predicate"], rng, False)


def _caption_total(scene: Dict, rng: np.random.Generator) -> Statement:
    return count_statement(Description(), len(scene["objects"]), rng)


def _caption_group(scene: Dict, rng: np.random.Generator) -> Statement:
    d = partial_description(choice(rng, scene["objects"]), rng)
    return count_statement(d, len(d.select(scene)), rng)


def _caption_breakdown(scene: Dict, rng: np.random.Generator) -> Optional[Statement]:
    """``there are two red objects and one blue object``: every colour (or shape) with its count."""
    if len(scene["objects"]) < 2:
        return None
    attribute = choice(rng, ("colour", "shape"))
    values = sorted({o[attribute] for o in scene["objects"]})
    values = [values[i] for i in rng.permutation(len(values))]
    groups = [Description(**{attribute: v}) for v in values]
    counts = [len(d.select(scene)) for d in groups]
    listed = join_with_and([count_phrase(n, d, rng) for d, n in zip(groups, counts)])
    template = choice(rng, ("there {be} {list}", "the image shows {list}", "the picture contains {list}",
                            "{list}", "we can see {list}"))
    return (template.format(be=is_or_are(counts[0]), list=listed),
            ("and", *(("count", d, n) for d, n in zip(groups, counts))))


def _caption_list(scene: Dict, rng: np.random.Generator, detailed: bool = False) -> Statement:
    """Every object, fully described (``detailed``) or partly, optionally after the total count."""
    objects = [scene["objects"][i] for i in rng.permutation(len(scene["objects"]))]
    descriptions = [full_description(o) if detailed or rng.random() < 0.5 else partial_description(o, rng)
                    for o in objects]
    listed = join_with_and([noun_phrase(d, rng) for d in descriptions])
    claims = [("exists", d) for d in descriptions]
    n = len(objects)
    if n > 1 and rng.random() < 0.4:
        text = f"{count_phrase(n, Description(), rng)}: {listed}"
        claims.append(("count", Description(), n))
    else:
        text = choice(rng, OBJECT_TEMPLATES if n == 1 else LIST_TEMPLATES).format(np=listed)
    return text, ("and", *claims)


def _caption_attribute(scene: Dict, rng: np.random.Generator) -> Optional[Statement]:
    obj = choice(rng, scene["objects"])
    attribute = choice(rng, ATTRIBUTES)
    return attribute_statement(obj, attribute, obj[attribute], scene, rng)


CAPTION_KINDS = ((_caption_object, 3), (_caption_relation, 3), (_caption_total, 1), (_caption_group, 2),
                 (_caption_breakdown, 1), (_caption_list, 1), (_caption_attribute, 2))
_CAPTION_CDF = cumulative_weights([w for _, w in CAPTION_KINDS])


def _true_statement(scene: Dict, rng: np.random.Generator) -> Statement:
    while True:
        made = CAPTION_KINDS[draw_weighted(rng, _CAPTION_CDF)][0](scene, rng)
        if made is not None:
            return made


def captions_for(scene: Dict, rng: np.random.Generator, count: int) -> List[Statement]:
    """``count`` distinct true captions, in random order. One lists every object with all its
    attributes, so each image has at least one caption specific enough for retrieval."""
    captions = [_caption_list(scene, rng, detailed=True)]
    seen = {captions[0][0]}
    for _ in range(50 * count):
        if len(captions) == count:
            break
        text, claim = _true_statement(scene, rng)
        if text not in seen:
            seen.add(text)
            captions.append((text, claim))
    while len(captions) < count:  # only a tiny scene with a large count could run out of wordings
        captions.append(_true_statement(scene, rng))
    return [captions[i] for i in rng.permutation(count)]
