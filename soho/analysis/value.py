"""VALUE probes (Cao et al., "Behind the Scene", arXiv 2005.07310) on attention and hidden states.

The attention functions take probabilities (N, heads, L, L) over the single stream [text; image]
(rows are queries, columns keys, as the encoder returns them) and (N, Lt) text / (N, Lv) image masks
that are True on real tokens. Padded tokens never count, neither as queries nor as keys; a query's
share of attention on a modality is taken relative to its mass on real keys.

- modality importance: the share of [CLS]'s attention that goes to text rather than image tokens.
  [CLS]'s attention to itself is set aside (reported on its own): it reads neither the caption nor
  the image, and BERT heads often park attention there, which would inflate the text share.
- cross-modal heads: per head, the fraction of image tokens that put more than ``token_threshold``
  (0.5) of their attention on text tokens ([CLS] and [SEP] included: they are text tokens); a head
  counts as cross-modal when that fraction exceeds ``head_threshold`` (0.5), i.e. most of its image
  tokens read mostly text. The head threshold is ours; VALUE reports a minority (~15 %) of such heads.
- fusion degree: per layer, k-means (k=2) on the real tokens' states, and the normalised mutual
  information between the clusters and the modality; 1 = the clusters are the modalities, 0 = fused.
  With many more image cells than words, 2-means may split the image tokens even where the modalities
  are apart, so read each layer against the embeddings (layer 0) rather than against 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from soho.analysis.capture import Capture

_TINY = 1e-12


def modality_mass(attention: Tensor, text_mask: Tensor, image_mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Attention mass (N, heads, Lq) that each query row puts on real text keys and on real image keys."""
    text_length = text_mask.shape[1]
    keys = torch.cat([text_mask, image_mask], dim=1).to(attention.dtype)[:, None, None, :]
    weighted = attention * keys
    return weighted[..., :text_length].sum(-1), weighted[..., text_length:].sum(-1)


def cls_text_share(attention: Tensor, text_mask: Tensor, image_mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Modality importance of one layer for each pair and head.

    Returns the text share (N, heads) of [CLS]'s attention, text tokens other than [CLS] over text
    and image tokens, and [CLS]'s attention to itself (N, heads).
    """
    text, image = modality_mass(attention[:, :, :1], text_mask, image_mask)
    to_itself = attention[:, :, 0, 0]
    other_text = text[..., 0] - to_itself
    return other_text / (other_text + image[..., 0]).clamp_min(_TINY), to_itself


def uniform_text_share(text_mask: Tensor, image_mask: Tensor) -> Tensor:
    """(N,) the text share [CLS] would have if it attended uniformly to every real token but itself."""
    text = text_mask.sum(1).double() - 1
    return text / (text + image_mask.sum(1).double()).clamp_min(_TINY)


def image_tokens_reading_text(attention: Tensor, text_mask: Tensor, image_mask: Tensor,
                              threshold: float = 0.5) -> Tensor:
    """Per head (heads,): how many real image tokens put more than ``threshold`` of their attention on text."""
    text_length = text_mask.shape[1]
    text, image = modality_mass(attention[:, :, text_length:], text_mask, image_mask)
    reading_text = text / (text + image).clamp_min(_TINY) > threshold
    return (reading_text & image_mask[:, None, :]).sum((0, 2))


@dataclass
class KMeansResult:
    assignments: Tensor
    """(T,) cluster of every point."""
    centroids: Tensor
    """(k, D) cluster means."""
    inertia: float
    """Sum of squared distances of the points to their centroid."""


def _kmeans_plus_plus(points: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Initial centroids spread out by D² sampling (Arthur & Vassilvitskii, 2007)."""
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    squared = ((points - points[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        # All points on the centroids already (duplicates): any point will do.
        weights = squared if squared.sum() > 0 else torch.ones_like(squared)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        squared = torch.minimum(squared, ((points - points[chosen[-1]]) ** 2).sum(1))
    return points[chosen].clone()


def kmeans(points: Tensor, k: int = 2, restarts: int = 4, iterations: int = 100, seed: int = 0) -> KMeansResult:
    """Lloyd's k-means from k-means++ starts; of ``restarts`` runs the one with the lowest inertia.

    Deterministic for a given ``seed``. Computed in float64, so restarts are not told apart by rounding.
    """
    if not 1 <= k <= len(points):
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {len(points)} points")
    points = points.double()
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(restarts):
        centroids = _kmeans_plus_plus(points, k, generator)
        assignments = None
        for _ in range(iterations):
            nearest = torch.cdist(points, centroids).argmin(1)
            if assignments is not None and torch.equal(nearest, assignments):
                break
            assignments = nearest
            counts = torch.bincount(assignments, minlength=k)
            sums = torch.zeros_like(centroids).index_add_(0, assignments, points)
            # A cluster that lost all its points keeps its centroid.
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled, None]
        squared = torch.cdist(points, centroids) ** 2
        assignments = squared.argmin(1)
        inertia = float(squared.gather(1, assignments[:, None]).sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(assignments, centroids, inertia)
    return best


def _entropy(counts: Tensor) -> Tensor:
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum()


def normalized_mutual_information(labels: Tensor, clusters: Tensor) -> float:
    """NMI of two labelings of the same items: I(U; V) / mean(H(U), H(V)), the arithmetic mean of the
    entropies (scikit-learn's default normalisation). 1 for identical partitions up to renaming,
    0 for independent ones; two one-class labelings count as identical."""
    if labels.shape != clusters.shape or labels.dim() != 1 or not len(labels):
        raise ValueError(f"NMI needs two non-empty labelings of the same items, got shapes "
                         f"{tuple(labels.shape)} and {tuple(clusters.shape)}")
    _, u = torch.unique(labels, return_inverse=True)
    _, v = torch.unique(clusters, return_inverse=True)
    size_v = int(v.max()) + 1
    joint = torch.bincount(u * size_v + v, minlength=(int(u.max()) + 1) * size_v).view(-1, size_v).double()
    h_u, h_v = _entropy(joint.sum(1)), _entropy(joint.sum(0))
    if h_u == 0 and h_v == 0:
        return 1.0
    p = joint / joint.sum()
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    present = p > 0
    mutual = (p[present] * (p[present] / outer[present]).log()).sum()
    return float((mutual / ((h_u + h_v) / 2)).clamp(0.0, 1.0))


def fusion_degree(states: Tensor, is_image: Tensor, restarts: int = 4, seed: int = 0) -> float:
    """NMI between 2-means clusters of token states (T, D) and their modality (T,) bool; lower = more fused."""
    return normalized_mutual_information(is_image.long(), kmeans(states, 2, restarts, seed=seed).assignments)


def attention_over_grid(attention: Tensor, query: int, text_length: int, grid_size: Tuple[int, int]) -> Tensor:
    """(heads, h, w): one pair's attention (heads, L, L) from token ``query`` to each image cell."""
    height, width = grid_size
    return attention[:, query, text_length:text_length + height * width].reshape(-1, height, width)


@dataclass
class ValueReport:
    pairs: int
    cls_text_share: Tensor
    """(layers, heads) mean over pairs of [CLS]'s text share, its self-attention set aside."""
    cls_self_attention: Tensor
    """(layers, heads) mean attention of [CLS] to itself."""
    uniform_text_share: float
    """The text share uniform attention would give: the reference for ``cls_text_share``."""
    cross_modal_fraction: Tensor
    """(layers, heads) fraction of real image tokens putting more than ``token_threshold`` on text."""
    cross_modal_heads: Tensor
    """(layers, heads) bool, ``cross_modal_fraction > head_threshold``."""
    fusion_nmi: List[float]
    """Per layer, embeddings (the first layer's input) first."""
    fusion_tokens: int
    """Tokens per layer that k-means clustered."""
    fusion_image_fraction: float
    """Share of image tokens among them (the NMI depends on this balance)."""
    token_threshold: float
    head_threshold: float

    @property
    def cross_modal_head_fraction(self) -> float:
        return float(self.cross_modal_heads.double().mean())

    def to_dict(self) -> Dict:
        return {
            "pairs": self.pairs,
            "modality_importance": {
                "cls_text_share": self.cls_text_share.tolist(),
                "cls_text_share_mean": float(self.cls_text_share.mean()),
                "cls_self_attention": self.cls_self_attention.tolist(),
                "uniform_text_share": self.uniform_text_share,
            },
            "cross_modal": {
                "fraction": self.cross_modal_fraction.tolist(),
                "heads": self.cross_modal_heads.tolist(),
                "head_fraction": self.cross_modal_head_fraction,
                "token_threshold": self.token_threshold,
                "head_threshold": self.head_threshold,
            },
            "fusion_degree": {
                "nmi": self.fusion_nmi,
                "tokens": self.fusion_tokens,
                "image_fraction": self.fusion_image_fraction,
            },
        }


class ValueStatistics:
    """The VALUE probes accumulated over captured batches.

    The attention probes are exact running sums. Fusion degree clusters a sample of each batch's real
    tokens (at most ``tokens_per_batch``, the same tokens in every layer), so memory does not grow with
    all tokens times the hidden size; the sample is uniform, so it keeps the modality balance.
    """

    def __init__(self, token_threshold: float = 0.5, tokens_per_batch: int = 1024, seed: int = 0):
        self.token_threshold = token_threshold
        self.tokens_per_batch = tokens_per_batch
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self.pairs = 0
        self.image_tokens = 0
        self._uniform_sum = 0.0
        # (layers, heads) sums over pairs, or over image tokens for the counts.
        self._text_share_sum = self._self_sum = self._reading_text_count = torch.zeros(())
        self._states: List[List[Tensor]] = []
        self._is_image: List[Tensor] = []

    def update(self, capture: Capture) -> None:
        text_mask, image_mask = capture.text_mask, capture.image_mask
        shares = [cls_text_share(a, text_mask, image_mask) for a in capture.attentions]
        self._text_share_sum = self._text_share_sum + torch.stack([s.double().sum(0) for s, _ in shares])
        self._self_sum = self._self_sum + torch.stack([c.double().sum(0) for _, c in shares])
        self._reading_text_count = self._reading_text_count + torch.stack([
            image_tokens_reading_text(a, text_mask, image_mask, self.token_threshold) for a in capture.attentions])
        self.pairs += len(text_mask)
        self.image_tokens += int(image_mask.sum())
        self._uniform_sum += float(uniform_text_share(text_mask, image_mask).sum())

        real = torch.cat([text_mask, image_mask], dim=1).flatten()
        is_image = torch.cat([torch.zeros_like(text_mask), torch.ones_like(image_mask)], dim=1).flatten()[real]
        sample = torch.randperm(len(is_image), generator=self._generator)[:self.tokens_per_batch]
        self._is_image.append(is_image[sample])
        if not self._states:
            self._states = [[] for _ in capture.hidden_states]
        for kept, states in zip(self._states, capture.hidden_states):
            kept.append(states.flatten(0, 1)[real][sample].float())

    def report(self, head_threshold: float = 0.5, kmeans_restarts: int = 4) -> ValueReport:
        if not self.pairs:
            raise ValueError("no batches were measured")
        fraction = (self._reading_text_count.double() / max(self.image_tokens, 1)).float()
        is_image = torch.cat(self._is_image)
        nmi = [fusion_degree(torch.cat(states), is_image, kmeans_restarts, self.seed) for states in self._states]
        return ValueReport(
            pairs=self.pairs,
            cls_text_share=(self._text_share_sum / self.pairs).float(),
            cls_self_attention=(self._self_sum / self.pairs).float(),
            uniform_text_share=self._uniform_sum / self.pairs,
            cross_modal_fraction=fraction,
            cross_modal_heads=fraction > head_threshold,
            fusion_nmi=nmi,
            fusion_tokens=len(is_image),
            fusion_image_fraction=float(is_image.double().mean()),
            token_threshold=self.token_threshold,
            head_threshold=head_threshold,
        )
