"""Does MemMamba retrieve further beyond its training length than the other models? The paper's
long-context claim (passkey at 400k tokens), tested at small scale.

For each model (by default the shipped ``memmamba``, ``mamba``, ``decimamba`` (the shipped
Mamba with decimation) and ``mamba2``; add checkpoints, training-run directories or shipped
names with ``--model label=path``, or replace the list with ``--models``), each task
(passkey with the standard filler, passkey with held-out natural text as filler, multi-key
key-value retrieval) and each context length given as a multiple of the model's own
training length (``--multiples``, default 1,4,16,64,200; or absolute ``--lengths``), it
scores ``--trials`` prompts at each of 5 needle depths by greedy exact match
(:func:`fidelity.metrics.retrieval.retrieval_accuracy`) with Wilson 95% intervals. Unless
``--no-memory``, it adds held-out byte perplexity and ETMF / ECLMF. It writes a markdown
report (default ``benchmarks/results/claim_small.md``) with one extrapolation table per task,
the rates by depth, plain "Answer" lines comparing the reference model (``--reference``,
default memmamba) with each other model at each multiple by non-overlapping intervals, and
the paper's own figures, quoted and labelled.

Every measured cell (one model x task x length) is one JSON file under ``--cache``/retrieval
(default ``runs/claim_cache``), written atomically and named by a hash of its key: the
model's identity (sha256 of its checkpoint's files, trainer state excepted, and its config)
and the settings (task, filler, length, trials, depths, seed). A cell is computed once; a
killed run loses at most the cell in progress; a changed checkpoint misses the cache. The
perplexity and memory measurements of a model are one directory under ``--cache``/memory,
keyed the same way. Options that bound this run's work (``--only``, ``--max-multiple``,
``--cached-only``) never change the report's shape: cells neither cached nor measured read
"not measured (reason)". The work of a cell grows linearly with its length, so with the
default multiples the 200x column is more than twice the work of 1x to 64x together.

    python benchmarks/claim_small.py                          # everything
    python benchmarks/claim_small.py --max-multiple 16        # extend later, one step at a time
    python benchmarks/claim_small.py --model sp=runs/sp-mamba --only sp --no-memory
    python benchmarks/claim_small.py --cached-only --no-memory   # re-render from the cache
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

import fidelity
from fidelity.atomic import atomic_directory, write_text_atomically
from fidelity.budget import MemoryBudgetError, check_fits, estimate_run
from fidelity.errors import InputError
from fidelity.lengths import format_length, parse_length
from fidelity.metrics.perplexity import perplexity
from fidelity.metrics.retrieval import DEFAULT_DEPTHS, retrieval_accuracy, wilson_interval
from fidelity.metrics.toolkit import resolve_chunk_size
from fidelity.models.base import CausalLM
from fidelity.probes.corpus import load_corpus, tokenize_corpus
from fidelity.probes.tokenizer import as_tokenizer
from fidelity.train import STATE_JSON, STATE_TENSORS, checkpoint_dirs

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = "memmamba,mamba,decimamba,mamba2"
DEFAULT_MULTIPLES = "1,4,16,64,200"
TASKS = {
    "passkey-standard": ("passkey", "standard"),
    "passkey-text": ("passkey", "text"),
    "kv": ("kv", None),
}
"""Table name -> (retrieval task, passkey filler)."""
TASK_TITLES = {
    "passkey-standard": 'Passkey, standard filler (the repeated "grass is green" sentence)',
    "passkey-text": "Passkey, held-out natural text as filler",
    "kv": "Key-value retrieval (as many 6-character keys with 5-digit values as fit)",
}
SEED = 1
CACHE_FORMAT = 1
TRAINER_FILES = {STATE_TENSORS, STATE_JSON}
"""Files of a training checkpoint that do not change the model (left out of its hash)."""
PROBES = {"text": "held-out text", "random": "random tokens"}


# -- models ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One model of the report: its ``label``, what the user gave (``source``), the model, its
    cache identity and its training length in tokens (None when its checkpoint records none)."""

    label: str
    source: str
    model: CausalLM
    identity: dict
    training_length: int | None


def parse_models(specs: Sequence[str]) -> dict[str, str]:
    """``label`` or ``label=path`` entries -> {label: path}; a bare label is a shipped name."""
    models: dict[str, str] = {}
    for spec in specs:
        label, _, path = spec.partition("=")
        if not label or not re.fullmatch(r"[\w.+-]+", label):
            raise InputError(
                f"a model is label or label=path (label: letters, digits, ._+-), got {spec!r}"
            )
        models[label] = path or label
    if not models:
        raise InputError("no models: give --models and/or --model")
    return models


def resolve(source: str) -> str:
    """A training-run directory becomes its newest complete checkpoint; anything else (a
    checkpoint directory, a shipped name) is passed through."""
    found = checkpoint_dirs(Path(source)) if Path(source).is_dir() else []
    return str(found[-1]) if found else source


def files_digest(directory: Path) -> str:
    """sha256 over the names and bytes of the files in a checkpoint ``directory`` (hidden files
    and the trainer state, which does not change the model, left out)."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in TRAINER_FILES:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def model_identity(model: CausalLM, label: str) -> dict:
    """What the cache keys a model on: the sha256 of its checkpoint's files and its config
    (which holds what a derived model, e.g. DeciMamba over the shipped Mamba, adds)."""
    checkpoint = model.provenance.get("checkpoint")
    if checkpoint is None or not Path(checkpoint).is_dir():
        raise InputError(f"model {label!r} has no checkpoint directory behind it (untrained?)")
    return {
        "class": type(model).__name__,
        "config": model.config.to_dict(),
        "sha256": files_digest(Path(checkpoint)),
    }


def load_entries(models: dict[str, str]) -> list[Entry]:
    """Load every model (refusing one without a checkpoint) and take its identity."""
    entries = []
    for label, source in models.items():
        model = fidelity.load_model(resolve(source))
        length = model.provenance.get("training", {}).get("length")
        entries.append(
            Entry(
                label, source, model, model_identity(model, label), int(length) if length else None
            )
        )
    return entries


def state_passing(model: CausalLM) -> str:
    """How the model was trained with respect to state passing, and where that is recorded:
    the checkpoint's training meta, its run's train_config.json, or the recorded command."""
    training = model.provenance.get("training", {})
    if "state_passing" in training:
        return f"{training['state_passing']} (checkpoint meta)"
    run_config = Path(model.provenance.get("checkpoint", "")).parent / "train_config.json"
    if run_config.is_file():
        config = json.loads(run_config.read_text())
        if isinstance(config, dict) and "state_passing" in config:
            init = f", started from {config['init']}" if config.get("init") else ""
            return f"{config['state_passing']} ({run_config}{init})"
    command = training.get("command")
    if command:
        found = re.search(r"--state-passing[ =](\S+)", command)
        return f"{found[1] if found else 'off'} (training command)"
    return "unknown (not recorded)"


def recipe(entry: Entry) -> str:
    """One line on how ``entry`` was trained, from its checkpoint's training meta."""
    provenance = entry.model.provenance
    training = provenance.get("training", {})
    parts = [f"{entry.model.num_parameters():,} parameters"]
    if "derived_from" in provenance:
        parts.append(f"derived from {provenance['derived_from']} (no training of its own)")
    if entry.training_length:
        parts.append(f"trained at {entry.training_length} tokens")
    for name, text in (("steps", "{} steps"), ("step", "step {}"), ("tokens", "{:,} tokens")):
        if name in training and not (name == "step" and "steps" in training):
            parts.append(text.format(training[name]))
    if "task" in training:
        options = training.get("task_options") or {}
        parts.append(f"task {training['task']}" + (f" {json.dumps(options)}" if options else ""))
    parts.append(f"state passing: {state_passing(entry.model)}")
    if "command" in training:
        parts.append(f"`{training['command']}`")
    return "; ".join(parts)


# -- cells ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """A column of the table: ``value`` times each model's training length (``multiple``) or
    ``value`` tokens."""

    value: float
    multiple: bool

    @property
    def heading(self) -> str:
        return f"{self.value:g}x" if self.multiple else format_length(int(self.value))

    def length(self, training_length: int | None) -> int | None:
        """Tokens at this point for a model trained at ``training_length``."""
        if not self.multiple:
            return int(self.value)
        return max(1, round(self.value * training_length)) if training_length else None


@dataclass
class Cell:
    """One model x task x point: its rows (:data:`fidelity.metrics.retrieval.FRAME_COLUMNS`)
    once measured or read from the cache, else why not."""

    entry: Entry
    task: str
    point: Point
    length: int | None
    frame: pd.DataFrame | None = None
    reason: str | None = None
    cost: str | None = None

    @property
    def multiple(self) -> float | None:
        training = self.entry.training_length
        return self.length / training if self.length and training else None

    def key(self, trials: int) -> dict:
        task, filler = TASKS[self.task]
        return {
            "format": CACHE_FORMAT,
            "model": self.entry.identity,
            "task": task,
            "filler": filler,
            "length": self.length,
            "trials": trials,
            "depths": list(DEFAULT_DEPTHS),
            "seed": SEED,
        }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cell_path(cache: Path, cell: Cell, trials: int) -> Path:
    return cache / "retrieval" / f"{cell.task}-{cell.length}-{key_hash(cell.key(trials))}.json"


def read_cell(path: Path, key: dict) -> dict | None:
    """The cached record at ``path`` if it holds ``key``, else None."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == key else None


def measure_cell(
    model: CausalLM,
    task: str,
    length: int,
    trials: int,
    progress: Callable[[int, int], None],
    rows: int | None = None,
) -> pd.DataFrame:
    """Exact match and digit accuracy of ``model`` on table ``task`` at ``length`` tokens:
    ``trials`` prompts at each of :data:`DEFAULT_DEPTHS` (rows of ``retrieval_accuracy``),
    read ``rows`` at a time (None: all at once)."""
    name, filler = TASKS[task]
    return retrieval_accuracy(
        model,
        name,
        lengths=[length],
        trials=trials,
        seed=SEED,
        filler=filler,
        progress=progress,
        rows_per_pass=rows,
    )


@functools.cache
def heldout_tokens() -> int:
    """Bytes of the default corpus's held-out split (the passkey text filler's source)."""
    return int(tokenize_corpus(load_corpus(None, split="heldout"), as_tokenizer(None)).ids.shape[0])


@dataclass(frozen=True)
class Bounds:
    """What this run may measure: ``only`` labels (None: all), the largest multiple per task,
    or nothing (``cached_only``)."""

    only: frozenset[str] | None
    max_multiple: dict[str, float]
    cached_only: bool

    def refusal(self, cell: Cell) -> str | None:
        """Why ``cell`` is not measured in this run, or None when it may be."""
        if self.cached_only:
            return "not in the cache; --cached-only"
        if self.only is not None and cell.entry.label not in self.only:
            return "not in the cache; not in --only"
        limit = self.max_multiple.get(cell.task, self.max_multiple.get("", float("inf")))
        if limit < float("inf"):
            if cell.multiple is None:
                return "no training length to apply --max-multiple to"
            if cell.multiple > limit + 1e-9:
                return f"beyond --max-multiple {limit:g}"
        return None


def plan_cells(entries: list[Entry], tasks: list[str], points: list[Point]) -> list[Cell]:
    """Every cell of the report, shortest contexts first (so a bounded run fills the table
    from the left)."""
    cells = [
        Cell(entry, task, point, point.length(entry.training_length))
        for point in points
        for task in tasks
        for entry in entries
    ]
    return sorted(cells, key=lambda cell: (cell.length or 0, tasks.index(cell.task)))


def fill_cell(cell: Cell, cache: Path, trials: int, bounds: Bounds, clock: Clock) -> None:
    """Read ``cell`` from the cache, or measure and cache it, or say why not."""
    key = cell.key(trials)
    path = cell_path(cache, cell, trials)
    record = read_cell(path, key)
    if record is None:
        cell.reason = bounds.refusal(cell) or fit_refusal(cell, trials)
        if cell.reason is not None:
            return
        record = measure_record(cell, key, trials, clock)
        if record is None:
            return
        write_text_atomically(path, json.dumps(record, indent=1))
        clock.say(f"{describe_cell(cell)}: cached in {path}")
    cell.frame = pd.DataFrame(record["rows"])
    cell.cost = f"{record['elapsed_s']:.0f} s at load {record['load'][0]:.1f}"


def measure_record(cell: Cell, key: dict, trials: int, clock: Clock) -> dict | None:
    """Measure ``cell``; return its cache record (rows, time, load), or None with
    ``cell.reason`` set when the model or length refuses it (e.g. too short for the prompt)."""
    name = describe_cell(cell)
    clock.say(f"{name}: measuring")
    started = time.perf_counter()
    try:
        frame = measure_cell(
            cell.entry.model,
            cell.task,
            cell.length,
            trials,
            lambda done, total: clock.say(f"{name}: depth {done}/{total} done"),
            rows_per_pass(cell, trials),
        )
    except InputError as error:
        cell.reason = str(error)
        clock.say(f"{name}: not measured ({error})")
        return None
    return {
        "key": key,
        "label": cell.entry.label,
        "source": cell.entry.source,
        "rows": json.loads(frame.to_json(orient="records")),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "load": list(os.getloadavg()),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def describe_cell(cell: Cell) -> str:
    return f"{cell.entry.label} {cell.task} {cell.point.heading} ({format_length(cell.length)})"


def fit_refusal(cell: Cell, trials: int) -> str | None:
    """Why ``cell`` cannot be measured at all (no length, not enough held-out text, more
    memory than is available even one prompt at a time), or None."""
    if cell.length is None:
        return "no training length recorded; use --lengths"
    if cell.task == "passkey-text" and cell.length > heldout_tokens():
        return f"the held-out text holds {format_length(heldout_tokens())} tokens"
    try:
        rows_per_pass(cell, trials)
    except MemoryBudgetError as error:
        return f"memory: {error}".split("; use ")[0]
    return None


def rows_per_pass(cell: Cell, trials: int) -> int:
    """Prompts of ``cell`` read in one forward: all ``trials`` when their estimated memory
    fits, else one (``MemoryBudgetError`` when even one does not)."""
    model = cell.entry.model
    chunkable = getattr(model, "chunkable", False)
    chunk = resolve_chunk_size(model, "auto", cell.length) if chunkable else None

    def check(rows: int) -> int:
        check_fits(
            estimate_run(
                model, cell.length, batch=rows, n_positions=0, n_layers_kept=0, chunk_size=chunk
            )
        )
        return rows

    try:
        return check(trials)
    except MemoryBudgetError:
        return check(1)


class Clock:
    """Prints progress lines with the elapsed time and the machine's load."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def say(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:7.0f} s, load {os.getloadavg()[0]:.1f}] {message}", flush=True)


# -- perplexity and memory fidelity ---------------------------------------------------------------
@dataclass
class Memory:
    """Perplexity rows and ETMF/ECLMF results (by probe name) of one model at ``analysis_length``
    tokens, or why they were not measured."""

    analysis_length: int
    ppl: pd.DataFrame | None = None
    results: dict[str, fidelity.FidelityResult] | None = None
    reason: str | None = None


def memory_key(entry: Entry, args: argparse.Namespace) -> dict:
    """The model's identity and the memory settings, lengths as multiples of its training
    length (validated to exist before the run starts)."""
    base = entry.training_length
    return {
        "format": CACHE_FORMAT,
        "model": entry.identity,
        "ppl_lengths": [max(1, round(m * base)) for m in args.ppl_multiples],
        "ppl_sequences": args.ppl_sequences,
        "analysis_length": max(1, round(args.analysis_multiple * base)),
        "anchors": args.anchors,
    }


def read_memory(directory: Path, key: dict) -> Memory | None:
    """The cached memory measurements in ``directory`` if they hold ``key``, else None."""
    if not (directory / "key.json").is_file():
        return None
    if json.loads((directory / "key.json").read_text()) != key:
        return None
    results = {
        name: fidelity.FidelityResult.load(directory / slug(name)) for name in PROBES.values()
    }
    ppl = pd.read_csv(directory / "perplexity.csv")
    return Memory(key["analysis_length"], ppl, results)


def measure_memory(entry: Entry, key: dict, clock: Clock) -> Memory:
    """Held-out perplexity at ``key["ppl_lengths"]`` and ETMF/ECLMF on each probe."""
    lengths = ", ".join(map(format_length, key["ppl_lengths"]))
    clock.say(f"{entry.label}: perplexity at {lengths}")
    ppl = perplexity(entry.model, key["ppl_lengths"], n_sequences=key["ppl_sequences"], seed=2)
    results = {}
    for probe, name in PROBES.items():
        clock.say(f"{entry.label}: ETMF / ECLMF on {name}, {format_length(key['analysis_length'])}")
        results[name] = fidelity.analyze(
            entry.model,
            key["analysis_length"],
            probe=probe,
            anchors=key["anchors"],
            progress=False,
            metrics="etmf,eclmf",
            seed=3,
        )
    return Memory(key["analysis_length"], ppl, results)


def fill_memory(entry: Entry, args: argparse.Namespace, clock: Clock) -> Memory:
    """Perplexity and ETMF/ECLMF of ``entry``: from the cache, measured and cached, or why not."""
    key = memory_key(entry, args)
    directory = args.cache / "memory" / key_hash(key)
    found = read_memory(directory, key)
    if found is not None:
        return found
    bounds = args.bounds
    if bounds.cached_only or (bounds.only is not None and entry.label not in bounds.only):
        reason = "not in the cache; " + ("--cached-only" if bounds.cached_only else "not in --only")
        return Memory(key["analysis_length"], reason=reason)
    memory = measure_memory(entry, key, clock)
    with atomic_directory(directory, check_memory_target) as staging:
        memory.ppl.to_csv(staging / "perplexity.csv", index=False)
        for name, result in memory.results.items():
            result.save(staging / slug(name))
        (staging / "key.json").write_text(json.dumps(key))
    return memory


def check_memory_target(target: Path) -> None:
    """Refuse to replace a directory this tool did not write (one without a key.json)."""
    if target.exists() and not (target / "key.json").is_file():
        raise InputError(f"{target} exists and is not a claim_small cache entry; not replacing it")


def slug(name: str) -> str:
    return "memory-" + name.replace(" ", "-")


# -- the report -----------------------------------------------------------------------------------
def interval(value: float, low: float, high: float, digits: int = 2) -> str:
    if value != value:
        return "-"
    if low != low or high != high:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def pooled(frame: pd.DataFrame, task: str) -> tuple[int, int]:
    """(exact-match successes, trials) of a cell's rows, pooled over depths."""
    rows = frame[frame["metric"] == f"{TASKS[task][0]}_acc"]
    return round(float((rows["value"] * rows["n"]).sum())), int(rows["n"].sum())


def accuracy(cell: Cell) -> tuple[float, float, float] | None:
    """Pooled exact match of ``cell`` with its Wilson 95% interval; None when not measured."""
    if cell.frame is None:
        return None
    hits, n = pooled(cell.frame, cell.task)
    return hits / n, *wilson_interval(hits, n)


def cell_text(cell: Cell) -> str:
    """A table entry: accuracy [interval] and the other coordinate, or "not measured (why)"."""
    stats = accuracy(cell)
    if stats is None:
        return f"not measured ({cell.reason})"
    if cell.point.multiple:
        return f"{interval(*stats)} ({format_length(cell.length)})"
    return interval(*stats) + (f" ({cell.multiple:g}x)" if cell.multiple else "")


def extrapolation_table(cells: list[Cell], entries: list[Entry], points: list[Point]) -> str:
    """Rows = models, columns = points: exact match [Wilson 95%] of one task."""
    lookup = {(c.entry.label, c.point): c for c in cells}
    header = "| model | trained at | " + " | ".join(p.heading for p in points) + " |"
    lines = [header, "|---" * (len(points) + 2) + "|"]
    for entry in entries:
        trained = format_length(entry.training_length) if entry.training_length else "?"
        texts = [cell_text(lookup[entry.label, point]) for point in points]
        lines.append(f"| {entry.label} | {trained} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def depth_table(cells: list[Cell], entries: list[Entry]) -> str:
    """Exact-match hits / trials by needle depth for every measured cell of one task, model by
    model, shortest first."""
    order = {entry.label: index for index, entry in enumerate(entries)}
    depths = " | ".join(f"depth {d:g}" for d in DEFAULT_DEPTHS)
    lines = [
        f"| model | multiple | length | {depths} | all | measured in |",
        "|---" * (len(DEFAULT_DEPTHS) + 5) + "|",
    ]
    for cell in sorted(cells, key=lambda c: (order[c.entry.label], c.length or 0)):
        if cell.frame is None:
            continue
        rows = cell.frame[cell.frame["metric"] == f"{TASKS[cell.task][0]}_acc"]
        texts = [f"{round(r.value * r.n)}/{r.n}" for r in rows.sort_values("depth").itertuples()]
        multiple = f"{cell.multiple:g}x" if cell.multiple else "?"
        hits, n = pooled(cell.frame, cell.task)
        lines.append(
            f"| {cell.entry.label} | {multiple} | {format_length(cell.length)} | "
            + " | ".join(texts)
            + f" | {hits}/{n} | {cell.cost} |"
        )
    return "\n".join(lines)


def compare(a: tuple[float, float, float], b: tuple[float, float, float]) -> str:
    """ "higher than" / "lower than" when the intervals do not overlap, else "not
    distinguishable from"."""
    if a[1] > b[2]:
        return "higher than"
    if b[1] > a[2]:
        return "lower than"
    return "not distinguishable from"


def answer_lines(
    cells: list[Cell], entries: list[Entry], points: list[Point], reference: str
) -> list[str]:
    """The reference model against each other model at each point, for one task."""
    lookup = {(c.entry.label, c.point): c for c in cells}
    if reference not in {entry.label for entry in entries}:
        return [f"- No model is labelled {reference!r}; nothing to compare."]
    unmeasured = [
        lookup[reference, point] for point in points if accuracy(lookup[reference, point]) is None
    ]
    if len(unmeasured) == len(points):
        return [f"- not compared: {reference} not measured ({unmeasured[0].reason})."]
    lines = []
    for entry in entries:
        if entry.label == reference:
            continue
        for point in points:
            ours, theirs = lookup[reference, point], lookup[entry.label, point]
            where = (
                f"{reference} vs {entry.label} at {point.heading} "
                f"({describe(ours)} vs {describe(theirs)})"
            )
            a, b = accuracy(ours), accuracy(theirs)
            if a is None or b is None:
                missing = ours if a is None else theirs
                label, reason = missing.entry.label, missing.reason
                lines.append(f"- {where}: not compared, {label} not measured ({reason}).")
                continue
            verdict = f"{reference} {interval(*a)} is {compare(a, b)} {entry.label} {interval(*b)}"
            lines.append(f"- {where}: {verdict}.")
    return lines


def describe(cell: Cell) -> str:
    """Where a cell sits: its length, and its multiple in --lengths mode."""
    if cell.length is None:
        return "?"
    if cell.point.multiple or cell.multiple is None:
        return format_length(cell.length)
    return f"{format_length(cell.length)}, {cell.multiple:g}x"


def paper_section(entries: list[Entry]) -> list[str]:
    """The paper's figures, quoted from shared/paper-notes.md and labelled as the paper's."""
    sizes = ", ".join(f"{e.label} {e.model.num_parameters() / 1e6:.1f}M" for e in entries)
    trained = sorted({e.training_length for e in entries if e.training_length})
    return [
        "## The paper's figures (quoted, not ours)",
        "",
        "MemMamba (Wang et al., arXiv 2510.03279) reports, for ~200M-parameter models trained on",
        "PG19 at about 8k tokens (24 layers by a third-party reading):",
        "",
        "| what | MemMamba | DeciMamba | Mamba |",
        "|---|---|---|---|",
        "| passkey retrieval at 400k tokens (~50x the training length) | 90% | 60% | 0% |",
        "| document retrieval, 200 noise documents | 0.24 | 0.12 | about 0 |",
        "| PG19 perplexity at 60k | 17.35 | > 100 | > 100 |",
        "",
        "Pythia fails at long lengths in the same passkey test. No code or weights were released.",
        "",
        f"Scale difference: our models have {sizes} parameters and were trained at "
        f"{', '.join(format_length(t) for t in trained) or 'unrecorded'} tokens (recipes above). "
        "The paper's 400k is about 50x its training length: compare it with our columns near "
        "50x. The comparison is of shape (who holds on longer), not of size.",
    ]


def memory_section(memory: dict[str, Memory], reference: str) -> list[str]:
    """Perplexity and ETMF/ECLMF tables, with contiguous-length answer lines."""
    lines = [
        "## Perplexity on held-out text (byte level)",
        "",
        "| model | context | perplexity |",
        "|---|---|---|",
    ]
    for label, found in memory.items():
        if found.ppl is None:
            lines.append(f"| {label} | - | not measured ({found.reason}) |")
            continue
        for _, row in (
            found.ppl[found.ppl["metric"] == "perplexity"].sort_values("length").iterrows()
        ):
            lines.append(
                f"| {label} | {format_length(int(row['length']))} | "
                f"{interval(row['value'], row['ci_low'], row['ci_high'])} |"
            )
    for name in PROBES.values():
        lines += ["", f"## Memory fidelity on {name}", "", *memory_table(memory, name)]
    return [*lines, "", "Answer (ETMF):", "", *memory_answers(memory, reference)]


def memory_table(memory: dict[str, Memory], name: str) -> list[str]:
    lines = [
        "| model | length | layer | ETMF half-life (tokens) | contiguous length (tokens) | "
        "ECLMF_norm embeddings->last layer |",
        "|---|---|---|---|---|---|",
    ]
    for label, found in memory.items():
        if found.results is None:
            lines.append(f"| {label} | - | - | not measured ({found.reason}) | | |")
            continue
        result = found.results[name]
        summary = result.summary
        top = summary["layer"].max()
        for _, row in summary[summary["layer"] > 0].iterrows():
            ends = [row[f"contiguous_length{end}"] for end in ("", "_low", "_high")]
            eclmf = eclmf_to_last_layer(result.frame) if row["layer"] == top else ""
            lines.append(
                f"| {label} | {format_length(found.analysis_length)} | {int(row['layer'])} | "
                f"{interval(row['half_life'], row['half_life_low'], row['half_life_high'], 1)} | "
                f"{interval(*ends, 0)} | {eclmf} |"
            )
    return lines


def eclmf_to_last_layer(frame: pd.DataFrame) -> str:
    """Normalized ECLMF from the embeddings to the last layer, with its interval, as text."""
    eclmf = frame[(frame["metric"] == "eclmf_norm") & (frame["source_layer"] == 0)]
    last = eclmf[eclmf["layer"] == eclmf["layer"].max()]
    if not len(last):
        return "-"
    row = last.iloc[0]
    return interval(row["value"], row["ci_low"], row["ci_high"])


def memory_answers(memory: dict[str, Memory], reference: str) -> list[str]:
    """Last-layer contiguous length of the reference against each other model, per probe."""
    if memory.get(reference) is None or memory[reference].results is None:
        return [f"- {reference}: memory fidelity not measured; nothing to compare."]
    lines = []
    for name in PROBES.values():
        ours = top_contiguous(memory[reference].results[name])
        for label, found in memory.items():
            if label == reference or found.results is None:
                continue
            theirs = top_contiguous(found.results[name])
            word = compare(ours, theirs).replace("higher", "longer").replace("lower", "shorter")
            lines.append(
                f"- last-layer contiguous length on {name}: {reference} {interval(*ours, 0)} "
                f"tokens is {word} {label} {interval(*theirs, 0)}."
            )
    return lines


def top_contiguous(result: fidelity.FidelityResult) -> tuple[float, float, float]:
    summary = result.summary
    row = summary[summary["layer"] == summary["layer"].max()].iloc[0]
    return tuple(float(row[f"contiguous_length{end}"]) for end in ("", "_low", "_high"))


def report(
    args: argparse.Namespace,
    entries: list[Entry],
    cells: list[Cell],
    memory: dict[str, Memory] | None,
    load: tuple[float, float],
) -> str:
    """The markdown report."""
    points = args.points
    lines = [
        "# MemMamba's long-context claim at small scale: retrieval beyond the training length",
        "",
        f"Regenerate: `python benchmarks/claim_small.py {shlex.join(content_arguments(args))}`"
        " (measures every cell; cells already in the cache are read from it).",
        f"This run: `python benchmarks/claim_small.py {shlex.join(args.argv)}`",
        "",
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; 1-minute load {load[0]:.1f} at the start and {load[1]:.1f} at "
        f"the end{backend_note()}. Prompts per needle depth: {args.trials} (depths "
        f"{', '.join(f'{d:g}' for d in DEFAULT_DEPTHS)}), so {args.trials * len(DEFAULT_DEPTHS)} "
        "per cell; exact match of the greedy answer with Wilson 95% intervals. Cells read from "
        "the cache were measured earlier: the by-depth tables give each cell's time and load.",
        "",
        "## Models",
        "",
        *[f"- **{e.label}** = `{e.source}`: {recipe(e)}" for e in entries],
        "",
    ]
    for task in args.tasks:
        task_cells = [c for c in cells if c.task == task]
        lines += [
            f"## {TASK_TITLES[task]}",
            "",
            "Exact match [Wilson 95%] at each "
            + (
                "multiple of the model's training length (length in brackets)."
                if points[0].multiple
                else "length (multiple of the training length in brackets)."
            ),
            "",
            extrapolation_table(task_cells, entries, points),
            "",
            "By needle depth (exact-match hits / trials; 0: needle first, 1: last):",
            "",
            depth_table(task_cells, entries),
            "",
            f"Answer ({task}):",
            "",
            *answer_lines(task_cells, entries, points, args.reference),
            "",
        ]
    if memory is not None:
        lines += [*memory_section(memory, args.reference), ""]
    return "\n".join([*lines, *paper_section(entries), ""])


def backend_note() -> str:
    """The scan backend forced through the environment, if any (it changes speed, not results
    beyond float rounding)."""
    forced = os.environ.get("FIDELITY_SCAN_BACKEND")
    return f"; scan backend forced with FIDELITY_SCAN_BACKEND={forced}" if forced else ""


def content_arguments(args: argparse.Namespace) -> list[str]:
    """The options that decide what the report holds (not how much of it this run measures)."""
    arguments = [
        "--models",
        ",".join(
            f"{label}={path}" if label != path else label for label, path in args.models.items()
        ),
    ]
    arguments += ["--lengths", args.lengths] if args.lengths else ["--multiples", args.multiples]
    arguments += ["--tasks", ",".join(args.tasks), "--trials", str(args.trials)]
    if args.no_memory:
        arguments.append("--no-memory")
    else:
        arguments += [
            "--ppl-multiples",
            ",".join(f"{m:g}" for m in args.ppl_multiples),
            "--analysis-multiple",
            f"{args.analysis_multiple:g}",
            "--ppl-sequences",
            str(args.ppl_sequences),
            "--anchors",
            str(args.anchors),
        ]
    return arguments


# -- command line ---------------------------------------------------------------------------------
def positive_numbers(text: str, option: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 or v == float("inf") for v in values):
        raise InputError(f"{option} takes positive numbers, got {text!r}")
    return values


def parse_max_multiple(specs: Sequence[str]) -> dict[str, float]:
    """``N`` (every task) or ``TASK=N`` entries -> {task or "": N}."""
    limits = {}
    for spec in specs:
        task, _, value = spec.rpartition("=")
        if task and task not in TASKS:
            raise InputError(
                f"--max-multiple TASK=N takes a task of {', '.join(TASKS)}, got {task!r}"
            )
        limits[task] = positive_numbers(value, "--max-multiple")[0]
    return limits


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help="label or label=path entries (checkpoint dir, training-run dir or shipped name)",
    )
    parser.add_argument(
        "--model", action="append", default=[], help="one more label=path (repeatable)"
    )
    points = parser.add_mutually_exclusive_group()
    points.add_argument(
        "--multiples", default=DEFAULT_MULTIPLES, help="multiples of each model's training length"
    )
    points.add_argument("--lengths", help="absolute context lengths instead, e.g. 2k,8k")
    parser.add_argument("--tasks", default=",".join(TASKS), help="tables: " + ", ".join(TASKS))
    parser.add_argument(
        "--trials", type=int, default=10, help="prompts per needle depth (5 depths)"
    )
    parser.add_argument(
        "--reference", default="memmamba", help="label the answer lines compare with the others"
    )
    parser.add_argument("--only", help="measure only these labels (the others come from the cache)")
    parser.add_argument(
        "--max-multiple",
        action="append",
        default=[],
        metavar="[TASK=]N",
        help="measure cells up to N x the training length (repeatable; TASK=N for one task)",
    )
    parser.add_argument(
        "--cached-only", action="store_true", help="measure nothing; render the cache"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="leave out perplexity and ETMF/ECLMF"
    )
    parser.add_argument("--ppl-multiples", default="1,4,8", help="perplexity lengths (multiples)")
    parser.add_argument("--ppl-sequences", type=int, default=4, help="text windows per length")
    parser.add_argument("--anchors", type=int, default=512, help="ETMF anchors per probe")
    parser.add_argument("--analysis-multiple", default="4", help="ETMF/ECLMF length (a multiple)")
    parser.add_argument("--out", type=Path, default=RESULTS / "claim_small.md")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("runs/claim_cache"),
        help="retrieval/: one JSON file per measured cell; memory/: one directory per model",
    )
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.models = parse_models(
        [*args.models.split(","), *args.model] if args.models else args.model
    )
    args.tasks = [task for task in args.tasks.split(",") if task]
    unknown = [task for task in args.tasks if task not in TASKS]
    if unknown or not args.tasks:
        raise InputError(
            f"--tasks takes some of {', '.join(TASKS)}, got {','.join(unknown) or 'none'}"
        )
    if min(args.trials, args.ppl_sequences, args.anchors) < 1:
        raise InputError("--trials, --ppl-sequences and --anchors must be positive")
    if args.lengths:
        args.points = [Point(float(parse_length(x)), False) for x in args.lengths.split(",")]
    else:
        args.points = [Point(v, True) for v in positive_numbers(args.multiples, "--multiples")]
    args.ppl_multiples = positive_numbers(args.ppl_multiples, "--ppl-multiples")
    args.analysis_multiple = positive_numbers(args.analysis_multiple, "--analysis-multiple")[0]
    only = {label for label in (args.only or "").split(",") if label}
    if only - set(args.models):
        raise InputError(
            f"--only names unknown labels: {', '.join(sorted(only - set(args.models)))}"
        )
    args.bounds = Bounds(
        frozenset(only) if args.only is not None else None,
        parse_max_multiple(args.max_multiple),
        args.cached_only,
    )
    return args


def run(argv: Sequence[str]) -> str:
    """Measure what is missing and allowed, write the report to ``--out``; return it."""
    args = parse_arguments(argv)
    clock = Clock()
    load = os.getloadavg()[0]
    entries = load_entries(args.models)
    missing = [e.label for e in entries if e.training_length is None]
    if missing and (args.points[0].multiple or not args.no_memory):
        raise InputError(
            f"{', '.join(missing)}: no training length recorded in the checkpoint, so no "
            "multiples of it; use --lengths with --no-memory"
        )
    cells = plan_cells(entries, args.tasks, args.points)
    for cell in cells:
        fill_cell(cell, args.cache, args.trials, args.bounds, clock)
    memory = None
    if not args.no_memory:
        memory = {entry.label: fill_memory(entry, args, clock) for entry in entries}
    text = report(args, entries, cells, memory, (load, os.getloadavg()[0]))
    write_text_atomically(args.out, text)
    clock.say(f"wrote {args.out}")
    return text


def run_main(run: Callable[[Sequence[str]], str], argv: Sequence[str] | None) -> int:
    """Print what ``run`` returns for ``argv`` (the command line by default); bad input is one
    line on stderr and status 2."""
    try:
        print(run(sys.argv[1:] if argv is None else argv))
    except (InputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
