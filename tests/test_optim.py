import math

import pytest
import torch
from torch import nn

from soho.train.config import OptimConfig, OptimizerConfig
from soho.train.optim import build_optimizer, build_optimizers, lr_factor


def test_schedules_by_hand():
    cosine = OptimConfig(schedule="cosine", warmup_steps=4, warmup_start_factor=0.25, min_lr_factor=0.1)
    assert lr_factor(0, cosine, 14) == pytest.approx(0.25)
    assert lr_factor(2, cosine, 14) == pytest.approx(0.25 + 0.75 * 2 / 4)
    assert lr_factor(4, cosine, 14) == pytest.approx(1.0)
    assert lr_factor(9, cosine, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(14, cosine, 14) == pytest.approx(0.1) == lr_factor(20, cosine, 14)
    step = OptimConfig(schedule="step", warmup_steps=0, milestones=[3, 6], decay_factor=0.5)
    assert [lr_factor(s, step, 10) for s in (0, 3, 5, 6, 9)] == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_no_weight_decay_on_biases_and_norms_and_a_group_per_optimizer():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(list(model.named_parameters()), OptimizerConfig(weight_decay=0.3))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.3 and [p.shape for p in decay["params"]] == [(4, 3)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_optimizers_take_the_same_steps(name):
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    initial = models[0][0].weight.detach().clone()
    optimizers = [build_optimizer(list(m.named_parameters()), OptimizerConfig(name=name, lr=0.05, fused=fused))
                  for m, fused in zip(models, (False, True))]
    assert [o.defaults["fused"] for o in optimizers] == [False, True]
    inputs = torch.randn(16, 5)
    for _ in range(5):
        for model, optimizer in zip(models, optimizers):
            model(inputs).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for mine, fused in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(fused, mine, atol=1e-6, rtol=1e-5)
    assert (models[0][0].weight - initial).abs().max() > 1e-3


def test_the_cnn_gets_its_own_optimizer():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.soho = nn.Module()
            self.soho.backbone = nn.Module()
            self.soho.backbone.cnn = nn.Conv2d(3, 4, 1)
            self.head = nn.Linear(4, 2)

    optimizers, schedulers = build_optimizers(Tiny(), OptimConfig(warmup_steps=0), max_steps=10)
    assert [type(o) for o in optimizers] == [torch.optim.AdamW, torch.optim.SGD]
    assert sum(len(g["params"]) for g in optimizers[1].param_groups) == 2 and len(schedulers) == 2
