"""The embedded default data: a procedurally drawn world of shapes, and text that is true of it.

Every image holds 1-4 objects (shape, colour, size) on a dark, textured, noisy background.
Its scene graph (boxes, attributes, pairwise spatial relations) is stored with every sample as
ground truth for probes. All text is generated from scene graphs through small logical forms
("claims") that :func:`holds` / :func:`pair_holds` / :func:`answer` evaluate, so captions are
true, NLVR2 labels, VE labels and VQA answers are correct by construction, and tests can check
them against the stored graphs.

Generation is a pure function of (settings, split, group index): the same seed gives
byte-identical shards whatever the number of worker processes.

Splits (sizes count samples; an image-text sample is one image):

- ``pretrain``, ``retrieval_{train,val,test}``: image + captions.
- ``nlvr2_*``: two images + a statement about both + true/false (one true and one false
  statement per image pair, so labels are exactly balanced).
- ``ve_*``: image + hypothesis + entailment/neutral/contradiction (one of each per image).
- ``vqa_*``: image + question + 10 annotator answers (``vqa_questions_per_image`` per image).

One module per part: ``vocabulary`` (what the world is made of and the words for it),
``config`` (settings and splits), ``scenes`` (scene graphs), ``render`` (pixels), ``logic``
(what text means), ``grammar`` (wording shared by all text), ``captions``, ``nlvr2``, ``ve``,
``vqa`` (one generator per task), ``samples`` (records and images of one drawn image) and
``build`` (the world on disk, written by ``soho/data/convert/writer.py``).
"""
from soho.data.synthetic.build import ensure_world, generate_world
from soho.data.synthetic.captions import captions_for
from soho.data.synthetic.config import (
    DEFAULT_SPLIT_SIZES,
    GENERATOR_VERSION,
    SPLITS,
    TASKS,
    SyntheticWorldConfig,
    split_task,
)
from soho.data.synthetic.grammar import count_phrase, noun_phrase, plural_of
from soho.data.synthetic.logic import Description, answer, holds, pair_holds, related
from soho.data.synthetic.nlvr2 import nlvr2_statement
from soho.data.synthetic.render import SHAPE_POLYGONS, encode_image, render
from soho.data.synthetic.samples import make_group, texts_of
from soho.data.synthetic.scenes import box_centre, relations_of, sample_scene
from soho.data.synthetic.ve import NEUTRAL_WORDS, ve_hypothesis
from soho.data.synthetic.vocabulary import (
    ANY_BACKGROUND_WORDS,
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    BACKGROUND_WORDS,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOUR_WORDS,
    COLOURS,
    INVERSE_RELATION,
    NUMBER_WORDS,
    OBJECT_NOUNS,
    RELATION_WORDS,
    RELATIONS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_RADIUS,
    SIZE_WORDS,
    SIZES,
    VE_LABELS,
    VQA_ANSWER_SYNONYMS,
    VQA_ANSWER_TYPES,
    VQA_ANSWERS,
    VQA_QUESTION_TYPES,
)
from soho.data.synthetic.vqa import annotator_answers, vqa_question

__all__ = [
    "ANY_BACKGROUND_WORDS", "ATTRIBUTES", "ATTRIBUTE_VALUES", "BACKGROUNDS", "BACKGROUND_WORDS", "COLOURS",
    "COLOUR_RGB", "COLOUR_WORDS", "DEFAULT_SPLIT_SIZES", "Description", "GENERATOR_VERSION", "INVERSE_RELATION",
    "NEUTRAL_WORDS", "NUMBER_WORDS", "OBJECT_NOUNS", "RELATIONS", "RELATION_WORDS", "SHAPES", "SHAPE_POLYGONS",
    "SHAPE_WORDS", "SIZES", "SIZE_RADIUS", "SIZE_WORDS", "SPLITS", "SyntheticWorldConfig", "TASKS", "VE_LABELS",
    "VQA_ANSWERS", "VQA_ANSWER_SYNONYMS", "VQA_ANSWER_TYPES", "VQA_QUESTION_TYPES", "annotator_answers", "answer",
    "box_centre", "captions_for", "count_phrase", "encode_image", "ensure_world", "generate_world", "holds",
    "make_group", "noun_phrase", "nlvr2_statement", "pair_holds", "plural_of", "related", "relations_of", "render",
    "sample_scene", "split_task", "texts_of", "ve_hypothesis", "vqa_question",
]
