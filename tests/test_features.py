import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from convert_fixtures import write_corrupt_image, write_image

from soho.cli.export_features import main
from soho.data.retrieval import read_retrieval_split
from soho.data.synthetic import SyntheticWorldConfig, generate_world
from soho.features import load_features
from soho.models.objectives.itc import masked_mean
from soho.models.soho import SohoForPretraining
from soho.processing import ImageTransformConfig, SohoProcessor
from soho.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ImageTransformConfig(min_size=32, max_size=32, size_divisor=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world's retrieval split (2 shards of 3 images, 5 captions each) and three tiny checkpoints:
    with ITC, without ITC, and without ITC or visual dictionary."""
    root = tmp_path_factory.mktemp("features")
    generate_world(SyntheticWorldConfig(image_size=32, split_sizes={"retrieval_val": 6}, shard_size=3, num_workers=1,
                                        tokenizer_vocab_size=200), root / "data")
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    processor = SohoProcessor(tokenizer, IMAGE, max_text_length=32)
    for name, overrides in (("itc", {"itc.enabled": True}), ("plain", {}),
                            ("continuous", {"use_visual_dictionary": False, "mvm.probability": 0.0})):
        torch.manual_seed(0)
        model = SohoForPretraining(tiny_config(**{"encoder.vocab_size": len(tokenizer), **overrides}))
        model.save_pretrained(root / name, processor=processor)
    return root


def export(world, out, *extra, checkpoint="itc"):
    assert main(["--checkpoint", str(world / checkpoint), "--shards", str(world / "data" / "retrieval_val"),
                 "--out", str(out), "--batch-size", "4", *extra]) == 0
    return load_features(out)


def test_shard_export_equals_the_model_passes(world, tmp_path):
    features = export(world, tmp_path / "out")
    index = features.index
    assert index["features"] == ["grid", "dictionary", "image", "text", "fused", "itc"]
    assert (index["images"], index["texts"], index["skipped"]) == (6, 30, {})
    assert [row["row"] for row in features.images] == list(range(6))
    assert features.arrays["text_image"].tolist() == [i for i in range(6) for _ in range(5)]

    model = SohoForPretraining.from_pretrained(world / "itc").eval()
    processor = SohoProcessor.from_pretrained(world / "itc")
    split = read_retrieval_split(world / "data" / "retrieval_val", processor, batch_size=6)
    assert [row["image_id"] for row in features.images] == split.image_ids
    assert [row["caption"] for row in features.texts] == split.captions
    pixels, mask = split.image_batches[0]
    texts = processor(text=split.captions)
    with torch.no_grad():
        soho = model.soho
        grid = soho.embed_image(pixels, mask)
        tokens, token_mask = soho.visual_tokens(grid)
        image = masked_mean(soho.encoder(image=tokens, image_mask=token_mask).image_states, token_mask)
        text = soho(**texts).text_states[:, 0]
        fused = soho(**texts, grid=grid, image_index=split.text_image).text_states[:, 0]
        cnn = soho.backbone(pixels).permute(0, 2, 3, 1)
        assert np.allclose(features.arrays["itc_image"], model.encode_images(pixels, mask), atol=1e-5)
        assert np.allclose(features.arrays["itc_text"], model.encode_texts(**texts), atol=1e-5)
    assert np.allclose(features.arrays["image"], image, atol=1e-5)
    assert np.allclose(features.arrays["text"], text, atol=1e-5)
    assert np.allclose(features.arrays["fused"], fused, atol=1e-5)
    assert len(features.grids) == 6 and features.grids[0].shape == (2, 2, 32)  # 32 px at stride 16
    assert np.allclose(np.stack(features.grids), cnn, atol=1e-5)
    assert np.array_equal(np.stack(features.entries), grid.indices)
    assert np.array_equal(features.dictionary, soho.visual_dictionary.embedding)


def test_numpy_float16_parts_read_back_as_the_safetensors_export(world, tmp_path):
    reference = export(world, tmp_path / "reference")
    small = export(world, tmp_path / "small", "--format", "numpy", "--dtype", "float16", "--part-size", "2",
                   "--batch-size", "2", "--features", "image", "fused", "itc")
    assert [part["file"] for part in small.index["parts"]] == [f"part-000-0000{i}.npz" for i in range(3)]
    assert set(small.arrays) == {"image", "itc_image", "fused", "itc_text", "text_image"} and not small.grids
    for name in small.arrays:
        assert small.arrays[name].dtype == (np.int64 if name == "text_image" else np.float16)
        assert np.allclose(small.arrays[name], reference.arrays[name], atol=2e-3), name
    assert [row["part"] for row in small.images] == ["part-000-00000.npz"] * 2 + ["part-000-00001.npz"] * 2 + [
        "part-000-00002.npz"] * 2


def test_readme_one_command_exports_an_image_folder(world, tmp_path, capsys):
    folder = tmp_path / "photos"
    write_image(folder / "a.jpg", width=40, height=24, seed=1)
    write_image(folder / "b" / "c.png", width=24, height=40, seed=2, format="PNG")
    write_corrupt_image(folder / "broken.jpg")
    (folder / "captions.csv").write_text("path,caption\na.jpg,a red square\nb/c.png,a blue circle\n"
                                         "b/c.png,two shapes\nbroken.jpg,anything\nmissing.jpg,nothing\n")
    # Images up to 64 px long: landscape and portrait images get grids of different shapes.
    checkpoint = tmp_path / "checkpoint"
    processor = SohoProcessor.from_pretrained(world / "plain")
    SohoForPretraining.from_pretrained(world / "plain").save_pretrained(
        checkpoint, processor=SohoProcessor(processor.tokenizer, ImageTransformConfig(32, 64, 16), 32))
    assert main(["--checkpoint", str(checkpoint), "--images", str(folder), "--captions",
                 str(folder / "captions.csv"), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary == {"features": ["grid", "dictionary", "image", "text", "fused"], "images": 2, "texts": 3,
                       "skipped": {"corrupt_image": 1, "missing_image": 1}, "seconds": summary["seconds"]}
    features = load_features(tmp_path / "out")
    assert [row["image_id"] for row in features.images] == ["a.jpg", "b/c.png"]
    assert [(row["image_row"], row["caption"]) for row in features.texts] == [
        (0, "a red square"), (1, "a blue circle"), (1, "two shapes")]
    # 40 x 24 is resized to 53 x 32 and padded to 64 x 32: 2 x 4 cells; the portrait one is 4 x 2.
    assert [grid.shape[:2] for grid in features.grids] == [(2, 4), (4, 2)]
    assert [row["grid"] for row in features.images] == [[2, 4], [4, 2]]

    assert main(["--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(tmp_path / "only"),
                 "--features", "image"]) == 0
    assert load_features(tmp_path / "only").index["images"] == 2 and not load_features(tmp_path / "only").texts


@pytest.mark.parametrize("checkpoint, feature, message", [
    ("plain", "itc", "feature 'itc' is not available: the checkpoint has no ITC heads"),
    ("continuous", "dictionary", "feature 'dictionary' is not available: the checkpoint has no visual dictionary"),
])
def test_features_a_checkpoint_lacks_are_one_line_errors(world, tmp_path, capsys, checkpoint, feature, message):
    with pytest.raises(SystemExit) as stopped:
        export(world, tmp_path, "--features", feature, checkpoint=checkpoint)
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert feature not in export(world, tmp_path / "default", checkpoint=checkpoint).index["features"]


def test_bad_sources_are_one_line_errors(world, tmp_path, capsys):
    for arguments, message in ((["--shards", str(tmp_path / "none")], "shard not found"),
                               (["--images", str(tmp_path / "none")], "image folder not found"),
                               (["--images", str(tmp_path)], "no .jpg/.jpeg/.png/.webp/.bmp images under")):
        with pytest.raises(SystemExit) as stopped:
            main(["--checkpoint", str(world / "itc"), "--out", str(tmp_path / "out"), *arguments])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_export_what_one_does(world, tmp_path):
    for processes in (1, 2):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / "cpu.yaml"), "--num_processes", str(processes),
                   str(ROOT / "tools" / "export_features.py"), "--checkpoint", str(world / "itc"),
                   "--shards", str(world / "data" / "retrieval_val"), "--out", str(tmp_path / str(processes)),
                   "--batch-size", "2"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_features(tmp_path / "1"), load_features(tmp_path / "2")
    assert two.index["processes"] == 2 and len(two.index["parts"]) == 2  # two shards: one per process
    assert [r["image_id"] for r in one.images] == [r["image_id"] for r in two.images]
    assert [r["caption"] for r in one.texts] == [r["caption"] for r in two.texts]
    for name in one.arrays:
        assert np.allclose(one.arrays[name], two.arrays[name], atol=1e-5), name
    for a, b in zip(one.grids + one.entries, two.grids + two.entries):
        assert np.allclose(a, b, atol=1e-5)
