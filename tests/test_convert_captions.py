import json
from pathlib import Path

import pytest
from convert_fixtures import read_split, write_corrupt_image, write_image, write_lines

from soho.cli.convert_captions import main
from soho.cli.pretrain import main as pretrain
from soho.data.convert import convert
from soho.data.convert.captions import captions_conversion
from soho.data.pretraining import PretrainingDataConfig, PretrainingDataset
from soho.data.samples import decode_captioned_image
from soho.models.soho import SohoForPretraining
from soho.processing import ImageTransformConfig, SohoProcessor
from soho.tokenizer import train_wordpiece_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# configs/pretrain/captions.yaml at unit-test size: tiny CNN and encoder, no local weights, a tokenizer
# trained in the test, 64 px images (a 4 x 4 grid), two steps on one CPU.
TINY_PRETRAINING = [
    "model.backbone.name=resnet10t", "model.backbone.pretrained_path=null", "model.backbone.out_index=3",
    "model.backbone.extra_pool=1", "model.backbone.frozen_stages=1", "model.backbone.gradient_checkpointing=false",
    "model.encoder.pretrained_path=null", "model.encoder.vocab_size=100", "model.encoder.hidden_size=32",
    "model.encoder.num_hidden_layers=2", "model.encoder.num_attention_heads=4", "model.encoder.intermediate_size=64",
    "model.encoder.max_position_embeddings=40", "model.visual_dictionary.size=16", "data.image.min_size=64",
    "data.image.max_size=64", "data.image.size_divisor=16", "data.num_workers=0", "data.shuffle_buffer=4",
    "optim.warmup_steps=1", "train.max_steps=2", "train.batch_size=2", "train.log_every=1", "train.save_every=0",
    'train.mixed_precision="no"',
]

CSV = '''path,caption,split
dogs/rex.jpg,a brown dog on the grass,train
dogs/rex.jpg,"a dog, lying down",train
cats/tom.png,a grey cat asleep,train
cats/tom.png,a cat on a sofa,val
birds/kiwi.jpg,a small bird,val
birds/kiwi.jpg,,val
gone.jpg,an image that is not there,train
broken.jpg,a corrupt image,train
dogs/rex.jpg,a dog, unquoted,train
,a caption without an image,train
birds/kiwi.jpg,a bird in a tree,test set
'''


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "photos"
    write_image(images / "dogs" / "rex.jpg", seed=1)
    write_image(images / "cats" / "tom.png", seed=2, format="PNG")
    write_image(images / "birds" / "kiwi.jpg", seed=3)
    write_corrupt_image(images / "broken.jpg")
    return images


def test_csv_with_splits_lists_every_unusable_row(folder, tmp_path):
    (tmp_path / "captions.csv").write_text(CSV)
    manifest = convert(captions_conversion(folder, tmp_path / "captions.csv"), tmp_path / "out", shard_size=2)
    assert {split: entry["samples"] for split, entry in manifest["splits"].items()} == {"train": 2, "val": 1}
    assert sorted((p["split"], p["key"], p["reason"]) for p in manifest["problems"]) == [
        ("train", "broken_jpg", "corrupt_image"),
        ("train", "captions.csv:10", "bad_record"),      # an unquoted comma: four fields
        ("train", "captions.csv:11", "bad_record"),      # no image path
        ("train", "captions.csv:12", "bad_split"),
        ("train", "gone_jpg", "missing_image"),
        ("val", "captions.csv:5", "split_conflict"),     # tom.png is in train already
        ("val", "captions.csv:7", "missing_caption"),
    ]
    assert all(str(tmp_path) in p["detail"] or p["reason"] == "corrupt_image" for p in manifest["problems"])
    assert manifest["caption_rows"] == 11 and manifest["captions"] == {"train": 5, "val": 1}
    assert manifest["converter"] == "captions" and manifest["inputs"]["source"] == "captions"

    records = {s["__key__"]: decode_captioned_image(s)[0] for s in read_split(tmp_path / "out", "train")}
    assert records["dogs_rex_jpg"] == {"image_id": "dogs/rex.jpg", "source": "captions", "width": 48, "height": 32,
                                       "captions": ["a brown dog on the grass", "a dog, lying down"]}
    assert records["cats_tom_png"]["captions"] == ["a grey cat asleep"]
    [(_, val)] = [(s["__key__"], decode_captioned_image(s)[0]) for s in read_split(tmp_path / "out", "val")]
    assert val["image_id"] == "birds/kiwi.jpg" and val["captions"] == ["a small bird"]


def test_tsv_with_open_clip_columns_absolute_paths_and_a_default_split(folder, tmp_path):
    rows = ["filepath\ttitle", f"{folder / 'dogs' / 'rex.jpg'}\ta dog", "cats/tom.png\ta cat\t"]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    manifest = convert(captions_conversion(folder, tmp_path / "train.tsv", source="mine", default_split="pretrain",
                                           image_key="filepath", caption_key="title"), tmp_path / "out")
    assert manifest["splits"]["pretrain"]["samples"] == 1
    assert [p["reason"] for p in manifest["problems"]] == ["bad_record"]  # a third field the header lacks
    [sample] = read_split(tmp_path / "out", "pretrain")
    record, captions, image = decode_captioned_image(sample)
    assert record["image_id"] == str(folder / "dogs" / "rex.jpg") and record["source"] == "mine"
    assert captions == ["a dog"] and image.size == (48, 32)


def test_json_lines_and_lavis_json_take_lists_of_captions(folder, tmp_path):
    write_lines(tmp_path / "captions.jsonl", [
        {"image": "dogs/rex.jpg", "caption": ["a dog", "a brown dog"]},
        "{not json",
        {"image": "cats/tom.png", "caption": 7},
        {"image": "dogs/rex.jpg", "caption": "a dog outside"},
    ])
    manifest = convert(captions_conversion(folder, tmp_path / "captions.jsonl", image_key="image"), tmp_path / "jl")
    assert sorted((p["key"], p["reason"]) for p in manifest["problems"]) == [
        ("captions.jsonl:2", "bad_json"), ("captions.jsonl:3", "bad_record")]
    [sample] = read_split(tmp_path / "jl", "pretrain")
    assert decode_captioned_image(sample)[1] == ["a dog", "a brown dog", "a dog outside"]

    lavis = [{"image": "cats/tom.png", "caption": "a cat", "image_id": "coco_1"}, "a string",
             {"image": "birds/kiwi.jpg", "caption": "a bird", "image_id": "coco_2"}]
    (tmp_path / "coco_karpathy_train.json").write_text(json.dumps(lavis))
    manifest = convert(captions_conversion(folder, tmp_path / "coco_karpathy_train.json", image_key="image"),
                       tmp_path / "lavis")
    assert manifest["splits"]["pretrain"]["samples"] == 2
    assert [(p["key"], p["reason"]) for p in manifest["problems"]] == [("coco_karpathy_train.json_1", "bad_record")]


def test_bad_inputs_fail_before_any_work(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        captions_conversion(folder, tmp_path / "none.csv")
    (tmp_path / "captions.txt").write_text("path,caption\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        captions_conversion(folder, tmp_path / "captions.txt")
    (tmp_path / "open_clip.csv").write_text("filepath\ttitle\ndogs/rex.jpg\ta dog\n")
    with pytest.raises(ValueError, match=r"no column 'path' or 'caption' in the header \(columns: filepath\ttitle\)"):
        captions_conversion(folder, tmp_path / "open_clip.csv")
    (tmp_path / "empty.csv").write_text("path,caption\n,\n")
    with pytest.raises(ValueError, match="empty.csv: no caption rows"):
        captions_conversion(folder, tmp_path / "empty.csv")
    (tmp_path / "unusable.csv").write_text("path,caption\ndogs/rex.jpg,\n")
    with pytest.raises(ValueError, match="none of its 1 rows is usable .*unusable.csv:2: dogs/rex.jpg has an empty"):
        captions_conversion(folder, tmp_path / "unusable.csv")
    (tmp_path / "object.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="expected a JSON array"):
        captions_conversion(folder, tmp_path / "object.json")
    with pytest.raises(NotADirectoryError, match="image folder not found"):
        captions_conversion(tmp_path / "nowhere", tmp_path / "empty.csv")


def test_cli_converts_and_the_shards_pre_train(folder, tmp_path, capsys):
    (tmp_path / "captions.csv").write_text(CSV)
    out = tmp_path / "out"
    assert main(["--images", str(folder), "--captions", str(tmp_path / "captions.csv"), "--out", str(out),
                 "--workers", "2", "--max-short-side", "16"]) == 0
    assert "every dropped record is listed" in capsys.readouterr().out
    record, captions, image = decode_captioned_image(read_split(out, "train")[0])
    assert image.size == (24, 16) == (record["width"], record["height"])

    tokenizer = train_wordpiece_tokenizer([c for line in CSV.splitlines() for c in line.split(",")[1:2]],
                                          tmp_path / "tokenizer", vocab_size=100)
    config = PretrainingDataConfig(shards=str(out / "train"), image=ImageTransformConfig(32, 32, 16),
                                   captions_per_image=2, shuffle_buffer=0, num_workers=0)
    batches = list(PretrainingDataset(config, tokenizer, batch_size=4, repeat=False))
    assert sum(b["samples"] for b in batches) == 2 and batches[0]["input_ids"].shape[0] == 3

    with pytest.raises(SystemExit) as stopped:
        main(["--images", str(folder), "--captions", str(tmp_path / "captions.csv"), "--out", str(out),
              "--caption-key", "title"])
    assert stopped.value.code == 2
    assert "no column 'title' in the header (columns: path, caption, split)" in capsys.readouterr().err


def test_readme_bring_your_own_data_in_two_commands(folder, tmp_path):
    """README: soho-convert-captions, then soho-pretrain --config configs/pretrain/captions.yaml."""
    (tmp_path / "captions.csv").write_text(CSV)
    out = tmp_path / "data" / "captions"
    assert main(["--images", str(folder), "--captions", str(tmp_path / "captions.csv"), "--out", str(out)]) == 0
    tokenizer = train_wordpiece_tokenizer(["a brown dog on the grass", "a grey cat asleep", "a small bird"],
                                          tmp_path / "tokenizer", vocab_size=100)
    run = tmp_path / "runs" / "captions"
    assert pretrain(["--config", str(ROOT / "configs" / "pretrain" / "captions.yaml"), *TINY_PRETRAINING,
                     f"data.shards={out / 'train'}", f"data.eval_shards={{val: {out / 'val'}}}",
                     f"data.tokenizer={tmp_path / 'tokenizer'}", f"train.output_dir={run}"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and 0.0 <= results["splits"]["val"]["metrics"]["itc_acc"] <= 1.0
    assert SohoForPretraining.from_pretrained(run / "pretrained").config.itc.enabled
    assert len(SohoProcessor.from_pretrained(run / "pretrained").tokenizer) == len(tokenizer)
