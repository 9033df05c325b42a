"""ETMF scores all layers of a distance in one stacked read-out; each layer's values must be
those of the layer scored alone (the read-out of one state matrix)."""

import math

import pytest
import torch

from fidelity.metrics import etmf as etmf_module
from fidelity.metrics.etmf import etmf_per_anchor
from fidelity.metrics.sampling import sample_anchors
from fidelity.probes.capture_types import Capture


def _random_layers(batch, length, d_model, n_layers, seed):
    """Layer 0: embeddings of random tokens; layer l: a random mix of lagged embeddings plus
    noise, so every layer holds a different amount of the past."""
    g = torch.Generator().manual_seed(seed)
    vocab = 30
    embedding = torch.randn(vocab, d_model, generator=g, dtype=torch.float64) / math.sqrt(d_model)
    tokens = torch.randint(vocab, (batch, length), generator=g)
    e = embedding[tokens]
    states = {0: e}
    for layer in range(1, n_layers + 1):
        h = torch.zeros_like(e)
        for lag in range(4):
            weight = torch.randn(d_model, d_model, generator=g, dtype=torch.float64) / layer
            h[:, lag:] += e[:, : length - lag] @ weight
        states[layer] = h + 0.3 * torch.randn(e.shape, generator=g, dtype=torch.float64)
    return Capture(torch.arange(length), states, tokens, length), embedding


@pytest.mark.parametrize(("batch", "d_model", "centered"), [(1, 6, True), (2, 40, False)])
def test_stacked_layers_equal_each_layer_alone(batch, d_model, centered, monkeypatch):
    cap, embedding = _random_layers(batch, 260, d_model, 4, seed=batch + d_model)
    holes = torch.rand(batch, 260, generator=torch.Generator().manual_seed(3)) > 0.2
    for layer in (2, 3):  # two layers share their missing positions: stacked together
        cap.states[layer][~holes] = torch.nan
    anchors = sample_anchors(260, 90, torch.Generator().manual_seed(1))
    distances = torch.tensor([0, 1, 7, 60, 150])
    if d_model == 40:
        monkeypatch.setattr(etmf_module, "_STACK_ELEMENTS", 2 * batch * 90 * d_model)  # split
    together = etmf_per_anchor(cap, anchors, distances, None, embedding, seed=2, centered=centered)
    for i, layer in enumerate(together.layers):
        alone = etmf_per_anchor(
            cap, anchors, distances, [layer], embedding, seed=2, centered=centered
        )
        for name in ("score", "chance", "raw", "accuracy"):
            torch.testing.assert_close(
                getattr(together, name)[i],
                getattr(alone, name)[0],
                rtol=1e-9,
                atol=1e-10,
                equal_nan=True,
            )
        assert torch.equal(together.n_samples[i], alone.n_samples[0])


@pytest.mark.parametrize("centered", [True, False])
def test_distances_in_threads_equal_one_by_one(centered):
    """Scoring distances side by side in threads gives the values of scoring them in turn
    (fresh random layers, missing samples included; the read-outs run in float64, where two
    orders of the same sums differ by rounding)."""
    cap, embedding = _random_layers(2, 300, 24, 3, seed=11)
    holes = torch.rand(2, 300, generator=torch.Generator().manual_seed(5)) > 0.15
    cap.states[2][~holes] = torch.nan
    anchors = sample_anchors(300, 120, torch.Generator().manual_seed(4))
    distances = torch.tensor([0, 1, 2, 5, 9, 30, 64, 120, 250])
    threads = torch.get_num_threads()
    alone = etmf_per_anchor(
        cap, anchors, distances, None, embedding, seed=3, centered=centered, workers=1
    )
    together = etmf_per_anchor(
        cap, anchors, distances, None, embedding, seed=3, centered=centered, workers=3
    )
    assert torch.get_num_threads() == threads  # restored after the threads ran
    for name in ("score", "chance", "raw", "accuracy"):
        torch.testing.assert_close(
            getattr(together, name), getattr(alone, name), rtol=1e-9, atol=1e-10, equal_nan=True
        )
    for name in ("n_valid", "n_samples", "n_raw_samples"):
        assert torch.equal(getattr(together, name), getattr(alone, name))


def test_workers_must_be_positive():
    cap, _ = _random_layers(1, 60, 4, 1, seed=0)
    with pytest.raises(ValueError, match="workers"):
        etmf_per_anchor(cap, torch.arange(0, 60, 2), torch.tensor([0, 1]), workers=0)
