"""The Transformer baseline: shapes, causality, parallel / chunked / step agreement, sliding
window semantics and blocked attention against a brute-force masked reference."""

import math

import pytest
import torch

from fidelity.models.registry import build_model
from fidelity.models.transformer import TransformerConfig, TransformerLM, causal_attention

# float64: the three ways of running a sequence compute the same function in different orders;
# 1e-9 absolute on logits of order 1 leaves room only for rounding.
TOLERANCE = {"rtol": 1e-9, "atol": 1e-9}

VARIANTS = [
    {},
    {"use_parallel_residual": False},
    {"rotary_pct": 1.0},
    {"rotary_pct": 0.0},
    {"activation": "gelu_tanh", "tie_embeddings": True},
    {"attention_block_size": 4},  # full attention computed in many query blocks
    {"sliding_window": 5, "attention_block_size": 8},
    {"sliding_window": 1},  # each position sees itself only
    {"sliding_window": 12, "attention_block_size": 3, "use_parallel_residual": False},
]


def variant_id(variant):
    return ",".join(f"{k}={v}" for k, v in variant.items()) or "default"


def tiny(dtype=torch.float64, **overrides):
    overrides = {"n_heads": 2, **overrides}
    return build_model("transformer", "tiny", seed=0, **overrides).to(dtype).eval()


def random_tokens(batch, length, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def step_logits(model, ids):
    cache = model.init_cache(ids.shape[0])
    return torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)


def chunked_logits(model, ids, sizes):
    cache = model.init_cache(ids.shape[0])
    outputs, start = [], 0
    for size in sizes:
        with torch.no_grad():
            outputs.append(model(ids[:, start : start + size], cache=cache).logits)
        start += size
    assert start == ids.shape[1]
    return torch.cat(outputs, dim=1)


def brute_force_attention(query, key, value, window):
    """Explicit softmax over a full (n_queries, n_keys) mask: the oracle for causal_attention."""
    n_queries, n_keys = query.shape[-2], key.shape[-2]
    query_index = torch.arange(n_keys - n_queries, n_keys)[:, None]
    key_index = torch.arange(n_keys)[None, :]
    visible = key_index <= query_index
    if window is not None:
        visible &= key_index > query_index - window
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(-1) @ value


@pytest.mark.parametrize("parallel", [True, False])
def test_forward_shapes_and_hidden_states(parallel):
    model = tiny(torch.float32, use_parallel_residual=parallel)
    ids = random_tokens(3, 29)
    out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (3, 29, 256)
    assert len(out.hidden_states) == model.config.n_layer + 1
    assert all(h.shape == (3, 29, model.config.d_model) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[0], model.embedding(ids))
    assert isinstance(model.norm_f, torch.nn.LayerNorm)
    assert model.lm_head.weight is not model.embedding.weight  # untied by default
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_causality_later_tokens_never_change_earlier_outputs(variant):
    model = tiny(**variant)
    ids = random_tokens(2, 40, seed=1)
    for cut in (1, 17, 39):
        changed = ids.clone()
        changed[:, cut:] = (changed[:, cut:] + 1) % 256
        with torch.no_grad():
            a, b = model(ids).logits, model(changed).logits
        torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-12)
        assert not torch.allclose(a[:, cut:], b[:, cut:])


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_step_and_chunks_match_parallel_forward(variant):
    model = tiny(**variant)
    ids = random_tokens(2, 37, seed=2)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(step_logits(model, ids), full, **TOLERANCE)
    torch.testing.assert_close(chunked_logits(model, ids, [1, 9, 2, 25]), full, **TOLERANCE)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize(
    "n_queries, n_keys, window, block_size",
    [
        (17, 17, None, 1024),  # one SDPA call with is_causal
        (17, 17, None, 4),
        (9, 30, None, 4),  # queries after 21 cached keys
        (33, 33, 6, 8),
        (5, 12, 6, 2),
        (40, 40, 1, 7),
        (12, 12, 50, 5),  # window wider than everything: full attention
    ],
)
def test_blocked_attention_matches_brute_force_masked_reference(
    n_queries, n_keys, window, block_size, dtype, atol
):
    generator = torch.Generator().manual_seed(n_queries * 100 + n_keys)
    query = torch.randn(2, 3, n_queries, 8, generator=generator, dtype=dtype)
    key = torch.randn(2, 3, n_keys, 8, generator=generator, dtype=dtype)
    value = torch.randn(2, 3, n_keys, 8, generator=generator, dtype=dtype)
    expected = brute_force_attention(query, key, value, window)
    actual = causal_attention(query, key, value, window, block_size)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_window_at_least_the_length_equals_full_attention_and_smaller_differs():
    ids = random_tokens(2, 30, seed=3)
    with torch.no_grad():
        full = tiny()(ids).logits
        wide = tiny(sliding_window=30, attention_block_size=7)(ids).logits
        narrow = tiny(sliding_window=6)(ids).logits
    torch.testing.assert_close(wide, full, rtol=0, atol=1e-12)
    # identical until a position has more than 6 predecessors in view, different afterwards
    torch.testing.assert_close(narrow[:, :6], full[:, :6], rtol=0, atol=1e-12)
    assert (narrow[:, 6:] - full[:, 6:]).abs().amax(dim=-1).min() > 1e-6


def test_one_layer_window_sees_exactly_the_last_window_tokens():
    window, t = 5, 20
    model = tiny(n_layer=1, sliding_window=window)
    ids = random_tokens(1, t + 1, seed=4)
    with torch.no_grad():
        base = model(ids).logits[0, t]
        for position in range(t + 1):
            changed = ids.clone()
            changed[0, position] = (changed[0, position] + 1) % 256
            moved = (model(changed).logits[0, t] - base).abs().max()
            if position > t - window:
                assert moved > 1e-8, f"token {position} is inside the window of position {t}"
            else:
                assert moved < 1e-12, f"token {position} is outside the window of position {t}"


def test_sliding_window_cache_keeps_only_the_window():
    model = tiny(sliding_window=8)
    cache = model.init_cache(2)
    ids = random_tokens(2, 100, seed=5)
    with torch.no_grad():
        for start in range(0, 100, 30):
            model(ids[:, start : start + 30], cache=cache)
    assert cache.position == 100
    for layer_cache in cache.layers:
        assert layer_cache.keys.shape == (2, 2, 7, 16)
        assert layer_cache.values.shape == (2, 2, 7, 16)
    full_cache = tiny().init_cache(1)
    with torch.no_grad():
        tiny()(ids[:1], cache=full_cache)
    assert full_cache.layers[0].keys.shape == (1, 2, 100, 16)


def test_query_blocks_do_not_change_the_result():
    ids = random_tokens(2, 50, seed=6)
    with torch.no_grad():
        one_block = tiny()(ids).logits
        many_blocks = tiny(attention_block_size=6)(ids).logits
    torch.testing.assert_close(many_blocks, one_block, rtol=0, atol=1e-12)


def test_gradients_reach_every_parameter():
    model = tiny(torch.float32, sliding_window=4, attention_block_size=5)
    model.train()
    model(random_tokens(2, 23, seed=7)).logits.logsumexp(-1).mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_config_round_trip_and_defaults():
    config = TransformerConfig(d_model=48, n_heads=6, rotary_pct=0.5)
    assert config.head_dim == 8 and config.rotary_dim == 4 and config.resolved_d_mlp == 192
    assert TransformerConfig.from_dict(config.to_dict()) == config
    model = TransformerLM(config)
    assert model.layers[0].mlp.fc_in.out_features == 192


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"d_model": 30, "n_heads": 4}, "divisible by n_heads"),
        ({"n_heads": 0}, "n_heads must be a positive integer"),
        ({"sliding_window": 0}, "sliding_window must be None"),
        ({"sliding_window": True}, "sliding_window must be None"),
        ({"sliding_window": 2.5}, "sliding_window must be None"),
        ({"rotary_pct": 1.5}, r"rotary_pct must lie in \[0, 1\]"),
        ({"n_heads": 1, "rotary_pct": 3 / 32}, "even number of rotated channels"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"d_mlp": -1}, "d_mlp must be a non-negative integer"),
        ({"attention_block_size": 0}, "attention_block_size must be a positive integer"),
        ({"rotary_base": 0.0}, "rotary_base must be positive"),
    ],
)
def test_bad_configs_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_bad_attention_shapes_and_input_ids_are_clear_errors():
    query = torch.zeros(1, 1, 5, 4)
    with pytest.raises(ValueError, match="at least as many keys"):
        causal_attention(query, torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    model = tiny(torch.float32)
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))


def test_long_windowed_attention_never_builds_a_length_by_length_mask(monkeypatch):
    """Every SDPA call sees at most block_size queries and block_size + window - 1 keys."""
    from fidelity.models import transformer

    calls = []
    real_sdpa = transformer.F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, **kwargs):
        calls.append((query.shape[-2], key.shape[-2]))
        return real_sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", recording_sdpa)
    model = tiny(torch.float32, n_layer=1, sliding_window=16, attention_block_size=64)
    with torch.no_grad():
        model(random_tokens(1, 3000, seed=8))
    assert len(calls) == math.ceil(3000 / 64)
    assert max(n_queries for n_queries, _ in calls) == 64
    assert max(n_keys for _, n_keys in calls) == 64 + 16 - 1
