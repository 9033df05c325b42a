"""A small, resumable training loop that makes real checkpoints on CPU or GPU.

``train(TrainConfig(...), out="runs/mm")`` trains a registered model from scratch on byte-level
language modelling, passkey retrieval, multi-key key-value retrieval or a mix of them (see
:func:`fidelity.probes.tasks.training_batch`). Every ``save_every`` steps it writes
``out/ckpt-<step>/``, a checkpoint directory that :func:`fidelity.load_model` and
``fidelity analyze`` accept (so ``fidelity compare`` can follow forgetting across training),
plus the optimizer state needed to resume. ``train_log.csv`` gets a row every ``log_every``
steps. After a kill, ``resume=True`` continues from the newest complete checkpoint, losing at
most ``save_every`` steps; because batches are a pure function of (seed, step), a resumed run
sees exactly the batches an uninterrupted one would.

Loss: next-token cross-entropy over the positions the task marks, averaged per row first and
then over rows, so a retrieval row (a handful of answer tokens) weighs as much as a text row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fidelity.devices import resolve_device
from fidelity.models.base import CausalLM
from fidelity.models.checkpoint import load_checkpoint, save_checkpoint
from fidelity.models.registry import build_model, model_names, preset_names
from fidelity.probes.memory_tasks import MEMORY_TASKS, make_memory_task, task_vocab_size
from fidelity.probes.tasks import TRAINING_TASKS, training_batch

TRAINER_STATE = "trainer_state.pt"
LOG_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s")


@dataclass
class TrainConfig:
    """What to train and how; saved as ``train_config.json`` in the run directory."""

    model: str = "memmamba"  # registered model name
    preset: str = "mini"  # size preset (see fidelity.models.registry.PRESETS)
    task: str = "mix"  # text | passkey | kv | mix | induction | selective_copy | mqar
    length: int = 2048  # tokens per training sequence
    batch_size: int = 8  # sequences per step
    steps: int = 1000  # optimizer steps
    lr: float = 2e-3  # peak learning rate (small models tolerate a high rate)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warm-up before the cosine
    weight_decay: float = 0.1  # AdamW decay on matrices (not on norms, biases, A_log, D)
    grad_clip: float = 1.0  # global gradient-norm clip
    seed: int = 0  # model init and data order
    save_every: int = 250  # checkpoint interval (steps); the last step is always saved
    log_every: int = 10  # train_log.csv interval (steps)
    device: str = "auto"  # auto | cpu | cuda
    text: str | None = None  # text files/directory for "text" rows (default: stdlib corpus)
    overrides: dict = dataclasses.field(default_factory=dict)  # model config overrides
    task_options: dict = dataclasses.field(default_factory=dict)  # memory-task options

    def validate(self) -> None:
        if self.model not in model_names():
            raise ValueError(f"unknown model {self.model!r}; choose from {model_names()}")
        if self.preset not in preset_names():
            raise ValueError(f"unknown preset {self.preset!r}; choose from {preset_names()}")
        if self.task not in TRAINING_TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {list(TRAINING_TASKS)}")
        for name in ("length", "batch_size", "steps", "save_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.task in MEMORY_TASKS:
            try:  # bad options or a length the task cannot fill fail here, before training
                make_memory_task(self.task, self.length, batch=1, **self.task_options)
            except TypeError as error:
                raise ValueError(str(error)) from None
            vocab = self.model_overrides()["vocab_size"]
            if vocab < task_vocab_size(self.task, self.task_options):
                raise ValueError(
                    f"vocab_size={vocab} is smaller than the {self.task} vocabulary "
                    f"({task_vocab_size(self.task, self.task_options)})"
                )
        elif self.task_options:
            raise ValueError(f"task {self.task!r} takes no task options")

    def model_overrides(self) -> dict:
        """``overrides``, plus the task's vocabulary for a memory task (unless overridden)."""
        if self.task in MEMORY_TASKS:
            vocab = task_vocab_size(self.task, self.task_options)
            return {"vocab_size": vocab, **self.overrides}
        return dict(self.overrides)


@dataclass
class TrainSummary:
    """What a finished (or resumed-and-finished) run reports."""

    out: Path
    steps: int
    tokens: int
    final_loss: float
    wall_time_s: float
    checkpoints: list[Path]


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def masked_lm_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-row mean next-token cross-entropy over marked positions, averaged over rows.

    ``logits`` `(batch, length, vocab)`, ``input_ids`` and ``mask`` `(batch, length)`; rows with
    no marked position are skipped.
    """
    targets = input_ids[:, 1:]
    weights = mask[:, :-1].to(logits.dtype)
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none"
    ).view_as(targets)
    counts = weights.sum(dim=1)
    per_row = (losses * weights).sum(dim=1) / counts.clamp(min=1)
    used = counts > 0
    return per_row[used].mean()


def _parameter_groups(model: CausalLM, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.dim() >= 2 and not name.endswith("A_log"):
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _batch_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**31 - 1)


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = []
    for path in Path(out).glob("ckpt-*"):
        suffix = path.name.removeprefix("ckpt-")
        if (
            suffix.isdigit()
            and (path / TRAINER_STATE).is_file()
            and (path / "config.json").is_file()
        ):
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> TrainSummary:
    """Train ``config.model`` and write checkpoints under ``out`` (see the module docstring).

    ``progress`` receives a dict (step, steps, loss, tokens_per_s, lr) after every step. A
    non-empty ``out`` is refused unless ``resume`` (continue it) or ``force`` (start over).
    """
    config.validate()
    out = Path(out)
    existing = checkpoint_dirs(out) if out.exists() else []
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise FileExistsError(
            f"{out} already holds a run; pass resume=True (--resume) to continue it or "
            "force=True (--force) to start over"
        )
    if force and not resume and out.exists():
        _clear_run(out)
        existing = []
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)

    if resume and existing:
        saved = json.loads((out / "train_config.json").read_text())
        if saved != _config_json(config):
            raise ValueError(
                f"--resume needs the same settings as the run in {out}; it was trained with {saved}"
            )
        model = load_checkpoint(existing[-1]).to(device)
        state = torch.load(existing[-1] / TRAINER_STATE, map_location=device, weights_only=False)
        start_step, tokens, elapsed = state["step"], state["tokens"], state["elapsed_s"]
    else:
        model = build_model(
            config.model, config.preset, seed=config.seed, **config.model_overrides()
        )
        model = model.to(device)
        state, start_step, tokens, elapsed = None, 0, 0, 0.0
        (out / "train_config.json").write_text(json.dumps(_config_json(config), indent=2))
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95)
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    log_path = out / "train_log.csv"
    _truncate_log(log_path, start_step)

    autocast = _autocast(device)
    model.train()
    checkpoints = list(existing)
    loss_value = float("nan")
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(start_step, config.steps):
        step_start = time.perf_counter()
        input_ids, mask = training_batch(
            config.task,
            config.length,
            config.batch_size,
            seed=_batch_seed(config.seed, step),
            split="train",
            paths=config.text,
            task_options=config.task_options,
        )
        input_ids, mask = input_ids.to(device), mask.to(device)
        rate = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        with autocast:
            output = model(input_ids)
        loss = masked_lm_loss(output.logits, input_ids, mask)
        lm_loss = loss.detach()
        if output.aux_loss is not None:
            loss = loss + output.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
        optimizer.step()
        loss_value = lm_loss.item()
        batch_tokens = input_ids.numel()
        tokens += batch_tokens
        window_tokens += batch_tokens
        elapsed += time.perf_counter() - step_start
        done = step + 1
        throughput = window_tokens / max(time.perf_counter() - window_start, 1e-9)
        if done % config.log_every == 0 or done == config.steps:
            _append_log(
                log_path,
                {
                    "step": done,
                    "tokens": tokens,
                    "loss": round(loss_value, 5),
                    "lr": rate,
                    "grad_norm": round(float(grad_norm), 5),
                    "tokens_per_s": round(throughput, 1),
                    "elapsed_s": round(elapsed, 2),
                },
            )
            window_start, window_tokens = time.perf_counter(), 0
        if progress is not None:
            progress(
                {
                    "step": done,
                    "steps": config.steps,
                    "loss": loss_value,
                    "lr": rate,
                    "tokens_per_s": throughput,
                }
            )
        if done % config.save_every == 0 or done == config.steps:
            checkpoints.append(
                _save(model, optimizer, config, out, done, tokens, elapsed, loss_value)
            )
    model.eval()
    return TrainSummary(out, config.steps, tokens, loss_value, elapsed, checkpoints)


def _config_json(config: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _save(model, optimizer, config, out, step, tokens, elapsed, loss) -> Path:
    directory = out / f"ckpt-{step}"
    meta = {
        "training": {
            "step": step,
            "tokens": tokens,
            "loss": loss,
            "wall_time_s": round(elapsed, 1),
            "task": config.task,
            "task_options": config.task_options,
            "length": config.length,
            "seed": config.seed,
        }
    }
    save_checkpoint(model, directory, meta=meta, overwrite=True)
    state = {
        "step": step,
        "tokens": tokens,
        "elapsed_s": elapsed,
        "optimizer": optimizer.state_dict(),
    }
    temporary = directory / (TRAINER_STATE + ".tmp")
    torch.save(state, temporary)
    temporary.replace(directory / TRAINER_STATE)
    return directory


def _append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past ``step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
    path.unlink()
    for row in rows:
        _append_log(path, row)


def _clear_run(out: Path) -> None:
    for path in out.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
