"""MemMamba against Mamba of the same width and depth: forward and training time, one run.

    python benchmarks/bench_models.py [--presets mini,small] [--lengths 8k,60k] [--repeats 3]
        [--warmup 4] [--hogs N] [--baseline REF] [--out benchmarks/results/models_cpu.md]

For every preset and length, in one process, alternating the two models (so that background
load hits both alike), best of ``--repeats`` after ``--warmup`` untimed runs of each (a
training step at 60k gets faster over its first 3-5 runs, as the allocator's heap grows and
the fresh pages it faults in stop; MemMamba's take longer to stop):

- ``forward, one pass``: ``model(ids)`` over the whole sequence, no gradients;
- ``forward, chunked``: the same tokens in chunks of ``--chunk`` through the recurrent cache
  (how ``fidelity analyze`` runs long inputs);
- ``training``: forward + backward of the language-model loss (plus MemMamba's write-rate
  term) over the whole sequence, batch 1.

The ratio is MemMamba / Mamba. With ``--hogs N`` every row is measured twice, without and
then with N busy-looping processes (``python -c "while True: pass"``, started and stopped by
the benchmark) sharing the cores: the two ratios show how MemMamba's many small operations
fare under contention (run it on a quiet machine, e.g. through a wrapper that pauses other
jobs, to see the hogs' effect alone; the load column is a one-minute average and lags the
hogs). Then a breakdown of MemMamba's one-pass forward into its
components (mixer, note block, pool, attention, fusion, the rest), timed with the same clock
around each part (best run; the attentions' output projections count under fusion, which
runs them). The machine's load average is printed with every row: on a shared machine,
compare ratios, not seconds.

``--weights untrained`` (the default): random init, seed 0, at each preset; about 2% of the
positions write notes (the scorer's init bias) and half of them fire cross-token attention
(the state scorer starts at 0). ``--weights shipped``: the shipped default checkpoints
(``mamba``, ``memmamba``) at the ``mini`` preset, untrained weights at the others (no
checkpoint ships there; the ``weights`` column says which ran), whose rates depend on the
input: on
``--input random`` (uniform random bytes, the default) two of MemMamba's layers write notes at
almost every position and cross-token attention fires at 0-6%; on ``--input text`` (this
repository's README and Python sources, repeated) the write rates are 0-5% and the first
layer's attention fires almost everywhere. MemMamba's pool and attention costs follow these
rates, so say which you measured.

With ``--baseline REF`` (a git revision of this repository), MemMamba's model code as it was at
``REF`` (``fidelity/models/memmamba.py`` and ``state_pool.py``, read with ``git show``) runs as
a third model in the same alternation, with the same weights: a before/after comparison in one
process. Its outputs are checked against the current code's before timing (the largest
difference of the logits over the first 2000 tokens is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fidelity.lengths import parse_length
from fidelity.models import memmamba as memmamba_module
from fidelity.models.base import CausalLM
from fidelity.models.loading import load_model
from fidelity.models.registry import build_model

REPOSITORY = Path(__file__).resolve().parents[1]
COMPONENTS = ("mixer", "note block", "pool", "attention", "fusion")
SHIPPED_PRESET = "mini"  # the preset of the shipped default checkpoints


def load() -> str:
    """The 1-minute load average, formatted."""
    return f"{os.getloadavg()[0]:.2f}"


def text_tokens(length: int) -> torch.Tensor:
    """`(1, length)` byte tokens: this repository's README and Python sources, in path order,
    repeated as needed."""
    paths = [REPOSITORY / "README.md", *sorted((REPOSITORY / "fidelity").rglob("*.py"))]
    text = b"\n".join(path.read_bytes() for path in paths)
    text = text * -(-length // len(text))
    return torch.tensor(list(text[:length]), dtype=torch.long)[None]


def forward_one_pass(model: CausalLM, ids: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(ids)

    return run


def forward_chunked(model: CausalLM, ids: torch.Tensor, chunk: int) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            cache = model.init_cache(ids.shape[0])
            for start in range(0, ids.shape[1], chunk):
                model(ids[:, start : start + chunk], cache=cache)

    return run


def training_step(model: CausalLM, ids: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        output = model(ids)
        logits = output.logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        if output.aux_loss is not None:
            loss = loss + output.aux_loss
        loss.backward()

    return run


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(run: Callable[[], None]) -> float:
    start = clock()
    run()
    return clock() - start


def alternate(runs: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    """Best time of each run (of the clock chosen), after ``warmup`` untimed runs each,
    alternating between them throughout."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], timed(run))
    return best


def baseline_module(ref: str, directory: Path):
    """MemMamba's model module as it was at git revision ``ref``: ``memmamba.py`` and
    ``state_pool.py`` written to ``directory`` and imported under their own names (the old
    ``memmamba.py`` is made to import the old ``state_pool.py``)."""
    sources = {}
    for name in ("state_pool", "memmamba"):
        command = ["git", "-C", str(REPOSITORY), "show", f"{ref}:fidelity/models/{name}.py"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"--baseline {ref}: {result.stderr.strip() or 'git show failed'}")
        sources[name] = result.stdout
    sources["memmamba"] = sources["memmamba"].replace(
        "from fidelity.models.state_pool import", "from baseline_state_pool import"
    )
    module = None
    for name in ("state_pool", "memmamba"):
        path = directory / f"baseline_{name}.py"
        path.write_text(sources[name])
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def baseline_model(module, current: CausalLM) -> CausalLM:
    """The baseline code's MemMambaLM with ``current``'s config (as the baseline's own config
    class) and weights."""
    model = module.MemMambaLM(module.MemMambaConfig(**dataclasses.asdict(current.config)))
    model.load_state_dict(current.state_dict())
    return model.eval()


def largest_difference(models: dict[str, CausalLM], ids: torch.Tensor) -> float:
    """Largest absolute difference between the logits of the MemMambas (current and baseline)
    over the first 2000 tokens of ``ids``."""
    with torch.no_grad():
        current = models["memmamba"](ids[:, :2000]).logits
        baseline = models["baseline"](ids[:, :2000]).logits
    return (current - baseline).abs().max().item()


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """Run ``count`` busy-looping Python processes while the context is open."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them reach the scheduler
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@contextlib.contextmanager
def component_clock(model: CausalLM) -> Iterator[dict[str, float]]:
    """Accumulate wall time per MemMamba component while the context is open."""
    totals: dict[str, float] = defaultdict(float)
    originals = []

    def wrap(owner: object, attribute: str, component: str) -> None:
        original = getattr(owner, attribute)

        def clocked(*args, **kwargs):
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                totals[component] += clock() - start

        originals.append((owner, attribute, original, attribute in vars(owner)))
        setattr(owner, attribute, clocked)

    wrap(memmamba_module, "pool_segments", "pool")
    for layer in model.layers:
        wrap(layer.mixer, "forward", "mixer")
        wrap(layer.note_block, "forward", "note block")
        wrap(layer, "_attend", "attention")
        wrap(layer.fusion, "forward", "fusion")
        if layer.trigger is not None:
            wrap(layer.trigger, "forward", "attention")
    try:
        yield totals
    finally:
        for owner, attribute, original, own in reversed(originals):
            if own:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)


def breakdown(model: CausalLM, ids: torch.Tensor, repeats: int) -> tuple[float, dict[str, float]]:
    """MemMamba's one-pass forward: (total seconds, seconds per component) of the best run."""
    run = forward_one_pass(model, ids)
    run()
    best_total, best_parts = float("inf"), {}
    for _ in range(repeats):
        with component_clock(model) as parts:
            total = timed(run)
        if total < best_total:
            best_total, best_parts = total, dict(parts)
    return best_total, best_parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="mini,small")
    parser.add_argument("--lengths", default="8k,60k")
    parser.add_argument("--chunk", default="8k", help="chunk length of the cached forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="untimed runs of each model before the timed ones (at 60k a training step keeps "
        "getting faster for 3-5 steps, while the allocator's heap grows and its page faults "
        "stop: one warm-up times a cold allocator, MemMamba's more than Mamba's)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=tuple(CLOCKS),
        help="wall time, or the process's CPU time (with --threads 1: the work done, much "
        "less sensitive to other jobs on a shared machine than wall time)",
    )
    parser.add_argument("--modes", default="one pass,chunked,training", help="which timings to run")
    parser.add_argument("--note-block", default="on", choices=("on", "off"))
    parser.add_argument(
        "--hogs", type=int, default=0, help="also time every row with this many CPU hogs running"
    )
    parser.add_argument(
        "--baseline", metavar="REF", help="also time MemMamba's model code at this git revision"
    )
    parser.add_argument("--weights", default="untrained", choices=("untrained", "shipped"))
    parser.add_argument("--input", default="random", choices=("random", "text"))
    parser.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = parser.parse_args()
    presets = args.presets.split(",")
    lengths = [parse_length(text) for text in args.lengths.split(",")]
    chunk = parse_length(args.chunk)
    modes = [mode.strip() for mode in args.modes.split(",")]
    unknown = set(modes) - {"one pass", "chunked", "training"}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.hogs < 0:
        parser.error("--hogs must be >= 0")
    if args.weights == "shipped" and args.note_block == "off":
        parser.error("--weights shipped: the shipped checkpoints have the note block")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    hog_counts = [0, args.hogs] if args.hogs else [0]
    overrides = {} if args.note_block == "on" else {"use_note_block": False}
    baseline = None
    if args.baseline:
        baseline = baseline_module(args.baseline, Path(tempfile.mkdtemp(prefix="bench-models-")))
    header = "| preset | weights | length | mode | CPU hogs | Mamba (s) | MemMamba (s) | ratio |"
    rule = "|---|---|---|---|---|---|---|---|"
    if baseline is not None:
        header += f" MemMamba at {args.baseline} (s) | its ratio | current / {args.baseline} |"
        rule += "---|---|---|"
    lines = [
        f"`{' '.join(['python', *sys.argv])}`",
        "",
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; batch 1, float32; "
        f"MemMamba note block {args.note_block}; {args.weights} weights, {args.input} input; "
        f"best of {args.repeats} after {args.warmup} warm-up runs each, alternating; "
        f"{args.clock} time; "
        f"load average at the start {os.getloadavg()}.",
        "",
        header + " load |",
        rule + "---|",
    ]
    print("\n".join(lines), flush=True)
    parts_lines = [
        "",
        "MemMamba one-pass forward by component (seconds of the best run; share of the total):",
        "",
        "| preset | weights | length | total | " + " | ".join(COMPONENTS) + " | rest | load |",
        "|---|---|---|---|" + "---|" * len(COMPONENTS) + "---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for preset in presets:
        shipped = args.weights == "shipped" and preset == SHIPPED_PRESET
        weights = "shipped" if shipped else "untrained"
        if weights == "shipped":
            models = {"mamba": load_model("mamba"), "memmamba": load_model("memmamba")}
        else:
            models = {
                "mamba": build_model("mamba", preset).eval(),
                "memmamba": build_model("memmamba", preset, **overrides).eval(),
            }
        if baseline is not None:
            models["baseline"] = baseline_model(baseline, models["memmamba"])
        for length in lengths:
            if args.input == "text":
                ids = text_tokens(length)
            else:
                ids = torch.randint(
                    0, models["mamba"].config.vocab_size, (1, length), generator=generator
                )
            if baseline is not None:
                difference = largest_difference(models, ids)
                print(
                    f"{preset} {length}: logits of current and baseline differ by at most "
                    f"{difference:.1e}",
                    flush=True,
                )
            for mode in modes:
                if mode == "one pass":
                    runs = {name: forward_one_pass(m, ids) for name, m in models.items()}
                elif mode == "chunked":
                    runs = {name: forward_chunked(m, ids, chunk) for name, m in models.items()}
                else:
                    for m in models.values():
                        m.train()
                    runs = {name: training_step(m, ids) for name, m in models.items()}
                for hogs in hog_counts:
                    with cpu_hogs(hogs):
                        times = alternate(runs, args.repeats, args.warmup)
                        row = (
                            f"| {preset} | {weights} | {length} | {mode} | {hogs} | "
                            f"{times['mamba']:.3f} | {times['memmamba']:.3f} | "
                            f"{times['memmamba'] / times['mamba']:.2f}x |"
                        )
                        if baseline is not None:
                            row += (
                                f" {times['baseline']:.3f} | "
                                f"{times['baseline'] / times['mamba']:.2f}x | "
                                f"{times['memmamba'] / times['baseline']:.2f} |"
                            )
                        row += f" {load()} |"
                    lines.append(row)
                    print(row, flush=True)
                for m in models.values():
                    m.eval()
            total, parts = breakdown(models["memmamba"], ids, args.repeats)
            rest = total - sum(parts.values())
            cells = [
                f"{parts.get(c, 0.0):.3f} ({parts.get(c, 0.0) / total:.0%})" for c in COMPONENTS
            ]
            parts_lines.append(
                f"| {preset} | {weights} | {length} | {total:.3f} | "
                + " | ".join(cells)
                + f" | {rest:.3f} ({rest / total:.0%}) | {load()} |"
            )
            print(f"breakdown: {parts_lines[-1]}", flush=True)  # kept if the run is cut short
    print("\n".join(parts_lines), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(lines + parts_lines) + "\n"
        temporary = args.out.with_suffix(args.out.suffix + ".tmp")
        temporary.write_text(text)
        temporary.replace(args.out)


if __name__ == "__main__":
    main()
