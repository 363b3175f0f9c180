import json

import numpy as np
import pytest
import torch
from PIL import Image

from soho.config import ConfigError, from_dict, to_dict
from soho.processing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    ImageTransformConfig,
    ProcessorConfig,
    SohoProcessor,
    pad_images,
    resized_shape,
)
from soho.tokenizer import train_wordpiece_tokenizer

CORPUS = ["a small red circle to the left of a large blue square", "two green stars above a yellow cross",
          "there are three objects"] * 5
SMALL = ImageTransformConfig(min_size=32, max_size=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_wordpiece_tokenizer(CORPUS, tmp_path_factory.mktemp("tokenizer"), vocab_size=200)


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape, expected", [
    ((480, 640), (600, 800)),     # landscape: short side (height) to 600
    ((640, 480), (800, 600)),     # portrait: short side (width) to 600
    ((300, 1200), (250, 1000)),   # 4:1 would need a 2400 long side: capped at 1000 instead
    ((1200, 300), (1000, 250)),
    ((500, 1000), (500, 1000)),   # 2:1 hits the cap exactly at 1000 x 500
    ((600, 1000), (600, 1000)),   # already there
    ((100, 100), (600, 600)),     # small images are upscaled
    ((333, 500), (600, 901)),     # 500 * 600 / 333 = 900.9 rounds to 901
    ((1, 5000), (1, 1000)),       # extreme ratios keep at least one pixel
])
def test_resized_shape(shape, expected):
    assert resized_shape(*shape, 600, 1000) == expected


def test_resized_shape_rejects_empty_images():
    with pytest.raises(ValueError, match="empty image"):
        resized_shape(0, 10, 600, 1000)


def test_constant_image_normalises_to_exact_values():
    colour = (255, 0, 51)
    out = ImageTransform(ImageTransformConfig(min_size=16, max_size=32))(np.full((8, 12, 3), colour, np.uint8))
    assert out.dtype == torch.float32 and out.shape == (3, 16, 24)  # upscaled by 2
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(out, torch.tensor(expected).view(3, 1, 1).expand(3, 16, 24), atol=1e-5, rtol=0)


def test_pil_numpy_and_tensor_inputs_agree():
    transform = ImageTransform(SMALL)
    array = random_image(50, 70)
    out = transform(array)
    assert out.shape == (3, 32, 45)  # 70 * 32 / 50 = 44.8
    torch.testing.assert_close(transform(Image.fromarray(array)), out)
    torch.testing.assert_close(transform(torch.from_numpy(array).permute(2, 0, 1) / 255.0), out)
    torch.testing.assert_close(transform(torch.from_numpy(array).permute(2, 0, 1).double() / 255.0), out)


def test_pil_images_of_any_mode_become_rgb():
    transform = ImageTransform(SMALL)
    gray = random_image(40, 40)[:, :, 0]
    torch.testing.assert_close(transform(Image.fromarray(gray, "L")), transform(np.repeat(gray[:, :, None], 3, 2)))
    rgba = np.concatenate([random_image(40, 40), np.full((40, 40, 1), 128, np.uint8)], axis=2)
    torch.testing.assert_close(transform(Image.fromarray(rgba, "RGBA")), transform(rgba[:, :, :3]))


@pytest.mark.parametrize("image, error, message", [
    (np.zeros((8, 8), np.uint8), ValueError, "H x W x 3"),
    (np.zeros((8, 8, 4), np.uint8), ValueError, "H x W x 3"),
    (np.zeros((8, 8, 3), np.float32), ValueError, "must be uint8"),
    (torch.zeros(1, 8, 8), ValueError, "3 x H x W"),
    (torch.zeros(2, 3, 8, 8), ValueError, "as a list"),
    (torch.zeros(3, 8, 8, dtype=torch.uint8), ValueError, "floating point"),
    (torch.full((3, 8, 8), 255.0), ValueError, r"in \[0, 1\]"),
    ("image.jpg", TypeError, "unsupported image type str"),
])
def test_transform_rejects_bad_images(image, error, message):
    with pytest.raises(error, match=message):
        ImageTransform(SMALL)(image)


def test_pad_images_to_a_multiple_with_mask():
    images = [torch.rand(3, 20, 40) + 1, torch.rand(3, 33, 10) + 1]
    pixels, mask = pad_images(images, 32)
    assert pixels.shape == (2, 3, 64, 64) and mask.shape == (2, 64, 64)
    assert mask.dtype == torch.long and mask[0].sum() == 20 * 40 and mask[1].sum() == 33 * 10
    for image, padded, valid in zip(images, pixels, mask):
        height, width = image.shape[1:]
        torch.testing.assert_close(padded[:, :height, :width], image)
        assert valid[:height, :width].all()
        assert (padded * (1 - valid)).abs().sum() == 0  # zero wherever the mask says padding


def test_pad_images_keeps_sizes_that_already_divide():
    pixels, mask = pad_images([torch.ones(3, 64, 32)], 32)
    assert pixels.shape == (1, 3, 64, 32) and mask.all()
    assert pad_images([torch.ones(3, 5, 7), torch.ones(3, 6, 2)], 1)[0].shape == (2, 3, 6, 7)


@pytest.mark.parametrize("images, divisor, error, message", [
    ([], 32, ValueError, "at least one image"),
    ([torch.ones(3, 8, 8)], 0, ValueError, "size_divisor"),
    ([torch.ones(3, 8, 8), torch.ones(8, 8)], 32, ValueError, r"images\[1\] must be 3 x H x W"),
    ([np.ones((3, 8, 8))], 32, TypeError, r"images\[0\] is a ndarray"),
])
def test_pad_images_rejects_bad_batches(images, divisor, error, message):
    with pytest.raises(error, match=message):
        pad_images(images, divisor)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_size": 700, "max_size": 600}, "must not exceed"),
    ({"min_size": 0}, "min_size must be >= 1"),
    ({"size_divisor": 0}, "size_divisor must be >= 1"),
    ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
    ({"mean": (0.5, 0.5)}, "one value per RGB channel"),
])
def test_image_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ImageTransformConfig(**kwargs)


def test_image_config_serialises_through_config_helpers():
    config = ImageTransformConfig(min_size=320, max_size=512, mean=(0.5, 0.5, 0.5))
    assert from_dict(ImageTransformConfig, json.loads(json.dumps(to_dict(config)))) == config
    with pytest.raises(ConfigError, match=r"image\.min_size must be >= 1"):
        from_dict(ProcessorConfig, {"image": {"min_size": 0}})


def test_processor_batches_images_and_text(tokenizer):
    processor = SohoProcessor(tokenizer, SMALL, max_text_length=6)
    images = [random_image(40, 30, seed=0), random_image(30, 50, seed=1), random_image(64, 64, seed=2)]
    texts = ["a small red circle to the left of a square", "two stars"]
    out = processor(images=images, text=texts)
    assert set(out) == {"pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids"}
    assert out["pixel_values"].shape == (3, 3, 64, 64)  # 43 x 32, 32 x 53, 32 x 32 padded to 64
    assert out["pixel_mask"].flatten(1).sum(1).tolist() == [43 * 32, 32 * 53, 32 * 32]
    assert out["input_ids"].shape == (2, 6)  # truncated to max_text_length, the short one padded
    assert tokenizer.convert_ids_to_tokens(out["input_ids"][0]) == ["[CLS]", "a", "small", "red", "circle", "[SEP]"]
    assert out["input_ids"][1].tolist()[4:] == [0, 0] and out["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    assert not out["token_type_ids"].any()


def test_processor_pads_text_only_to_the_longest(tokenizer):
    texts = ["two green stars above a cross", "a star"]
    out = SohoProcessor(tokenizer, SMALL)(text=texts)
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
    lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
    assert out["input_ids"].shape == (2, max(lengths)) and out["attention_mask"].sum(1).tolist() == lengths


def test_processor_single_inputs_are_batches_of_one(tokenizer):
    processor = SohoProcessor(tokenizer, SMALL)
    single = processor(images=Image.fromarray(random_image(40, 30)), text="two stars")
    assert single["pixel_values"].shape[0] == 1 and single["input_ids"].shape[0] == 1
    assert set(processor(images=random_image(40, 30))) == {"pixel_values", "pixel_mask"}
    as_numpy = processor(images=random_image(40, 30), text="two stars", return_tensors="np")
    assert all(isinstance(value, np.ndarray) for value in as_numpy.values())


def test_processor_rejects_bad_inputs(tokenizer):
    processor = SohoProcessor(tokenizer, SMALL)
    with pytest.raises(ValueError, match="images, text or both"):
        processor()
    with pytest.raises(ValueError, match=r"images\[1\]: an image array must be H x W x 3"):
        processor(images=[random_image(8, 8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(TypeError, match=r"text\[1\] is a int"):
        processor(text=["a star", 7])
    with pytest.raises(ValueError, match="empty list"):
        processor(text=[])
    with pytest.raises(ValueError, match="return_tensors"):
        processor(text="a star", return_tensors="tf")
    with pytest.raises(TypeError, match="ImageTransformConfig"):
        SohoProcessor(tokenizer, {"min_size": 32})
    with pytest.raises(ConfigError, match="max_text_length"):
        SohoProcessor(tokenizer, SMALL, max_text_length=1)


def test_processor_save_and_load_round_trip(tokenizer, tmp_path):
    processor = SohoProcessor(tokenizer, ImageTransformConfig(min_size=32, max_size=48, size_divisor=16),
                              max_text_length=7)
    processor.save_pretrained(tmp_path / "proc")
    assert json.loads((tmp_path / "proc" / "processor_config.json").read_text())["max_text_length"] == 7
    loaded = SohoProcessor.from_pretrained(tmp_path / "proc")
    assert loaded.image_config == processor.image_config and loaded.max_text_length == 7
    images = [random_image(40, 30), random_image(20, 90, seed=3)]
    texts = ["a small red circle to the left of a large blue square", "two stars"]
    expected, again = processor(images=images, text=texts), loaded(images=images, text=texts)
    assert expected.keys() == again.keys()
    for key in expected:
        assert torch.equal(again[key], expected[key]), key


def test_processor_from_pretrained_errors(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no processor_config.json"):
        SohoProcessor.from_pretrained(tmp_path)
    SohoProcessor(tokenizer, SMALL).save_pretrained(tmp_path)
    config_file = tmp_path / "processor_config.json"
    record = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**record, "max_length": 12}))
    with pytest.raises(ConfigError, match="unknown config key.*max_length"):
        SohoProcessor.from_pretrained(tmp_path)
    config_file.write_text(json.dumps({**record, "image": {**record["image"], "min_size": "big"}}))
    with pytest.raises(ConfigError, match=r"image\.min_size: expected int"):
        SohoProcessor.from_pretrained(tmp_path)
    config_file.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SohoProcessor.from_pretrained(tmp_path)
