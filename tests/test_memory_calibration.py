"""benchmarks/memory_calibration.py: its table keeps every stored measurement."""

from __future__ import annotations

import sys

from tests.repo_scripts import load

calibration = load("benchmarks/memory_calibration.py")


def test_a_call_for_some_models_keeps_the_other_stored_rows_in_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "MEASURED", tmp_path / "memory_calibration.csv")
    for name, length, peak in (("mamba", 8000, 1000), ("transformer", 60000, 2000)):
        row = dict.fromkeys(calibration.FIELDS, "")
        row.update(model=name, weights="shipped", length=length, threads=1, status="ran")
        row.update(peak=peak)
        row.update(seconds=1, load=0.5, date="2026-12-01")
        calibration._append_measured(row)
    monkeypatch.setattr(calibration, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(
        calibration,
        "_worker",
        lambda mode, name, weights, length, threads: {
            "status": "ok",
            "estimate": 1100,
            "parts": {},
        },
    )
    table = tmp_path / "table.md"
    argv = ["memory_calibration.py", "--models", "transformer", "--small", "", "--lengths"]
    monkeypatch.setattr(sys, "argv", [*argv, "60k", "--no-measure", "--table", str(table)])
    calibration.main()
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[:4] for row in rows] == [
        ["| mamba", "shipped", "8k", "1"],
        ["| transformer", "shipped", "60k", "1"],
    ]
    assert "| 1.10 |" in rows[0] and "| 0.55 |" in rows[1]
