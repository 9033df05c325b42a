"""MemMamba's pool attention (one added bias, a null note for empty pools, masked zero keys
up to MIN_KEYS) against the plain masked softmax it replaces, the fusion (output projections
folded into one matmul per context) against projecting and adding each context, the windowed
max without gradients (running maxima) against max_pool1d, and the exact straight-through
gate."""

import math

import pytest
import torch

from fidelity.models.memmamba import (
    FUSIONS,
    Fusion,
    MemMambaConfig,
    PoolAttention,
    PoolView,
    straight_through,
    window_pool,
)


def reference_attention(attention: PoolAttention, normed: torch.Tensor, view: PoolView):
    """The textbook form: scaled scores, -inf outside each query's pool, softmax, and all-zero
    weights (hence a zero context) for a query whose pool is empty. Returns the context before
    ``o_proj`` (which the block's fusion applies) and the weights."""
    heads = attention.n_heads
    q = attention.q_proj(normed).unflatten(-1, (heads, -1)).transpose(2, 3)
    k = attention.k_proj(view.values).unflatten(-1, (heads, -1)).transpose(2, 3)
    v = attention.v_proj(view.values).unflatten(-1, (heads, -1)).transpose(2, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    member = view.member[:, :, None]
    nonempty = member.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~member, float("-inf")).masked_fill(~nonempty, 0.0)
    weights = torch.softmax(scores, dim=-1) * nonempty
    context = (weights @ v).transpose(2, 3).flatten(-2)
    return context, weights


def random_view(batch, n_segments, n_queries, n_candidates, summary_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(
        batch, n_segments, n_candidates, summary_dim, generator=generator, dtype=torch.float64
    )
    member = torch.rand(batch, n_segments, n_queries, n_candidates, generator=generator) < 0.4
    member[0, 0, :3] = False  # empty pools, as before a sequence's first note
    member[-1, -1, -1] = False
    positions = torch.randint(0, 1000, (batch, n_segments, n_candidates), generator=generator)
    query_positions = torch.arange(n_segments * n_queries).view(n_segments, n_queries)
    return PoolView(values, member, positions, torch.zeros_like(positions), query_positions)


@pytest.mark.parametrize("n_candidates", [1, 7, 60])
def test_pool_attention_matches_the_masked_softmax(n_candidates):
    config = MemMambaConfig(d_model=24, n_layer=2, summary_dim=16, n_heads=4)
    torch.manual_seed(0)
    attention = PoolAttention(config).double()
    view = random_view(2, 3, 5, n_candidates, 16, seed=n_candidates)
    normed = torch.randn(2, 3, 5, 24, dtype=torch.float64)
    want_output, want_weights = reference_attention(attention, normed, view)
    with torch.no_grad():
        fast = attention(normed.flatten(1, 2), view)
    slow = attention(normed.flatten(1, 2), view)  # with gradients
    for got in (fast, slow):
        # float64; the two forms differ only in where the scale is applied: rounding
        torch.testing.assert_close(got.output, want_output, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.weights, want_weights, rtol=1e-12, atol=1e-12)
        empty = ~view.member.any(dim=-1)  # (batch, segments, queries)
        assert empty.any()
        assert torch.equal(
            got.weights.permute(0, 1, 3, 2, 4)[empty],
            torch.zeros_like(got.weights.permute(0, 1, 3, 2, 4)[empty]),
        )
        outside = ~view.member[:, :, None].expand_as(got.weights)
        assert torch.equal(got.weights[outside], torch.zeros_like(got.weights[outside]))


def test_pool_attention_gradients_match_the_masked_softmax():
    config = MemMambaConfig(d_model=24, n_layer=2, summary_dim=16, n_heads=4)
    torch.manual_seed(1)
    attention = PoolAttention(config).double()
    view = random_view(2, 2, 6, 9, 16, seed=5)
    view.values.requires_grad_(True)
    normed = torch.randn(2, 2, 6, 24, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 2, 6, 16, dtype=torch.float64)
    grads = []
    for forward in (
        lambda: attention(normed.flatten(1, 2), view).output,
        lambda: reference_attention(attention, normed, view)[0],
    ):
        attention.zero_grad()
        normed.grad = view.values.grad = None
        forward().backward(grad)
        grads.append([normed.grad, view.values.grad, attention.q_proj.weight.grad])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scores_block", [1, 2**19])
@pytest.mark.parametrize("pad", [1, 4])
def test_queries_projected_then_padded_equal_padded_then_projected(monkeypatch, pad, scores_block):
    """A chunk shorter than its segments: the queries are projected, then cut and padded with
    zeros by blocks of segments (one segment per block, or all in one), against the form it
    replaces, ``normed`` padded with zeros and projected (the textbook attention over the
    padded, segmented queries); outputs and gradients, float64. Padding queries see no note
    (query position -1): zero output."""
    from fidelity.models import memmamba

    monkeypatch.setattr(memmamba, "SCORES_BLOCK", scores_block)
    config = MemMambaConfig(d_model=24, n_layer=2, summary_dim=16, n_heads=4)
    torch.manual_seed(8)
    attention = PoolAttention(config).double()
    view = random_view(2, 3, 5, 9, 16, seed=8)
    length = 3 * 5 - pad
    view.query_positions = view.query_positions.masked_fill(view.query_positions >= length, -1)
    view.member[:, -1, 5 - pad :] = False  # padding queries see no note
    view.values.requires_grad_(True)
    normed = torch.randn(2, length, 24, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    results = []
    for forward in (
        lambda: attention(normed, view).output,
        lambda: reference_attention(
            attention, torch.nn.functional.pad(normed, (0, 0, 0, pad)).view(2, 3, 5, 24), view
        )[0],
    ):
        attention.zero_grad()
        normed.grad = view.values.grad = None
        output = forward()
        output.backward(grad)
        grads = [normed.grad, view.values.grad, attention.q_proj.weight.grad]
        results.append([output, *grads, attention.k_proj.weight.grad])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    padding = results[0][0][:, -1, 5 - pad :]
    assert torch.equal(padding, torch.zeros_like(padding))


def test_straight_through_is_exactly_hard_with_the_soft_gradient():
    generator = torch.Generator().manual_seed(2)
    soft = torch.rand(1000, generator=generator, dtype=torch.float32, requires_grad=True)
    hard = soft > 0.5
    gate = straight_through(hard, soft)
    assert torch.equal(gate, hard.float())  # no rounding from adding and subtracting soft
    weights = torch.randn(1000, generator=generator)
    (gate * weights).sum().backward()
    assert torch.equal(soft.grad, weights)
    with torch.no_grad():
        assert torch.equal(straight_through(hard, soft), hard.float())


@pytest.mark.parametrize("scores_block", [1, 200, 2**19])
def test_blocked_attention_passes_gradcheck(monkeypatch, scores_block):
    """Several segments per block, one per block (scores_block 1), all in one block."""
    from fidelity.models import memmamba
    from fidelity.models.memmamba import _BlockedAttention

    monkeypatch.setattr(memmamba, "SCORES_BLOCK", scores_block)
    generator = torch.Generator().manual_seed(3)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    # q (batch, positions, heads * width): 5 segments of 4 queries, the last one with 2
    # padding rows; k, v (batch, segments, heads, keys, width): 5 candidates and a null note
    q, k, v = tensor(2, 18, 2 * 3), tensor(2, 5, 2, 6, 3), tensor(2, 5, 2, 6, 3)
    member = torch.rand(2, 5, 4, 5, generator=generator) < 0.5
    member[0, 0, 0] = False  # an empty pool: all its weight on the null note
    assert torch.autograd.gradcheck(
        lambda q, k, v: _BlockedAttention.apply(q, k, v, member), (q, k, v)
    )


@pytest.mark.parametrize("scores_block", [1, 300])
def test_attention_by_blocks_of_segments_equals_all_at_once(monkeypatch, scores_block):
    """Output, weights and gradients do not depend on how many segments a block holds."""
    from fidelity.models import memmamba

    config = MemMambaConfig(d_model=24, n_layer=2, summary_dim=16, n_heads=4)
    torch.manual_seed(4)
    attention = PoolAttention(config).double()
    view = random_view(2, 7, 5, 9, 16, seed=6)
    normed = torch.randn(2, 7, 5, 24, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 7, 5, 16, dtype=torch.float64)
    results = []
    for block in (2**30, scores_block):
        monkeypatch.setattr(memmamba, "SCORES_BLOCK", block)
        normed.grad = None
        attention.zero_grad()
        got = attention(normed.flatten(1, 2), view)
        got.output.backward(grad)
        results.append([got.output, got.weights, normed.grad, attention.k_proj.weight.grad])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


def reference_fusion(fusion: Fusion, h, contexts, projections):
    """The separate steps: ``c_i = o_proj_i(context_i)``, then weight (or gate) and add."""
    out = h
    for index, (context, projection) in enumerate(zip(contexts, projections, strict=True)):
        projected = projection(context)
        if fusion.mode == "weighted":
            out = out + fusion.weights[index] * projected
        elif fusion.mode == "gated":
            gate = torch.sigmoid(fusion.gates[index](torch.cat([h, projected], dim=-1)))
            out = out + gate * projected
        else:
            out = out + projected
    return out


@pytest.mark.parametrize("mode", FUSIONS)
@pytest.mark.parametrize("n_contexts", [0, 1, 2])
def test_fusion_matches_projecting_and_adding_each_context(mode, n_contexts):
    torch.manual_seed(4)
    fusion = Fusion(24, mode, n_contexts).double()
    if mode == "weighted":
        with torch.no_grad():  # learned weights, not their initial ones
            fusion.weights.normal_()
    projections = [torch.nn.Linear(16, 24, bias=False).double() for _ in range(n_contexts)]
    h = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    contexts = [
        torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True) for _ in range(n_contexts)
    ]
    grad = torch.randn(2, 7, 24, dtype=torch.float64)
    inputs = [h, *contexts, *fusion.parameters(), *(p.weight for p in projections)]
    results = []
    for forward in (fusion, lambda *args: reference_fusion(fusion, *args)):
        out = forward(h, contexts, projections)
        grads = torch.autograd.grad(out, inputs, grad, allow_unused=True) if n_contexts else []
        results.append((out, grads))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [1, 2, 3, 7, 16, 17])
def test_window_max_without_gradients_equals_max_pool(window):
    generator = torch.Generator().manual_seed(window)
    features = torch.randn(2, 40, 5, generator=generator, dtype=torch.float64)
    features[:, 10:14] = features[:, 9:10]  # ties
    prefix = torch.randn(2, window - 1, 5, generator=generator, dtype=torch.float64)
    for n_prefix_valid in {0, (window - 1) // 2, window - 1}:
        with torch.no_grad():  # running maxima
            fast = window_pool(features, prefix, n_prefix_valid, "max")
        slow = window_pool(features.requires_grad_(), prefix, n_prefix_valid, "max")  # max_pool1d
        features.requires_grad_(False)
        assert torch.equal(fast, slow.detach())  # a max is exact: no rounding to differ by
