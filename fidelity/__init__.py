"""memory-fidelity: measure how sequence models forget.

import fidelity
model = fidelity.load_model("memmamba")                  # shipped default checkpoint
res = fidelity.analyze(model, length="8k")               # ETMF, ECLMF, SSM decay
res.plot(); res.summary; res.save("runs/mm8k")
cmp = fidelity.compare([res, "runs/other"]); cmp.plot()
ser = fidelity.analyze_series("runs/ind", fidelity.AnalysisOptions(256, "induction")); ser.plot()
cap = fidelity.capture(model, input_ids, layers=[0, 3], positions=idx)

The names below are imported on first use (module ``__getattr__``), so ``import fidelity``
and ``import fidelity.models...`` stay cheap: the analysis side (pandas, matplotlib, reports)
loads only when asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AnalysisOptions": "fidelity.analysis",
    "Capture": "fidelity.probes.capture_types",
    "Comparison": "fidelity.results",
    "FidelityResult": "fidelity.results",
    "Series": "fidelity.series",
    "TrainConfig": "fidelity.train",
    "analyze": "fidelity.analysis",
    "analyze_series": "fidelity.series",
    "build_model": "fidelity.models.registry",
    "capture": "fidelity.probes.capture",
    "capturing": "fidelity.probes.capture",
    "compare": "fidelity.analysis",
    "format_length": "fidelity.lengths",
    "kernels": "fidelity.kernels",
    "load_checkpoint": "fidelity.models.checkpoint",
    "load_model": "fidelity.models.loading",
    "make_probe": "fidelity.probes.tasks",
    "model_names": "fidelity.models.registry",
    "parse_length": "fidelity.lengths",
    "plan_analysis": "fidelity.analysis",
    "run_analysis": "fidelity.analysis",
    "run_with_capture": "fidelity.probes.capture",
    "save_checkpoint": "fidelity.models.checkpoint",
    "train": "fidelity.train",
}

__all__ = [
    "AnalysisOptions",
    "Capture",
    "Comparison",
    "FidelityResult",
    "Series",
    "TrainConfig",
    "analyze",
    "analyze_series",
    "build_model",
    "capture",
    "capturing",
    "compare",
    "format_length",
    "kernels",
    "load_checkpoint",
    "load_model",
    "make_probe",
    "model_names",
    "parse_length",
    "plan_analysis",
    "run_analysis",
    "run_with_capture",
    "save_checkpoint",
    "train",
]

if TYPE_CHECKING:
    from fidelity import kernels
    from fidelity.analysis import AnalysisOptions, analyze, compare, plan_analysis, run_analysis
    from fidelity.lengths import format_length, parse_length
    from fidelity.models.checkpoint import load_checkpoint, save_checkpoint
    from fidelity.models.loading import load_model
    from fidelity.models.registry import build_model, model_names
    from fidelity.probes.capture import capture, capturing, run_with_capture
    from fidelity.probes.capture_types import Capture
    from fidelity.probes.tasks import make_probe
    from fidelity.results import Comparison, FidelityResult
    from fidelity.series import Series, analyze_series
    from fidelity.train import TrainConfig, train


def __getattr__(name: str) -> Any:
    """Import an exported name on first use (and keep it as a module attribute)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fidelity' has no attribute {name!r}")
    value = importlib.import_module(module)
    if name != "kernels":
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
