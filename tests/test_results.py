"""FidelityResult / Comparison: validation, exact save/load round trips, atomic saves, errors.

The tables come from ``tests/fixtures_results.py`` (synthetic, plumbing only) or are built by
hand where exact values matter.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_results import synthetic_frame, synthetic_meta, synthetic_result, synthetic_summary

from fidelity.destinations import MANIFEST
from fidelity.reports import html
from fidelity.results import (
    FRAME_COLUMNS,
    SUMMARY_COLUMNS,
    Comparison,
    FidelityResult,
)


@pytest.fixture(scope="module")
def small() -> FidelityResult:
    """Horizontal + vertical metrics only: two figure kinds besides depth, quick to save."""
    return synthetic_result(n_layer=2, length=256, retrieval=False, decay=False, influence=False)


def _assert_same(a: FidelityResult, b: FidelityResult) -> None:
    pd.testing.assert_frame_equal(a.frame, b.frame, check_exact=True)
    pd.testing.assert_frame_equal(a.summary, b.summary, check_exact=True)
    assert a.meta == b.meta


def _summary_row(
    layer: int, half_life: tuple[float, float, float], memory: tuple, mass: tuple = (1, 0.5, 2)
) -> dict:
    """A summary row: ``memory`` is the contiguous length, the farthest distance is twice it,
    the peak at 1 (value 0.9), ``mass`` the memory mass."""
    row = {"model": "m", "checkpoint": "", "layer": layer}
    for column, values in (
        ("farthest_distance", tuple(2 * x for x in memory)),
        ("peak_distance", (1, 1, 1)),
        ("memory_mass", mass),
        ("contiguous_length", memory),
        ("half_life", half_life),
    ):
        row |= {column: values[0], f"{column}_low": values[1], f"{column}_high": values[2]}
    return row | {"peak_value": 0.9, "half_life_r2": 0.95}


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({c: [] for c in FRAME_COLUMNS})


# ----------------------------------------------------------------------------- construction


def test_construction_orders_columns_and_fixes_dtypes():
    frame = synthetic_frame(n_layer=1, length=64, retrieval=False)
    shuffled = frame[list(reversed(frame.columns))].set_index(np.arange(len(frame)) * 3)
    shuffled["layer"] = shuffled["layer"].astype(float)  # integral floats are accepted
    result = FidelityResult(shuffled, synthetic_summary(frame), synthetic_meta())
    assert list(result.frame.columns) == list(FRAME_COLUMNS)
    assert result.frame.index.equals(pd.RangeIndex(len(frame)))
    kinds = {"int": "i", "float": "f"}
    for column, kind in FRAME_COLUMNS.items():
        dtype = result.frame[column].dtype
        if kind == "str":
            assert pd.api.types.is_string_dtype(dtype), column
        else:
            assert dtype.kind == kinds[kind] and dtype.itemsize == 8, (column, dtype)
    assert (result.frame["layer"].to_numpy() == frame["layer"].to_numpy()).all()


def test_missing_frame_columns_are_named():
    frame = synthetic_frame(n_layer=1, length=64).drop(columns=["ci_low", "depth"])
    with pytest.raises(ValueError, match=r"frame is missing columns \['ci_low', 'depth'\]"):
        FidelityResult(frame, synthetic_summary(synthetic_frame(n_layer=1, length=64)), {})


def test_missing_summary_columns_are_named(small):
    with pytest.raises(ValueError, match=r"summary is missing columns \['memory_mass'\]"):
        FidelityResult(small.frame, small.summary.drop(columns="memory_mass"), {})


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("layer", 1.5, "fractional"),
        ("n", math.nan, "missing"),
        ("model", 3, "non-string"),
        ("value", "high", "holds 'high'"),
        ("depth", True, "holds True"),
    ],
)
def test_bad_frame_values_are_explained(small, column, values, message):
    frame = small.frame.copy()
    frame[column] = frame[column].astype(object)
    frame.loc[0, column] = values
    with pytest.raises(ValueError, match=f"column '{column}'.*{message}"):
        FidelityResult(frame, small.summary, {})


def test_unexpected_frame_column_and_non_numeric_summary_column(small):
    with pytest.raises(ValueError, match=r"unexpected columns \['extra'\]"):
        FidelityResult(small.frame.assign(extra=1.0), small.summary, {})
    with pytest.raises(ValueError, match="etmf_norm@9"):
        FidelityResult(small.frame, small.summary.assign(**{"etmf_norm@9": "x"}), {})


def test_summary_must_have_one_row_per_layer(small):
    doubled = pd.concat([small.summary, small.summary.iloc[:1]])
    with pytest.raises(ValueError, match="several rows"):
        FidelityResult(small.frame, doubled, {})


def test_tables_and_meta_types_are_checked(small):
    with pytest.raises(TypeError, match="frame must be a pandas DataFrame"):
        FidelityResult({"model": []}, small.summary, {})
    with pytest.raises(TypeError, match="meta must be a dict"):
        FidelityResult(small.frame, small.summary, ["not", "a", "dict"])
    with pytest.raises(TypeError, match="JSON cannot store"):
        FidelityResult(small.frame, small.summary, {"layers": {1, 2}})


def test_meta_is_normalized_to_what_json_returns(small):
    meta = {
        "seed": np.int64(3),
        "distances": (0, 1, 2),
        "grid": np.arange(3),
        "wall_time_s": float("nan"),
        "checkpoint": Path("runs/ckpt-5000"),
    }
    result = FidelityResult(small.frame, small.summary, meta)
    assert result.meta == {
        "seed": 3,
        "distances": [0, 1, 2],
        "grid": [0, 1, 2],
        "wall_time_s": None,
        "checkpoint": "runs/ckpt-5000",
    }
    assert type(result.meta["seed"]) is int


def test_label_names_model_checkpoint_length_and_untrained(small):
    meta = synthetic_meta(checkpoint="runs/ckpt-5000/", length=60_000)
    assert FidelityResult(small.frame, small.summary, meta).label == "memmamba @ ckpt-5000, 60k"
    meta = synthetic_meta(length=1500, trained=False)
    assert FidelityResult(small.frame, small.summary, meta).label == (
        "memmamba (random init), 1.5k"
    )


# ----------------------------------------------------------------------------- plot entry point


def test_plot_kinds_follow_the_metrics_held(small):
    assert small.plot_kinds() == ["forgetting", "depth", "heatmap"]
    assert set(small.figures()) == {"forgetting", "depth", "heatmap"}
    full = synthetic_result(n_layer=1, length=64)
    assert full.plot_kinds() == [
        "forgetting",
        "depth",
        "heatmap",
        "retrieval",
        "decay",
        "influence",
    ]


def test_plot_without_data_names_the_metrics_held(small):
    with pytest.raises(ValueError, match=r"'decay'.*'ssm_decay'.*holds metrics: cka, eclmf_chance"):
        small.plot("decay")
    with pytest.raises(ValueError, match="unknown plot kind 'bars'"):
        small.plot("bars")


def test_plot_passes_options_and_titles_with_the_label(small):
    figure = small.plot("forgetting", layers=[1])
    ax = figure.axes[0]
    assert ax.get_lines()[0].get_label() == "layer 1"
    assert small.label in ax.get_title()


# ----------------------------------------------------------------------------- save / load


def test_save_writes_every_file_and_round_trips_exactly(small, tmp_path):
    path = small.save(tmp_path / "run")
    assert path == tmp_path / "run"
    names = sorted(p.name for p in path.iterdir())
    figures = [f"{kind}.{ext}" for kind in small.plot_kinds() for ext in ("png", "svg")]
    expected = ["results.csv", "summary.csv", "meta.json", "report.html", MANIFEST, *figures]
    assert names == sorted(expected)
    assert (path / "forgetting.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert b"<svg" in (path / "depth.svg").read_bytes()[:2000]
    assert json.loads((path / "meta.json").read_text()) == small.meta
    _assert_same(FidelityResult.load(path), small)
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no staging litter


def test_round_trip_keeps_awkward_strings_and_floats(tmp_path):
    rng = np.random.default_rng(5)
    frame = synthetic_frame(n_layer=1, length=64, retrieval=False, decay=False, influence=False)
    awkward = 'mam,ba "x"\nNA'
    frame["model"] = awkward
    frame["checkpoint"] = ""
    frame.loc[frame["metric"] == "etmf", "metric"] = "NA"
    frame["value"] = frame["value"] + rng.normal(size=len(frame)) * 1e-13  # full precision
    frame.loc[0, "ci_high"] = math.inf
    frame.loc[1, "ci_low"] = 1e-310  # subnormal
    frame.loc[2, "value"] = -0.0
    summary = synthetic_summary(frame)
    summary.loc[0, "etmf_norm@64"] = math.nan
    result = FidelityResult(frame, summary, synthetic_meta(model=awkward))
    loaded = FidelityResult.load(result.save(tmp_path / "run"))
    _assert_same(loaded, result)
    assert loaded.frame["model"].iloc[0] == awkward
    assert loaded.frame["checkpoint"].iloc[0] == ""
    assert math.copysign(1.0, loaded.frame.loc[2, "value"]) == -1.0


def test_empty_frame_round_trips_with_dtypes(tmp_path):
    empty_summary = pd.DataFrame({c: [] for c in SUMMARY_COLUMNS})
    result = FidelityResult(_empty_frame(), empty_summary, {"model": "m"})
    assert result.figures() == {}
    _assert_same(FidelityResult.load(result.save(tmp_path / "run")), result)


def test_existing_directory_is_refused_without_force(small, tmp_path):
    target = tmp_path / "run"
    small.save(target)
    with pytest.raises(FileExistsError, match=r"pass force=True \(CLI: --force\)"):
        small.save(target)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a result directory"):
        small.save(tmp_path / "file", force=True)


def test_force_replaces_only_the_files_fidelity_wrote(small, tmp_path):
    target = tmp_path / "run"
    first = synthetic_result(n_layer=1, length=64)
    first.save(target)
    (target / "notes.txt").write_text("the user's own file")
    other = small
    dropped = set(first.plot_kinds()) - set(other.plot_kinds())
    assert dropped
    other.save(target, force=True)
    assert (target / "notes.txt").read_text() == "the user's own file"
    for kind in dropped:  # figures of the old run that the new one lacks are gone
        assert not (target / f"{kind}.png").exists()
    _assert_same(FidelityResult.load(target), other)
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_report_keeps_extra_files_and_refuses_foreign_names(small, tmp_path):
    target = tmp_path / "run"
    small.save(target)
    (target / "notes.txt").write_text("mine")
    FidelityResult.load(target).save(target, force=True)  # what `fidelity report` does
    assert (target / "notes.txt").read_text() == "mine"
    small.save(tmp_path / "b")
    (tmp_path / "b" / "retrieval.png").write_text("the user's own figure")
    with pytest.raises(FileExistsError, match="did not write"):
        synthetic_result(n_layer=1, length=64).save(tmp_path / "b", force=True)
    assert (tmp_path / "b" / "retrieval.png").read_text() == "the user's own figure"
    _assert_same(FidelityResult.load(tmp_path / "b"), small)


def test_force_refuses_a_directory_that_holds_no_saved_result(small, tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="refusing to replace it even with force=True"):
        small.save(precious, force=True)
    assert (precious / "thesis.tex").read_text() == "do not delete"
    (tmp_path / "empty").mkdir()
    small.save(tmp_path / "empty", force=True)  # an empty directory may be filled
    assert (tmp_path / "empty" / "results.csv").exists()


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(small, tmp_path, monkeypatch, error):
    written_before_failure = []

    def failing_report(result, figures=None):
        (staging,) = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
        written_before_failure.extend(sorted(p.name for p in staging.iterdir()))
        raise error

    monkeypatch.setattr(html, "render_report", failing_report)
    with pytest.raises(type(error)):
        small.save(tmp_path / "run")
    assert "results.csv" in written_before_failure  # it really failed mid-write
    assert "forgetting.png" in written_before_failure
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_with_force_keeps_the_old_result(small, tmp_path, monkeypatch, error):
    target = small.save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = []

    def failing_png(figure, dpi=100):
        calls.append(dpi)
        raise error

    monkeypatch.setattr(html, "figure_png", failing_png)
    other = synthetic_result(n_layer=1, length=64, retrieval=False, decay=False, influence=False)
    with pytest.raises(type(error)):
        other.save(target, force=True)
    assert calls
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["run"]


# ----------------------------------------------------------------------------- load errors


def _saved_tables(small: FidelityResult, directory: Path) -> Path:
    """Just the three files load() reads (no figures: fast)."""
    directory.mkdir()
    small.frame.to_csv(directory / "results.csv", index=False)
    small.summary.to_csv(directory / "summary.csv", index=False)
    (directory / "meta.json").write_text(json.dumps(small.meta))
    return directory


def test_load_missing_directory_or_file(small, tmp_path):
    with pytest.raises(FileNotFoundError, match="no result directory"):
        FidelityResult.load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        FidelityResult.load(tmp_path / "file")
    for name in ("results.csv", "summary.csv", "meta.json"):
        directory = _saved_tables(small, tmp_path / f"without-{name}")
        (directory / name).unlink()
        with pytest.raises(FileNotFoundError, match=f"has no {name}"):
            FidelityResult.load(directory)


def test_load_reads_tables_written_by_plain_pandas(small, tmp_path):
    _assert_same(FidelityResult.load(_saved_tables(small, tmp_path / "run")), small)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("results.csv", b"", "results.csv is empty"),
        ("results.csv", b"\xff\xfe\x00garbage\x80", "not a readable CSV"),
        ("summary.csv", b'"unterminated\n', "summary.csv"),
        ("meta.json", b"{not json", "meta.json is not valid JSON"),
        ("meta.json", b"[1, 2]", "must hold a JSON object"),
    ],
)
def test_load_corrupt_files(small, tmp_path, name, content, message):
    directory = _saved_tables(small, tmp_path / "run")
    (directory / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        FidelityResult.load(directory)


def test_load_names_bad_cells_and_missing_columns(small, tmp_path):
    directory = _saved_tables(small, tmp_path / "run")
    frame = small.frame.astype({"layer": object})
    frame.loc[4, "layer"] = "three"
    frame.to_csv(directory / "results.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'layer', line 6 holds 'three'"):
        FidelityResult.load(directory)
    truncated = small.frame.to_csv(index=False).rsplit(",", 2)[0]  # last row cut short
    (directory / "results.csv").write_text(truncated)
    with pytest.raises(ValueError, match=r"line \d+ has 10 fields, expected 12"):
        FidelityResult.load(directory)
    small.frame.drop(columns="distance").to_csv(directory / "results.csv", index=False)
    with pytest.raises(ValueError, match=r"results.csv is missing columns \['distance'\]"):
        FidelityResult.load(directory)


def test_load_reads_a_summary_saved_before_the_shape_free_statistics(small, tmp_path):
    directory = _saved_tables(small, tmp_path / "run")
    old = small.summary[["model", "checkpoint", "layer", "half_life", "half_life_low"]]
    old = old.assign(
        half_life_high=small.summary["half_life_high"],
        memory_length=small.summary["contiguous_length"],
        memory_length_low=small.summary["contiguous_length_low"],
        memory_length_high=small.summary["contiguous_length_high"],
        **{"etmf_norm@64": small.summary["etmf_norm@64"]},
    )
    old.to_csv(directory / "summary.csv", index=False)
    loaded = FidelityResult.load(directory)
    assert list(loaded.summary.columns) == [*SUMMARY_COLUMNS, "etmf_norm@64"]
    for column in ("contiguous_length", "contiguous_length_high", "half_life", "etmf_norm@64"):
        np.testing.assert_array_equal(loaded.summary[column], small.summary[column])
    assert loaded.summary[["farthest_distance", "memory_mass", "half_life_r2"]].isna().all().all()
    old.drop(columns="memory_length").to_csv(directory / "summary.csv", index=False)
    with pytest.raises(ValueError, match=r"summary.csv is missing columns \['farthest_distance'"):
        FidelityResult.load(directory)


def test_repr_html_shows_summary_and_forgetting_figure(small):
    fragment = small._repr_html_()
    assert "<table class='summary'>" in fragment
    assert fragment.count("data:image/png;base64,") == 1
    assert html.escape(small.label) in fragment


# ----------------------------------------------------------------------------- comparison


def _hand_made(model: str, rows: list[dict], probe: str = "text", length: int = 64):
    frame = synthetic_frame(model=model, n_layer=1, length=length, retrieval=False)
    summary = pd.DataFrame([{**row, "model": model} for row in rows])
    return FidelityResult(frame, summary, synthetic_meta(model=model, probe=probe, length=length))


def test_comparison_differences_use_conservative_intervals():
    a = _hand_made(
        "a",
        [
            _summary_row(0, (10, 8, 12), (4, 2, 8), (1.0, 0.8, 1.1)),
            _summary_row(1, (20, 18, 25), (16, 8, 32)),
        ],
    )
    b = _hand_made(
        "b",
        [
            _summary_row(0, (15, 13, 18), (8, 4, 8), (3.0, 2.5, 3.25)),
            _summary_row(2, (1, 1, 1), (1, 1, 1)),
        ],
    )
    summary = Comparison([a, b]).summary
    first = summary[summary["run"] == a.label]
    assert first[["half_life_diff", "contiguous_length_diff_high"]].isna().all().all()
    row = summary[(summary["run"] == b.label) & (summary["layer"] == 0)].iloc[0]
    assert (row["half_life_diff"], row["half_life_diff_low"], row["half_life_diff_high"]) == (
        5,
        1,
        10,
    )
    assert (row["contiguous_length_diff"], row["contiguous_length_diff_low"]) == (4, 4 - 8)
    assert row["contiguous_length_diff_high"] == 8 - 2
    assert (row["farthest_distance_diff"], row["farthest_distance_diff_low"]) == (8, 8 - 16)
    assert (row["memory_mass_diff"], row["memory_mass_diff_low"]) == (2.0, 2.5 - 1.1)
    assert row["memory_mass_diff_high"] == 3.25 - 0.8
    assert (row["peak_distance_diff"], row["peak_distance_diff_high"]) == (0, 0)
    unmatched = summary[(summary["run"] == b.label) & (summary["layer"] == 2)].iloc[0]
    assert math.isnan(unmatched["half_life_diff"])  # the first run has no layer 2
    assert list(summary.columns[:4]) == ["run", "model", "checkpoint", "layer"]


def test_comparison_frame_labels_and_warnings():
    a = _hand_made("m", [_summary_row(0, (1, 1, 1), (1, 1, 1))])
    b = _hand_made("m", [_summary_row(0, (1, 1, 1), (1, 1, 1))], probe="passkey", length=128)
    c = _hand_made("m", [_summary_row(0, (1, 1, 1), (1, 1, 1))])
    comparison = Comparison([a, b, c])
    assert comparison.labels == ["m, 64 (1)", "m, 128", "m, 64 (2)"]
    assert list(comparison.frame.columns) == ["run", *FRAME_COLUMNS]
    assert len(comparison.frame) == len(a.frame) + len(b.frame) + len(c.frame)
    assert comparison.frame["run"].value_counts()["m, 128"] == len(b.frame)
    assert len(comparison.warnings) == 2
    assert "probe" in comparison.warnings[0] and "passkey" in comparison.warnings[0]
    assert "length" in comparison.warnings[1]
    assert Comparison([a, c], labels=["x", "y"]).warnings == []


def test_label_disambiguation_avoids_existing_labels():
    a = _hand_made("m", [_summary_row(0, (1, 1, 1), (1, 1, 1))])
    labels = Comparison([a, a, a, a], labels=["a", "a", "a (1)", "b"]).labels
    assert labels == ["a (2)", "a (3)", "a (1)", "b"]


def test_comparison_input_errors(small):
    with pytest.raises(ValueError, match="at least one"):
        Comparison([])
    with pytest.raises(TypeError, match="from_runs"):
        Comparison(["runs/a"])
    with pytest.raises(ValueError, match="one per result"):
        Comparison([small], labels=["a", "b"])
    with pytest.raises(TypeError, match="FidelityResult or a run directory"):
        Comparison.from_runs([small, 3])
    with pytest.raises(ValueError, match="unknown comparison plot kind"):
        Comparison([small]).plot("heatmap")


def test_comparison_from_directories_and_save(small, tmp_path):
    directory = _saved_tables(small, tmp_path / "a")
    comparison = Comparison.from_runs([directory, small])
    assert comparison.plot_kinds() == ["forgetting", "depth", "summary"]
    target = comparison.save(tmp_path / "cmp")
    names = sorted(p.name for p in target.iterdir())
    figures = [f"{k}.{e}" for k in ("forgetting", "depth", "summary") for e in ("png", "svg")]
    assert names == sorted(["comparison.csv", "summary.csv", "report.html", MANIFEST, *figures])
    written = pd.read_csv(target / "comparison.csv", keep_default_na=False)
    assert list(written["run"].unique()) == comparison.labels
    with pytest.raises(FileExistsError):
        comparison.save(target)
    assert "<table class='summary'>" in comparison._repr_html_()


def test_comparison_save_is_atomic(small, tmp_path, monkeypatch):
    def failing(comparison, figures=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(html, "render_comparison", failing)
    with pytest.raises(KeyboardInterrupt):
        Comparison([small]).save(tmp_path / "cmp")
    assert list(tmp_path.iterdir()) == []


def test_results_module_refuses_non_path_directories(small):
    with pytest.raises(TypeError, match="directory must be a str or path"):
        small.save(42)


def test_svg_reuses_the_png_layout_within_a_fraction_of_a_percent(small, tmp_path):
    """The SVG is drawn with the layout computed for the PNG (engine switched off after it):
    its axes sit where a fresh constrained layout would put them, to 0.5% of the figure."""
    import io

    from matplotlib.layout_engine import ConstrainedLayoutEngine

    from fidelity.results import _write_figures

    written, fresh = small.figures(), small.figures()
    _write_figures(written, tmp_path)
    for name, figure in written.items():
        assert not isinstance(figure.get_layout_engine(), ConstrainedLayoutEngine)
        fresh[name].savefig(io.BytesIO(), format="svg")  # constrained layout, drawn for the SVG
        for mine, theirs in zip(figure.axes, fresh[name].axes, strict=True):
            assert np.allclose(mine.get_position().bounds, theirs.get_position().bounds, atol=5e-3)
