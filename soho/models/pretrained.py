"""Saving and loading soho models as directories: ``config.json`` + ``model.safetensors``.

Loading reads only JSON and safetensors, never a pickle: a checkpoint is data, and
unpickling someone's file runs their code. ``config.json`` records the sha256 of the
weights, and loading checks it: a damaged copy fails, naming the file, instead of loading
flipped bits.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Dict, Optional, Type, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from soho.config import from_dict, to_dict
from soho.models.attention import added_parameters
from soho.models.config import SohoConfig
from soho.models.encoder import (
    bert_state_dict_to_soho,
    bert_weights_for_fusion,
    check_bert_config,
    read_bert_checkpoint,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FORMAT_VERSION = 1

M = TypeVar("M", bound="SohoPreTrainedModel")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _without_external_weights(config: SohoConfig) -> SohoConfig:
    """A saved checkpoint holds every weight; paths to BERT or backbone files no longer apply."""
    return dataclasses.replace(
        config,
        backbone=dataclasses.replace(config.backbone, pretrained_path=None),
        encoder=dataclasses.replace(config.encoder, pretrained_path=None),
    )


def _read_record(directory: Path) -> Dict:
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} is not a soho checkpoint: {CONFIG_NAME} is missing")
    try:
        saved = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(saved, dict) or "config" not in saved:
        raise ValueError(f"{config_file} has no 'config' section; was it written by save_pretrained?")
    return saved


def read_config(directory: str | Path) -> SohoConfig:
    return _without_external_weights(from_dict(SohoConfig, _read_record(Path(directory))["config"]))


# Checkpoints written before the objectives became modules kept each head beside the model.
_LEGACY_HEADS = {"mlm_head.": "objectives.mlm.head.", "itm_head.": "objectives.itm.head.",
                 "itm_score_head.": "objectives.itm.head.", "mvm_head.": "objectives.mvm.head.",
                 "itc_head.": "objectives.itc.head."}


def _rename_legacy_heads(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    renamed = {}
    for key, tensor in state.items():
        old = next((p for p in _LEGACY_HEADS if key.startswith(p)), None)
        renamed[_LEGACY_HEADS[old] + key[len(old):] if old else key] = tensor
    return renamed


def _match_prefix(state: Dict[str, Tensor], own_keys) -> Dict[str, Tensor]:
    """Let a bare ``SohoModel`` and task models (which hold it as ``soho.``) load each other's weights."""
    own_keys = set(own_keys)
    prefix = "soho."
    if any(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own_keys):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not any(k.startswith(prefix) for k in state) and any(k.startswith(prefix) for k in own_keys):
        return {prefix + k: v for k, v in state.items()}
    return state


class SohoPreTrainedModel(nn.Module):
    """Base class of every soho model: weight init, BERT initialisation, save/load."""

    config: SohoConfig

    def init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation, for every module but the CNN (which keeps its own)."""
        std = self.config.encoder.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def load_bert(self, path: str | Path) -> None:
        """Initialise text embeddings, encoder, pooler (and MLM head, if any) from a local HF BERT."""
        bert_config, bert_weights = read_bert_checkpoint(path)
        check_bert_config(self.config.encoder, bert_config)
        own = self.state_dict()
        prefix = next((p for p in ("", "soho.") if f"{p}text_embeddings.word_embeddings.weight" in own), None)
        if prefix is None:
            raise RuntimeError(f"{type(self).__name__} has no encoder to load BERT weights into")
        loaded: Dict[str, Tensor] = {}
        bert = bert_weights_for_fusion(bert_state_dict_to_soho(bert_weights), self.config.encoder)
        for name, tensor in bert.items():
            target = name if name.startswith("objectives.") else prefix + name
            if target in own:
                if own[target].shape != tensor.shape:
                    raise ValueError(f"BERT weight {name} has shape {tuple(tensor.shape)}, "
                                     f"model expects {tuple(own[target].shape)}")
                loaded[target] = tensor
        # A score function's own weights (general, additive, ...) have no BERT counterpart: they keep
        # their initialisation, which for the general scores reproduces BERT's scaled dot product.
        expected = [k for k in own if k.startswith(tuple(f"{prefix}{p}" for p in ("text_embeddings.", "encoder.")))
                    and ".attention.score." not in k]
        missing = [k for k in expected if k not in loaded]
        if missing:
            raise ValueError(f"BERT checkpoint {path} lacks {len(missing)} encoder weights, e.g. {missing[:3]}")
        self.load_state_dict(loaded, strict=False)
        logger.info("initialised %d tensors from BERT checkpoint %s", len(loaded), path)

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters in all, trainable ones, and those the attention score functions add to BERT's
        (0 for ``scaled_dot``/``dot``): what makes score-function and fusion variants comparable in size."""
        return {"total": sum(p.numel() for p in self.parameters()),
                "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
                "attention_score_added": added_parameters(self)}

    def save_pretrained(self, directory: str | Path, processor=None) -> None:
        """Write ``model.safetensors`` (dictionary buffers included), then ``config.json`` with its sha256."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "architecture": type(self).__name__})
        record = {
            "format_version": FORMAT_VERSION,
            "architecture": type(self).__name__,
            "config": to_dict(_without_external_weights(self.config)),
            "sha256": {WEIGHTS_NAME: file_sha256(directory / WEIGHTS_NAME)},
        }
        (directory / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
        if processor is not None:
            processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls: Type[M], directory: str | Path, config: Optional[SohoConfig] = None,
                        strict: Optional[bool] = None, map_location: str | torch.device = "cpu") -> M:
        """Load a directory written by :meth:`save_pretrained`.

        Loading into another architecture (a fine-tuning model from a pre-training
        checkpoint, say) keeps the shared weights and initialises the rest; ``strict``
        defaults to True only when the architecture is the one that was saved. Weights whose
        sha256 differs from the one ``config.json`` recorded are refused (ValueError).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {directory}")
        weights_file = directory / WEIGHTS_NAME
        if not weights_file.is_file():
            pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickled:
                raise ValueError(
                    f"{directory} holds only pickled weights ({', '.join(pickled)}); soho refuses to unpickle "
                    f"checkpoints because that can run arbitrary code. Convert them to {WEIGHTS_NAME} "
                    "(safetensors) from a trusted environment.")
            raise FileNotFoundError(f"{directory} is not a soho checkpoint: {WEIGHTS_NAME} is missing")
        record = _read_record(directory) if config is None or (directory / CONFIG_NAME).is_file() else {}
        expected = record.get("sha256", {}).get(WEIGHTS_NAME)
        if expected is not None and file_sha256(weights_file) != expected:
            raise ValueError(f"{weights_file} is damaged: its sha256 differs from the one {CONFIG_NAME} recorded "
                             "when it was saved")
        if config is None:
            config = from_dict(SohoConfig, record["config"])
        model = cls(_without_external_weights(config))
        state = _rename_legacy_heads(load_file(str(weights_file), device=str(map_location)))
        state = _match_prefix(state, model.state_dict().keys())
        if strict is None:
            strict = record.get("architecture") == cls.__name__
        result = model.load_state_dict(state, strict=False)
        if strict and (result.missing_keys or result.unexpected_keys):
            raise ValueError(f"checkpoint {directory} does not fit {cls.__name__}: "
                             f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
        if result.missing_keys:
            logger.info("%s: %d tensors not in the checkpoint, freshly initialised (e.g. %s)",
                        cls.__name__, len(result.missing_keys), result.missing_keys[:3])
        if result.unexpected_keys:
            logger.info("%s: ignored %d checkpoint tensors it has no use for (e.g. %s)",
                        cls.__name__, len(result.unexpected_keys), result.unexpected_keys[:3])
        return model
