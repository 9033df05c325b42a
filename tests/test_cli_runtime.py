"""The command line under the runtime install: no click (typer >= 0.2x carries its own copy),
bad input still one line and exit 2, and ``analyze`` without ``--out`` keeps its results."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fidelity.cli import main
from fidelity.probes.corpus import assign_split

# Runs the CLI in a fresh interpreter in which `import click` fails, as in a runtime-only
# install that resolved a typer without click (the dev extras pull click in through ray).
WITHOUT_CLICK = """
import sys
sys.modules["click"] = None
from fidelity.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli_without_click(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_CLICK, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyze", "--model", "memmamba", "--length", "abc"], "invalid length"),
        (["analyze", "--model", "memmamba"], "Missing option '--length'"),
        (["analyze", "--model", "memmamba", "--length", "1k", "--bogus"], "No such option"),
        (
            ["analyze", "--model", "memmamba", "--length", "1k", "--anchors", "x"],
            "Invalid value for '--anchors'",
        ),
        (["nonsense"], "No such command"),
    ],
)
def test_bad_input_is_one_line_without_click(argv, message):
    done = _cli_without_click(*argv)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_help_and_models_without_click():
    done = _cli_without_click("models")
    assert done.returncode == 0, done.stderr
    assert "memmamba" in done.stdout
    done = _cli_without_click("--help")
    assert done.returncode == 0 and "analyze" in done.stdout


TINY_RUN = ["--preset", "tiny", "--length", "600", "--anchors", "64", "--no-progress"]


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_without_out_saves_to_a_new_directory_under_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["analyze", "--model", "mamba", *TINY_RUN, "--metrics", "etmf"]
    for _ in range(2):
        code, _, err = run(argv, capsys)
        assert code == 0, err
    saved = sorted((tmp_path / "runs").iterdir())
    assert len(saved) == 2  # a second run in the same second gets its own directory
    for path in saved:
        assert re.fullmatch(r"mamba-600-\d{8}-\d{6}(-2)?", path.name), path.name
        assert (path / "report.html").is_file() and (path / "results.csv").is_file()
    assert f"saved results, figures and report.html to {Path('runs') / saved[1].name}" in err


def test_analyze_reads_the_users_own_text(tmp_path, capsys):
    # A file name in the built-in corpus's "train" split: it used to be refused.
    name = next(f"notes{i}.txt" for i in range(100) if assign_split(f"notes{i}.txt") == "train")
    texts = tmp_path / "texts"  # apart from the runs: an --out inside an input is refused
    texts.mkdir()
    (texts / name).write_text("my own notes, line after line.\n" * 40)
    records = [json.dumps({"body": f"record {i}: " + "words " * 40}) for i in range(5)]
    (texts / "notes.jsonl").write_text("\n".join(records) + "\n")
    base = ["analyze", "--model", "mamba", *TINY_RUN, "--metrics", "etmf", "--probe", "text"]
    body_field = ["--text-field", "body"]
    for text, extra in ((name, []), ("notes.jsonl", body_field), (".", body_field)):
        out_dir = tmp_path / f"run-{text.strip('.') or 'dir'}"
        argv = [*base, "--text", str(texts / text), *extra, "--out", str(out_dir)]
        code, _, err = run(argv, capsys)
        assert code == 0, err
        assert (out_dir / "meta.json").is_file()


@pytest.mark.parametrize(
    ("contents", "message"),
    [(b"", "is empty"), (b"\x7fELF\x02\x01\x01\x00\x00", "looks binary (a NUL byte at offset 7)")],
)
def test_empty_or_binary_text_is_one_line(tmp_path, capsys, contents, message):
    (tmp_path / "bad.txt").write_bytes(contents)
    argv = ["analyze", "--model", "mamba", *TINY_RUN, "--text", str(tmp_path / "bad.txt")]
    code, _, err = run([*argv, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
