"""Mamba-2: chunked SSD scan vs the sequential recurrence, the model's three paths, and equality
with Hugging Face's ``Mamba2ForCausalLM`` after a weight copy."""

import pytest
import torch
import torch.nn.functional as F

from fidelity.models.mamba2 import (
    Mamba2Config,
    Mamba2LM,
    ssd_scan_chunked,
    ssd_scan_ref,
    ssd_scan_selective,
)
from fidelity.models.registry import build_model

# float64: the chunked scan and the loop differ only in summation order.
SCAN_TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    # float32: measured at most 4e-6 on outputs up to 36 (chunks of up to 64 steps); 5x margin.
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
}
MODEL_TOLERANCE = {"rtol": 1e-9, "atol": 1e-9}  # float64, as for every model of the toolkit


def scan_inputs(batch, length, nheads, headdim, ngroups, d_state, dtype, seed=0, dt_scale=1.0):
    """Random scan inputs: step sizes through softplus, decays -A in [0.1, 3]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    x = randn(batch, length, nheads, headdim)
    dt = (F.softplus(randn(batch, length, nheads)) * dt_scale).to(dtype)
    A = -(0.1 + 2.9 * torch.rand(nheads, generator=g, dtype=torch.float64)).to(dtype)
    B = randn(batch, length, ngroups, d_state)
    C = randn(batch, length, ngroups, d_state)
    D = randn(nheads)
    initial = randn(batch, nheads, headdim, d_state)
    return x, dt, A, B, C, D, initial


SHAPES = [
    # batch, length, nheads, headdim, ngroups, d_state, chunk_size
    (1, 1, 1, 1, 1, 1, 4),
    (2, 37, 4, 3, 2, 5, 8),  # length not a multiple of the chunk
    (3, 64, 6, 4, 3, 7, 16),  # exact multiple
    (2, 50, 2, 8, 1, 16, 64),  # a single short chunk
    (1, 23, 4, 2, 4, 3, 1),  # chunks of one step
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunked_scan_matches_sequential_recurrence(shape, dtype):
    batch, length, nheads, headdim, _, d_state, chunk = shape
    x, dt, A, B, C, D, initial = scan_inputs(*shape[:-1], dtype=dtype, seed=sum(shape))
    for with_extras in (False, True):
        extras = {"D": D, "initial_state": initial} if with_extras else {}
        y, state = ssd_scan_chunked(x, dt, A, B, C, chunk, return_final_state=True, **extras)
        y_ref, state_ref = ssd_scan_ref(x, dt, A, B, C, return_final_state=True, **extras)
        assert y.shape == (batch, length, nheads, headdim) and y.dtype == dtype
        assert state.shape == (batch, nheads, headdim, d_state)
        torch.testing.assert_close(y, y_ref, **SCAN_TOLERANCE[dtype])
        torch.testing.assert_close(state, state_ref, **SCAN_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_selective_scan_path_matches_sequential_recurrence(shape, dtype):
    """The SSD through the fused selective-scan kernels, groups included."""
    batch, length, nheads, headdim, _, _, _ = shape
    x, dt, A, B, C, D, initial = scan_inputs(*shape[:-1], dtype=dtype, seed=sum(shape) + 1)
    for with_extras in (False, True):
        extras = {"D": D, "initial_state": initial} if with_extras else {}
        y, state = ssd_scan_selective(x, dt, A, B, C, return_final_state=True, **extras)
        y_ref, state_ref = ssd_scan_ref(x, dt, A, B, C, return_final_state=True, **extras)
        assert y.shape == (batch, length, nheads, headdim) and y.dtype == dtype
        torch.testing.assert_close(y, y_ref, **SCAN_TOLERANCE[dtype])
        torch.testing.assert_close(state.to(dtype), state_ref, **SCAN_TOLERANCE[dtype])


def test_selective_scan_path_gradients_match_the_recurrence():
    inputs = scan_inputs(2, 19, 4, 3, 2, 5, torch.float64, seed=4)
    grads = []
    for scan in (ssd_scan_selective, ssd_scan_ref):
        leaves = [t.clone().requires_grad_() for t in inputs]
        x, dt, A, B, C, D, initial = leaves
        scan(x, dt, A, B, C, D=D, initial_state=initial).pow(2).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for fast, reference in zip(*grads, strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scan", ["selective_scan", "ssd_chunked"])
def test_both_scans_give_the_same_model(scan):
    model = build_model("mamba2", "tiny", scan=scan).double().eval()
    other = build_model("mamba2", "tiny", scan="ssd_chunked").double().eval()
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(ids).logits, **MODEL_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_chunked_scan_strong_decay_stays_finite_and_exact(dtype):
    """Steps of |dt * A| up to about 50 per step: every within-chunk decay underflows to 0
    without overflow or NaN, as the recurrence does."""
    x, dt, A, B, C, D, initial = scan_inputs(2, 40, 3, 4, 1, 6, dtype, seed=9, dt_scale=20.0)
    y = ssd_scan_chunked(x, dt, A, B, C, 16, D=D, initial_state=initial)
    y_ref = ssd_scan_ref(x, dt, A, B, C, D=D, initial_state=initial)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, **SCAN_TOLERANCE[dtype])


def test_chunked_scan_gradcheck():
    x, dt, A, B, C, D, initial = scan_inputs(1, 7, 2, 2, 1, 3, torch.float64, seed=3)
    inputs = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, D, initial)]

    def scan(x, dt, A, B, C, D, initial):
        y, state = ssd_scan_chunked(x, dt, A, B, C, 3, D, initial, return_final_state=True)
        return y, state

    assert torch.autograd.gradcheck(scan, inputs, eps=1e-6, atol=1e-7)


def test_chunked_scan_gradients_match_reference():
    x, dt, A, B, C, D, initial = scan_inputs(2, 19, 4, 3, 2, 5, torch.float64, seed=4)
    weights = torch.randn(2, 19, 4, 3, dtype=torch.float64)
    grads = []
    for scan in (ssd_scan_chunked, ssd_scan_ref):
        inputs = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, D, initial)]
        y, state = scan(*inputs[:5], 6, inputs[5], inputs[6], return_final_state=True)
        ((y * weights).sum() + state.pow(2).sum()).backward()
        grads.append([t.grad for t in inputs])
    for chunked, reference in zip(*grads, strict=True):
        torch.testing.assert_close(chunked, reference, rtol=1e-10, atol=1e-10)


def test_scan_shape_errors_are_clear():
    x, dt, A, B, C, _, _ = scan_inputs(1, 5, 4, 2, 2, 3, torch.float64)
    with pytest.raises(ValueError, match=r"dt must be \(batch, length, nheads\)"):
        ssd_scan_chunked(x, dt[..., :3], A, B, C)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        ssd_scan_chunked(x, dt, A, B[:, :, :1].expand(1, 5, 3, 3), C[:, :, :1].expand(1, 5, 3, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan_chunked(x, dt, A, B, C, chunk_size=0)


# -- the model ----------------------------------------------------------------------------------

TINY = {"headdim": 16, "ngroups": 2, "chunk_size": 8}  # 4 heads in 2 groups, many chunks


def tiny(dtype=torch.float64, **overrides):
    return build_model("mamba2", "tiny", seed=0, **{**TINY, **overrides}).to(dtype).eval()


def random_tokens(batch, length, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_parameter_names_follow_mamba_ssm_layout():
    model = tiny()
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    mixer = {
        "in_proj.weight",
        "conv1d.weight",
        "conv1d.bias",
        "dt_bias",
        "A_log",
        "D",
        "norm.weight",
        "out_proj.weight",
    }
    expected = {"embedding.weight", "norm_f.weight", "lm_head.weight"}
    for i in range(model.config.n_layer):
        expected |= {f"layers.{i}.norm.weight"} | {f"layers.{i}.mixer.{n}" for n in mixer}
    assert names == expected
    config = model.config
    in_proj = model.layers[0].mixer.in_proj.weight
    assert in_proj.shape == (2 * config.d_inner + 2 * 2 * config.d_state + config.nheads, 32)
    assert model.layers[0].mixer.A_log.shape == (config.nheads,)


def test_forward_shapes_hidden_states_and_cache_shapes():
    model = tiny(torch.float32)
    ids = random_tokens(2, 37)
    out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (2, 37, 256) and torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == 3
    assert all(h.shape == (2, 37, 32) for h in out.hidden_states)
    cache = model.init_cache(2)
    layer = cache.layers[0]
    assert layer.ssm.shape == (2, 4, 16, 8)  # (batch, nheads, headdim, d_state)
    assert layer.conv.shape == (2, 64 + 2 * 2 * 8, 3)


def test_causality_later_tokens_never_change_earlier_outputs():
    model = tiny()
    ids = random_tokens(2, 70)
    changed = ids.clone()
    changed[:, 41:] = random_tokens(2, 29, seed=1)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :41], b[:, :41], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 41:], b[:, 41:])


def step_logits(model, ids):
    cache = model.init_cache(ids.shape[0])
    return torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)


def chunked_logits(model, ids, sizes):
    cache = model.init_cache(ids.shape[0])
    outputs, start = [], 0
    with torch.no_grad():
        for size in sizes:
            outputs.append(model(ids[:, start : start + size], cache=cache).logits)
            start += size
    assert start == ids.shape[1]
    assert cache.position == start
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("variant", [{}, {"rmsnorm": False}, {"norm_before_gate": True}])
def test_step_and_chunks_match_parallel_forward(variant):
    model = tiny(**variant)
    ids = random_tokens(2, 45, seed=3)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(step_logits(model, ids), full, **MODEL_TOLERANCE)
    torch.testing.assert_close(chunked_logits(model, ids, [1, 16, 3, 25]), full, **MODEL_TOLERANCE)


def test_chunk_size_changes_nothing_but_speed():
    ids = random_tokens(1, 50, seed=5)
    with torch.no_grad():
        small = tiny(chunk_size=3)(ids).logits
        large = tiny(chunk_size=64)(ids).logits
    torch.testing.assert_close(small, large, rtol=1e-12, atol=1e-12)


def test_gradients_reach_every_parameter():
    model = tiny(torch.float32)
    model.train()
    model(random_tokens(2, 20, seed=6)).logits.logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of headdim"):
        Mamba2Config(d_model=32, headdim=24).validate()
    with pytest.raises(ValueError, match="multiple of ngroups"):
        Mamba2Config(d_model=32, headdim=16, ngroups=3).validate()
    with pytest.raises(ValueError, match="chunk_size"):
        Mamba2Config(chunk_size=0).validate()
    model = tiny(torch.float32)
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model(torch.zeros(5, dtype=torch.long))


# -- equality with Hugging Face ----------------------------------------------------------------


def hf_to_ours(state_dict):
    """Hugging Face ``Mamba2ForCausalLM`` names -> ours: ``backbone.embeddings`` ->
    ``embedding``, drop ``backbone.``; every mixer name is the same."""
    renamed = {}
    for name, value in state_dict.items():
        name = name.replace("backbone.embeddings.", "embedding.").removeprefix("backbone.")
        renamed[name] = value
    return renamed


@pytest.mark.parametrize("use_bias", [False, True])
def test_equal_logits_with_hugging_face_mamba2(use_bias):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.Mamba2Config(
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=4,
        head_dim=16,
        n_groups=2,
        state_size=8,
        expand=2,
        conv_kernel=4,
        chunk_size=8,
        use_bias=use_bias,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        residual_in_fp32=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(hf_config).eval()
    with torch.no_grad():  # random values everywhere, so every mapping and norm weight matters
        for param in hf.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
        for layer in hf.backbone.layers:
            layer.mixer.A_log.copy_(torch.rand_like(layer.mixer.A_log) * 2 - 1)
    ours = Mamba2LM(
        Mamba2Config(
            d_model=32,
            n_layer=2,
            headdim=16,
            ngroups=2,
            d_state=8,
            chunk_size=8,
            bias=use_bias,
            tie_embeddings=False,
        )
    ).eval()
    ours.load_state_dict(hf_to_ours(hf.state_dict()), strict=True)
    ids = random_tokens(2, 29, seed=7)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    # Both in float32 (Hugging Face's reference path computes in float32 whatever the model
    # dtype); logits are of order 10, so 1e-4 absolute is a few float32 roundings per layer.
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
