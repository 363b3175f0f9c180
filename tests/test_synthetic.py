"""The synthetic world on disk: shards and manifest through the converters' writer, determinism, regeneration.

What the text says and the pixels show is tested in tests/test_synthetic_language.py."""
import hashlib
import importlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from convert_fixtures import read_split
from PIL import Image

from soho.config import ConfigError, from_dict, to_dict
from soho.data.convert import Conversion, convert
from soho.data.samples import decode_captioned_image
from soho.data.synthetic import SPLITS, SyntheticWorldConfig, ensure_world, generate_world, make_group, texts_of
from soho.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "pretrain": 40, "retrieval_train": 8, "retrieval_val": 6, "retrieval_test": 10,
    "nlvr2_train": 20, "nlvr2_val": 4, "nlvr2_test": 4,
    "ve_train": 15, "ve_val": 6, "ve_test": 6,
    "vqa_train": 15, "vqa_val": 6, "vqa_test": 6,
}


def tiny_config(**overrides) -> SyntheticWorldConfig:
    settings = dict(split_sizes=TINY, shard_size=8, num_workers=1, tokenizer_vocab_size=400)
    return SyntheticWorldConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    config = tiny_config()
    return root, config, generate_world(config, root)


def generated(config: SyntheticWorldConfig, split: str):
    """The first ``split_sizes[split]`` samples ``make_group`` makes for ``split``."""
    samples = []
    group = 0
    while len(samples) < config.split_sizes[split]:
        samples += [sample for sample, _ in make_group(config, split, group)]
        group += 1
    return samples[:config.split_sizes[split]]


def images_of(sample):
    """A raw sample's image members, by member name."""
    return {name: data for name, data in sample.items() if not name.startswith("__") and name != "json"}


def test_config_validation_and_round_trip():
    for bad in (dict(image_size=8), dict(min_objects=3, max_objects=2), dict(max_objects=7),
                dict(split_sizes={"pretrain": -1}), dict(split_sizes={"coco": 5}), dict(max_iou=1.5),
                dict(shard_size=0), dict(min_captions=4, max_captions=3)):
        with pytest.raises(ConfigError):
            SyntheticWorldConfig(**bad)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(SyntheticWorldConfig, {"image_sise": 64})
    config = tiny_config(seed=3)
    assert from_dict(SyntheticWorldConfig, to_dict(config)) == config
    assert "num_workers" not in config.settings()


# ----------------------------------------------------------------------------- shards and manifest

def test_manifest_is_the_converters_and_counts_what_the_readers_read(world, tmp_path):
    root, config, manifest = world
    sample, _ = make_group(config, "pretrain", 0)[0]
    converted = convert(Conversion("reference", {"pretrain": [sample]}, {"pretrain": "image_text"}), tmp_path)
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert set(manifest) == set(converted) | {"tokenizer", "texts", "num_workers"}
    assert manifest["settings"] == {**converted["settings"], "converter": "synthetic", "shard_size": config.shard_size}
    assert manifest["inputs"] == json.loads(json.dumps(config.settings()))
    assert manifest["problems"] == [] and manifest["resumed_shards"] == 0
    reference = converted["splits"]["pretrain"]
    assert set(manifest["splits"]) == set(SPLITS)
    for split, entry in manifest["splits"].items():
        assert set(entry) == set(reference) and all(set(s) == set(reference["shards"][0]) for s in entry["shards"])
        samples = read_split(root, split)
        if entry["task"] == "image_text":
            images = len([decode_captioned_image(s)[2] for s in samples])
        else:
            images = sum(len(TASKS[entry["task"]].decode(s).images) for s in samples)
        assert entry["samples"] == len(samples) == TINY[split] and entry["images"] == images
        assert entry["dropped"] == 0 and entry["problems"] == {}
    assert {entry["task"] for entry in manifest["splits"].values()} == {"image_text", "nlvr2", "ve", "vqa"}


def test_shards_checksums_and_texts(world):
    root, config, manifest = world
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            assert re.fullmatch(rf"{split}/{split}-\d{{6}}\.tar", shard["path"])
            assert hashlib.sha256((root / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
        assert [s["samples"] for s in entry["shards"]][:-1] == [config.shard_size] * (len(entry["shards"]) - 1)
    assert len(manifest["splits"]["pretrain"]["shards"]) == 5
    assert manifest["texts"] == sum(len(texts_of(json.loads(s["json"]))) for split in SPLITS
                                    for s in read_split(root, split))


def test_stored_samples_are_the_generated_ones(world):
    root, config, _ = world
    for split in SPLITS:
        stored, made = read_split(root, split), generated(config, split)
        assert [s["__key__"] for s in stored] == [m.key for m in made]
        for sample, expected in zip(stored, made):
            assert json.loads(sample["json"]) == expected.record
            assert images_of(sample) == {f"{slot}.{image.extension}" if slot else image.extension: image.data
                                         for slot, image in expected.images.items()}


def test_samples_have_the_documented_members_and_fields(world):
    root, config, _ = world
    expected = {
        "pretrain": ({"jpg", "json"}, {"image_id", "captions", "claims", "width", "height", "source", "scene_graph"}),
        "retrieval_test": ({"jpg", "json"}, {"image_id", "captions", "claims", "width", "height", "source",
                                              "scene_graph"}),
        "nlvr2_val": ({"left.jpg", "right.jpg", "json"},
                      {"identifier", "sentence", "label", "left_id", "right_id", "source", "scene_graphs"}),
        "ve_val": ({"jpg", "json"}, {"pair_id", "image_id", "hypothesis", "label", "source", "scene_graph"}),
        "vqa_val": ({"jpg", "json"}, {"question_id", "image_id", "question", "answers", "answer", "answer_type",
                                      "question_type", "source", "scene_graph"}),
    }
    for split, (members, fields) in expected.items():
        for sample in read_split(root, split):
            assert {k for k in sample if not k.startswith("__")} == members
            assert "." not in sample["__key__"]
            record = json.loads(sample["json"])
            assert set(record) == fields and record["source"] == "synthetic"
            for image in images_of(sample).values():
                image = Image.open(io.BytesIO(image))
                assert image.format == "JPEG" and image.size == (config.image_size, config.image_size)


def test_same_seed_same_bytes_whatever_the_workers_other_seed_differs(world, tmp_path):
    root, config, manifest = world
    again = generate_world(tiny_config(num_workers=2), tmp_path / "again")
    other = generate_world(tiny_config(seed=1), tmp_path / "other")
    for split, entry in manifest["splits"].items():
        digests = [s["sha256"] for s in entry["shards"]]
        assert [s["sha256"] for s in again["splits"][split]["shards"]] == digests
        assert not set(s["sha256"] for s in other["splits"][split]["shards"]) & set(digests)
    assert again["inputs"] == manifest["inputs"] and again["num_workers"] == 2


def test_splits_share_no_image(world):
    root, _, _ = world
    ids, pixels = {}, {}
    for split in SPLITS:
        split_ids, split_pixels = set(), set()
        for sample in read_split(root, split):
            record = json.loads(sample["json"])
            split_ids |= {record[k] for k in ("image_id", "left_id", "right_id") if k in record}
            split_pixels |= {hashlib.sha256(v).hexdigest() for v in images_of(sample).values()}
        for other in ids:
            assert not split_ids & ids[other] and not split_pixels & pixels[other], (split, other)
        ids[split], pixels[split] = split_ids, split_pixels


def test_ensure_world_reuses_and_regenerates(tmp_path):
    config = tiny_config(split_sizes={"pretrain": 20, "vqa_val": 3})
    root = ensure_world(tmp_path / "w", config)
    manifest = (root / "manifest.json").read_text()
    assert ensure_world(root, config) == root and (root / "manifest.json").read_text() == manifest
    ensure_world(root, tiny_config(split_sizes={"pretrain": 9}))
    assert sorted(p.name for p in (root / "pretrain").iterdir()) == [
        "pretrain-000000.tar", "pretrain-000000.tar.json", "pretrain-000001.tar", "pretrain-000001.tar.json"]
    assert not list((root / "vqa_val").iterdir())  # a split the new world lacks is not left for readers to find
    assert json.loads((root / "manifest.json").read_text())["splits"]["pretrain"]["samples"] == 9
    shutil.rmtree(root / "tokenizer")  # as a run that died while training it leaves the world
    ensure_world(root, tiny_config(split_sizes={"pretrain": 9}))
    assert (root / "tokenizer" / "vocab.txt").is_file()


def test_tokenizer_loads_with_auto_tokenizer(world):
    from transformers import AutoTokenizer

    root, _, _ = world
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    caption = json.loads(read_split(root, "pretrain")[0]["json"])["captions"][0]
    ids = tokenizer(caption)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption


def test_make_synthetic_script(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "data_scripts"))
    main = importlib.import_module("make_synthetic").main
    assert main(["--out", str(tmp_path / "world"), "--scale", "0.0001", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert all(re.search(rf"^{split} +[1-9]", printed, re.MULTILINE) for split in SPLITS)
    assert "tokenizer trained on" in printed and (tmp_path / "world" / "tokenizer").is_dir()


def test_pretraining_batches_say_which_captions_are_true_of_which_images(world):
    from soho.data.pretraining import PretrainingDataConfig, PretrainingDataset
    from soho.data.synthetic.logic import claim_from_json, holds
    from soho.tokenizer import load_tokenizer

    root, _, _ = world
    data = PretrainingDataConfig(shards=str(root / "pretrain"), captions_per_image=3, shuffle_buffer=0)
    batch = next(iter(PretrainingDataset(data, load_tokenizer(root / "tokenizer"), batch_size=8, repeat=False)))
    truth = batch["caption_truth"]
    assert truth.shape == (batch["input_ids"].shape[0], 8) and truth.dtype == torch.bool
    # Every caption is true of its own image; "there is one object" and the like are true of others too.
    assert truth[torch.arange(truth.shape[0]), batch["image_index"]].all()
    assert 0 < truth.float().mean() < 1
    records = [json.loads(sample["json"]) for sample in read_split(root, "pretrain")]
    scenes = [record["scene_graph"] for record in records[:8]]
    claims = {text: claim_from_json(claim) for record in records for text, claim in zip(record["captions"],
                                                                                        record["claims"])}
    tokenizer = load_tokenizer(root / "tokenizer")
    checked = 0
    for row, ids in enumerate(batch["input_ids"]):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text in claims:  # the tokenizer may not give every caption back verbatim
            assert truth[row].tolist() == [holds(claims[text], scene) for scene in scenes]
            checked += 1
    assert checked >= truth.shape[0] // 2


def test_shuffled_captions_move_with_their_claims(world):
    from soho.data.pretraining import PretrainingDataConfig, PretrainingDataset
    from soho.tokenizer import load_tokenizer

    root, _, _ = world
    tokenizer = load_tokenizer(root / "tokenizer")
    batches = {}
    for shuffle in (False, True):
        data = PretrainingDataConfig(shards=str(root / "pretrain"), captions_per_image=1, shuffle_buffer=0,
                                     shuffle_captions=shuffle)
        batches[shuffle] = next(iter(PretrainingDataset(data, tokenizer, batch_size=8, repeat=False)))
    plain, shuffled = batches[False], batches[True]
    assert torch.equal(plain["pixel_values"], shuffled["pixel_values"])
    # The same captions, given to other images; each keeps its truth row.
    rows = {tuple(ids.tolist()): row for row, ids in zip(plain["caption_truth"], plain["input_ids"])}
    moved = [tuple(ids.tolist()) for ids in shuffled["input_ids"]]
    assert sorted(moved) == sorted(rows) and moved != [tuple(ids.tolist()) for ids in plain["input_ids"]]
    for ids, row in zip(moved, shuffled["caption_truth"]):
        assert torch.equal(row, rows[ids])
