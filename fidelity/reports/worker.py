"""Figures and ``report.html`` of a result, drawn in a process of their own while the analysis
runs: what ``fidelity analyze`` saves with.

Drawing is matplotlib's work on one core: about 2 s for the five figures (PNG and SVG each) of
a 60k MemMamba analysis on a 2-core CPU, after about 0.7 s of importing pandas and matplotlib.
The command starts a :class:`FigureWorker` before it imports torch, so the worker's imports
(and a first, throw-away drawing that loads the fonts and the backends) run on the core that
the command's own imports leave idle; the command itself never imports matplotlib. Once the
tables of the result are written, the worker reads them back (exact round trip, see
:mod:`fidelity.results_io`), draws the figures with ``processes`` processes (itself and forks
of itself, each taking the next figure from a shared queue, the costliest first) and writes
the report. Every file is the one :meth:`FidelityResult.save` draws in its own process (the
same drawing functions; tested byte for byte, SVG ids aside, which matplotlib draws at random).

The protocol is one JSON line each way per request (``{"directory", "processes"}`` ->
``{"ok": true}`` or ``{"error": traceback}``); the worker ends at the end of its input, so it
never outlives the command that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fidelity.results import FidelityResult

DRAWING_ORDER = ("heatmap", "forgetting", "position_loss", "decay", "depth")
"""Plot kinds drawn first, costliest first (measured at 60k: the heatmap takes ~0.5 s, the
others 0.35-0.4 s); kinds not listed follow in their own order."""
STOP_SECONDS = 10.0
"""How long :meth:`FigureWorker.close` waits for an idle worker to end before killing it."""

_SERVE = (
    "import sys; sys.argv[1] in sys.path or sys.path.insert(0, sys.argv[1]); "
    "from fidelity.reports.worker import serve; serve()"
)
_GROUPS = hasattr(os, "killpg")
"""Process groups (POSIX): the worker gets its own, so that its forks are killed with it."""
_SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Drawing needs no BLAS threads (and the worker forks: better none)."""


class FigureError(RuntimeError):
    """The figure worker failed (a bug: the traceback is the worker's)."""


class FigureWorker:
    """A started worker process (see the module doc); a context manager that ends it.

    ``processes``: how many processes draw the figures of one request (1 = the worker alone).
    """

    def __init__(self, processes: int = 1) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.processes = processes
        root = str(Path(__file__).resolve().parents[2])  # where this `fidelity` package lives
        self._process = subprocess.Popen(
            [sys.executable, "-c", _SERVE, root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **_SINGLE_THREADED},
            text=True,
            process_group=0 if _GROUPS else None,  # kill() ends the drawing forks with it
        )

    def draw(self, directory: Path) -> None:
        """Draw the figures and ``report.html`` of the result whose tables are in
        ``directory`` into it; returns once they are written (:class:`FigureError` if not)."""
        if self._process.poll() is not None:
            raise FigureError(
                f"the figure worker has ended (exit status {self._process.returncode})"
            )
        request = {"directory": str(Path(directory).resolve()), "processes": self.processes}
        try:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker has ended: its status is reported below
        line = self._process.stdout.readline()
        if not line:
            status = self._process.wait()
            raise FigureError(f"the figure worker ended early (exit status {status})")
        reply = json.loads(line)
        if "error" in reply:
            raise FigureError(f"the figure worker failed:\n{reply['error']}")

    def close(self) -> None:
        """End the worker: it leaves once its input ends (killed if it has not after
        :data:`STOP_SECONDS`)."""
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        try:
            self._process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
        self._process.stdout.close()

    def kill(self) -> None:
        """End the worker and its drawing processes now (whatever they are doing)."""
        if _GROUPS:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        else:
            self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            with contextlib.suppress(BrokenPipeError):
                stream.close()

    def __enter__(self) -> FigureWorker:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:  # an error or an interrupt: nothing it draws will be used
            self.kill()


# ----------------------------------------------------------------------------- worker side


def serve() -> None:
    """The worker's loop: warm up, then answer each request line of standard input on
    standard output (anything else printed goes to standard error); the process ends (without
    interpreter teardown) at the end of its input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the command ends the worker
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _warm_up()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            draw(Path(request["directory"]), int(request["processes"]))
            reply = {"ok": True}
        except Exception:
            reply = {"error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    os._exit(0)


def _warm_up() -> None:
    """Import what drawing needs and draw a small figure to PNG and SVG (loads the fonts and
    both backends), so the first real figure costs what any other does."""
    import io

    from fidelity.reports import html, output_plots, plots  # noqa: F401 (imported to warm up)
    from fidelity.results import FidelityResult  # noqa: F401

    with plots._style():
        figure = plots._new_figure(2.0, 1.5)
        axes = figure.add_subplot()
        axes.plot([1, 2], [1, 2], label="warm-up")
        axes.fill_between([1, 2], [0.5, 1], [2, 3], alpha=0.2)
        axes.set_yscale("log")
        plots._plain_log_labels(axes.yaxis)  # as the figures label log axes: no mathtext
        axes.set_title("warm-up")
        figure.legend()
    figure.savefig(io.BytesIO(), format="png", dpi=50)
    figure.savefig(io.BytesIO(), format="svg")


def draw(directory: Path, processes: int = 1) -> None:
    """Figures (``<kind>.png`` and ``<kind>.svg``) and ``report.html`` of the result whose
    tables are in ``directory``, written there; ``processes`` > 1 draws in forks of this
    process too (where the platform forks). Only for a process that runs no threads of its
    own (the worker): a fork copies none."""
    from fidelity.results import FidelityResult

    result = FidelityResult.read_tables(directory)
    kinds = result.plot_kinds()
    ordered = sorted(kinds, key=lambda k: DRAWING_ORDER.index(k) if k in DRAWING_ORDER else 99)
    forks = min(processes, len(kinds)) - 1 if hasattr(os, "fork") else 0
    claims, offer = os.pipe()  # a queue of figure numbers: each process reads the next one
    os.write(offer, bytes(range(len(ordered))))
    os.close(offer)
    children = []
    try:
        for _ in range(forks):
            pid = os.fork()
            if pid == 0:  # a drawing process: draw what it claims, then end at once
                status = 1
                try:
                    _draw_claimed(result, ordered, claims, directory)
                    status = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(status)
            children.append(pid)
        _draw_claimed(result, ordered, claims, directory)
    finally:
        os.close(claims)
        statuses = [os.waitpid(pid, 0)[1] for pid in children]
    if any(statuses):
        raise FigureError(f"a drawing process failed (wait statuses {statuses})")
    images = {kind: (directory / f"{kind}.png").read_bytes() for kind in kinds}
    result.write_report(directory, images)


def _draw_claimed(result: FidelityResult, kinds: list[str], claims: int, directory: Path) -> None:
    """Draw ``kinds[i]`` for each number ``i`` this process reads from the ``claims`` pipe
    (one byte each: a read takes a figure no other process gets)."""
    from fidelity.results import _write_figures

    while claimed := os.read(claims, 1):
        kind = kinds[claimed[0]]
        _write_figures({kind: result.plot(kind)}, directory)
