import hashlib
import json
import re

import numpy as np
import pytest

from soho.config import ConfigError
from soho.data.pretraining import decode_image
from soho.data.shards import SkipCounter, expand_urls, read_shard
from soho.data.synthetic import (COLOURS, NUMBERS, PLURALS, RELATION_PHRASES, SHAPES, SIZE_WORDS,
                                 SyntheticWorldConfig, caption_candidates, generate_world, render, sample_scene)
from soho.tokenizer import load_tokenizer

TINY = {"pretrain": 40, "retrieval_train": 10, "retrieval_val": 10, "retrieval_test": 12}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    config = SyntheticWorldConfig(split_sizes=TINY, shard_size=16, num_workers=1, tokenizer_vocab_size=400)
    return root, generate_world(config, root)


def samples(root, split):
    out = []
    for url in expand_urls(str(root / split)):
        out += list(read_shard(url, SkipCounter()))
    return out


def test_counts_schema_and_disjoint_splits(world):
    root, manifest = world
    ids = set()
    for split, size in TINY.items():
        records = [json.loads(s["json"]) for s in samples(root, split)]
        assert len(records) == size == manifest["splits"][split]["images"]
        for record in records:
            assert {"image_id", "captions", "width", "height", "source", "scene_graph"} <= set(record)
            assert 3 <= len(record["captions"]) <= 5
            if split == "retrieval_test":
                assert len(record["captions"]) == 5
        split_ids = {r["image_id"] for r in records}
        assert not ids & split_ids
        ids |= split_ids


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    root, manifest = world
    config = SyntheticWorldConfig(split_sizes={"pretrain": 16}, shard_size=16, num_workers=1)
    again = generate_world(config, tmp_path / "again")
    assert again["splits"]["pretrain"]["shards"][0]["sha256"] == manifest["splits"]["pretrain"]["shards"][0]["sha256"]
    other = generate_world(SyntheticWorldConfig(seed=1, split_sizes={"pretrain": 16}, shard_size=16, num_workers=1),
                           tmp_path / "other")
    assert other["splits"]["pretrain"]["shards"][0]["sha256"] != again["splits"]["pretrain"]["shards"][0]["sha256"]
    data = (tmp_path / "again" / "pretrain" / "pretrain-000000.tar").read_bytes()
    assert hashlib.sha256(data).hexdigest() == again["splits"]["pretrain"]["shards"][0]["sha256"]


def test_pixels_match_the_scene_graph(world):
    root, _ = world
    checked = 0
    for sample in samples(root, "pretrain"):
        record = json.loads(sample["json"])
        pixels = np.asarray(decode_image(sample)).astype(float)
        for obj in record["scene_graph"]["objects"]:
            if obj["shape"] not in ("circle", "square", "hexagon", "diamond"):
                continue
            x0, y0, x1, y1 = obj["box"]
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            patch = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            assert np.abs(patch - np.array(COLOURS[obj["colour"]])).max() < 45, (obj, patch)
            checked += 1
    assert checked > 10


SIZE_OF = {w: size for size, words in SIZE_WORDS.items() for w in words}


def matching(description, objects):
    words = description.split()
    shape = words[-1]
    colour = next((w for w in words if w in COLOURS), None)
    size = next((SIZE_OF[w] for w in words if w in SIZE_OF), None)
    return [o["id"] for o in objects if o["shape"] == shape and colour in (None, o["colour"])
            and size in (None, o["size"])]


def test_every_caption_is_true(world):
    phrases = sorted(((p, rel) for rel, ps in RELATION_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))
    checked = {"relation": 0, "count": 0, "shape_count": 0}
    for seed in range(300):
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng, SyntheticWorldConfig())
        objects, relations = scene["objects"], scene["relations"]
        for caption in caption_candidates(scene, rng):
            count = re.match(r"there (?:is|are) (\w+) \w+ in the (?:picture|image|scene|frame)", caption)
            if count:
                assert NUMBERS.index(count.group(1)) == len(objects)
                checked["count"] += 1
                continue
            exact = re.match(r"(?:exactly|precisely) (\w+) (\w+) (?:is|are) visible", caption)
            if exact:
                noun = exact.group(2)
                shape = next(s for s in SHAPES if noun in (s, PLURALS[s]))
                assert NUMBERS.index(exact.group(1)) == sum(o["shape"] == shape for o in objects)
                checked["shape_count"] += 1
                continue
            for phrase, relation in phrases:
                if f" {phrase} " in caption:
                    left, right = caption.split(f" {phrase} ", 1)
                    left = left.removesuffix(" is")
                    subjects, targets = matching(left, objects), matching(right, objects)
                    assert any({"subject": s, "relation": relation, "object": t} in relations
                               for s in subjects for t in targets), (caption, scene)
                    checked["relation"] += 1
                    break
    assert min(checked.values()) > 50, checked


def test_vocabulary_is_rich_enough():
    words = set()
    for seed in range(300):
        rng = np.random.default_rng(seed)
        for caption in caption_candidates(sample_scene(rng, SyntheticWorldConfig()), rng):
            words.update(caption.replace(",", "").split())
    assert len(words) >= 100, len(words)


def test_tokenizer_is_saved(world):
    root, _ = world
    tokenizer = load_tokenizer(root / "tokenizer")
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a small red circle")["input_ids"])
    assert tokens == ["[CLS]", "a", "small", "red", "circle", "[SEP]"]


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown synthetic split"):
        SyntheticWorldConfig(split_sizes={"coco": 3})
    with pytest.raises(ConfigError, match="objects"):
        SyntheticWorldConfig(max_objects=6)


def test_render_is_deterministic():
    config = SyntheticWorldConfig()
    a = render(sample_scene(np.random.default_rng(5), config), np.random.default_rng(6))
    b = render(sample_scene(np.random.default_rng(5), config), np.random.default_rng(6))
    assert np.array_equal(np.asarray(a), np.asarray(b))
