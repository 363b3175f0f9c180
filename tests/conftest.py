import os

import pytest
import torch

from soho.config import from_dict
from soho.models.config import SohoConfig

# The tests' tensors are tiny: a second thread gains nothing, and two per process oversubscribe a shared
# 2-core machine (CI, other jobs), which runs the suite several times slower. Launched processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

VOCAB = 60


def tiny_config(**overrides) -> SohoConfig:
    """A model small enough for unit tests: resnet10t cut at stride 16, 2-layer 32-wide encoder."""
    data = {
        "backbone": {"name": "resnet10t", "out_index": 3, "frozen_stages": 1},
        "encoder": {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "intermediate_size": 64, "max_position_embeddings": 32,
                    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        "visual_dictionary": {"size": 16},
        "mvm": {"probability": 1.0},
    }
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return from_dict(SohoConfig, data)


def tiny_batch(num_images=4, captions_per_image=2, size=64, length=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(num_images, 3, size, size, generator=generator)
    pixel_mask = torch.ones(num_images, size, size, dtype=torch.long)
    pixel_mask[0, :, size // 2:] = 0  # a portrait image padded on the right
    pixel_values[0, :, :, size // 2:] = 0
    num_texts = num_images * captions_per_image
    input_ids = torch.randint(5, VOCAB, (num_texts, length), generator=generator)
    input_ids[:, 0] = 2
    attention_mask = torch.ones(num_texts, length, dtype=torch.long)
    attention_mask[1, 6:] = 0
    input_ids[1, 6:] = 0
    mlm_labels = torch.full_like(input_ids, -100)
    mlm_input_ids = input_ids.clone()
    mlm_labels[:, 3] = input_ids[:, 3]
    mlm_input_ids[:, 3] = 4
    return {
        "pixel_values": pixel_values,
        "pixel_mask": pixel_mask,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mlm_input_ids": mlm_input_ids,
        "mlm_labels": mlm_labels,
        "image_index": torch.arange(num_images).repeat_interleave(captions_per_image),
    }


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """TensorBoard and an offline wandb writing under ``tmp_path / "wandb"``; skipped without the packages."""
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path / "wandb"
    # wandb keeps its settings (the directory included) in a process-wide singleton.
    wandb.teardown()
