import math

import pytest
import torch
from conftest import tiny_config

from soho.config import ConfigError, from_dict
from soho.models.attention import (
    SCORE_ACTIVATION_FUNCTIONS,
    SCORE_FUNCTIONS,
    MultiHeadAttention,
    ScoreFunction,
    added_parameters,
)
from soho.models.config import ATTENTION_SCORES, SCORE_ACTIVATIONS, AttentionConfig, SohoConfig
from soho.models.soho import SohoForPretraining

HIDDEN, HEADS, HEAD_DIM = 8, 2, 4  # √d = 2, so dividing by it is exact in floating point
SCORES = sorted(ATTENTION_SCORES)
LEARNED = ["cosine", "general_qwk", "general_kwq", "biased_general", "activated_general", "additive"]


def make_attention(score: str, seed: int = 0, **options) -> MultiHeadAttention:
    torch.manual_seed(seed)
    return MultiHeadAttention(HIDDEN, HEADS, 0.0, AttentionConfig(score=score, **options)).eval()


def randomise_score_weights(attention: MultiHeadAttention, seed: int = 1) -> None:
    """Move every learned score weight off its start value, so no identity init hides a mistake."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in attention.score.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))


def identity_projections(attention: MultiHeadAttention) -> None:
    """Queries and keys become the input vectors themselves, split into heads."""
    with torch.no_grad():
        for linear in (attention.query, attention.key):
            linear.weight.copy_(torch.eye(HIDDEN))
            linear.bias.zero_()


def reference_score(score: ScoreFunction, name: str, q: torch.Tensor, k: torch.Tensor, head: int) -> torch.Tensor:
    """One cell of the score matrix, straight from the formula: query q and key k are vectors of width d."""
    if name == "dot":
        return q @ k
    if name == "scaled_dot":
        return q @ k / math.sqrt(q.numel())
    if name == "cosine":
        return score.log_scale[head].exp().squeeze() * (q @ k) / (q.norm() * k.norm())
    if name == "general_qwk":
        return q @ score.weight[head] @ k
    if name == "general_kwq":
        return k @ score.weight[head] @ q
    if name in ("biased_general", "activated_general"):
        value = q @ (score.weight[head] @ k + score.bias[head, :, 0])
        return score.activation(value) if name == "activated_general" else value
    if name == "additive":
        return score.vector[head] @ torch.tanh(score.query_weight[head] @ q + score.key_weight[head] @ k)
    raise AssertionError(name)


def test_every_configurable_score_and_activation_is_implemented():
    assert set(SCORE_FUNCTIONS) == set(ATTENTION_SCORES)
    assert set(SCORE_ACTIVATION_FUNCTIONS) == set(SCORE_ACTIVATIONS)


@pytest.mark.parametrize("name", SCORES)
def test_score_matrix_cells_follow_the_formula_rows_are_queries(name):
    attention = make_attention(name)
    randomise_score_weights(attention)
    torch.manual_seed(2)
    query, key = torch.randn(2, HEADS, 3, HEAD_DIM), torch.randn(2, HEADS, 5, HEAD_DIM)
    with torch.no_grad():
        scores = attention.score(query, key)
        assert scores.shape == (2, HEADS, 3, 5)
        for b in range(2):
            for h in range(HEADS):
                for i in range(3):
                    for j in range(5):
                        expected = reference_score(attention.score, name, query[b, h, i], key[b, h, j], h)
                        torch.testing.assert_close(scores[b, h, i, j], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SCORES)
def test_probabilities_are_over_keys_and_ignore_padded_keys(name):
    attention = make_attention(name)
    randomise_score_weights(attention)
    torch.manual_seed(3)
    queries, keys = torch.randn(2, 3, HIDDEN), torch.randn(2, 5, HIDDEN)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        context, probs = attention(queries, mask, key_value_states=keys, output_attentions=True)
        changed_keys = keys.clone()
        changed_keys[1, 3:] = 100 * torch.randn(2, HIDDEN)
        changed_context, changed_probs = attention(queries, mask, key_value_states=changed_keys,
                                                   output_attentions=True)
    assert context.shape == (2, 3, HIDDEN) and probs.shape == (2, HEADS, 3, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, HEADS, 3))
    assert torch.all(probs[1, :, :, 3:] == 0)
    torch.testing.assert_close(changed_probs, probs)
    torch.testing.assert_close(changed_context, context)


# Per head, which key each of the two queries matches; the third key matches no query.
MATCHES = torch.tensor([[2, 0], [1, 2]])


def one_hot_queries_and_keys(magnitude: float = 3.0):
    """Query i of head h is magnitude·e_i; key MATCHES[h, i] of head h is magnitude·e_i; the spare key is e_3."""
    queries, keys = torch.zeros(1, 2, HIDDEN), torch.zeros(1, 3, HIDDEN)
    for head in range(HEADS):
        offset = head * HEAD_DIM
        for i in range(2):
            queries[0, i, offset + i] = magnitude
            keys[0, MATCHES[head, i], offset + i] = magnitude
        spare = ({0, 1, 2} - set(MATCHES[head].tolist())).pop()
        keys[0, spare, offset + 3] = magnitude
    return queries, keys


def make_additive_pick_its_match(attention: MultiHeadAttention) -> None:
    """W₁ = 10(I - 11ᵀ) drives every unit but the query's own to tanh ≈ -1; W₂ = 2I adds the key there."""
    ones = torch.ones(HEAD_DIM, HEAD_DIM)
    with torch.no_grad():
        attention.score.query_weight.copy_(10 * (torch.eye(HEAD_DIM) - ones))
        attention.score.key_weight.copy_(2 * torch.eye(HEAD_DIM))
        attention.score.vector.fill_(1.0)


@pytest.mark.parametrize("name", SCORES)
def test_the_matching_key_wins_each_query_row(name):
    attention = make_attention(name, additive_hidden_size=HEAD_DIM)
    identity_projections(attention)
    if name == "additive":
        make_additive_pick_its_match(attention)
    queries, keys = one_hot_queries_and_keys()
    with torch.no_grad():
        _, probs = attention(queries, torch.ones(1, 3, dtype=torch.bool), key_value_states=keys,
                             output_attentions=True)
    assert probs.shape == (1, HEADS, 2, 3)
    assert torch.equal(probs[0].argmax(-1), MATCHES)


@pytest.mark.parametrize("activation", SCORE_ACTIVATIONS)
def test_activated_general_keeps_the_match_for_every_activation(activation):
    attention = make_attention("activated_general", activation=activation)
    identity_projections(attention)
    queries, keys = one_hot_queries_and_keys()
    with torch.no_grad():
        _, probs = attention(queries, torch.ones(1, 3, dtype=torch.bool), key_value_states=keys,
                             output_attentions=True)
    assert torch.equal(probs[0].argmax(-1), MATCHES)


def test_scaled_dot_is_dot_over_sqrt_d_exactly():
    torch.manual_seed(4)
    query, key = torch.randn(2, HEADS, 3, HEAD_DIM), torch.randn(2, HEADS, 5, HEAD_DIM)
    config = AttentionConfig()
    dot = SCORE_FUNCTIONS["dot"](config, HEAD_DIM, HEADS)
    scaled = SCORE_FUNCTIONS["scaled_dot"](config, HEAD_DIM, HEADS)
    assert torch.equal(scaled(query, key), dot(query, key) / 2)


def test_only_scaled_dot_takes_the_fused_path_and_it_matches_the_explicit_one():
    assert [name for name, cls in SCORE_FUNCTIONS.items() if cls.uses_sdpa] == ["scaled_dot"]
    attention = make_attention("scaled_dot")
    torch.manual_seed(5)
    hidden = torch.randn(3, 6, HIDDEN)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    with torch.no_grad():
        fused, no_probs = attention(hidden, mask)
        explicit, probs = attention(hidden, mask, output_attentions=True)
    assert no_probs is None and probs.shape == (3, HEADS, 6, 6)
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=1e-5)


class WithExtraTerm(torch.nn.Module):
    """A score function plus a term that depends on the query only or on the key only."""

    uses_sdpa = False

    def __init__(self, inner: ScoreFunction, side: str):
        super().__init__()
        self.inner, self.side = inner, side

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        scores = self.inner(query, key)
        if self.side == "query":
            return scores + 5 * query.sum(-1, keepdim=True)
        return scores + 5 * key.sum(-1)[..., None, :]


@pytest.mark.parametrize("name", SCORES)
def test_a_query_only_term_leaves_attention_unchanged_a_key_term_does_not(name):
    attention = make_attention(name)
    randomise_score_weights(attention)
    torch.manual_seed(6)
    hidden = torch.randn(2, 5, HIDDEN)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    with torch.no_grad():
        _, plain = attention(hidden, mask, output_attentions=True)
        score = attention.score
        attention.score = WithExtraTerm(score, "query")
        _, query_biased = attention(hidden, mask, output_attentions=True)
        attention.score = WithExtraTerm(score, "key")
        _, key_biased = attention(hidden, mask, output_attentions=True)
    torch.testing.assert_close(query_biased, plain, atol=1e-6, rtol=1e-5)
    assert (key_biased - plain).abs().max() > 0.1


def test_biased_general_attends_like_general_qwk_with_the_same_w():
    general = make_attention("general_qwk")
    randomise_score_weights(general)
    biased = make_attention("biased_general")  # same seed: same projections
    with torch.no_grad():
        biased.score.weight.copy_(general.score.weight)
        biased.score.bias.normal_(0, 2.0)
    torch.manual_seed(7)
    hidden = torch.randn(2, 5, HIDDEN)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2:] = False
    with torch.no_grad():
        context, probs = general(hidden, mask, output_attentions=True)
        biased_context, biased_probs = biased(hidden, mask, output_attentions=True)
        query = general._split_heads(general.query(hidden))
        key = general._split_heads(general.key(hidden))
        # The scores themselves differ; only the softmax makes the bias vanish.
        assert (biased.score(query, key) - general.score(query, key)).abs().max() > 0.1
    torch.testing.assert_close(biased_probs, probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(biased_context, context, atol=1e-6, rtol=1e-5)


def test_general_kwq_is_general_qwk_with_w_transposed():
    kwq = SCORE_FUNCTIONS["general_kwq"](AttentionConfig(score="general_kwq"), HEAD_DIM, HEADS)
    qwk = SCORE_FUNCTIONS["general_qwk"](AttentionConfig(score="general_qwk"), HEAD_DIM, HEADS)
    torch.manual_seed(8)
    weight = torch.randn(HEADS, HEAD_DIM, HEAD_DIM)
    query, key = torch.randn(2, HEADS, 3, HEAD_DIM), torch.randn(2, HEADS, 5, HEAD_DIM)
    with torch.no_grad():
        kwq.weight.copy_(weight)
        qwk.weight.copy_(weight.transpose(-1, -2))
        torch.testing.assert_close(kwq(query, key), qwk(query, key))
        qwk.weight.copy_(weight)
        assert (kwq(query, key) - qwk(query, key)).abs().max() > 0.1


@pytest.mark.parametrize("name", ["general_qwk", "general_kwq", "biased_general", "activated_general"])
def test_general_family_starts_as_scaled_dot(name):
    config = AttentionConfig(score=name)
    score = SCORE_FUNCTIONS[name](config, HEAD_DIM, HEADS)
    scaled = SCORE_FUNCTIONS["scaled_dot"](config, HEAD_DIM, HEADS)
    torch.manual_seed(9)
    query, key = torch.randn(2, HEADS, 3, HEAD_DIM), torch.randn(2, HEADS, 5, HEAD_DIM)
    expected = scaled(query, key)
    if name == "activated_general":
        expected = torch.tanh(expected)
    torch.testing.assert_close(score(query, key), expected)


@pytest.mark.parametrize("name", ["general_qwk", "general_kwq", "biased_general"])
def test_bert_projections_attend_the_same_through_a_fresh_general_score(name):
    bert_like = make_attention("scaled_dot", seed=13)
    general = make_attention(name)
    general.load_state_dict(bert_like.state_dict(), strict=False)  # query/key/value only, as from BERT
    torch.manual_seed(14)
    hidden = torch.randn(2, 5, HIDDEN)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        torch.testing.assert_close(general(hidden, mask)[0], bert_like(hidden, mask)[0], atol=1e-6, rtol=1e-5)


def test_cosine_scores_are_bounded_by_the_scale():
    torch.manual_seed(10)
    query, key = 10 * torch.randn(2, HEADS, 3, HEAD_DIM), torch.randn(2, HEADS, 5, HEAD_DIM)
    learned = SCORE_FUNCTIONS["cosine"](AttentionConfig(score="cosine", cosine_scale=4.0), HEAD_DIM, HEADS)
    assert learned(query, key).abs().max() <= 4.0 + 1e-5
    with torch.no_grad():
        learned.log_scale.fill_(math.log(1000.0))
    assert learned(query, key).abs().max() <= 100.0 + 1e-3
    fixed = SCORE_FUNCTIONS["cosine"](AttentionConfig(score="cosine", learn_cosine_scale=False), HEAD_DIM, HEADS)
    assert not list(fixed.parameters()) and not fixed.state_dict()
    torch.testing.assert_close(fixed(query, key), learned(query, key) / 100 * 10)


# Added parameters for 2 heads of width 4 (d' = 3 for additive): per head, then shared.
ADDED_PARAMETERS = {
    "dot": (0, 0),
    "scaled_dot": (0, 0),
    "cosine": (2, 1),
    "general_qwk": (2 * 16, 16),
    "general_kwq": (2 * 16, 16),
    "biased_general": (2 * (16 + 4), 16 + 4),
    "activated_general": (2 * (16 + 4), 16 + 4),
    "additive": (2 * (3 * 4 + 3 * 4 + 3), 3 * 4 + 3 * 4 + 3),
}


@pytest.mark.parametrize("name", SCORES)
def test_added_parameters_and_sharing_weights_across_heads(name):
    per_head, shared = ADDED_PARAMETERS[name]
    layers = [make_attention(name, additive_hidden_size=3, share_weights=share) for share in (False, True)]
    assert [added_parameters(layer) for layer in layers] == [per_head, shared]
    assert added_parameters(torch.nn.ModuleList([layers[0], layers[0], layers[1]])) == per_head + shared
    bert_shaped = make_attention("scaled_dot")
    assert (sum(p.numel() for p in layers[0].parameters()) - sum(p.numel() for p in bert_shaped.parameters())
            == per_head)


def test_a_model_reports_the_parameters_its_score_functions_add():
    plain = SohoForPretraining(tiny_config(**{"encoder.attention": {"score": "scaled_dot"}})).parameter_counts()
    general = SohoForPretraining(tiny_config(**{"encoder.attention": {"score": "general_qwk"}})).parameter_counts()
    assert plain["attention_score_added"] == 0 and plain["trainable"] <= plain["total"]
    assert general["attention_score_added"] > 0
    assert general["total"] - plain["total"] == general["attention_score_added"]


@pytest.mark.parametrize("name", LEARNED)
def test_one_shared_weight_acts_like_the_same_weight_in_every_head(name):
    per_head = make_attention(name, additive_hidden_size=3)
    shared = make_attention(name, additive_hidden_size=3, share_weights=True)
    randomise_score_weights(shared)
    with torch.no_grad():
        for (_, mine), (_, theirs) in zip(per_head.score.named_parameters(), shared.score.named_parameters()):
            mine.copy_(theirs.expand_as(mine))
    torch.manual_seed(11)
    query, key = torch.randn(2, HEADS, 3, HEAD_DIM), torch.randn(2, HEADS, 5, HEAD_DIM)
    with torch.no_grad():
        torch.testing.assert_close(shared.score(query, key), per_head.score(query, key))


@pytest.mark.parametrize("name", LEARNED)
def test_gradients_reach_the_score_weights(name):
    attention = make_attention(name, additive_hidden_size=3).train()
    randomise_score_weights(attention)
    torch.manual_seed(12)
    hidden = torch.randn(2, 5, HIDDEN)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    context, _ = attention(hidden, mask, output_attentions=True)
    (context * torch.randn_like(context)).sum().backward()
    for param_name, param in attention.score.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        if name == "biased_general" and param_name == "bias":
            # qᵀb is the same for every key: the softmax cancels it, so it can never learn.
            assert param.grad.abs().max() < 1e-5
        else:
            assert param.grad.abs().max() > 1e-4, param_name


def test_default_attention_adds_nothing_bert_would_lack():
    config = AttentionConfig()
    assert config.score == "scaled_dot" and not config.share_weights
    attention = make_attention(config.score)
    assert added_parameters(attention) == 0
    assert sorted(attention.state_dict()) == sorted(f"{p}.{t}" for p in ("query", "key", "value")
                                                   for t in ("weight", "bias"))


@pytest.mark.parametrize("options, key", [
    ({"score": "bilinear"}, "attention.score"),
    ({"score": "activated_general", "activation": "swish"}, "attention.activation"),
    ({"score": "additive", "additive_hidden_size": 0}, "attention.additive_hidden_size"),
    ({"score": "cosine", "cosine_scale": 0.0}, "attention.cosine_scale"),
    ({"score": "cosine", "cosine_scale": 500.0}, "attention.cosine_scale"),
])
def test_bad_attention_options_name_their_key(options, key):
    with pytest.raises(ConfigError, match=key):
        AttentionConfig(**options)
    with pytest.raises(ConfigError, match=key):
        from_dict(SohoConfig, {"encoder": {"attention": options}})


def test_attention_options_load_from_plain_data():
    config = from_dict(SohoConfig, {"encoder": {"attention": {"score": "additive", "share_weights": True,
                                                              "additive_hidden_size": 16}}})
    assert config.encoder.attention == AttentionConfig(score="additive", share_weights=True, additive_hidden_size=16)
