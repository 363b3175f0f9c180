import math

import pytest
import torch
from conftest import tiny_batch, tiny_config

from soho.eval.retrieval import chance_recall, encode_gallery, recall_metrics, retrieve
from soho.models.soho import SohoForPretraining

NEG = float("-inf")


def test_recall_with_several_captions_per_image_by_hand():
    # Image 0 has captions 0, 1; image 1 has caption 2; image 2 has captions 3, 4.
    text_image = torch.tensor([0, 0, 1, 2, 2])
    text_to_image = torch.tensor([
        [0.9, 0.1, 0.0],   # caption 0: its image first            -> rank 0
        [0.2, 0.8, 0.1],   # caption 1: image 0 second             -> rank 1
        [0.5, 0.4, 0.3],   # caption 2: image 1 second             -> rank 1
        [0.3, 0.2, 0.1],   # caption 3: image 2 last               -> rank 2
        [0.0, 0.1, 0.7],   # caption 4: first                      -> rank 0
    ])
    image_to_text = torch.tensor([
        [0.1, 0.2, 0.9, 0.8, 0.0],   # image 0: its best caption (1, 0.2) is third -> rank 2
        [0.5, 0.1, 0.6, 0.2, 0.3],   # image 1: caption 2 first                   -> rank 0
        [0.9, 0.1, 0.2, 0.3, 0.8],   # image 2: caption 4 (0.8) second; caption 3 is a positive,
    ])                                #          so only caption 0 is ahead       -> rank 1
    metrics = recall_metrics(text_to_image, image_to_text, text_image, ks=(1, 2))
    assert metrics["img_r1"] == pytest.approx(100 * 2 / 5)
    assert metrics["img_r2"] == pytest.approx(100 * 4 / 5)
    assert metrics["txt_r1"] == pytest.approx(100 * 1 / 3)
    assert metrics["txt_r2"] == pytest.approx(100 * 2 / 3)
    assert metrics["rsum"] == pytest.approx(100 * (2 / 5 + 4 / 5 + 1 / 3 + 2 / 3))


def test_unranked_items_never_count_as_hits():
    # A shortlist of 1 that missed: the true image is -inf, so no K finds it.
    text_image = torch.tensor([0, 1])
    t2i = torch.tensor([[NEG, 0.5], [NEG, 0.9]])
    i2t = torch.tensor([[0.1, NEG], [NEG, NEG]])
    metrics = recall_metrics(t2i, i2t, text_image, ks=(1, 10))
    assert metrics["img_r10"] == pytest.approx(50.0)
    assert metrics["txt_r10"] == pytest.approx(50.0)


def test_ties_with_the_true_item_count_against_it():
    # A model that scores every pair alike finds nothing; one tie behind a strict winner is rank 2.
    text_image = torch.tensor([0, 0, 1])
    same = recall_metrics(torch.zeros(3, 2), torch.zeros(2, 3), text_image, ks=(1, 2))
    assert same["img_r1"] == 0.0 and same["txt_r1"] == 0.0
    # An image's own captions never count as ahead of it: image 0 ties with caption 2 only (rank 1),
    # image 1 with captions 0 and 1 (rank 2).
    assert same["txt_r2"] == pytest.approx(50.0) and same["img_r2"] == pytest.approx(100.0)
    t2i = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.7, 0.5]])
    metrics = recall_metrics(t2i, t2i.t(), text_image, ks=(1,))
    assert metrics["img_r1"] == pytest.approx(100 / 3)  # caption 0 ties with image 1, caption 2 is beaten
    assert metrics["txt_r1"] == pytest.approx(50.0)  # image 0's best (0.9) wins; image 1's best (0.5) ties


def test_chance_recall():
    assert chance_recall(4, [1, 1, 1, 1], ks=(1,))["txt_r1"] == pytest.approx(25.0)
    # Two images with 5 captions each: a random first text belongs to the image half the time.
    assert chance_recall(2, [5, 5], ks=(1,))["txt_r1"] == pytest.approx(50.0)
    # One image of 2 with 5 captions among 10 texts, top 2: 1 - C(5,2)/C(10,2) = 1 - 10/45.
    assert chance_recall(2, [5, 5], ks=(2,))["txt_r2"] == pytest.approx(100 * (1 - 10 / 45))
    assert chance_recall(100, [5] * 100, ks=(10,))["img_r10"] == pytest.approx(10.0)


def gallery_batches(batch):
    pixels, masks = batch["pixel_values"], batch["pixel_mask"]
    images = [(pixels[:3], masks[:3]), (pixels[3:], masks[3:])]
    # Two text batches of different lengths: the gallery pads them to one length.
    texts = [{"input_ids": batch["input_ids"][:6], "attention_mask": batch["attention_mask"][:6]},
             {"input_ids": batch["input_ids"][6:, :7], "attention_mask": batch["attention_mask"][6:, :7]}]
    return images, texts, batch["image_index"]


@pytest.fixture(scope="module")
def gallery_setup():
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**{"itc.enabled": True})).eval()
    batch = tiny_batch(num_images=5, captions_per_image=2, seed=3)
    gallery = encode_gallery(model, *gallery_batches(batch))
    return model, batch, gallery


def test_itm_all_with_cached_images_matches_scoring_each_pair(gallery_setup):
    model, batch, gallery = gallery_setup
    result = retrieve(model, gallery, "itm_all", batch_size=7)
    assert result.cost["fusion_passes"] == 10 * 5
    lengths = [9] * 6 + [7] * 4
    for text in (0, 1, 7):
        for image in range(5):
            ids = batch["input_ids"][text:text + 1, :lengths[text]]
            mask = batch["attention_mask"][text:text + 1, :lengths[text]]
            probability = model.score(batch["pixel_values"][image:image + 1], ids, mask,
                                      pixel_mask=batch["pixel_mask"][image:image + 1])
            assert torch.sigmoid(result.text_to_image[text, image]).item() == pytest.approx(probability.item(),
                                                                                           abs=1e-5)


def test_protocols_agree_when_the_shortlist_covers_the_gallery(gallery_setup):
    model, batch, gallery = gallery_setup
    full = retrieve(model, gallery, "itm_all")
    reranked = retrieve(model, gallery, "itc_itm", k=5)
    torch.testing.assert_close(reranked.text_to_image, full.text_to_image, atol=1e-5, rtol=0)
    # Text retrieval re-ranks all 10 texts only when k covers them.
    reranked = retrieve(model, gallery, "itc_itm", k=10)
    torch.testing.assert_close(reranked.image_to_text, full.image_to_text, atol=1e-5, rtol=0)
    assert reranked.metrics == pytest.approx(full.metrics)
    assert reranked.cost["fusion_passes"] == 10 * 5 + 5 * 10

    itc = retrieve(model, gallery, "itc", k=10)
    cosine = gallery.text_embeds @ gallery.image_embeds.t()
    torch.testing.assert_close(itc.text_to_image, cosine, atol=1e-5, rtol=0)
    torch.testing.assert_close(itc.image_to_text, cosine.t(), atol=1e-5, rtol=0)
    assert itc.cost["fusion_passes"] == 0


def test_bf16_scoring_stays_close_to_float32_and_returns_float32(gallery_setup):
    model, batch, gallery = gallery_setup
    full = retrieve(model, gallery, "itm_all")
    for protocol in ("itm_all", "itc_itm"):
        half = retrieve(model, gallery, protocol, k=5, mixed_precision="bf16")
        assert half.text_to_image.dtype == torch.float32
        # bf16 keeps 8 bits of mantissa: scores agree to about 1 %, not to float32's 1e-5.
        scale = full.text_to_image.abs().max()
        assert (half.text_to_image - full.text_to_image).abs().max() < 0.05 * scale
        assert not torch.equal(half.text_to_image, full.text_to_image)
    with pytest.raises(ValueError, match="mixed_precision"):
        retrieve(model, gallery, "itm_all", mixed_precision="fp8")


def test_itc_protocols_need_an_itc_model():
    model = SohoForPretraining(tiny_config()).eval()
    batch = tiny_batch(num_images=2, captions_per_image=1)
    gallery = encode_gallery(model, [(batch["pixel_values"], batch["pixel_mask"])],
                             [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}],
                             batch["image_index"])
    with pytest.raises(ValueError, match="itc.enabled"):
        retrieve(model, gallery, "itc")
    assert math.isfinite(retrieve(model, gallery, "itm_all").metrics["rsum"])


def test_read_split_keeps_every_caption_and_counts_broken_samples(tmp_path):
    from test_pretraining import COLOURS, write_world

    from soho.data.retrieval import read_retrieval_split
    from soho.processing import ImageTransformConfig, SohoProcessor
    from soho.tokenizer import train_wordpiece_tokenizer

    write_world(tmp_path / "split", num_shards=1, per_shard=5, broken=True)
    tokenizer = train_wordpiece_tokenizer([f"a {c} picture the image is {c} something" for c in COLOURS] * 5,
                                          tmp_path / "tokenizer", vocab_size=100)
    processor = SohoProcessor(tokenizer, ImageTransformConfig(min_size=32, max_size=32, size_divisor=8), 12)
    split = read_retrieval_split(str(tmp_path / "split"), processor, batch_size=2)
    assert len(split.image_ids) == 5 and len(split.captions) == 15
    assert split.text_image.tolist() == [i for i in range(5) for _ in range(3)]
    assert [b[0].shape[0] for b in split.image_batches] == [2, 2, 1]
    assert sum(b["input_ids"].shape[0] for b in split.text_batches) == 15
    assert split.skipped == {"corrupt_image": 1, "bad_json": 1, "missing_image": 1}
    assert len(read_retrieval_split(str(tmp_path / "split"), processor, max_images=3).image_ids) == 3


def test_oracle_recall_is_the_best_any_scorer_can_expect():
    from soho.eval.retrieval import chance_recall, oracle_recall

    text_image = torch.tensor([0, 0, 1, 1, 2, 2])
    truth = torch.zeros(6, 3, dtype=torch.bool)
    truth[torch.arange(6), text_image] = True
    truth[0] = True  # caption 0 (of image 0) is true of every image
    ceiling = oracle_recall(truth, text_image, ks=(1, 2))
    # Image retrieval: caption 0 finds its image first 1 time in 3 (2 in 3 within two); the others always.
    assert ceiling["img_r1"] == pytest.approx(100 * (1 / 3 + 5) / 6)
    assert ceiling["img_r2"] == pytest.approx(100 * (2 / 3 + 5) / 6)
    # Text retrieval: each image's specific captions come before caption 0, which fits every image.
    assert ceiling["txt_r1"] == pytest.approx(100.0)
    # Captions true of everything leave the oracle no better than chance.
    everything = oracle_recall(torch.ones(6, 3, dtype=torch.bool), text_image, ks=(1, 2))
    assert everything == pytest.approx(chance_recall(3, [2, 2, 2], ks=(1, 2)))
