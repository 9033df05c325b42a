"""Nothing lost, nothing run: hostile input and faults through the command line (issue 12).

Each test names the fault; bad input must exit 2 with exactly one line, before any work, and
leave every file that fidelity did not write as it was. Bugs exit 1 with one "internal error"
line. The README's reliability table lists these cases.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fidelity.analysis
import fidelity.models.loading
from fidelity.cli import main
from fidelity.destinations import MANIFEST
from fidelity.models.checkpoint import save_checkpoint
from fidelity.models.loading import load_model
from fidelity.models.registry import build_model

TINY = ["--model", "mamba", "--preset", "tiny", "--length", "300", "--anchors", "16"]
ANALYZE = ["analyze", *TINY, "--metrics", "etmf", "--no-progress"]
TRAIN = ["train", "--model", "mamba", "--preset", "tiny", "--task", "text", "--length", "32"]
TRAIN += ["--batch-size", "1", "--device", "cpu"]


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the refusal must come before any work."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(fidelity.models.loading, "load_model", refuse)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", "0"), ("b", "1")):
        assert main([*ANALYZE, "--seed", seed, "--out", str(base / name)]) == 0
    return base / "a", base / "b"


# ------------------------------------------------------------------ items 1-3: deleting files


def test_train_force_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    (home / "data").mkdir()
    (home / "data" / "x.csv").write_text("1,2")
    before = snapshot(home)
    code, _, err = run([*TRAIN, "--steps", "1", "--out", str(home), "--force"], capsys)
    assert code == 2 and one_line(err) and "no training run written by fidelity" in err
    assert snapshot(home) == before


def test_train_force_replaces_only_the_runs_own_files(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TRAIN, "--steps", "2", "--save-every", "1", "--out", str(out)]
    assert run(argv, capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "ckpt-1" / "eval.txt").write_text("my evaluation")
    before = snapshot(out)
    code, _, err = run([*TRAIN, "--steps", "1", "--out", str(out), "--force"], capsys)
    assert code == 2 and one_line(err) and "eval.txt was not written by fidelity" in err
    assert snapshot(out) == before
    (out / "ckpt-1" / "eval.txt").rename(tmp_path / "eval.txt")
    code, _, err = run([*TRAIN, "--steps", "1", "--out", str(out), "--force"], capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "ckpt-2").exists()  # the old run's checkpoint, fidelity's own file
    assert sorted(p.name for p in (out / "ckpt-1").iterdir()) == [
        "config.json",
        "model.safetensors",
        "trainer_state.json",
        "trainer_state.safetensors",
    ]


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_resume_never_unpickles_the_trainer_state(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TRAIN, "--steps", "3", "--save-every", "1", "--out", str(out)]
    assert run([*argv[:-4], "--steps", "2", *argv[-4:]], capsys)[0] == 0
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"step": 1, "optimizer": _Payload(marker)})
    # an old-format (pickle) state in the newest checkpoint
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (out / "ckpt-2" / name).unlink()
    (out / "ckpt-2" / "trainer_state.pt").write_bytes(evil)
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 2 and one_line(err) and "pickle" in err
    assert not marker.exists()
    # a pickle under the new names
    (out / "ckpt-1" / "trainer_state.safetensors").write_bytes(evil)
    (out / "ckpt-2" / "trainer_state.pt").unlink()
    torch.save({"x": _Payload(marker)}, out / "ckpt-1" / "trainer_state.json")
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 2 and one_line(err), err
    assert not marker.exists()


def test_resume_continues_from_the_json_and_safetensors_state(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TRAIN, "--save-every", "1", "--out", str(out)]
    assert run([*argv, "--steps", "1"], capsys)[0] == 0
    (out / "train_config.json").write_text(
        json.dumps({**json.loads((out / "train_config.json").read_text()), "steps": 2})
    )
    code, _, err = run([*argv, "--steps", "2", "--resume"], capsys)
    assert code == 0, err
    assert "no complete checkpoint" not in err
    state = json.loads((out / "ckpt-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and "param_groups" in state["optimizer"]


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    code, _, err = run([*TRAIN, "--steps", "1", "--out", str(tmp_path / "new"), "--resume"], capsys)
    assert code == 0 and "no complete checkpoint to resume" in err


def test_compare_refuses_to_write_over_an_input(two_runs, capsys):
    a, b = two_runs
    before = snapshot(a)
    code, _, err = run(["compare", str(a), str(b), "--out", str(a), "--force"], capsys)
    assert code == 2 and one_line(err) and "input of this command" in err
    assert snapshot(a) == before


def test_report_keeps_the_users_files(two_runs, capsys):
    a, _ = two_runs
    (a / "my-notes.md").write_text("notes")
    code, _, err = run(["report", str(a)], capsys)
    assert code == 0, err
    assert (a / "my-notes.md").read_text() == "notes"
    (a / "my-notes.md").unlink()


def test_force_never_replaces_a_users_folder(tmp_path, capsys, no_model_load):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "results.csv").write_text("my own table")  # a toolkit name, not its file
    before = snapshot(folder)
    code, _, err = run([*ANALYZE, "--out", str(folder), "--force"], capsys)
    assert code == 2 and one_line(err) and "not a result directory written by fidelity" in err
    assert snapshot(folder) == before


# ------------------------------------------------------------ item 4: destinations checked first


def test_bad_destinations_are_refused_before_any_work(tmp_path, capsys, no_model_load):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (afile, "is not a result directory"),
        (afile / "run", "is a file, not a directory"),
    ]
    for target, message in cases:
        code, _, err = run([*ANALYZE, "--out", str(target), "--force"], capsys)
        assert code == 2 and one_line(err) and message in err, err
    assert afile.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only directories")
def test_read_only_parent_is_refused_before_any_work(tmp_path, capsys, no_model_load):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code, _, err = run([*ANALYZE, "--out", str(parent / "run")], capsys)
    finally:
        parent.chmod(0o700)
    assert code == 2 and one_line(err) and "not writable" in err


def test_train_and_compare_check_destinations_first(tmp_path, two_runs, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run([*TRAIN, "--steps", "1", "--out", str(afile / "run")], capsys)
    assert code == 2 and one_line(err), err
    a, b = two_runs
    code, _, err = run(["compare", str(a), str(b), "--out", str(afile)], capsys)
    assert code == 2 and one_line(err) and "not a comparison directory" in err


# ------------------------------------------------------------------ items 5 and 7: bad models


def test_nan_weights_are_one_line_naming_layer_and_position(tmp_path, capsys):
    model = build_model("mamba", "tiny")
    with torch.no_grad():
        model.layers[1].mixer.out_proj.weight.fill_(float("nan"))
    directory = save_checkpoint(model, tmp_path / "nan")
    argv = ["analyze", "--model", str(directory), "--length", "300", "--anchors", "16"]
    code, _, err = run([*argv, "--no-progress"], capsys)
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("error: non-finite hidden state") and "layer 2, position 0" in last
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": None}, "'config' must be a JSON object"),
        ({"config": [1, 2]}, "'config' must be a JSON object"),
        ({"config": "mamba"}, "'config' must be a JSON object"),
        ({"format_version": "1"}, "'format_version' must be a whole number"),
        ({"config": {"model_type": "mamba", "d_model": [32]}}, "d_model must be a positive"),
        ({"config": {"model_type": "mamba", "norm_epsilon": "x"}}, "invalid MambaConfig"),
        ({"config": {"model_type": "gpt5"}}, "unknown model type"),
    ],
)
def test_bad_config_json_is_one_line(tmp_path, capsys, change, message):
    directory = save_checkpoint(build_model("mamba", "tiny"), tmp_path / "ckpt")
    header = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**header, **change}))
    code, _, err = run(["analyze", "--model", str(directory), "--length", "300"], capsys)
    assert code == 2 and one_line(err) and message in err, err


def test_mamba_ssm_config_with_a_string_ssm_cfg(tmp_path, capsys):
    directory = tmp_path / "mamba_ssm"
    directory.mkdir()
    header = {"d_model": 32, "n_layer": 2, "vocab_size": 256, "ssm_cfg": "oops"}
    (directory / "config.json").write_text(json.dumps(header))
    code, _, err = run(["analyze", "--model", str(directory), "--length", "300"], capsys)
    assert code == 2 and one_line(err) and "'ssm_cfg' must be a JSON object" in err


# -------------------------------------------------------------- item 8: signals during a save


DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from fidelity.reports.worker import FigureWorker
    real = FigureWorker.draw
    def slow(self, directory):
        real(self, directory)
        open(os.environ["FIDELITY_TEST_FLAG"], "w").close()
        time.sleep(300)
    FigureWorker.draw = slow
    from fidelity.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _stopped_during_save(tmp_path: Path, target: Path, sig: int) -> subprocess.Popen:
    """Start ``analyze --out target`` in a child, stop it with ``sig`` once it is saving."""
    flag = tmp_path / f"saving-{sig}"
    # the pure-PyTorch scan: no compile of the fused kernel (shared cache) in the child
    env = {**os.environ, "FIDELITY_TEST_FLAG": str(flag), "FIDELITY_SCAN_BACKEND": "chunked"}
    child = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *ANALYZE, "--out", str(target)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not flag.exists():  # waits for a state, not for a time
        if child.poll() is not None:
            raise AssertionError(child.stderr.read())
        time.sleep(0.2)
    child.send_signal(sig)
    child.wait()
    return child


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


def test_sigterm_during_a_save_leaves_nothing(tmp_path):
    target = tmp_path / "run"
    child = _stopped_during_save(tmp_path, target, signal.SIGTERM)
    assert child.returncode == 130, child.stderr.read()
    assert "interrupted" in child.stderr.read()
    assert not target.exists() and _leftovers(tmp_path) == []


def test_sigkill_leftovers_are_refused_by_compare_and_cleaned(tmp_path, two_runs, capsys):
    target = tmp_path / "run"
    child = _stopped_during_save(tmp_path, target, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    (staging,) = _leftovers(tmp_path)
    a, _ = two_runs
    code, _, err = run(["compare", str(a), str(tmp_path / staging)], capsys)
    assert code == 2 and one_line(err) and "incomplete" in err
    code, _, err = run([*ANALYZE, "--out", str(target)], capsys)
    assert code == 0, err
    assert _leftovers(tmp_path) == [] and (target / MANIFEST).is_file()


# --------------------------------------------------------------------- item 9: bugs vs input


@pytest.mark.parametrize("error", [TypeError("boom"), ImportError("no module named x")])
def test_a_bug_is_an_internal_error_not_bad_input(monkeypatch, capsys, error):
    def broken(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(fidelity.analysis, "capture", broken)
    code, _, err = run(ANALYZE, capsys)
    assert code == 1
    last = err.splitlines()[-1]
    assert last.startswith("internal error") and type(error).__name__ in last
    assert "Traceback" not in err
    trace = Path(last.split("traceback in ")[1].split(";")[0])
    assert "Traceback" in trace.read_text()
    trace.unlink()


# ------------------------------------------------------------- items 10 and 11: clear and early


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyze", *TINY[:4], "--length", "1", "--probe", "random"], "too short"),
        (["analyze", *TINY[:4], "--length", "300", "--device", "cuda9"], "device"),
        (["analyze", *TINY[:4], "--length", "300", "--tokenizer", "/no/tok"], "tokenizer path"),
        (["analyze", *TINY[:4], "--length", "300", "--max-memory", "lots"], "memory size"),
        (["analyze", *TINY[:4], "--length", "300", "--text", "/no/text"], "does not exist"),
    ],
)
def test_inputs_are_checked_before_the_model_loads(argv, message, capsys, no_model_load):
    code, _, err = run(argv, capsys)
    assert code == 2 and one_line(err) and message in err, err


def test_length_one_says_what_is_needed(capsys):
    code, _, err = run(["analyze", *TINY[:4], "--length", "1", "--probe", "random"], capsys)
    assert code == 2 and one_line(err) and "at least 16 tokens" in err


def test_text_is_read_before_the_model_loads(tmp_path, capsys, no_model_load):
    short = tmp_path / "short.txt"
    short.write_text("too little text")
    code, _, err = run(["analyze", *TINY[:4], "--length", "5k", "--text", str(short)], capsys)
    assert code == 2 and one_line(err), err


def test_compare_needs_two_runs(two_runs, capsys):
    code, _, err = run(["compare", str(two_runs[0])], capsys)
    assert code == 2 and one_line(err) and "at least two" in err


def test_existing_file_as_out_is_a_clear_line(tmp_path, capsys, no_model_load):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    code, _, err = run([*ANALYZE, "--out", str(afile)], capsys)
    assert code == 2 and one_line(err) and "exists and is not a result directory" in err


def test_api_misuse_says_what_was_expected():
    from fidelity.probes.capture import capture

    model = build_model("mamba", "tiny")
    with pytest.raises(TypeError, match=r"layers must be a list of layer indices such as \[0, 3\]"):
        fidelity.analysis.analyze(model, 64, layers="0,3", progress=False, anchors=16)
    with pytest.raises(TypeError, match=r"input_ids must be a torch.Tensor .* torch.tensor"):
        capture(model, [[1, 2, 3]])
    with pytest.raises(TypeError, match="model must be a torch nn"):
        capture([[1, 2, 3]], torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        capture(model, torch.zeros(1, 8, dtype=torch.long), chunk_size=0)
    with pytest.raises(TypeError, match="registered model name"):
        load_model(None)


def test_a_text_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from fidelity.atomic import write_text_atomically

    target = tmp_path / "sub" / "table.md"
    write_text_atomically(target, "first\n")
    write_text_atomically(target, "second\n")
    assert target.read_text() == "second\n"

    def failing(self, text):
        raise OSError("disk full")

    monkeypatch.setattr(type(target), "write_text", failing)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomically(target, "third\n")
    monkeypatch.undo()
    assert target.read_text() == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.md"]  # no staging left
