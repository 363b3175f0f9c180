import math

import pytest
import torch
from conftest import tiny_batch, tiny_config

import soho.models.objectives.itm as itm_module
from soho.config import ConfigError
from soho.eval.retrieval import encode_gallery, itm_scores, retrieve
from soho.models import SohoForPretraining
from soho.models.losses import contrastive_itm_loss, ranked_first, ranked_first_chance
from soho.models.objectives import ClassificationMatching, ContrastiveMatching, PretrainingStep

# No MVM: its random cell masks would make the shared pass impossible to replay by hand.
CONTRASTIVE = {"itm.loss": "contrastive", "itm.contrastive_negatives": 2, "loss_weights.mvm": 0.0}


def test_loss_is_the_cross_entropy_towards_the_first_candidate():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.5, -1.0]])
    by_hand = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
               - math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(1.5) + math.exp(-1)))) / 2
    assert contrastive_itm_loss(scores).item() == pytest.approx(by_hand, rel=1e-6)
    # A ruled-out candidate leaves the softmax: row 1 becomes a two-way choice.
    valid = torch.tensor([[True, True, True], [True, True, False]])
    by_hand = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
               - math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(1.5)))) / 2
    assert contrastive_itm_loss(scores, valid).item() == pytest.approx(by_hand, rel=1e-6)


def test_accuracy_is_the_positive_ranking_first_and_chance_is_one_over_the_candidates():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.5, -1.0], [1.0, 1.0, 0.0], [1.0, 3.0, 0.0]])
    assert ranked_first(scores).item() == pytest.approx(1 / 4)  # a tie is a miss
    valid = torch.tensor([[True, True, True], [True, False, True], [True, True, True], [True, False, False]])
    assert ranked_first(scores, valid).item() == pytest.approx(3 / 4)
    assert ranked_first_chance(valid).item() == pytest.approx((1 / 3 + 1 / 2 + 1 / 3 + 1) / 4)
    assert ranked_first(torch.ones(5, 1)).item() == 1.0


def test_config_is_checked_and_classification_stays_the_default():
    with pytest.raises(ConfigError, match="itm.loss"):
        tiny_config(**{"itm.loss": "ranking"})
    with pytest.raises(ConfigError, match="itm.contrastive_negatives"):
        tiny_config(**{"itm.loss": "contrastive", "itm.contrastive_negatives": 0})
    model = SohoForPretraining(tiny_config())
    assert model.config.itm.loss == "classification"
    assert model.objective("itm").head.classifier.out_features == 2
    assert isinstance(model.objective("itm"), ClassificationMatching)
    assert isinstance(SohoForPretraining(tiny_config(**CONTRASTIVE)).objective("itm"), ContrastiveMatching)


def drawing_step(image_index, num_images, logits=None):
    """The fields of a step that drawing negatives reads."""
    return PretrainingStep(grid=None, input_ids=image_index[:, None], attention_mask=None, token_type_ids=None,
                           image_index=image_index, image_ids=torch.arange(num_images),
                           image_seeds=torch.arange(num_images), text_to_image_logits=logits)


def test_negatives_are_other_images_without_repeats_capped_by_the_batch():
    model = SohoForPretraining(tiny_config(**{**CONTRASTIVE, "itm.contrastive_negatives": 10}))
    itm = model.objective("itm")
    image_index = torch.arange(5).repeat_interleave(3)
    torch.manual_seed(0)
    negatives = itm.draw_negatives(drawing_step(image_index, 5), 5)
    assert negatives.shape == (15, 4)  # capped at the 4 other images
    for row, own in zip(negatives.tolist(), image_index.tolist()):
        assert sorted(row) == sorted(set(range(5)) - {own})
    itm.config.itm.contrastive_negatives = 2
    negatives = itm.draw_negatives(drawing_step(image_index, 5), 5)
    assert negatives.shape == (15, 2)
    assert (negatives != image_index[:, None]).all() and (negatives[:, 0] != negatives[:, 1]).all()
    # Hard negatives follow the ITC similarity: one image far above the rest is always drawn.
    logits = torch.zeros(15, 5)
    logits[:, 3] = 50.0
    itm.config.itm.hard_negatives = True
    hard = itm.draw_negatives(drawing_step(image_index, 5, logits), 5)
    texts_of_other_images = image_index != 3
    assert (hard[texts_of_other_images] == 3).any(1).all()
    assert (hard != image_index[:, None]).all()


def capture_scores(monkeypatch):
    captured = {}

    def spy(scores, valid=None):
        captured["scores"], captured["valid"] = scores.detach(), valid
        return contrastive_itm_loss(scores, valid)

    monkeypatch.setattr(itm_module, "contrastive_itm_loss", spy)
    return captured


def test_the_positive_is_candidate_zero_and_each_score_is_its_pair(monkeypatch):
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**CONTRASTIVE)).eval()
    batch = tiny_batch(num_images=4, captions_per_image=2)
    captured = capture_scores(monkeypatch)
    drawn = {}
    itm = model.objective("itm")
    draw = itm.draw_negatives
    itm.draw_negatives = lambda *args: drawn.setdefault("negatives", draw(*args))
    out = model(**batch)

    scores, negatives = captured["scores"], drawn["negatives"]
    assert scores.shape == (8, 3) and negatives.shape == (8, 2)
    assert set(out.losses) == {"itm", "mlm"} and "itm" not in out.labels
    # Every pass sees the masked text, as the classification pass does.
    images = torch.cat([batch["image_index"][:, None], negatives], dim=1)
    for column in range(3):
        by_pair = model.score(batch["pixel_values"], batch["mlm_input_ids"], batch["attention_mask"],
                              pixel_mask=batch["pixel_mask"], image_index=images[:, column])
        torch.testing.assert_close(scores[:, column], by_pair, atol=1e-5, rtol=1e-5)
    assert out.metrics["itm_acc"].item() == pytest.approx(ranked_first(scores).item())
    assert out.metrics["chance_itm_acc"].item() == pytest.approx(1 / 3)
    assert out.losses["itm"].item() == pytest.approx(contrastive_itm_loss(scores).item(), rel=1e-6)


def test_another_copy_of_the_own_image_is_not_a_negative(monkeypatch):
    model = SohoForPretraining(tiny_config(**{**CONTRASTIVE, "itm.contrastive_negatives": 3})).eval()
    batch = tiny_batch(num_images=4, captions_per_image=1)
    captured = capture_scores(monkeypatch)
    # Images 0 and 2 are the same image (same global id): each is dropped from the other's candidates.
    out = model(**batch, image_ids=torch.tensor([7, 8, 7, 9]))
    valid = captured["valid"]
    assert valid.sum(1).tolist() == [3, 4, 3, 4]
    assert out.metrics["chance_itm_acc"].item() == pytest.approx((1 / 3 + 1 / 4 + 1 / 3 + 1 / 4) / 4)


def test_gradients_reach_the_score_head_and_the_encoder_through_the_negatives():
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**{**CONTRASTIVE, "loss_weights.mlm": 0.0})).train()
    pooled = []

    def keep_gradient(module, inputs, output):
        output.retain_grad()
        pooled.append(output)

    model.soho.pooler.register_forward_hook(keep_gradient)
    out = model(**tiny_batch())
    assert set(out.losses) == {"itm"} and torch.isfinite(out.loss)
    out.loss.backward()
    # The shared pass (8 texts with their own images) and the negatives' pass (8 x 2 pairs) both learn.
    assert [p.shape[0] for p in pooled] == [8, 16]
    assert all(p.grad.abs().sum(1).gt(0).all() for p in pooled)
    assert model.objective("itm").head.score.weight.grad.abs().sum() > 0
    encoder_grads = [p.grad for n, p in model.named_parameters() if n.startswith("soho.encoder") and p.grad is not None]
    assert encoder_grads and any(g.abs().sum() > 0 for g in encoder_grads)


def test_one_image_means_no_negatives_and_nothing_to_learn():
    model = SohoForPretraining(tiny_config(**CONTRASTIVE)).train()
    out = model(**tiny_batch(num_images=1, captions_per_image=2))
    assert out.losses["itm"].item() == pytest.approx(0.0)
    assert out.metrics["chance_itm_acc"].item() == 1.0


def test_retrieval_ranks_by_the_contrastive_score(tmp_path):
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**CONTRASTIVE)).eval()
    batch = tiny_batch(num_images=3, captions_per_image=2, seed=1)
    gallery = encode_gallery(model, [(batch["pixel_values"], batch["pixel_mask"])],
                             [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}],
                             batch["image_index"])
    result = retrieve(model, gallery, "itm_all")
    texts, images = torch.arange(6).repeat_interleave(3), torch.arange(3).repeat(6)
    by_pair = model.score(batch["pixel_values"], batch["input_ids"][texts], batch["attention_mask"][texts],
                          pixel_mask=batch["pixel_mask"], image_index=images)
    torch.testing.assert_close(result.text_to_image, by_pair.view(6, 3), atol=1e-5, rtol=1e-5)
    # The scores are the score head's: moving its bias moves every score by as much.
    rows = torch.arange(6)
    before = itm_scores(model, gallery, rows, rows // 2)
    with torch.no_grad():
        model.objective("itm").head.score.bias += 2.5
    torch.testing.assert_close(itm_scores(model, gallery, rows, rows // 2), before + 2.5)

    model.save_pretrained(tmp_path / "contrastive")
    loaded = SohoForPretraining.from_pretrained(tmp_path / "contrastive").eval()
    torch.testing.assert_close(itm_scores(loaded, gallery, rows, rows // 2), before + 2.5)


def test_classification_scores_are_the_logit_margin_and_probability():
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config()).eval()
    pooled = torch.randn(5, 32)
    logits = model.objective("itm").head(pooled)
    torch.testing.assert_close(model.match_scores(pooled), logits[:, 1] - logits[:, 0])
    batch = tiny_batch(num_images=2, captions_per_image=1)
    out = model.soho(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    probability = model.score(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                              pixel_mask=batch["pixel_mask"])
    torch.testing.assert_close(probability, torch.sigmoid(model.match_scores(out.pooled)), atol=1e-6, rtol=1e-5)
