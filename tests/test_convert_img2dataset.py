import json
from pathlib import Path

import pytest
import webdataset as wds
from convert_fixtures import read_split, write_corrupt_image, write_image

from soho.cli.convert_img2dataset import main
from soho.data.convert import convert
from soho.data.convert.img2dataset import convert_img2dataset
from soho.data.pretraining import PretrainingDataConfig, PretrainingDataset
from soho.data.samples import decode_captioned_image
from soho.processing import ImageTransformConfig
from soho.tokenizer import train_wordpiece_tokenizer

IMAGE = ImageTransformConfig(min_size=32, max_size=32, size_divisor=16)
CAPTIONS = {
    "000000000": "a very typical bus station",
    "000000002": "actor attends the premiere of the film",
    "000010000": "the view from the top of the mountain",
    "000010002": "person and football player celebrate",
    "000020000": "sierra nevada mountains at sunset",
}


def meta(key, caption, width=48, height=32):
    """The .json img2dataset writes next to every downloaded image (default options: exif and sha256)."""
    return {"url": f"http://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
            "error_message": None, "width": width, "height": height, "original_width": width * 4,
            "original_height": height * 4, "exif": "{}", "sha256": "0" * 64}


def write_shard(folder: Path, shard: int, samples, stats=None):
    """``samples``: (key, image bytes or None, .txt caption or None, .json caption) as img2dataset's
    WebDatasetSampleWriter writes them (json with indent=4, txt always present with --caption_col)."""
    with open(folder / f"{shard:05d}.tar", "wb") as stream:
        writer = wds.TarWriter(stream)
        for key, image, text, caption in samples:
            sample = {"__key__": key, "json": json.dumps(meta(key, caption), indent=4)}
            if image is not None:
                sample["jpg"] = image
            if text is not None:
                sample["txt"] = text
            writer.write(sample)
        writer.close()
    if stats is not None:
        count, failed_to_download, failed_to_resize = stats
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({
            "count": count, "successes": count - failed_to_download - failed_to_resize,
            "failed_to_download": failed_to_download, "failed_to_resize": failed_to_resize, "duration": 12.5,
            "start_time": 1700000000.0, "end_time": 1700000012.5,
            "status_dict": {"success": count - failed_to_download - failed_to_resize,
                            "<urlopen error [Errno -2] Name or service not known>": failed_to_download,
                            "image decoding error": failed_to_resize}}, indent=4))


def make_img2dataset(root: Path) -> Path:
    """Three shards: the first two finished (with stats), the third cut off mid-image without stats.
    Planted: a corrupt image, a sample without image, one without any caption, one whose .txt is empty
    (its .json caption is used)."""
    folder = root / "cc3m"
    folder.mkdir(parents=True)

    def jpeg(seed):
        return write_image(root / "images" / f"{seed}.jpg", seed=seed).read_bytes()

    corrupt = write_corrupt_image(root / "images" / "corrupt.jpg").read_bytes()
    write_shard(folder, 0, [
        ("000000000", jpeg(0), CAPTIONS["000000000"], CAPTIONS["000000000"]),
        ("000000001", corrupt, "a corrupt image", "a corrupt image"),
        ("000000002", jpeg(2), "", CAPTIONS["000000002"]),
        ("000000004", None, "an image that is not there", "an image that is not there"),
    ], stats=(6, 2, 0))
    write_shard(folder, 1, [
        ("000010000", jpeg(3), CAPTIONS["000010000"], CAPTIONS["000010000"]),
        ("000010001", jpeg(4), "", None),
        ("000010002", jpeg(5), CAPTIONS["000010002"], CAPTIONS["000010002"]),
    ], stats=(5, 1, 1))
    write_shard(folder, 2, [
        ("000020000", jpeg(6), CAPTIONS["000020000"], CAPTIONS["000020000"]),
        ("000020001", jpeg(7), "a cut off image", "a cut off image"),
        ("000020002", jpeg(8), "never reached", "never reached"),
    ])
    cut = folder / "00002.tar"
    data = cut.read_bytes()
    cut.write_bytes(data[:data.index(jpeg(7)) + 200])  # inside the second sample's image
    return folder


def test_reshards_lists_planted_problems_and_loads(tmp_path):
    folder = make_img2dataset(tmp_path)
    out = tmp_path / "out"
    manifest = convert(convert_img2dataset(folder, "cc3m"), out, shard_size=2)
    assert manifest["splits"]["pretrain"]["samples"] == 5
    assert sorted((p["key"], p["reason"]) for p in manifest["problems"]) == [
        ("000000001", "corrupt_image"), ("000000004", "missing_image"), ("000010001", "missing_caption"),
        ("00002.tar", "truncated_tar"), ("000020001", "corrupt_image")]
    assert all(p["split"] == "pretrain" and p["detail"] for p in manifest["problems"])
    assert manifest["img2dataset"] == {
        "folder": str(folder), "tars": 3, "stats_files": 2, "count": 11, "successes": 7, "failed_to_download": 3,
        "failed_to_resize": 1, "not_downloaded": 4,
        "most_common_failures": {"<urlopen error [Errno -2] Name or service not known>": 3,
                                 "image decoding error": 1},
        "tars_without_stats": ["00002.tar"], "stats_without_tar": []}

    samples = read_split(out, "pretrain")
    decoded = {s["__key__"]: decode_captioned_image(s) for s in samples}
    assert {key: captions for key, (_, captions, _) in decoded.items()} == {k: [c] for k, c in CAPTIONS.items()}
    record, _, image = decoded["000000002"]  # .txt was empty: caption from the .json
    assert record == {"image_id": "000000002", "captions": [CAPTIONS["000000002"]], "source": "cc3m",
                      "url": "http://example.com/000000002.jpg", "width": 48, "height": 32}
    assert samples[0]["jpg"] == (tmp_path / "images" / "0.jpg").read_bytes()  # bytes read by offset, unchanged

    tokenizer = train_wordpiece_tokenizer(CAPTIONS.values(), tmp_path / "tokenizer", vocab_size=120)
    config = PretrainingDataConfig(shards=str(out / "pretrain"), image=IMAGE, captions_per_image=1,
                                   shuffle_buffer=0, num_workers=0)
    batches = list(PretrainingDataset(config, tokenizer, batch_size=8, repeat=False))
    assert sum(b["samples"] for b in batches) == 5 and not any(b["skipped"] for b in batches)
    assert batches[0]["pixel_values"].shape == (5, 3, 32, 32)


def test_stats_mismatch_and_unreadable_tars_are_problems(tmp_path):
    folder = tmp_path / "sbu"
    folder.mkdir()
    write_shard(folder, 0, [("000000000", write_image(tmp_path / "a.jpg").read_bytes(), "a caption", "a caption")],
                stats=(4, 1, 1))  # the stats count 2 images written, the tar holds 1
    (folder / "00001.tar").write_bytes(b"this is not a tar file" * 40)
    manifest = convert(convert_img2dataset(folder, "sbu"), tmp_path / "out")
    assert sorted((p["key"], p["reason"]) for p in manifest["problems"]) == [
        ("00000.tar", "sample_count_mismatch"), ("00001.tar", "unreadable_tar")]
    assert manifest["splits"]["pretrain"]["samples"] == 1


def test_cli_resizes_and_names_the_source(tmp_path):
    folder = make_img2dataset(tmp_path)
    out = tmp_path / "out"
    assert main(["--input", str(folder), "--source", "sbu", "--out", str(out), "--max-short-side", "16",
                 "--workers", "2", "--shard-size", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["pretrain"]["samples"] == 5 and manifest["img2dataset"]["not_downloaded"] == 4
    record, _, image = decode_captioned_image(read_split(out, "pretrain")[0])
    assert record["source"] == "sbu" and image.size == (24, 16) == (record["width"], record["height"])


def test_bad_inputs_fail_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_img2dataset(tmp_path / "nowhere", "cc3m")
    with pytest.raises(FileNotFoundError, match="--output_format webdataset"):
        convert_img2dataset(tmp_path, "cc3m")
    write_shard(tmp_path, 0, [], stats=(1, 1, 0))
    with pytest.raises(ValueError, match="source"):
        convert_img2dataset(tmp_path, "")
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 1}))
    with pytest.raises(ValueError, match="00000_stats.json: expected img2dataset's shard stats"):
        convert_img2dataset(tmp_path, "cc3m")
