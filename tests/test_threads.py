"""fidelity.threads: torch threads from the idle cores, and the CLI's --threads."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import fidelity.threads as threads_module
from fidelity.cli import main
from fidelity.errors import InputError
from fidelity.threads import idle_cores, parse_threads, set_threads


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores every pool's threads on exit
        yield
    torch.set_num_threads(before)


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(threads_module.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads_module, "usable_cores", lambda: 4)

    def busy(percent):
        monkeypatch.setattr(threads_module.psutil, "cpu_percent", lambda interval: percent)

    return busy


@pytest.mark.parametrize(
    ("percent", "expected"),
    [(0.0, 4), (10.0, 3), (25.0, 3), (50.0, 2), (75.0, 1), (100.0, 1), (60.0, 1)],
)
def test_idle_cores_counts_cores_at_least_three_quarters_idle(four_cores, percent, expected):
    four_cores(percent)  # 4 cores at `percent` busy leave 4 * (1 - percent/100) idle
    assert idle_cores() == expected


def test_auto_sets_torch_to_the_idle_cores_unless_omp_num_threads_is_set(four_cores, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(3)
    four_cores(75.0)
    assert set_threads("auto") == (1, "auto: 1 of 4 cores idle")
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    assert set_threads("auto") == (3, "OMP_NUM_THREADS")
    assert set_threads("2") == (2, "as asked")
    assert torch.get_num_threads() == 2
    assert _blas_threads() and set(_blas_threads()) == {2}  # numpy's BLAS too
    set_threads("1")
    assert set(_blas_threads()) == {1}


@pytest.mark.parametrize("value", ["0", "-1", "two", "", "1.5", True])
def test_bad_thread_counts_are_input_errors(value):
    with pytest.raises(InputError, match="--threads"):
        parse_threads(value)


def test_the_cli_refuses_a_bad_threads_value_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["analyze", "--model", "mamba", "--length", "1k", "--out", str(out)]
    assert main([*argv, "--threads", "none"]) == 2
    assert "--threads must be" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", "--out", str(tmp_path / "t"), "--threads", "0"]) == 2
    assert main(["compare", str(tmp_path), str(tmp_path), "--threads", "-2"]) == 2
    assert "--threads must be" in capsys.readouterr().err


def _sample(wall, busy, total, own):
    return threads_module.CpuSample(wall=wall, busy=busy, total=total, own=own)


@pytest.mark.parametrize(
    ("busy", "own", "expected"),
    [
        (0.0, 0.0, 4),  # nothing ran
        (1.0, 1.0, 4),  # one core busy, with this process's own work only
        (1.0, 0.0, 3),  # one core busy with another process
        (3.0, 1.0, 2),  # two other processes and this one
        (4.0, 0.0, 1),  # all busy with others: at least one thread
    ],
)
def test_idle_cores_since_a_sample_leaves_out_this_process(
    four_cores, monkeypatch, busy, own, expected
):
    """Over one second of 4 cores (4 CPU-seconds), ``busy`` of them busy, ``own`` of those
    this process's: only the rest counts against the idle cores, and no more is waited."""
    start = _sample(wall=10.0, busy=100.0, total=1000.0, own=5.0)
    now = _sample(wall=11.0, busy=100.0 + busy, total=1004.0, own=5.0 + own)
    monkeypatch.setattr(threads_module, "cpu_sample", lambda: now)
    monkeypatch.setattr(threads_module.time, "monotonic", lambda: 11.0)
    waited = []
    monkeypatch.setattr(threads_module.time, "sleep", waited.append)
    assert idle_cores(0.25, since=start) == expected
    assert waited == [0.0]


def test_idle_cores_since_a_recent_sample_waits_for_the_rest(four_cores, monkeypatch):
    start = _sample(wall=10.0, busy=0.0, total=0.0, own=0.0)
    monkeypatch.setattr(threads_module.time, "monotonic", lambda: 10.1)
    waited = []
    monkeypatch.setattr(threads_module.time, "sleep", waited.append)
    monkeypatch.setattr(
        threads_module, "cpu_sample", lambda: _sample(wall=10.25, busy=0.2, total=1.0, own=0.2)
    )
    assert idle_cores(0.25, since=start) == 4
    assert waited == [pytest.approx(0.15)]


def test_cpu_sample_counts_this_process():
    before = threads_module.cpu_sample()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    after = threads_module.cpu_sample()
    assert after.own - before.own >= 0.04 - 1e-9  # 10 ms clock ticks, summed over processes
    assert after.total > before.total and after.busy >= before.busy
    assert 1 <= idle_cores(0.0, since=before) <= threads_module.usable_cores()


def test_cpu_sample_counts_child_processes_live_and_ended():
    """A child's CPU time is the command's own (the figure worker imports while the idle cores
    are sampled): counted while it runs and after it has ended."""
    before = threads_module.cpu_sample()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.3\n"
            "while time.process_time() < end: pass\ninput()",
        ],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        while sum(psutil.Process(child.pid).cpu_times()[:2]) < 0.25:  # waits for a state
            time.sleep(0.02)
        running = threads_module.cpu_sample()
    finally:
        child.communicate("\n")
    ended = threads_module.cpu_sample()
    assert running.own - before.own >= 0.25
    assert ended.own >= running.own
