import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from soho.config import from_dict, to_dict
from soho.data.pretraining import PretrainingDataConfig, PretrainingDataset
from soho.data.shards import DataError
from soho.data.stream import loader_batches, stream_loader
from soho.tasks import PretrainConfig
from soho.tokenizer import train_wordpiece_tokenizer
from soho.train.trainer import train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 30)}
ROOT = Path(__file__).resolve().parents[1]


def jpeg(colour, size=32, seed=0):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_world(root: Path, num_shards=4, per_shard=12, broken=True):
    """Plain-colour images with captions naming the colour; one shard holds three broken samples."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    index = 0
    for shard in range(num_shards):
        with tarfile.open(root / f"train-{shard:06d}.tar", "w") as tar:
            for _ in range(per_shard):
                name = names[index % len(names)]
                key = f"img{index:05d}"
                add(tar, f"{key}.jpg", jpeg(COLOURS[name], seed=index))
                captions = [f"a {name} picture", f"the image is {name}", f"something {name}"]
                add(tar, f"{key}.json", json.dumps({"image_id": key, "captions": captions}).encode())
                index += 1
            if broken and shard == 0:
                add(tar, "bad00001.jpg", b"not a jpeg at all")
                add(tar, "bad00001.json", json.dumps({"image_id": "bad1", "captions": ["x"]}).encode())
                add(tar, "bad00002.jpg", jpeg(COLOURS["red"]))
                add(tar, "bad00002.json", b"{not json")
                add(tar, "bad00003.json", json.dumps({"image_id": "bad3", "captions": ["y"]}).encode())
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root / "train")
    write_world(root / "val", num_shards=1, per_shard=16, broken=False)
    corpus = [f"a {n} picture the image is {n} something {n}" for n in COLOURS]
    train_wordpiece_tokenizer(corpus * 5, root / "tokenizer", vocab_size=100)
    return root


def data_config(world, **overrides):
    values = {"shards": str(world / "train"), "tokenizer": str(world / "tokenizer"),
              "image": {"min_size": 32, "max_size": 32, "size_divisor": 8}, "max_text_length": 12,
              "captions_per_image": 2, "shuffle_buffer": 8, "num_workers": 0}
    values.update(overrides)
    return from_dict(PretrainingDataConfig, values)


def run_config(world, output_dir, **train):
    model = {"backbone": {"name": "resnet10t", "out_index": 2, "frozen_stages": 0},
             "encoder": {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "intermediate_size": 64, "max_position_embeddings": 16, "hidden_dropout_prob": 0.0,
                         "attention_probs_dropout_prob": 0.0},
             "visual_dictionary": {"size": 16, "init": "data"}, "mvm": {"probability": 0.5}}
    values = {"model": model,
              "data": to_dict(data_config(world, max_skip_fraction=0.2, eval_shards={"val": str(world / "val")})),
              "optim": {"warmup_steps": 2, "schedule": "cosine", "backbone": {"name": "adamw", "lr": 1e-3},
                        "rest": {"lr": 1e-3}},
              "train": {"output_dir": str(output_dir), "max_steps": 6, "batch_size": 4, "log_every": 1,
                        "save_every": 3, "eval_batches": 2, **train}}
    return from_dict(PretrainConfig, values)


def tokenizer_of(world):
    from soho.tokenizer import load_tokenizer
    return load_tokenizer(world / "tokenizer")


def batches(dataset, count):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


def test_batches_are_deterministic_and_well_formed(world):
    config = data_config(world)
    first = batches(PretrainingDataset(config, tokenizer_of(world), batch_size=4, seed=1), 3)
    again = batches(PretrainingDataset(config, tokenizer_of(world), batch_size=4, seed=1), 3)
    for a, b in zip(first, again):
        for key in ("pixel_values", "input_ids", "mlm_input_ids", "mlm_labels", "image_ids"):
            assert torch.equal(a[key], b[key])
    batch = first[0]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 8 and batch["image_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (batch["mlm_labels"] != -100).any()


def test_broken_samples_are_skipped_and_counted(world):
    dataset = PretrainingDataset(data_config(world), tokenizer_of(world), batch_size=4, repeat=False)
    skipped = {}
    seen = 0
    for batch in dataset:
        seen += batch["samples"]
        for reason, count in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    assert seen == 48
    assert skipped == {"corrupt_image": 1, "bad_json": 1, "missing_image": 1}


def test_two_ranks_two_workers_see_every_image_once(world):
    ids = []
    for rank in range(2):
        dataset = PretrainingDataset(data_config(world), tokenizer_of(world), batch_size=3, rank=rank,
                                     world_size=2, repeat=False)
        with loader_batches(stream_loader(dataset, 2, dataset.seed)) as loaded:
            for batch in loaded:
                ids += batch["image_ids"].tolist()
    assert len(ids) == len(set(ids)) == 48


def held_out(results):
    return results["splits"]["val"]["metrics"]


def read_metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_run(world, tmp_path):
    # BatchNorm statistics freeze after step 2: a resumed run must freeze them again.
    full = train(run_config(world, tmp_path / "full", freeze_backbone_norm_at=2))
    assert full["steps"] == 6 and full["task"] == "pretraining"
    curves = tmp_path / "full" / "curves"
    assert (curves / "losses.png").stat().st_size > 0 and (curves / "accuracy.png").stat().st_size > 0
    for name in ("itm_acc", "mlm_acc", "mvm_acc"):
        assert 0 <= held_out(full)["chance_" + name] <= 1 and 0 <= held_out(full)[name] <= 1
    steps = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r}
    checkpoint = tmp_path / "full" / "checkpoints" / "step_3"
    assert (checkpoint / "pretrained" / "model.safetensors").is_file()
    # The export is what the README's library example loads.
    from soho import SohoForPretraining, SohoProcessor
    model = SohoForPretraining.from_pretrained(tmp_path / "full" / "pretrained").eval()
    processor = SohoProcessor.from_pretrained(tmp_path / "full" / "pretrained")
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    assert model.score(**processor(images=[image], text=["a red picture"])).shape == (1,)
    from safetensors.torch import load_file
    statistics = [{k: v for k, v in load_file(path).items() if "running" in k}
                  for path in (checkpoint / "pretrained" / "model.safetensors",
                               tmp_path / "full" / "pretrained" / "model.safetensors")]
    assert statistics[0] and all(torch.equal(statistics[0][k], statistics[1][k]) for k in statistics[0])
    resumed_dir = tmp_path / "resumed"
    train(run_config(world, resumed_dir, resume=str(checkpoint), freeze_backbone_norm_at=2))
    resumed = {r["step"]: r["loss"] for r in read_metrics(resumed_dir) if "loss" in r}
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(steps[step], rel=1e-5), step


def test_short_run_lowers_the_loss(world, tmp_path):
    # Held-out losses on the same batches with the same masks, after 1 and after 100 steps.
    # (Training losses over batches of 4 images are too noisy to compare; MVM targets move
    # with the dictionary.)
    before = held_out(train(run_config(world, tmp_path / "one", max_steps=1, save_every=1000, eval_batches=4)))
    after = held_out(train(run_config(world, tmp_path / "run", max_steps=100, save_every=1000, eval_batches=4)))
    assert after["mlm"] < 0.8 * before["mlm"], (before, after)
    assert after["itm"] + after["mlm"] < before["itm"] + before["mlm"]


def test_too_many_skips_stop_the_run(world, tmp_path):
    config = run_config(world, tmp_path / "strict", max_steps=40, save_every=100)
    config.data.max_skip_fraction = 0.01
    with pytest.raises(DataError, match="max_skip_fraction"):
        train(config)


@pytest.mark.slow
def test_two_process_accelerate_launch(world, tmp_path):
    config = run_config(world, tmp_path / "ddp", max_steps=3, save_every=3)
    config_file = tmp_path / "config.yaml"
    import yaml
    config_file.write_text(yaml.safe_dump(to_dict(config)))
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/cpu.yaml"),
         "--num_processes", "2", str(ROOT / "tools" / "pretrain.py"),
         "--config", str(config_file)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "ddp")
    assert records[-1]["final"] and records[-1]["step"] == 3
    # Both ranks evaluated their half of the held-out split and the means were merged.
    assert records[-1]["eval"]["val"]["batches"] == 2 * 2 and "chance_mvm_acc" in records[-1]["eval"]["val"]
    assert (tmp_path / "ddp" / "checkpoints" / "step_3" / "data_state_rank1.json").is_file()


def test_trackers_and_bf16_autocast_on_cpu(world, tmp_path, offline_trackers):
    # Earlier runs in this process fixed Accelerate's process-wide precision to "no".
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()
    config = run_config(world, tmp_path / "tracked", max_steps=2, save_every=100, mixed_precision="bf16",
                        trackers=["tensorboard", "wandb"])
    try:
        final = held_out(train(config))
    finally:
        AcceleratorState._reset_state()
    assert math.isfinite(final["mlm"]) and math.isfinite(final["itm"])
    assert list((tmp_path / "tracked").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    offline_runs = list(offline_trackers.glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb")), "no offline wandb run"
