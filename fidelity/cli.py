"""The ``fidelity`` command: a thin shell over the Python API.

Every command parses and validates its arguments (destinations included) before any work,
calls the API, and prints. Bad input (:class:`fidelity.errors.InputError` and the few expected
errors in :data:`USER_ERRORS`) exits with status 2 and one line on stderr saying what was wrong
and what is accepted. Anything else is a bug: status 1 and one "internal error" line naming the
file that holds the traceback. ``--debug`` shows the traceback instead. SIGTERM is handled like
Ctrl-C: the work stops, half-written output is removed, status 130.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fidelity.errors import InputError
from fidelity.lengths import format_length, parse_length

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Measure how sequence models forget: ETMF (along the sequence) and ECLMF (up the "
    "stack) for Mamba, MemMamba and Transformers.",
)
console = Console(stderr=True)
out = Console()

USER_ERRORS = (
    InputError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
"""Errors that mean bad input or a bad destination: exit 2, one line (and
:class:`fidelity.budget.MemoryBudgetError`, see :func:`_user_errors`). Anything else is a bug."""


def _user_errors() -> tuple[type[Exception], ...]:
    """:data:`USER_ERRORS`, with ``MemoryBudgetError`` once :mod:`fidelity.budget` is loaded
    (it imports torch, which the command line leaves to the commands that need it: ``analyze``
    starts its figure worker first)."""
    budget = sys.modules.get("fidelity.budget")
    return USER_ERRORS if budget is None else (*USER_ERRORS, budget.MemoryBudgetError)


def _click_class(name: str) -> type[Exception]:
    """The exception class ``name`` of the click that typer runs on: click itself for typer
    < 0.2x, typer's own copy of it (``typer._click``) since; found through the bases of
    ``typer.BadParameter``, which both expose, so click need not be installed."""
    for base in typer.BadParameter.__mro__:
        if base.__name__ == name:
            return base
    raise ImportError(f"typer {typer.__version__} has no click {name}")


# Errors in the command line itself (unknown option or command, missing or bad value).
COMMAND_LINE_ERRORS = _click_class("ClickException")
_debug = False
EARLY_PROBE_TOKENS = 1 << 20
"""Synthetic probes up to this length are built (and checked) before the model loads."""


THREADS_HELP = (
    "CPU threads: auto (the cores idle at the start; OMP_NUM_THREADS, when set, wins) or a number."
)


def _threads_line(chosen: tuple[int, str]) -> str:
    """``"2 CPU threads (auto: 2 of 2 cores idle)"`` from :func:`fidelity.threads.set_threads`."""
    threads, why = chosen
    return f"{threads} CPU thread{'s' if threads != 1 else ''} ({why})"


def _fail(message: str) -> None:
    raise InputError(message)


def _as_input(check, *args, **kwargs):
    """``check(*args, **kwargs)`` for a value the user gave, its ValueError an InputError."""
    try:
        return check(*args, **kwargs)
    except InputError:
        raise
    except ValueError as error:
        raise InputError(str(error)) from None


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks of errors (allowed anywhere).")
    ] = False,
) -> None:
    """Options for every command."""
    del debug  # handled in main() so that it works in any position


def _split(values: str | None, cast=str) -> list | None:
    if values is None:
        return None
    try:
        return [cast(v.strip()) for v in values.split(",") if v.strip()]
    except ValueError:
        _fail(f"invalid list {values!r}: expected comma-separated values, e.g. 0,2,4")
        return None


@app.command()
def analyze(
    model: Annotated[str, typer.Option(help="Registered model name or checkpoint directory.")],
    length: Annotated[str, typer.Option(help="Tokens per sequence, e.g. 8k, 60k, 400000.")],
    probe: Annotated[
        str,
        typer.Option(help="text | passkey | kv | random | induction | selective_copy | mqar"),
    ] = "text",
    text: Annotated[
        Path | None,
        typer.Option(help="Text file or directory for the text probe (.txt, .md, .jsonl)."),
    ] = None,
    text_field: Annotated[str, typer.Option(help="The text field of .jsonl records.")] = "text",
    metrics: Annotated[
        str,
        typer.Option(
            help="Comma-separated: etmf, eclmf, ssm_decay, position_loss, memmamba_memory "
            "(MemMamba only), influence, retrieval, perplexity, effrem, context_probe."
        ),
    ] = "etmf,eclmf,ssm_decay,position_loss,memmamba_memory",
    anchors: Annotated[int, typer.Option(help="Anchor positions sampled per sequence.")] = 512,
    layers: Annotated[str | None, typer.Option(help="Layers to keep, e.g. 0,3,6.")] = None,
    batch: Annotated[int, typer.Option(help="Sequences analyzed together.")] = 1,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory for results, figures, report "
            "(default: a new runs/MODEL-LENGTH-YYYYMMDD-HHMMSS).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out directory.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for the probe, anchors and bootstraps.")] = 0,
    preset: Annotated[
        str | None, typer.Option(help="Size preset for an untrained model (with a name).")
    ] = None,
    random_init: Annotated[
        bool, typer.Option(help="Untrained weights on purpose (the report says so).")
    ] = False,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Local Hugging Face tokenizer directory.")
    ] = None,
    chunk_size: Annotated[
        str, typer.Option(help="Tokens per forward chunk: auto, none, or a number.")
    ] = "auto",
    max_memory: Annotated[
        str | None, typer.Option(help="Memory limit overriding the check, e.g. 4GB.")
    ] = None,
    threads: Annotated[str, typer.Option(help=THREADS_HELP)] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Measure forgetting on one probe and print a per-layer summary."""
    from fidelity.reports.worker import FigureWorker

    # started first: it imports pandas and matplotlib and warms up on the core that the
    # imports below leave idle, then draws the figures and the report once the tables are saved
    with FigureWorker() as worker:
        from fidelity.analysis import AnalysisOptions, plan_run, run_analysis
        from fidelity.budget import parse_bytes
        from fidelity.devices import resolve_device
        from fidelity.models.loading import load_model
        from fidelity.probes.tasks import make_probe
        from fidelity.probes.tokenizer import load_tokenizer
        from fidelity.results import LEGACY_RESULT
        from fidelity.threads import cpu_sample, parse_threads, set_threads

        # the objects made by importing live as long as the process: the collector's full passes
        # need not walk them again (they took ~0.5 s CPU of a 60k analysis, measured)
        gc.freeze()
        started = cpu_sample()  # the idle cores are sampled while the probe and model load
        threads = _as_input(parse_threads, threads)
        options = AnalysisOptions(
            length,
            probe,
            metrics,
            anchors,
            layers=_split(layers, int),
            seed=seed,
            batch=batch,
            device=device,
            text=text,
            text_field=text_field,
            tokenizer=tokenizer,
            chunk_size=_chunk_option(chunk_size),
            max_memory=_as_input(parse_bytes, max_memory) if max_memory is not None else None,
        )
        tokens = options.length
        if text is not None and not text.exists():
            _fail(f"text path {text} does not exist")
        if text is not None and probe != "text":
            _fail(f"--text applies to --probe text only (got --probe {probe})")
        if out_dir is None:
            out_dir = _default_out(model, tokens)
        inputs = [p for p in (Path(model), text, tokenizer) if p is not None and p.exists()]
        check_destination(out_dir, kind="result", force=force, inputs=inputs, legacy=LEGACY_RESULT)
        resolve_device(device)
        if tokenizer is not None:
            load_tokenizer(tokenizer)
        if probe == "text" or tokens <= EARLY_PROBE_TOKENS:
            # built now, before the model loads: a text probe is bounded by the text (empty or
            # binary files fail here), others are small here; longer synthetic probes are built
            # after the memory check
            _as_input(
                make_probe,
                probe,
                tokens,
                batch=batch,
                seed=seed,
                tokenizer=tokenizer,
                **options.probe_options(),
            )
        loaded = (
            load_model(model, preset, random_init=random_init)
            if preset or random_init
            else load_model(model)
        )
        chosen = set_threads(threads, since=started)
        worker.processes = chosen[0]  # the figures are drawn on as many cores
        threads_line = _threads_line(chosen)
        plan = plan_run(loaded, options)
        console.print(f"[bold]plan[/]: {plan.describe()}; {threads_line}")
        result = run_analysis(loaded, options, progress=progress)
        _print_summary(result)
        path = result.save(out_dir, force=force, worker=worker)
        console.print(f"saved results, figures and report.html to [bold]{path}[/]")


def _default_out(model: str, tokens: int) -> Path:
    """A new directory ``runs/<model>-<length>-<YYYYMMDD-HHMMSS>`` (``-2``, ``-3``, ... added
    when one started in the same second exists) for an ``analyze`` without ``--out``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{Path(model).name or 'model'}-{format_length(tokens)}-{stamp}"
    path, number = base, 1
    while path.exists():
        number += 1
        path = base.with_name(f"{base.name}-{number}")
    return path


def check_destination(target: Path, **rules) -> None:
    """:func:`fidelity.destinations.check_destination`, its messages in command-line terms."""
    from fidelity.destinations import check_destination as check

    try:
        check(target, **rules)
    except FileExistsError as error:
        raise FileExistsError(str(error).replace("force=True (CLI: --force)", "--force")) from None


def _chunk_option(value: str) -> int | str | None:
    if value == "auto":
        return "auto"
    if value.lower() == "none":
        return None
    try:
        return parse_length(value)
    except ValueError:
        _fail(f"invalid --chunk-size {value!r}: expected auto, none or a token count like 4096")
        return None


SUMMARY_CAPTION = (
    "ETMF = normalized ETMF (1 perfect read-out, 0 chance). farthest: largest distance with "
    "ETMF >= 0.5; peak: distance > 0 where ETMF is highest, then its ETMF; mass: area under "
    "ETMF over log2-distance (doublings); contiguous: ETMF >= 0.5 at every distance up to it; "
    "half-life: of an exponential fit, only for a decaying curve (R² >= 0.9). [95% bootstrap "
    "interval]. Every column: summary.csv"
)
_FORMATS = {
    "farthest_distance": "{:.0f}",
    "peak_distance": "{:.0f}",
    "contiguous_length": "{:.0f}",
    "memory_mass": "{:.2f}",
    "half_life": "{:.3g}",
}


def _print_summary(result) -> None:
    table = Table(
        title=f"{result.label}: where each layer holds memory",
        title_style="bold",
        caption=SUMMARY_CAPTION,
    )
    for header in ("layer", "farthest", "peak (ETMF)", "mass", "contiguous", "half-life"):
        table.add_column(header, justify="right")
    for _, row in result.summary.iterrows():
        table.add_row(str(int(row["layer"])), *_summary_cells(row))
    out.print(table)
    _print_memmamba_memory(result.frame)
    if result.untrained:
        console.print("[yellow]note: these weights are an untrained random initialization[/]")
    for note in result.meta.get("notes", []):
        console.print(f"note: {note}")


def _print_memmamba_memory(frame) -> None:
    """MemMamba's writes, firing, note ages and memory-path loss (nothing for other models)."""
    from fidelity.reports.memmamba_memory import CAPTION, HEADERS, loss_sentence, memory_cells

    cells = memory_cells(frame)
    if cells:
        table = Table(title="MemMamba memory by layer", title_style="bold", caption=CAPTION)
        for header in HEADERS:
            table.add_column(header, justify="right")
        for row in cells:
            table.add_row(*row)
        out.print(table)
    sentence = loss_sentence(frame)
    if sentence is not None:
        out.print(sentence)


def _summary_cells(row) -> list[str]:
    """Farthest, peak, mass, contiguous and half-life cells of one summary row."""
    peak = _statistic(row, "peak_distance")
    if row["peak_value"] == row["peak_value"]:
        peak += f" ({row['peak_value']:.2f})"
    return [
        _statistic(row, "farthest_distance"),
        peak,
        _statistic(row, "memory_mass"),
        _statistic(row, "contiguous_length"),
        _half_life(row),
    ]


def _statistic(row, column: str) -> str:
    """``value [low, high]`` in the column's format; ``-`` for NaN."""
    number = _FORMATS[column].format
    value, low, high = row[column], row[f"{column}_low"], row[f"{column}_high"]
    if value != value:  # NaN
        return "-"
    if low == low and high == high:
        return f"{number(value)} [{number(low)}, {number(high)}]"
    return number(value)


def _half_life(row) -> str:
    """The half-life with its fit's R²; ``not decaying`` when the fit does not describe the
    curve, ``-`` without a converged fit."""
    r2 = row["half_life_r2"]
    if r2 != r2:  # no fit
        return "-"
    if row["half_life"] != row["half_life"]:
        return f"not decaying (R² {r2:.2f})"
    return f"{_statistic(row, 'half_life')} R² {r2:.2f}"


@app.command()
def compare(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Run directories written by analyze --out; or a checkpoint series: a training "
            "run directory, checkpoint directories, or a quoted glob such as 'runs/ind/ckpt-*'."
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory for the comparison (a series: default a new "
            "runs/series-MODEL-LENGTH-YYYYMMDD-HHMMSS).",
        ),
    ] = None,
    labels: Annotated[str | None, typer.Option(help="Comma-separated labels, one per run.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out directory.")] = False,
    probe: Annotated[
        str | None,
        typer.Option(help="Series: the probe (default: the training task if it is a probe)."),
    ] = None,
    length: Annotated[
        str | None, typer.Option(help="Series: tokens per sequence (default: training length).")
    ] = None,
    metrics: Annotated[
        str | None, typer.Option(help="Series: metrics per checkpoint (default: etmf).")
    ] = None,
    anchors: Annotated[
        int | None, typer.Option(help="Series: anchor positions (default: 256).")
    ] = None,
    trials: Annotated[
        int | None,
        typer.Option(help="Series: memory-task rows scored per checkpoint (default: 50)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Series: seed for the probe and anchors.")] = 0,
    device: Annotated[str, typer.Option(help="Series: auto | cpu | cuda")] = "auto",
    threads: Annotated[str, typer.Option(help="Series: " + THREADS_HELP)] = "auto",
    progress: Annotated[bool, typer.Option(help="Series: show a progress bar.")] = True,
) -> None:
    """Overlay the forgetting curves of several runs and tabulate their differences; given
    checkpoints, analyze each and show memory (and task accuracy) against the training step."""
    from fidelity.analysis import compare as run_compare
    from fidelity.results import LEGACY_COMPARISON
    from fidelity.series import is_checkpoint_source
    from fidelity.threads import parse_threads

    threads = _as_input(parse_threads, threads)
    kinds = [is_checkpoint_source(run) for run in runs]
    series_options = {
        "--probe": probe,
        "--length": length,
        "--metrics": metrics,
        "--anchors": anchors,
        "--trials": trials,
    }
    if any(kinds):
        if not all(kinds):
            run = runs[kinds.index(False)]
            checkpoint = runs[kinds.index(True)]
            _fail(
                f"{run} is not a checkpoint but {checkpoint} is: compare takes either analysis "
                "run directories or one model's checkpoints, not both"
            )
        if labels is not None:
            _fail("--labels applies to run directories; a series is labelled by step")
        _compare_series(runs, out_dir, force, series_options, seed, device, threads, progress)
        return
    given = [name for name, value in series_options.items() if value is not None]
    if given:
        _fail(
            f"{', '.join(given)} apply to a checkpoint series; these are analysis run directories"
        )
    for run in runs:
        if not run.is_dir():
            _fail(f"run directory {run} does not exist")
    if len(runs) == 1 and not (runs[0] / "meta.json").is_file():
        _fail(
            f"{runs[0]} is not an analysis run directory (no meta.json) and holds no checkpoint "
            "(no config.json, no ckpt-<step> folders)"
        )
    if len(runs) < 2:
        _fail(f"compare needs at least two run directories, got {len(runs)}")
    label_list = _split(labels)
    if label_list is not None and len(label_list) != len(runs):
        _fail(f"--labels gave {len(label_list)} labels for {len(runs)} runs")
    if out_dir is not None:
        check_destination(
            out_dir, kind="comparison", force=force, inputs=runs, legacy=LEGACY_COMPARISON
        )
    comparison = run_compare(runs, label_list)
    for warning in comparison.warnings:
        console.print(f"[yellow]warning[/]: {warning}")
    _print_comparison(comparison.summary)
    if out_dir is not None:
        path = comparison.save(out_dir, force=force)
        console.print(f"saved comparison to [bold]{path}[/]")


def _compare_series(runs, out_dir, force, given: dict, seed: int, device: str, threads, progress):
    """``compare`` on checkpoints: analyze each, print and save the series."""
    from fidelity.analysis import AnalysisOptions
    from fidelity.devices import resolve_device
    from fidelity.probes.tasks import TASKS
    from fidelity.series import SERIES_LEGACY, analyze_series, find_checkpoints
    from fidelity.threads import set_threads

    checkpoints = find_checkpoints(runs)
    if len(checkpoints) < 2:
        _fail(f"a series needs at least two checkpoints, found {len(checkpoints)}")
    training = _training_meta(checkpoints[-1].path)
    probe = given["--probe"]
    if probe is None:
        probe = training.get("task") if training.get("task") in TASKS else "text"
    length = given["--length"]
    if length is None:
        length = training.get("length")
        if not isinstance(length, int):
            _fail("the checkpoints record no training length; give --length, e.g. --length 8k")
    trials = 50 if given["--trials"] is None else given["--trials"]
    if trials < 1:
        _fail(f"--trials must be at least 1, got {trials}")
    options = AnalysisOptions(
        length,
        probe,
        given["--metrics"] or "etmf",
        256 if given["--anchors"] is None else given["--anchors"],
        seed=seed,
        device=device,
    )
    resolve_device(device)
    if out_dir is None:
        model = str(checkpoints[0].config.get("model_type") or "model")
        out_dir = _default_out(f"series-{model}", options.length)
    check_destination(
        out_dir,
        kind="series",
        force=force,
        inputs=[c.path for c in checkpoints],
        legacy=SERIES_LEGACY,
    )
    threads_line = _threads_line(set_threads(threads))
    console.print(
        f"[bold]series[/]: {len(checkpoints)} checkpoints (steps {checkpoints[0].step}.."
        f"{checkpoints[-1].step}), probe {probe}, {format_length(options.length)} tokens, "
        f"metrics {','.join(options.metrics)}; {threads_line}"
    )

    def report_checkpoint(index: int, total: int, result) -> None:
        console.print(
            f"[{index + 1}/{total}] step {result.meta['training_step']}: " + (_series_line(result))
        )

    series = analyze_series(
        checkpoints, options, trials=trials, progress=progress, on_checkpoint=report_checkpoint
    )
    _print_series(series)
    path = series.save(out_dir, force=force)
    console.print(f"saved series (series.csv, figure, report.html) to [bold]{path}[/]")


def _training_meta(checkpoint: Path) -> dict:
    """``meta.training`` of a checkpoint's config.json ({} when absent)."""
    header = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    meta = header.get("meta") if isinstance(header, dict) else None
    training = meta.get("training") if isinstance(meta, dict) else None
    return training if isinstance(training, dict) else {}


def _series_line(result) -> str:
    """Accuracy (when scored) and the last layer's memory mass, for a progress line."""
    parts = []
    accuracy = result.meta.get("task_accuracy")
    if accuracy:
        parts.append(
            f"accuracy {accuracy['solved']}/{accuracy['rows']} "
            f"[{100 * accuracy['low']:.0f}%, {100 * accuracy['high']:.0f}%]"
        )
    last = result.summary.sort_values("layer").iloc[-1]
    parts.append(f"layer {int(last['layer'])} mass {_statistic(last, 'memory_mass')}")
    return "; ".join(parts)


def _print_series(series) -> None:
    table = Table(
        title=f"{series.label}: memory across training",
        title_style="bold",
        caption="accuracy: task rows solved at the analysis length [Wilson 95%]; "
        + SUMMARY_CAPTION,
    )
    with_accuracy = series.table["accuracy"].notna().any()
    headers = ["step", "layer", *(["accuracy"] if with_accuracy else [])]
    for header in (*headers, "half-life", "contiguous", "farthest", "mass"):
        table.add_column(header, justify="right")
    for _, row in series.table.iterrows():
        if int(row["layer"]) == 0:
            continue
        cells = [str(int(row["step"])), str(int(row["layer"]))]
        if with_accuracy:
            cells.append(
                f"{100 * row['accuracy']:.0f}% [{100 * row['accuracy_low']:.0f}, "
                f"{100 * row['accuracy_high']:.0f}]"
            )
        cells += [
            _half_life(row),
            _statistic(row, "contiguous_length"),
            _statistic(row, "farthest_distance"),
            _statistic(row, "memory_mass"),
        ]
        table.add_row(*cells)
    out.print(table)


def _print_comparison(summary) -> None:
    """Each run's statistics per layer, then the difference from the first run, with
    conservative intervals (see ``Comparison.build_summary``)."""
    table = Table(
        title="comparison: where each layer holds memory (Δ: run minus first run)",
        title_style="bold",
        caption=SUMMARY_CAPTION,
    )
    for header in ("run", "layer", "farthest", "peak (ETMF)", "mass", "half-life"):
        table.add_column(header, justify="right" if header != "run" else "left")
    for _, row in summary.iterrows():
        farthest, peak, mass, _contiguous, half_life = _summary_cells(row)
        cells = [farthest, peak, mass, half_life]
        if row["farthest_distance_diff"] == row["farthest_distance_diff"] or (
            row["memory_mass_diff"] == row["memory_mass_diff"]
        ):
            diffs = [
                _difference(row, column)
                for column in ("farthest_distance", "peak_distance", "memory_mass", "half_life")
            ]
            cells = [f"{cell}\n[dim]{diff}[/]" for cell, diff in zip(cells, diffs, strict=True)]
        table.add_row(str(row["run"]), str(int(row["layer"])), *cells)
    out.print(table)


def _difference(row, column: str) -> str:
    """``Δ value [low, high]``: this run minus the first, with the conservative bound."""
    number = _FORMATS[column].format
    value = row[f"{column}_diff"]
    if value != value:
        return "Δ -"
    low, high = row[f"{column}_diff_low"], row[f"{column}_diff_high"]
    if low == low and high == high:
        return f"Δ {number(value)} [{number(low)}, {number(high)}]"
    return f"Δ {number(value)}"


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A run directory written by analyze --out.")],
) -> None:
    """Rebuild the figures and report.html of a saved run (other files in RUN are kept)."""
    from fidelity.results import LEGACY_RESULT, FidelityResult

    result = FidelityResult.load(run)
    check_destination(run, kind="result", force=True, legacy=LEGACY_RESULT)
    path = result.save(run, force=True)
    console.print(f"rebuilt {path / 'report.html'}")


@app.command()
def models() -> None:
    """List the registered models, their presets and shipped checkpoints."""
    from fidelity.models.registry import (
        DATA_DIR,
        DERIVED_DEFAULTS,
        MODELS,
        PRESETS,
        shipped_checkpoint,
        shipped_task_checkpoints,
        training_description,
    )

    table = Table(title="models")
    for column in ("name", "description", "shipped default", "trained on"):
        table.add_column(column)
    for name in sorted(MODELS):
        shipped = shipped_checkpoint(name)
        trained_on = "-"
        if shipped is not None:
            default = f"fidelity/data/{shipped.name}"
            trained_on = training_description(shipped)
        elif name in DERIVED_DEFAULTS and shipped_checkpoint(DERIVED_DEFAULTS[name]):
            default = f"from {DERIVED_DEFAULTS[name]}'s"
        else:
            default = "-"
        table.add_row(name, MODELS[name].description, default, trained_on)
    out.print(table)
    extra = shipped_task_checkpoints()
    if extra:
        tasks = Table(title="further shipped checkpoints (load by name)")
        for column in ("name", "model", "trained on"):
            tasks.add_column(column)
        for name in extra:
            config = json.loads((DATA_DIR / name / "config.json").read_text())
            tasks.add_row(name, config["model_type"], training_description(DATA_DIR / name))
        out.print(tasks)
    out.print(f"presets: {', '.join(PRESETS)}")


@app.command()
def train(
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory for checkpoints.")],
    model: Annotated[str, typer.Option(help="Registered model name.")] = "memmamba",
    preset: Annotated[str, typer.Option(help="Size preset.")] = "mini",
    task: Annotated[
        str, typer.Option(help="text | passkey | kv | mix | induction | selective_copy | mqar")
    ] = "mix",
    length: Annotated[str, typer.Option(help="Tokens per training sequence.")] = "2k",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    save_every: Annotated[int, typer.Option(help="Checkpoint interval in steps.")] = 250,
    seed: Annotated[int, typer.Option(help="Seed for init and data.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    text: Annotated[str | None, typer.Option(help="Text files/directory for text rows.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    force: Annotated[bool, typer.Option(help="Start over in a non-empty --out.")] = False,
    set_options: Annotated[
        list[str] | None,
        typer.Option("--set", help="Model config override, e.g. --set pool_policy=fifo."),
    ] = None,
    task_option: Annotated[
        list[str] | None,
        typer.Option(
            help="Task option, e.g. --task-option n_pairs=16 (memory tasks) or "
            "--task-option episodes=8 (passkey, mix)."
        ),
    ] = None,
    state_passing: Annotated[
        str,
        typer.Option(
            help="off | carry (start each row from the previous batch's final state) | noise "
            "(from noise fitted to those states); mamba and mamba2 only."
        ),
    ] = "off",
    init: Annotated[
        str | None,
        typer.Option(help="Start from these weights (checkpoint directory or shipped name)."),
    ] = None,
    threads: Annotated[str, typer.Option(help=THREADS_HELP)] = "auto",
) -> None:
    """Train a model (from scratch, or from --init) and write loadable checkpoints every
    --save-every steps."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from fidelity.devices import resolve_device
    from fidelity.models.registry import build_config
    from fidelity.threads import parse_threads, set_threads
    from fidelity.train import TrainConfig, check_run_directory, checkpoint_dirs
    from fidelity.train import train as run_train

    threads = _as_input(parse_threads, threads)
    config = TrainConfig(
        model=model,
        preset=preset,
        task=task,
        length=parse_length(length),
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        save_every=save_every,
        seed=seed,
        device=device,
        text=text,
        overrides=_overrides(set_options or []),
        task_options=_overrides(task_option or []),
        state_passing=state_passing,
        init=init,
    )
    config.validate()
    build_config(model, preset, **config.model_overrides())  # unknown or invalid fields fail here
    resolve_device(device)
    check_run_directory(out_dir, resume=resume, force=force)
    if resume and not (out_dir.is_dir() and checkpoint_dirs(out_dir)):
        console.print(f"note: no complete checkpoint to resume in {out_dir}; starting at step 0")
    threads_line = _threads_line(set_threads(threads))
    bar = Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[speed]:.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
    )
    task_id = bar.add_task("train", total=steps, loss=float("nan"), speed=0.0)

    def report_step(info: dict) -> None:
        if not bar.live.is_started:  # shown from the first step: checks print alone
            console.print(threads_line)
            bar.start()
        bar.update(task_id, completed=info["step"], loss=info["loss"], speed=info["tokens_per_s"])

    try:
        summary = run_train(
            config,
            out_dir,
            resume=resume,
            force=force,
            progress=report_step,
            notify=console.print,
        )
    finally:
        if bar.live.is_started:
            bar.stop()
    console.print(
        f"trained {summary.steps} steps ({format_length(summary.tokens)} tokens) in "
        f"{summary.wall_time_s:.0f} s; final loss {summary.final_loss:.4f}; checkpoints in "
        f"[bold]{summary.out}[/]"
    )


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Sweep configuration (TOML).")],
    executor: Annotated[str, typer.Option(help="local | ray")] = "local",
    workers: Annotated[
        int | None,
        typer.Option(help="Runs at once (local: default 1; ray: at most, default all)."),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: a local instance).")
    ] = None,
    cpus_per_run: Annotated[
        int | None,
        typer.Option(help="CPU threads per run (local: cpus // workers; ray: 1)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rerun runs already complete in out.")] = False,
) -> None:
    """Run many analyses (models x lengths x probes x seeds) from CONFIG into one table."""
    import warnings

    from rich.markup import escape

    from fidelity.destinations import check_writable
    from fidelity.sweep import load_sweep_config, run_sweep

    if executor not in ("local", "ray"):
        _fail(f"unknown --executor {executor!r}; choose local or ray")
    if workers is not None and workers < 1:
        _fail(f"--workers must be at least 1, got {workers}")
    if cpus_per_run is not None and cpus_per_run < 1:
        _fail(f"--cpus-per-run must be at least 1, got {cpus_per_run}")
    if ray_address is not None and executor != "ray":
        _fail("--ray-address needs --executor ray")
    plan = load_sweep_config(config)
    check_writable(plan.out)
    total = len(plan.runs)
    console.print(f"[bold]sweep[/]: {total} runs into {plan.out} ({executor})")
    ended = []
    run_warnings: dict[str, None] = {}

    def report_run(outcome) -> None:
        ended.append(outcome)
        line = f"[{len(ended)}/{total}] {outcome.status:<7} {outcome.name}"
        if outcome.status != "skipped":
            line += f" ({outcome.seconds:.1f} s)"
        if outcome.error:
            line += f": {outcome.error}"
        style = {"done": "green", "skipped": "dim", "failed": "red"}[outcome.status]
        console.print(f"[{style}]{escape(line)}[/]", highlight=False)
        run_warnings.update(dict.fromkeys(outcome.warnings))

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run_sweep(
                plan,
                executor=executor,
                workers=workers,
                force=force,
                progress=report_run,
                ray_address=ray_address,
                cpus_per_run=cpus_per_run,
            )
    except KeyboardInterrupt:
        console.print(f"interrupted; finished runs are saved in {plan.out}; rerun to resume")
        raise typer.Exit(130) from None
    run_warnings.update(dict.fromkeys(str(w.message) for w in caught))
    for message in run_warnings:
        console.print(f"[yellow]warning[/]: {escape(message)}")
    _print_sweep_summary(result)
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("done", "skipped", "failed")}
    console.print(
        f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"tables in [bold]{result.out}[/] (sweep.csv, sweep_summary.csv, failures.csv)"
    )
    if result.failed:
        raise typer.Exit(1)


def _print_sweep_summary(result) -> None:
    table = Table(
        title="sweep: where the last layer of each run holds memory",
        title_style="bold",
        caption=SUMMARY_CAPTION,
    )
    table.add_column("run", overflow="fold")
    table.add_column("status")
    for column in ("layer", "farthest", "peak (ETMF)", "mass", "contiguous", "half-life"):
        table.add_column(column, justify="right")
    last_layers = result.summary.sort_values("layer").groupby("run").tail(1).set_index("run")
    for outcome in result.outcomes:
        if outcome.name not in last_layers.index:
            table.add_row(outcome.name, outcome.status, *["-"] * 6)
            continue
        row = last_layers.loc[outcome.name]
        table.add_row(outcome.name, outcome.status, str(int(row["layer"])), *_summary_cells(row))
    out.print(table)


@app.command()
def bench(
    length: Annotated[str, typer.Option(help="Sequence length to time.")] = "8k",
    d_inner: Annotated[int, typer.Option(help="Scan channels (Mamba-130m: 1536).")] = 1536,
    models: Annotated[
        str | None, typer.Option(help="Also time these models' forward, e.g. mamba,memmamba.")
    ] = None,
    preset: Annotated[str, typer.Option(help="Size preset for --models.")] = "small",
    repeats: Annotated[int, typer.Option(help="Timed repetitions (best is shown).")] = 3,
) -> None:
    """Time the selective-scan backends (and optionally model forwards) on this machine."""
    from fidelity.bench import time_forward, time_scan_backends
    from fidelity.models.registry import build_model

    tokens = parse_length(length)
    if d_inner < 1 or repeats < 1:
        _fail("--d-inner and --repeats must be positive")
    names = _split(models) or []
    built = {name: build_model(name, preset).eval() for name in names}  # fail fast on names
    table = Table(title=f"selective scan, {format_length(tokens)} tokens, d_inner {d_inner}")
    for column in ("backend", "seconds", "tokens/s", "x fastest", "max rel. error"):
        table.add_column(column, justify="right")
    for row in time_scan_backends(tokens, d_inner, repeats=repeats):
        table.add_row(
            row["backend"],
            f"{row['seconds']:.4f}",
            f"{row['tokens_per_s']:,.0f}",
            f"{row['ratio']:.1f}",
            f"{row['max_error']:.1e}",
        )
    out.print(table)
    if built:
        times = {name: time_forward(model, tokens, repeats) for name, model in built.items()}
        first = next(iter(times.values()))
        table = Table(title=f"forward, {preset} preset, {format_length(tokens)} tokens")
        for column in ("model", "parameters", "seconds", f"x {names[0]}"):
            table.add_column(column, justify="right")
        for name, seconds in times.items():
            parameters = f"{built[name].num_parameters() / 1e6:.2f}M"
            table.add_row(name, parameters, f"{seconds:.3f}", f"{seconds / first:.2f}")
        out.print(table)


def _overrides(pairs: list[str]) -> dict:
    """``["pool_policy=fifo", "tau2=0.7"]`` -> ``{"pool_policy": "fifo", "tau2": 0.7}``
    (values read as JSON where they parse, else as strings)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"invalid --set {pair!r}: expected key=value, e.g. --set pool_policy=fifo")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app; user errors become one line and exit 2, bugs one
    "internal error" line and exit 1, Ctrl-C and SIGTERM exit 130.

    ``--debug`` may appear anywhere on the command line."""
    global _debug
    argv = list(sys.argv[1:] if argv is None else argv)
    _debug = "--debug" in argv
    if _debug:
        argv.remove("--debug")
    previous = _handle_sigterm()
    try:
        return _run(argv)
    finally:
        gc.unfreeze()  # what `analyze` froze is collectable again for callers that go on
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str]) -> int:
    try:
        status = app(args=argv, standalone_mode=False)
        if status == 130:  # typer turns Ctrl-C into exit status 130
            print("interrupted", file=sys.stderr)
        if isinstance(status, int) and not isinstance(status, bool):
            return status
    except typer.Exit as stop:
        return stop.exit_code
    except typer.Abort:
        console.print("aborted")
        return 130
    except COMMAND_LINE_ERRORS as error:
        if _debug:
            raise
        message = error.format_message().replace("\n", " ")
        if message:  # empty when the help was shown for a bare `fidelity`
            print(f"error: {message}", file=sys.stderr)
        return 2
    except _user_errors() as error:
        if _debug:
            raise
        message = str(error).replace("\n", " ") or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if _debug:
            raise
        print(_internal_error(error), file=sys.stderr)
        return 1
    return 0


def _handle_sigterm():
    """Make SIGTERM raise KeyboardInterrupt (as Ctrl-C does); returns the previous handler,
    None when handlers cannot be set here (not the main thread)."""

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        return None


def _internal_error(error: Exception) -> str:
    """One line for a bug, naming the file its traceback went to."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        with tempfile.NamedTemporaryFile(
            "w", prefix=f"fidelity-traceback-{stamp}-", suffix=".txt", delete=False
        ) as handle:
            handle.write(text)
        where = f"traceback in {handle.name}"
    except OSError:
        where = "rerun with --debug to see the traceback"
    message = str(error).replace("\n", " ")
    return (
        f"internal error (a bug in fidelity, not in your input): {type(error).__name__}: "
        f"{message} ({where}; please report it)"
    )


def entry_point() -> None:
    """The ``fidelity`` command: :func:`main`, then the process ends with its status.

    The interpreter is not torn down: freeing every object left by an analysis (torch, pandas
    and matplotlib objects) took 1-2.5 s after the work was done (measured after
    ``fidelity analyze --length 60k``), and a process that ends here needs none of it. Output
    is flushed and the exit handlers run first (every file the toolkit writes is closed by
    then); while another thread is still running, the exit is the ordinary one."""
    status = main()
    if threading.active_count() > 1:
        sys.exit(status)
    _flush_output()
    atexit._run_exitfuncs()
    _flush_output()
    os._exit(status)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        # a closed pipe or stream: nothing more can be said
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
