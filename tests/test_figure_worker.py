"""The figure worker (fidelity.reports.worker): the files it draws are the ones FidelityResult.save
draws in its own process, with one or several drawing processes; its failures are reported,
never hidden; `fidelity analyze` leaves matplotlib (and the CLI torch) out of its own process."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fidelity.reports import worker as figure_worker
from fidelity.reports.worker import FigureError, FigureWorker
from tests.fixtures_results import synthetic_result

_SVG_ID = re.compile(rb"(?<=[#\"(])[a-z]+[0-9a-f]{10}(?![0-9A-Za-z])")


def _svg_ids_in_order(svg: bytes) -> bytes:
    """``svg`` with matplotlib's random ids (``svg.hashsalt`` unset: a fresh salt per figure)
    renamed in order of first appearance: equal for the same drawing."""
    names: dict[bytes, bytes] = {}
    return _SVG_ID.sub(lambda m: names.setdefault(m.group(0), b"id%d" % len(names)), svg)


def _files(directory: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    return {n: _svg_ids_in_order(b) if n.endswith(".svg") else b for n, b in files.items()}


@pytest.fixture(scope="module")
def full():
    """Every single-run plot kind with data (forgetting, depth, heatmap, retrieval, decay,
    influence)."""
    return synthetic_result(n_layer=3, length=1024, seed=3)


@pytest.fixture(scope="module")
def drawn_here(full, tmp_path_factory) -> dict[str, bytes]:
    return _files(full.save(tmp_path_factory.mktemp("here") / "run"))


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_the_worker_writes_the_files_drawn_in_process(full, drawn_here, tmp_path, processes):
    with FigureWorker(processes) as worker:
        drawn = _files(full.save(tmp_path / "run", worker=worker))
    assert len(full.plot_kinds()) == 6
    assert sorted(drawn) == sorted(drawn_here)
    for name, content in drawn_here.items():
        assert drawn[name] == content, name  # PNGs and the report byte for byte


def test_the_svg_normalization_sees_a_different_drawing(full, drawn_here, tmp_path):
    """The comparison above can fail: another figure's SVG differs after normalization."""
    other = synthetic_result(n_layer=3, length=1024, seed=4).save(tmp_path / "run")
    assert _files(other)["forgetting.svg"] != drawn_here["forgetting.svg"]
    assert _svg_ids_in_order(b'<g id="p0123456789"><use xlink:href="#p0123456789"/>') == (
        b'<g id="id0"><use xlink:href="#id0"/>'
    )


def test_svgs_drawn_once_equal_those_laid_out_again(full, drawn_here, tmp_path):
    """The SVGs, drawn once on the layout the PNGs computed, are the SVGs of a figure whose
    engine is a placeholder (savefig then lays it out again before drawing)."""
    for kind in full.plot_kinds():
        figure = full.plot(kind)
        figure.savefig(tmp_path / f"{kind}.png", format="png", dpi=150)
        figure.set_layout_engine("none")  # a placeholder engine: savefig lays out first
        assert figure.get_layout_engine() is not None
        figure.savefig(tmp_path / f"{kind}.svg", format="svg", metadata={"Date": None})
        assert (
            _svg_ids_in_order((tmp_path / f"{kind}.svg").read_bytes()) == drawn_here[f"{kind}.svg"]
        ), kind


def test_one_worker_serves_several_saves(full, drawn_here, tmp_path):
    with FigureWorker(2) as worker:
        for name in ("a", "b"):
            assert _files(full.save(tmp_path / name, worker=worker)) == drawn_here


def test_a_failed_drawing_is_an_error_with_the_workers_traceback(full, tmp_path):
    with FigureWorker(2) as worker:
        with pytest.raises(FigureError, match="FileNotFoundError"):
            worker.draw(tmp_path)  # no tables there
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "results.csv").write_text("model\nnot a result table\n")
        with pytest.raises(FigureError, match=r"results\.csv"):
            worker.draw(tmp_path / "run")
        full.save(tmp_path / "after", worker=worker)  # it serves on
    assert (tmp_path / "after" / "report.html").is_file()
    assert list(tmp_path.glob("*partial*")) == []


def test_a_failed_drawing_process_fails_the_drawing(full, tmp_path):
    """A fork whose figure fails: its traceback on stderr, FigureError from the drawing."""
    full.save(tmp_path / "run")
    code = (
        "import json, os, pathlib\n"
        "import fidelity.results as results\n"
        "from fidelity.reports import worker\n"
        "real, parent = results._write_figures, os.getpid()\n"
        "def failing(figures, directory):\n"
        "    if os.getpid() != parent:\n"
        "        raise OSError('disk full')\n"
        "    return real(figures, directory)\n"
        "results._write_figures = failing\n"
        "try:\n"
        f"    worker.draw(pathlib.Path({str(tmp_path / 'run')!r}), 2)\n"
        "    print(json.dumps({'error': None}))\n"
        "except worker.FigureError as error:\n"
        "    print(json.dumps({'error': str(error)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "a drawing process failed" in json.loads(done.stdout.splitlines()[-1])["error"]
    assert "OSError: disk full" in done.stderr


def test_a_worker_that_ended_is_reported(full, tmp_path):
    worker = FigureWorker()
    worker.kill()
    with pytest.raises(FigureError, match="ended"):
        full.save(tmp_path / "run", worker=worker)
    assert list(tmp_path.iterdir()) == []


def test_close_ends_the_worker_and_an_error_kills_it():
    with FigureWorker() as worker:
        pass
    assert worker._process.returncode == 0
    with pytest.raises(KeyboardInterrupt), FigureWorker() as worker:
        raise KeyboardInterrupt
    assert worker._process.returncode is not None  # killed, not waited for a warm-up
    with pytest.raises(ValueError, match="at least 1"):
        FigureWorker(0)


def test_drawing_order_puts_every_known_kind_first():
    from fidelity.results import PLOT_KINDS

    assert set(figure_worker.DRAWING_ORDER) <= set(PLOT_KINDS)


def _run_python(code: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_command_line_imports_no_torch_and_analyze_no_matplotlib(tmp_path):
    """``import fidelity.cli`` leaves torch to the commands (so that ``analyze`` starts its
    worker first), and ``analyze`` draws in the worker: matplotlib stays out of its process."""
    code = (
        "import json, sys\n"
        "import fidelity.cli as cli\n"
        "before = sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules)\n"
        f"status = cli.main(['analyze', '--model', 'mamba', '--preset', 'tiny', '--length', "
        f"'300', '--anchors', '16', '--metrics', 'etmf', '--no-progress', '--out', "
        f"{str(tmp_path / 'run')!r}])\n"
        "print(json.dumps({'before': before, 'status': status, "
        "'matplotlib': 'matplotlib' in sys.modules}))\n"
    )
    seen = _run_python(code)
    assert seen == {"before": [], "status": 0, "matplotlib": False}
    assert {"forgetting.png", "heatmap.svg", "report.html"} <= {
        p.name for p in (tmp_path / "run").iterdir()
    }


@pytest.fixture
def _restore_threads():
    """``--threads`` sets torch's and the BLAS threads of this process: put them back."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores every pool's threads on exit
        yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("_restore_threads")
@pytest.mark.parametrize("threads", ["1", "2"])
def test_analyze_draws_with_as_many_processes_as_threads(tmp_path, monkeypatch, threads):
    from fidelity.cli import main

    seen = []
    real = FigureWorker.draw

    def draw(self, directory):
        seen.append(self.processes)
        real(self, directory)

    monkeypatch.setattr(FigureWorker, "draw", draw)
    argv = ["analyze", "--model", "mamba", "--preset", "tiny", "--length", "300"]
    argv += ["--anchors", "16", "--metrics", "etmf", "--no-progress", "--threads", threads]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert seen == [int(threads)]
    assert (tmp_path / "run" / "report.html").is_file()
