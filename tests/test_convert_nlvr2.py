import json
from pathlib import Path

import pytest
from convert_fixtures import read_split, write_corrupt_image, write_image, write_lines

from soho.cli.convert_nlvr2 import main
from soho.data.convert import convert
from soho.data.convert.nlvr2 import convert_nlvr2
from soho.data.tasks import TaskDataset, class_targets
from soho.processing import ImageTransformConfig
from soho.tasks.nlvr2 import NLVR2Task
from soho.tokenizer import train_wordpiece_tokenizer

decode_nlvr2 = NLVR2Task.decode

IMAGE = ImageTransformConfig(min_size=32, max_size=32, size_divisor=16)


def example(identifier, sentence, label, **extra):
    """One line as lil-lab/nlvr writes it (train.json adds "directory")."""
    return {"validation": {"56": label}, "sentence": sentence, "left_url": f"https://example.org/{identifier}/0.jpg",
            "writer": "103", "label": label, "right_url": f"https://example.org/{identifier}/1.jpg",
            "synset": "beer bottle", "query": "some beer bottles2", "identifier": identifier,
            "extra_validations": {"61": label, "62": label}, **extra}


def make_nlvr2(root: Path, test2: bool = False):
    """A few examples in the official layout, with every kind of problem planted once."""
    data, images = root / "nlvr" / "nlvr2" / "data", root / "nlvr2_images"
    write_lines(data / "train.json", [
        example("train-10171-0-0", "An image shows one leather pencil case.", "True", directory=11),
        example("train-10171-0-1", "Both images show pens.", "False", directory=11),
        example("train-3312-2-0", "There are two dogs in total.", "False", directory=40),
        example("train-77-1-0", "The left image has a cat.", "Maybe", directory=3),  # bad label
    ])
    write_lines(data / "dev.json", [
        example("dev-850-0-1", "The right image shows a red bus.", "True"),
        example("dev-850-0-0", "Neither image shows a bus.", "False"),
        example("dev-12-3-0", "A bird sits on a branch.", "True"),  # corrupt left image
        '{"validation": {"3": "True"}, "sentence": "cut off',  # line 4: not JSON
    ])
    with open(data / "dev.json", "ab") as stream:  # line 5: Latin-1, not UTF-8
        stream.write(json.dumps(example("dev-9-9-0", "A café.", "True"), ensure_ascii=False).encode("latin-1") + b"\n")
    write_lines(data / "test1.json", [
        example("test1-0-1-0", "Exactly three bottles are visible.", "True"),
        example("test1-5-2-1", "The left image is black and white.", "False"),  # right image missing
    ])
    train = images / "images" / "train"
    for pair, seed in (("11/train-10171-0", 0), ("40/train-3312-2", 2), ("3/train-77-1", 4)):
        write_image(train / f"{pair}-img0.png", seed=seed, format="PNG")
        write_image(train / f"{pair}-img1.png", seed=seed + 1, format="PNG")
    # "Despite the extension of .png, not all images are actually PNGs" (official README).
    write_image(train / "40" / "train-3312-2-img0.png", seed=2, format="JPEG")
    for pair, seed in (("dev/dev-850-0", 10), ("dev/dev-12-3", 12), ("test1/test1-0-1", 14), ("test1/test1-5-2", 16)):
        write_image(images / f"{pair}-img0.png", seed=seed, format="PNG")
        write_image(images / f"{pair}-img1.png", seed=seed + 1, format="PNG")
    write_corrupt_image(images / "dev" / "dev-12-3-img0.png")
    (images / "test1" / "test1-5-2-img1.png").unlink()
    if test2:
        write_lines(data / "test2.json", [example("test2-189-0-0", "All the bottles are from one brand.", "True")])
        write_image(images / "test2" / "test2-189-0-img0.png", 64, 40, seed=20, format="PNG")
        write_image(images / "test2" / "test2-189-0-img1.png", 40, 64, seed=21, format="PNG")
    return data, images


def test_converts_official_files_and_lists_every_planted_problem(tmp_path):
    data, images = make_nlvr2(tmp_path)
    manifest = convert(convert_nlvr2(data, images), tmp_path / "out", shard_size=2)
    splits = manifest["splits"]
    assert {s: (e["samples"], e["images"], e["dropped"]) for s, e in splits.items()} == {
        "nlvr2_train": (3, 6, 1), "nlvr2_dev": (2, 4, 3), "nlvr2_test1": (1, 2, 1)}
    assert all(e["task"] == "nlvr2" for e in splits.values())
    assert sorted((p["split"], p["key"], p["reason"]) for p in manifest["problems"]) == [
        ("nlvr2_dev", "dev-12-3-0", "corrupt_image"), ("nlvr2_dev", "dev.json:4", "bad_json"),
        ("nlvr2_dev", "dev.json:5", "bad_json"), ("nlvr2_test1", "test1-5-2-1", "missing_image"),
        ("nlvr2_train", "train-77-1-0", "bad_label")]
    details = {p["key"]: p["detail"] for p in manifest["problems"]}
    assert f"{data / 'dev.json'}:4" in details["dev.json:4"] and f"{data / 'train.json'}:4" in details["train-77-1-0"]
    assert details["dev.json:5"].startswith(f"{data / 'dev.json'}:5: not UTF-8")
    assert "test1-5-2-img1.png" in details["test1-5-2-1"]

    train = {s["__key__"]: s for s in read_split(tmp_path / "out", "nlvr2_train")}
    assert sorted(train) == ["train-10171-0-0", "train-10171-0-1", "train-3312-2-0"]
    assert {"left.jpg", "right.png"} <= set(train["train-3312-2-0"])  # stored under the real format
    record = json.loads(train["train-10171-0-1"]["json"])
    assert record["label"] is False and record["sentence"] == "Both images show pens."
    assert (record["left_id"], record["right_id"], record["source"]) == (
        "train-10171-0-img0", "train-10171-0-img1", "nlvr2")
    assert record["writer"] == "103" and record["query"] == "some beer bottles2"
    decoded = decode_nlvr2(train["train-10171-0-0"])
    assert decoded.target == 1 and [image.size for image in decoded.images] == [(48, 32), (48, 32)]

    tokenizer = train_wordpiece_tokenizer(
        [json.loads(s["json"])["sentence"] for s in train.values()] * 3, tmp_path / "tokenizer", vocab_size=120)
    batches = list(TaskDataset(str(tmp_path / "out" / "nlvr2_dev"), decode_nlvr2, tokenizer, IMAGE, 16, 4, train=False,
                               targets=class_targets))
    assert [b["example_ids"] for b in batches] == [["dev-850-0-1", "dev-850-0-0"]]
    assert batches[0]["labels"].tolist() == [1, 0] and batches[0]["pixel_values"].shape[0] == 4

    again = convert(convert_nlvr2(data, images), tmp_path / "out", shard_size=2, resume=True)
    assert again["resumed_shards"] == 5 and again["splits"] == splits


def test_command_line_adds_test2_when_present_and_resizes(tmp_path, capsys):
    data, images = make_nlvr2(tmp_path, test2=True)
    assert main(["--annotations", str(data), "--images", str(images), "--out", str(tmp_path / "out"),
                 "--workers", "1", "--max-short-side", "16"]) == 0
    assert "nlvr2_test2" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["nlvr2_test2"]["samples"] == 1
    decoded = decode_nlvr2(read_split(tmp_path / "out", "nlvr2_test2")[0])
    assert decoded.example_id == "test2-189-0-0" and decoded.target == 1
    assert [image.size for image in decoded.images] == [(26, 16), (16, 26)]


def test_bad_inputs_fail_before_any_work_naming_the_file(tmp_path, caplog):
    data, images = make_nlvr2(tmp_path)
    write_lines(data / "test2.json", [example("test2-189-0-0", "A sentence.", "True")])
    assert set(convert_nlvr2(data, images).splits) == {"nlvr2_train", "nlvr2_dev", "nlvr2_test1"}  # no test2/ images
    assert "not converting test2" in caplog.text
    with pytest.raises(FileNotFoundError, match="test2"):
        convert_nlvr2(data, images, ["test2"])
    with pytest.raises(ValueError, match="unknown NLVR2 split"):
        convert_nlvr2(data, images, ["val"])
    (data / "dev.json").unlink()
    with pytest.raises(FileNotFoundError, match="dev.json"):
        convert_nlvr2(data, images)
    # LXMERT-style re-packaging: one JSON array with other keys.
    (data / "dev.json").write_text(json.dumps([{"identifier": "dev-850-0-1", "sent": "s", "label": 1}], indent=4))
    with pytest.raises(ValueError, match="dev.json"):
        convert_nlvr2(data, images)
