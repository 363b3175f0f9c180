import importlib
import io
import json
import tarfile

import pytest
from convert_fixtures import read_split, write_corrupt_image, write_image
from PIL import Image

from soho.data.convert import Conversion, Problem, Sample, TarMember, WriteOptions, convert, safe_key
from soho.data.convert.writer import EncodedImage
from soho.data.samples import decode_captioned_image


def _samples(tmp_path, count=5):
    items = []
    for i in range(count):
        path = write_image(tmp_path / "images" / f"{i}.jpg", 40 + i, 30, seed=i)
        record = {"image_id": str(i), "captions": [f"image {i}"], "regions": [{"box": [4.0, 6.0, 20.0, 30.0]}]}
        items.append(Sample(f"img-{i}", record, {"": path}))
    return items


def test_writes_shards_manifest_and_lists_every_problem(tmp_path):
    items = _samples(tmp_path)
    items.insert(2, Problem("img-x", "missing_caption", "no sentences"))
    items.append(Sample("img-missing", {"image_id": "m", "captions": ["c"]}, {"": tmp_path / "nope.jpg"}))
    items.append(Sample("img-corrupt", {"image_id": "c", "captions": ["c"]},
                        {"": write_corrupt_image(tmp_path / "bad.jpg")}))
    items.append(Sample("img-0", {"image_id": "again", "captions": ["c"]}, {"": items[0].images[""]}))
    conversion = Conversion("test", {"pretrain": items}, {"pretrain": "image_text"}, inputs={"root": "x"})
    manifest = convert(conversion, tmp_path / "out", shard_size=2)
    entry = manifest["splits"]["pretrain"]
    assert entry["samples"] == 5 and entry["images"] == 5 and entry["dropped"] == 4
    assert entry["problems"] == {"missing_caption": 1, "missing_image": 1, "corrupt_image": 1, "duplicate_key": 1}
    assert sorted(p["key"] for p in manifest["problems"]) == ["img-0", "img-corrupt", "img-missing", "img-x"]
    assert all(p["split"] == "pretrain" and p["detail"] for p in manifest["problems"])
    assert len(entry["shards"]) == 4  # 7 planned samples in shards of 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"] == manifest["splits"]
    samples = read_split(tmp_path / "out", "pretrain")
    assert [s["__key__"] for s in samples] == [f"img-{i}" for i in range(5)]
    record, captions, image = decode_captioned_image(samples[3])
    assert captions == ["image 3"] and image.size == (43, 30) and (record["width"], record["height"]) == (43, 30)
    assert samples[3]["jpg"] == (tmp_path / "images" / "3.jpg").read_bytes()  # within the caps: bytes kept


def test_resize_keeps_aspect_and_rescales_boxes(tmp_path):
    path = write_image(tmp_path / "big.png", 200, 100, format="PNG")
    items = [Sample("a", {"captions": ["x"], "objects": [{"box": [10, 20, 100, 60]}]}, {"": path})]
    convert(Conversion("test", {"s": items}, {"s": "image_text"}), tmp_path / "out",
            options=WriteOptions(max_short_side=50))
    sample = read_split(tmp_path / "out", "s")[0]
    record, _, image = decode_captioned_image(sample)
    assert image.size == (100, 50) and (record["width"], record["height"]) == (100, 50)
    assert record["objects"][0]["box"] == [5.0, 10.0, 50.0, 30.0]
    assert "jpg" in sample  # resized images are re-encoded as JPEG


def test_boxes_scale_per_axis_when_rounding_differs(tmp_path):
    path = write_image(tmp_path / "odd.jpg", 51, 32)
    items = [Sample("a", {"captions": ["x"], "box": [0, 0, 51, 32]}, {"": path})]
    convert(Conversion("test", {"s": items}, {"s": "image_text"}), tmp_path / "out",
            options=WriteOptions(max_short_side=16))
    record, _, image = decode_captioned_image(read_split(tmp_path / "out", "s")[0])
    assert image.size == (26, 16) and record["box"] == [0.0, 0.0, 26.0, 16.0]


def test_cmyk_tiff_is_stored_as_rgb_png(tmp_path):
    path = tmp_path / "cmyk.tif"
    Image.open(write_image(tmp_path / "rgb.png", format="PNG")).convert("CMYK").save(path, format="TIFF")
    convert(Conversion("test", {"s": [Sample("a", {"captions": ["x"]}, {"": path})]}, {"s": "image_text"}),
            tmp_path / "out")
    sample = read_split(tmp_path / "out", "s")[0]
    assert "png" in sample and decode_captioned_image(sample)[2].size == (48, 32)


def test_long_side_cap_and_other_formats(tmp_path):
    path = write_image(tmp_path / "wide.bmp", 300, 60, format="BMP")
    items = [Sample("a", {"captions": ["x"]}, {"": path}), Sample("b", {"captions": ["y"]}, {"": path})]
    convert(Conversion("test", {"s": items}, {"s": "image_text"}), tmp_path / "kept")
    assert "png" in read_split(tmp_path / "kept", "s")[0]  # BMP is not read by the loaders: stored as PNG
    convert(Conversion("test", {"s": items}, {"s": "image_text"}), tmp_path / "capped",
            options=WriteOptions(max_short_side=50, max_long_side=100))
    record, _, image = decode_captioned_image(read_split(tmp_path / "capped", "s")[0])
    assert image.size == (100, 20)


def test_pair_slots_and_tar_members(tmp_path):
    left = write_image(tmp_path / "l.png", format="PNG")
    inner = tmp_path / "inner.tar"
    with tarfile.open(inner, "w") as tar:
        tar.add(write_image(tmp_path / "r.jpg", seed=3), arcname="000.jpg")
    with tarfile.open(inner) as tar:
        info = tar.getmember("000.jpg")
    right = TarMember(str(inner), info.name, info.offset_data, info.size)
    items = [Sample("p", {"sentence": "s"}, {"left": left, "right": right})]
    convert(Conversion("test", {"n": items}, {"n": "nlvr2"}), tmp_path / "out")
    sample = read_split(tmp_path / "out", "n")[0]
    assert sample["left.png"] == left.read_bytes() and sample["right.jpg"] == (tmp_path / "r.jpg").read_bytes()
    assert "width" not in json.loads(sample["json"])


def test_encoded_images_are_stored_as_given_and_their_records_left_alone(tmp_path):
    data = write_image(tmp_path / "a.png", format="PNG").read_bytes()
    record = {"captions": ["x"], "box": [0, 0, 48, 32]}
    right = write_image(tmp_path / "r.jpg")
    items = [Sample("a", record, {"": EncodedImage(data, "png")}),
             Sample("p", {"sentence": "s"}, {"left": EncodedImage(data, "png"), "right": right})]
    manifest = convert(Conversion("test", {"s": items}, {"s": "image_text"}), tmp_path / "out",
                       options=WriteOptions(max_short_side=16))
    single, pair = read_split(tmp_path / "out", "s")
    assert single["png"] == data and json.loads(single["json"]) == record  # not resized, no width/height added
    assert pair["left.png"] == data and Image.open(io.BytesIO(pair["right.jpg"])).size == (24, 16)  # files still are
    assert manifest["splits"]["s"]["images"] == 3
    with pytest.raises(ValueError, match="extension"):
        EncodedImage(data, "bmp")


def test_resume_keeps_finished_shards_and_rewrites_changed_ones(tmp_path):
    items = _samples(tmp_path, 6)
    first = convert(Conversion("test", {"s": items}, {"s": "image_text"}), tmp_path / "out", shard_size=2)
    shard = tmp_path / "out" / "s" / "s-000001.tar"
    shard.write_bytes(b"damaged")
    items[4].record["captions"] = ["changed"]
    again = convert(Conversion("test", {"s": items}, {"s": "image_text"}), tmp_path / "out", shard_size=2,
                    resume=True)
    assert again["resumed_shards"] == 1  # shard 0 kept; 1 damaged, 2 changed plan
    assert again["splits"]["s"]["shards"][:2] == first["splits"]["s"]["shards"][:2]
    assert json.loads(read_split(tmp_path / "out", "s")[4]["json"])["captions"] == ["changed"]
    smaller = convert(Conversion("test", {"s": items[:2]}, {"s": "image_text"}), tmp_path / "out", shard_size=2,
                      resume=True)
    assert smaller["resumed_shards"] == 1
    assert sorted(p.name for p in (tmp_path / "out" / "s").iterdir()) == ["s-000000.tar", "s-000000.tar.json"]


def test_parallel_workers_write_the_same_bytes(tmp_path):
    items = _samples(tmp_path, 7)
    one = convert(Conversion("test", {"s": items}, {"s": "image_text"}), tmp_path / "one", shard_size=2)
    two = convert(Conversion("test", {"s": items}, {"s": "image_text"}), tmp_path / "two", shard_size=2, workers=2)
    assert one["splits"] == two["splits"]


def test_safe_key_and_bad_shard_size(tmp_path):
    assert safe_key("2248275918.jpg#1r1e") == "2248275918_jpg_1r1e"
    with pytest.raises(ValueError, match="shard_size"):
        convert(Conversion("test", {}, {}), tmp_path, shard_size=0)


SCRIPTS = {  # every converter script with its required inputs, "{missing}" a path that does not exist
    "convert_coco": ["--karpathy-json", "{missing}", "--images", "{folder}"],
    "convert_flickr30k": ["--karpathy-json", "{missing}", "--images", "{folder}"],
    "convert_flickr30k_entities": ["--entities", "{missing}", "--images", "{folder}"],
    "convert_img2dataset": ["--input", "{missing}", "--source", "cc3m"],
    "convert_nlvr2": ["--annotations", "{missing}", "--images", "{folder}"],
    "convert_snli_ve": ["--annotations", "{missing}", "--images", "{folder}"],
    "convert_visual_genome": ["--root", "{missing}"],
    "convert_vqa": ["--vqa-dir", "{missing}", "--images", "{folder}"],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_script_reports_a_missing_input_in_one_line(script, tmp_path, capsys):
    main = importlib.import_module(f"soho.cli.{script}").main
    argv = [arg.format(missing=tmp_path / "nowhere", folder=tmp_path) for arg in SCRIPTS[script]]
    with pytest.raises(SystemExit) as stopped:
        main(argv + ["--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and len(error.splitlines()) == 1  # no usage, no traceback
    assert "error: " in error and str(tmp_path / "nowhere") in error
    assert not (tmp_path / "out").exists()
