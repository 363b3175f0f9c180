import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_config
from PIL import Image

from soho.analysis import figures
from soho.analysis.capture import capture
from soho.analysis.value import (
    ValueStatistics,
    attention_over_grid,
    cls_text_share,
    fusion_degree,
    image_tokens_reading_text,
    kmeans,
    normalized_mutual_information,
    uniform_text_share,
)
from soho.cli.analyze import main as analyze
from soho.data.synthetic import SyntheticWorldConfig, generate_world
from soho.models import SohoForPretraining, SohoModel
from soho.processing import ImageTransformConfig, SohoProcessor
from soho.tokenizer import load_tokenizer

# Two pairs, 3 text slots and 3 image cells; pair 1 has its last text token and last cell padded.
TEXT_MASK = torch.tensor([[True, True, True], [True, True, False]])
IMAGE_MASK = torch.tensor([[True, True, True], [True, True, False]])


def crafted_attention(rows):
    """(2 pairs, 2 heads, 6, 6) attention, uniform except for ``rows[(pair, head, query)]``."""
    attention = torch.full((2, 2, 6, 6), 1 / 6, dtype=torch.float64)
    for (pair, head, query), row in rows.items():
        attention[pair, head, query] = torch.tensor(row, dtype=torch.float64)
    return attention


def test_cls_text_share_by_hand():
    attention = crafted_attention({
        # text keys | image keys
        (0, 0, 0): [0.2, 0.3, 0.3, 0.1, 0.05, 0.05],  # 0.6 on other text, 0.2 on image: 0.75
        (0, 1, 0): [0.0, 0.1, 0.1, 0.3, 0.3, 0.2],    # 0.2 / 1.0
        # Mass on the padded text key is not real attention and is left out: 0.2 / (0.2 + 0.2).
        (1, 0, 0): [0.4, 0.2, 0.2, 0.1, 0.1, 0.0],
        (1, 1, 0): [0.1, 0.3, 0.0, 0.6, 0.0, 0.0],    # 0.3 / 0.9
    })
    share, to_itself = cls_text_share(attention, TEXT_MASK, IMAGE_MASK)
    torch.testing.assert_close(share, torch.tensor([[0.75, 0.2], [0.5, 1 / 3]], dtype=torch.float64))
    torch.testing.assert_close(to_itself, torch.tensor([[0.2, 0.0], [0.4, 0.1]], dtype=torch.float64))
    # Uniform attention: 2 other text tokens of 5 real ones; 1 of 3.
    assert uniform_text_share(TEXT_MASK, IMAGE_MASK).tolist() == pytest.approx([2 / 5, 1 / 3])


def test_image_tokens_reading_text_by_hand():
    attention = crafted_attention({
        (0, 0, 3): [0.3, 0.2, 0.1, 0.2, 0.1, 0.1],  # 0.6 on text: reads text
        (0, 0, 4): [0.1, 0.1, 0.1, 0.3, 0.2, 0.2],  # 0.3: no
        (0, 0, 5): [0.5, 0.1, 0.0, 0.2, 0.1, 0.1],  # 0.6: reads text
        (1, 0, 3): [0.4, 0.2, 0.1, 0.2, 0.1, 0.0],  # 0.6 / 0.9 on real keys: reads text
        (1, 0, 4): [0.1, 0.1, 0.4, 0.3, 0.1, 0.0],  # 0.2 / 0.6: the padded text key does not count
        (1, 0, 5): [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # a padded cell: never counted as a query
        **{(pair, 1, query): [0.1, 0.1, 0.1, 0.3, 0.2, 0.2] for pair in (0, 1) for query in (3, 4, 5)},
    })
    counts = image_tokens_reading_text(attention, TEXT_MASK, IMAGE_MASK)
    assert counts.tolist() == [3, 0]
    assert int(IMAGE_MASK.sum()) == 5  # so head 0's cross-modal fraction is 3 / 5
    assert image_tokens_reading_text(attention, TEXT_MASK, IMAGE_MASK, threshold=0.62).tolist() == [1, 0]


def test_normalized_mutual_information_by_hand():
    modality = torch.tensor([0, 0, 1, 1])
    assert normalized_mutual_information(modality, torch.tensor([1, 1, 0, 0])) == pytest.approx(1.0)
    assert normalized_mutual_information(modality, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_information(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)) == 1.0
    # Clusters {0, 1, 2} and {3}: p(u, v) = 1/2, 1/4, 1/4 on (0, 0), (1, 0), (1, 1).
    mutual = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) \
        + 0.25 * math.log(0.25 / (0.5 * 0.25))
    entropy_clusters = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mutual / ((math.log(2) + entropy_clusters) / 2)
    assert expected == pytest.approx(0.3437, abs=1e-4)
    clusters = torch.tensor([0, 0, 0, 1])
    assert normalized_mutual_information(modality, clusters) == pytest.approx(expected)
    assert normalized_mutual_information(clusters, modality) == pytest.approx(expected)


def test_kmeans_finds_two_blobs_deterministically():
    square = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    result = kmeans(square, 2)
    assert result.assignments[0] == result.assignments[1] != result.assignments[2] == result.assignments[3]
    assert sorted(result.centroids.tolist()) == [[0.0, 0.5], [10.0, 0.5]]
    assert result.inertia == pytest.approx(4 * 0.25)

    generator = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(60, 8, generator=generator) - 4, torch.randn(40, 8, generator=generator) + 4])
    truth = torch.tensor([0] * 60 + [1] * 40)
    first, second = kmeans(blobs, 2, seed=3), kmeans(blobs, 2, seed=3)
    assert torch.equal(first.assignments, second.assignments)
    assert normalized_mutual_information(truth, first.assignments) == pytest.approx(1.0)
    assert fusion_degree(blobs, truth.bool()) == pytest.approx(1.0)
    # Each blob holds both modalities in equal parts: the clusters say nothing about modality.
    mixed = torch.tensor([0, 1] * 30 + [0, 1] * 20).bool()
    assert fusion_degree(blobs, mixed) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def tiny_capture():
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config())
    model.train()(**tiny_batch())  # seeds the dictionary from data
    model.eval()
    batch = tiny_batch(num_images=3, captions_per_image=2, seed=1)
    return model, batch, capture(model, batch)


def test_capture_shapes_and_padding(tiny_capture):
    model, batch, captured = tiny_capture
    pairs, length, cells = 6, 9, 16  # 64 px at stride 16: a 4 x 4 grid
    assert captured.grid_size == (4, 4) and captured.stride == 16 and captured.text_length == length
    assert len(captured.attentions) == 2 and len(captured.hidden_states) == 3
    assert all(a.shape == (pairs, 4, length + cells, length + cells) for a in captured.attentions)
    assert all(h.shape == (pairs, length + cells, 32) for h in captured.hidden_states)
    assert captured.entries.shape == (pairs, 4, 4) and captured.image_index.tolist() == [0, 0, 1, 1, 2, 2]
    # Image 0 is padded on its right half and text 1 after 6 tokens: padded keys get no attention.
    assert captured.image_mask[:2].view(2, 4, 4)[:, :, 2:].sum() == 0 and captured.image_mask[2:].all()
    assert captured.text_mask[1].tolist() == [True] * 6 + [False] * 3
    keys = torch.cat([captured.text_mask, captured.image_mask], 1)[:, None, None, :]
    for attention in captured.attentions:
        assert torch.allclose(attention.sum(-1), torch.ones(()))
        assert attention.masked_select(~keys.expand_as(attention)).abs().max() < 1e-6
    out = model.soho(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask",
                                              "image_index")})
    assert torch.allclose(captured.hidden_states[-1][:, :length], out.text_states, atol=1e-5)
    grid = attention_over_grid(captured.attentions[-1][2], 0, length, captured.grid_size)
    assert grid.shape == (4, 4, 4) and torch.equal(grid[:, 1, 2], captured.attentions[-1][2, :, 0, length + 6])

    bare = SohoModel(tiny_config())
    assert capture(bare.eval(), batch).entries.shape == (6, 4, 4)
    with pytest.raises(ValueError, match="eval mode"):
        capture(bare.train(), batch)


def test_statistics_average_over_batches(tiny_capture):
    _, _, captured = tiny_capture
    statistics = ValueStatistics(tokens_per_batch=40)
    statistics.update(captured)
    statistics.update(captured)
    report = statistics.report(head_threshold=0.5)
    shares = torch.stack([cls_text_share(a, captured.text_mask, captured.image_mask)[0].mean(0)
                          for a in captured.attentions])
    assert torch.allclose(report.cls_text_share, shares.float())
    counts = torch.stack([image_tokens_reading_text(a, captured.text_mask, captured.image_mask)
                          for a in captured.attentions])
    assert torch.allclose(report.cross_modal_fraction, counts.float() / captured.image_mask.sum())
    assert torch.equal(report.cross_modal_heads, report.cross_modal_fraction > 0.5)
    assert report.pairs == 12 and report.fusion_tokens == 80 and len(report.fusion_nmi) == 3
    assert all(0.0 <= nmi <= 1.0 for nmi in report.fusion_nmi)
    assert json.loads(json.dumps(report.to_dict()))["cross_modal"]["head_fraction"] == report.cross_modal_head_fraction


def test_display_image_and_dictionary_crops():
    pixels = torch.zeros(3, 16, 24)
    mask = torch.zeros(16, 24, dtype=torch.long)
    mask[:12, :20] = 1
    image = figures.display_image(pixels, mask, mean=(0.5, 0.25, 1.0), std=(1.0, 1.0, 1.0))
    assert image.shape == (12, 20, 3) and image[0, 0].tolist() == [0.5, 0.25, 1.0]

    assert figures.cell_box(1, 2, 8, 12, 20) == (16, 8, 20, 12)  # the last cell runs past the image
    entries = torch.tensor([[[3, 1, 3], [1, 1, 3]]])
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    crops = figures.entry_crops([image], entries, valid, entry=3, stride=8, context=1)
    assert len(crops) == 3 and all(crop.shape == (24, 24, 3) for crop, _ in crops)
    first, box = crops[0]
    assert box == (8, 8, 16, 16) and (first[:8] == figures.OUTSIDE_IMAGE).all()
    assert np.allclose(first[8:20, 8:], image[:, :16])
    assert crops[2][1] == (8, 8, 12, 12) and (crops[2][0][12:] == figures.OUTSIDE_IMAGE).all()
    assert len(figures.entry_crops([image], entries, valid, entry=3, stride=8, limit=2)) == 2


def test_figures_are_written(tmp_path):
    values = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.0]])
    image = np.random.default_rng(0).random((32, 48, 3))
    written = [
        figures.head_heatmap(values, tmp_path / "heads.png", "title", "share", marked=values > 0.5),
        figures.fusion_curve([1.0, 0.6, 0.3], tmp_path / "nmi.png"),
        figures.grid_attention_figure(image, torch.rand(3, 2, 3), 16, tmp_path / "grid.png", "a token"),
        figures.dictionary_entry_figure([(image[:24, :24], (8, 8, 16, 16))] * 3, 5, 0.25, tmp_path / "entry.png"),
    ]
    for path in written:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.width > 100 and png.height > 100


def test_cli_on_a_tiny_checkpoint(tmp_path, capsys):
    generate_world(SyntheticWorldConfig(image_size=32, split_sizes={"retrieval_val": 5}, num_workers=1,
                                        tokenizer_vocab_size=100), tmp_path / "data")
    tokenizer = load_tokenizer(tmp_path / "data" / "tokenizer")
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**{"encoder.vocab_size": len(tokenizer)}))
    model.train()(**tiny_batch(size=32))  # seeds the dictionary from data
    image = ImageTransformConfig(min_size=32, max_size=32, size_divisor=16)
    model.save_pretrained(tmp_path / "model", processor=SohoProcessor(tokenizer, image, max_text_length=20))

    out = tmp_path / "analysis"
    assert analyze(["--checkpoint", str(tmp_path / "model"), "--shards", str(tmp_path / "data" / "retrieval_val"),
                    "--out", str(out), "--batches", "2", "--batch-size", "2", "--device", "cpu",
                    "--entries", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["value"]["pairs"] == 4  # 2 batches of 2 of the 5 images
    assert np.array(results["value"]["modality_importance"]["cls_text_share"]).shape == (2, 4)
    assert len(results["value"]["fusion_degree"]["nmi"]) == 3
    entries = results["dictionary_entries"]  # the most used ones; an untrained grid may use only one
    assert 1 <= len(entries) <= 2 and all(entry["cells_shown"] > 0 for entry in entries)
    assert {"modality_importance.png", "cross_modal_heads.png", "fusion_nmi.png", "token_attention.png"} \
        <= set(results["figures"])
    for name in results["figures"]:
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "modality importance" in printed and "cross-modal heads:" in printed and "fusion degree" in printed


@pytest.mark.parametrize("fusion, heads", [
    ({"encoder.fusion": "modality_specific", "encoder.modality_specific_layers": 1}, 4),
    ({"encoder.fusion": "co_attention"}, 8),  # cross-attention heads, then self-attention heads
])
def test_probes_see_what_each_fusion_lets_tokens_attend_to(fusion, heads):
    torch.manual_seed(0)
    model = SohoModel(tiny_config(**fusion)).eval()
    captured = capture(model, tiny_batch(num_images=2, captions_per_image=1))
    assert all(a.shape == (2, heads, 25, 25) for a in captured.attentions)
    statistics = ValueStatistics(tokens_per_batch=40)
    statistics.update(captured)
    report = statistics.report()
    if fusion["encoder.fusion"] == "modality_specific":
        # The first layer keeps the modalities apart: [CLS] reads only text, image tokens only the image.
        assert report.cls_text_share[0].tolist() == [1.0] * 4
        assert report.cross_modal_fraction[0].tolist() == [0.0] * 4
    else:
        # Cross-attention heads see only the other modality, self-attention heads only their own.
        assert report.cls_text_share[:, :4].eq(0).all() and report.cls_text_share[:, 4:].eq(1).all()
        assert report.cross_modal_fraction[:, :4].eq(1).all() and report.cross_modal_fraction[:, 4:].eq(0).all()
