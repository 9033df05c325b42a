"""Sweeps: many analyses (model x length x probe x seed) from one TOML file, run in parallel
on this machine or on a Ray cluster, collected into one tidy table.

Config::

    [sweep]
    out = "runs/sweep1"                       # every run and the tables go here
    models = ["memmamba", "runs/mm/ckpt-1000"]  # grid: registered names, checkpoint dirs
    lengths = ["2k", "8k"]
    probes = ["text", "random"]               # optional, default [probe] ("text")
    seeds = [0, 1]                            # optional, default [seed] (0)
    metrics = ["etmf", "eclmf"]               # defaults shared by all runs (ANALYSIS_KEYS)
    anchors = 256

    [[run]]                                   # explicit runs, beside or instead of the grid
    model = "mamba"
    length = "4k"
    probe = "passkey"                         # optional, default [sweep] probe
    name = "mamba-passkey"                    # optional, default <model>-<length>-<probe>-s<seed>
    anchors = 128                             # any shared default can be overridden

Relative paths are taken from the current directory (as on the command line) and stored
absolute, so worker processes and Ray tasks find them. The whole config, and every run already
in ``out``, is checked before anything runs.

Layout of ``out``: one directory per run (:meth:`FidelityResult.save`, atomic), plus
``sweep.csv`` (every run's frame with ``run``, ``probe`` and ``seed`` columns first; ``model``,
``checkpoint`` and ``length`` are already frame columns), ``sweep_summary.csv`` (per run and
layer) and ``failures.csv`` (one row per failed run with its error; only a header when none).
A run whose directory is complete is skipped (resumable sweeps) unless ``force``; a failing run
is recorded and the others go on.

Workers load the model and run :func:`fidelity.analyze`; the results come back to this process,
which writes ``out`` (so on a Ray cluster only checkpoints and the package must be reachable
from the nodes, not ``out``).
"""

from fidelity.sweep.config import (
    ANALYSIS_KEYS,
    GRID_KEYS,
    META_KEY,
    RUN_KEYS,
    SWEEP_KEYS,
    AnalysisOptions,
    RunSpec,
    SweepConfig,
    load_sweep_config,
    parse_sweep_config,
)
from fidelity.sweep.executors import EXECUTORS, RunReport, execute_run
from fidelity.sweep.runner import RunOutcome, Status, SweepResult, run_sweep
from fidelity.sweep.tables import (
    FAILURE_COLUMNS,
    FAILURE_TABLE,
    FRAME_TABLE,
    SUMMARY_TABLE,
    TABLES,
)

__all__ = [
    "ANALYSIS_KEYS",
    "EXECUTORS",
    "FAILURE_COLUMNS",
    "FAILURE_TABLE",
    "FRAME_TABLE",
    "GRID_KEYS",
    "META_KEY",
    "RUN_KEYS",
    "SUMMARY_TABLE",
    "SWEEP_KEYS",
    "TABLES",
    "AnalysisOptions",
    "RunOutcome",
    "RunReport",
    "RunSpec",
    "Status",
    "SweepConfig",
    "SweepResult",
    "execute_run",
    "load_sweep_config",
    "parse_sweep_config",
    "run_sweep",
]
