"""Influence on models with known answers, both strategies against each other, seeds."""

import math

import pandas as pd
import pytest
import torch
from torch import nn

from fidelity.metrics.influence import influence, replacement_tokens
from fidelity.models.base import CausalLM
from fidelity.models.config import ModelConfig
from fidelity.models.decimamba import DeciMambaLM
from fidelity.models.registry import build_model
from fidelity.schema import TIDY_COLUMNS

DISTANCES = [0, 1, 2, 3, 5, 8, 13]


pytestmark = pytest.mark.usefixtures("one_thread")


class LinearRecurrenceLM(CausalLM):
    """Test double with an exact answer: block ``i`` computes ``g_t = decay_i * g_(t-1) + x_t``
    over its input ``x`` (no residual), so a change ``delta`` of the embedding at ``t`` moves
    layer 1 at ``t + d`` by ``a^d delta`` and layer 2 by ``sum_k a^k b^(d-k) delta``."""

    class Block(nn.Module):
        def __init__(self, decay: float) -> None:
            super().__init__()
            self.decay = decay

        def forward(self, x: torch.Tensor, state: list | None = None) -> torch.Tensor:
            g = state[0] if state is not None else torch.zeros_like(x[:, 0])
            outputs = []
            for t in range(x.shape[1]):
                g = self.decay * g + x[:, t]
                outputs.append(g)
            if state is not None:
                state[0] = g
            return torch.stack(outputs, dim=1)

    def __init__(self, decays=(0.9, 0.5), vocab=32, d_model=6) -> None:
        super().__init__(ModelConfig(d_model=d_model, n_layer=len(decays), vocab_size=vocab))
        self.layers = nn.ModuleList(self.Block(decay) for decay in decays)

    def init_cache(self, batch_size, device=None, dtype=None):
        return {"states": [[None] for _ in self.layers], "position": 0}

    def _forward_blocks(self, x, cache, hidden):
        for index, layer in enumerate(self.layers):
            state = cache["states"][index] if cache is not None else None
            if state is not None and state[0] is None:
                state[0] = torch.zeros_like(x[:, 0])
            x = layer(x, state)
        return x


def _expected(a: float, b: float, d: int) -> tuple[float, float]:
    return a**d, sum(a**k * b ** (d - k) for k in range(d + 1))


def _ids(batch, length, vocab, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["full", "branch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_recurrence_gives_the_exact_decay(strategy, dtype):
    model = LinearRecurrenceLM().to(dtype)
    ids = _ids(2, 40, 32)
    frame = influence(
        model,
        ids,
        torch.arange(27),
        DISTANCES,
        [0, 1, 2],
        n_anchors=10,
        strategy=strategy,
        batch_size=3,
        chunk_size=7,
        n_boot=50,
    )
    # every anchor has the same ratio, so value and interval collapse to the exact answer;
    # float32: relative rounding of the differences, about 1e-6 after 13 steps
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert set(frame["layer"]) == {1, 2}  # layer 0 is not reported
    for row in frame.itertuples():
        expected = _expected(0.9, 0.5, row.distance)[row.layer - 1]
        assert row.value == pytest.approx(expected, rel=rtol)
        assert row.ci_low == pytest.approx(expected, rel=rtol)
        assert row.ci_high == pytest.approx(expected, rel=rtol)
    assert set(frame["n"]) == {2 * 10}  # 2 rows x 10 anchors, all with t + 13 < 40


def test_zeroed_mixers_give_zero_influence_beyond_the_token():
    model = build_model("mamba", "tiny").double().eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.out_proj.weight.zero_()
    frame = influence(model, _ids(2, 30, 256), torch.arange(30), DISTANCES, n_anchors=6)
    assert (frame.loc[frame["distance"] == 0, "value"] == 1.0).all()
    assert (frame.loc[frame["distance"] > 0, ["value", "ci_low", "ci_high"]] == 0.0).all().all()


@pytest.mark.parametrize("name", ["memmamba", "transformer", "mamba2"])
def test_branch_equals_full_forwards(name):
    model = build_model(name, "tiny").double().eval()
    ids = _ids(2, 64, 256, seed=1)
    options = {"n_anchors": 8, "seed": 3, "n_boot": 20, "chunk_size": 16}
    full = influence(model, ids, torch.arange(64), DISTANCES, strategy="full", **options)
    branch = influence(model, ids, torch.arange(64), DISTANCES, strategy="branch", **options)
    # float64; the branch runs from a cache snapshot, the full path from position 0: only
    # rounding differs, amplified by the ratio's denominator (1e-8 relative is ample)
    pd.testing.assert_frame_equal(full, branch, rtol=1e-8, atol=1e-12)
    assert (full.loc[full["distance"] == 0, "value"] - 1).abs().max() < 1e-12
    assert (full.loc[full["distance"] > 0, "value"] > 0).all()  # information does travel


def test_seeds_are_deterministic_and_matter():
    model = build_model("mamba", "tiny").eval()
    ids = _ids(1, 80, 256, seed=2)
    first = influence(model, ids, torch.arange(80), DISTANCES, n_anchors=5, seed=4)
    again = influence(model, ids, torch.arange(80), DISTANCES, n_anchors=5, seed=4)
    other = influence(model, ids, torch.arange(80), DISTANCES, n_anchors=5, seed=5)
    pd.testing.assert_frame_equal(first, again)
    assert not first["value"].equals(other["value"])
    assert list(first.columns) == list(TIDY_COLUMNS)
    assert set(first["metric"]) == {"influence"}


def test_replacements_always_differ_and_cover_the_vocabulary():
    ids = torch.zeros(4, 10, dtype=torch.long)
    ids[:, 3] = 2
    draws = replacement_tokens(ids.repeat(500, 1), torch.tensor([0, 3]), 3, torch.Generator())
    assert set(draws[:, 0].tolist()) == {1, 2} and set(draws[:, 1].tolist()) == {0, 1}


def test_distances_are_capped_and_validated():
    model = build_model("mamba", "tiny").eval()
    ids = _ids(1, 50, 256)
    frame = influence(model, ids, torch.arange(50), [1, 4, 30], n_anchors=4, max_distance=10)
    assert sorted(set(frame["distance"])) == [0, 1, 4]
    with pytest.raises(ValueError, match="never needs negative distances"):
        influence(model, ids, torch.arange(50), [-1, 2])
    with pytest.raises(ValueError, match="anchors must lie in"):
        influence(model, ids, torch.tensor([60]), [1])
    with pytest.raises(ValueError, match="layers"):
        influence(model, ids, torch.arange(50), [1], layers=[0])
    with pytest.raises(ValueError, match="strategy"):
        influence(model, ids, torch.arange(50), [1], strategy="fast")
    with pytest.raises(ValueError, match="replacement"):
        influence(model, ids, torch.arange(50), [1], replacement="mask")
    with pytest.raises(ValueError, match="vocabulary"):
        influence(model, ids + 300, torch.arange(50), [1])
    with pytest.raises(TypeError, match="DeciMamba"):
        influence(DeciMambaLM.from_mamba(model), ids, torch.arange(50), [1])
    assert math.isfinite(frame["value"].sum())
