"""Which parts of MemMamba carry its memory? The paper's ablations, at small scale.

Each variant is a MemMamba (or, for reference, a Mamba) trained with one part switched off and
otherwise the same budget: ``mini`` preset, 300 steps of 8 x 1024 tokens of the ``mix`` task,
seed 1, one CPU thread (the commands are in ``VARIANTS``; about 10-15 min each). For each
trained variant this script measures, at 4x the training length:

1. held-out perplexity and passkey / key-value retrieval (``fidelity.analyze``'s opt-in
   metrics, doubling context lengths up to the analysis length);
2. the last layer's ETMF half-life and contiguous length, on held-out text and on random
   tokens, and ECLMF from the embeddings to the last layer (random tokens).

Variants whose run directory is missing are listed as not trained, never guessed. Reproduce:

    python benchmarks/ablations.py                 # writes benchmarks/results/ablations.md
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import pandas as pd
import torch
from claim_small import eclmf_to_last_layer, interval, pooled_accuracy

import fidelity
from fidelity.lengths import format_length, parse_length

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN = (
    "fidelity train --model {model} --preset mini --task mix --length 1k --steps 300 "
    "--batch-size 8 --lr 2e-3 --save-every 300 --seed 1 --device cpu --out runs/{run}"
)
VARIANTS: dict[str, tuple[str, str, str]] = {
    # label: (run directory under runs/, model, config overrides)
    "MemMamba (all parts)": ("abl-full", "memmamba", ""),
    "no Note Block": ("abl-no-note", "memmamba", "--set use_note_block=false"),
    "no cross-token attention": ("abl-no-cross-token", "memmamba", "--set use_cross_token=false"),
    "no cross-layer attention": ("abl-no-cross-layer", "memmamba", "--set use_cross_layer=false"),
    "FIFO pool": ("abl-fifo", "memmamba", "--set pool_policy=fifo"),
    "tau2 = 0.7": ("abl-tau2-0.7", "memmamba", "--set tau2=0.7"),
    "Mamba (reference)": ("abl-mamba", "mamba", ""),
}
STEPS = 300


def train_command(label: str) -> str:
    run, model, overrides = VARIANTS[label]
    return f"{TRAIN.format(model=model, run=run)} {overrides}".strip()


def final_loss(run_dir: Path, last: int = 20) -> float:
    """Mean training loss over the last ``last`` logged steps."""
    log = pd.read_csv(run_dir / "train_log.csv")
    return float(log["loss"].tail(last).mean())


def measure(checkpoint: Path, length: int, cache: Path) -> dict[str, fidelity.FidelityResult]:
    """Text (every metric) and random-token (ETMF, ECLMF) analyses, cached in ``cache``."""
    results = {}
    for probe, metrics in (("text", "etmf,eclmf,retrieval,perplexity"), ("random", "etmf,eclmf")):
        path = cache / probe
        if (path / "meta.json").is_file():
            results[probe] = fidelity.FidelityResult.load(path)
            continue
        model = fidelity.load_model(checkpoint)
        result = fidelity.analyze(
            model, length, probe=probe, metrics=metrics, anchors=512, seed=3, progress=False
        )
        result.save(path, force=True)
        results[probe] = result
    return results


def retrieval_cell(frame: pd.DataFrame, metric: str, length: int) -> str:
    cells = frame[(frame["metric"] == metric) & (frame["length"] == length)]
    return interval(*pooled_accuracy(cells))


def perplexity_cell(frame: pd.DataFrame, length: int) -> str:
    cells = frame[(frame["metric"] == "perplexity") & (frame["length"] == length)]
    if not len(cells):
        return "-"
    row = cells.iloc[0]
    return interval(row["value"], row["ci_low"], row["ci_high"])


def last_layer(result: fidelity.FidelityResult) -> tuple[str, str, str]:
    """Half-life and memory length of the last layer, and ECLMF_norm embeddings -> last."""
    summary = result.summary
    row = summary[summary["layer"] == summary["layer"].max()].iloc[0]
    half_life = interval(row["half_life"], row["half_life_low"], row["half_life_high"], 1)
    length = interval(
        row["contiguous_length"], row["contiguous_length_low"], row["contiguous_length_high"], 0
    )
    return half_life, length, eclmf_to_last_layer(result.frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="training runs live here")
    parser.add_argument("--length", default="4k", help="analysis length (4x the training length)")
    parser.add_argument("--cache", type=Path, default=Path("runs/ablation_cache"))
    parser.add_argument("--out", type=Path, default=RESULTS / "ablations.md")
    args = parser.parse_args()
    length = parse_length(args.length)
    started = time.perf_counter()
    rows, missing = [], []
    for label, (run, _, _) in VARIANTS.items():
        checkpoint = args.runs / run / f"ckpt-{STEPS}"
        if not (checkpoint / "config.json").is_file():
            missing.append(label)
            continue
        print(f"[{time.perf_counter() - started:6.0f} s] {label}", flush=True)
        results = measure(checkpoint, length, args.cache / run)
        text, random = results["text"].frame, results["random"]
        text_half_life, text_length, _ = last_layer(results["text"])
        random_half_life, random_length, eclmf = last_layer(random)
        rows.append(
            f"| {label} | {final_loss(args.runs / run):.3f} | {perplexity_cell(text, 1024)} | "
            f"{perplexity_cell(text, length)} | {retrieval_cell(text, 'passkey_acc', length)} | "
            f"{retrieval_cell(text, 'kv_acc', length)} | {text_half_life} | {text_length} | "
            f"{random_half_life} | {random_length} | {eclmf} |"
        )
    context = format_length(length)
    lines = [
        "# MemMamba ablations at small scale",
        "",
        f"Measured {date.today().isoformat()} on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, by "
        "`python benchmarks/ablations.py`. Every variant: `mini` preset (d_model 128, 6 layers), "
        f"{STEPS} steps of 8 x 1024 tokens of the `mix` task, seed 1; analyses at {context} "
        "(4x the training length), 512 anchors, seed 3. Intervals: bootstrap over sequences "
        "(perplexity) or anchors (ETMF, ECLMF), Wilson 95% (retrieval). Memory columns are the "
        "last layer's.",
        "",
        f"| variant | final train loss | perplexity 1k | perplexity {context} | "
        f"passkey acc {context} | kv acc {context} | half-life, text | memory length, text | "
        "half-life, random | memory length, random | ECLMF_norm emb->last, random |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Training commands:",
        "",
        *(f"- {label}: `{train_command(label)}`" for label in VARIANTS),
    ]
    if missing:
        lines += [
            "",
            "Not in the table, because their runs were not found in the runs directory (not "
            "trained within the CPU budget): " + ", ".join(missing) + ".",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
