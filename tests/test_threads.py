"""fidelity.threads: torch threads from the idle cores, and the CLI's --threads."""

from __future__ import annotations

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
