"""Compressive Transformer: shapes, causality, forward == chunks with cache == step, bounded
memories, each compression option against a direct computation, the forgetting horizon, and
detached memories."""

import pytest
import torch

from fidelity.models.compressive import CompressiveConfig, MemoryCompression
from fidelity.models.registry import build_model

# Segments of 8, memory of 16, 4 compressed slots of 2 states: after 24 tokens every memory
# path is busy, so 60-token tests cross many segment ends and compressions.
ACTIVE = {
    "n_heads": 2,
    "segment_length": 8,
    "memory_length": 16,
    "compressed_memory_length": 4,
    "compression_rate": 2,
}
TOLERANCE = {"rtol": 1e-9, "atol": 1e-9}  # float64, as for every model of the toolkit


def tiny(dtype=torch.float64, **overrides):
    model = build_model("compressive", "tiny", seed=0, **{**ACTIVE, **overrides})
    return model.to(dtype).eval()


def random_tokens(batch, length, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_compressors(model, seed=0):
    """Move conv compressors away from their mean-pooling init so the tests see a real conv."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            if layer.compression.kind == "conv":
                for param in layer.compression.conv.parameters():
                    noise = torch.randn(param.shape, generator=g, dtype=torch.float64)
                    param.add_(0.05 * noise.to(param.dtype))


def test_forward_shapes_hidden_states():
    model = tiny(torch.float32)
    ids = random_tokens(2, 37)
    out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (2, 37, 256) and torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == model.config.n_layer + 1
    assert all(h.shape == (2, 37, 32) for h in out.hidden_states)
    assert isinstance(model.norm_f, torch.nn.LayerNorm)


@pytest.mark.parametrize("compression", ["max", "mean", "conv"])
def test_causality_later_tokens_never_change_earlier_outputs(compression):
    model = tiny(compression=compression)
    randomize_compressors(model)
    ids = random_tokens(2, 70)
    for cut in (3, 41, 64):
        changed = ids.clone()
        changed[:, cut:] = (changed[:, cut:] + 1) % 256
        with torch.no_grad():
            a, b = model(ids).logits, model(changed).logits
        torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-12)
        assert not torch.allclose(a[:, cut:], b[:, cut:])


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
    assert start == ids.shape[1] == cache.position
    return torch.cat(outputs, dim=1)


VARIANTS = [
    {"compression": "max"},
    {"compression": "mean"},
    {"compression": "conv"},
    # memory not a multiple of the segment, segment not of the rate: pending states
    {"compression": "conv", "segment_length": 6, "memory_length": 7, "compression_rate": 4},
    {"memory_length": 0, "compressed_memory_length": 0},  # plain segment-wise Transformer
    {"compressed_memory_length": 0},  # Transformer-XL
]


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items())
)
def test_step_and_chunks_match_parallel_forward(variant):
    model = tiny(**variant)
    randomize_compressors(model)
    ids = random_tokens(2, 61, seed=3)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(step_logits(model, ids), full, **TOLERANCE)
    # chunk edges at 5, 6, 19, 49: never aligned with the segments of 8 (or 6)
    torch.testing.assert_close(chunked_logits(model, ids, [5, 1, 13, 30, 12]), full, **TOLERANCE)


def test_memories_stay_bounded_at_long_lengths():
    """5000 tokens fed in chunks: after every chunk the cache holds exactly the configured
    numbers of memory and compressed slots, and only the partial segment varies."""
    config = {
        "n_layer": 2,
        "segment_length": 48,
        "memory_length": 40,
        "compressed_memory_length": 10,
        "compression_rate": 3,
    }
    model = tiny(torch.float32, **config)
    ids = random_tokens(1, 5000, seed=4)
    cache = model.init_cache(1)
    with torch.no_grad():
        for start in range(0, 5000, 1000):
            model(ids[:, start : start + 1000], cache=cache)
            consumed = start + 1000
            closed_segments = consumed // 48
            evicted = closed_segments * 48 - 40
            for layer in cache.layers:
                assert layer.memory.shape == (1, 40, 32)
                assert layer.compressed.shape == (1, 10, 32)
                assert layer.pending.shape == (1, evicted % 3, 32)
                assert layer.fill == consumed - closed_segments * 48
                assert layer.segment_inputs.shape == (1, layer.fill, 32)
                assert layer.segment_keys.shape == (1, 2, layer.fill, 16)
                assert layer.segment_values.shape == (1, 2, layer.fill, 16)
                assert layer.memory_keys.shape == (1, 2, 50, 16)  # 10 compressed + 40


@pytest.mark.parametrize("compression", ["max", "mean", "conv"])
def test_compressed_memory_is_the_pooled_evicted_layer_inputs(compression):
    """Layer 0's inputs are the token embeddings, so its memories can be computed directly."""
    model = tiny(
        n_layer=1,
        segment_length=8,
        memory_length=16,
        compressed_memory_length=3,
        compression_rate=4,
        compression=compression,
    )
    randomize_compressors(model)
    ids = random_tokens(2, 59, seed=5)  # 7 segments closed (56 tokens), 3 in the 8th
    cache = model.init_cache(2)
    with torch.no_grad():
        model(ids, cache=cache)
        embedded = model.embedding(ids)  # (2, 59, 32)
    layer = cache.layers[0]
    # 56 - 16 = 40 states evicted -> 10 groups of 4; the last 3 groups cover tokens 28..39.
    torch.testing.assert_close(layer.memory, embedded[:, 40:56], rtol=0, atol=0)
    torch.testing.assert_close(layer.segment_inputs, embedded[:, 56:], rtol=0, atol=0)
    assert layer.pending.shape[1] == 0
    groups = embedded[:, 28:40].reshape(2, 3, 4, 32)  # (batch, slot, member, d_model)
    if compression == "max":
        expected = groups.amax(dim=2)
    elif compression == "mean":
        expected = groups.mean(dim=2)
    else:
        conv = model.layers[0].compression.conv
        # out[b, s, o] = bias[o] + sum_{i, k} weight[o, i, k] * group[b, s, k, i]
        expected = torch.einsum("oik,bski->bso", conv.weight, groups) + conv.bias
    torch.testing.assert_close(layer.compressed, expected, rtol=1e-12, atol=1e-12)


def test_conv_compression_starts_as_mean_pooling():
    states = torch.randn(2, 12, 32)
    conv = MemoryCompression(32, 3, "conv")
    mean = MemoryCompression(32, 3, "mean")
    # float32 weights of 1/3: a few roundings on values of order 1
    torch.testing.assert_close(conv(states), mean(states), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 3"):
        mean(states[:, :7])


def test_one_layer_forgets_exactly_beyond_memory_and_compressed_memory():
    """With one layer, the last segment (positions 56..63) sees tokens 40..55 in memory and
    32..39 through 4 compressed slots of 2; token 31 is gone, token 32 still counts."""
    model = tiny(n_layer=1)
    ids = random_tokens(1, 64, seed=6)
    with torch.no_grad():
        base = model(ids).logits[:, 56:]
        for position, remembered in ((31, False), (32, True), (39, True), (45, True)):
            changed = ids.clone()
            changed[:, position] = (changed[:, position] + 1) % 256
            after = model(changed).logits[:, 56:]
            if remembered:
                assert (after - base).abs().max() > 1e-6, position
            else:
                torch.testing.assert_close(after, base, rtol=0, atol=1e-12)


def test_compressed_memory_reaches_further_than_memory_alone():
    ids = random_tokens(1, 64, seed=7)
    changed = ids.clone()
    changed[:, 35] = (changed[:, 35] + 1) % 256
    with torch.no_grad():
        with_compressed = tiny(n_layer=1)
        without = tiny(n_layer=1, compressed_memory_length=0)
        delta_with = with_compressed(changed).logits[:, 56:] - with_compressed(ids).logits[:, 56:]
        delta_without = without(changed).logits[:, 56:] - without(ids).logits[:, 56:]
    assert delta_with.abs().max() > 1e-6
    assert delta_without.abs().max() == 0


def test_memories_are_detached_across_segments_and_conv_compressor_learns():
    model = tiny(torch.float64, n_layer=2)
    model.train()
    ids = random_tokens(2, 40, seed=8)
    kept = {}

    def keep_embedding_output(module, inputs, output):
        output.retain_grad()
        kept["embedded"] = output

    handle = model.embedding.register_forward_hook(keep_embedding_output)
    try:
        logits = model(ids).logits
    finally:
        handle.remove()
    logits[:, 32:].pow(2).sum().backward()  # the last segment only
    grad = kept["embedded"].grad
    assert grad[:, :32].abs().max() == 0, "gradient crossed a segment boundary through memory"
    assert grad[:, 32:].abs().min() > 0
    for layer in model.layers:
        assert layer.compression.conv.weight.grad.abs().sum() > 0


def test_no_state_leaks_between_calls_and_cache_is_detached():
    model = tiny()
    ids = random_tokens(3, 30, seed=9)
    with torch.no_grad():
        batch = model(ids).logits
        again = model(ids).logits
        single = model(ids[1:2]).logits
    torch.testing.assert_close(batch, again, rtol=0, atol=0)
    torch.testing.assert_close(batch[1:2], single, rtol=1e-10, atol=1e-10)
    model.train()
    cache = model.init_cache(1)
    model(ids[:1], cache=cache)
    tensors = [t for layer in cache.layers for t in vars(layer).values() if torch.is_tensor(t)]
    assert tensors and not any(t.requires_grad for t in tensors)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="compression must be one of"):
        CompressiveConfig(compression="median").validate()
    with pytest.raises(ValueError, match="even head"):
        CompressiveConfig(d_model=30, n_heads=2).validate()
    with pytest.raises(ValueError, match="memory_length must be a non-negative"):
        CompressiveConfig(memory_length=-1).validate()
    with pytest.raises(ValueError, match="segment_length must be a positive"):
        CompressiveConfig(segment_length=0).validate()
    with pytest.raises(ValueError, match="compression_rate"):
        build_model("compressive", "tiny", compression_rate=0)
