"""The checkpoint-series view: ``fidelity compare`` on checkpoints and ``fidelity.analyze_series``.

The series is real: a 2-layer, d_model 16 Mamba trained for 4 steps on induction rows, a
checkpoint every 2 steps (module fixture, a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

import fidelity
from fidelity.analysis import AnalysisOptions
from fidelity.cli import main
from fidelity.errors import InputError
from fidelity.metrics.task_accuracy import task_accuracy
from fidelity.models.checkpoint import save_checkpoint
from fidelity.models.registry import build_model
from fidelity.series import (
    ACCURACY_SEED,
    Series,
    analyze_series,
    find_checkpoints,
)
from fidelity.train import TrainConfig, train

LENGTH = 128
ANCHORS = 32
TRIALS = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    config = TrainConfig(
        model="mamba",
        preset="mini",
        task="induction",
        length=LENGTH,
        batch_size=2,
        steps=4,
        save_every=2,
        warmup_steps=1,
        device="cpu",
        overrides={"n_layer": 2, "d_model": 16},
        task_options={"n_queries": 4},
    )
    out = tmp_path_factory.mktemp("series") / "run"
    train(config, out)
    return out


@pytest.fixture(scope="module")
def series(run_dir) -> Series:
    options = AnalysisOptions(LENGTH, "induction", "etmf", ANCHORS, device="cpu")
    return analyze_series(run_dir, options, trials=TRIALS, progress=False)


def test_finds_checkpoints_from_a_run_a_glob_and_a_list(run_dir):
    by_run = find_checkpoints([run_dir])
    by_glob = find_checkpoints([str(run_dir / "ckpt-*")])
    by_list = find_checkpoints([run_dir / "ckpt-4", run_dir / "ckpt-2"])
    assert [c.step for c in by_run] == [2, 4]
    for found in (by_glob, by_list):
        assert [(c.step, c.path) for c in found] == [(c.step, c.path) for c in by_run]
    assert by_run[0].config["d_model"] == 16


def test_refuses_empty_glob_empty_directory_and_mixed_models(run_dir, tmp_path):
    with pytest.raises(InputError, match="matches nothing"):
        find_checkpoints([str(tmp_path / "nothing-*")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no checkpoint"):
        find_checkpoints([tmp_path / "empty"])
    other = build_model("mamba", "mini", n_layer=2, d_model=32, vocab_size=16)
    save_checkpoint(other, tmp_path / "ckpt-6", meta={"training": {"step": 6}})
    with pytest.raises(InputError, match=r"mixed models.*d_model"):
        find_checkpoints([run_dir, tmp_path / "ckpt-6"])
    with pytest.raises(InputError, match="does not exist"):
        find_checkpoints([tmp_path / "missing"])


def test_series_table_matches_each_checkpoint_analysis(run_dir, series):
    assert series.steps == [2, 4]
    table = series.table
    assert list(table[["step", "layer"]].itertuples(index=False, name=None)) == [
        (2, 0),
        (2, 1),
        (2, 2),
        (4, 0),
        (4, 1),
        (4, 2),
    ]
    for step, result in zip(series.steps, series.results, strict=True):
        assert result.meta["training_step"] == step
        rows = table[table["step"] == step].reset_index(drop=True)
        pd.testing.assert_series_equal(
            rows["memory_mass"], result.summary["memory_mass"], check_names=False
        )
        # accuracy recomputed independently on the checkpoint, same rows
        model = fidelity.load_model(run_dir / f"ckpt-{step}")
        again = task_accuracy(model, "induction", LENGTH, trials=TRIALS, seed=ACCURACY_SEED)
        assert (rows["accuracy"] == again.accuracy).all()
        assert (rows["accuracy_low"] <= rows["accuracy"]).all()
        assert (rows["accuracy"] <= rows["accuracy_high"]).all()
        assert (rows["accuracy_rows"] == TRIALS).all()
    assert set(series.frame["step"]) == {2, 4}
    assert series.frame.columns[0] == "step"


def test_series_plot_and_save(series, tmp_path):
    figure = series.plot()
    assert isinstance(figure, Figure)
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["accuracy", "ETMF half-life", "contiguous length", "memory mass"]
    lines = figure.axes[3].get_lines()
    assert [line.get_label() for line in lines] == ["layer 1", "layer 2"]
    assert list(lines[0].get_xdata()) == [2, 4]
    out = series.save(tmp_path / "saved")
    for name in ("series.csv", "results.csv", "meta.json", "series.png", "series.svg"):
        assert (out / name).is_file()
    saved = pd.read_csv(out / "series.csv")
    assert list(saved["step"]) == list(series.table["step"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["series"]["steps"] == [2, 4]
    assert "memory across training" in (out / "report.html").read_text()
    assert "memory across training" in series._repr_html_()
    with pytest.raises(FileExistsError):
        series.save(tmp_path / "saved")


def test_series_from_results_needs_a_step(series):
    again = Series(list(reversed(series.results)))
    assert again.steps == [2, 4]
    stripped = fidelity.FidelityResult(
        series.results[0].frame,
        series.results[0].summary,
        {k: v for k, v in series.results[0].meta.items() if k != "training_step"}
        | {"checkpoint_path": "elsewhere"},
    )
    with pytest.raises(InputError, match="records no training step"):
        Series([stripped])
    named = fidelity.FidelityResult(
        stripped.frame, stripped.summary, stripped.meta | {"checkpoint_path": "runs/x/ckpt-30"}
    )
    assert Series([named, series.results[1]]).steps == [4, 30]


def test_notebook_api_exports():
    assert fidelity.analyze_series is analyze_series
    assert fidelity.Series is Series


def _cli(*args: str) -> int:
    return main(["compare", *args])


def test_cli_series_from_a_run_directory_and_a_quoted_glob(run_dir, tmp_path, capsys):
    options = ["--anchors", str(ANCHORS), "--trials", "4", "--no-progress", "--device", "cpu"]
    assert _cli(str(run_dir), "--out", str(tmp_path / "a"), *options) == 0
    printed = capsys.readouterr()
    assert "[1/2] step 2" in printed.err and "[2/2] step 4" in printed.err
    assert "memory across training" in printed.out
    table = pd.read_csv(tmp_path / "a" / "series.csv")
    assert sorted(set(table["step"])) == [2, 4]
    assert table["accuracy_rows"].eq(4).all()  # probe and length default to the training's
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert {run["probe"] for run in meta["runs"]} == {"induction"}
    assert {run["length"] for run in meta["runs"]} == {LENGTH}
    glob = str(run_dir / "ckpt-*")
    assert _cli(glob, "--out", str(tmp_path / "b"), "--probe", "random", *options) == 0
    table = pd.read_csv(tmp_path / "b" / "series.csv")
    assert table["accuracy"].isna().all()  # no memory task, no accuracy
    expanded = [str(p) for p in sorted(run_dir.glob("ckpt-*"))]
    assert _cli(*expanded, "--out", str(tmp_path / "c"), "--length", "64", *options) == 0


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda run, tmp: [str(tmp / "none-*")], "matches nothing"),
        (lambda run, tmp: [str(tmp / "empty")], "holds no checkpoint"),
        (lambda run, tmp: [str(run / "ckpt-2")], "at least two checkpoints"),
        (lambda run, tmp: [str(run), str(tmp / "analysis")], "not a checkpoint"),
        (lambda run, tmp: [str(tmp / "analysis"), str(tmp / "analysis")], "--length apply"),
        (lambda run, tmp: [str(run), str(tmp / "ckpt-9")], "mixed models"),
    ],
)
def test_cli_series_errors_exit_2_with_one_line(run_dir, tmp_path, capsys, make_args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "meta.json").write_text("{}")
    other = build_model("mamba", "mini", n_layer=3, d_model=16, vocab_size=16)
    save_checkpoint(other, tmp_path / "ckpt-9")
    args = make_args(run_dir, tmp_path)
    if "--length apply" in message:
        args += ["--length", "64"]
    assert _cli(*args, "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err
    assert not (tmp_path / "out").exists()


def test_cli_series_will_not_overwrite_what_it_did_not_write(run_dir, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code = _cli(str(run_dir), "--out", str(tmp_path / "mine"), "--force", "--no-progress")
    assert code == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
