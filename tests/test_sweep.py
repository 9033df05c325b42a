"""``fidelity sweep``: config validation, a local parallel sweep, resuming, failures, Ray.

One module-scoped sweep (3 good runs + 1 broken checkpoint, 2 worker processes) feeds most
tests; the others validate configs without running anything.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fidelity.cli import main
from fidelity.models.checkpoint import save_checkpoint
from fidelity.models.registry import build_model
from fidelity.results import FRAME_COLUMNS, FidelityResult
from fidelity.sweep import (
    FAILURE_COLUMNS,
    execute_run,
    load_sweep_config,
    parse_sweep_config,
    run_sweep,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sweep.toml"
TINY = {"preset": "tiny", "anchors": 32, "n_boot": 20, "metrics": ["etmf", "eclmf"]}
GOOD_RUNS = ["memmamba-400-random-s0", "mamba-a-400-random-s0", "mm-text"]
TINY_LAYERS = 3  # layers 0 (embeddings), 1, 2 of the tiny preset
"""Determinism promised (README, "Reproducibility"): the same run on the same machine with the
same torch thread count gives bitwise identical values; another thread count may change the
last bits (reductions split differently). So every comparison here pins one thread per run and
compares exactly; nothing depends on the machine's core count or load."""


def _read(path: Path) -> pd.DataFrame:
    """A sweep table as written (an empty checkpoint field is the empty string, not NaN)."""
    table = pd.read_csv(path)
    if "checkpoint" in table:
        table["checkpoint"] = table["checkpoint"].fillna("")
    return table


def _checkpoint(directory: Path) -> str:
    save_checkpoint(build_model("mamba", "tiny", seed=3), directory)
    return str(directory)


def _config(tmp: Path, out: str = "out") -> dict:
    broken = tmp / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    return {
        "sweep": {
            "out": str(tmp / out),
            "models": ["memmamba", _checkpoint(tmp / "mamba-a")],
            "lengths": [400],
            "probes": ["random"],
            **TINY,
        },
        "run": [
            {"name": "mm-text", "model": "memmamba", "length": "0.4k", "probe": "text", "seed": 1},
            {"name": "broken", "model": str(broken), "length": 400, "probe": "random"},
        ],
    }


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The reference sweep: config, result, and every run's outcome as reported."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = _config(tmp)
    seen = []
    result = run_sweep(config, workers=2, cpus_per_run=1, progress=seen.append)
    return config, result, seen


# ----------------------------------------------------------------------------- the sweep


def test_local_sweep_writes_every_run_and_the_tidy_tables(swept):
    config, result, seen = swept
    out = Path(config["sweep"]["out"])
    assert sorted(o.name for o in seen) == sorted([*GOOD_RUNS, "broken"])
    assert {o.name: o.status for o in result.outcomes} == {
        **dict.fromkeys(GOOD_RUNS, "done"),
        "broken": "failed",
    }
    frame = _read(out / "sweep.csv")
    assert list(frame.columns) == ["run", "probe", "seed", *FRAME_COLUMNS]
    saved = {name: FidelityResult.load(out / name) for name in GOOD_RUNS}
    assert list(dict.fromkeys(frame["run"])) == GOOD_RUNS  # config order, failed run absent
    for name, run in saved.items():
        rows = frame[frame["run"] == name]
        assert len(rows) == len(run.frame) > 0
        np.testing.assert_array_equal(rows["value"].to_numpy(), run.frame["value"].to_numpy())
        assert set(rows["length"]) == {400}
        assert run.meta["sweep_run"]["name"] == name
        assert run.meta["torch_threads"] == 1
    text_rows = frame[frame["run"] == "mm-text"]
    assert set(text_rows["probe"]) == {"text"} and set(text_rows["seed"]) == {1}
    assert set(frame.loc[frame["run"] == "mamba-a-400-random-s0", "checkpoint"]) == {
        config["sweep"]["models"][1]
    }
    summary = _read(out / "sweep_summary.csv")
    assert list(summary.columns[:7]) == [
        "run",
        "probe",
        "length",
        "seed",
        "model",
        "checkpoint",
        "layer",
    ]
    assert len(summary) == len(GOOD_RUNS) * TINY_LAYERS
    assert summary.groupby("run")["layer"].apply(sorted).to_dict() == {
        name: [0, 1, 2] for name in GOOD_RUNS
    }
    pd.testing.assert_frame_equal(
        result.frame.reset_index(drop=True), frame, check_dtype=False, check_exact=True
    )


def test_failing_run_is_recorded_and_does_not_stop_the_others(swept):
    config, result, _ = swept
    failures = pd.read_csv(Path(config["sweep"]["out"]) / "failures.csv")
    assert list(failures.columns) == list(FAILURE_COLUMNS)
    assert failures["run"].tolist() == ["broken"] and result.failed == ["broken"]
    assert "config.json" in failures.loc[0, "error"] and "\n" not in failures.loc[0, "error"]
    assert "Traceback" in failures.loc[0, "traceback"]
    assert not (Path(config["sweep"]["out"]) / "broken").exists()


def test_sweep_values_match_the_same_analysis_run_in_process(swept):
    config, _, _ = swept
    spec = next(r for r in parse_sweep_config(config).runs if r.name == "mm-text")
    threads = torch.get_num_threads()
    try:
        report = execute_run(spec, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert report.error is None, report.traceback
    saved = FidelityResult.load(Path(config["sweep"]["out"]) / "mm-text")
    assert report.result.frame[["metric", "layer", "distance"]].equals(
        saved.frame[["metric", "layer", "distance"]]
    )
    np.testing.assert_array_equal(saved.frame["value"], report.result.frame["value"])


def test_rerun_skips_complete_runs_and_force_redoes_them(swept, tmp_path):
    config, first, _ = swept
    out = tmp_path / "out"
    shutil.copytree(config["sweep"]["out"], out)
    # without the broken run, so that nothing is retried
    config = {"sweep": {**config["sweep"], "out": str(out)}, "run": config["run"][:1]}

    def stamp(name: str) -> int:
        return (out / name / "meta.json").stat().st_mtime_ns

    stamps = {name: stamp(name) for name in GOOD_RUNS}
    seen = []
    again = run_sweep(config, cpus_per_run=1, progress=seen.append)
    assert [(o.name, o.status) for o in seen] == [(name, "skipped") for name in GOOD_RUNS]
    assert stamps == {name: stamp(name) for name in GOOD_RUNS}
    pd.testing.assert_frame_equal(again.frame, first.frame, check_exact=True)
    assert len(pd.read_csv(out / "failures.csv")) == 0  # the table describes the latest sweep

    shutil.rmtree(out / "mm-text")
    resumed = run_sweep(config, cpus_per_run=1)
    assert [(o.name, o.status) for o in resumed.outcomes] == [
        ("memmamba-400-random-s0", "skipped"),
        ("mamba-a-400-random-s0", "skipped"),
        ("mm-text", "done"),
    ]
    assert stamps["memmamba-400-random-s0"] == stamp("memmamba-400-random-s0")
    pd.testing.assert_frame_equal(resumed.frame, first.frame, check_exact=True)

    changed = {**config, "sweep": {**config["sweep"], "anchors": 48}}
    with pytest.raises(ValueError, match=r"different settings \(anchors: 32 there, 48 now"):
        run_sweep(changed)

    one = {"sweep": {**config["sweep"], "models": ["memmamba"]}}
    forced = run_sweep(one, force=True)
    assert [(o.name, o.status) for o in forced.outcomes] == [("memmamba-400-random-s0", "done")]
    assert stamp("memmamba-400-random-s0") > stamps["memmamba-400-random-s0"]


def test_cli_sweep_prints_status_lines_and_exits_1_on_failure(swept, tmp_path, capsys):
    config, _, _ = swept
    lines = ["[sweep]"]
    for key, value in config["sweep"].items():
        lines.append(f"{key} = {json.dumps(value)}")
    for run in config["run"]:
        lines += ["[[run]]", *(f"{k} = {json.dumps(v)}" for k, v in run.items())]
    path = tmp_path / "sweep.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = main(["sweep", str(path)])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    for name in GOOD_RUNS:
        assert f"skipped {name}" in captured.err
    assert "failed  broken" in captured.err and "config.json" in captured.err
    assert "3 skipped, 1 failed" in captured.err
    summary = _read(Path(config["sweep"]["out"]) / "sweep_summary.csv")
    last = summary[(summary["run"] == "mm-text") & (summary["layer"] == TINY_LAYERS - 1)]
    row = next(line for line in captured.out.splitlines() if "mm-text" in line)
    assert "skipped" in row and f"{last['memory_mass'].item():.2f}" in row
    assert "failed" in next(line for line in captured.out.splitlines() if "broken" in line)


def test_ray_sweep_matches_the_local_sweep(swept, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install ray)")
    config, local, _ = swept
    config = {**config, "sweep": {**config["sweep"], "out": str(tmp_path / "ray-out")}}
    config["run"] = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep(config, executor="ray")
    finally:
        ray.shutdown()
    names = ["memmamba-400-random-s0", "mamba-a-400-random-s0"]
    assert [(o.name, o.status) for o in result.outcomes] == [(n, "done") for n in names]
    expected = local.frame[local.frame["run"].isin(names)].reset_index(drop=True)
    assert len(pd.read_csv(tmp_path / "ray-out" / "sweep.csv")) == len(expected)
    pd.testing.assert_frame_equal(
        result.frame.drop(columns="value"), expected.drop(columns="value"), check_exact=True
    )
    np.testing.assert_array_equal(result.frame["value"], expected["value"])  # one thread each


def test_ray_executor_without_ray_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    config = {"sweep": {"out": str(tmp_path / "out"), "models": ["mamba"], "lengths": [400]}}
    with pytest.raises(ImportError, match="pip install ray"):
        run_sweep(config, executor="ray")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- validation


def _sweep(tmp_path: Path, **keys) -> dict:
    return {"sweep": {"out": str(tmp_path / "out"), "models": ["mamba"], "lengths": ["1k"], **keys}}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"anchor": 64}, r"unknown key 'anchor' in \[sweep\]; accepted keys: out, models"),
        ({"lengths": ["2k", "abc"]}, r"\[sweep\] lengths\[1\]: invalid length 'abc'"),
        ({"lengths": ["2k", 2000]}, "same length twice"),
        ({"probes": ["text", "poem"]}, r"probes\[1\]: unknown probe 'poem'; choose from text"),
        ({"metrics": ["etmf", "nope"]}, r"\[sweep\] metrics: unknown metrics \['nope'\]"),
        ({"models": ["mamba", "runs/no/such"]}, r"models\[1\]: 'runs/no/such' is neither"),
        ({"preset": "huge"}, "unknown preset 'huge'; choose from tiny"),
        ({"anchors": 4}, "anchors must be an integer >= 16"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"seeds": [0, 0]}, "lists a seed twice"),
        ({"chunk_size": "big"}, r"chunk_size must be \"auto\", \"none\" or a token count"),
        ({"max_memory": "lots"}, "invalid memory size 'lots'"),
        ({"text": "no/such/file.txt"}, "text must be an existing file"),
        ({"lengths": [9]}, r"\[sweep\]: length 9 is too short"),  # refused before any run
        ({"distances": [0, 2000]}, r"\[sweep\]: distances must lie in \[0, 1000\)"),
    ],
)
def test_bad_sweep_keys_are_named_with_what_is_accepted(tmp_path, keys, message):
    with pytest.raises(ValueError, match=message):
        parse_sweep_config(_sweep(tmp_path, **keys))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"sweep": {"models": ["mamba"], "lengths": [1]}}, "out must be a directory path"),
        ({"sweep": {"out": "x", "models": ["mamba"]}}, "needs both models and lengths"),
        ({"sweep": {"out": "x"}}, "no runs"),
        ({"sweep": {"out": "x"}, "grid": {}}, "unknown key 'grid' in top level"),
        ({"sweep": {"out": "x"}, "run": [{"model": "mamba"}]}, r"\[\[run\]\] #1 needs length"),
        (
            {"sweep": {"out": "x"}, "run": [{"model": "mamba", "length": 9, "probes": ["a"]}]},
            r"unknown key 'probes' in \[\[run\]\] #1; accepted keys: name, model",
        ),
        (
            {"sweep": {"out": "x"}, "run": [{"model": "mamba", "length": 9, "name": "../up"}]},
            "name must be letters",
        ),
        (
            {"sweep": {"out": "x"}, "run": [{"model": "mamba", "length": 9, "name": "sweep.csv"}]},
            "none of sweep.csv",
        ),
        (
            {
                "sweep": {"out": "x", "models": ["mamba"], "lengths": [16]},
                "run": [{"model": "mamba", "length": 16}],
            },
            r"run names \['mamba-16-text-s0'\] occur more than once",
        ),
    ],
)
def test_bad_config_structure_is_reported(config, message):
    with pytest.raises(ValueError, match=message):
        parse_sweep_config(config)


def test_checkpoint_entries_resolve_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _checkpoint(tmp_path / "a" / "ckpt-10")
    _checkpoint(tmp_path / "b" / "ckpt-10")
    (tmp_path / "empty").mkdir()
    config = parse_sweep_config(
        {"sweep": {"out": "o", "models": ["mamba", "a/ckpt-10", "b/ckpt-10"], "lengths": ["2k"]}}
    )
    assert [run.name for run in config.runs] == [
        "mamba-2k-text-s0",
        "a_ckpt-10-2k-text-s0",
        "b_ckpt-10-2k-text-s0",
    ]
    assert config.runs[1].model == str(tmp_path / "a" / "ckpt-10")
    assert config.out == tmp_path / "o"
    with pytest.raises(ValueError, match=r"empty has no config\.json"):
        parse_sweep_config({"sweep": {"out": "o", "models": ["empty"], "lengths": ["2k"]}})


def test_devices_are_checked_for_the_executor_before_running(tmp_path):
    config = _sweep(tmp_path, device="cuda")
    with pytest.raises(ValueError, match="executor 'ray' runs analyses on CPUs only"):
        run_sweep(config, executor="ray")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' of the sweep: .*no CUDA GPU"):
            run_sweep(config)
    assert not (tmp_path / "out").exists()


def test_a_bad_run_stops_the_sweep_before_anything_runs(tmp_path):
    config = _sweep(tmp_path, **TINY)
    config["run"] = [{"model": "memmamba", "length": "1k", "probe": "poem"}]
    with pytest.raises(ValueError, match=r"\[\[run\]\] #1 probe: unknown probe 'poem'"):
        run_sweep(config)
    assert not (tmp_path / "out").exists()


def test_toml_file_errors_name_the_file(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[sweep\nout = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.toml is not valid TOML"):
        load_sweep_config(path)
    path.write_text('[sweep]\nout = "o"\nmodels = ["mamba"]\nlengths = ["2q"]\n')
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.toml: [sweep] lengths[0]: invalid length '2q'" in err
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_example_config_is_valid(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = load_sweep_config(EXAMPLE)
    assert len(config.runs) == 2 * 2 * 2 + 1
    assert {run.length for run in config.runs} == {1000, 2000, 4000}
