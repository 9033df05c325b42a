"""memory-fidelity: measure how sequence models forget.

import fidelity
model = fidelity.load_model("memmamba")                  # shipped default checkpoint
res = fidelity.analyze(model, length="8k")               # ETMF, ECLMF, SSM decay
res.plot(); res.summary; res.save("runs/mm8k")
cmp = fidelity.compare([res, "runs/other"]); cmp.plot()
cap = fidelity.capture(model, input_ids, layers=[0, 3], positions=idx)
"""

from fidelity import kernels
from fidelity.analysis import analyze, compare, plan_analysis
from fidelity.lengths import format_length, parse_length
from fidelity.models.checkpoint import load_checkpoint, save_checkpoint
from fidelity.models.registry import build_model, load_model, model_names
from fidelity.probes.capture import capture, capturing, run_with_capture
from fidelity.probes.capture_types import Capture
from fidelity.probes.tasks import make_probe
from fidelity.results import Comparison, FidelityResult
from fidelity.train import TrainConfig, train

__all__ = [
    "Capture",
    "Comparison",
    "FidelityResult",
    "TrainConfig",
    "analyze",
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
    "run_with_capture",
    "save_checkpoint",
    "train",
]
