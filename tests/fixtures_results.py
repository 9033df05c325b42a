"""SYNTHETIC result tables for testing results, plots and reports: plumbing only.

Nothing here is a measurement. The curves are textbook shapes (exponential forgetting whose
time constant grows with depth, accuracy falling with needle distance) with seeded noise, so
that every plot kind and every column of the contract between ``fidelity.analysis`` and
``fidelity.results`` has realistic-looking data. Real numbers come from ``fidelity.analyze``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fidelity.metrics.curves import (
    contiguous_length,
    farthest_distance,
    memory_mass,
    peak_distance,
)
from fidelity.results import FRAME_COLUMNS, FidelityResult

SYNTHETIC_NOTE = "synthetic test fixture: not a measurement"
KEY_DISTANCES = (1, 64, 1024)


def _distances(length: int) -> list[int]:
    """0, 1, 2, 4, ... powers of two below ``length``, then ``length - 1``."""
    powers = [2**k for k in range(int(math.log2(max(length - 1, 1))) + 1) if 2**k < length]
    return sorted({0, *powers, length - 1})


def _wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def layer_time_constant(layer: int) -> float:
    """Synthetic forgetting time constant (tokens) of ``layer``: grows 4x per layer."""
    return 2.0 * 4.0**layer


def synthetic_frame(
    model: str = "memmamba",
    checkpoint: str = "",
    n_layer: int = 3,
    length: int = 2048,
    seed: int = 0,
    retrieval: bool = True,
    decay: bool = True,
    influence: bool = True,
    depth: bool = True,
    memory_scale: float = 1.0,
) -> pd.DataFrame:
    """A tidy frame with every metric family of the contract (see ``fidelity.results``).

    ``memory_scale`` multiplies every layer's forgetting time constant (a "better memory" run).
    """
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []

    def add(
        metric: str,
        layer: int,
        source: int,
        distance: int,
        value: float,
        spread: float,
        n: int,
        run_length: int = length,
        needle_depth: float = math.nan,
    ) -> None:
        low, high = (value - spread, value + spread) if spread >= 0 else (math.nan, math.nan)
        rows.append(
            dict(
                model=model,
                checkpoint=checkpoint,
                metric=metric,
                layer=layer,
                source_layer=source,
                distance=distance,
                value=value,
                ci_low=low,
                ci_high=high,
                n=n,
                length=run_length,
                depth=needle_depth,
            )
        )

    chance = 0.08
    for layer in range(n_layer + 1):
        tau = memory_scale * layer_time_constant(layer)
        for d in _distances(length):
            clean = 1.0 if d == 0 else (0.0 if layer == 0 else 0.95 * math.exp(-d / tau))
            norm = clean + rng.normal(0, 0.01)
            add("etmf_norm", layer, layer, d, norm, 0.03, 256)
            add("etmf_chance", layer, layer, d, chance + rng.normal(0, 0.005), 0.01, 256)
            add("etmf", layer, layer, d, chance + norm * (1 - chance), 0.03, 256)
            add("etmf_acc", layer, layer, d, min(1.0, max(0.0, norm)), -1, 256)
            if decay and layer > 0 and d > 0:
                add("ssm_decay", layer, layer, d, 0.3 * math.exp(-d / tau) + 1e-6, -1, 64)
            if influence and layer > 0:
                response = math.exp(-d / (1.5 * tau)) + 1e-4
                add("influence", layer, layer, d, response, 0.1 * response, 32)
    if depth:
        for target in range(1, n_layer + 1):
            for source in range(target):
                gap = target - source
                score = 0.92**gap + rng.normal(0, 0.01)
                add("eclmf_norm", target, source, gap, score, 0.02, 256)
                add("eclmf_chance", target, source, gap, chance, 0.01, 256)
                add("cka", target, source, gap, 0.85**gap, -1, 256)
    if retrieval:
        for context in (length // 4, length // 2, length):
            for needle_depth in (0.0, 0.25, 0.5, 0.75, 1.0):
                distance = round((1 - needle_depth) * (context - 16))
                trials = 20
                for metric, scale in (("passkey_acc", 0.6), ("kv_acc", 0.3)):
                    p = 1.0 / (1.0 + math.exp((distance - scale * length) / (0.1 * length)))
                    hits = float(rng.binomial(trials, p))
                    low, high = _wilson(hits, trials)
                    rows.append(
                        dict(
                            model=model,
                            checkpoint=checkpoint,
                            metric=metric,
                            layer=-1,
                            source_layer=-1,
                            distance=distance,
                            value=hits / trials,
                            ci_low=low,
                            ci_high=high,
                            n=trials,
                            length=context,
                            depth=needle_depth,
                        )
                    )
            add("perplexity", -1, -1, 0, 20.0 + 5 * math.log2(length / context), -1, 8, context)
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


def synthetic_summary(frame: pd.DataFrame, memory_scale: float = 1.0) -> pd.DataFrame:
    """Per-layer summary of ``frame``'s etmf_norm curves (half-life from the known tau; the
    other statistics from the curve, with made-up intervals around them)."""
    records = []
    curves = frame[frame["metric"] == "etmf_norm"]
    for (model, checkpoint, layer), curve in curves.groupby(["model", "checkpoint", "layer"]):
        curve = curve.sort_values("distance")
        d, v = curve["distance"].to_numpy(), curve["value"].to_numpy()
        half_life = (
            math.nan if layer == 0 else memory_scale * layer_time_constant(layer) * math.log(2)
        )
        record = dict(model=model, checkpoint=checkpoint, layer=layer)
        for column, value in (
            ("farthest_distance", farthest_distance(d, v)),
            ("peak_distance", peak_distance(d, v)),
            ("memory_mass", memory_mass(d, v)),
            ("contiguous_length", contiguous_length(d, v)),
        ):
            record |= {column: value, f"{column}_low": value / 2, f"{column}_high": value * 2}
        at_peak = v[d == record["peak_distance"]]
        record["peak_value"] = float(at_peak[0]) if at_peak.size else math.nan
        record |= dict(
            half_life=half_life,
            half_life_low=half_life * 0.9,
            half_life_high=half_life * 1.1,
            half_life_r2=math.nan if layer == 0 else 0.99,
        )
        for key in KEY_DISTANCES:
            at = curve.loc[curve["distance"] == key, "value"]
            record[f"etmf_norm@{key}"] = float(at.iloc[0]) if len(at) else math.nan
        records.append(record)
    return pd.DataFrame(records)


def synthetic_meta(
    model: str = "memmamba",
    checkpoint: str = "",
    length: int = 2048,
    probe: str = "text",
    trained: bool = True,
    seed: int = 0,
    n_layer: int = 3,
) -> dict[str, object]:
    """A complete meta dict as ``fidelity.analyze`` writes it, marked synthetic in its notes."""
    return {
        "model": model,
        "checkpoint": checkpoint,
        "trained": trained,
        "random_init": not trained,
        "preset": "tiny",
        "model_config": {"d_model": 64, "n_layer": n_layer, "d_state": 16},
        "n_parameters": 123456,
        "probe": probe,
        "length": length,
        "batch": 2,
        "seed": seed,
        "anchors": 256,
        "distances": _distances(length),
        "layers": list(range(n_layer + 1)),
        "metrics": ["etmf", "eclmf", "ssm_decay", "influence", "retrieval"],
        "device": "cpu",
        "versions": {
            "memory-fidelity": "0.1.0",
            "torch": "2.x",
            "python": "3.x",
            "platform": "synthetic",
        },
        "wall_time_s": 12.5,
        "peak_memory_bytes": 3 * 2**30,
        "created": "2025-01-02T03:04:05+00:00",
        "notes": [SYNTHETIC_NOTE],
    }


def synthetic_result(
    model: str = "memmamba",
    checkpoint: str = "",
    n_layer: int = 3,
    length: int = 2048,
    seed: int = 0,
    probe: str = "text",
    trained: bool = True,
    memory_scale: float = 1.0,
    **families: bool,
) -> FidelityResult:
    """A :class:`FidelityResult` from the synthetic tables (``families``: retrieval, decay, ...)."""
    frame = synthetic_frame(
        model, checkpoint, n_layer, length, seed, memory_scale=memory_scale, **families
    )
    return FidelityResult(
        frame=frame,
        summary=synthetic_summary(frame, memory_scale),
        meta=synthetic_meta(model, checkpoint, length, probe, trained, seed, n_layer),
    )
