import json
from pathlib import Path

import pytest
from convert_fixtures import read_split, write_corrupt_image, write_image, write_lines

from soho.cli.convert_snli_ve import main
from soho.data.convert import convert
from soho.data.convert.snli_ve import LABELS, convert_snli_ve
from soho.data.tasks import TaskDataset, class_targets
from soho.processing import ImageTransformConfig
from soho.tasks.ve import VisualEntailmentTask
from soho.tokenizer import train_wordpiece_tokenizer

VE_LABELS = VisualEntailmentTask.labels
decode_ve = VisualEntailmentTask.decode

IMAGE = ImageTransformConfig(min_size=32, max_size=32, size_divisor=16)


def example(image, caption, label, hypothesis, premise="A man in a red shirt rides a bike.", newer=False):
    """One line as snli_ve_generator.py writes it: SNLI's keys, sorted, plus the premise image.

    ``newer``: the generator under vet/tools/ writes ``Flickr30K_ID`` without ``.jpg``."""
    pair = f"{image}.jpg#{caption}r1{label[0] if label != '-' else 'n'}"
    line = {"Flickr30K_ID": image} if newer else {"Flikr30kID": f"{image}.jpg"}
    line.update({
        "annotator_labels": [label if label != "-" else "neutral", "entailment", "contradiction"],
        "captionID": f"{image}.jpg#{caption}", "gold_label": label, "pairID": pair,
        "sentence1": premise, "sentence1_binary_parse": "( ( A man ) ( rides ( a bike ) ) )",
        "sentence1_parse": "(ROOT (S (NP (DT A) (NN man)) (VP (VBZ rides) (NP (DT a) (NN bike)))))",
        "sentence2": hypothesis, "sentence2_binary_parse": "( ( A person ) ( is ( outdoors ) ) )",
        "sentence2_parse": "(ROOT (S (NP (DT A) (NN person)) (VP (VBZ is) (ADJP (JJ outdoors)))))"})
    return line


def make_snli_ve(root: Path):
    """A few hypotheses per image in the official files, with every kind of problem planted once."""
    data, images = root / "SNLI-VE" / "data", root / "flickr30k-images"
    write_lines(data / "snli_ve_train.jsonl", [
        example("2248275918", 1, "entailment", "A person is outdoors."),
        example("2248275918", 1, "neutral", "The man is going to work."),
        example("2248275918", 1, "contradiction", "The man is asleep in bed."),
        example("4718146904", 0, "-", "Two people talk."),  # no annotator consensus
        '{"Flikr30kID": "4718146904.jpg", "annotator_labels": ["neutral"], "captionID',  # line 5: not JSON
        example("4718146904", 2, "entailment", "People are near water."),
    ])
    write_lines(data / "snli_ve_dev.jsonl", [
        example("1000092795", 0, "entailment", "Some men are in a yard."),
        example("1000092795", 0, "neutral", "The men are brothers."),
        example("1000092795", 0, "contradiction", "The men are swimming."),
        example("3016178284", 3, "entailment", "A dog runs."),  # corrupt image
    ])
    write_lines(data / "snli_ve_test.jsonl", [
        example("1007129816", 4, "contradiction", "Nobody wears a hat.", newer=True),
        example("1007129816", 4, "entailment", "A man wears a hat.", newer=True),
        example("2194286203", 1, "neutral", "A girl is on holiday.", newer=True),  # missing image
    ])
    for seed, image in enumerate(("2248275918", "4718146904", "1000092795", "1007129816")):
        write_image(images / f"{image}.jpg", seed=seed)
    write_corrupt_image(images / "3016178284.jpg")
    return data, images


def test_converts_official_files_and_lists_every_planted_problem(tmp_path):
    data, images = make_snli_ve(tmp_path)
    manifest = convert(convert_snli_ve(data, images), tmp_path / "out", shard_size=2)
    splits = manifest["splits"]
    assert {s: (e["samples"], e["images"], e["dropped"]) for s, e in splits.items()} == {
        "ve_train": (4, 4, 2), "ve_dev": (3, 3, 1), "ve_test": (2, 2, 1)}
    assert all(e["task"] == "ve" for e in splits.values())
    assert sorted((p["split"], p["key"], p["reason"]) for p in manifest["problems"]) == [
        ("ve_dev", "3016178284_jpg_3r1e", "corrupt_image"), ("ve_test", "2194286203_jpg_1r1n", "missing_image"),
        ("ve_train", "4718146904_jpg_0r1n", "no_gold_label"), ("ve_train", "snli_ve_train.jsonl:5", "bad_json")]
    details = {p["key"]: p["detail"] for p in manifest["problems"]}
    assert f"{data / 'snli_ve_train.jsonl'}:4" in details["4718146904_jpg_0r1n"]
    assert "2194286203.jpg" in details["2194286203_jpg_1r1n"]

    train = {s["__key__"]: s for s in read_split(tmp_path / "out", "ve_train")}
    assert sorted(train) == ["2248275918_jpg_1r1c", "2248275918_jpg_1r1e", "2248275918_jpg_1r1n",
                             "4718146904_jpg_2r1e"]
    record = json.loads(train["2248275918_jpg_1r1n"]["json"])
    assert record == {"pair_id": "2248275918.jpg#1r1n", "image_id": "2248275918",
                      "hypothesis": "The man is going to work.", "label": "neutral",
                      "premise": "A man in a red shirt rides a bike.", "source": "snli_ve",
                      "caption_id": "2248275918.jpg#1", "annotator_labels": ["neutral", "entailment", "contradiction"],
                      "width": 48, "height": 32}
    assert train["2248275918_jpg_1r1n"]["jpg"] == (images / "2248275918.jpg").read_bytes()
    test = [decode_ve(s) for s in read_split(tmp_path / "out", "ve_test")]  # the newer generator's key
    assert [(e.example_id, e.target, e.info["image_id"]) for e in test] == [
        ("1007129816.jpg#4r1c", 2, "1007129816"), ("1007129816.jpg#4r1e", 0, "1007129816")]

    tokenizer = train_wordpiece_tokenizer(
        [json.loads(s["json"])["hypothesis"] for s in train.values()] * 3, tmp_path / "tokenizer", vocab_size=120)
    batches = list(TaskDataset(str(tmp_path / "out" / "ve_dev"), decode_ve, tokenizer, IMAGE, 16, 4, train=False,
                               targets=class_targets))
    assert [b["example_ids"] for b in batches] == [
        ["1000092795.jpg#0r1e", "1000092795.jpg#0r1n", "1000092795.jpg#0r1c"]]
    assert batches[0]["labels"].tolist() == [0, 1, 2] and batches[0]["pixel_values"].shape[0] == 3


def test_command_line_resizes(tmp_path, capsys):
    data, images = make_snli_ve(tmp_path)
    assert main(["--annotations", str(data), "--images", str(images), "--out", str(tmp_path / "out"),
                 "--workers", "2", "--max-short-side", "16", "--splits", "dev"]) == 0
    assert "ve_dev" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["ve_dev"] and manifest["splits"]["ve_dev"]["samples"] == 3
    sample = read_split(tmp_path / "out", "ve_dev")[0]
    record = json.loads(sample["json"])
    assert decode_ve(sample).images[0].size == (24, 16) and (record["width"], record["height"]) == (24, 16)


def test_bad_inputs_fail_before_any_work_naming_the_file(tmp_path):
    data, images = make_snli_ve(tmp_path)
    assert LABELS == VE_LABELS
    with pytest.raises(ValueError, match="unknown SNLI-VE split"):
        convert_snli_ve(data, images, ["val"])
    with pytest.raises(FileNotFoundError, match="flickr30k"):
        convert_snli_ve(data, tmp_path / "nowhere")
    # SNLI's own file: the same keys but no premise image.
    snli = {k: v for k, v in example("1000092795", 0, "entailment", "x").items() if k != "Flikr30kID"}
    write_lines(data / "snli_ve_dev.jsonl", [snli])
    with pytest.raises(ValueError, match="snli_ve_dev.jsonl"):
        convert_snli_ve(data, images)
    (data / "snli_ve_dev.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="snli_ve_dev.jsonl"):
        convert_snli_ve(data, images)
