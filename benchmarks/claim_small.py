"""Does MemMamba retain information further than Mamba? The paper's claim, at small scale.

On the shipped pair (same width, depth, data, steps and seed; see fidelity/data/TRAINING.md)
and any further checkpoints given with ``--model label=path`` (baselines, ablations), this
measures:

1. passkey and key-value retrieval accuracy (exact match, Wilson 95% intervals) across context
   lengths up to 8x the training length and needle depths;
2. perplexity on held-out text across lengths (bootstrap intervals over sequences);
3. ETMF: per-layer half-life and contiguous length (bootstrap intervals over anchors),
   on held-out text and on random tokens; ECLMF from the embeddings to the last layer.

and writes a markdown report (default ``benchmarks/results/claim_small.md``) that states the
answer plainly, whatever it is. Reproduce with:

    python benchmarks/claim_small.py                     # the shipped pair, ~30-40 min on 2 cores
    python benchmarks/claim_small.py --quick             # a smoke run in a few minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from datetime import date
from pathlib import Path

import pandas as pd
import torch

import fidelity
from fidelity.lengths import format_length, parse_length
from fidelity.metrics.perplexity import perplexity
from fidelity.metrics.retrieval import retrieval_accuracy, wilson_interval

RESULTS = Path(__file__).resolve().parent / "results"


def parse_models(specs: list[str]) -> dict[str, str]:
    models = {"memmamba": "memmamba", "mamba": "mamba"}
    for spec in specs:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model takes label=path, got {spec!r}")
        models[label] = path
    return models


def interval(value: float, low: float, high: float, digits: int = 2) -> str:
    if value != value:
        return "-"
    if low != low or high != high:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def pooled_accuracy(cells: pd.DataFrame) -> tuple[float, float, float]:
    """Exact-match accuracy pooled over retrieval rows (each ``value`` x ``n`` successes) and
    its Wilson 95% interval; NaNs when the rows hold no trials."""
    successes, n = round(float((cells["value"] * cells["n"]).sum())), int(cells["n"].sum())
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    return successes / n, *wilson_interval(successes, n)


def eclmf_to_last_layer(frame: pd.DataFrame) -> str:
    """Normalized ECLMF from the embeddings to the last layer, with its interval, as text."""
    eclmf = frame[(frame["metric"] == "eclmf_norm") & (frame["source_layer"] == 0)]
    last = eclmf[eclmf["layer"] == eclmf["layer"].max()]
    if not len(last):
        return "-"
    row = last.iloc[0]
    return interval(row["value"], row["ci_low"], row["ci_high"])


def retrieval_table(frames: dict[str, pd.DataFrame], metric: str) -> str:
    rows = []
    for label, frame in frames.items():
        if frame.empty:
            rows.append(f"| {label} | - | not measured (CPU budget) | | |")
            continue
        cells = frame[frame["metric"] == metric]
        for length, group in cells.groupby("length"):
            by_depth = " / ".join(f"{v:.1f}" for v in group.sort_values("depth")["value"])
            rows.append(
                f"| {label} | {format_length(int(length))} | "
                f"{interval(*pooled_accuracy(group))} | {by_depth} | {int(group['n'].sum())} |"
            )
    header = (
        f"| model | context | {metric} (all depths) | by depth 0 / .25 / .5 / .75 / 1 | trials |\n"
        "|---|---|---|---|---|"
    )
    return "\n".join([header, *rows])


def perplexity_table(frames: dict[str, pd.DataFrame]) -> str:
    rows = []
    for label, frame in frames.items():
        for _, row in frame[frame["metric"] == "perplexity"].sort_values("length").iterrows():
            rows.append(
                f"| {label} | {format_length(int(row['length']))} | "
                f"{interval(row['value'], row['ci_low'], row['ci_high'])} |"
            )
    return "\n".join(["| model | context | perplexity (bytes) |", "|---|---|---|", *rows])


def memory_table(results: dict[str, fidelity.FidelityResult]) -> str:
    rows = []
    for label, result in results.items():
        eclmf_text = eclmf_to_last_layer(result.frame)
        for _, row in result.summary.iterrows():
            if row["layer"] == 0:
                continue
            rows.append(
                f"| {label} | {int(row['layer'])} | "
                f"{interval(row['half_life'], row['half_life_low'], row['half_life_high'], 1)} | "
                f"{interval(*row[[f'contiguous_length{end}' for end in ('', '_low', '_high')]], 0)}"
                " | "
                f"{eclmf_text if row['layer'] == result.summary['layer'].max() else ''} |"
            )
    header = (
        "| model | layer | ETMF half-life (tokens) | contiguous length (tokens) | "
        "ECLMF_norm embeddings->last layer |\n|---|---|---|---|---|"
    )
    return "\n".join([header, *rows])


def verdict(
    retrieval: dict[str, pd.DataFrame],
    memory: dict[str, fidelity.FidelityResult],
    training_length: int,
) -> list[str]:
    """Plain statements comparing memmamba with mamba, decided by non-overlapping intervals."""
    lines = []
    for task in ("passkey", "kv"):
        metric = f"{task}_acc"
        for length in sorted(set(retrieval["memmamba"]["length"])):
            stats = {}
            for label in ("memmamba", "mamba"):
                cells = retrieval[label]
                cells = cells[(cells["metric"] == metric) & (cells["length"] == length)]
                stats[label] = pooled_accuracy(cells)
            (a, a_low, a_high), (b, b_low, b_high) = stats["memmamba"], stats["mamba"]
            if a_low > b_high:
                word = "higher than"
            elif b_low > a_high:
                word = "lower than"
            else:
                word = "not distinguishable from"
            lines.append(
                f"- {task} retrieval at {format_length(length)} "
                f"({length / training_length:g}x the training length): MemMamba {a:.2f} "
                f"[{a_low:.2f}, {a_high:.2f}] is {word} Mamba {b:.2f} [{b_low:.2f}, {b_high:.2f}]."
            )
    for probe, result_pair in memory.items():
        mm, m = result_pair["memmamba"].summary, result_pair["mamba"].summary
        top_mm, top_m = (
            mm[mm["layer"] == mm["layer"].max()].iloc[0],
            m[m["layer"] == m["layer"].max()].iloc[0],
        )
        if top_mm["contiguous_length_low"] > top_m["contiguous_length_high"]:
            word = "longer than"
        elif top_m["contiguous_length_low"] > top_mm["contiguous_length_high"]:
            word = "shorter than"
        else:
            word = "not distinguishable from"
        lines.append(
            f"- ETMF contiguous length of the last layer on {probe}: MemMamba "
            f"{top_mm['contiguous_length']:.0f} [{top_mm['contiguous_length_low']:.0f}, "
            f"{top_mm['contiguous_length_high']:.0f}] tokens is {word} Mamba "
            f"{top_m['contiguous_length']:.0f} [{top_m['contiguous_length_low']:.0f}, "
            f"{top_m['contiguous_length_high']:.0f}]."
        )
    return lines


def slug(name: str) -> str:
    return "memory-" + name.replace(" ", "-")


def measure(model, label, lengths, trials, analysis_length, anchors, args, started):
    """Retrieval, perplexity and memory fidelity of one model (the expensive part)."""
    if label in args.no_retrieval:
        retrieval = pd.DataFrame(columns=["metric", "length", "depth", "value", "n"])
    else:
        print(f"[{time.perf_counter() - started:6.0f} s] {label}: retrieval", flush=True)
        retrieval = pd.concat(
            [
                retrieval_accuracy(model, task, lengths=lengths, trials=trials, seed=1)
                for task in ("passkey", "kv")
            ],
            ignore_index=True,
        )
    print(f"[{time.perf_counter() - started:6.0f} s] {label}: perplexity", flush=True)
    ppl = perplexity(model, lengths, n_sequences=args.ppl_sequences, seed=2)
    print(f"[{time.perf_counter() - started:6.0f} s] {label}: ETMF / ECLMF", flush=True)
    results = {
        name: fidelity.analyze(
            model,
            analysis_length,
            probe=probe,
            anchors=anchors,
            progress=False,
            metrics="etmf,eclmf",
            seed=3,
        )
        for probe, name in (("text", "held-out text"), ("random", "random tokens"))
    }
    return retrieval, ppl, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="extra label=checkpoint")
    parser.add_argument("--lengths", default="1k,2k,4k,8k,16k")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--analysis-length", default="8k")
    parser.add_argument("--ppl-sequences", type=int, default=4)
    parser.add_argument(
        "--no-retrieval",
        default="",
        help="comma-separated labels whose retrieval is not measured (e.g. a Transformer, whose "
        "16k prompts take minutes each on a CPU); their rows say so",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "claim_small.md")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("runs/claim_cache"),
        help="per-model measurements are kept here and reused when the settings match",
    )
    args = parser.parse_args()
    args.no_retrieval = {label for label in args.no_retrieval.split(",") if label}
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    trials, analysis_length, anchors = args.trials, args.analysis_length, 512
    if args.quick:
        lengths, trials, analysis_length, anchors = [512, 1024], 2, "1k", 64
    started = time.perf_counter()
    models = parse_models(args.model)
    loaded = {label: fidelity.load_model(path) for label, path in models.items()}
    training_length = int(loaded["memmamba"].provenance.get("training", {}).get("length", 2048))
    retrieval, ppl, memory = {}, {}, {"held-out text": {}, "random tokens": {}}
    settings = {
        "lengths": lengths,
        "trials": trials,
        "analysis_length": analysis_length,
        "anchors": anchors,
        "ppl_sequences": args.ppl_sequences,
    }
    for label, model in loaded.items():
        cache = args.cache / label
        key = {"model": str(models[label]), **settings}
        if label in args.no_retrieval:
            key["retrieval"] = False
        if (cache / "key.json").is_file() and json.loads((cache / "key.json").read_text()) == key:
            print(f"{label}: cached in {cache}", flush=True)
            retrieval[label] = pd.read_csv(cache / "retrieval.csv")
            ppl[label] = pd.read_csv(cache / "perplexity.csv")
            for name in memory:
                memory[name][label] = fidelity.FidelityResult.load(cache / slug(name))
            continue
        measured = measure(model, label, lengths, trials, analysis_length, anchors, args, started)
        retrieval[label], ppl[label], results = measured
        if cache.exists():
            shutil.rmtree(cache)
        cache.mkdir(parents=True)
        retrieval[label].to_csv(cache / "retrieval.csv", index=False)
        ppl[label].to_csv(cache / "perplexity.csv", index=False)
        for name, result in results.items():
            memory[name][label] = result
            result.save(cache / slug(name))
        (cache / "key.json").write_text(json.dumps(key))
    elapsed = time.perf_counter() - started
    lines = [
        "# MemMamba vs Mamba at small scale: retrieval, perplexity, memory fidelity",
        "",
        f"Measured {date.today().isoformat()} on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; this invocation "
        f"took {elapsed / 60:.1f} min (models measured earlier with the same settings are read "
        f"from `{args.cache}`).",
        "",
        "Command: `python benchmarks/claim_small.py"
        + "".join(f" --model {spec}" for spec in args.model)
        + (f" --no-retrieval {','.join(sorted(args.no_retrieval))}" if args.no_retrieval else "")
        + (" --quick`" if args.quick else f" --lengths {args.lengths} --trials {args.trials}`"),
        "",
        "Models: "
        + "; ".join(
            f"{label} = {models[label]} ({m.num_parameters():,} parameters, "
            f"{'trained' if m.provenance.get('trained') else 'untrained'})"
            for label, m in loaded.items()
        ),
        f"Training length: {training_length} tokens (so {format_length(max(lengths))} is "
        f"{max(lengths) / training_length:g}x).",
        "",
        "## Answer",
        "",
        *verdict(retrieval, memory, training_length),
        "",
        "## Passkey retrieval (exact match of the 5 digits)",
        "",
        retrieval_table(retrieval, "passkey_acc"),
        "",
        "## Key-value retrieval (exact match of the value)",
        "",
        retrieval_table(retrieval, "kv_acc"),
        "",
        "## Perplexity on held-out text (byte level)",
        "",
        perplexity_table(ppl),
        "",
    ]
    for probe, results in memory.items():
        lines += [
            f"## Memory fidelity on {probe} ({analysis_length})",
            "",
            memory_table(results),
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
