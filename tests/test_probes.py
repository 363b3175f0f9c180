import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_config

from soho.analysis.capture import Capture, capture
from soho.analysis.probes import (
    CONDITIONS,
    CROSS_MODAL_PROBES,
    GROUNDING_SOURCES,
    PROBES,
    Grounding,
    Mention,
    ProbeCollector,
    RegionRelation,
    cell_at,
    coreference_pairs,
    covered_cells,
    evaluate_probe,
    fit_linear_probe,
    flickr30k_entities_grounding,
    length_bucket,
    pair_features,
    read_probe_batches,
    relation_pairs,
    span_tokens,
    split_images,
    synthetic_grounding,
    text_representations,
)
from soho.cli.analyze import main as analyze
from soho.data.synthetic import SyntheticWorldConfig, generate_world
from soho.models import SohoForPretraining
from soho.processing import ImageTransformConfig, SohoProcessor
from soho.tokenizer import load_tokenizer


def test_linear_probe_separates_a_separable_set_and_not_shuffled_labels():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(600, 8, generator=generator) * torch.linspace(0.1, 10, 8)  # scales far apart
    direction = torch.randn(8, generator=generator)
    score = features @ direction
    keep = score.abs() > 0.3 * score.std()  # a margin: the classes are linearly separable
    features, labels = features[keep], (score[keep] > 0).long()
    images = torch.arange(len(labels))
    test = split_images(images, 0.5, seed=0)
    result = evaluate_probe(features, labels, test, images, ["0", "1"])
    assert result.accuracy >= 0.98 and 0.3 < result.chance < 0.7
    assert result.train_examples + result.test_examples == len(labels)

    shuffled = labels[torch.randperm(len(labels), generator=generator)]
    result = evaluate_probe(features, shuffled, test, images, ["0", "1"])
    assert abs(result.accuracy - 0.5) < 0.08

    # Three classes by the position of one feature; deterministic fits.
    three = torch.bucketize(features[:, 7].contiguous(), torch.tensor([-3.0, 3.0]))
    first = fit_linear_probe(features, three, 3, l2=1e-3)
    second = fit_linear_probe(features, three, 3, l2=1e-3)
    assert torch.equal(first.weight, second.weight)
    assert (first.predict(features) == three).double().mean() > 0.98


def test_split_is_by_image_and_seeded():
    images = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9, 9])
    test = split_images(images, 0.3, seed=0)
    assert torch.equal(test, split_images(images, 0.3, seed=0))
    assert len(torch.unique(images[test])) == 3
    assert not set(images[test].tolist()) & set(images[~test].tolist())
    assert split_images(torch.tensor([5, 5]), 0.3, 0).all()  # one image: nothing left to train on


GRID, STRIDE = (3, 4), 8  # cell centres at x = 4, 12, 20, 28 and y = 4, 12, 20


def test_cells_covered_by_a_box():
    assert covered_cells([(10, 2, 21, 13)], GRID, STRIDE).nonzero()[:, 0].tolist() == [1, 2, 5, 6]
    assert covered_cells([(12, 4, 12, 4)], GRID, STRIDE).nonzero()[:, 0].tolist() == [1]  # edges count
    assert covered_cells([(0, 0, 3, 3), (25, 17, 32, 24)], GRID, STRIDE).nonzero()[:, 0].tolist() == [11]
    assert cell_at((12.5, 17.0), GRID, STRIDE) == 9 and cell_at((40.0, -1.0), GRID, STRIDE) == 3


def crafted_capture(pairs=2, text_length=5, heads=2, layers=2, hidden=3):
    """Attention and states with known values; the image's last column is padding (a 24 px wide image)."""
    length = text_length + GRID[0] * GRID[1]
    generator = torch.Generator().manual_seed(0)
    attentions = tuple(torch.rand(pairs, heads, length, length, generator=generator).softmax(-1)
                       for _ in range(layers))
    image_mask = torch.ones(pairs, *GRID, dtype=torch.bool)
    image_mask[:, :, 3] = False
    return Capture(attentions=attentions,
                   hidden_states=tuple(torch.randn(pairs, length, hidden, generator=generator)
                                       for _ in range(layers + 1)),
                   input_ids=torch.ones(pairs, text_length, dtype=torch.long),
                   text_mask=torch.tensor([[True] * 5, [True] * 4 + [False]])[:pairs],
                   image_mask=image_mask.flatten(1), image_index=torch.arange(pairs), grid_size=GRID, stride=STRIDE)


# "a red circle": [CLS] a red circle [SEP]
OFFSETS = torch.tensor([[[0, 0], [0, 1], [2, 5], [6, 12], [0, 0]]] * 2)


def grounding(mentions, relations=()):
    return Grounding(caption="a red circle", mentions=mentions, relations=list(relations), objects=1,
                     states_relation=False)


def test_coreference_pairs_mark_the_covered_real_cells():
    captured = crafted_capture()
    assert span_tokens(OFFSETS[0], (6, 12)).tolist() == [False, False, False, True, False]
    assert span_tokens(OFFSETS[0], (2, 12)).tolist() == [False, False, True, True, False]
    # "circles" truncated after "circle": the phrase is cut, so it has no tokens.
    assert not span_tokens(OFFSETS[0], (6, 13)).any()
    # The box covers cells 1, 2, 3, 5, 6, 7; 3 and 7 are padding. 9 real cells: 4 positive, 5 negative.
    groundings = [grounding([Mention((6, 12), [(10, 2, 30, 13)])]), grounding([])]
    found = coreference_pairs(captured, OFFSETS, groundings, torch.Generator().manual_seed(0))
    assert found.pairs.tolist() == [0] * 8 and found.labels.tolist() == [1] * 4 + [0] * 4
    assert found.cells[:4].tolist() == [1, 2, 5, 6]
    assert set(found.cells[4:].tolist()) < {0, 4, 8, 9, 10} and len(set(found.cells[4:].tolist())) == 4
    assert found.tokens[0].tolist() == [False, False, False, True, False]

    # A box over most of the image: fewer negatives than positives, so positives are subsampled.
    wide = [grounding([Mention((6, 12), [(0, 0, 22, 14)])]), grounding([])]  # 6 positive, 3 negative
    found = coreference_pairs(captured, OFFSETS, wide, torch.Generator().manual_seed(0))
    assert found.labels.tolist() == [1] * 3 + [0] * 3 and set(found.cells[3:].tolist()) == {8, 9, 10}
    # A box between cell centres, or a phrase cut off by truncation, gives nothing.
    between = [grounding([Mention((6, 12), [(5, 5, 11, 11)]), Mention((40, 46), [(0, 0, 24, 24)])]), grounding([])]
    assert len(coreference_pairs(captured, OFFSETS, between, torch.Generator()).labels) == 0


def test_pair_features_read_both_directions_and_states():
    captured = crafted_capture()
    text_length, length = 5, 17
    first = torch.zeros(2, length)
    first[0, 3] = 1.0  # "circle" of pair 0
    first[1, 1:3] = 0.5  # "a red" of pair 1: the mean of its two tokens
    second = torch.zeros(2, length)
    second[0, text_length + 6] = second[1, text_length + 9] = 1.0
    features = pair_features(captured, torch.tensor([0, 1]), first, second)
    assert set(features) == {"attention", "layer 0", "layer 1", "layer 2"}
    assert features["attention"].shape == (2, 2 * 2 * 2) and features["layer 2"].shape == (2, 9)
    layer = captured.attentions[1]
    # Layer 2: heads' attention first -> second at columns 4, 5, second -> first at 6, 7.
    torch.testing.assert_close(features["attention"][0, 4:6], layer[0, :, 3, 11])
    torch.testing.assert_close(features["attention"][0, 6:8], layer[0, :, 11, 3])
    torch.testing.assert_close(features["attention"][1, 4:6], (layer[1, :, 1, 14] + layer[1, :, 2, 14]) / 2)
    torch.testing.assert_close(features["attention"][1, 6:8], (layer[1, :, 14, 1] + layer[1, :, 14, 2]) / 2)
    states = captured.hidden_states[0]
    a, b = states[1, 1:3].mean(0), states[1, 14]
    torch.testing.assert_close(features["layer 0"][1], torch.cat([a, b, a * b]))
    # Text representations: the mean over real text tokens only.
    torch.testing.assert_close(text_representations(captured)[1][1], captured.hidden_states[1][1, :4].mean(0))


def test_synthetic_grounding_and_relation_cells():
    scene = {"width": 64, "height": 64, "background": "gradient",
             "objects": [{"id": 0, "shape": "circle", "colour": "red", "size": "small", "box": [2, 2, 14, 14]},
                         {"id": 1, "shape": "cross", "colour": "blue", "size": "small", "box": [40, 10, 52, 22]},
                         {"id": 2, "shape": "circle", "colour": "red", "size": "small", "box": [20, 40, 32, 52]}],
             # 0 is left of and above 1, but further left (38 px) than above (8 px).
             "relations": [{"subject": 0, "predicate": "left of", "object": 1},
                           {"subject": 0, "predicate": "above", "object": 1},
                           {"subject": 1, "predicate": "right of", "object": 0},
                           {"subject": 1, "predicate": "below", "object": 0}]}
    caption = "two discs and a plus sign under no squares"
    truth = synthetic_grounding({"scene_graph": scene}, caption)
    assert [(caption[slice(*m.span)], len(m.boxes)) for m in truth.mentions] == [("discs", 2), ("plus sign", 1)]
    assert truth.mentions[1].boxes == [(40, 10, 52, 22)]
    assert truth.states_relation and truth.objects == 3
    assert [r.predicate for r in truth.relations] == ["left of", "right of"]
    assert not synthetic_grounding({"scene_graph": scene}, "a crossing circle").states_relation
    assert length_bucket("a b c d e") == 0 and length_bucket("a " * 7) == 1 and length_bucket("a " * 12) == 3
    with pytest.raises(ValueError, match="scene_graph"):
        synthetic_grounding({"image_id": "x"}, caption)

    scaled = truth.scaled(0.5, 0.25)
    assert scaled.relations[0].subject == (1, 0.5, 7, 3.5) and truth.relations[0].subject == (2, 2, 14, 14)

    # Relation cells in the 3 x 4 grid at stride 8, scaled: 0's centre (4, 2) is cell 0, 1's (23, 4) cell 2.
    captured = crafted_capture()
    same_cell = RegionRelation((0, 0, 6, 6), (2, 2, 4, 4), "above")
    on_padding = RegionRelation((0, 0, 6, 6), (26, 0, 30, 4), "left of")  # centre in column 3
    below = RegionRelation((0, 16, 8, 24), (8, 0, 16, 8), "below")  # cell 8 below cell 1
    other = grounding([], [same_cell, on_padding, below])
    found = relation_pairs(captured, [scaled, other], torch.tensor([3, 4]))
    assert found.pairs.tolist() == [0, 0, 1] and found.predicates == ["left of", "right of", "below"]
    assert found.subject_cells.tolist() == [0, 2, 8] and found.object_cells.tolist() == [2, 0, 1]
    # Another caption of an image already seen adds no relations: they are the image's, not the caption's.
    assert relation_pairs(captured, [scaled, other], torch.tensor([3, 3])).pairs.tolist() == [0, 0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    generate_world(SyntheticWorldConfig(split_sizes={"retrieval_val": 12}, num_workers=1, tokenizer_vocab_size=100),
                   root / "data")
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**{"encoder.vocab_size": len(tokenizer)}))
    model.train()(**tiny_batch())  # seeds the dictionary from data
    image = ImageTransformConfig(min_size=64, max_size=64, size_divisor=16)
    model.save_pretrained(root / "model", processor=SohoProcessor(tokenizer, image, max_text_length=20))
    return root


def test_probe_batches_follow_the_split(tiny_checkpoint):
    processor = SohoProcessor.from_pretrained(tiny_checkpoint / "model")
    batches, skipped = read_probe_batches(str(tiny_checkpoint / "data" / "retrieval_val"), processor, batch_size=5,
                                          max_batches=2, captions_per_image=2)
    assert skipped == {} and len(batches) == 2
    batch = batches[1]
    assert batch.images.tolist() == [5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    assert batch.inputs["image_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch.mismatched().inputs["image_index"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 0, 0]
    assert batch.offsets.shape == (*batch.inputs["input_ids"].shape, 2) and len(batch.groundings) == 10
    # A mention's tokens spell its shape word, unless truncation cut it off (then it has none).
    spelled = cut = 0
    for n, truth in enumerate(batch.groundings):
        last_character = int(batch.offsets[n, :, 1].max())
        for mention in truth.mentions:
            tokens = batch.inputs["input_ids"][n][span_tokens(batch.offsets[n], mention.span)]
            word = processor.tokenizer.decode(tokens).replace(" ##", "").replace(" ", "")
            if mention.span[1] > last_character:
                assert word == ""
                cut += 1
            else:
                assert word == truth.caption[slice(*mention.span)].replace(" ", "")
                spelled += 1
    assert spelled > 5 and cut >= 1


def run_analyze(checkpoint_root: Path, out: Path, *arguments: str) -> None:
    """soho-analyze with --probes on the tiny checkpoint and its synthetic retrieval_val."""
    assert analyze(["--checkpoint", str(checkpoint_root / "model"),
                    "--shards", str(checkpoint_root / "data" / "retrieval_val"), "--out", str(out),
                    "--batch-size", "4", "--device", "cpu", "--probes", "--probe-l2", "0.01", *arguments]) == 0


def test_cli_runs_every_probe_with_its_baselines(tiny_checkpoint, capsys):
    out = tiny_checkpoint / "analysis"
    run_analyze(tiny_checkpoint, out, "--batches", "3")
    probes = json.loads((out / "results.json").read_text())["probes"]
    assert set(probes) == set(CONDITIONS)
    assert set(probes["trained"]) == set(probes["random_init"]) == set(PROBES)
    assert set(probes["mismatched"]) == set(CROSS_MODAL_PROBES)
    for by_probe in probes.values():
        for probe, by_features in by_probe.items():
            # attention (cross-modal probes only) and every layer's states, embeddings first
            expected = {"layer 0", "layer 1", "layer 2"} | ({"attention"} if probe in CROSS_MODAL_PROBES else set())
            assert set(by_features) == expected
            for result in by_features.values():
                assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["chance"] <= 1.0
                assert result["train_examples"] > 0 and result["test_examples"] > 0
    assert probes["trained"]["coreference"]["attention"]["classes"] == ["0", "1"]
    assert probes["trained"]["coreference"]["attention"]["l2"] == 0.01
    assert set(probes["trained"]["relation"]["layer 0"]["classes"]) <= {"above", "below", "left of", "right of"}
    printed = capsys.readouterr().out
    assert "probes: accuracy on held-out images" in printed and "coreference" in printed and "mismatched" in printed


def test_collector_rejects_unknown_probes():
    with pytest.raises(ValueError, match="unknown probe"):
        ProbeCollector(["coreference", "sentiment"])


# ----------------------------------------------------------------------------- real-data ground truth

F30K_RECORD = {
    "image_id": "1", "captions": ["Two men in green shirts stand .", "A man sits ."],
    "phrases": [{"caption": 0, "first_word": 0, "text": "Two men", "entity_id": "1", "types": ["people"]},
                {"caption": 0, "first_word": 3, "text": "green shirts", "entity_id": "2", "types": ["clothing"]},
                {"caption": 1, "first_word": 0, "text": "A man", "entity_id": "3", "types": ["people"]}],
    "entities": {"1": {"boxes": [{"box": [0, 0, 10, 20]}, {"box": [20, 0, 30, 20]}], "scene": False, "no_box": False},
                 "2": {"boxes": [], "scene": False, "no_box": True},
                 "3": {"boxes": [{"box": [5, 5, 15, 15]}], "scene": False, "no_box": False}},
}
VG_RECORD = {"image_id": 7, "relations": [
    {"predicate": "on", "subject": {"name": "car", "box": [2, 3, 22, 13], "object_id": 1},
     "object": {"name": "road", "box": [0, 20, 48, 32], "object_id": 2}, "relationship_id": 10},
    {"predicate": "next to", "subject": {"name": "tree", "box": [30, 0, 40, 20], "object_id": 3},
     "object": {"name": "car", "box": [2, 3, 22, 13], "object_id": 1}, "relationship_id": 11}]}


def test_flickr30k_entities_grounding_points_phrases_at_their_entity_boxes():
    grounding = GROUNDING_SOURCES["flickr30k_entities"].ground(F30K_RECORD, "Two men in green shirts stand .")
    # "green shirts" has no box: nothing to point at.
    assert [(m.span, m.boxes) for m in grounding.mentions] == [((0, 7), [(0, 0, 10, 20), (20, 0, 30, 20)])]
    assert grounding.relations == [] and grounding.objects is None and grounding.states_relation is None
    second = flickr30k_entities_grounding(F30K_RECORD, "A man sits .")
    assert [(second.caption[slice(*m.span)], m.boxes) for m in second.mentions] == [("A man", [(5, 5, 15, 15)])]
    with pytest.raises(ValueError, match="has no caption"):
        flickr30k_entities_grounding(F30K_RECORD, "Someone else .")
    broken = {**F30K_RECORD, "phrases": [{**F30K_RECORD["phrases"][0], "first_word": 1}]}
    with pytest.raises(ValueError, match="is not word 1"):
        flickr30k_entities_grounding(broken, "Two men in green shirts stand .")
    with pytest.raises(ValueError, match="convert_flickr30k_entities"):
        flickr30k_entities_grounding({"image_id": "1", "captions": ["A man ."]}, "A man .")


def test_visual_genome_grounding_relates_boxes_and_shows_only_the_names():
    source = GROUNDING_SOURCES["visual_genome"]
    assert source.captions(VG_RECORD) == ["car, road, tree"]
    grounding = source.ground(VG_RECORD, "car, road, tree")
    assert [(r.subject, r.object, r.predicate) for r in grounding.relations] == [
        ((2, 3, 22, 13), (0, 20, 48, 32), "on"), ((30, 0, 40, 20), (2, 3, 22, 13), "next to")]
    assert grounding.mentions == [] and grounding.objects is None
    with pytest.raises(ValueError, match="relations"):
        source.captions({"image_id": 8, "captions": ["a car"]})


def convert_probe_data(tmp_path):
    """Flickr30k Entities and Visual Genome fixtures in their published layouts, through the converters."""
    from test_convert_flickr30k_entities import entities as entities_fixture
    from test_convert_visual_genome import conversion_of, write_release

    from soho.data.convert import convert
    from soho.data.convert.flickr30k_entities import flickr30k_entities_conversion

    convert(flickr30k_entities_conversion(*entities_fixture.__wrapped__(tmp_path)), tmp_path / "f30k")
    convert(conversion_of(write_release(tmp_path / "visual_genome")), tmp_path / "vg")
    return tmp_path / "f30k" / "entities_train", tmp_path / "vg" / "relations"


def test_real_data_probes_read_the_converters_output(tiny_checkpoint, tmp_path):
    entities_split, relations_split = convert_probe_data(tmp_path)
    processor = SohoProcessor.from_pretrained(tiny_checkpoint / "model")
    model = SohoForPretraining.from_pretrained(tiny_checkpoint / "model").eval()

    batches, skipped = read_probe_batches(str(entities_split), processor, batch_size=2,
                                          source=GROUNDING_SOURCES["flickr30k_entities"])
    batch = batches[0]
    assert skipped == {} and len(batch.groundings) == 10 and batch.images.tolist() == [0] * 5 + [1] * 5
    real_height, real_width = (int(batch.inputs["pixel_mask"][0].any(axis).sum()) for axis in (1, 0))
    first = batch.groundings[0]
    assert first.caption.startswith("Two young guys")
    # The converter's 48 x 32 boxes, scaled into the processed image.
    assert first.mentions[0].boxes[0] == pytest.approx((4 * real_width / 48, 2 * real_height / 32,
                                                        20 * real_width / 48, 30 * real_height / 32))
    assert [first.caption[slice(*m.span)] for m in first.mentions] == ["Two young guys"]
    collector = ProbeCollector(seed=0)
    for probed in batches:
        collector.update(capture(model, probed.inputs), probed)
    results = collector.results(test_fraction=0.5, l2_values=[0.01])
    assert {"coreference", "caption_length"} <= set(results)
    assert "object_count" not in results and "states_relation" not in results and "relation" not in results

    batches, skipped = read_probe_batches(str(relations_split), processor, batch_size=4,
                                          source=GROUNDING_SOURCES["visual_genome"])
    captions = [g.caption for b in batches for g in b.groundings]
    assert skipped == {} and "car, road" in captions
    predicates = {r.predicate for b in batches for g in b.groundings for r in g.relations}
    assert {"on", "talking to", "over"} <= predicates
    collector = ProbeCollector(["relation", "caption_length"], seed=0)
    for probed in batches:
        collector.update(capture(model, probed.inputs), probed)
    results = collector.results(test_fraction=0.5, l2_values=[0.01])
    assert set(results) == {"relation", "caption_length"}
    assert set(results["relation"]["attention"].classes) <= predicates

    out = tmp_path / "analysis"
    run_analyze(tiny_checkpoint, out, "--batches", "1", "--grounding", "visual_genome",
                "--probe-shards", str(relations_split), "--test-fraction", "0.5")
    written = json.loads((out / "results.json").read_text())
    assert written["probe_data"] == {"shards": str(relations_split), "grounding": "visual_genome"}
    assert set(written["probes"]["trained"]) == {"relation", "caption_length"}
    assert set(written["probes"]["mismatched"]) == {"relation"}
