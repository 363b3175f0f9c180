import json

import pytest
from convert_fixtures import read_split, write_corrupt_image, write_image

from soho.cli.convert_flickr30k import main
from soho.data.convert import convert
from soho.data.convert.karpathy import (
    coco_karpathy_conversion,
    flickr30k_karpathy_conversion,
    karpathy_image_splits,
)
from soho.data.pretraining import PretrainingDataConfig, PretrainingDataset
from soho.data.retrieval import read_retrieval_split
from soho.data.samples import decode_captioned_image
from soho.processing import ImageTransformConfig, SohoProcessor
from soho.tokenizer import train_wordpiece_tokenizer

COCO_SPLITS = ["retrieval_train", "retrieval_restval", "retrieval_val", "retrieval_test", "pretrain"]

# (split, cocoid, folder, number of captions, what the image file is)
COCO_IMAGES = [
    ("test", 391895, "val2014", 5, "ok"),
    ("test", 522418, "val2014", 6, "ok"),         # the 6th caption is cut in retrieval_test
    ("val", 184613, "val2014", 7, "ok"),          # two cut
    ("val", 318219, "val2014", 5, "corrupt"),
    ("train", 57870, "train2014", 5, "ok"),
    ("train", 384029, "train2014", 5, "missing"),
    ("restval", 60623, "val2014", 6, "ok"),       # restval keeps all six
    ("restval", 483108, "val2014", 0, "ok"),      # no sentences
]


def _sentences(imgid, count, first_sentid, subject):
    # Karpathy's "raw" keeps COCO's stray whitespace; "tokens" are lower-cased words.
    raws = [f"A photo of {subject} number {n}. " if n % 2 else f"  {subject} seen from angle {n}\n"
            for n in range(count)]
    return [{"tokens": raw.lower().replace(".", "").split(), "raw": raw, "imgid": imgid, "sentid": first_sentid + n}
            for n, raw in enumerate(raws)]


def _entry(imgid, split, filename, count, subject, **extra):
    sentences = _sentences(imgid, count, 1000 * imgid, subject)
    return {**extra, "sentids": [s["sentid"] for s in sentences], "filename": filename, "imgid": imgid,
            "split": split, "sentences": sentences}


def write_image_file(path, kind, seed):
    if kind == "ok":
        write_image(path, 48 + seed, 32, seed=seed)
    elif kind == "corrupt":
        write_corrupt_image(path)


@pytest.fixture
def coco(tmp_path):
    """dataset_coco.json as in caption_datasets.zip, and a COCO root with train2014/ and val2014/."""
    images = []
    for imgid, (split, cocoid, folder, count, kind) in enumerate(COCO_IMAGES):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        write_image_file(tmp_path / "coco" / folder / filename, kind, imgid)
        images.append(_entry(imgid, split, filename, count, f"coco {cocoid}", filepath=folder, cocoid=cocoid))
    path = tmp_path / "caption_datasets" / "dataset_coco.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path, tmp_path / "coco"


def decoded_split(root, split):
    return [decode_captioned_image(sample) for sample in read_split(root, split)]


def test_coco_splits_counts_and_exactly_the_planted_problems(coco, tmp_path):
    manifest = convert(coco_karpathy_conversion(*coco), tmp_path / "out", shard_size=2)
    assert list(manifest["splits"]) == sorted(COCO_SPLITS)
    assert {split: entry["samples"] for split, entry in manifest["splits"].items()} == {
        "retrieval_train": 1, "retrieval_restval": 1, "retrieval_val": 1, "retrieval_test": 2, "pretrain": 2}
    assert sorted((p["split"], p["key"], p["reason"]) for p in manifest["problems"]) == [
        ("pretrain", "384029", "missing_image"), ("pretrain", "483108", "no_captions"),
        ("retrieval_restval", "483108", "no_captions"), ("retrieval_train", "384029", "missing_image"),
        ("retrieval_val", "318219", "corrupt_image")]
    assert all(p["detail"] for p in manifest["problems"])
    assert manifest["captions_cut"] == {"retrieval_val": 2, "retrieval_test": 1}
    assert manifest["eval_captions_per_image"] == 5


def test_coco_records_keep_raw_captions_and_eval_splits_keep_five(coco, tmp_path):
    convert(coco_karpathy_conversion(*coco), tmp_path / "out")
    test = decoded_split(tmp_path / "out", "retrieval_test")
    assert [record["image_id"] for record, _, _ in test] == ["391895", "522418"]
    record, captions, image = test[1]
    assert captions == [s["raw"].strip() for s in _sentences(1, 5, 1000, "coco 522418")]
    assert captions[0] == "coco 522418 seen from angle 0" and captions[1] == "A photo of coco 522418 number 1."
    assert record["sentids"] == [1000, 1001, 1002, 1003, 1004]
    assert record["file"] == "val2014/COCO_val2014_000000522418.jpg" and record["karpathy_split"] == "test"
    assert record["source"] == "coco" and image.size == (record["width"], record["height"]) == (49, 32)
    assert [len(c) for _, c, _ in decoded_split(tmp_path / "out", "retrieval_val")] == [5]
    assert [len(c) for _, c, _ in decoded_split(tmp_path / "out", "retrieval_restval")] == [6]
    pretrain = decoded_split(tmp_path / "out", "pretrain")
    assert sorted((r["image_id"], r["karpathy_split"]) for r, _, _ in pretrain) == [("57870", "train"),
                                                                                    ("60623", "restval")]


def test_pretrain_leaves_out_every_karpathy_val_and_test_image(coco, tmp_path):
    karpathy_json, _ = coco
    assert set(karpathy_image_splits(karpathy_json, "coco")) == {391895, 522418, 184613, 318219}
    assert set(karpathy_image_splits(karpathy_json, "coco", ("restval",))) == {60623, 483108}
    with pytest.raises(ValueError, match="unknown or no Karpathy splits"):
        karpathy_image_splits(karpathy_json, "coco", ("testing",))
    convert(coco_karpathy_conversion(*coco, splits=["pretrain"]), tmp_path / "out")
    ids = {int(record["image_id"]) for record, _, _ in decoded_split(tmp_path / "out", "pretrain")}
    assert ids and not ids & set(karpathy_image_splits(karpathy_json, "coco"))


def test_shards_load_in_retrieval_and_pretraining(coco, tmp_path):
    karpathy_json, _ = coco
    convert(coco_karpathy_conversion(*coco, splits=["retrieval_test", "pretrain"]), tmp_path / "out")
    texts = [s["raw"] for entry in json.loads(karpathy_json.read_text())["images"] for s in entry["sentences"]]
    tokenizer = train_wordpiece_tokenizer(texts, tmp_path / "tokenizer", vocab_size=200)
    image = ImageTransformConfig(min_size=32, max_size=64, size_divisor=16)
    split = read_retrieval_split(str(tmp_path / "out" / "retrieval_test"), SohoProcessor(tokenizer, image, 24))
    assert split.image_ids == ["391895", "522418"] and len(split.captions) == 10 and not split.skipped
    assert split.text_image.tolist() == [0] * 5 + [1] * 5
    config = PretrainingDataConfig(shards=str(tmp_path / "out" / "pretrain"), image=image, max_text_length=24,
                                   captions_per_image=4, shuffle_buffer=0, num_workers=0)
    batches = list(PretrainingDataset(config, tokenizer, batch_size=4, repeat=False))
    assert sum(batch["samples"] for batch in batches) == 2 and batches[0]["input_ids"].shape[0] == 8


def test_bad_entries_are_listed_once_and_bad_files_fail_early(coco, tmp_path):
    karpathy_json, coco_root = coco
    data = json.loads(karpathy_json.read_text())
    data["images"][4].pop("cocoid")
    data["images"][2]["sentences"][3]["raw"] = "   "
    data["images"].append({"filename": "x.jpg", "split": "extra", "sentences": []})
    karpathy_json.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[4\] \(train\): 'cocoid' is None; it cannot be left out"):
        karpathy_image_splits(karpathy_json, "coco", ("train",))
    manifest = convert(coco_karpathy_conversion(karpathy_json, coco_root), tmp_path / "out")
    assert sorted((p["split"], p["reason"]) for p in manifest["problems"] if p["reason"] == "bad_record") == [
        ("pretrain", "bad_record"), ("retrieval_train", "bad_record"), ("retrieval_train", "bad_record"),
        ("retrieval_val", "bad_record")]
    details = " ".join(p["detail"] for p in manifest["problems"])
    assert "images[4]: 'cocoid' is None" in details and "images[8]: 'split' is 'extra'" in details
    assert "images[2]: sentence 3 has no 'raw' text" in details
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco_karpathy_conversion(tmp_path / "nope.json", coco_root)
    with pytest.raises(NotADirectoryError, match="no_images"):
        coco_karpathy_conversion(karpathy_json, tmp_path / "no_images")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="list.json: expected an object with an 'images' list"):
        coco_karpathy_conversion(tmp_path / "list.json", coco_root)
    with pytest.raises(ValueError, match="not of 'flickr30k'"):
        flickr30k_karpathy_conversion(karpathy_json, coco_root)
    with pytest.raises(ValueError, match="retrieval_restval"):
        flickr30k_karpathy_conversion(karpathy_json, coco_root, splits=["retrieval_restval"])


def test_flickr30k_command_line_with_resize(tmp_path, capsys):
    images = []
    plan = [("train", "1000092795", "ok"), ("train", "10002456", "ok"), ("train", "1000268201", "missing"),
            ("val", "1007129816", "ok"), ("test", "1009434119", "corrupt"), ("test", "101362133", "ok")]
    for imgid, (split, flickr_id, kind) in enumerate(plan):
        write_image_file(tmp_path / "flickr30k-images" / f"{flickr_id}.jpg", kind, imgid)
        images.append(_entry(imgid, split, f"{flickr_id}.jpg", 5, f"flickr {flickr_id}"))
    karpathy_json = tmp_path / "dataset_flickr30k.json"
    karpathy_json.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    # Flickr ids (file name stems) of val/test: what Visual Genome's pretrain split leaves out.
    assert karpathy_image_splits(karpathy_json, "flickr30k") == {1007129816: "val", 1009434119: "test",
                                                                 101362133: "test"}
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps({"images": [_entry(0, "test", "thumbnail.jpg", 5, "x")], "dataset": "flickr30k"}))
    with pytest.raises(ValueError, match=r"images\[0\] \(test\): 'filename' is 'thumbnail.jpg', not <flickr id>.jpg"):
        karpathy_image_splits(unnamed, "flickr30k")
    out = tmp_path / "flickr30k"
    main([
        "--karpathy-json", str(karpathy_json), "--images", str(tmp_path / "flickr30k-images"), "--out", str(out),
        "--workers", "1", "--max-short-side", "16"])
    assert "retrieval_train" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert {split: entry["samples"] for split, entry in manifest["splits"].items()} == {
        "pretrain": 2, "retrieval_test": 1, "retrieval_train": 2, "retrieval_val": 1}
    assert sorted((p["split"], p["key"], p["reason"]) for p in manifest["problems"]) == [
        ("pretrain", "1000268201", "missing_image"), ("retrieval_test", "1009434119", "corrupt_image"),
        ("retrieval_train", "1000268201", "missing_image")]
    assert manifest["captions_cut"] == {"retrieval_val": 0, "retrieval_test": 0}
    (record, captions, image), = decoded_split(out, "retrieval_val")
    assert record["image_id"] == "1007129816" and record["file"] == "1007129816.jpg" and len(captions) == 5
    assert record["source"] == "flickr30k" and image.size == (record["width"], record["height"]) == (26, 16)
    assert [r["image_id"] for r, _, _ in decoded_split(out, "pretrain")] == ["1000092795", "10002456"]

