import copy
import json

import pytest
import torch
from conftest import VOCAB, tiny_batch, tiny_config
from transformers import BertConfig, BertForPreTraining

from soho.models import SohoForPretraining, SohoModel
from soho.models.visual_dictionary import VisualDictionary


def test_pretraining_forward_backward_reaches_backbone_not_dictionary(config):
    torch.manual_seed(0)
    model = SohoForPretraining(config).train()
    before = model.soho.visual_dictionary.embedding.clone()
    out = model(**tiny_batch())
    assert set(out.losses) == {"mlm", "itm", "mvm"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    for key in ("itm_acc", "mlm_acc", "mvm_acc", "vd_perplexity", "vd_used_fraction", "vd_live_fraction"):
        assert key in out.metrics
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    backbone_grads = [g for n, g in grads.items() if n.startswith("soho.backbone") and g is not None]
    assert backbone_grads and any(g.abs().sum() > 0 for g in backbone_grads), "straight-through must reach the CNN"
    assert not any(p.requires_grad for p in model.soho.visual_dictionary.parameters())
    assert model.soho.visual_dictionary.embedding.grad is None
    # The EMA update moved the dictionary; gradients never do.
    assert not torch.equal(before, model.soho.visual_dictionary.embedding)


def test_several_captions_share_one_backbone_pass(config):
    model = SohoForPretraining(config).eval()
    batch = tiny_batch(num_images=3, captions_per_image=3)
    calls = []
    model.soho.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model(**batch)
    assert calls == [3]


def test_portrait_padding_mask_is_height_by_width(config):
    model = SohoModel(config).eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    pixel_mask = torch.zeros(1, 64, 96, dtype=torch.long)
    pixel_mask[:, :, :40] = 1
    grid = model.embed_image(pixel_values, pixel_mask)
    assert grid.mask.shape == (1, 4, 6)
    # 40 valid columns at stride 16 -> 3 columns of cells; every row is valid.
    assert grid.mask[0].sum(1).tolist() == [3, 3, 3, 3]
    assert grid.mask[0, :, :3].all() and not grid.mask[0, :, 3:].any()


def test_padding_does_not_change_the_outputs_of_real_tokens(config):
    torch.manual_seed(0)
    model = SohoForPretraining(config).eval()
    image = torch.randn(1, 3, 64, 64)
    padded = torch.zeros(1, 3, 64, 128)
    padded[..., :64] = image
    mask = torch.zeros(1, 64, 128, dtype=torch.long)
    mask[..., :64] = 1
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    a = model.score(image, ids)
    # BatchNorm in eval mode and a fully convolutional CNN: padding only adds masked tokens.
    b = model.score(padded, ids, pixel_mask=mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_itc_and_hard_negatives(tmp_path):
    config = tiny_config(**{"itc.enabled": True, "itm.hard_negatives": True})
    model = SohoForPretraining(config).train()
    out = model(**tiny_batch())
    assert {"itc", "itm", "mlm", "mvm"} == set(out.losses)
    out.loss.backward()
    assert model.objective("itc").head.log_temperature.grad is not None
    model.eval()
    batch = tiny_batch()
    images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
    texts = model.encode_texts(batch["input_ids"], batch["attention_mask"])
    assert images.shape == (4, 256) and texts.shape == (8, 256)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(4))


def test_encode_without_itc_is_a_clear_error(config):
    model = SohoForPretraining(config).eval()
    with pytest.raises(RuntimeError, match="itc.enabled"):
        model.encode_texts(torch.tensor([[2, 3]]))


def test_score_is_a_probability_per_pair(config):
    model = SohoForPretraining(config).eval()
    batch = tiny_batch()
    probs = model.score(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                        pixel_mask=batch["pixel_mask"], image_index=batch["image_index"])
    assert probs.shape == (8,) and ((probs >= 0) & (probs <= 1)).all()


def test_save_and_load_give_identical_outputs(tmp_path, config):
    torch.manual_seed(0)
    model = SohoForPretraining(config).train()
    model(**tiny_batch())  # moves the dictionary and BatchNorm statistics away from their init
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["architecture"] == "SohoForPretraining"
    loaded = SohoForPretraining.from_pretrained(tmp_path / "ckpt").eval()
    torch.testing.assert_close(loaded.soho.visual_dictionary.embedding, model.soho.visual_dictionary.embedding)
    batch = tiny_batch()
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    kwargs = dict(pixel_mask=batch["pixel_mask"], image_index=batch["image_index"])
    torch.testing.assert_close(loaded.score(*args, **kwargs), model.score(*args, **kwargs), rtol=0, atol=0)
    # The bare model loads from the pre-training checkpoint, and gives the same encoder outputs.
    bare = SohoModel.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        a = bare(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], image_index=batch["image_index"])
        b = model.soho(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       image_index=batch["image_index"])
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)


def test_checkpoints_with_heads_beside_the_model_still_load(tmp_path):
    """Before objectives were modules, heads were saved as mlm_head.*, itm_head.*, itc_head.*, mvm_head.*."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**{"itc.enabled": True})).eval()
    model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    legacy = {key.replace("objectives.", "", 1).replace(".head.", "_head.", 1) if key.startswith("objectives.")
              else key: tensor for key, tensor in load_file(str(weights)).items()}
    assert {"mlm_head.bias", "itm_head.classifier.weight", "itc_head.log_temperature"} <= set(legacy)
    save_file(legacy, str(weights))
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del record["sha256"]  # which such checkpoints predate as well
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(record))
    loaded = SohoForPretraining.from_pretrained(tmp_path / "ckpt").eval()  # strict: every tensor placed
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_pickled_checkpoints_are_refused(tmp_path, config):
    model = SohoForPretraining(config)
    directory = tmp_path / "pickled"
    directory.mkdir()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refuses to unpickle"):
        SohoForPretraining.from_pretrained(directory)
    with pytest.raises(FileNotFoundError, match="not found"):
        SohoForPretraining.from_pretrained(tmp_path / "nowhere")


def test_damaged_weights_are_refused_by_name(tmp_path, config):
    SohoForPretraining(config).save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10  # one flipped bit in a weight: safetensors itself would load it
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{weights} is damaged: its sha256 differs"):
        SohoForPretraining.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("change, message", [
    (lambda b: b["image_index"].__setitem__(0, 4), r"image_index must be in \[0, 4\), got values from 0 to 4"),
    (lambda b: b["image_index"].__setitem__(0, -1), r"image_index must be in \[0, 4\), got values from -1"),
    (lambda b: b["input_ids"].__setitem__((0, 1), VOCAB), rf"input_ids must be in \[0, {VOCAB}\)"),
    (lambda b: b["mlm_input_ids"].__setitem__((0, 1), VOCAB + 5), rf"mlm_input_ids must be in \[0, {VOCAB}\)"),
    (lambda b: b["pixel_values"].__setitem__((1, 0, 0, 0), float("nan")), "pixel_values holds NaN or infinite"),
])
def test_model_entry_points_name_bad_inputs(config, change, message):
    model = SohoForPretraining(config)
    batch = tiny_batch()
    change(batch)
    with pytest.raises(ValueError, match=message):
        model(**batch)
    if "mlm" not in message:  # the bare model and the pair scores check the same inputs
        inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "image_index")}
        with pytest.raises(ValueError, match=message):
            model.score(**inputs)


def test_initialisation_from_a_local_bert_checkpoint(tmp_path):
    torch.manual_seed(0)
    bert_config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=32)
    bert = BertForPreTraining(bert_config).eval()
    with torch.no_grad():
        for name, p in bert.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    bert.save_pretrained(tmp_path / "bert")
    model = SohoForPretraining(tiny_config(**{"encoder.pretrained_path": str(tmp_path / "bert")})).eval()
    ids = torch.randint(5, VOCAB, (2, 7))
    with torch.no_grad():
        expected = bert(input_ids=ids, output_hidden_states=True)
        out = model.soho(input_ids=ids)
        logits = model.objective("mlm").head(out.text_states, model.soho.text_embeddings.word_embeddings.weight)
    torch.testing.assert_close(out.text_states, expected.hidden_states[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected.prediction_logits, atol=1e-4, rtol=1e-4)
    # A general score's W has no BERT counterpart; it starts as scaled dot, so BERT's outputs are kept.
    general = SohoForPretraining(tiny_config(**{"encoder.pretrained_path": str(tmp_path / "bert"),
                                                "encoder.attention.score": "general_qwk"})).eval()
    with torch.no_grad():
        torch.testing.assert_close(general.soho(input_ids=ids).text_states, expected.hidden_states[-1],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        SohoForPretraining(tiny_config(**{"encoder.pretrained_path": str(tmp_path / "bert"),
                                          "encoder.num_hidden_layers": 3}))

    # Two-stream designs start every stream (and co-attention's cross-attentions) from BERT layer i, so a
    # text-only pass is BERT's.
    layer = dict(bert.bert.encoder.layer[1].named_parameters())
    for fusion in ({"encoder.fusion": "co_attention"},
                   {"encoder.fusion": "modality_specific", "encoder.modality_specific_layers": 1}):
        two_stream = SohoForPretraining(tiny_config(**{"encoder.pretrained_path": str(tmp_path / "bert"),
                                                       **fusion})).eval()
        with torch.no_grad():
            torch.testing.assert_close(two_stream.soho(input_ids=ids).text_states, expected.hidden_states[-1],
                                       atol=1e-5, rtol=1e-5)
        first = two_stream.soho.encoder.layers[0]
        assert torch.equal(first.image.intermediate.weight, bert.bert.encoder.layer[0].intermediate.dense.weight)
        second = two_stream.soho.encoder.layers[1]
        if fusion["encoder.fusion"] == "co_attention":
            for cross in (second.text_cross, second.image_cross):
                assert torch.equal(cross.attention.key.weight, layer["attention.self.key.weight"])
                assert torch.equal(cross.attention_output.weight, layer["attention.output.dense.weight"])
                assert torch.equal(cross.attention_norm.bias, layer["attention.output.LayerNorm.bias"])
        else:  # the merged layer after the specific one
            assert torch.equal(second.output.weight, layer["output.dense.weight"])


def test_loss_decreases_when_overfitting_one_batch(config):
    torch.manual_seed(0)
    model = SohoForPretraining(config).train()
    batch = tiny_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # same ITM swaps and MVM masks every step
        out = model(**batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_library_round_trip_with_processor(tmp_path):
    """The README's library example: save model + processor together, load, score raw images and texts."""
    import numpy as np

    from soho import SohoProcessor, train_wordpiece_tokenizer
    from soho.processing import ImageTransformConfig

    tokenizer = train_wordpiece_tokenizer(["a red circle", "two blue squares"] * 5, tmp_path / "tok", vocab_size=VOCAB)
    processor = SohoProcessor(tokenizer, ImageTransformConfig(min_size=64, max_size=96))
    model = SohoForPretraining(tiny_config()).eval()
    model.save_pretrained(tmp_path / "ckpt", processor=processor)
    loaded = SohoForPretraining.from_pretrained(tmp_path / "ckpt").eval()
    loaded_processor = SohoProcessor.from_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), rng.integers(0, 255, (80, 40, 3), dtype=np.uint8)]
    inputs = loaded_processor(images=images, text=["a red circle", "two blue squares"])
    probs = loaded.score(**inputs)
    torch.testing.assert_close(probs, model.score(**processor(images=images, text=["a red circle",
                                                                                    "two blue squares"])))
    assert probs.shape == (2,)


def test_mvm_classifier_head_and_ruling_out_visible_entries():
    torch.manual_seed(0)
    config = tiny_config(**{"mvm.score": "classifier", "mvm.exclude_visible": True})
    model = SohoForPretraining(config)
    assert model.objective("mvm").head.decoder.out_features == config.visual_dictionary.size
    losses, twins = {}, {}
    for exclude in (True, False):
        twin = twins[exclude] = copy.deepcopy(model).train()
        twin.config.mvm.exclude_visible = exclude
        torch.manual_seed(1)
        out = twin(**tiny_batch())
        losses[exclude] = out.losses["mvm"]
        assert out.labels["mvm"].numel() > 0
    # Same masks and logits; ruling out entries that cannot be the answer only lowers the loss.
    assert losses[True].item() < losses[False].item()
    losses[True].backward()
    assert twins[True].objective("mvm").head.decoder.weight.grad.abs().sum() > 0
    with pytest.raises(Exception, match="mvm.score"):
        tiny_config(**{"mvm.score": "dot"})


def test_a_new_objective_is_one_registered_module():
    from torch import nn

    from soho.config import ConfigError
    from soho.models.objectives import OBJECTIVES, Objective, ObjectiveOutput, register_objective

    @register_objective
    class CaptionLength(Objective):
        """Is the caption longer than six tokens? From the shared pass's [CLS], on every pair."""

        name = "caption_length"

        def __init__(self, config):
            super().__init__(config)
            self.head = nn.Linear(config.encoder.hidden_size, 2)

        def forward(self, model, step):
            labels = (step.attention_mask.sum(1) > 6).long()
            logits = self.head(step.fused.text_states[:, 0])
            return ObjectiveOutput(loss=nn.functional.cross_entropy(logits, labels), labels=labels)

    try:
        model = SohoForPretraining(tiny_config(**{"loss_weights.caption_length": 0.5})).train()
        out = model(**tiny_batch())
        assert set(out.losses) == {"mlm", "itm", "mvm", "caption_length"}
        expected = sum(out.losses[n] for n in ("mlm", "itm", "mvm")) + 0.5 * out.losses["caption_length"]
        torch.testing.assert_close(out.loss, expected)
        out.loss.backward()
        assert model.objective("caption_length").head.weight.grad.abs().sum() > 0
        with pytest.raises(ConfigError, match=r"loss_weights.caption_lenght: no objective named"):
            SohoForPretraining(tiny_config(**{"loss_weights.caption_lenght": 1.0}))
    finally:
        del OBJECTIVES["caption_length"]


def test_itm_negatives_are_false_of_the_image_and_labels_follow_truth():
    torch.manual_seed(0)
    config = tiny_config(**{"itm.negative_probability": 1.0, "loss_weights.mvm": 0.0})
    model = SohoForPretraining(config).train()
    batch = tiny_batch(num_images=4, captions_per_image=2)
    truth = torch.eye(4, dtype=torch.bool).repeat_interleave(2, 0)
    truth[0, 1] = truth[0, 2] = True  # caption 0 is also true of images 1 and 2: only image 3 is a negative
    truth[2:4] = True  # the captions of image 1 are true of every image: no negative, shown with their own
    partners = []
    model.soho.register_forward_hook(lambda module, args, kwargs, out: partners.append(kwargs.get("image_index")),
                                     with_kwargs=True)
    for seed in range(20):
        torch.manual_seed(seed)
        partners.clear()
        out = model(**batch, caption_truth=truth)
        shown = partners[-1]
        assert shown[0] == 3 and (shown[2:4] == 1).all()
        assert not truth[torch.arange(8), shown][[0, 1, 4, 5, 6, 7]].any()
        torch.testing.assert_close(out.labels["itm"], truth[torch.arange(8), shown].long())
    # Without truth, a negative is any other image, labelled by image identity.
    model.config.itm.use_truth = False
    out = model(**batch, caption_truth=truth)
    assert (out.labels["itm"][2:4] == 0).all()


@pytest.mark.parametrize("tokens", ["entries", "features", "gated"])
def test_what_the_transformer_reads_of_each_cell(tokens):
    torch.manual_seed(0)
    model = SohoModel(tiny_config(**{"visual_dictionary.tokens": tokens})).eval()
    images = torch.randn(2, 3, 64, 64)
    grid = model.embed_image(images)
    features = model.backbone(images).permute(0, 2, 3, 1)
    entries = model.visual_dictionary.embedding[grid.indices]
    if tokens == "entries":
        torch.testing.assert_close(grid.features, entries)
    elif tokens == "features":
        torch.testing.assert_close(grid.features, features)
    else:  # a convex mix of the two, per cell
        gate = model.token_gate(torch.cat([entries, features], -1)).softmax(-1)
        torch.testing.assert_close(grid.features, gate[..., :1] * entries + gate[..., 1:] * features)
        assert model.token_gate is not None
    assert (model.token_gate is not None) == (tokens == "gated")


def test_entries_after_the_update_are_the_releases_quantisation():
    torch.manual_seed(0)
    features = torch.randn(40, 32)
    outputs = {}
    for after in (False, True):
        torch.manual_seed(1)
        dictionary = VisualDictionary(tiny_config(**{"visual_dictionary.entries_after_update": after}
                                                  ).visual_dictionary, 32).train()
        before = dictionary.embedding.clone()
        out = dictionary(features)
        outputs[after] = out.indices
        expected = (dictionary.embedding if after else before)[out.indices]
        torch.testing.assert_close(out.quantized, expected)
    assert torch.equal(outputs[False], outputs[True])  # the lookup is the same either way


def test_pre_norm_encoder_normalises_before_each_block_and_once_at_the_end():
    from soho.config import ConfigError
    from soho.models.config import EncoderConfig
    from soho.models.encoder import Encoder

    torch.manual_seed(0)
    config = EncoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pre_norm=True)
    encoder = Encoder(config).eval()
    text, mask = torch.randn(2, 5, 32) * 5 + 3, torch.ones(2, 5, dtype=torch.bool)
    hidden = text
    for layer in encoder.layers:  # x + Attn(LN(x)), then x + FFN(LN(x))
        context, _ = layer.attention(layer.attention_norm(hidden), mask)
        hidden = hidden + layer.attention_output(context)
        hidden = hidden + layer.output(layer.activation(layer.intermediate(layer.output_norm(hidden))))
    torch.testing.assert_close(encoder(text=text, text_mask=mask).text_states, encoder.final_norm(hidden))
    with pytest.raises(ConfigError, match="encoder.pre_norm cannot load BERT"):
        EncoderConfig(pre_norm=True, pretrained_path="bert")


def test_paired_itm_shows_every_caption_with_its_own_image_and_with_a_false_one():
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**{"itm.pairing": "paired", "loss_weights.mvm": 0.0})).eval()
    batch = tiny_batch(num_images=4, captions_per_image=2)
    truth = torch.eye(4, dtype=torch.bool).repeat_interleave(2, 0)
    truth[2:4] = True  # the captions of image 1 are true of every image: no negative for them
    passes = []
    model.soho.register_forward_hook(lambda module, args, kwargs, out: passes.append(kwargs.get("image_index")),
                                     with_kwargs=True)
    out = model(**batch, caption_truth=truth)
    own, negatives = passes[-2], passes[-1]
    assert torch.equal(own, batch["image_index"])  # the shared pass (MLM, MVM) sees the own images
    assert negatives.shape == (6,) and not truth[[0, 1, 4, 5, 6, 7], negatives].any()
    assert out.labels["itm"].tolist() == [1] * 8 + [0] * 6
    # The accuracy is the classifier's on each pair fused alone.
    texts = torch.tensor([0, 1, 4, 5, 6, 7])
    scores = torch.cat([
        model.score(batch["pixel_values"], batch["mlm_input_ids"], batch["attention_mask"],
                    pixel_mask=batch["pixel_mask"], image_index=batch["image_index"]),
        model.score(batch["pixel_values"], batch["mlm_input_ids"][texts], batch["attention_mask"][texts],
                    pixel_mask=batch["pixel_mask"], image_index=negatives)])
    expected = ((scores > 0.5).long() == out.labels["itm"]).float().mean()
    assert out.metrics["itm_acc"].item() == pytest.approx(expected.item())


def test_near_miss_negatives_are_drawn_where_the_data_names_them():
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**{"itm.pairing": "paired", "itm.near_miss_probability": 1.0,
                                              "loss_weights.mvm": 0.0})).train()
    batch = tiny_batch(num_images=4, captions_per_image=2)
    truth = torch.eye(4, dtype=torch.bool).repeat_interleave(2, 0)
    near_miss = torch.zeros(8, 4, dtype=torch.bool)
    near_miss[0, 3] = near_miss[1, 2] = True  # the captions of image 0 miss images 3 and 2 by one attribute
    shown = []
    model.soho.register_forward_hook(lambda module, args, kwargs, out: shown.append(kwargs.get("image_index")),
                                     with_kwargs=True)
    for seed in range(10):
        torch.manual_seed(seed)
        model(**batch, caption_truth=truth, caption_near_miss=near_miss)
        assert shown[-1][:2].tolist() == [3, 2]  # always their near misses; the others draw among all false
    model.eval()  # held-out ITM keeps uniform negatives
    drawn = set()
    for seed in range(20):
        torch.manual_seed(seed)
        model(**batch, caption_truth=truth, caption_near_miss=near_miss)
        drawn.add(shown[-1][0].item())
    assert drawn == {1, 2, 3}
