import numpy as np
import pytest
import torch
from PIL import Image

from soho.config import ConfigError
from soho.processing import ImageTransform, ImageTransformConfig, SohoProcessor, pad_images, resized_shape
from soho.tokenizer import load_tokenizer, train_wordpiece_tokenizer

CORPUS = ["a small red circle to the left of a large blue square", "two green stars above a yellow cross",
          "there are three objects"] * 5


@pytest.mark.parametrize("shape, expected", [
    ((480, 640), (600, 800)),     # landscape: short side to 600
    ((640, 480), (800, 600)),     # portrait
    ((300, 1200), (250, 1000)),   # very wide: long side capped at 1000
    ((600, 1000), (600, 1000)),   # already there
])
def test_resized_shape(shape, expected):
    assert resized_shape(*shape, 600, 1000) == expected


def test_transform_normalises_and_accepts_every_input_type():
    config = ImageTransformConfig(min_size=8, max_size=16)
    transform = ImageTransform(config)
    array = np.full((8, 12, 3), (255, 0, 51), dtype=np.uint8)
    out = transform(array)
    assert out.shape == (3, 8, 12)
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    torch.testing.assert_close(out[:, 3, 5], torch.tensor(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(transform(Image.fromarray(array)), out)
    torch.testing.assert_close(transform(torch.from_numpy(array).permute(2, 0, 1) / 255.0), out)
    with pytest.raises(ValueError, match="H x W x 3"):
        transform(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(TypeError, match="unsupported image type"):
        transform("image.jpg")


def test_pad_images_to_a_multiple_with_mask():
    images = [torch.ones(3, 20, 40), torch.ones(3, 33, 10)]
    pixels, mask = pad_images(images, 32)
    assert pixels.shape == (2, 3, 64, 64) and mask.shape == (2, 64, 64)
    assert mask[0].sum() == 20 * 40 and mask[1].sum() == 33 * 10
    assert pixels[0, :, 20:].abs().sum() == 0 and pixels[0, :, :, 40:].abs().sum() == 0


def test_config_validation():
    with pytest.raises(ConfigError, match="must not exceed"):
        ImageTransformConfig(min_size=700, max_size=600)


def test_tokenizer_training_and_loading(tmp_path):
    tokenizer = train_wordpiece_tokenizer(CORPUS, tmp_path / "tok", vocab_size=200)
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.pad_token_id == 0 and loaded.mask_token_id is not None
    ids = loaded("a red circle")["input_ids"]
    assert loaded.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert ids == tokenizer("a red circle")["input_ids"]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")


def test_processor_round_trip(tmp_path):
    tokenizer = train_wordpiece_tokenizer(CORPUS, tmp_path / "tok", vocab_size=200)
    processor = SohoProcessor(tokenizer, ImageTransformConfig(min_size=32, max_size=64), max_text_length=6)
    images = [np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8),
              np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8)]
    texts = ["a small red circle to the left of a square", "two stars"]
    out = processor(images=images, text=texts)
    assert out["pixel_values"].shape[2] % 32 == 0 and out["pixel_values"].shape[3] % 32 == 0
    assert out["input_ids"].shape == (2, 6)  # truncated to max_text_length
    processor.save_pretrained(tmp_path / "proc")
    again = SohoProcessor.from_pretrained(tmp_path / "proc")(images=images, text=texts)
    for key in out:
        torch.testing.assert_close(again[key], out[key])
    single = processor(images=images[0], text="two stars")
    assert single["pixel_values"].shape[0] == 1 and single["input_ids"].shape[0] == 1
