"""What the synthetic world is made of, and the words that name it.

Canonical values (``SHAPES``, ``COLOURS``, ...) are what scene graphs store; the ``*_WORDS``
tables are their surface forms in text, the first one the plain and most frequent.
"""
from __future__ import annotations

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SIZES = ("small", "large")
ATTRIBUTES = ("shape", "colour", "size")
ATTRIBUTE_VALUES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUNDS = ("gradient", "stripes", "blotches")

COLOUR_RGB = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (45, 95, 240), "yellow": (240, 225, 45),
    "purple": (160, 70, 210), "orange": (250, 140, 25), "white": (245, 245, 245), "cyan": (50, 215, 225),
}
"""Bright, saturated and at least ~90 apart in RGB, so no colour blends into the dark backgrounds."""
SIZE_RADIUS = {"small": 0.1, "large": 0.18}
"""Half the side of an object's box, as a fraction of the image side."""

SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",),
               "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign"), "star": ("star",),
               "hexagon": ("hexagon",)}
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet"), "cyan": ("cyan", "turquoise")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
OBJECT_NOUNS = ("object", "shape", "item", "thing")
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of", "on the left side of"),
    "right of": ("to the right of", "right of", "on the right of", "on the right side of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "underneath", "lower than"),
}
BACKGROUND_WORDS = {"gradient": ("shaded", "gradient"), "stripes": ("striped",), "blotches": ("mottled", "cloudy")}
ANY_BACKGROUND_WORDS = ("dark", "noisy", "textured", "grainy")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

VQA_ANSWERS = ("yes", "no", "0", "1", "2", "3", "4") + COLOURS + SHAPES + SIZES
"""The fixed answer set: every canonical VQA ``answer`` is one of these."""
VQA_ANSWER_SYNONYMS = {
    "yes": ("yeah", "yep"), "no": ("nope",), "0": ("zero", "none"), "1": ("one",), "2": ("two",),
    "3": ("three",), "4": ("four",), "red": ("crimson",), "green": ("lime",), "blue": ("dark blue",),
    "yellow": ("gold",), "purple": ("violet",), "orange": ("amber",), "white": ("light grey",),
    "cyan": ("turquoise", "light blue"), "circle": ("disc", "round"), "square": ("box",),
    "triangle": ("triangular",), "diamond": ("rhombus",), "cross": ("plus", "plus sign"),
    "star": ("star shape",), "hexagon": ("hexagonal",), "small": ("little", "tiny"), "large": ("big",),
}
"""What a careless annotator writes instead; only ever in the ``answers`` list, never as ``answer``."""
VQA_ANSWER_TYPES = ("yes/no", "number", "other")
VQA_QUESTION_TYPES = ("colour", "shape", "size", "count", "yes/no", "relation")
VE_LABELS = ("entailment", "neutral", "contradiction")
