"""Quick, in-process timings behind ``fidelity bench``: scan backends and model forwards.

The full benchmarks (other libraries' scans, scaling to 400k tokens, the small-scale study)
live in ``benchmarks/``; this module holds what they and the command share.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fidelity.kernels import available_backends, selective_scan
from fidelity.models.base import CausalLM


def source_at(root: Path, revision: str, path: str) -> tuple[str, str]:
    """``(short commit, text)`` of the file ``path`` at git ``revision`` of the repository at
    ``root`` (the A/B benchmarks set old code beside the working tree's)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout

    commit = git("rev-parse", "--short", revision).strip()
    return commit, git("show", f"{commit}:{path}")


def scan_inputs(length: int, d_inner: int = 1536, d_state: int = 16, seed: int = 0) -> dict:
    """Mamba-sized selective-scan inputs (batch 1, float32): ``u``, ``delta``, ``z``
    `(1, d_inner, length)`, ``A`` `(d_inner, d_state)` (S4D-real init), ``B``, ``C`` `(1,
    d_state, length)`, ``D``, ``delta_bias`` `(d_inner,)`."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(1, d_inner, length, generator=generator),
        "delta": torch.randn(1, d_inner, length, generator=generator) - 2.0,
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1),
        "B": torch.randn(1, d_state, length, generator=generator),
        "C": torch.randn(1, d_state, length, generator=generator),
        "D": torch.ones(d_inner),
        "z": torch.randn(1, d_inner, length, generator=generator),
        "delta_bias": 0.1 * torch.randn(d_inner, generator=generator),
    }


def best_time(run: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls of ``run`` (after one warm-up call)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def time_scan_backends(
    length: int, d_inner: int = 1536, d_state: int = 16, repeats: int = 3
) -> list[dict]:
    """Forward time of every scan backend available here on the same inputs: rows of
    ``backend``, ``seconds``, ``tokens_per_s``, ``ratio`` (to the fastest) and ``max_error``
    (relative to the reference output)."""
    inputs = scan_inputs(length, d_inner, d_state)
    outputs, rows = {}, []
    for backend in available_backends():
        if backend in ("triton", "mamba_ssm"):
            continue  # CUDA backends (Triton runs on CPU only in interpreter mode)

        def run(backend=backend):
            with torch.no_grad():
                outputs[backend] = selective_scan(**inputs, delta_softplus=True, backend=backend)

        seconds = best_time(run, repeats)
        rows.append({"backend": backend, "seconds": seconds, "tokens_per_s": length / seconds})
    fastest = min(row["seconds"] for row in rows)
    reference = outputs["ref"]
    scale = reference.abs().max().item()
    for row in rows:
        row["ratio"] = row["seconds"] / fastest
        row["max_error"] = (outputs[row["backend"]] - reference).abs().max().item() / scale
    return rows


def time_forward(model: CausalLM, length: int, repeats: int = 3, seed: int = 0) -> float:
    """Best forward time of ``model`` on ``length`` random tokens (batch 1, no gradients)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
    ids = ids.to(model.device)

    def run():
        with torch.no_grad():
            model(ids)

    return best_time(run, repeats)
