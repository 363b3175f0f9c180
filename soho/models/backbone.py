"""CNN backbone: any timm CNN's feature map, projected to the Transformer width."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import timm
import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from soho.config import ConfigError
from soho.models.config import BackboneConfig


def load_cnn_state_dict(path: str | Path) -> Dict[str, Tensor]:
    """A timm or torchvision state dict from a local file; only tensors are ever unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read backbone weights {path} as a tensor-only checkpoint "
                             f"(arbitrary pickles are refused): {error}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


class Backbone(nn.Module):
    """timm CNN (``features_only``, one stage) -> optional max-pool -> 1x1 conv + BatchNorm.

    As in the SOHO release, the neck has no activation. The first ``frozen_stages``
    stages keep their weights and BatchNorm statistics fixed.
    """

    def __init__(self, config: BackboneConfig, hidden_size: int):
        super().__init__()
        self.config = config
        if not timm.is_model(config.name):
            raise ConfigError(f"backbone.name: unknown timm model {config.name!r}")
        kwargs = {}
        if config.pretrained_path:
            kwargs = dict(pretrained=True,
                          pretrained_cfg_overlay=dict(state_dict=load_cnn_state_dict(config.pretrained_path)))
        probe = timm.create_model(config.name, features_only=True, pretrained=False)
        # Names of the CNN children that end each stage; features_only flattens "a.b" to "a_b".
        stage_ends = [entry["module"].replace(".", "_") for entry in probe.feature_info.get_dicts()]
        num_stages = len(stage_ends)
        if config.out_index >= num_stages:
            raise ConfigError(f"backbone.out_index={config.out_index} but {config.name} has feature stages "
                              f"0..{num_stages - 1}")
        if config.frozen_stages > config.out_index + 1:
            raise ConfigError(f"backbone.frozen_stages={config.frozen_stages} freezes past out_index="
                              f"{config.out_index}")
        del probe
        try:
            self.cnn = timm.create_model(config.name, features_only=True, out_indices=(config.out_index,), **kwargs)
        except RuntimeError as error:
            raise ValueError(f"weights {config.pretrained_path} do not fit {config.name}: {error}") from None
        info = self.cnn.feature_info
        self.feature_channels = info.channels()[-1]
        self.hidden_size = hidden_size
        self.stride = info.reduction()[-1] * config.extra_pool
        self.pool = nn.MaxPool2d(config.extra_pool, config.extra_pool, ceil_mode=True) if config.extra_pool > 1 \
            else nn.Identity()
        self.proj = nn.Conv2d(self.feature_channels, hidden_size, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(hidden_size)
        self.frozen = self._freeze(stage_ends[:config.frozen_stages])
        if config.channels_last:
            self.to(memory_format=torch.channels_last)

    def _freeze(self, frozen_stage_ends: List[str]) -> List[str]:
        """Freeze every CNN child up to and including the last frozen stage's end; return their names."""
        frozen: List[str] = []
        if not frozen_stage_ends:
            return frozen
        for name, module in self.cnn.named_children():
            module.requires_grad_(False)
            frozen.append(name)
            if name == frozen_stage_ends[-1]:
                break
        return frozen

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        # Frozen stages keep their BatchNorm statistics (as the release's norm_eval).
        for name in self.frozen:
            for module in getattr(self.cnn, name).modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def _run_cnn(self, x: Tensor) -> Tensor:
        checkpoint = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for name, module in self.cnn.named_children():
            if checkpoint and name not in self.frozen:
                x = torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
            else:
                x = module(x)
        return x

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, hidden_size, ceil(H / stride), ceil(W / stride))."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
        if self.config.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        features = self._run_cnn(pixel_values)
        return self.norm(self.proj(self.pool(features)))
