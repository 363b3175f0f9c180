import typing
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_batch, tiny_config
from transformers import BertConfig, BertModel

from soho.config import ConfigError
from soho.models import SohoForPretraining
from soho.models.config import EncoderConfig
from soho.models.encoder import Encoder, Pooler, TextEmbeddings, TransformerLayer, bert_state_dict_to_soho

# What each configurable activation name means (BERT's and GPT-2's GELU, its tanh approximation, ReLU).
REFERENCE_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": partial(F.gelu, approximate="tanh"),
                         "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu}


def tiny_bert_config(**overrides):
    values = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=40, type_vocab_size=2)
    values.update(overrides)
    return values


class TextEncoder(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.text_embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config.hidden_size)


def load_bert_into_text_encoder(bert, config):
    model = TextEncoder(config).eval()
    converted = bert_state_dict_to_soho(bert.state_dict())
    result = model.load_state_dict(converted, strict=False)
    assert not result.missing_keys, result.missing_keys
    return model


def test_every_configurable_activation_is_the_function_its_name_says():
    names = typing.get_args(typing.get_type_hints(EncoderConfig)["hidden_act"])
    assert set(names) == set(REFERENCE_ACTIVATIONS)
    x = torch.linspace(-8, 8, 4001)
    for name in names:
        layer = TransformerLayer(EncoderConfig(**tiny_bert_config(hidden_act=name)))
        torch.testing.assert_close(layer.activation(x), REFERENCE_ACTIVATIONS[name](x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_text_forward_matches_huggingface_bert(act):
    torch.manual_seed(0)
    values = tiny_bert_config(hidden_act=act)
    bert = BertModel(BertConfig(**values)).eval()
    # Random, non-trivial LayerNorm and bias values so the mapping is really exercised.
    with torch.no_grad():
        for name, p in bert.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.normal_(0, 0.5)
    config = EncoderConfig(**values)
    ours = load_bert_into_text_encoder(bert, config)
    input_ids = torch.randint(1, 99, (3, 11))
    attention_mask = torch.ones(3, 11, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    token_type_ids = torch.randint(0, 2, (3, 11))
    with torch.no_grad():
        expected = bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        text = ours.text_embeddings(input_ids, token_type_ids)
        out = ours.encoder(text, attention_mask)
        pooled = ours.pooler(out.text_states[:, 0])
        # The analysis path (explicit probabilities) must agree with the fused SDPA path.
        explicit = ours.encoder(text, attention_mask, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(out.text_states, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, expected.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit.text_states, out.text_states, atol=1e-5, rtol=1e-5)
    assert len(explicit.attentions) == 2 and explicit.attentions[0].shape == (3, 4, 11, 11)
    assert len(explicit.hidden_states) == 3
    # Probabilities put no mass on padded keys and sum to one over keys.
    probs = explicit.attentions[1]
    assert probs[2, :, :, 4:].abs().max() == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 11))


def test_merged_fusion_concatenates_and_masks():
    torch.manual_seed(0)
    config = EncoderConfig(**tiny_bert_config(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = Encoder(config).eval()
    text = torch.randn(2, 5, 32)
    image = torch.randn(2, 6, 32)
    text_mask = torch.ones(2, 5, dtype=torch.bool)
    image_mask = torch.ones(2, 6, dtype=torch.bool)
    image_mask[1, 4:] = False
    out = encoder(text, text_mask, image, image_mask, output_attentions=True)
    assert out.text_states.shape == (2, 5, 32) and out.image_states.shape == (2, 6, 32)
    assert out.attentions[0][1, :, :, 9:].abs().max() == 0
    # Changing a padded image token changes nothing for the valid tokens.
    image2 = image.clone()
    image2[1, 5] += 10
    out2 = encoder(text, text_mask, image2, image_mask)
    torch.testing.assert_close(out2.text_states, out.text_states)
    torch.testing.assert_close(out2.image_states[:, :4], out.image_states[:, :4])
    with pytest.raises(ValueError, match="padding mask"):
        encoder(text, None, image, image_mask)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    config = EncoderConfig(**tiny_bert_config(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    plain = Encoder(config).train()
    checkpointed = Encoder(EncoderConfig(**tiny_bert_config(), hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    for model in (plain, checkpointed):
        model(x, mask).text_states.pow(2).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


FUSIONS = {
    "merged": {},
    "co_attention": {"fusion": "co_attention"},
    "modality_specific": {"fusion": "modality_specific", "modality_specific_layers": 1},
    "asymmetric_text": {"fusion": "asymmetric", "asymmetric_queries": "text"},
    "asymmetric_image": {"fusion": "asymmetric", "asymmetric_queries": "image"},
}


def fusion_encoder(name, **overrides):
    torch.manual_seed(0)
    values = dict(tiny_bert_config(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **FUSIONS[name])
    values.update(overrides)
    return Encoder(EncoderConfig(**values)).eval()


def padded_pair():
    """Two samples of 5 text and 6 image tokens; sample 1 has 3 valid text tokens, sample 0 has 4 valid image tokens."""
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(2, 5, 32, generator=generator)
    image = torch.randn(2, 6, 32, generator=generator)
    text_mask = torch.ones(2, 5, dtype=torch.bool)
    text_mask[1, 3:] = False
    image_mask = torch.ones(2, 6, dtype=torch.bool)
    image_mask[0, 4:] = False
    return text, text_mask, image, image_mask


def moved(states, mask=None):
    """A copy with the tokens where ``mask`` is False (all tokens by default) shifted far away."""
    shifted = states.clone()
    keep = torch.zeros(states.shape[:2], dtype=torch.bool) if mask is None else mask
    shifted[~keep] += 10.0
    return shifted


@pytest.mark.parametrize("name", FUSIONS)
def test_every_fusion_keeps_shapes_and_ignores_padding(name):
    encoder = fusion_encoder(name)
    text, text_mask, image, image_mask = padded_pair()
    out = encoder(text, text_mask, image, image_mask, output_attentions=True, output_hidden_states=True)
    heads = 8 if name == "co_attention" else 4
    assert out.text_states.shape == (2, 5, 32) and out.image_states.shape == (2, 6, 32)
    assert [h.shape for h in out.hidden_states] == [(2, 11, 32)] * 3
    assert [a.shape for a in out.attentions] == [(2, heads, 11, 11)] * 2
    padded_keys = ~torch.cat([text_mask, image_mask], dim=1)[:, None, None, :].expand(2, heads, 11, 11)
    for probs in out.attentions:
        assert probs[padded_keys].abs().max() == 0
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, heads, 11))
    fast = encoder(text, text_mask, image, image_mask)
    torch.testing.assert_close(fast.text_states, out.text_states)
    torch.testing.assert_close(fast.image_states, out.image_states)
    shifted = encoder(moved(text, text_mask), text_mask, moved(image, image_mask), image_mask)
    torch.testing.assert_close(shifted.text_states[text_mask], out.text_states[text_mask])
    torch.testing.assert_close(shifted.image_states[image_mask], out.image_states[image_mask])


def sees(probs, text_length=5):
    """Which query -> key blocks carry attention: text->text, text->image, image->text, image->image."""
    t = text_length
    blocks = (probs[..., :t, :t], probs[..., :t, t:], probs[..., t:, :t], probs[..., t:, t:])
    return tuple(bool(block.sum() > 0) for block in blocks)


def test_attention_maps_show_who_attends_to_whom():
    text, text_mask, image, image_mask = padded_pair()
    maps = {name: fusion_encoder(name)(text, text_mask, image, image_mask, output_attentions=True).attentions
            for name in FUSIONS}
    everything = (True, True, True, True)
    assert [sees(a) for a in maps["merged"]] == [everything] * 2
    assert [sees(a) for a in maps["modality_specific"]] == [(True, False, False, True), everything]
    assert [sees(a) for a in maps["asymmetric_text"]] == [(True, True, False, True)] * 2
    assert [sees(a) for a in maps["asymmetric_image"]] == [(True, False, True, True)] * 2
    # co_attention: the first 4 heads are the cross-attention, the last 4 the self-attention.
    assert [sees(a[:, :4]) for a in maps["co_attention"]] == [(False, True, True, False)] * 2
    assert [sees(a[:, 4:]) for a in maps["co_attention"]] == [(True, False, False, True)] * 2


def test_modality_specific_layers_keep_the_modalities_apart():
    text, text_mask, image, image_mask = padded_pair()
    specific_only = fusion_encoder("modality_specific", num_hidden_layers=1)
    out = specific_only(text, text_mask, image, image_mask)
    other_image = specific_only(text, text_mask, moved(image), image_mask)
    other_text = specific_only(moved(text), text_mask, image, image_mask)
    torch.testing.assert_close(other_image.text_states, out.text_states)
    torch.testing.assert_close(other_text.image_states, out.image_states)
    # Separate weights: each stream is a BERT layer of its own, run on its own modality alone.
    text_alone = fusion_encoder("merged", num_hidden_layers=1)
    text_alone.layers[0].load_state_dict(specific_only.layers[0].text.state_dict())
    image_alone = fusion_encoder("merged", num_hidden_layers=1)
    image_alone.layers[0].load_state_dict(specific_only.layers[0].image.state_dict())
    torch.testing.assert_close(out.text_states, text_alone(text, text_mask).text_states)
    torch.testing.assert_close(out.image_states, image_alone(image=image, image_mask=image_mask).image_states)
    # One specific layer, then a merged one: independent after the first layer, fused after the second.
    encoder = fusion_encoder("modality_specific")
    out = encoder(text, text_mask, image, image_mask, output_hidden_states=True)
    other = encoder(text, text_mask, moved(image), image_mask, output_hidden_states=True)
    torch.testing.assert_close(other.hidden_states[1][:, :5], out.hidden_states[1][:, :5])
    assert not torch.allclose(other.text_states, out.text_states)


@pytest.mark.parametrize("crossing", ["text", "image"])
def test_asymmetric_only_one_modality_crosses_over(crossing):
    text, text_mask, image, image_mask = padded_pair()
    encoder = fusion_encoder(f"asymmetric_{crossing}")
    out = encoder(text, text_mask, image, image_mask)
    other_text = encoder(moved(text), text_mask, image, image_mask)
    other_image = encoder(text, text_mask, moved(image), image_mask)
    if crossing == "text":
        torch.testing.assert_close(other_text.image_states, out.image_states)
        assert not torch.allclose(other_image.text_states, out.text_states)
    else:
        torch.testing.assert_close(other_image.text_states, out.text_states)
        assert not torch.allclose(other_text.image_states, out.image_states)
    # Same parameters as merged: in one layer the crossing modality's rows are the merged layer's,
    # the other modality's rows are the merged layer run on that modality alone.
    one_layer = fusion_encoder(f"asymmetric_{crossing}", num_hidden_layers=1)
    merged = fusion_encoder("merged", num_hidden_layers=1)
    merged.load_state_dict(one_layer.state_dict())
    out = one_layer(text, text_mask, image, image_mask)
    both = merged(text, text_mask, image, image_mask)
    if crossing == "text":
        torch.testing.assert_close(out.text_states, both.text_states)
        torch.testing.assert_close(out.image_states, merged(image=image, image_mask=image_mask).image_states)
    else:
        torch.testing.assert_close(out.image_states, both.image_states)
        torch.testing.assert_close(out.text_states, merged(text, text_mask).text_states)


def test_co_attention_crosses_first_then_attends_to_itself():
    text, text_mask, image, image_mask = padded_pair()
    encoder = fusion_encoder("co_attention", num_hidden_layers=1)
    out = encoder(text, text_mask, image, image_mask)
    assert not torch.allclose(encoder(text, text_mask, moved(image), image_mask).text_states, out.text_states)
    assert not torch.allclose(encoder(moved(text), text_mask, image, image_mask).image_states, out.image_states)
    layer = encoder.layers[0]
    # Both cross-attentions read the layer's input: the image queries the text before its update.
    crossed_text, _ = layer.text_cross(text, image, image_mask)
    crossed_image, _ = layer.image_cross(image, text, text_mask)
    torch.testing.assert_close(out.text_states, layer.text(crossed_text, text_mask)[0])
    torch.testing.assert_close(out.image_states, layer.image(crossed_image, image_mask)[0])
    # A single modality has nothing to cross to: only its own stream runs.
    torch.testing.assert_close(encoder(text, text_mask).text_states, layer.text(text, text_mask)[0])


@pytest.mark.parametrize("name", FUSIONS)
def test_every_parameter_gets_gradients_with_and_without_checkpointing(name):
    text, text_mask, image, image_mask = padded_pair()
    weights = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(2))
    plain = fusion_encoder(name).train()
    checkpointed = fusion_encoder(name, gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    for model in (plain, checkpointed):
        out = model(text, text_mask, image, image_mask)
        (torch.cat([out.text_states, out.image_states], dim=1) * weights).sum().backward()
    for (parameter_name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert a.grad is not None and a.grad.abs().sum() > 0, parameter_name
        torch.testing.assert_close(a.grad, b.grad, msg=parameter_name)


def test_parameter_counts_per_fusion():
    hidden, intermediate = 32, 64
    projections = 4 * (hidden * hidden + hidden)  # query, key, value, attention output
    norm = 2 * hidden
    layer = projections + norm + (hidden * intermediate + intermediate) + (intermediate * hidden + hidden) + norm
    cross = projections + norm
    expected = {
        "merged": 2 * layer,  # 17,088
        "asymmetric_text": 2 * layer,
        "asymmetric_image": 2 * layer,
        "modality_specific": 2 * layer + layer,  # 25,632: one layer per modality, then one merged layer
        "co_attention": 2 * (2 * layer + 2 * cross),  # 51,328: per layer two streams, each with a cross-attention
    }
    counts = {name: sum(p.numel() for p in fusion_encoder(name).parameters()) for name in FUSIONS}
    assert counts == expected
    assert counts["merged"] == 17088 and counts["co_attention"] == 51328


@pytest.mark.parametrize("values, key", [
    (dict(fusion="fused"), "encoder.fusion"),
    (dict(fusion="modality_specific"), "encoder.modality_specific_layers"),
    (dict(fusion="modality_specific", modality_specific_layers=3), "encoder.modality_specific_layers"),
    (dict(modality_specific_layers=1), "encoder.modality_specific_layers"),
    (dict(fusion="asymmetric"), "encoder.asymmetric_queries"),
    (dict(asymmetric_queries="text"), "encoder.asymmetric_queries"),
])
def test_bad_fusion_settings_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        EncoderConfig(**tiny_bert_config(), **values)


def test_asymmetric_loads_bert_like_merged():
    torch.manual_seed(0)
    bert = BertModel(BertConfig(**tiny_bert_config())).eval()
    config = EncoderConfig(**tiny_bert_config(), fusion="asymmetric", asymmetric_queries="image")
    ours = load_bert_into_text_encoder(bert, config)
    input_ids = torch.randint(1, 99, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        expected = bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        states = ours.encoder(ours.text_embeddings(input_ids), mask).text_states
    torch.testing.assert_close(states, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FUSIONS)
def test_pretraining_forward_runs_for_every_fusion(name):
    overrides = {f"encoder.{key}": value for key, value in FUSIONS[name].items()}
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**overrides, **{"itc.enabled": True})).train()
    out = model(**tiny_batch(num_images=2, size=32))
    assert set(out.losses) == {"mlm", "itm", "mvm", "itc"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    missing = [n for n, p in model.soho.encoder.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
