"""How many CPU threads torch and numpy's BLAS use: by default, as many as the cores other
processes leave idle.

torch's own default (one thread per core) is right on a quiet machine. When other processes keep
cores busy it is not: every parallel operation waits for its slowest thread, and a thread that
shares its core with another process is often the slowest. Measured on a 2-core machine with
other jobs running (load 8): `fidelity analyze --model memmamba --length 60k` took 161 s with 2
threads and 50 s with 1; the many small operations of the read-outs and of MemMamba's pool lose
most. So the CLI's ``--threads auto`` counts the cores idle when a run starts (a short sample of
CPU use) and uses that many threads, at least one, in torch and in numpy's BLAS (whose
multi-threaded products collapse alike: 7.2 s instead of 0.4 s for the same ETMF tables at load
8). ``OMP_NUM_THREADS`` or a number given with ``--threads`` wins; a load that starts later is
not followed.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import psutil
import torch
from threadpoolctl import threadpool_limits

from fidelity.errors import InputError

AUTO = "auto"
SAMPLE_SECONDS = 0.25
"""How long CPU use is sampled to count the idle cores."""
IDLE_SHARE = 0.75
"""A core counts as idle when at least this share of it was idle during the sample."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds so far, at monotonic time ``wall``: ``busy`` and ``total`` of all cores,
    ``own`` of this process (all its threads) and of its child processes (``fidelity analyze``'s
    figure worker imports while the idle cores are sampled: its work is the command's own)."""

    wall: float
    busy: float
    total: float
    own: float


def cpu_sample() -> CpuSample:
    """The machine's and this process's CPU times now (for :func:`idle_cores`' ``since``)."""
    times = psutil.cpu_times()
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # in user already
    total = sum(times) - guest
    busy = total - times.idle - getattr(times, "iowait", 0.0)
    return CpuSample(time.monotonic(), busy, total, _own_cpu())


def _own_cpu() -> float:
    """CPU seconds of this process and of its descendants: for each, live or ended, counted
    once (a live one's own time, an ended one's in its parent's ``children_*`` times)."""
    process = psutil.Process()
    seconds = 0.0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # ended since it was listed: its parent has it
            times = member.cpu_times()
            seconds += times.user + times.system + times.children_user + times.children_system
    return seconds


def idle_cores(sample_seconds: float = SAMPLE_SECONDS, since: CpuSample | None = None) -> int:
    """Cores other processes left idle over a ``sample_seconds`` sample: at least 1.

    ``since``: a :func:`cpu_sample` taken earlier. The sample then runs from it (waiting only
    for what is left of ``sample_seconds``) and the CPU time of this process and of its children
    in it is not counted as busy, so the CLI samples while it loads the model (and its figure
    worker imports) instead of waiting."""
    cores = os.cpu_count() or 1
    if since is None:
        busy = psutil.cpu_percent(interval=sample_seconds) / 100
    else:
        time.sleep(max(0.0, sample_seconds - (time.monotonic() - since.wall)))
        now = cpu_sample()
        elapsed = now.total - since.total
        others = (now.busy - since.busy) - (now.own - since.own)
        busy = min(1.0, max(0.0, others / elapsed)) if elapsed > 0 else 0.0
    idle = cores * (1 - busy)
    return max(1, min(usable_cores(), int(idle + (1 - IDLE_SHARE))))


def parse_threads(value: str | int) -> str | int:
    """``"auto"`` or a positive thread count; anything else is an :class:`InputError`."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text.isdigit() and int(text) > 0:
            return int(text)
    raise InputError(f"--threads must be 'auto' or a positive number, got {value!r}")


def set_threads(value: str | int = AUTO, since: CpuSample | None = None) -> tuple[int, str]:
    """Set the threads of torch and of numpy's BLAS and say why: ``(threads, reason)``.

    ``value`` is ``"auto"`` (the idle cores, unless ``OMP_NUM_THREADS`` is set: then torch's
    setting stays) or a positive count; ``since``: where the sample of idle cores starts (see
    :func:`idle_cores`).
    """
    value = parse_threads(value)
    if value != AUTO:
        _use(value)
        return value, "as asked"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    threads = idle_cores(since=since)
    _use(threads)
    return threads, f"auto: {threads} of {usable_cores()} cores idle"


def _use(threads: int) -> None:
    """``threads`` in torch and in every BLAS library loaded (numpy's), for the process."""
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")
