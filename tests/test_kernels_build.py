"""Building the fused CPU kernel: laziness, cache location, stale locks, concurrent builds,
and the fallback to the chunked scan when compilation fails."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from fidelity.kernels import (
    BACKEND_ENV_VAR,
    available_backends,
    cpu_fused,
    resolve_backend,
    selective_scan,
)

REPO = Path(__file__).resolve().parents[1]


def _inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    batch, d_inner, d_state, length = 2, 6, 4, 40
    return {
        "u": torch.randn(batch, d_inner, length, generator=gen),
        "delta": torch.randn(batch, d_inner, length, generator=gen),
        "A": -torch.rand(d_inner, d_state, generator=gen) - 0.5,
        "B": torch.randn(batch, d_state, length, generator=gen),
        "C": torch.randn(batch, d_state, length, generator=gen),
        "D": torch.randn(d_inner, generator=gen),
        "z": torch.randn(batch, d_inner, length, generator=gen),
        "delta_softplus": True,
    }


def _run_python(code: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_importing_fidelity_compiles_nothing():
    proc = _run_python(
        """
        import sys
        import fidelity.kernels
        from fidelity.kernels import cpu_fused
        assert not cpu_fused._build.attempted, "compiled at import"
        assert "fidelity.kernels.triton_scan" not in sys.modules, "imported the Triton module"
        assert "mamba_ssm" not in sys.modules, "imported mamba_ssm"
        print("lazy")
        """,
        {},
    )
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "lazy" in output, output


def test_build_directory_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    directory = cpu_fused.build_directory()
    assert directory.parent == tmp_path / "memory-fidelity"
    assert directory.name.startswith(f"torch-{torch.__version__.replace('+', '-')}-py")


def test_checkouts_in_other_places_build_apart(monkeypatch, tmp_path):
    """cpp_extension rebuilds a directory whose build file names another source path: two
    checkouts sharing a cache must not take turns rebuilding one directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = cpu_fused.build_directory()
    monkeypatch.setattr(cpu_fused, "_SOURCE", tmp_path / "elsewhere" / cpu_fused._SOURCE.name)
    assert cpu_fused.build_directory() != here


def test_only_stale_build_locks_are_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    cpu_fused._remove_stale_lock(tmp_path)
    assert lock.exists(), "a fresh lock belongs to a running build"
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        cpu_fused._remove_stale_lock(tmp_path)
    assert not lock.exists()


def test_failed_compile_falls_back_to_chunked_with_one_warning(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_fused, "_build", cpu_fused._BuildState())

    def broken_compiler():
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(cpu_fused, "_compile_extension", broken_compiler)
    inputs = _inputs()
    with pytest.warns(RuntimeWarning, match="simulated compiler failure"):
        out = selective_scan(**inputs)
    reference = selective_scan(**inputs, backend="ref")
    error = (out - reference).abs().max().item()
    assert error <= 1e-4 * reference.abs().max().item(), f"fallback result off by {error:.3g}"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second warning
        assert resolve_backend("auto", torch.device("cpu"), has_initial_state=False) == "chunked"
        selective_scan(**inputs)
    assert "cpu" not in available_backends()
    with pytest.raises(ValueError, match=r"'cpu'.*failed to compile.*simulated compiler failure"):
        selective_scan(**inputs, backend="cpu")


@pytest.mark.slow
def test_two_processes_can_build_into_one_fresh_cache(tmp_path):
    """cpp_extension's lock file serialises the builds; both processes get a working kernel."""
    code = """
        import torch
        from fidelity.kernels import cpu_fused, selective_scan
        assert cpu_fused.load_extension() is not None, cpu_fused.extension_error()
        g = torch.Generator().manual_seed(0)
        u, delta = torch.randn(1, 3, 50, generator=g), torch.rand(1, 3, 50, generator=g)
        A, B, C = -torch.rand(3, 2, generator=g), torch.randn(3, 2, generator=g), torch.randn(3, 2)
        fused = selective_scan(u, delta, A, B, C, backend="cpu")
        ref = selective_scan(u, delta, A, B, C, backend="ref")
        assert (fused - ref).abs().max() <= 1e-4 * ref.abs().max()
        print("built")
        """
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    procs = [_run_python(code, env) for _ in range(2)]
    outputs = [proc.communicate(timeout=540)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and "built" in output, output
    compiling = "compiling the fused CPU selective scan, once per machine (about 35 s"
    assert any(output.count(compiling) == 1 for output in outputs), outputs
    build_dirs = list((tmp_path / "memory-fidelity").iterdir())
    assert len(build_dirs) == 1 and not (build_dirs[0] / "lock").exists()
    later = _run_python(code, env).communicate(timeout=540)[0]
    assert "built" in later and compiling not in later, later  # cached: silent
