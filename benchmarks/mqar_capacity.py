"""MQAR capacity: accuracy against the number of key-value pairs at a fixed width (Zoology,
Arora et al. 2023), for 2-layer, d_model 64 models trained with the same budget and seed.

Each cell (model, pairs, learning rate) is one ``fidelity train --task mqar`` run under
``--runs`` (``runs/mqar-capacity/MODEL-pPAIRS-lrLR``), trained here when missing or
unfinished (runs resume from their newest checkpoint, so a killed benchmark continues where
it stopped; one killed before its first checkpoint starts over), one after another. The
final checkpoint of each run is tested on ``--rows`` fresh rows (seeds from 10^9; training
batches use seeds below 10^6) of the training form, the answers teacher-forced in the row
(fidelity/probes/memory_tasks.py).

The default row form is the one under which 2 x 64 models were seen to bind keys to values
on this CPU (README, MQAR capacity): ``--queries 16`` queries per row, keys drawn with
replacement (``--replace``; with ``--no-replace`` every key is asked at most once and
ruling out the values already answered scores without binding), the smallest vocabulary
that holds the pairs (``--vocab 0``: 2 x pairs + 2; with vocabulary 32 or more Mamba did not
bind at 4 pairs in 1,000 steps), rows of 2 x (pairs + queries) tokens, batch 64, 1,000 steps.

Reported per cell: query accuracy (argmax at each query, Wilson 95% interval over the
queries; the queries of one row share its keys and values, so this interval is somewhat
optimistic), rows solved (every query of the row right, Wilson interval over rows), the
training loss every 100 steps, and the training time.

    # the capacity grid (benchmarks/results/mqar_capacity.md)
    python benchmarks/mqar_capacity.py --models mamba,mamba2,transformer,memmamba \\
        --pairs 4,8,16 --save-every 1000
    # a learning-rate sweep on one model (benchmarks/results/mqar_lr_sweep.md)
    python benchmarks/mqar_capacity.py --models mamba --pairs 8 --lrs 1e-3,3e-3,1e-2 \\
        --save-every 1000 --out benchmarks/results/mqar_lr_sweep.md

``--eval-only`` evaluates the runs that exist (finished or not: the newest checkpoint) and
trains nothing. ``--curve`` also evaluates every checkpoint of each run (accuracy by step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fidelity
from fidelity.atomic import write_text_atomically
from fidelity.errors import InputError
from fidelity.metrics.retrieval import wilson_interval
from fidelity.metrics.task_accuracy import task_accuracy
from fidelity.models.registry import build_config
from fidelity.train import TrainConfig, checkpoint_dirs, train

RESULTS = Path(__file__).resolve().parent / "results"
TEST_SEED = 10**9
ZOOLOGY = (
    "Zoology (Arora et al. 2023, arXiv 2312.04927; their finding, not ours): attention "
    "solves MQAR at every number of key-value pairs and sequence length they test, while "
    "gated-convolution and fixed-state recurrent models (H3, Hyena, RWKV, RetNet and others) "
    "lose accuracy as the pairs grow beyond what their state (model width) holds; a wider "
    "model recovers it."
)


@dataclass(frozen=True)
class Cell:
    """One training run of the grid: ``model`` trained on ``pairs`` key-value pairs at ``lr``."""

    model: str
    pairs: int
    lr: float

    @property
    def name(self) -> str:
        return f"{self.model}-p{self.pairs}-lr{self.lr:g}"


@dataclass(frozen=True)
class Score:
    """Accuracy of one checkpoint: ``correct`` of ``queries`` queries, ``solved`` of ``rows``
    rows, with Wilson 95% intervals."""

    step: int
    correct: int
    queries: int
    solved: int
    rows: int

    @property
    def query_interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.queries)

    @property
    def row_interval(self) -> tuple[float, float]:
        return wilson_interval(self.solved, self.rows)


def train_config(cell: Cell, args: argparse.Namespace) -> TrainConfig:
    """The ``fidelity train`` settings of ``cell`` (2 layers x ``args.d_model``)."""
    return TrainConfig(
        model=cell.model,
        preset="mini",
        task="mqar",
        length=row_length(cell, args),
        batch_size=args.batch_size,
        steps=args.steps,
        lr=cell.lr,
        save_every=args.save_every,
        seed=args.seed,
        device="cpu",
        overrides={"n_layer": args.n_layer, "d_model": args.d_model},
        task_options=task_options(cell.pairs, args),
    )


def task_options(pairs: int, args: argparse.Namespace) -> dict:
    """The ``mqar`` options of a row with ``pairs`` pairs under ``args``."""
    return {
        "n_pairs": pairs,
        "vocab_size": vocab(pairs, args),
        "n_queries": queries(pairs, args),
        "replace": args.replace,
    }


def vocab(pairs: int, args: argparse.Namespace) -> int:
    """The task vocabulary: ``args.vocab``, or when it is 0 the smallest that holds ``pairs``
    pairs, ``2 * pairs + 2`` (keys ``1 .. pairs``, every one in every row; values ``pairs +
    1 .. 2 * pairs + 1``)."""
    return args.vocab or 2 * pairs + 2


def queries(pairs: int, args: argparse.Namespace) -> int:
    """Queries per row: ``args.queries``, or one per pair when it is 0."""
    return args.queries or pairs


def row_length(cell: Cell, args: argparse.Namespace) -> int:
    """``args.length`` if set, else ``2 * (pairs + queries)``: the shortest row that holds
    the pairs and the queries (every token after the pairs is a query or its answer)."""
    return args.length or 2 * (cell.pairs + queries(cell.pairs, args))


def command(cell: Cell, args: argparse.Namespace, out: Path) -> str:
    """The equivalent ``fidelity train`` command line."""
    return (
        f"fidelity train --model {cell.model} --preset mini --set n_layer={args.n_layer} "
        f"--set d_model={args.d_model} --task mqar --task-option n_pairs={cell.pairs} "
        f"--task-option vocab_size={vocab(cell.pairs, args)} "
        f"--task-option n_queries={queries(cell.pairs, args)} "
        f"--task-option replace={str(args.replace).lower()} --length {row_length(cell, args)} "
        f"--steps {args.steps} "
        f"--batch-size {args.batch_size} --lr {cell.lr:g} --save-every {args.save_every} "
        f"--seed {args.seed} --device cpu --out {out}"
    )


def score(checkpoint: Path, options: dict, length: int, rows: int) -> Score:
    """Accuracy of ``checkpoint`` on ``rows`` test rows of MQAR with the task ``options``."""
    model = fidelity.load_model(checkpoint)
    model.eval()
    result = task_accuracy(
        model, "mqar", length, trials=rows, batch=min(rows, 64), seed=TEST_SEED,
        chunk_size=None, **options,
    )  # fmt: skip
    queries = rows * options["n_queries"]
    step = int(checkpoint.name.removeprefix("ckpt-"))
    correct = round(result.answer_accuracy * queries)
    return Score(step, correct, queries, result.solved, rows)


def unbound_accuracy(pairs: int, queries: int, replace: bool) -> float:
    """Expected query accuracy without key-value binding, for a guess uniform over the row's
    (distinct) values not ruled out. With ``replace`` every query's key is drawn anew, so no
    value is ruled out: 1 / pairs. Without, the keys asked are distinct and a value already
    answered is ruled out, so the k-th query is right with probability 1 / (pairs - k + 1):
    the mean over ``queries`` queries is (1 / pairs + ... + 1 / (pairs - queries + 1)) /
    queries, H(pairs) / pairs when every key is asked."""
    if replace:
        return 1 / pairs
    return sum(1 / (pairs - k) for k in range(queries)) / queries


def unbound_solved(pairs: int, queries: int, replace: bool) -> float:
    """The chance that the guess of :func:`unbound_accuracy` answers every query of a row:
    (1 / pairs) ** queries with ``replace``, else 1 / (pairs (pairs - 1) ... (pairs - queries
    + 1))."""
    if replace:
        return pairs**-queries
    return 1 / math.prod(range(pairs - queries + 1, pairs + 1))


def percent(value: float) -> str:
    return f"{100 * value:.0f}"


def cell_text(result: Score | None, steps: int) -> str:
    """Query accuracy [Wilson 95%] in %, and the step when the run stopped before ``steps``."""
    if result is None:
        return "-"
    low, high = result.query_interval
    text = f"{percent(result.correct / result.queries)} [{percent(low)}, {percent(high)}]"
    return text if result.step >= steps else f"{text} (step {result.step} of {steps})"


def rows_text(result: Score | None) -> str:
    if result is None:
        return "-"
    low, high = result.row_interval
    return f"{result.solved}/{result.rows} [{percent(low)}, {percent(high)}]"


def log_rows(run: Path) -> list[dict]:
    path = run / "train_log.csv"
    if not path.is_file():
        return []
    import csv

    with path.open() as handle:
        return list(csv.DictReader(handle))


def run_cell(cell: Cell, args: argparse.Namespace) -> None:
    """Train ``cell`` to ``args.steps`` (resuming), recording wall time and load."""
    out = args.runs / cell.name
    done = checkpoint_dirs(out) if out.is_dir() else []
    if done and int(done[-1].name.removeprefix("ckpt-")) >= args.steps:
        return
    meta_path = args.runs / "_meta" / f"{cell.name}.json"
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"sessions": []}
    print(f"training {cell.name}: {command(cell, args, out)}", flush=True)
    started, load_start = time.time(), os.getloadavg()[0]

    def report(info: dict) -> None:
        if info["step"] % 50 == 0 or info["step"] == info["steps"]:
            print(
                f"  {cell.name} step {info['step']}/{info['steps']} loss {info['loss']:.4f} "
                f"{info['tokens_per_s']:.0f} tok/s",
                flush=True,
            )

    # a run killed before its first checkpoint has nothing to resume: start it over
    restart = not done and out.is_dir() and any(out.iterdir())
    train(train_config(cell, args), out, resume=bool(done), force=restart, progress=report)
    meta["sessions"].append(
        {
            "started": time.strftime("%H:%M", time.localtime(started)),
            "wall_s": round(time.time() - started, 1),
            "load": [round(load_start, 1), round(os.getloadavg()[0], 1)],
        }
    )
    temporary = meta_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(meta))
    temporary.replace(meta_path)


def describe(cell: Cell, args: argparse.Namespace) -> dict:
    """Step time, loss and the recorded wall-clock sessions of ``cell``'s run."""
    out = args.runs / cell.name
    logged = log_rows(out)
    meta_path = args.runs / "_meta" / f"{cell.name}.json"
    sessions = json.loads(meta_path.read_text())["sessions"] if meta_path.is_file() else []
    return {
        "steps": int(logged[-1]["step"]) if logged else 0,
        "step_time_s": float(logged[-1]["elapsed_s"]) if logged else 0.0,
        "loss": float(logged[-1]["loss"]) if logged else float("nan"),
        "wall_s": sum(s["wall_s"] for s in sessions),
        "loads": [s["load"] for s in sessions],
        "command": command(cell, args, out),
    }


def parse_list(text: str, kind: type) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        message = f"expected a comma-separated list of {kind.__name__}, got {text!r}"
        raise InputError(message) from None
    if not values:
        raise InputError(f"expected at least one value, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mamba,memmamba,mamba2,transformer")
    parser.add_argument("--pairs", default="4,8,16,32")
    parser.add_argument("--lrs", default="3e-3", help="peak learning rates (comma-separated)")
    parser.add_argument(
        "--length", type=int, default=0, help="row length; 0: 2 x (pairs + queries)"
    )
    parser.add_argument("--vocab", type=int, default=0, help="0: 2 x pairs + 2")
    parser.add_argument("--queries", type=int, default=16, help="queries per row; 0: pairs")
    parser.add_argument(
        "--replace",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="query keys drawn with replacement (--no-replace: each key at most once)",
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--rows", type=int, default=128, help="test rows per cell")
    parser.add_argument("--runs", type=Path, default=Path("runs/mqar-capacity"))
    parser.add_argument("--out", type=Path, default=RESULTS / "mqar_capacity.md")
    parser.add_argument("--eval-only", action="store_true", help="train nothing")
    parser.add_argument("--curve", action="store_true", help="score every checkpoint")
    args = parser.parse_args(argv)
    models = parse_list(args.models, str)
    pairs = parse_list(args.pairs, int)
    lrs = parse_list(args.lrs, float)
    cells = [Cell(m, p, lr) for lr in lrs for p in pairs for m in models]
    for cell in cells:  # every setting is checked before any training starts
        config = train_config(cell, args)
        config.validate()
        build_config(cell.model, config.preset, **config.model_overrides())
    if not args.eval_only:
        for cell in cells:
            run_cell(cell, args)
    scores: dict[Cell, list[Score]] = {}
    for cell in cells:
        found = checkpoint_dirs(args.runs / cell.name) if (args.runs / cell.name).is_dir() else []
        chosen = found if args.curve else found[-1:]
        scores[cell] = [
            score(c, task_options(cell.pairs, args), row_length(cell, args), args.rows)
            for c in chosen
        ]
        if scores[cell]:
            print(f"{cell.name}: {cell_text(scores[cell][-1], args.steps)}", flush=True)
    write_report(args, models, pairs, lrs, cells, scores, argv)


def recipe_text(args: argparse.Namespace) -> str:
    """The row form of ``args`` in words."""
    words = args.vocab or "the smallest that holds the pairs, 2 x pairs + 2"
    asked = "with replacement (a key may be asked several times or never)"
    if not args.replace:
        asked = "of distinct keys (each key at most once)"
    where = (
        f"at random places in the rest of a row of {args.length} tokens (noise tokens 0 "
        "between them)"
        if args.length
        else "back to back after the pairs (the row is 2 x (pairs + queries) tokens)"
    )
    return (
        f"the pairs (vocabulary {words}: keys from the lower half, distinct values from the "
        f"upper half), then {args.queries or 'as many as the pairs'} queries, {asked}, each "
        f"followed by its answer, {where}; the loss is on the answers"
    )


def chance_text(args: argparse.Namespace) -> str:
    """The chance level of a query in words: one over the number of values."""
    if args.vocab:
        return f"1/{args.vocab - args.vocab // 2}"
    return "1/(pairs + 1)"


def unbound_text(args: argparse.Namespace) -> str:
    """What the *no binding* row means under ``args``."""
    if args.replace:
        return (
            "the expected query accuracy of a model that knows which values the row holds "
            "but not which key each belongs to: 1/n for n pairs, since each query's key is "
            "drawn anew and the answers already seen rule nothing out (rows solved: "
            "(1/n)^queries)."
        )
    return (
        "the expected query accuracy of a model that knows which values the row holds and "
        "which it has already answered, but not which key each value belongs to (it picks "
        "uniformly among the values not yet asked): (1 + 1/2 + ... + 1/n) / n for n pairs "
        "when every key is asked."
    )


def write_report(args, models, pairs, lrs, cells, scores, argv) -> None:
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    several = len(lrs) > 1
    label = "model, lr" if several else "model"
    title = "learning-rate sweep" if several else "accuracy against the number of key-value pairs"
    lines = [
        f"# MQAR capacity: {title}",
        "",
        ZOOLOGY,
        "",
        "## Ours",
        "",
        f"{args.n_layer}-layer models, d_model {args.d_model}, {args.steps} steps of "
        f"{args.batch_size} rows, seed {args.seed}, the same budget for every cell, trained "
        f"and tested on rows of the same form: {recipe_text(args)}. Query accuracy in % "
        f"[Wilson 95%] over {args.rows} test rows (rows x queries); chance (uniform over "
        f"the vocabulary's values) is {chance_text(args)}. "
        "'-': not trained; '(step S of N)': the run was stopped at step S (another budget).",
        "",
        f"| {label} | " + " | ".join(f"{p} pairs" for p in pairs) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    for lr in lrs:
        for model in models:
            found = [(scores.get(Cell(model, p, lr)) or [None])[-1] for p in pairs]
            row = [cell_text(result, args.steps) for result in found]
            name = f"{model}, {lr:g}" if several else model
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    row = [percent(unbound_accuracy(p, queries(p, args), args.replace)) for p in pairs]
    lines += [
        "| *no binding* | " + " | ".join(row) + " |",
        "",
        f"*No binding*: {unbound_text(args)} A cell at this level shows no key-value binding.",
        "",
        f"Rows solved (every query of the row right) of {args.rows} [Wilson 95%, %]:",
        "",
        f"| {label} | " + " | ".join(f"{p} pairs" for p in pairs) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    for lr in lrs:
        for model in models:
            row = [rows_text((scores.get(Cell(model, p, lr)) or [None])[-1]) for p in pairs]
            name = f"{model}, {lr:g}" if several else model
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    row = [f"{100 * unbound_solved(p, queries(p, args), args.replace):.2g}" for p in pairs]
    lines.append("| *no binding* (%) | " + " | ".join(row) + " |")
    if args.curve:
        lines += ["", "Query accuracy (%) by training step:", ""]
        for cell in cells:
            steps = ", ".join(
                f"{s.step}: {percent(s.correct / s.queries)}" for s in scores.get(cell, [])
            )
            lines.append(f"- {cell.name}: {steps or 'no checkpoint'}")
    lines += [
        "",
        "Training loss (mean cross-entropy over the answers of the step's batch, from "
        "train_log.csv) every 100 steps and at the last step logged"
        + (
            "; without binding it cannot go below ln(n) for n pairs "
            "(ln 4 = 1.39, ln 8 = 2.08, ln 16 = 2.77, ln 32 = 3.47), and a model that "
            "knows only the vocabulary's values sits at ln(number of values):"
            if args.replace
            else ":"
        ),
        "",
    ]
    for cell in cells:
        logged = log_rows(args.runs / cell.name)
        losses = ", ".join(
            f"{row['step']}: {float(row['loss']):.2f}"
            for row in logged
            if int(row["step"]) % 100 == 0 or row is logged[-1]
        )
        lines.append(f"- {cell.name}: {losses or 'not trained'}")
    lines += [
        "",
        "Runs (training time: the training's own clock over all its steps, `elapsed_s` in "
        "train_log.csv; wall: "
        "this script's clock over its training sessions, with the 1-minute load average at "
        "the start and end of each; the machine's 2 cores were shared with other jobs):",
        "",
        "| run | steps done | final training loss | training time (s) | wall (s) | load |",
        "|---|---|---|---|---|---|",
    ]
    for cell in cells:
        info = describe(cell, args)
        loads = "; ".join(f"{a}-{b}" for a, b in info["loads"]) or "-"
        wall = f"{info['wall_s']:.0f}" if info["wall_s"] else "-"
        lines.append(
            f"| {cell.name} | {info['steps']} | {info['loss']:.4f} | "
            f"{info['step_time_s']:.0f} | {wall} | {loads} |"
        )
    lines += ["", "Training commands (one per run; the script runs the same through the API):", ""]
    lines += [f"- `{describe(cell, args)['command']}`" for cell in cells]
    lines += [
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, load average "
        f"{load} when this file was written. Command: `python benchmarks/mqar_capacity.py "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        + "`.",
    ]
    write_text_atomically(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
