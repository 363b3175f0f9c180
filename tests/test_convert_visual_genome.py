import json
from pathlib import Path

import pytest
from convert_fixtures import read_split, write_corrupt_image, write_image

from soho.cli.convert_visual_genome import main
from soho.config import from_dict
from soho.data.convert import WriteOptions, convert
from soho.data.convert.visual_genome import clip_box, first_entry, visual_genome_conversion
from soho.data.pretraining import PretrainingDataConfig, PretrainingDataset
from soho.data.samples import decode_captioned_image, decode_image, decode_json, stable_id
from soho.tokenizer import load_tokenizer, train_wordpiece_tokenizer

URL = "https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg"
WIDTH, HEIGHT = 48, 32


def region(region_id, image_id, phrase, x, y, w, h):
    return {"region_id": region_id, "width": w, "height": h, "image_id": image_id, "phrase": phrase, "y": y, "x": x}


def end(object_id, x, y, w, h, name=None, names=None):
    """A relationship's subject or object; the release writes "name" for some and "names" for others."""
    value = {"object_id": object_id, "x": x, "y": y, "w": w, "h": h, "synsets": []}
    value.update({"name": name} if name is not None else {"names": names})
    return value


def relationship(relationship_id, predicate, subject, object_):
    return {"relationship_id": relationship_id, "predicate": predicate, "synsets": [], "subject": subject,
            "object": object_}


def write_release(root: Path) -> Path:
    """The v1.2 release layout: image_data.json, region_descriptions.json, relationships.json, VG_100K{,_2}/
    (plus Karpathy's dataset_coco.json and dataset_flickr30k.json), images with one planted problem each where
    noted. Image i has flickr_id 1000 + i."""
    images = {  # image_id: (folder in the url, folder on disk or None for no file, coco_id)
        1: ("VG_100K_2", "VG_100K_2", None),
        2: ("VG_100K", "VG_100K_2", 100),  # the url names the other folder: found there anyway
        3: ("VG_100K", "VG_100K", 200),  # COCO Karpathy test: excluded_overlap in pretrain
        4: ("VG_100K", "VG_100K", None),  # corrupt_image
        5: ("VG_100K", None, None),  # missing_image
        6: ("VG_100K", "VG_100K", None),  # only empty phrases: no_captions; no relationships
        7: ("VG_100K", "VG_100K", None),  # in image_data.json only: missing_annotation
        9: ("VG_100K_2", "VG_100K_2", 300),  # COCO Karpathy restval: kept
        10: ("VG_100K", "VG_100K", None),  # Flickr30k Karpathy test: excluded_overlap in pretrain
    }
    image_data = []
    for image_id, (url_folder, folder, coco_id) in images.items():
        image_data.append({"width": WIDTH, "url": URL.format(folder=url_folder, image_id=image_id), "height": HEIGHT,
                           "image_id": image_id, "coco_id": coco_id, "flickr_id": 1000 + image_id})
        if image_id == 4:
            write_corrupt_image(root / folder / f"{image_id}.jpg", WIDTH, HEIGHT)
        elif folder is not None:
            write_image(root / folder / f"{image_id}.jpg", WIDTH, HEIGHT, seed=image_id)
    regions = {
        1: [region(101, 1, "a red  car\n", 2, 3, 20, 10),
            region(102, 1, "A red car ", 30, 20, 40, 40),  # repeated caption; box clipped to the image
            region(103, 1, "", 0, 0, 10, 10),
            region(104, 1, "the sky", 5, 5, 0, 12),  # zero width: caption kept, region not
            region(105, 1, "   ", 0, 0, 10, 10)],
        2: [region(201, 2, "a dog on grass", 0, 0, 48, 32)],
        3: [region(301, 3, "a cat", 1, 1, 10, 10)],
        4: [region(401, 4, "a tree", 1, 1, 10, 10)],
        5: [region(501, 5, "a boat", 1, 1, 10, 10)],
        6: [region(601, 6, " ", 1, 1, 10, 10)],
        8: [region(801, 8, "a ghost", 1, 1, 10, 10)],  # not in image_data.json: unknown_image
        9: [region(901, 9, "two men talking", -4, 2, 20, 20)],
        10: [region(1001, 10, "a bridge", 1, 1, 10, 10)],
    }
    region_descriptions = [{"regions": items, "id": image_id} for image_id, items in regions.items()]
    car, road = end(11, 2, 3, 20, 10, name="Car"), end(12, 0, 20, 48, 12, names=["road", "street"])
    relationships = {
        1: [relationship(1001, "ON ", car, road),
            relationship(1002, " ", road, car)],  # no predicate
        2: [relationship(2001, "near", end(21, 5, 5, 0, 5, name="dog"), road)],  # empty box: no_relations
        3: [relationship(3001, "on", end(31, 1, 1, 10, 10, name="cat"), end(32, 0, 0, 48, 32, name="sofa"))],
        4: [relationship(4001, "has", end(41, 1, 1, 10, 10, name="tree"), end(42, 2, 2, 3, 3, name="leaf"))],
        5: [relationship(5001, "on", end(51, 1, 1, 10, 10, name="boat"), end(52, 0, 10, 48, 22, name="water"))],
        6: [],
        8: [relationship(8001, "in", end(81, 1, 1, 5, 5, name="ghost"), end(82, 0, 0, 9, 9, name="house"))],
        9: [relationship(9001, "Talking to", end(91, 2, 2, 10, 20, names=["man"]),
                         end(92, 30, 2, 30, 20, name="man"))],  # object clipped
        10: [relationship(10001, "over", end(101, 0, 0, 48, 10, name="bridge"), end(102, 0, 10, 48, 22,
                                                                                     name="river"))],
    }
    relationship_entries = [{"relationships": items, "image_id": image_id} for image_id, items in relationships.items()]
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "train2014", "filename": f"COCO_train2014_{cocoid:012d}.jpg", "imgid": i, "split": split,
         "sentids": [i], "sentences": [{"tokens": ["a"], "raw": "A.", "imgid": i, "sentid": i}], "cocoid": cocoid}
        for i, (cocoid, split) in enumerate([(100, "train"), (200, "test"), (250, "val"), (300, "restval")])]}
    karpathy_flickr30k = {"dataset": "flickr30k", "images": [  # filename: <flickr id>.jpg
        {"filename": f"{flickr_id}.jpg", "imgid": i, "split": split, "sentids": [i],
         "sentences": [{"tokens": ["a"], "raw": "A.", "imgid": i, "sentid": i}]}
        for i, (flickr_id, split) in enumerate([(1001, "train"), (1010, "test"), (5555, "val")])]}
    for name, content in [("image_data.json", image_data), ("region_descriptions.json", region_descriptions),
                          ("relationships.json", relationship_entries), ("dataset_coco.json", karpathy),
                          ("dataset_flickr30k.json", karpathy_flickr30k)]:
        (root / name).write_text(json.dumps(content))
    return root


PRETRAIN_PROBLEMS = [("10", "excluded_overlap"), ("3", "excluded_overlap"), ("4", "corrupt_image"),
                     ("5", "missing_image"), ("6", "no_captions"), ("7", "missing_annotation"), ("8", "unknown_image")]
RELATIONS_PROBLEMS = [("2", "no_relations"), ("4", "corrupt_image"), ("5", "missing_image"), ("6", "no_relations"),
                      ("7", "missing_annotation"), ("8", "unknown_image")]


@pytest.fixture
def release(tmp_path):
    return write_release(tmp_path / "visual_genome")


def conversion_of(release, **overrides):
    arguments = dict(image_data=release / "image_data.json", region_descriptions=release / "region_descriptions.json",
                     images=release, relationships=release / "relationships.json",
                     exclude_coco=release / "dataset_coco.json", exclude_flickr30k=release / "dataset_flickr30k.json")
    return visual_genome_conversion(**{**arguments, **overrides})


def problems_of(manifest, split):
    return sorted((p["key"], p["reason"]) for p in manifest["problems"] if p["split"] == split)


def test_pretrain_and_relations_list_exactly_the_planted_problems(release, tmp_path):
    manifest = convert(conversion_of(release), tmp_path / "vg", shard_size=2)
    assert manifest["splits"]["pretrain"]["samples"] == 3 and manifest["splits"]["relations"]["samples"] == 4
    assert manifest["splits"]["pretrain"]["task"] == "image_text"
    assert problems_of(manifest, "pretrain") == PRETRAIN_PROBLEMS
    assert problems_of(manifest, "relations") == RELATIONS_PROBLEMS
    assert all(p["detail"] for p in manifest["problems"])
    overlaps = {p["key"]: p["detail"] for p in manifest["problems"] if p["reason"] == "excluded_overlap"}
    assert overlaps == {"3": "image 3: coco_id 200 is in COCO Karpathy test",
                        "10": "image 10: flickr_id 1010 is in Flickr30k Karpathy test"}
    assert manifest["excluded_coco_ids"] == manifest["excluded_flickr30k_ids"] == 2  # Karpathy val + test
    # Tallied when planned: the regions of images 4 and 5 count, though the writer then drops those images.
    assert manifest["regions"] == {"regions_read": 10, "regions_kept": 6, "malformed": 0, "empty_phrase": 3,
                                   "empty_box": 1, "clipped_box": 2, "repeated_caption": 1}
    assert manifest["relationships"] == {"relationships_read": 8, "relationships_kept": 6, "malformed": 0,
                                         "empty_predicate": 1, "missing_name": 0, "empty_box": 1, "clipped_box": 1}

    records = {}
    for sample in read_split(tmp_path / "vg", "pretrain"):
        record, captions, image = decode_captioned_image(sample)
        assert image.size == (WIDTH, HEIGHT) and (record["width"], record["height"]) == (WIDTH, HEIGHT)
        records[record["image_id"]] = record
    assert sorted(records) == ["1", "2", "9"]  # 1 is a Flickr30k train image: kept
    first = records["1"]
    assert first["captions"] == ["a red car", "the sky"]  # whitespace collapsed, repeats and empty phrases dropped
    assert first["regions"] == [{"phrase": "a red car", "box": [2, 3, 22, 13], "region_id": 101},
                                {"phrase": "A red car", "box": [30, 20, 48, 32], "region_id": 102}]
    assert (first["coco_id"], first["flickr_id"], first["source"]) == (None, 1001, "visual_genome")
    assert records["2"]["coco_id"] == 100 and records["9"]["regions"][0]["box"] == [0, 2, 16, 22]

    relations = {}
    for sample in read_split(tmp_path / "vg", "relations"):
        record = decode_json(sample)
        assert decode_image(sample).size == (WIDTH, HEIGHT) and "captions" not in record
        relations[record["image_id"]] = record["relations"]
    assert sorted(relations) == ["1", "10", "3", "9"]  # pre-training's exclusions do not apply to probing
    assert relations["1"] == [{"predicate": "on", "relationship_id": 1001,
                               "subject": {"name": "car", "box": [2, 3, 22, 13], "object_id": 11},
                               "object": {"name": "road", "box": [0, 20, 48, 32], "object_id": 12}}]
    assert relations["9"][0]["predicate"] == "talking to"
    assert relations["9"][0]["subject"]["name"] == relations["9"][0]["object"]["name"] == "man"
    assert relations["9"][0]["object"]["box"] == [30, 2, 48, 22]


def test_pretrain_split_feeds_the_pretraining_loader(release, tmp_path):
    convert(conversion_of(release, relationships=None), tmp_path / "vg")
    captions = [c for s in read_split(tmp_path / "vg", "pretrain") for c in decode_captioned_image(s)[1]]
    train_wordpiece_tokenizer(captions * 3, tmp_path / "tokenizer", vocab_size=60)
    config = from_dict(PretrainingDataConfig, {
        "shards": str(tmp_path / "vg" / "pretrain"), "tokenizer": str(tmp_path / "tokenizer"),
        "image": {"min_size": 32, "max_size": 48, "size_divisor": 8}, "captions_per_image": 2, "shuffle_buffer": 0,
        "num_workers": 0})
    batches = list(PretrainingDataset(config, load_tokenizer(tmp_path / "tokenizer"), batch_size=2, repeat=False))
    assert sum(b["samples"] for b in batches) == 3 and not any(b["skipped"] for b in batches)
    assert sorted(i for b in batches for i in b["image_ids"].tolist()) == sorted(stable_id(i) for i in "129")
    assert sum(len(b["image_index"]) for b in batches) == 2 + 1 + 1  # image 1 has two captions, the others one


def test_resize_rescales_region_and_relation_boxes(release, tmp_path):
    convert(conversion_of(release), tmp_path / "vg", options=WriteOptions(max_short_side=16))
    pretrain = {decode_json(s)["image_id"]: s for s in read_split(tmp_path / "vg", "pretrain")}
    record, _, image = decode_captioned_image(pretrain["1"])
    assert image.size == (24, 16) and (record["width"], record["height"]) == (24, 16)
    assert [r["box"] for r in record["regions"]] == [[1.0, 1.5, 11.0, 6.5], [15.0, 10.0, 24.0, 16.0]]
    relations = {decode_json(s)["image_id"]: decode_json(s) for s in read_split(tmp_path / "vg", "relations")}
    assert relations["1"]["relations"][0]["object"]["box"] == [0.0, 10.0, 24.0, 16.0]


def test_older_release_keys(tmp_path):
    """v1.0 wrote "id" for the image in image_data.json and for the region; the docs show "image_id" on top."""
    write_image(tmp_path / "VG_100K" / "10.jpg", WIDTH, HEIGHT)
    (tmp_path / "image_data.json").write_text(json.dumps([
        {"id": 10, "url": URL.format(folder="VG_100K", image_id=10), "width": WIDTH, "height": HEIGHT,
         "coco_id": None, "flickr_id": None}]))
    (tmp_path / "region_descriptions.json").write_text(json.dumps([
        {"image_id": 10, "regions": [{"id": 7, "image": 10, "phrase": "a hat", "x": 1, "y": 1, "width": 5,
                                      "height": 5}]}]))
    conversion = visual_genome_conversion(tmp_path / "image_data.json", tmp_path / "region_descriptions.json", tmp_path)
    manifest = convert(conversion, tmp_path / "out")
    assert manifest["splits"]["pretrain"]["samples"] == 1 and not manifest["problems"]
    record = decode_json(read_split(tmp_path / "out", "pretrain")[0])
    assert record["regions"] == [{"phrase": "a hat", "box": [1, 1, 6, 6], "region_id": 7}]


def test_bad_inputs_fail_before_any_work_naming_the_file(release, tmp_path):
    with pytest.raises(FileNotFoundError, match="region_descriptions.json"):
        conversion_of(release, region_descriptions=release / "region_descriptions.json.zip")
    (release / "dict.json").write_text(json.dumps({"regions": []}))
    with pytest.raises(ValueError, match="dict.json: expected a JSON list"):
        conversion_of(release, region_descriptions=release / "dict.json")
    (release / "objects.json").write_text(json.dumps([{"image_id": 1, "objects": []}]))
    with pytest.raises(ValueError, match="objects.json: .*'relationships' list"):
        conversion_of(release, relationships=release / "objects.json")
    with pytest.raises(ValueError, match="image_data.json: .*'regions' list"):
        conversion_of(release, region_descriptions=release / "image_data.json")
    with pytest.raises(ValueError, match="dataset_flickr30k.json holds the Karpathy split of 'flickr30k'"):
        conversion_of(release, exclude_coco=release / "dataset_flickr30k.json")
    with pytest.raises(ValueError, match="dataset_coco.json holds the Karpathy split of 'coco', not of 'flickr30k'"):
        conversion_of(release, exclude_flickr30k=release / "dataset_coco.json")
    assert not (tmp_path / "vg").exists()


def test_first_entry_reads_across_chunks(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(" \n[ " + json.dumps({"image_id": 1, "relationships": ["x" * 50]}) + ", {\"image_id\": 2}]")
    assert first_entry(path, "test", chunk_size=7) == {"image_id": 1, "relationships": ["x" * 50]}
    path.write_text("[]")
    assert first_entry(path, "test") is None
    path.write_text("[{\"image_id\": 1,")
    with pytest.raises(ValueError, match="ends before"):
        first_entry(path, "test", chunk_size=4)


def test_clip_box():
    assert clip_box(2, 3, 20, 10, 48, 32) == ([2, 3, 22, 13], False)
    assert clip_box(-4, 30, 10, 10, 48, 32) == ([0, 30, 6, 32], True)
    assert clip_box(5, 5, -3, 4, 48, 32) == (None, False)
    assert clip_box(50, 5, 3, 4, 48, 32) == (None, False)  # entirely outside
    assert clip_box(1, "2", 3, 4, 48, 32) == (None, False)


def test_command_line_in_parallel_and_resumed(release, tmp_path, capsys):
    argv = ["--root", str(release), "--relationships", str(release / "relationships.json"),
            "--exclude-coco", str(release / "dataset_coco.json"),
            "--exclude-flickr30k", str(release / "dataset_flickr30k.json"), "--out", str(tmp_path / "vg"),
            "--workers", "2", "--shard-size", "2", "--max-short-side", "16"]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "vg" / "manifest.json").read_text())
    assert problems_of(manifest, "pretrain") == PRETRAIN_PROBLEMS
    assert [len(manifest["splits"][s]["shards"]) for s in ("pretrain", "relations")] == [3, 3]  # 5 and 6 planned
    assert "excluded_overlap 2" in capsys.readouterr().out
    assert main(argv + ["--resume"]) == 0
    again = json.loads((tmp_path / "vg" / "manifest.json").read_text())
    assert again["resumed_shards"] == 6 and again["splits"] == manifest["splits"]  # the plan is deterministic
    with pytest.raises(SystemExit) as stopped:
        main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert stopped.value.code == 2 and "nowhere" in capsys.readouterr().err
