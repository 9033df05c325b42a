"""DeciMamba: exactly Mamba without decimation, the kept set is the top-k of the step sizes,
positions map rows back to the sequence, and generation after a prefill is Mamba over the
kept states."""

import pytest
import torch
import torch.nn.functional as F

from fidelity.models.decimamba import (
    DeciMambaConfig,
    DeciMambaLM,
    DeciMambaOutput,
    Decimation,
    TokenDecimation,
)
from fidelity.models.registry import build_model

# Layers 1 and 2 of 4 decimate: 60 tokens -> 24 (+1 kept last) -> max(12, 4) + 1 = 13 rows.
DECIMATING = {
    "decimating_layers": [1, 2],
    "decimation_base_length": 24,
    "decimation_beta": 0.5,
    "decimation_min_length": 4,
}
TOLERANCE = {"rtol": 1e-9, "atol": 1e-9}  # float64, as for every model of the toolkit


def tiny_mamba(dtype=torch.float64):
    return build_model("mamba", "tiny", seed=0, n_layer=4).to(dtype).eval()


def tiny_deci(dtype=torch.float64, **decimation):
    return DeciMambaLM.from_mamba(tiny_mamba(dtype), **{**DECIMATING, **decimation})


def random_tokens(batch, length, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def step_logits(model, ids, cache=None):
    cache = cache if cache is not None else model.init_cache(ids.shape[0])
    return torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)


def test_same_parameters_as_mamba_and_seeded_builds_agree():
    mamba = tiny_mamba()
    deci = DeciMambaLM.from_mamba(mamba)
    assert list(deci.state_dict()) == list(mamba.state_dict())
    for name, value in mamba.state_dict().items():
        assert torch.equal(deci.state_dict()[name], value), name
    built = build_model("decimamba", "tiny", seed=0, n_layer=4)
    for name, value in build_model("mamba", "tiny", seed=0, n_layer=4).state_dict().items():
        assert torch.equal(built.state_dict()[name], value), name
    assert deci.layers[2].decimation is not None  # default: the middle layer, 4 // 2
    assert all(deci.layers[i].decimation is None for i in (0, 1, 3))


@pytest.mark.parametrize(
    "decimation",
    [{"decimation": False}, {"decimation_base_length": 200}],  # budgets 200, 100 >= 60
    ids=["decimation-off", "input-within-budget"],
)
def test_equals_mamba_exactly_and_is_causal_without_decimation(decimation):
    mamba, deci = tiny_mamba(), tiny_deci(**decimation)
    ids = random_tokens(2, 60, seed=1)
    with torch.no_grad():
        out = deci(ids, output_hidden_states=True)
        expected = mamba(ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-12)
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert torch.equal(out.positions, torch.arange(60).expand(2, 60))
    changed = ids.clone()
    changed[:, 33:] = random_tokens(2, 27, seed=2)
    with torch.no_grad():
        after = deci(changed).logits
    torch.testing.assert_close(after[:, :33], out.logits[:, :33], rtol=0, atol=1e-12)
    assert not torch.allclose(after[:, 33:], out.logits[:, 33:])
    torch.testing.assert_close(step_logits(deci, ids), expected.logits, **TOLERANCE)


def expected_kept_positions(model, layer, hidden, positions, n_keep, score):
    """Top-``n_keep`` rows by the step sizes of ``model.layers[layer]``, computed directly,
    plus the last row; as original positions."""
    block = model.layers[layer]
    with torch.no_grad():
        inputs = block.mixer.ssm_inputs(block.norm(hidden))
        step = F.softplus(inputs["delta"] + block.mixer.dt_proj.bias[:, None])  # (b, d_in, n)
    scores = step.mean(dim=1) if score == "mean" else step.pow(2).sum(dim=1).sqrt()
    rows = scores[:, :-1].argsort(dim=1, descending=True)[:, :n_keep].sort(dim=1).values
    last = torch.full((hidden.shape[0], 1), hidden.shape[1] - 1)
    return positions.gather(1, torch.cat([rows, last], dim=1))


@pytest.mark.parametrize("score", ["mean", "norm"])
def test_kept_rows_are_the_top_k_of_the_step_sizes_with_decaying_budgets(score):
    model = tiny_deci(decimation_score=score)
    ids = random_tokens(3, 60, seed=3)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    sizes = [p.shape[1] for p in out.layer_positions]
    assert sizes == [60, 60, 25, 13, 13]  # L_base = 24, then 24 * 0.5 = 12; + the last token
    for layer, n_keep in ((1, 24), (2, 12)):
        expected = expected_kept_positions(
            model, layer, out.hidden_states[layer], out.layer_positions[layer], n_keep, score
        )
        assert torch.equal(out.layer_positions[layer + 1], expected)
    assert out.logits.shape == (3, 13, 256) and torch.isfinite(out.logits).all()
    assert torch.equal(out.positions, out.layer_positions[-1])
    assert (out.positions.diff(dim=1) > 0).all() and (out.positions[:, -1] == 59).all()
    assert not torch.equal(out.positions[0], out.positions[1]), "rows choose their own tokens"


def test_min_length_floors_the_budget():
    model = tiny_deci(decimation_base_length=8, decimation_beta=0.25, decimation_min_length=6)
    with torch.no_grad():
        out = model(random_tokens(1, 40, seed=4))
    sizes = [p.shape[1] for p in out.layer_positions]
    assert sizes == [40, 40, 9, 7, 7]  # 8 + 1, then max(8 * 0.25, 6) + 1


def test_positions_label_the_rows_they_come_with():
    """With every mixer silenced (out_proj = 0) each block passes its kept rows through, so the
    final residual stream must be the embeddings of exactly the tokens at ``positions``
    (the step sizes, hence the kept set, still depend on the tokens)."""
    model = tiny_deci()
    ids = random_tokens(2, 60, seed=5)
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.out_proj.weight.zero_()
        silenced = model(ids, output_hidden_states=True)
    assert silenced.positions.shape == (2, 13)
    expected = model.embedding(ids.gather(1, silenced.positions))
    torch.testing.assert_close(silenced.hidden_states[-1], expected, rtol=0, atol=0)


def test_decimation_submodule_can_be_hooked_for_positions():
    model = tiny_deci()
    ids = random_tokens(2, 60, seed=6)
    seen = {}
    handles = [
        model.layers[i].decimation.register_forward_hook(
            lambda _m, _args, output, i=i: seen.__setitem__(i, output)
        )
        for i in (1, 2)
    ]
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    for i in (1, 2):
        assert isinstance(seen[i], Decimation)
        assert torch.equal(seen[i].positions, out.layer_positions[i + 1])
        assert seen[i].scores.shape == (2, out.layer_positions[i].shape[1])
        torch.testing.assert_close(
            seen[i].states,
            out.hidden_states[i].gather(1, seen[i].index[..., None].expand(-1, -1, 32)),
            rtol=0,
            atol=0,
        )


def test_prefill_is_not_causal_when_decimating():
    """Documented limitation: later tokens change which earlier tokens are kept."""
    model = tiny_deci()
    ids = random_tokens(1, 60, seed=7)
    changed = ids.clone()
    changed[:, 40:] = random_tokens(1, 20, seed=8)
    with torch.no_grad():
        before, after = model(ids).positions, model(changed).positions
    assert not torch.equal(before[before < 40], after[after < 40])


def test_generation_after_prefill_is_mamba_over_the_kept_states():
    """Prefill 50 tokens, then step 10: the same logits as one forward over all 60 tokens in
    which the last 10 are protected (never dropped) and the first 50 decimated as before."""
    model = tiny_deci()
    ids = random_tokens(2, 60, seed=9)
    cache = model.init_cache(2)
    with torch.no_grad():
        prefill = model(ids[:, :50], cache=cache)
    generated = step_logits(model, ids[:, 50:], cache)
    reference = DeciMambaLM.from_mamba(tiny_mamba(), **DECIMATING, keep_last_tokens=11)
    with torch.no_grad():
        whole = reference(ids)
    assert torch.equal(whole.positions[:, -10:], torch.arange(50, 60).expand(2, 10))
    torch.testing.assert_close(generated, whole.logits[:, -10:], **TOLERANCE)
    torch.testing.assert_close(prefill.logits, whole.logits[:, :-10], **TOLERANCE)
    assert torch.equal(prefill.positions, whole.positions[:, :-10])
    assert cache.position == 60


def test_short_chunks_after_prefill_continue_like_steps():
    """A chunk within the budget is not decimated: chunked continuation == steps."""
    model = tiny_deci()
    ids = random_tokens(2, 62, seed=10)
    cache_a, cache_b = model.init_cache(2), model.init_cache(2)
    with torch.no_grad():
        model(ids[:, :50], cache=cache_a)
        model(ids[:, :50], cache=cache_b)
        chunk = model(ids[:, 50:], cache=cache_a)
    assert torch.equal(chunk.positions, torch.arange(50, 62).expand(2, 12))
    torch.testing.assert_close(chunk.logits, step_logits(model, ids[:, 50:], cache_b), **TOLERANCE)


def test_batch_rows_do_not_leak_and_gradients_flow():
    model = tiny_deci()
    ids = random_tokens(3, 60, seed=11)
    with torch.no_grad():
        batch = model(ids)
        single = model(ids[1:2])
    torch.testing.assert_close(batch.logits[1:2], single.logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(batch.positions[1:2], single.positions)
    model.train()
    out = model(ids[:, :40])
    assert isinstance(out, DeciMambaOutput)
    out.logits.logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.layers[3].mixer.in_proj.weight.grad.abs().sum() > 0


def test_token_decimation_keeps_everything_within_budget():
    decimate = TokenDecimation(budget=10, min_length=4, keep_last=2, score="mean")
    hidden = torch.randn(2, 12, 8)
    delta = torch.rand(2, 5, 12)
    positions = torch.arange(100, 112).expand(2, 12)
    kept = decimate(hidden, delta, positions)
    assert torch.equal(kept.positions, positions) and torch.equal(kept.states, hidden)
    assert decimate.n_kept(13) == 12 and decimate.n_kept(1) == 1 and decimate.n_kept(40) == 12
    with pytest.raises(ValueError, match="delta must be"):
        decimate(hidden, delta[..., :5], positions)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="decimating_layers must be a list"):
        DeciMambaConfig(n_layer=4, decimating_layers=[4]).validate()
    with pytest.raises(ValueError, match="repeated"):
        DeciMambaConfig(n_layer=4, decimating_layers=[1, 1]).validate()
    with pytest.raises(ValueError, match="decimation_beta"):
        DeciMambaConfig(decimation_beta=1.5).validate()
    with pytest.raises(ValueError, match="decimation_score"):
        DeciMambaConfig(decimation_score="max").validate()
    with pytest.raises(ValueError, match="unknown"):
        DeciMambaLM.from_mamba(tiny_mamba(), budget=3)
    with pytest.raises(TypeError, match="MambaLM"):
        DeciMambaLM.from_mamba(build_model("mamba2", "tiny", headdim=16))
