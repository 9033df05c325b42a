"""Copy a training run's final checkpoint into fidelity/data/ as a shipped default (float16).

    python scripts/ship_checkpoint.py runs/default-memmamba memmamba

The shipped directory is an ordinary checkpoint (config.json + model.safetensors) whose meta
records the training: the exact `fidelity train` command of every stage (a run started with
`--init RUN/ckpt-N` continues RUN's stage), their steps, tokens and step time (and their sums),
the final loss and the machine. fidelity/data/TRAINING.md describes how the defaults were made.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shlex
from pathlib import Path

import torch

from fidelity.models.checkpoint import load_checkpoint, save_checkpoint
from fidelity.train import checkpoint_dirs

DATA = Path(__file__).resolve().parent.parent / "fidelity" / "data"


def train_command(config: dict, out: str) -> str:
    parts = [
        "fidelity train",
        f"--model {config['model']}",
        f"--preset {config['preset']}",
        f"--task {config['task']}",
        f"--length {config['length']}",
        f"--steps {config['steps']}",
        f"--batch-size {config['batch_size']}",
        f"--lr {config['lr']}",
        f"--save-every {config['save_every']}",
        f"--seed {config['seed']}",
        *(f"--set {option(key, value)}" for key, value in config.get("overrides", {}).items()),
        *(
            f"--task-option {option(key, value)}"
            for key, value in config.get("task_options", {}).items()
        ),
        *(
            [f"--state-passing {config['state_passing']}"]
            if config.get("state_passing", "off") != "off"
            else []
        ),
        *([f"--init {config['init']}"] if config.get("init") else []),
        f"--out {out}",
    ]
    return " ".join(parts)


def option(key: str, value: object) -> str:
    """``key=value`` as the CLI reads it back (JSON unless a plain string), quoted for a shell."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return shlex.quote(f"{key}={text}")


def stage(run: Path, step: int) -> dict:
    """What the run ``run`` did up to ``step``: its command, steps, tokens, final loss and
    step time (from train_config.json and train_log.csv)."""
    config = json.loads((run / "train_config.json").read_text())
    with (run / "train_log.csv").open() as handle:
        log = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
    last = log[-1]
    return {
        "command": train_command(config, str(run)),
        "init": config.get("init"),
        "steps": int(last["step"]),
        "tokens": int(last["tokens"]),
        "final_loss": float(last["loss"]),
        "wall_time_s": float(last["elapsed_s"]),
    }


def curriculum(run: Path, step: int) -> list[dict]:
    """The stages that made ``run``'s ``ckpt-STEP``, first first: ``--init`` chains through
    earlier runs' checkpoints (``RUN/ckpt-N``) are followed while their runs are on disk; a
    shipped name or a foreign checkpoint ends the chain (its name stays in ``init``)."""
    stages = [stage(run, step)]
    while stages[0]["init"]:
        start = Path(stages[0]["init"])
        earlier = start.parent
        if not (start.name.startswith("ckpt-") and (earlier / "train_config.json").is_file()):
            break
        stages.insert(0, stage(earlier, int(start.name.split("-")[1])))
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("name")
    parser.add_argument("--step", type=int, help="ship ckpt-STEP instead of the last one")
    args = parser.parse_args()
    checkpoints = checkpoint_dirs(args.run)
    if not checkpoints:
        raise SystemExit(f"no complete checkpoint in {args.run}")
    final = checkpoints[-1] if args.step is None else args.run / f"ckpt-{args.step}"
    if final not in checkpoints:
        raise SystemExit(f"{final} is not a complete checkpoint of {args.run}")
    model = load_checkpoint(final)
    step = model.provenance.get("training", {}).get("step", int(final.name.split("-")[1]))
    stages = curriculum(args.run, step)
    meta = {
        "shipped_default": True,
        "training": {
            **model.provenance.get("training", {}),
            **{key: stages[-1][key] for key in ("command", "final_loss")},
            # the whole curriculum: every stage's steps, tokens and step time added up
            "steps": sum(s["steps"] for s in stages),
            "tokens": sum(s["tokens"] for s in stages),
            "wall_time_s": round(sum(s["wall_time_s"] for s in stages), 2),
            "stages": stages,
            "machine": f"{platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch threads when shipped",
        },
    }
    target = save_checkpoint(
        model, DATA / args.name, meta=meta, overwrite=True, dtype=torch.float16
    )
    size = sum(p.stat().st_size for p in target.iterdir())
    print(
        f"shipped {final} as {target} ({size / 1e6:.2f} MB; {len(stages)} stage(s), "
        f"{meta['training']['steps']} steps)"
    )


if __name__ == "__main__":
    main()
