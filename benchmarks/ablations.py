"""Which parts of MemMamba carry its retrieval beyond the training length? The paper's
ablations (no Note Block, no cross-token, no cross-layer attention) and ours (FIFO pool, tau1
and tau2), at small scale, on the retrieval recipe, measured on passkey extrapolation.

Two kinds of ablation, reported in separate tables:

(a) **switched off at evaluation**: the shipped ``memmamba`` (the full model after stage B of
    the retrieval curriculum, ``fidelity/data/TRAINING.md``) with one part disabled at
    inference only, no retraining (:func:`fidelity.ablation.ablated`: parameters of a switched
    off part are dropped, every other one is loaded exactly);
(b) **stage B with the part switched off**: each variant fine-tuned by the recipe's stage B
    (500 steps, mix with 25% text, 512 tokens) from the full model's A2 checkpoint, with
    ``--set <switch>`` (``fidelity train --init`` moves the weights across the switch; commands
    in :data:`STAGE_B` and ``fidelity/data/TRAINING.md``). A variant whose run has not reached
    its last step reads "not trained (k/500 steps)", never guessed.

The shipped ``memmamba`` and ``mamba`` are the references of both tables (``--reference``
replaces the first: a full model trained from the same A2 checkpoint as the variants, e.g. when
that checkpoint was retrained; ``--init`` names the A2 checkpoint in the commands). For every model,
passkey exact match with the standard filler and with held-out text as filler, 10 prompts at
each of 5 needle depths, Wilson 95% intervals, at 1x, 4x, 16x and 64x the training length (512
tokens). Cells are measured and cached by ``benchmarks/claim_small.py``'s machinery (one JSON
file per model x task x length under ``--cache``/retrieval, keyed by the model's files and
config), so a killed run loses at most one cell and a rerun measures only what is missing:

    python benchmarks/ablations.py                       # everything (hours on a shared CPU)
    python benchmarks/ablations.py --max-multiple 4      # fill the table from the left
    python benchmarks/ablations.py --cached-only         # re-render from the cache
    python benchmarks/ablations.py --runs runs/abl-b2 --reference runs/pk8/memmamba \
        --init runs/pk8/memmamba-passkey-a2/ckpt-1000 --out benchmarks/results/NEW.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from claim_small import (
    TASK_TITLES,
    Bounds,
    Clock,
    Entry,
    Point,
    depth_table,
    extrapolation_table,
    fill_cell,
    load_entries,
    model_identity,
    parse_max_multiple,
    plan_cells,
    positive_numbers,
    run_main,
)

from fidelity.ablation import ablated
from fidelity.atomic import write_text_atomically
from fidelity.errors import InputError
from fidelity.metrics.retrieval import DEFAULT_DEPTHS
from fidelity.train import checkpoint_dirs

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("passkey-standard", "passkey-text")
MULTIPLES = "1,4,16,64"
REFERENCES = {"MemMamba (full)": "memmamba", "Mamba": "mamba"}
"""Label -> shipped name of the reference models."""
VARIANTS: dict[str, tuple[str, str, object]] = {
    # label: (stage B run name under runs/abl-b, config field, value)
    "no Note Block": ("no-note-block", "use_note_block", False),
    "no cross-token attention": ("no-cross-token", "use_cross_token", False),
    "no cross-layer attention": ("no-cross-layer", "use_cross_layer", False),
    "FIFO pool": ("fifo", "pool_policy", "fifo"),
    "tau2 = 0.3": ("tau2-0.3", "tau2", 0.3),
    "tau2 = 0.7": ("tau2-0.7", "tau2", 0.7),
    "tau1 = 0.3": ("tau1-0.3", "tau1", 0.3),
    "tau1 = 0.7": ("tau1-0.7", "tau1", 0.7),
}
"""The ablations, in the order the paper names them, then ours (defaults: tau1 = tau2 = 0.5,
priority pool)."""
STAGE_B_STEPS = 500
INIT = "runs/pk6/memmamba-passkey-a2/ckpt-1000"
STAGE_B = (
    "fidelity train --model memmamba --preset mini --init {init} --task mix "
    "--task-option episodes=2 --task-option questions=4 --task-option filler=mixed "
    "--task-option spacing=far --task-option 'shares=[0.25,0.75,0]' --length 512 --steps 500 "
    "--batch-size 16 --lr 1e-3 --save-every 50 --seed 1 --device cpu --threads 1 "
    "--set {setting} --out {out}"
)
EVALUATION_NOTE = (
    "What switching off means at evaluation: *no Note Block*: every position writes its own "
    "unpooled note (the summarizer's projection, no scorer, no window pooling) with equal "
    "importance, so the 50-note pool holds the 50 most recent positions (the scorer's weights "
    "stay but are unused); *no cross-token* / *no cross-layer attention*: that attention, its "
    "trigger and its fusion weights are dropped, the other context keeps its own fusion "
    "weights; *FIFO pool*: the oldest note is evicted instead of the least important; *tau1*: "
    "the token-importance threshold for writing a note (the scorer was trained to write about "
    "5% of positions at 0.5); *tau2*: the state-importance threshold for firing cross-token "
    "attention."
)


def setting(label: str) -> str:
    """``field=value`` as ``--set`` takes it."""
    _, name, value = VARIANTS[label]
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"{name}={text}"


def stage_b_command(label: str, runs: Path, init: str = INIT) -> str:
    run = VARIANTS[label][0]
    return STAGE_B.format(init=init, setting=setting(label), out=runs / run)


def stage_b_status(run: Path) -> tuple[Path | None, int]:
    """(the final checkpoint of a stage B run, or None when it has not reached its last step;
    the newest complete step, 0 when none)."""
    found = checkpoint_dirs(run) if run.is_dir() else []
    step = int(found[-1].name.removeprefix("ckpt-")) if found else 0
    return (found[-1] if step >= STAGE_B_STEPS else None), step


def evaluation_entries(full: Entry) -> list[Entry]:
    """The full model with each part switched off at evaluation, one entry each."""
    entries = []
    for label, (_, name, value) in VARIANTS.items():
        model, _ = ablated(full.model, **{name: value})
        entries.append(
            Entry(
                f"{label} (at evaluation)",
                f"{full.source} with {name}={value}",
                model,
                model_identity(model, label),
                full.training_length,
            )
        )
    return entries


def stage_b_entries(runs: Path) -> tuple[list[Entry], dict[str, int]]:
    """Entries of the finished stage B runs under ``runs``; {label: steps done} of the rest."""
    finished, missing = {}, {}
    for label, (run, _, _) in VARIANTS.items():
        checkpoint, step = stage_b_status(runs / run)
        if checkpoint is None:
            missing[label] = step
        else:
            finished[f"{label} (stage B)"] = str(checkpoint)
    return (load_entries(finished) if finished else []), missing


def not_trained_rows(missing: dict[str, int], n_points: int) -> list[str]:
    """Table rows for stage B variants without a finished run."""
    return [
        f"| {label} (stage B) | 512 | not trained ({step}/{STAGE_B_STEPS} steps) | "
        + " | ".join(["-"] * (n_points - 1))
        + " |"
        for label, step in missing.items()
    ]


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/abl-b"), help="stage B runs")
    parser.add_argument("--multiples", default=MULTIPLES, help="multiples of the training length")
    parser.add_argument("--trials", type=int, default=10, help="prompts per needle depth")
    parser.add_argument(
        "--max-multiple", action="append", default=[], metavar="[TASK=]N",
        help="measure cells up to N x the training length (others: read from the cache only)",
    )  # fmt: skip
    parser.add_argument("--only", help="measure only these labels (comma-separated)")
    parser.add_argument("--cached-only", action="store_true", help="measure nothing")
    parser.add_argument("--cache", type=Path, default=Path("runs/ablation_cache"))
    parser.add_argument("--out", type=Path, default=RESULTS / "ablations.md")
    parser.add_argument(
        "--reference",
        default=REFERENCES["MemMamba (full)"],
        help="the full model (a shipped name, checkpoint or run directory): the reference of "
        "both tables and what (a) switches off",
    )
    parser.add_argument("--init", default=INIT, help="the A2 checkpoint stage B starts from")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.trials < 1:
        raise InputError("--trials must be positive")
    args.points = [Point(v, True) for v in positive_numbers(args.multiples, "--multiples")]
    only = frozenset(x for x in (args.only or "").split(",") if x) if args.only else None
    args.bounds = Bounds(only, parse_max_multiple(args.max_multiple), args.cached_only)
    return args


def report(args, references, evaluation, trained, missing, cells, load) -> str:
    points = args.points
    lines = [
        "# MemMamba ablations at small scale, on the retrieval recipe: passkey extrapolation",
        "",
        "Regenerate: `python benchmarks/ablations.py "
        + shlex.join(["--multiples", args.multiples, "--trials", str(args.trials), *sources(args)])
        + "` (cells already in the cache are read from it). "
        + f"This run: `python benchmarks/ablations.py {shlex.join(args.argv)}`",
        "",
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; 1-minute load {load[0]:.1f} at the start, {load[1]:.1f} at the "
        f"end. Every model is trained at 512 tokens; {args.trials} prompts at each of "
        f"{len(DEFAULT_DEPTHS)} needle depths per cell, exact match of the greedy answer, "
        "Wilson 95% intervals; the length of each cell in brackets. Cells not measured read "
        "why (e.g. beyond this run's `--max-multiple`).",
        "",
        f"References: **MemMamba (full)** is {reference_text(args)} (all parts, the 3-stage "
        "curriculum of `fidelity/data/TRAINING.md`); **Mamba** the shipped `mamba` (same "
        "curriculum).",
        "",
        "(a) **switched off at evaluation**: the full MemMamba with one part disabled at "
        "inference only, no retraining. " + EVALUATION_NOTE,
        "",
        "(b) **stage B with the part switched off**: the full model's stage A2 checkpoint "
        f"(`{args.init}`) fine-tuned by stage B (500 steps of the mix with 25% text at 512 tokens) "
        "with the part switched off, so the rest of the model can adapt to its absence "
        "(commands below).",
        "",
    ]
    for task in TASKS:
        task_cells = [c for c in cells if c.task == task]
        table_a = extrapolation_table(task_cells, references + evaluation, points)
        table_b = extrapolation_table(task_cells, references + trained, points)
        entries = references + evaluation + trained
        lines += [
            f"## {TASK_TITLES[task]}",
            "",
            "(a) Switched off at evaluation:",
            "",
            table_a,
            "",
            "(b) Stage B with the part switched off:",
            "",
            "\n".join([table_b, *not_trained_rows(missing, len(points))]),
            "",
            "By needle depth (exact-match hits / trials; 0: needle first, 1: last):",
            "",
            depth_table(task_cells, entries),
            "",
        ]
    lines += [
        "## Stage B commands",
        "",
        "Run one at a time, from the worktree root, with `nice -n 10` and `OMP_NUM_THREADS=1`; "
        "add `--resume` to continue a killed run (`runs/ablation_queue.sh` in "
        "`fidelity/data/TRAINING.md` does all of them in turn):",
        "",
        *(f"- {label}: `{stage_b_command(label, args.runs, args.init)}`" for label in VARIANTS),
        "",
        "The earlier ablations (text-only recipe, 300 steps at 1k tokens, models that retrieve "
        "nothing) are kept in `benchmarks/results/ablations_text_recipe.md`.",
        "",
    ]
    return "\n".join(lines)


def sources(args: argparse.Namespace) -> list[str]:
    """The options naming the runs, the full model and the A2 checkpoint, where not the
    defaults (so that the report's regenerate line measures the same models)."""
    defaults = parse_arguments([])
    chosen = [(f"--{name}", str(getattr(args, name))) for name in ("runs", "reference", "init")]
    return [x for option, value in chosen if value != str(getattr(defaults, option[2:]))
            for x in (option, value)]  # fmt: skip


def reference_text(args: argparse.Namespace) -> str:
    """How the report names the full model."""
    if args.reference == REFERENCES["MemMamba (full)"]:
        return "the shipped `memmamba`"
    return f"`{args.reference}` (stage B from the variants' A2 checkpoint)"


def run(argv: Sequence[str]) -> str:
    args = parse_arguments(argv)
    clock = Clock()
    load = os.getloadavg()[0]
    references = load_entries({**REFERENCES, "MemMamba (full)": args.reference})
    evaluation = evaluation_entries(references[0])
    trained, missing = stage_b_entries(args.runs)
    labels = {e.label for e in references + evaluation + trained}
    if args.bounds.only is not None and args.bounds.only - labels:
        raise InputError(f"--only names unknown labels; choose from {sorted(labels)}")
    cells = plan_cells(references + evaluation + trained, list(TASKS), args.points)
    for cell in cells:
        fill_cell(cell, args.cache, args.trials, args.bounds, clock)
    text = report(args, references, evaluation, trained, missing, cells, (load, os.getloadavg()[0]))
    write_text_atomically(args.out, text)
    clock.say(f"wrote {args.out}")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
