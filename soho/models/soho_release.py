"""Checkpoints of the original SOHO release (github.com/researchmm/soho) -> soho checkpoints.

The release is built on mmcv: its checkpoints are ``torch.save`` pickles ``{"meta", "state_dict",
"optimizer"}`` of ``SOHOSingleStreamPre`` (pre-training) or ``SOHOSingleStreamVQA`` (VQA fine-tuning),
whose state dicts hold

- ``backbone.*``: the ResNet, in torchvision's names (``backbone.layer1.0.conv1.weight``), which are timm's;
- ``neck.*``: after a 2 x 2 max-pool of C5, a 1 x 1 conv and BatchNorm to the hidden size
  (``neck.conv.conv.weight``, ``neck.conv.bn.*``); the visual dictionary ``neck.vq.embed`` (K, D) with its
  EMA buffers ``cluster_size`` (K,), ``embed_avg`` (K, D) and ``cluster_sum`` (K,); the mask embedding
  ``neck.mask_emb.weight`` (1, D); the visual tokens' LayerNorm ``neck.ln.*``; ``neck.pos_line.*`` (and in
  the gated variant ``neck.gate_fc.*``) applied to the entries. The VQA neck has no dictionary.
- ``language.bert.*``: BERT's embeddings and layers, in Hugging Face's names, without the pooler;
- ``mask_l_fc.weight``: the MLM decoder, tied to the word embeddings; ``head.match_class.weight`` (2, D):
  ITM on the fused [CLS]; ``head.vqa.*``: the VQA classifier.

:data:`RENAMES` maps every tensor soho has a counterpart for, :data:`NOT_IMPORTED` says why the others are
left out, and a key in neither is an error (a layout this importer does not know). The result is a soho
pre-training checkpoint to fine-tune from, not a re-implementation of the release: :data:`DIFFERENCES` lists
where the two compute differently, so the imported model does not reproduce the release's outputs.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors.torch import load_file
from torch import Tensor

from soho.config import from_dict
from soho.models.config import SohoConfig
from soho.models.encoder import bert_state_dict_to_soho
from soho.models.soho import SohoForPretraining
from soho.processing import ImageTransformConfig, SohoProcessor

logger = logging.getLogger(__name__)

RENAMES: Tuple[Tuple[str, str], ...] = (
    ("backbone.", "soho.backbone.cnn."),
    ("neck.conv.conv.", "soho.backbone.proj."),
    ("neck.conv.bn.", "soho.backbone.norm."),
    ("neck.vq.embed_avg", "soho.visual_dictionary.ema_sum"),
    ("neck.vq.embed", "soho.visual_dictionary.embedding"),
    ("neck.vq.cluster_size", "soho.visual_dictionary.ema_count"),
    ("neck.mask_emb.weight", "soho.visual_embeddings.mask_embedding"),
    ("neck.ln.", "soho.visual_embeddings.norm."),
    ("language.bert.", "soho."),
)
"""Release name prefix -> soho name prefix, first match wins. ``language.bert.*`` continues through BERT's
renames (:func:`soho.models.encoder.bert_state_dict_to_soho`). The EMA buffers mean the same in both:
entry = ``embed_avg`` / Laplace-smoothed ``cluster_size``."""

NOT_IMPORTED: Tuple[Tuple[str, str], ...] = (
    ("neck.vq.cluster_sum", "a running total of assignments; soho's dictionary keeps no such counter"),
    ("neck.pos_line.", "a linear layer the release applies to the entries before adding the continuous "
                       "features; soho's visual tokens are the entries themselves"),
    ("neck.gate_fc.", "the gated variant's mixing of entries and continuous features; soho has no gate"),
    ("neck.begin_line.", "a linear layer before the dictionary lookup; soho looks up the neck's output"),
    ("mask_l_fc.weight", "the MLM decoder, tied to the word embeddings (imported as those)"),
    ("head.match_class.", "ITM on the raw fused [CLS] without a bias; soho's ITM classifies the tanh-pooled "
                          "[CLS], and the release has no pooler"),
    ("head.vqa.", "the VQA classifier; its answer list is not in the checkpoint (fine-tune soho's VQA head)"),
)
"""Release name prefix -> why soho takes nothing from it."""

DIFFERENCES = (
    "visual tokens: the release feeds pos_line(entry) + continuous features (pre-training) or the continuous "
    "features (VQA) to its LayerNorm, soho the entry (or, without a dictionary, the continuous features)",
    "2-D sine positions: the release interleaves sin and cos channels, soho puts all sines before all cosines",
    "padding: the release's cell mask uses the padded height for both sides (soho/models/visual_tokens.py)",
    "max-pool: the release drops an odd last row or column of C5, soho keeps it (ceil mode)",
    "fresh in soho, with no release counterpart: the pooler, the MLM transform and bias, the ITM and MVM heads",
)
"""Where the imported model computes differently from the release."""

TORCHVISION_RESNETS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                       ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
                       ((3, 8, 36, 3), True): "resnet152"}
"""(blocks per stage, bottleneck) -> the timm ResNet with the same names and shapes."""

_BLOCK = re.compile(r"^backbone\.layer([1-4])\.(\d+)\.")
_LAYER = re.compile(r"^language\.bert\.encoder\.layer\.(\d+)\.")

PathLike = Union[str, Path]


def load_release_checkpoint(path: PathLike, trust_pickle: bool = False) -> Dict[str, Tensor]:
    """The state dict of a release checkpoint (``.pth`` / ``.pt``, or ``.safetensors``).

    Pickles are read with ``weights_only=True``, which refuses anything but tensors and plain containers. A
    checkpoint that stores other objects (in its meta data, say) is refused unless ``trust_pickle``: then it
    is fully unpickled, which runs whatever code the file names, so only for a file from a trusted source."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"release checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        checkpoint = load_file(str(path))
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if not trust_pickle:
                first_line = str(error).strip().splitlines()[0]
                raise ValueError(f"{path} pickles more than tensors ({first_line}); soho unpickles it only when "
                                 "told the file is trusted (--trust-pickle), because unpickling runs code the "
                                 "file names") from None
            logger.warning("fully unpickling %s (--trust-pickle)", path)
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of names to tensors, or one under 'state_dict')")
    # A model saved from inside DistributedDataParallel.
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def convert_state_dict(release: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """(soho state dict of :class:`SohoForPretraining`, release key -> why it is not imported)."""
    converted: Dict[str, Tensor] = {}
    bert: Dict[str, Tensor] = {}
    skipped: Dict[str, str] = {}
    unknown: List[str] = []
    for key, tensor in release.items():
        reason = next((why for prefix, why in NOT_IMPORTED if key.startswith(prefix)), None)
        rename = next(((old, new) for old, new in RENAMES if key.startswith(old)), None)
        if reason is not None:
            skipped[key] = reason
        elif rename is None:
            unknown.append(key)
        elif rename[0] == "language.bert.":
            bert[key[len("language."):]] = tensor
        else:
            converted[rename[1] + key[len(rename[0]):]] = tensor
    if unknown:
        raise ValueError(f"{len(unknown)} tensors of no known SOHO release layout, e.g. {', '.join(unknown[:5])}")
    converted.update({f"soho.{key}": tensor for key, tensor in bert_state_dict_to_soho(bert).items()})
    mask = "soho.visual_embeddings.mask_embedding"
    if mask in converted:  # an nn.Embedding(1, D) in the release, a (D,) parameter in soho
        converted[mask] = converted[mask].reshape(-1)
    return converted, skipped


def _require(release: Dict[str, Tensor], key: str) -> Tensor:
    if key not in release:
        raise ValueError(f"not a SOHO release checkpoint: {key} is missing")
    return release[key]


def infer_config(release: Dict[str, Tensor], num_attention_heads: Optional[int] = None) -> SohoConfig:
    """The soho architecture of a release state dict: ResNet depth, hidden size, BERT shapes and dictionary
    size from the tensors; the attention heads, which no tensor shows, from ``num_attention_heads``
    (default: BERT's 64 channels per head)."""
    blocks = [0, 0, 0, 0]
    for key in release:
        match = _BLOCK.match(key)
        if match:
            stage = int(match[1]) - 1
            blocks[stage] = max(blocks[stage], int(match[2]) + 1)
    bottleneck = "backbone.layer1.0.conv3.weight" in release
    backbone = TORCHVISION_RESNETS.get((tuple(blocks), bottleneck))
    if backbone is None:
        raise ValueError(f"backbone with {blocks} blocks per stage ({'bottleneck' if bottleneck else 'basic'}) is "
                         f"none of the torchvision ResNets ({', '.join(TORCHVISION_RESNETS.values())})")
    words = _require(release, "language.bert.embeddings.word_embeddings.weight")
    hidden = words.shape[1]
    heads = num_attention_heads or hidden // 64
    if heads < 1 or hidden % heads:
        raise ValueError(f"hidden size {hidden}: give the number of attention heads (it divides the hidden size)")
    layers = 1 + max((int(match[1]) for match in map(_LAYER.match, release) if match), default=-1)
    encoder = {
        "vocab_size": words.shape[0], "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": _require(release, "language.bert.encoder.layer.0.intermediate.dense.weight").shape[0],
        "max_position_embeddings": _require(release, "language.bert.embeddings.position_embeddings.weight").shape[0],
        "type_vocab_size": _require(release, "language.bert.embeddings.token_type_embeddings.weight").shape[0],
    }
    has_dictionary = "neck.vq.embed" in release
    config = {
        # The release: C5, a 2 x 2 max-pool, stem and first stage frozen.
        "backbone": {"name": backbone, "out_index": 4, "extra_pool": 2, "frozen_stages": 2},
        "encoder": encoder,
        "use_visual_dictionary": has_dictionary,
    }
    if has_dictionary:
        config["visual_dictionary"] = {"size": release["neck.vq.embed"].shape[0]}
    else:
        config["mvm"] = {"probability": 0.0}
    return from_dict(SohoConfig, config)


def import_release(checkpoint: PathLike, out: PathLike, tokenizer=None, num_attention_heads: Optional[int] = None,
                   trust_pickle: bool = False, max_text_length: int = 40) -> Dict:
    """Write a release checkpoint as a soho ``save_pretrained`` directory, with its processor when given a
    ``tokenizer`` (the release used bert-base-uncased's), and ``import_report.json``; returns the report."""
    release = load_release_checkpoint(checkpoint, trust_pickle)
    config = infer_config(release, num_attention_heads)
    converted, skipped = convert_state_dict(release)
    model = SohoForPretraining(config)
    own = model.state_dict()
    foreign = [key for key in converted if key not in own]
    wrong = [f"{key} {tuple(converted[key].shape)} != {tuple(own[key].shape)}" for key in converted
             if key in own and converted[key].shape != own[key].shape]
    if foreign or wrong:
        raise ValueError(f"the release tensors do not fit the inferred soho architecture: "
                         f"{'; '.join(foreign[:3] + wrong[:3])}")
    model.load_state_dict(converted, strict=False)
    processor = None
    if tokenizer is not None:
        if len(tokenizer) > config.encoder.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the checkpoint's vocabulary "
                             f"{config.encoder.vocab_size}")
        # The release's test-time images: short side 600, long side at most 1000, padded to a multiple of 32.
        processor = SohoProcessor(tokenizer, ImageTransformConfig(600, 1000, 32), max_text_length)
    out = Path(out)
    model.save_pretrained(out, processor=processor)
    report = {
        "source": str(checkpoint), "architecture": {"backbone": config.backbone.name,
                                                    "hidden_size": config.encoder.hidden_size,
                                                    "layers": config.encoder.num_hidden_layers,
                                                    "visual_dictionary": config.visual_dictionary.size
                                                    if config.use_visual_dictionary else None},
        "imported": len(converted), "not_imported": skipped,
        "initialised": sorted(key for key in own if key not in converted),
        "processor": processor is not None, "differences": list(DIFFERENCES),
    }
    (out / "import_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
