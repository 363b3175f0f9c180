"""Distributed equivalence: a training step on 2 gloo processes computes what 1 process computes on the
concatenated batch, every loss and every gradient (tests/distributed_harness.py runs the steps)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

from soho.config import to_dict
from soho.models.soho import SohoForPretraining
from soho.processing import ImageTransformConfig, SohoProcessor
from soho.tokenizer import train_wordpiece_tokenizer

pytestmark = pytest.mark.slow  # starts processes

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("pretraining", "retrieval", "ve", "nlvr2")
# A batch-independent CNN (GroupNorm; BatchNorm would see each process's half of the batch), no dropout,
# ITC on, every image masked with probability 1/2: all four objectives and the cross-rank ITC gather.
MODEL = {"backbone.norm": "group", "backbone.frozen_stages": 0, "itc.enabled": True, "mvm.probability": 0.5}


@pytest.fixture(scope="module")
def harness_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = train_wordpiece_tokenizer(["a red circle and two blue squares"] * 5, root / "tokenizer", vocab_size=60)
    model_config = tiny_config(**MODEL)
    torch.manual_seed(0)
    SohoForPretraining(model_config).save_pretrained(
        root / "pretrained", processor=SohoProcessor(tokenizer, ImageTransformConfig(min_size=32, max_size=32)))
    train = {"max_steps": 10, "batch_size": 4, "log_every": 1, "seed": 3}
    optim = {"grad_clip": 0.0, "warmup_steps": 0}
    unread = {"train_shards": str(root / "unread"), "eval_shards": {"val": str(root / "unread")}}
    # The harness feeds its own batches: the shards are never read, only checked to exist at set-up.
    (root / "unread").mkdir()
    (root / "unread" / "unread.tar").touch()
    configs = {
        "pretraining": {"model": to_dict(model_config),
                        "data": {"tokenizer": str(root / "tokenizer"), "shards": str(root / "unread")}},
        "retrieval": {"init": {"checkpoint": str(root / "pretrained")}, "data": unread,
                      "retrieval": {"objectives": {"itm": 1.0, "itc": 1.0}}},
        "ve": {"init": {"checkpoint": str(root / "pretrained")}, "data": unread},
        "nlvr2": {"init": {"checkpoint": str(root / "pretrained")}, "data": unread},
    }
    outputs = {}
    for variant, processes, extra in (("one", 1, []), ("two", 2, []), ("two_local_gather", 2, ["--local-gather"])):
        paths = []
        for task, config in configs.items():
            if extra and task != "pretraining":
                continue
            path = root / variant / f"{task}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            run = {**config, "task": task, "optim": optim,
                   "train": {**train, "output_dir": str(root / variant / task)}}
            path.write_text(yaml.safe_dump(run))
            paths.append(str(path))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / "cpu.yaml"), "--num_processes", str(processes),
                   str(ROOT / "tests" / "distributed_harness.py"), "--configs", *paths, "--out",
                   str(root / variant), *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[variant] = {path.stem: [torch.load(path, weights_only=True) for path in
                                        sorted((root / variant).glob(f"{path.stem}_rank*.pt"))]
                            for path in map(Path, paths)}
    return outputs


def mean_losses(ranks):
    return {name: sum(rank["losses"][name] for rank in ranks) / len(ranks) for name in ranks[0]["losses"]}


def max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("task", TASKS)
def test_two_processes_compute_the_losses_and_gradients_of_one(harness_outputs, task):
    (one,), two = harness_outputs["one"][task], harness_outputs["two"][task]
    assert len(two) == 2
    expected = {"pretraining": {"loss", "itc", "itm", "mlm", "mvm"}, "retrieval": {"loss", "itc", "itm"}}
    assert set(one["losses"]) == expected.get(task, {"loss"})
    # DDP averages what each process computes; the mean of their losses is the loss of the whole batch.
    for name, value in mean_losses(two).items():
        assert value == pytest.approx(one["losses"][name], abs=1e-5), name
    assert set(two[0]["grads"]) == set(two[1]["grads"]) == set(one["grads"]) and one["grads"]
    for name, grad in one["grads"].items():
        assert torch.equal(two[0]["grads"][name], two[1]["grads"][name]), name
        torch.testing.assert_close(two[0]["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=name)
    if task == "pretraining":
        # Every parameter learns, the CNN and the ITC projections included, and the dictionary moved the same.
        assert all(grad.abs().sum() > 0 for name, grad in one["grads"].items() if "objectives.itc" in name)
        for name, buffer in one["buffers"].items():
            torch.testing.assert_close(two[0]["buffers"][name], buffer, atol=1e-5, rtol=1e-5, msg=name)


def test_the_harness_catches_an_itc_gather_that_drops_other_ranks_gradients(harness_outputs):
    (one,), broken = harness_outputs["one"]["pretraining"], harness_outputs["two_local_gather"]["pretraining"]
    # The losses agree (the forward pass is the same) ...
    for name, value in mean_losses(broken).items():
        assert value == pytest.approx(one["losses"][name], abs=1e-5), name
    # ... but the ITC projections' gradients do not: what other ranks' rows send back is lost.
    names = [name for name in one["grads"] if "objectives.itc.head" in name]
    assert max_difference([broken[0]["grads"][n] for n in names], [one["grads"][n] for n in names]) > 1e-3
