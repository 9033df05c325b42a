"""The sweep's tables in ``out``: ``sweep.csv``, ``sweep_summary.csv`` and ``failures.csv``,
each replaced atomically.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from fidelity.results import FRAME_COLUMNS, SUMMARY_COLUMNS, FidelityResult

if TYPE_CHECKING:
    from fidelity.sweep.config import SweepConfig
    from fidelity.sweep.executors import RunReport

FRAME_TABLE = "sweep.csv"
SUMMARY_TABLE = "sweep_summary.csv"
FAILURE_TABLE = "failures.csv"
TABLES = (FRAME_TABLE, SUMMARY_TABLE, FAILURE_TABLE)
FAILURE_COLUMNS = ("run", "model", "length", "probe", "seed", "error", "traceback")


def write_tables(
    config: SweepConfig,
    done: Mapping[str, FidelityResult],
    failures: Mapping[str, RunReport],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``sweep.csv``, ``sweep_summary.csv`` and ``failures.csv`` in ``out``, runs in config
    order; each file is replaced atomically. Returns the three tables in that order."""
    frames, summaries, failed = [], [], []
    for spec in config.runs:
        if spec.name in done:
            result = done[spec.name]
            frames.append(result.frame.assign(run=spec.name, probe=spec.probe, seed=spec.seed))
            summaries.append(
                result.summary.assign(
                    run=spec.name, probe=spec.probe, length=spec.length, seed=spec.seed
                )
            )
        elif spec.name in failures:
            report = failures[spec.name]
            row = (spec.name, spec.model, spec.length, spec.probe, spec.seed)
            failed.append((*row, report.error, report.traceback))
    frame_columns = ["run", "probe", "seed", *FRAME_COLUMNS]
    summary_lead = ["run", "probe", "length", "seed", *SUMMARY_COLUMNS]
    frame = _concat(frames, frame_columns)[frame_columns]
    summary = _concat(summaries, summary_lead)
    summary = summary[[*summary_lead, *(c for c in summary.columns if c not in summary_lead)]]
    failure_table = pd.DataFrame(failed, columns=list(FAILURE_COLUMNS))
    for table, name in (
        (frame, FRAME_TABLE),
        (summary, SUMMARY_TABLE),
        (failure_table, FAILURE_TABLE),
    ):
        _write_csv(table, config.out / name)
    return frame, summary, failure_table


def _concat(tables: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    if not tables:
        return pd.DataFrame(columns=columns)
    return pd.concat(tables, ignore_index=True)


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    """CSV (NaN as an empty field) written beside ``path`` and renamed into place."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        table.to_csv(staging, index=False, na_rep="")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
