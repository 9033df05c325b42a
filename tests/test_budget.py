"""The memory estimate made before a run: not below the measured peak, and a refusal comes
before anything as long as the input is allocated."""

import json
import subprocess
import sys

import pytest
import torch

from fidelity.analysis import plan_analysis
from fidelity.budget import MemoryBudgetError
from fidelity.cli import main
from fidelity.models.registry import build_model

# A fresh process: load a shipped model, plan (the estimate `fidelity analyze` prints), analyze
# with the defaults, report the estimate and the peak resident memory.
MEASURE = """
import json, sys
from fidelity.analysis import analyze, peak_memory_bytes, plan_analysis
from fidelity.models.loading import load_model
model = load_model(sys.argv[1]).eval()
estimate = plan_analysis(model, sys.argv[2], time_it=False).estimate.total
analyze(model, sys.argv[2], progress=False)
print(json.dumps({"estimate": estimate, "peak": peak_memory_bytes()}))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("model", "length"), [("mamba", "4k")])
def test_estimate_is_not_below_the_measured_peak(model, length):
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, model, length],
        capture_output=True,
        text=True,
        timeout=840,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = result["estimate"] / result["peak"]
    assert 1.0 <= ratio <= 1.3, result  # not below, and not a blanket overestimate


def test_refused_before_the_length_sized_buffers(monkeypatch):
    """100M tokens: the permutation of every position for the anchor draw and the probe's ids
    alone are 2.4 GB; the refusal comes before the permutation is drawn."""

    def no_permutation(*_args, **_kwargs):
        raise AssertionError("randperm ran before the memory check")

    monkeypatch.setattr(torch, "randperm", no_permutation)
    model = build_model("mamba", "tiny")
    with pytest.raises(MemoryBudgetError, match="needs about"):
        plan_analysis(model, "100M", max_memory=2 << 30, time_it=False)


@pytest.mark.parametrize(
    ("length", "message"),
    [("1000M", "needs about"), ("12345678901234567890", "beyond the longest input")],
)
def test_absurd_lengths_are_one_line(capsys, length, message):
    argv = ["analyze", "--model", "mamba", "--preset", "tiny", "--probe", "random"]
    code = main([*argv, "--length", length, "--max-memory", "8GB", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
