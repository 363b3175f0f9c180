"""VALUE's probing classifiers (Cao et al., arXiv 2005.07310): linear probes on attention and hidden states.

A probe is a multinomial logistic regression (:func:`fit_linear_probe`) trained on features read off
a :class:`~soho.analysis.capture.Capture` and scored on held-out images (no image on both sides).

- Visual coreference (phrase <-> region): does a caption word name what an image cell shows? Pairs
  (phrase, cell), positive when a box the phrase refers to covers the cell's centre, and as many
  negatives drawn from the other real cells of the same image (balanced: chance is 0.5).
- Visual relation (region pairs): the spatial predicate between two objects, from the cells at
  their box centres.
- Linguistic (SentEval-style): caption length bucket, number of objects in the image, whether the
  caption states a relation, from each layer's mean over the real text tokens.

Pair features, both probes alike: ``attention`` holds, per layer, every head's attention from the
first token to the second, then from the second to the first (2 x layers x heads values); ``layer k``
holds the two tokens' states [a, b, a * b] in layer k (embeddings = layer 0). A phrase of several
tokens is their mean, in attention and in states.

The ground truth is a :class:`Grounding` per image-caption pair, read by a :class:`GroundingSource`
(:data:`GROUNDING_SOURCES`): ``synthetic`` from the synthetic world's scene graphs (every probe),
``flickr30k_entities`` from the Flickr30k Entities converter's phrases and boxes (coreference and
caption length), ``visual_genome`` from the Visual Genome converter's ``relations`` split (relation
and caption length; the caption shown is the names of the related objects, never a predicate).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from soho.analysis.capture import Capture, capture
from soho.data.samples import SampleError, decode_image, decode_json, record_captions
from soho.data.shards import SkipCounter, expand_urls, stream_samples
from soho.data.synthetic import RELATION_WORDS, SHAPE_WORDS, box_centre
from soho.data.synthetic import plural_of as _plural
from soho.models.soho import SohoModel
from soho.processing import SohoProcessor

Box = Tuple[float, float, float, float]
"""[x0, y0, x1, y1] in pixels."""

PROBES = ("coreference", "relation", "caption_length", "object_count", "states_relation")
CROSS_MODAL_PROBES = ("coreference", "relation")
LENGTH_EDGES = (6, 8, 12)
"""Caption length buckets by word count: < 6, 6-7, 8-11, >= 12 (about a quarter of synthetic captions each)."""
L2_VALUES = (1e-3, 1e-2, 1e-1)


# ----------------------------------------------------------------------------- ground truth

@dataclass
class Mention:
    """A caption phrase and the image regions it refers to."""

    span: Tuple[int, int]
    """[start, end) characters of the caption."""
    boxes: List[Box]


@dataclass
class RegionRelation:
    subject: Box
    object: Box
    predicate: str


@dataclass
class Grounding:
    """What the probes know about one image-caption pair."""

    caption: str
    mentions: List[Mention]
    relations: List[RegionRelation]
    """Relations between regions of the image (the caption need not state them)."""
    objects: Optional[int] = None
    """Objects in the image, where the data says (the synthetic scene graphs)."""
    states_relation: Optional[bool] = None
    """Whether the caption states a relation, where the data says (the synthetic grammar)."""

    def scaled(self, x: float, y: float) -> Grounding:
        """The same grounding with every box scaled, e.g. into the processed image's pixels."""
        def scale(box: Box) -> Box:
            return (box[0] * x, box[1] * y, box[2] * x, box[3] * y)
        return replace(self, mentions=[Mention(m.span, [scale(b) for b in m.boxes]) for m in self.mentions],
                       relations=[RegionRelation(scale(r.subject), scale(r.object), r.predicate)
                                  for r in self.relations])


def _phrase_pattern(phrases: Iterable[str]) -> re.Pattern:
    # Longest first, so "plus signs" is not read as "plus sign" followed by "s".
    alternatives = sorted(set(phrases), key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(p) for p in alternatives) + r")\b")


# The generator's own plural, so every form a caption can hold is matched.
_SHAPE_PATTERNS = {shape: _phrase_pattern([w for word in words for w in (word, _plural(word))])
                   for shape, words in SHAPE_WORDS.items()}
_RELATION_PATTERN = _phrase_pattern(w for words in RELATION_WORDS.values() for w in words)


def _dominant_predicate(subject: Box, obj: Box, predicates: Sequence[str]) -> str:
    """Of the predicates a pair has (it may be both left of and above), the one along the axis with
    the larger gap between the box centres: a 4-way label needs one."""
    (sx, sy), (ox, oy) = box_centre(subject), box_centre(obj)
    gap = {"left of": ox - sx, "right of": sx - ox, "above": oy - sy, "below": sy - oy}
    return max(predicates, key=gap.__getitem__)


def synthetic_grounding(record: Dict, caption: str) -> Grounding:
    """The ground truth of a synthetic image-caption record (see docs/DATA.md): every shape noun or
    synonym, singular or plural, refers to all objects of that shape; one relation per ordered pair."""
    scene = record.get("scene_graph")
    if not isinstance(scene, dict):
        raise ValueError(f"record {record.get('image_id', '?')!r} has no scene_graph: the synthetic probes need "
                         "the synthetic world's records")
    objects = {o["id"]: o for o in scene["objects"]}
    mentions = []
    for shape, pattern in _SHAPE_PATTERNS.items():
        boxes = [tuple(o["box"]) for o in scene["objects"] if o["shape"] == shape]
        # "no circles" names a shape that is not there: nothing to point at.
        if boxes:
            mentions += [Mention(match.span(), boxes) for match in pattern.finditer(caption)]
    by_pair: Dict[Tuple[int, int], List[str]] = {}
    for relation in scene["relations"]:
        by_pair.setdefault((relation["subject"], relation["object"]), []).append(relation["predicate"])
    relations = []
    for (subject, obj), predicates in sorted(by_pair.items()):
        subject_box, object_box = tuple(objects[subject]["box"]), tuple(objects[obj]["box"])
        relations.append(RegionRelation(subject_box, object_box,
                                        _dominant_predicate(subject_box, object_box, predicates)))
    return Grounding(caption=caption, mentions=sorted(mentions, key=lambda m: m.span), relations=relations,
                     objects=len(scene["objects"]), states_relation=bool(_RELATION_PATTERN.search(caption)))


def _record_name(record: Dict) -> str:
    return repr(record.get("image_id", "?"))


def _word_spans(caption: str) -> List[Tuple[int, int]]:
    """[start, end) characters of each word of ``caption.split()``."""
    return [match.span() for match in re.finditer(r"\S+", caption)]


def flickr30k_entities_grounding(record: Dict, caption: str) -> Grounding:
    """The ground truth of a Flickr30k Entities record (data_scripts/convert_flickr30k_entities.py): each
    phrase of ``caption`` whose entity has boxes refers to those boxes. Scene and unboxed entities have
    nothing to point at and are left out."""
    captions, phrases, entities = record.get("captions"), record.get("phrases"), record.get("entities")
    if not isinstance(captions, list) or not isinstance(phrases, list) or not isinstance(entities, dict):
        raise ValueError(f"record {_record_name(record)} lacks captions, phrases or entities: the "
                         "flickr30k_entities probes need data_scripts/convert_flickr30k_entities.py's records")
    if caption not in captions:
        raise ValueError(f"record {_record_name(record)} has no caption {caption!r}")
    index, words = captions.index(caption), _word_spans(caption)
    mentions = []
    for phrase in phrases:
        if phrase.get("caption") != index:
            continue
        boxes = [tuple(entry["box"]) for entry in entities.get(str(phrase.get("entity_id")), {}).get("boxes", [])]
        if not boxes:
            continue
        first, count = phrase["first_word"], len(phrase["text"].split())
        if first + count > len(words) or caption[words[first][0]:words[first + count - 1][1]] != phrase["text"]:
            raise ValueError(f"record {_record_name(record)}: phrase {phrase['text']!r} is not word {first} of "
                             f"caption {index} {caption!r}")
        mentions.append(Mention((words[first][0], words[first + count - 1][1]), boxes))
    return Grounding(caption=caption, mentions=sorted(mentions, key=lambda m: m.span), relations=[])


def _visual_genome_relations(record: Dict) -> List[Dict]:
    relations = record.get("relations")
    if not isinstance(relations, list):
        raise ValueError(f"record {_record_name(record)} has no relations: the visual_genome probes need the "
                         "'relations' split of data_scripts/convert_visual_genome.py --relationships")
    return relations


def visual_genome_captions(record: Dict) -> List[str]:
    """One caption naming the related objects in order of first appearance ("man, horse, hat"): the model
    sees what the regions are, never how they relate."""
    names = dict.fromkeys(end["name"] for relation in _visual_genome_relations(record)
                          for end in (relation["subject"], relation["object"]))
    return [", ".join(names)]


def visual_genome_grounding(record: Dict, caption: str) -> Grounding:
    """The ground truth of a Visual Genome ``relations`` record: every subject-predicate-object triple,
    the predicate as the converter lower-cased it."""
    relations = [RegionRelation(tuple(relation["subject"]["box"]), tuple(relation["object"]["box"]),
                                relation["predicate"]) for relation in _visual_genome_relations(record)]
    return Grounding(caption=caption, mentions=[], relations=relations)


@dataclass(frozen=True)
class GroundingSource:
    """How a split's records become probe examples: the captions each image is shown with, and the
    ground truth of each (record, caption)."""

    captions: Callable[[Dict], List[str]]
    ground: Callable[[Dict, str], Grounding]


GROUNDING_SOURCES: Dict[str, GroundingSource] = {
    "synthetic": GroundingSource(record_captions, synthetic_grounding),
    "flickr30k_entities": GroundingSource(record_captions, flickr30k_entities_grounding),
    "visual_genome": GroundingSource(visual_genome_captions, visual_genome_grounding),
}


# ----------------------------------------------------------------------------- batches

@dataclass
class ProbeBatch:
    inputs: Dict[str, Tensor]
    """What :func:`capture` takes: pixel_values, pixel_mask, input_ids, attention_mask, token_type_ids and
    image_index (caption n shows image ``image_index[n]``)."""
    offsets: Tensor
    """(N, Lt, 2) [start, end) characters of each token in its caption; (0, 0) for special and padding tokens."""
    groundings: List[Grounding]
    """Per caption, boxes in the pixels of the processed image the caption belongs to."""
    images: Tensor
    """(N,) number in the split of the image each caption belongs to (the split of the probe data is by it)."""

    def mismatched(self) -> ProbeBatch:
        """Each caption shown with the next image of the batch; the groundings still describe the caption's
        own image, so probes that read the image should fall to chance."""
        image_index = self.inputs["image_index"]
        count = len(self.inputs["pixel_values"])
        if count < 2:
            raise ValueError("mismatched captions need at least 2 images per batch")
        return replace(self, inputs={**self.inputs, "image_index": (image_index + 1) % count})


def _real_extent(pixel_mask: Tensor) -> Tuple[int, int]:
    """(height, width) of the unpadded image in a (H, W) pixel mask."""
    return int(pixel_mask.any(1).sum()), int(pixel_mask.any(0).sum())


def make_probe_batch(images: Sequence[Image.Image], captions: Sequence[Sequence[str]],
                     groundings: Sequence[Sequence[Grounding]], image_numbers: Sequence[int],
                     processor: SohoProcessor) -> ProbeBatch:
    """Captions ``captions[i]`` of image i with their groundings (boxes in the original image's pixels)."""
    pixels = processor(images=list(images))
    texts = [text for group in captions for text in group]
    inputs = {**pixels, **processor(text=texts)}
    encoded = processor.tokenizer(texts, padding="longest", truncation=True, max_length=processor.max_text_length,
                                  return_offsets_mapping=True, return_tensors="pt")
    if not torch.equal(encoded["input_ids"], inputs["input_ids"]):
        raise ValueError("the tokenizer's offsets do not belong to the processor's tokens")
    counts = torch.tensor([len(group) for group in captions])
    inputs["image_index"] = torch.arange(len(images)).repeat_interleave(counts)
    scaled = []
    for image, mask, group in zip(images, pixels["pixel_mask"], groundings):
        height, width = _real_extent(mask)
        scaled += [g.scaled(width / image.width, height / image.height) for g in group]
    return ProbeBatch(inputs=inputs, offsets=encoded["offset_mapping"], groundings=scaled,
                      images=torch.tensor(list(image_numbers)).repeat_interleave(counts))


def read_probe_batches(shards: Union[str, List[str]], processor: SohoProcessor, batch_size: int,
                       max_batches: Optional[int] = None, captions_per_image: int = 5,
                       source: GroundingSource = GROUNDING_SOURCES["synthetic"],
                       ) -> Tuple[List[ProbeBatch], Dict[str, int]]:
    """The images of a split in order, each with its first ``captions_per_image`` captions (``source.captions``)
    grounded by ``source.ground``, ``batch_size`` images a batch; and the skipped samples' counts."""
    skips = SkipCounter()
    batches: List[ProbeBatch] = []
    pending: List[Tuple] = []
    number = 0

    def flush():
        batches.append(make_probe_batch(*zip(*pending), processor=processor))
        pending.clear()

    for sample in stream_samples(expand_urls(shards), seed=0, rank=0, world_size=1, worker=0, num_workers=1,
                                 skips=skips, repeat=False):
        if max_batches is not None and len(batches) >= max_batches:
            break
        try:
            record = decode_json(sample)
            texts = source.captions(record)[:captions_per_image]
            image = decode_image(sample)
        except SampleError as error:
            skips.skip(error.reason, f"{sample.get('__url__', '')}:{sample.get('__key__', '?')}", error)
            continue
        pending.append((image, texts, [source.ground(record, text) for text in texts], number))
        number += 1
        if len(pending) == batch_size:
            flush()
    if pending and (max_batches is None or len(batches) < max_batches):
        flush()
    if not batches:
        raise ValueError(f"no usable image-caption samples in {shards!r} (skipped: {dict(skips)})")
    return batches, dict(skips)


# ----------------------------------------------------------------------------- features

def cell_centres(grid_size: Tuple[int, int], stride: int) -> Tensor:
    """(h * w, 2) pixel (x, y) of each cell's centre, row-major."""
    rows, columns = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]), indexing="ij")
    return torch.stack([columns.flatten(), rows.flatten()], 1).double().add(0.5).mul(stride)


def covered_cells(boxes: Sequence[Box], grid_size: Tuple[int, int], stride: int) -> Tensor:
    """(h * w,) True on cells whose centre lies in any of the boxes (edges included)."""
    centres = cell_centres(grid_size, stride)
    covered = torch.zeros(len(centres), dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        covered |= ((centres[:, 0] >= x0) & (centres[:, 0] <= x1) & (centres[:, 1] >= y0) & (centres[:, 1] <= y1))
    return covered


def cell_at(point: Tuple[float, float], grid_size: Tuple[int, int], stride: int) -> int:
    """Row-major index of the cell holding pixel (x, y)."""
    row = min(max(int(point[1] // stride), 0), grid_size[0] - 1)
    column = min(max(int(point[0] // stride), 0), grid_size[1] - 1)
    return row * grid_size[1] + column


def span_tokens(offsets: Tensor, span: Tuple[int, int]) -> Tensor:
    """(Lt,) True on the tokens (by their (Lt, 2) character offsets) that overlap the character span;
    all False when truncation cut part of the span off ("hexag" is not "hexagon")."""
    start, end = offsets[:, 0], offsets[:, 1]
    tokens = (start < end) & (start < span[1]) & (end > span[0])
    if not tokens.any() or end[tokens].max() < span[1]:
        return torch.zeros_like(tokens)
    return tokens


def pair_features(captured: Capture, pairs: Tensor, first: Tensor, second: Tensor) -> Dict[str, Tensor]:
    """Features of E token pairs: ``pairs`` (E,) the captured pair each comes from, ``first`` and ``second``
    (E, L) weights over the [text; image] stream that sum to 1 (one-hot for a token, uniform over a phrase).

    Returns ``attention`` (E, 2 x layers x heads): per layer, each head's attention first -> second, then
    second -> first; and ``layer k`` (E, 3 D) [a, b, a * b] of the two states, k = 0 the embeddings.
    """
    attention = []
    for probabilities in captured.attentions:
        selected = probabilities[pairs]
        attention += [torch.einsum("ehij,ei,ej->eh", selected, first, second),
                      torch.einsum("ehij,ei,ej->eh", selected, second, first)]
    features = {"attention": torch.cat(attention, 1)}
    for layer, states in enumerate(captured.hidden_states):
        a = torch.einsum("eld,el->ed", states[pairs], first)
        b = torch.einsum("eld,el->ed", states[pairs], second)
        features[f"layer {layer}"] = torch.cat([a, b, a * b], 1)
    return features


@dataclass
class CoreferencePairs:
    pairs: Tensor
    """(E,) captured pair."""
    tokens: Tensor
    """(E, Lt) True on the phrase's tokens."""
    cells: Tensor
    """(E,) row-major image cell."""
    labels: Tensor
    """(E,) 1 where the phrase refers to what the cell shows."""


def coreference_pairs(captured: Capture, offsets: Tensor, groundings: Sequence[Grounding],
                      generator: torch.Generator) -> CoreferencePairs:
    """Per mention, its positive cells (real cells whose centre a referred box covers) and as many negatives
    drawn from the image's other real cells; positives are subsampled where fewer negatives exist.

    The cells are those of the image each caption is shown with; the boxes come from the caption's grounding.
    """
    pairs, tokens, cells, labels = [], [], [], []
    for n, grounding in enumerate(groundings):
        real = captured.image_mask[n]
        for mention in grounding.mentions:
            phrase = span_tokens(offsets[n], mention.span) & captured.text_mask[n]
            positive = covered_cells(mention.boxes, captured.grid_size, captured.stride) & real
            negative = real & ~positive
            count = min(int(positive.sum()), int(negative.sum()))
            # A truncated phrase, or a box between cell centres, leaves nothing to probe.
            if not phrase.any() or count == 0:
                continue
            for label, candidates in ((1, positive), (0, negative)):
                chosen = candidates.nonzero()[:, 0]
                chosen = chosen[torch.randperm(len(chosen), generator=generator)[:count]].sort().values
                pairs += [n] * count
                tokens += [phrase] * count
                cells.append(chosen)
                labels += [label] * count
    if not pairs:
        none = torch.zeros(0, dtype=torch.long)
        return CoreferencePairs(none, torch.zeros(0, captured.text_length, dtype=torch.bool), none, none)
    return CoreferencePairs(torch.tensor(pairs), torch.stack(tokens), torch.cat(cells), torch.tensor(labels))


@dataclass
class RelationPairs:
    pairs: Tensor
    subject_cells: Tensor
    object_cells: Tensor
    predicates: List[str]


def relation_pairs(captured: Capture, groundings: Sequence[Grounding], images: Tensor) -> RelationPairs:
    """The cells at the two objects' box centres for each relation, from the first caption of each image only
    (the relations are the image's, so the other captions would add near copies); pairs whose centres share a
    cell or fall on padding are left out."""
    pairs, subjects, objects, predicates = [], [], [], []
    seen = set()
    for n, grounding in enumerate(groundings):
        image = int(images[n])
        if image in seen:
            continue
        seen.add(image)
        for relation in grounding.relations:
            subject = cell_at(box_centre(relation.subject), captured.grid_size, captured.stride)
            obj = cell_at(box_centre(relation.object), captured.grid_size, captured.stride)
            if subject != obj and captured.image_mask[n, subject] and captured.image_mask[n, obj]:
                pairs.append(n)
                subjects.append(subject)
                objects.append(obj)
                predicates.append(relation.predicate)
    return RelationPairs(torch.tensor(pairs, dtype=torch.long), torch.tensor(subjects, dtype=torch.long),
                         torch.tensor(objects, dtype=torch.long), predicates)


def text_representations(captured: Capture) -> List[Tensor]:
    """Per layer (embeddings first), (N, D) the mean of the real text tokens' states."""
    mask = captured.text_mask.float()
    return [torch.einsum("nld,nl->nd", states[:, :captured.text_length], mask) / mask.sum(1, keepdim=True)
            for states in captured.hidden_states]


def length_bucket(caption: str, edges: Sequence[int] = LENGTH_EDGES) -> int:
    words = len(caption.split())
    return sum(words >= edge for edge in edges)


# ----------------------------------------------------------------------------- the linear probe

@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features."""

    weight: Tensor
    """(F, C)"""
    bias: Tensor
    mean: Tensor
    scale: Tensor

    def logits(self, features: Tensor) -> Tensor:
        return ((features.double() - self.mean) / self.scale) @ self.weight + self.bias

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(1)


def fit_linear_probe(features: Tensor, labels: Tensor, num_classes: int, l2: float = 1e-2,
                     max_iterations: int = 100) -> LinearProbe:
    """Minimise mean cross-entropy + l2 / 2 * |W|^2 (bias not penalised) with L-BFGS in float64 from zeros.

    Deterministic. Features are standardised with the training set's mean and deviation first, so one
    l2 suits features of any scale; constant features stay 0.
    """
    features = features.double()
    mean = features.mean(0)
    scale = features.std(0, unbiased=False).clamp_min(1e-8)
    inputs = (features - mean) / scale
    targets = F.one_hot(labels, num_classes).double()
    weight = torch.zeros(features.shape[1], num_classes, dtype=torch.float64)
    bias = torch.zeros(num_classes, dtype=torch.float64)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iterations, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    # The gradient in closed form: several times cheaper than autograd for a problem this small.
    def closure() -> Tensor:
        log_probabilities = (inputs @ weight + bias).log_softmax(1)
        residual = (log_probabilities.exp() - targets) / len(labels)
        weight.grad = inputs.T @ residual + l2 * weight
        bias.grad = residual.sum(0)
        return -(log_probabilities * targets).sum() / len(labels) + l2 / 2 * weight.pow(2).sum()

    # The matrices are small: on a busy machine, handing them between threads costs 10-60x the work itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return LinearProbe(weight, bias, mean, scale)


def split_images(images: Tensor, fraction: float, seed: int) -> Tensor:
    """(len(images),) True on the examples of a seeded ``fraction`` of the distinct images (at least one,
    and never all of them when there are two or more)."""
    distinct = torch.unique(images)
    count = min(max(round(fraction * len(distinct)), 1), max(len(distinct) - 1, 1))
    chosen = distinct[torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed))[:count]]
    return torch.isin(images, chosen)


@dataclass
class ProbeResult:
    accuracy: float
    """On the held-out images."""
    chance: float
    """Accuracy on the held-out images of always answering the training set's most frequent class."""
    l2: float
    """The L2 weight chosen on a validation part of the training images."""
    train_examples: int
    test_examples: int
    classes: List[str]

    def to_dict(self) -> Dict:
        return dict(vars(self))


def evaluate_probe(features: Tensor, labels: Tensor, test: Tensor, images: Tensor, classes: Sequence[str],
                   l2_values: Sequence[float] = L2_VALUES, seed: int = 0) -> ProbeResult:
    """Fit on the examples outside ``test`` and score on ``test``; with several ``l2_values``, the one scoring
    best on a quarter of the training images (split by image) is refitted on all of them."""
    if test.all() or not test.any():
        raise ValueError(f"a probe needs examples on both sides of the split, got {int(test.sum())} test "
                         f"examples of {len(test)}")
    train_x, train_y, train_images = features[~test], labels[~test], images[~test]
    l2 = l2_values[0]
    if len(l2_values) > 1 and len(torch.unique(train_images)) > 1:
        validation = split_images(train_images, 0.25, seed + 1)
        scores = []
        for value in l2_values:
            probe = fit_linear_probe(train_x[~validation], train_y[~validation], len(classes), value)
            scores.append(float((probe.predict(train_x[validation]) == train_y[validation]).double().mean()))
        l2 = l2_values[max(range(len(scores)), key=lambda i: (scores[i], l2_values[i]))]
    probe = fit_linear_probe(train_x, train_y, len(classes), l2)
    majority = int(torch.bincount(train_y, minlength=len(classes)).argmax())
    return ProbeResult(
        accuracy=float((probe.predict(features[test]) == labels[test]).double().mean()),
        chance=float((labels[test] == majority).double().mean()),
        l2=l2, train_examples=int((~test).sum()), test_examples=int(test.sum()), classes=list(classes))


# ----------------------------------------------------------------------------- collecting and reporting

@dataclass
class _Examples:
    features: Dict[str, List[Tensor]] = field(default_factory=dict)
    labels: List[str] = field(default_factory=list)
    images: List[Tensor] = field(default_factory=list)

    def add(self, features: Dict[str, Tensor], labels: Sequence[str], images: Tensor) -> None:
        for name, values in features.items():
            self.features.setdefault(name, []).append(values.float())
        self.labels += list(labels)
        self.images.append(images)


class ProbeCollector:
    """Probe examples of captured batches, then the probes' held-out accuracies.

    Everything is seeded: the same batches give the same examples and the same split, so conditions
    (a trained and a random model, matched and mismatched captions) are compared on the same cells.
    """

    def __init__(self, probes: Sequence[str] = PROBES, seed: int = 0):
        unknown = sorted(set(probes) - set(PROBES))
        if unknown:
            raise ValueError(f"unknown probe(s) {', '.join(unknown)} (known: {', '.join(PROBES)})")
        self.probes = tuple(probes)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._examples = {name: _Examples() for name in self.probes}
        self._images: List[Tensor] = []

    def update(self, captured: Capture, batch: ProbeBatch) -> None:
        if len(batch.groundings) != len(captured.text_mask):
            raise ValueError(f"{len(batch.groundings)} groundings for {len(captured.text_mask)} captured pairs")
        self._images.append(batch.images)
        text_length, length = captured.text_length, captured.text_length + captured.image_mask.shape[1]
        if "coreference" in self.probes:
            found = coreference_pairs(captured, batch.offsets, batch.groundings, self._generator)
            if len(found.labels):
                phrase = torch.zeros(len(found.labels), length)
                phrase[:, :text_length] = found.tokens.float() / found.tokens.sum(1, keepdim=True)
                cell = F.one_hot(found.cells + text_length, length).float()
                self._examples["coreference"].add(pair_features(captured, found.pairs, phrase, cell),
                                                  [str(v) for v in found.labels.tolist()], batch.images[found.pairs])
        if "relation" in self.probes:
            found = relation_pairs(captured, batch.groundings, batch.images)
            if found.predicates:
                subject = F.one_hot(found.subject_cells + text_length, length).float()
                obj = F.one_hot(found.object_cells + text_length, length).float()
                self._examples["relation"].add(pair_features(captured, found.pairs, subject, obj), found.predicates,
                                               batch.images[found.pairs])
        # A label the data does not give (None) leaves that caption out of that probe.
        linguistic = {
            "caption_length": [str(length_bucket(g.caption)) for g in batch.groundings],
            "object_count": [None if g.objects is None else str(g.objects) for g in batch.groundings],
            "states_relation": [None if g.states_relation is None else str(g.states_relation)
                                for g in batch.groundings],
        }
        wanted = [name for name, labels in linguistic.items()
                  if name in self.probes and any(label is not None for label in labels)]
        if wanted:
            states = {f"layer {k}": s for k, s in enumerate(text_representations(captured))}
            for name in wanted:
                known = [n for n, label in enumerate(linguistic[name]) if label is not None]
                self._examples[name].add({layer: s[known] for layer, s in states.items()},
                                         [linguistic[name][n] for n in known], batch.images[known])

    def results(self, test_fraction: float = 0.3, l2_values: Sequence[float] = L2_VALUES
                ) -> Dict[str, Dict[str, ProbeResult]]:
        """Per probe, per feature set (``attention``, ``layer k``), the held-out result; probes that found
        no examples are left out. The test images are a seeded ``test_fraction`` of all images seen."""
        if not self._images:
            raise ValueError("no batches were probed")
        test_images = torch.unique(torch.cat(self._images))
        test_images = test_images[split_images(test_images, test_fraction, self.seed)]
        results: Dict[str, Dict[str, ProbeResult]] = {}
        for name, examples in self._examples.items():
            if not examples.labels:
                continue
            images = torch.cat(examples.images)
            test = torch.isin(images, test_images)
            if test.all() or not test.any():
                continue
            classes = sorted(set(examples.labels))
            labels = torch.tensor([classes.index(label) for label in examples.labels])
            results[name] = {feature: evaluate_probe(torch.cat(values), labels, test, images, classes, l2_values,
                                                     self.seed)
                             for feature, values in examples.features.items()}
        return results


def random_init_like(model: nn.Module, seed: int = 0) -> SohoModel:
    """A freshly initialised :class:`SohoModel` of the same config, in eval mode (the random-init baseline)."""
    soho = model if isinstance(model, SohoModel) else model.soho
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = SohoModel(soho.config)
    return fresh.to(next(soho.parameters()).device).eval()


CONDITIONS = ("trained", "random_init", "mismatched")


def run_probes(model: nn.Module, batches: Sequence[ProbeBatch], test_fraction: float = 0.3,
               l2_values: Sequence[float] = L2_VALUES, seed: int = 0) -> Dict[str, Dict[str, Dict[str, ProbeResult]]]:
    """Every probe on ``model`` (eval mode), on a random-init model of its config, and the cross-modal probes
    with mismatched captions: {condition: {probe: {features: result}}}, conditions as in :data:`CONDITIONS`."""
    runs = {"trained": (model, False, PROBES), "random_init": (random_init_like(model, seed), False, PROBES),
            "mismatched": (model, True, CROSS_MODAL_PROBES)}
    results = {}
    for condition, (probed, mismatched, probes) in runs.items():
        collector = ProbeCollector(probes, seed)
        for batch in batches:
            shown = batch.mismatched() if mismatched else batch
            collector.update(capture(probed, shown.inputs), shown)
        results[condition] = collector.results(test_fraction, l2_values)
    return results
