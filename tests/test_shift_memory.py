"""The per-layer summary finds memory where a model keeps it, through ``fidelity.analyze``.

A hand-built model whose memory is known exactly: block 1 outputs the embedding of the token
``k`` positions back, block 2 adds the token ``2k`` back at weight 0.9. Layer 1 holds token
``t`` only at ``t + k``; layer 2 at ``t + k`` and, a little less, at ``t + 2k``. The summary
must put the peak at ``k``, the farthest distance at or above 0.5 at ``k`` (layer 1) and
``2k`` (layer 2), and not read the curves as exponential decays.

Then the same with trained models: tiny Transformers trained on the spot (seeded, a fixed
number of steps, one thread) to output the token ``k`` back, with the training code of
``benchmarks/shift_memory.py`` (which also trains Mamba models and prints their rows).
"""

import math

import pytest
import repo_scripts
import torch
from torch import nn

import fidelity.analysis as analysis
from fidelity.models.base import CausalLM
from fidelity.models.config import ModelConfig

VOCAB = 16


def _delayed(x: torch.Tensor, lag: int) -> torch.Tensor:
    """``x`` `(batch, length, d)` shifted ``lag`` positions later (zeros before)."""
    return torch.cat([torch.zeros_like(x[:, :lag]), x[:, :-lag]], dim=1)


class _Delay(nn.Module):
    """Block 1: ``h1[t] = x[t - k]``."""

    def __init__(self, lag: int) -> None:
        super().__init__()
        self.lag = lag

    def forward(self, x: torch.Tensor, cache: object = None) -> torch.Tensor:
        return _delayed(x, self.lag)


class _Echo(_Delay):
    """Block 2: ``h2[t] = h1[t] + 0.9 * h1[t - k]`` (so ``e[t - k] + 0.9 e[t - 2k]``)."""

    def forward(self, x: torch.Tensor, cache: object = None) -> torch.Tensor:
        return x + 0.9 * _delayed(x, self.lag)


class ShiftLM(CausalLM):
    """A two-block model with known memory (see the module docstring); vocabulary 16."""

    def __init__(self, lag: int) -> None:
        super().__init__(ModelConfig(d_model=32, n_layer=2, vocab_size=VOCAB))
        self.layers.extend([_Delay(lag), _Echo(lag)])


@pytest.mark.parametrize("lag", [2, 8, 32])
def test_summary_names_the_lag_of_a_model_that_copies(lag):
    model = ShiftLM(lag)
    result = analysis.analyze(
        model, 2048, probe="random", metrics="etmf", progress=False, n_boot=100
    )
    assert int(result.frame["distance"].max()) > 2 * lag  # the echo is within the distances
    rows = result.summary.set_index("layer")
    for layer, farthest in ((1, lag), (2, 2 * lag)):
        row = rows.loc[layer]
        assert (row.peak_distance, row.peak_distance_low, row.peak_distance_high) == (
            lag,
            lag,
            lag,
        ), layer
        assert row.farthest_distance == row.farthest_distance_low == farthest, layer
        assert row.farthest_distance_high == farthest, layer
        assert row.peak_value > 0.6
        assert row.contiguous_length == 0  # nothing at d = 1 (for lag 2: d = 1 is a gap)
        assert math.isnan(row.half_life) and not row.half_life_r2 >= 0.9  # not a decay
        assert 0 < row.memory_mass_low <= row.memory_mass <= row.memory_mass_high
    assert rows.loc[0, "farthest_distance"] == 0  # the embeddings hold token t only at d = 0


def test_random_probe_draws_within_the_model_vocabulary():
    """A model with 16 token ids is analyzed with random tokens over those 16 ids."""
    result = analysis.analyze(
        ShiftLM(4), 512, probe="random", metrics="etmf", anchors=64, progress=False, n_boot=0
    )
    assert result.meta["probe"] == "random" and "etmf_acc" in set(result.frame["metric"])
    with pytest.raises(ValueError, match=r"go up to \d+ but the model's vocabulary has 16"):
        analysis.analyze(ShiftLM(4), 512, probe="text", metrics="etmf", progress=False)


def _shift_benchmark():
    """``benchmarks/shift_memory.py`` as a module (its training code)."""
    return repo_scripts.load("benchmarks/shift_memory.py")


@pytest.mark.slow
@pytest.mark.parametrize("lag", [2, 8, 32])
def test_trained_copy_models_have_their_memory_at_the_lag(lag):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark = _shift_benchmark()
        model, accuracy = benchmark.train_shift_model(lag, 300, "transformer", seed=0)
        # 16 sequences of the training length: RoPE attention does not copy beyond it
        setting = benchmark.ANALYSIS["transformer"]
        result = analysis.analyze(
            model, probe="random", metrics="etmf", progress=False, n_boot=100, **setting
        )
    finally:
        torch.set_num_threads(previous)
    assert accuracy > 0.95  # it learned to copy
    row = result.summary.set_index("layer").loc[2]  # the last layer feeds the prediction
    assert row.peak_distance == row.peak_distance_low == row.peak_distance_high == lag
    assert row.farthest_distance_low >= lag
    assert row.contiguous_length < lag and math.isnan(row.half_life)
