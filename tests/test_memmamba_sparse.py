"""MemMamba's two shortcuts against the paths they replace, in float64 on fresh random inputs:

- without gradients to the state scorer, cross-token attention runs only at the positions
  where its gate fires (:meth:`PoolAttention.forward` with ``selected``), against the dense
  attention times the gate; the attention weights observers read are the dense ones;
- the query segments shrink where many positions write notes
  (:meth:`MemMambaConfig.query_segment_size`), against the fixed ``block_size`` segments,
  cross-layer attention re-segmenting the pools it reads (:meth:`PoolChunk.segments_at`).
"""

import pytest
import torch

from fidelity.models.memmamba import MemMambaConfig, PoolAttention, PoolView
from fidelity.models.registry import build_model
from fidelity.probes.memmamba_ablation import zeroed_memory_contexts
from fidelity.probes.memmamba_trace import tracing_memmamba

EXACT = {"rtol": 1e-12, "atol": 1e-12}


def random_view(batch, n_segments, n_queries, n_candidates, summary_dim, generator):
    values = torch.randn(
        batch, n_segments, n_candidates, summary_dim, generator=generator, dtype=torch.float64
    )
    member = torch.rand(batch, n_segments, n_queries, n_candidates, generator=generator) < 0.4
    member[0, 0, :2] = False  # empty pools
    positions = torch.randint(0, 1000, (batch, n_segments, n_candidates), generator=generator)
    query_positions = torch.arange(n_segments * n_queries).view(n_segments, n_queries)
    return PoolView(values, member, positions, torch.zeros_like(positions), query_positions)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.7, 1.0])
def test_selected_queries_get_the_dense_output_and_the_rest_zero(rate):
    config = MemMambaConfig(d_model=24, n_layer=2, summary_dim=16, n_heads=4)
    generator = torch.Generator().manual_seed(int(rate * 10))
    torch.manual_seed(int(rate * 10))
    attention = PoolAttention(config).double()
    view = random_view(2, 3, 11, 9, 16, generator)
    normed = torch.randn(2, 3, 11, 24, generator=generator, dtype=torch.float64)
    selected = torch.rand(2, 3, 11, generator=generator) < rate
    with torch.no_grad():
        dense = attention(normed.flatten(1, 2), view)
        sparse = attention(normed.flatten(1, 2), view, selected.flatten(1, 2))
    torch.testing.assert_close(sparse.output, dense.output * selected[..., None], **EXACT)
    assert torch.equal(sparse.output[~selected], torch.zeros_like(sparse.output[~selected]))
    # the weights of every query, selected or not, as the dense attention gives them
    assert torch.equal(sparse.weights, dense.weights)


def test_reading_the_weights_of_a_sparse_forward_runs_no_attention_again(monkeypatch):
    """The weights observers read are computed alone, by blocks of segments: the attention's
    context is not computed a second time for them."""
    from fidelity.models import memmamba

    config = MemMambaConfig(d_model=24, n_layer=2, summary_dim=16, n_heads=4)
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    attention = PoolAttention(config).double()
    view = random_view(2, 3, 11, 9, 16, generator)
    normed = torch.randn(2, 3, 11, 24, generator=generator, dtype=torch.float64)
    selected = torch.rand(2, 3, 11, generator=generator) < 0.2
    with torch.no_grad():
        dense = attention(normed.flatten(1, 2), view).weights
        sparse = attention(normed.flatten(1, 2), view, selected.flatten(1, 2))
    calls = []
    apply = memmamba._BlockedAttention.apply
    monkeypatch.setattr(
        memmamba._BlockedAttention, "apply", lambda *a: calls.append(1) or apply(*a)
    )
    monkeypatch.setattr(memmamba, "SCORES_BLOCK", 1)  # one segment per block
    assert torch.equal(sparse.weights, dense)
    assert calls == []


def test_selected_queries_give_the_dense_gradients():
    """With gradients to everything but the gate, the selected path's gradients are those of
    the dense output times the gate."""
    config = MemMambaConfig(d_model=24, n_layer=2, summary_dim=16, n_heads=4)
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    attention = PoolAttention(config).double()
    view = random_view(2, 2, 13, 8, 16, generator)
    view.values.requires_grad_(True)
    normed = torch.randn(2, 2, 13, 24, generator=generator, dtype=torch.float64)
    normed.requires_grad_(True)
    selected = torch.rand(2, 2, 13, generator=generator) < 0.25
    grad = torch.randn(2, 2, 13, 16, generator=generator, dtype=torch.float64)
    grads = []
    for forward in (
        lambda: attention(normed.flatten(1, 2), view, selected.flatten(1, 2)).output,
        lambda: attention(normed.flatten(1, 2), view).output * selected[..., None],
    ):
        attention.zero_grad()
        normed.grad = view.values.grad = None
        forward().backward(grad)
        grads.append([normed.grad, view.values.grad] + [p.grad for p in attention.parameters()])
    for got, want in zip(*grads, strict=True):
        if want is None:  # o_proj runs in the fusion, not here
            assert got is None
            continue
        torch.testing.assert_close(got, want, **EXACT)


def memmamba(dtype=torch.float64, **overrides):
    """A tiny MemMamba whose pools overflow, with cross-layer attention in layers 1 and 3."""
    settings = {
        "pool_size": 4,
        "block_size": 64,
        "note_window": 3,
        "cross_layer_every": 2,
        "n_layer": 4,
        **overrides,
    }
    return build_model("memmamba", "tiny", seed=0, **settings).to(dtype).eval()


def set_rates(model, write_biases, trigger_biases):
    """Per layer: the note scorer's and the state scorer's biases (large: every position
    writes / fires; very negative: none)."""
    with torch.no_grad():
        for layer, write, trigger in zip(model.layers, write_biases, trigger_biases, strict=True):
            layer.note_block.scorer.bias.fill_(write)
            layer.trigger.scorer.bias.fill_(trigger)


def chunked(model, ids, sizes):
    cache = model.init_cache(ids.shape[0])
    outputs, start = [], 0
    for size in sizes:
        outputs.append(model(ids[:, start : start + size], cache=cache).logits)
        start += size
    return torch.cat(outputs, dim=1)


# per layer (write bias, trigger bias): dense, sparse and in-between firing, low and high
# write rates side by side (cross-layer attention in layer 3 reads pools segmented
# differently)
RATES = [
    ((0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0)),
    ((-1.5, 3.0, 0.0, 8.0), (-2.0, -30.0, 2.0, 0.0)),
    ((8.0, 8.0, 8.0, 8.0), (30.0, -1.0, -30.0, 1.0)),
]


@pytest.mark.parametrize("rates", RATES)
def test_forward_without_gradients_matches_the_dense_forward(rates):
    """No gradients (cross-token attention at firing positions only) against a forward
    with gradients (dense cross-token attention times the straight-through gate), in one
    pass and through the cache."""
    model = memmamba()
    set_rates(model, *rates)
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(1))
    dense = model(ids).logits.detach()
    dense_chunks = chunked(model, ids, [40, 1, 70, 39]).detach()
    with torch.no_grad():
        sparse = model(ids).logits
        sparse_chunks = chunked(model, ids, [40, 1, 70, 39])
    torch.testing.assert_close(sparse, dense, **EXACT)
    torch.testing.assert_close(sparse_chunks, dense_chunks, **EXACT)
    torch.testing.assert_close(sparse_chunks, sparse, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rates", RATES)
def test_adaptive_segments_match_fixed_segments_forward_and_gradients(rates, monkeypatch):
    """Segments cut to the write rate against ``block_size`` segments everywhere: logits and
    every parameter's gradient (training mode, write-rate loss included)."""
    model = memmamba()
    set_rates(model, *rates)
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(2))
    sizes = []
    original = MemMambaConfig.query_segment_size

    def recorded(self, write_rate):
        sizes.append(original(self, write_rate))
        return sizes[-1]

    results = []
    for patch in (recorded, lambda self, write_rate: self.block_size):
        monkeypatch.setattr(MemMambaConfig, "query_segment_size", patch)
        model.train()
        model.zero_grad()
        output = model(ids)
        (output.logits.square().mean() + output.aux_loss).backward()
        with torch.no_grad():
            model.eval()
            chunks = chunked(model, ids, [64, 86])
        results.append(
            (output.logits.detach(), chunks, [p.grad.clone() for p in model.parameters()])
        )
    if rates[0][0] == 8.0:  # every position writes: segments far below block_size
        assert max(sizes) < 64
    (logits, chunks, grads), (want_logits, want_chunks, want_grads) = results
    torch.testing.assert_close(logits, want_logits, **EXACT)
    torch.testing.assert_close(chunks, want_chunks, **EXACT)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_query_segment_size_keeps_candidates_near_the_pool():
    config = MemMambaConfig(d_model=32, n_layer=2, pool_size=50, block_size=512)
    assert config.query_segment_size(0.0) == 512
    assert config.query_segment_size(0.1) == 512  # 51 new notes per segment at most
    assert config.query_segment_size(0.5) == 200  # about 100 new notes per segment
    assert config.query_segment_size(1.0) == 100
    ablation = MemMambaConfig(d_model=32, n_layer=2, pool_size=50, use_note_block=False)
    assert ablation.query_segment_size(0.0) == 100  # every position writes


def test_trace_sees_dense_weights_and_ablation_zeroes_the_sparse_path():
    """The trace hooks record, at the positions asked for, the weights of the dense
    attention (fired or not), and zeroing the contexts still gives the mixers' output."""
    model = memmamba()
    set_rates(model, (0.0, 3.0, 0.0, 8.0), (-2.0, 0.5, 2.0, -30.0))
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(3))
    positions = [5, 33, 64, 100, 119]
    records = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), tracing_memmamba(model, (1, 120), positions) as trace:
            model(ids)
        records.append(trace.attention)
    dense, sparse = records
    assert len(dense) == len(sparse) > len(positions)
    assert any(not record.fired for record in sparse)
    for got, want in zip(sparse, dense, strict=True):
        assert (got.block, got.kind, got.query_position, got.fired) == (
            want.block,
            want.kind,
            want.query_position,
            want.fired,
        )
        assert torch.equal(got.note_positions, want.note_positions)
        torch.testing.assert_close(got.weights, want.weights, **EXACT)
    with zeroed_memory_contexts(model):
        zeroed = model(ids).logits.detach()
        with torch.no_grad():
            zeroed_sparse = model(ids).logits
    torch.testing.assert_close(zeroed_sparse, zeroed, **EXACT)
