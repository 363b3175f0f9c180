import pytest
import torch
from transformers import BertConfig, BertModel

from soho.models.config import EncoderConfig
from soho.models.encoder import Encoder, Pooler, TextEmbeddings, bert_state_dict_to_soho


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
