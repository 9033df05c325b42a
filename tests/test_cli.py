"""The command line end to end: exit codes, one-line errors, files written, no tracebacks."""

import json

import pytest

from fidelity.cli import main
from fidelity.models.checkpoint import save_checkpoint
from fidelity.models.registry import build_model

TINY_RUN = ["--preset", "tiny", "--length", "600", "--anchors", "64", "--no-progress"]


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_and_models(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "analyze" in out and "compare" in out
    code, out, _ = run(["models"], capsys)
    assert code == 0 and "memmamba" in out and "tiny" in out


def test_analyze_writes_a_complete_run_then_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "run"
    argv = ["analyze", "--model", "memmamba", *TINY_RUN, "--metrics", "etmf,eclmf"]
    code, out, err = run([*argv, "--out", str(target)], capsys)
    assert code == 0, err
    assert "where each layer holds memory" in out and "untrained" in err
    for header in ("farthest", "peak (ETMF)", "mass", "contiguous", "half-life"):
        assert header in out, header
    for name in (
        "results.csv",
        "summary.csv",
        "meta.json",
        "report.html",
        "forgetting.png",
        "forgetting.svg",
        "depth.png",
        "heatmap.png",
    ):
        assert (target / name).is_file(), name
    meta = json.loads((target / "meta.json").read_text())
    assert meta["model"] == "memmamba" and meta["length"] == 600
    code, _, err = run([*argv, "--out", str(target)], capsys)
    assert code == 2 and "--force" in err and err.count("\n") == 1
    code, _, err = run([*argv, "--out", str(target), "--force"], capsys)
    assert code == 0, err
    code, _, err = run(["report", str(target)], capsys)
    assert code == 0 and "report.html" in err


def test_compare_two_runs(tmp_path, capsys):
    for name, model in (("a", "mamba"), ("b", "memmamba")):
        argv = ["analyze", "--model", model, *TINY_RUN, "--metrics", "etmf"]
        assert run([*argv, "--out", str(tmp_path / name)], capsys)[0] == 0
    code, out, err = run(
        ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")],
        capsys,
    )
    assert code == 0, err
    for header in ("run", "farthest", "peak (ETMF)", "mass", "half-life"):
        assert header in out, header
    assert "Δ " in out  # the second run's difference from the first
    assert (tmp_path / "cmp" / "comparison.csv").is_file()
    assert (tmp_path / "cmp" / "report.html").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyze", "--model", "nope", "--length", "8k"], "unknown model"),
        (["analyze", "--model", "memmamba", "--length", "abc"], "invalid length"),
        (["analyze", "--model", "memmamba"], "Missing option '--length'"),
        (["analyze", "--model", "./no/such/dir", "--length", "1k"], "does not exist"),
        (["analyze", "--model", "memmamba", "--length", "1k", "--bogus"], "No such option"),
        (
            ["analyze", *TINY_RUN[:2], "--model", "mamba", "--length", "1k", "--probe", "poem"],
            "unknown probe",
        ),
        (
            ["analyze", *TINY_RUN[:2], "--model", "mamba", "--length", "1k", "--text", "/nope"],
            "does not exist",
        ),
        (
            [
                "analyze",
                *TINY_RUN[:2],
                "--model",
                "mamba",
                "--length",
                "20k",
                "--max-memory",
                "1MB",
            ],
            "needs about",
        ),
        (
            [
                "analyze",
                *TINY_RUN[:2],
                "--model",
                "mamba",
                "--length",
                "1k",
                "--max-memory",
                "lots",
            ],
            "invalid memory size",
        ),
        (
            ["analyze", *TINY_RUN[:2], "--model", "mamba", "--length", "1k", "--layers", "a,b"],
            "invalid list",
        ),
        (["compare", "/no/such/run"], "does not exist"),
        (["report", "/no/such/run"], "no result directory"),
        (["nonsense"], "No such command"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    directory = save_checkpoint(build_model("mamba", "tiny"), tmp_path / "ckpt")
    (directory / "config.json").write_text("{not json")
    code, _, err = run(["analyze", "--model", str(directory), "--length", "1k"], capsys)
    assert code == 2 and err.count("\n") == 1 and "config.json" in err


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="unknown model"):
        main(["analyze", "--model", "nope", "--length", "8k", "--debug"])


def test_ctrl_c_during_analyze_leaves_no_result_directory(tmp_path, capsys, monkeypatch):
    import fidelity.analysis

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fidelity.analysis, "capture", interrupted)
    target = tmp_path / "run"
    code, _, err = run(
        ["analyze", "--model", "mamba", *TINY_RUN, "--metrics", "etmf", "--out", str(target)],
        capsys,
    )
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_train_with_config_overrides_and_resume(tmp_path, capsys):
    argv = [
        "train",
        "--out",
        str(tmp_path / "run"),
        "--model",
        "memmamba",
        "--preset",
        "tiny",
        "--task",
        "text",
        "--length",
        "64",
        "--steps",
        "2",
        "--save-every",
        "1",
        "--set",
        "pool_policy=fifo",
        "--set",
        "tau2=0.7",
    ]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "ckpt-2" / "config.json").read_text())["config"]
    assert config["pool_policy"] == "fifo" and config["tau2"] == 0.7
    code, _, err = run(argv, capsys)
    assert code == 2 and "--resume" in err
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    code, _, err = run([*argv[:-2], "--set", "tau2"], capsys)
    assert code == 2 and "key=value" in err


def test_bench_times_backends_and_models(capsys):
    code, out, err = run(
        [
            "bench",
            "--length",
            "300",
            "--d-inner",
            "16",
            "--models",
            "mamba,memmamba",
            "--preset",
            "tiny",
            "--repeats",
            "1",
        ],
        capsys,
    )
    assert code == 0, err
    assert "ref" in out and "chunked" in out and "memmamba" in out
    code, _, err = run(["bench", "--length", "300", "--models", "nope"], capsys)
    assert code == 2 and "unknown model" in err
