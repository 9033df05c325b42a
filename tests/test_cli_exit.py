"""``fidelity`` (the console entry point) ends the process without tearing the interpreter
down: its output must still be complete, its exit handlers run, its status kept, and a thread
still running must be let finish."""

import subprocess
import sys

# The entry point as the console script calls it, with an exit handler and, optionally, a
# thread that is still writing when the command returns.
ENTRY = """
import atexit, sys, threading, time
from pathlib import Path
atexit.register(lambda: print("exit handler ran", flush=False))
mark = Path(sys.argv[1])
if sys.argv[2] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.5), mark.write_text("done"))).start()
sys.argv = ["fidelity", *sys.argv[3:]]
from fidelity.cli import entry_point
entry_point()
"""


def _entry(tmp_path, thread: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", ENTRY, str(tmp_path / "mark"), thread, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_output_handlers_and_status_survive_the_quick_exit(tmp_path):
    done = _entry(tmp_path, "none", "models")
    assert done.returncode == 0, done.stderr
    assert "memmamba" in done.stdout and "mamba2" in done.stdout
    assert done.stdout.rstrip().endswith("exit handler ran")  # after the command's output
    bad = _entry(tmp_path, "none", "analyze", "--model", "memmamba", "--length", "abc")
    assert bad.returncode == 2
    assert "invalid length" in bad.stderr and "exit handler ran" in bad.stdout


def test_a_running_thread_is_waited_for(tmp_path):
    done = _entry(tmp_path, "thread", "models")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mark").read_text() == "done"


def test_main_leaves_nothing_frozen(tmp_path):
    """``analyze`` freezes the imported objects for the collector; ``main`` unfreezes them, so
    a caller that goes on (a notebook, a test session) keeps collecting its cycles."""
    import gc

    from fidelity.cli import main

    status = main(["analyze", "--model", "memmamba", "--length", "abc"])  # bad input: exit 2
    assert status == 2
    assert gc.get_freeze_count() == 0
    model = ["--model", "mamba", "--preset", "tiny", "--random-init"]
    out = ["--out", str(tmp_path / "run"), "--no-progress", "--threads", "1"]
    status = main(["analyze", *model, "--length", "64", *out])
    assert status == 0 and (tmp_path / "run" / "report.html").exists()
    assert gc.get_freeze_count() == 0
