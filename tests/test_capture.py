"""Captured states equal the models' own hidden states; hooks never outlive a capture."""

import pytest
import torch

from fidelity.models.registry import build_model
from fidelity.probes.capture import (
    NonFiniteHiddenStateError,
    _first_non_finite,
    capture,
    capturing,
    find_blocks,
    run_with_capture,
)
from fidelity.probes.capture_types import block_before, layer_after


def tokens(batch, length, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", ["mamba", "memmamba"])
def test_capture_equals_explicit_hidden_states(name):
    model = build_model(name, "tiny").eval()
    ids = tokens(2, 50)
    positions = torch.tensor([0, 3, 17, 49])
    cap = capture(model, ids, positions=positions)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert cap.layers == list(range(model.config.n_layer + 1))
    for layer in cap.layers:
        torch.testing.assert_close(cap[layer], hidden[layer][:, positions], rtol=0, atol=0)
    assert torch.equal(cap.tokens, ids[:, positions])


@pytest.mark.parametrize("name", ["mamba", "memmamba"])
def test_chunked_capture_matches_one_pass(name):
    model = build_model(name, "tiny").double().eval()
    ids = tokens(1, 300, seed=1)
    positions = torch.arange(0, 300, 7)
    whole = capture(model, ids, layers=[0, 1, 2], positions=positions)
    chunked = capture(model, ids, layers=[0, 1, 2], positions=positions, chunk_size=64)
    for layer in whole.layers:
        # float64; the chunks carry exact states, so only rounding differs
        torch.testing.assert_close(chunked[layer], whole[layer], rtol=1e-9, atol=1e-9)


def test_layer_selection_and_dtype():
    model = build_model("mamba", "tiny").eval()
    ids = tokens(1, 40)
    cap = capture(model, ids, layers=lambda layer: layer % 2 == 0, dtype=torch.float16)
    assert cap.layers == [0, 2]
    assert cap[2].dtype == torch.float16 and cap[2].shape == (1, 40, 32)
    with pytest.raises(ValueError, match=r"out of range.*0\.\.2"):
        capture(model, ids, layers=[5])
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 40\)"):
        capture(model, ids, positions=[40])
    with pytest.raises(KeyError, match="not captured"):
        cap[1]


def test_block_output_is_the_layer_after_the_block():
    model = build_model("mamba", "tiny").eval()
    ids = tokens(1, 24)
    cap = capture(model, ids)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # n_blocks + 1 tensors
    for block in range(len(model.layers)):
        assert torch.equal(cap.block_output(block), cap[block + 1])
        torch.testing.assert_close(cap.block_output(block), hidden[block + 1])
    assert (layer_after(0), block_before(1)) == (1, 0)
    with pytest.raises(ValueError, match="embeddings"):
        block_before(0)


def test_hooks_are_removed_even_when_the_forward_raises():
    model = build_model("mamba", "tiny").eval()
    before = hook_count(model)

    def explode(*_):
        raise RuntimeError("boom")

    handle = model.layers[1].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        capture(model, tokens(1, 10))
    handle.remove()
    assert hook_count(model) == before
    cap = capture(model, tokens(1, 10))
    assert hook_count(model) == before and cap.layers == [0, 1, 2]


def test_context_manager_over_a_users_chunked_loop():
    model = build_model("memmamba", "tiny").double().eval()
    ids = tokens(1, 90, seed=2)
    positions = [5, 40, 89]
    with torch.no_grad(), capturing(model, 90, layers=[1, 2], positions=positions) as cap:
        cache = model.init_cache(1)
        for start in range(0, 90, 30):
            model(ids[:, start : start + 30], cache=cache)
    reference = capture(model, ids, layers=[1, 2], positions=positions)
    for layer in (1, 2):
        torch.testing.assert_close(cap[layer], reference[layer], rtol=1e-9, atol=1e-9)


def test_context_manager_checks_the_length_it_was_promised():
    model = build_model("mamba", "tiny").eval()
    with (
        pytest.raises(ValueError, match="expected one sequence of 20 tokens"),
        torch.no_grad(),
        capturing(model, 20),
    ):
        model(tokens(1, 10))


def test_non_finite_states_are_reported_with_layer_and_position():
    model = build_model("mamba", "tiny").eval()
    ids = tokens(1, 30)

    def poison(_module, _args, output):
        output = output.clone()
        output[0, 12, 3] = float("nan")
        return output

    handle = model.layers[0].register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteHiddenStateError, match="layer 1, position 12") as error:
            capture(model, ids)
    finally:
        handle.remove()
    assert (error.value.layer, error.value.position) == (1, 12)


def _first_non_finite_by_mask(hidden):
    """The check before its one-sum shortcut: every value looked at."""
    bad = (~torch.isfinite(hidden).all(dim=-1)).nonzero()
    return None if len(bad) == 0 else tuple(bad[0].tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_first_non_finite_equals_the_masked_check(dtype):
    generator = torch.Generator().manual_seed(5)
    big = torch.finfo(dtype).max / 2
    for trial in range(40):
        hidden = torch.randn(3, 33, 8, generator=generator).to(dtype)
        if trial % 4 == 1:  # finite values whose sum overflows: no error
            hidden[:] = big
        for _ in range(trial % 3):
            where = [int(torch.randint(0, n, (), generator=generator)) for n in hidden.shape]
            value = (float("nan"), float("inf"), -float("inf"))[trial % 3]
            hidden[tuple(where)] = value
        expected = _first_non_finite_by_mask(hidden)
        assert _first_non_finite(hidden) == expected
    hidden = torch.full((1, 4, 2), big, dtype=dtype)
    hidden[0, 2, 1], hidden[0, 3, 0] = float("inf"), -float("inf")  # sum: NaN
    assert _first_non_finite(hidden) == (0, 2)


def test_run_with_capture_returns_logits_and_states():
    model = build_model("mamba", "tiny").eval()
    ids = tokens(1, 16)
    logits, cap = run_with_capture(model, ids, layers=[2])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(cap[2], out.hidden_states[2])


def test_unknown_module_layout_needs_module_names():
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Linear(4, 4)
            self.second = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.second(self.first(x))

    model = Custom()
    with pytest.raises(ValueError, match="module_names"):
        find_blocks(model)
    x = torch.randn(1, 6, 4)
    with torch.no_grad(), capturing(model, 6, module_names=["first", "second"]) as cap:
        model(x)
    torch.testing.assert_close(cap[0], x)
    torch.testing.assert_close(cap[2], model(x))


transformers = pytest.importorskip("transformers", reason="transformers not installed")


def _hf_models():
    mamba = transformers.MambaForCausalLM(
        transformers.MambaConfig(
            vocab_size=256, hidden_size=32, num_hidden_layers=3, state_size=8, expand=2
        )
    )
    neox = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=256,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=3, n_head=4)
    )
    return {"mamba": mamba, "gpt_neox": neox, "gpt2": gpt2}


@pytest.mark.parametrize("kind", ["mamba", "gpt_neox", "gpt2"])
def test_capture_matches_hugging_face_output_hidden_states(kind):
    torch.manual_seed(0)
    model = _hf_models()[kind].eval()
    ids = tokens(2, 24)
    positions = torch.tensor([1, 8, 23])
    cap = capture(model, ids, positions=positions)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states
    n_layers = len(reference) - 1
    assert cap.layers == list(range(n_layers + 1))
    # Hugging Face lists n_layers + 1 states ending with the final-normed output of the last
    # block. Before it: the input of every block (GPT-2, GPT-NeoX), or for Mamba in
    # transformers 5 the (pre-norm) output of every block.
    first = 1 if kind == "mamba" and int(transformers.__version__.split(".")[0]) >= 5 else 0
    for index in range(n_layers):
        torch.testing.assert_close(
            cap[index + first], reference[index][:, positions], rtol=1e-6, atol=1e-6
        )
    final_norm = {
        "mamba": lambda m: m.backbone.norm_f,
        "gpt_neox": lambda m: m.gpt_neox.final_layer_norm,
        "gpt2": lambda m: m.transformer.ln_f,
    }[kind](model)
    with torch.no_grad():
        torch.testing.assert_close(
            final_norm(cap[n_layers]), reference[n_layers][:, positions], rtol=1e-5, atol=1e-5
        )


def test_memmamba_internals_writes_pools_and_attention():
    model = build_model(
        "memmamba", "tiny", write_init_bias=0.0, pool_size=4, block_size=8, n_layer=4
    ).eval()
    ids = tokens(1, 64, seed=3)
    cap = capture(model, ids, layers=[4], internals=True, attention_positions=[20, 63])
    trace = cap.internals["memmamba"]
    # Writes: exactly the positions whose token importance exceeds tau1 (layer 0 recomputed).
    with torch.no_grad():
        x = model.embedding(ids)
        block = model.layers[0]
        h = x + block.mixer(block.norm(x))
        normed = block.memory_norm(h)
        importance = torch.sigmoid(block.note_block.scorer(normed)[0, :, 0])
        state_importance = block.trigger(normed)[0]
    _, written, written_importance = trace.writes(0)
    assert torch.equal(written, torch.nonzero(importance > 0.5)[:, 0])
    torch.testing.assert_close(written_importance, importance[written])
    # Firing: position t fires where position t - 1's state importance exceeds tau2.
    expected_fired = torch.nonzero(state_importance[:-1] > 0.5)[:, 0] + 1
    assert torch.equal(trace.fired(0)[1], expected_fired)
    # Pools rebuilt from the writes equal the explicit pools of a model run up to that point.
    for cut in (10, 33, 64):
        cache = model.init_cache(1)
        with torch.no_grad():
            model(ids[:, :cut], cache=cache)
        for layer in range(4):
            pool = cache.layers[layer].pool
            explicit = pool.positions[0][pool.valid[0]].sort().values
            assert torch.equal(trace.pool_at(layer, cut), explicit)
    # Attention records: weights over each query's own pool, summing to one per head.
    token_records = [r for r in trace.attention if r.kind == "token"]
    assert {(r.block, r.query_position) for r in token_records} == {
        (layer, q) for layer in range(4) for q in (20, 63)
    }
    for record in token_records:
        assert torch.equal(
            record.note_positions.sort().values, trace.pool_at(record.block, record.query_position)
        )
        torch.testing.assert_close(record.weights.sum(-1), torch.ones(record.weights.shape[0]))
    layer_records = [r for r in trace.attention if r.kind == "layer"]
    assert {r.block for r in layer_records} == {1, 3}
    assert all(set(r.note_blocks.tolist()) <= {0, 1, 2} for r in layer_records)


MEMORY_SCRIPT = r"""
import resource, torch
from fidelity.models.registry import build_model
from fidelity.probes.capture import capture
model = build_model("mamba", "tiny", n_layer=24, d_model=64).eval()
ids = torch.randint(0, 256, (1, 60_000), generator=torch.Generator().manual_seed(0))
positions = torch.randperm(60_000, generator=torch.Generator().manual_seed(1))[:8_000]
with torch.no_grad():
    model(ids[:, :4096], cache=model.init_cache(1))  # warm up allocator and kernel
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cap = capture(model, ids, positions=positions, dtype=torch.float16, chunk_size=4096)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kept = sum(t.numel() * t.element_size() for t in cap.states.values())
print((peak - base) * 1024, kept)
"""


def test_capture_memory_stays_bounded_at_60k_tokens_and_24_layers():
    """Keeping 8k of 60k positions of 25 layers in float16 must not hold every layer at every
    position: the peak grows by far less than all layers at all positions would take."""
    import subprocess
    import sys

    output = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], check=True, capture_output=True, text=True
    ).stdout
    growth, kept = (int(v) for v in output.split())
    all_layers_all_positions = 25 * 60_000 * 64 * 4  # float32: 384 MB
    assert kept == 25 * 8_000 * 64 * 2  # exactly what was asked for, in float16
    assert growth < all_layers_all_positions / 4, f"peak grew by {growth / 2**20:.0f} MB"
