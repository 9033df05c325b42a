"""The command line under the runtime install: no click (typer >= 0.2x carries its own copy),
bad input still one line and exit 2, and ``analyze`` without ``--out`` keeps its results."""

import subprocess
import sys

import pytest

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
