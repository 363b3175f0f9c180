"""CNN backbone: one feature stage of a timm CNN, projected to the Transformer width."""
from __future__ import annotations

import contextlib
import pickle
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

import timm
import torch
import torch.utils.checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import GroupNorm1
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from soho.config import ConfigError
from soho.models.config import BackboneConfig

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def load_cnn_state_dict(path: Union[str, Path]) -> Dict[str, Tensor]:
    """A timm or torchvision state dict from a local ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file.

    Pickled files are read with ``weights_only=True``, so a file that would run code or build
    arbitrary objects is refused. A checkpoint wrapping the weights under ``state_dict`` or
    ``model`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except SafetensorError as error:
            raise ValueError(f"cannot read backbone weights {path} as safetensors: {error}") from error
    elif suffix in _TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"cannot load backbone weights {path} with weights_only=True: it is not a torch file of "
                f"tensors and plain containers (arbitrary pickled objects are refused). Save the weights with "
                f"torch.save(model.state_dict(), ...) or as .safetensors"
            ) from error
    else:
        raise ConfigError(f"backbone.pretrained_path: {path} has an unsupported suffix; "
                          f"expected .safetensors, {', '.join(_TORCH_SUFFIXES)}")
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())):
        raise ValueError(f"backbone weights {path} do not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def _check_fits(name: str, state_dict: Dict[str, Tensor], path: Union[str, Path]) -> None:
    """Refuse weights that do not belong to timm model ``name``.

    timm drops the classifier of a features_only model and then loads non-strictly, so a file with
    prefixed keys ("module.", "backbone.") or from a deeper variant would leave layers silently at
    their random init. The classifier itself may differ or be absent. Keys are compared as timm
    names them (torchvision ResNets share those names); a release format that a model's timm
    checkpoint filter would convert has to be converted to timm's layout first.
    """
    with torch.device("meta"):  # names and shapes only; nothing is allocated
        reference = timm.create_model(name)
    expected = {key: value.shape for key, value in reference.state_dict().items()}
    heads = reference.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)

    def in_head(key: str) -> bool:
        return any(key.startswith(head + ".") for head in heads)

    # Checkpoints from before BatchNorm counted its batches lack num_batches_tracked; torch fills it in.
    missing = [key for key in expected
               if key not in state_dict and not in_head(key) and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected and not in_head(key)]
    wrong_shape = [f"{key} {tuple(value.shape)} != {tuple(expected[key])}" for key, value in state_dict.items()
                   if key in expected and not in_head(key) and value.shape != expected[key]]
    problems = [f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                if keys]
    if problems:
        raise ValueError(f"backbone weights {path} do not fit timm model {name!r}: {'; '.join(problems)}")


def _num_feature_stages(name: str) -> int:
    with torch.device("meta"):  # only feature_info is needed
        return len(timm.create_model(name, features_only=True).feature_info)


def _stage_children(cnn: nn.Module, num_stages: int) -> Optional[List[List[str]]]:
    """Names of the CNN's top-level children making up each of its first ``num_stages`` stages.

    A features_only FeatureListNet holds the model's top-level modules in call order, Sequential
    containers flattened one level ("stages.0" becomes "stages_0"), and stage i ends at the module
    ``feature_info`` names for it. None where the wrapper is not laid out that way.
    """
    children = [child for child, _ in cnn.named_children()]
    stages, start = [], 0
    for index in range(num_stages):
        end = cnn.feature_info.module_name(index).replace(".", "_")
        if end not in children[start:]:
            return None
        stop = children.index(end, start) + 1
        stages.append(children[start:stop])
        start = stop
    return stages


@contextlib.contextmanager
def _batchnorm_statistics_kept(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Recomputation for a checkpoint runs BatchNorm in training mode again; undo its second update."""
    buffers = [buffer for module in modules for norm in module.modules() if isinstance(norm, _BatchNorm)
               for buffer in norm.buffers(recurse=False)]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def _recompute_contexts(modules: Sequence[nn.Module]):
    return contextlib.nullcontext(), _batchnorm_statistics_kept(modules)


def _run(modules: Sequence[nn.Module], x: Tensor) -> Tensor:
    for module in modules:
        x = module(x)
    return x


class Backbone(nn.Module):
    """timm CNN cut after feature stage ``out_index`` -> optional max-pool -> 1x1 conv -> BatchNorm.

    As in the SOHO release, the neck has no activation. The first ``frozen_stages`` stages have
    ``requires_grad=False`` and stay in eval mode (BatchNorm statistics fixed) whatever
    :meth:`train` is called with.
    """

    def __init__(self, config: BackboneConfig, hidden_size: int):
        super().__init__()
        if not timm.is_model(config.name):
            raise ConfigError(f"backbone.name: {config.name!r} is not a timm model")
        num_stages = _num_feature_stages(config.name)
        if config.out_index >= num_stages:
            raise ConfigError(f"backbone.out_index={config.out_index} is out of range: {config.name!r} has "
                              f"feature stages 0..{num_stages - 1}")
        if config.frozen_stages > config.out_index + 1:
            raise ConfigError(f"backbone.frozen_stages={config.frozen_stages} freezes more than the "
                              f"{config.out_index + 1} stages used with out_index={config.out_index}")
        overlay = None
        if config.pretrained_path:
            state_dict = load_cnn_state_dict(config.pretrained_path)
            _check_fits(config.name, state_dict, config.pretrained_path)
            overlay = dict(state_dict=state_dict)
        norm_kwargs = {"norm_layer": GroupNorm1} if config.norm == "group" else {}
        self.cnn = timm.create_model(config.name, features_only=True, out_indices=(config.out_index,),
                                     pretrained=overlay is not None, pretrained_cfg_overlay=overlay, **norm_kwargs)
        # timm keeps the overlaid weights in pretrained_cfg; the model already holds them.
        self.cnn.pretrained_cfg.pop("state_dict", None)

        self.feature_channels: int = self.cnn.feature_info.channels()[-1]
        self.hidden_size = hidden_size
        self.stride: int = self.cnn.feature_info.reduction()[-1] * config.extra_pool
        self.channels_last = config.channels_last
        self.gradient_checkpointing = config.gradient_checkpointing
        self.frozen_stages = config.frozen_stages
        self.stages = _stage_children(self.cnn, config.out_index + 1)
        if self.stages is None and (config.frozen_stages or config.gradient_checkpointing):
            stage_modules = [self.cnn.feature_info.module_name(i) for i in range(config.out_index + 1)]
            raise ConfigError(
                f"backbone.frozen_stages and backbone.gradient_checkpointing need the stages of {config.name!r} "
                f"({stage_modules}) to end at top-level modules of its features_only wrapper "
                f"({[child for child, _ in self.cnn.named_children()]}); set backbone.frozen_stages: 0 and "
                f"backbone.gradient_checkpointing: false for this model"
            )
        self.frozen_modules: List[str] = [child for stage in (self.stages or [])[:config.frozen_stages]
                                          for child in stage]
        for child in self.frozen_modules:
            self.cnn.get_submodule(child).requires_grad_(False)

        self.pool = (nn.MaxPool2d(config.extra_pool, config.extra_pool, ceil_mode=True)
                     if config.extra_pool > 1 else nn.Identity())
        self.proj = nn.Conv2d(self.feature_channels, hidden_size, kernel_size=1, bias=False)
        self.norm = GroupNorm1(hidden_size) if config.norm == "group" else nn.BatchNorm2d(hidden_size)
        if config.channels_last:
            self.to(memory_format=torch.channels_last)
        self.norm_statistics_frozen = False
        self.train()

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        # A frozen stage is a fixed function: its BatchNorm statistics (and any dropout) stay as loaded.
        for child in self.frozen_modules:
            self.cnn.get_submodule(child).eval()
        if self.norm_statistics_frozen:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def freeze_norm_statistics(self) -> None:
        """From now on every BatchNorm normalises with its running statistics and stops updating
        them (its affine weights still train): a cell's features, and so its dictionary entry,
        no longer depend on the rest of the batch, and training sees what evaluation sees."""
        self.norm_statistics_frozen = True
        self.train(self.training)

    def _checkpointed_features(self, x: Tensor) -> Tensor:
        for index, names in enumerate(self.stages):
            modules = [self.cnn.get_submodule(name) for name in names]
            if index < self.frozen_stages:
                x = _run(modules, x)
            else:
                x = torch.utils.checkpoint.checkpoint(
                    partial(_run, modules), x, use_reentrant=False,
                    context_fn=partial(_recompute_contexts, modules))
        # As FeatureListNet: a stage returning several tensors contributes its first.
        return x[0] if isinstance(x, (tuple, list)) else x

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) pixels -> (B, hidden_size, h, w) grid, h = ceil(H / stride) for ResNets."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (batch, 3, height, width), got shape {tuple(pixel_values.shape)}")
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            features = self._checkpointed_features(pixel_values)
        else:
            features = self.cnn(pixel_values)[-1]
        return self.norm(self.proj(self.pool(features)))
