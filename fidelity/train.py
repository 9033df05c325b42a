"""A small, resumable training loop that makes real checkpoints on CPU or GPU.

``train(TrainConfig(...), out="runs/mm")`` trains a registered model from scratch on byte-level
language modelling, passkey retrieval, multi-key key-value retrieval or a mix of them (see
:func:`fidelity.probes.tasks.training_batch`). Every ``save_every`` steps it writes
``out/ckpt-<step>/``, a checkpoint directory that :func:`fidelity.load_model` and
``fidelity analyze`` accept (so ``fidelity compare`` can follow forgetting across training),
plus the optimizer state needed to resume (``trainer_state.safetensors`` for its tensors and
``trainer_state.json`` for the rest: no pickle, so resuming someone else's run cannot run code).
``train_log.csv`` gets a row every ``log_every`` steps. After a kill, ``resume=True`` continues
from the newest complete checkpoint, losing at most ``save_every`` steps; because batches are a
pure function of (seed, step), a resumed run sees exactly the batches an uninterrupted one would
(with ``state_passing``, though, it starts again from zero states: carried states are not saved).

The run directory's manifest (:mod:`fidelity.destinations`) lists every file training wrote;
``force=True`` deletes only those, and only in a directory that holds a training run's manifest.

Loss: next-token cross-entropy over the positions the task marks, averaged per row first and
then over rows, so a retrieval row (a handful of answer tokens) weighs as much as a text row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fidelity import state_passing
from fidelity.ablation import Transfer, transfer_weights
from fidelity.destinations import (
    MANIFEST,
    check_writable,
    clear_owned,
    owned_files,
    record_files,
)
from fidelity.devices import resolve_device
from fidelity.errors import InputError
from fidelity.models.base import CausalLM
from fidelity.models.checkpoint import load_checkpoint, save_checkpoint
from fidelity.models.loading import load_model
from fidelity.models.registry import build_model, model_names, preset_names
from fidelity.probes.memory_tasks import MEMORY_TASKS, make_memory_task, task_vocab_size
from fidelity.probes.tasks import TRAINING_TASKS, check_retrieval_options, training_batch

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LEGACY_STATE = "trainer_state.pt"
"""Trainer state of older versions: a pickle, never loaded (unpickling can run code)."""
STATE_FORMAT = 1
RUN_KIND = "training"
INIT_RECORD = "init.json"
"""What ``--init`` across ablation switches dropped and left at initialization (such runs only)."""
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
    task_options: dict = dataclasses.field(default_factory=dict)  # task options (memory, mix)
    state_passing: str = "off"  # off | carry | noise: initial states (fidelity.state_passing)
    init: str | None = None  # start from these weights (checkpoint dir or shipped name)

    def validate(self) -> None:
        if self.model not in model_names():
            raise InputError(f"unknown model {self.model!r}; choose from {model_names()}")
        if self.preset not in preset_names():
            raise InputError(f"unknown preset {self.preset!r}; choose from {preset_names()}")
        if self.task not in TRAINING_TASKS:
            raise InputError(f"unknown task {self.task!r}; choose from {list(TRAINING_TASKS)}")
        for name in ("length", "batch_size", "steps", "save_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if self.state_passing not in state_passing.MODES:
            raise InputError(
                f"state_passing must be one of {', '.join(state_passing.MODES)}, "
                f"got {self.state_passing!r}"
            )
        if self.state_passing != "off" and self.model not in state_passing.MODELS:
            raise InputError(
                f"state passing needs a model whose state is a fixed-size tensor "
                f"({', '.join(state_passing.MODELS)}), not {self.model!r}"
            )
        if self.task in MEMORY_TASKS:
            try:  # bad options or a length the task cannot fill fail here, before training
                make_memory_task(self.task, self.length, batch=1, **self.task_options)
            except TypeError as error:
                raise InputError(str(error)) from None
            vocab = self.model_overrides()["vocab_size"]
            if vocab < task_vocab_size(self.task, self.task_options):
                raise InputError(
                    f"vocab_size={vocab} is smaller than the {self.task} vocabulary "
                    f"({task_vocab_size(self.task, self.task_options)})"
                )
        elif self.task in ("passkey", "mix"):
            check_retrieval_options(self.task_options)
            if self.task == "passkey" and "shares" in self.task_options:
                raise InputError("the option shares is for --task mix only")
        elif self.task_options:
            raise InputError(f"task {self.task!r} takes no task options")

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
        if suffix.isdigit() and all(
            (path / name).is_file() for name in (STATE_JSON, STATE_TENSORS, "config.json")
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
    notify: Callable[[str], None] | None = None,
) -> TrainSummary:
    """Train ``config.model`` and write checkpoints under ``out`` (see the module docstring).

    ``progress`` receives a dict (step, steps, loss, tokens_per_s, lr) after every step. A
    non-empty ``out`` is refused unless ``resume`` (continue it) or ``force`` (start over).
    When ``config.init`` differs from the wanted model in ablation switches, ``notify`` gets one
    line saying which parameters were dropped or left at their initialization; the same record
    is written to ``out/init.json`` and to every checkpoint's ``meta.training.init``.
    """
    config.validate()
    out = Path(out)
    device = resolve_device(config.device)
    check_run_directory(out, resume=resume, force=force)
    fresh, transfer = None, None
    if not (resume and out.is_dir() and checkpoint_dirs(out)):
        fresh, transfer = _initial_model(config)  # a bad --init fails here, before any write
    existing = _prepare_out(out, resume=resume, force=force)
    torch.manual_seed(config.seed)

    if resume and existing:
        saved = _read_json(out / "train_config.json")
        if isinstance(saved, dict):  # settings added since the run started take their defaults
            saved = {**_config_json(TrainConfig()), **saved}
        if saved != _config_json(config):
            raise InputError(
                f"--resume needs the same settings as the run in {out}; it was trained with {saved}"
            )
        model = load_checkpoint(existing[-1]).to(device)
        state = load_trainer_state(existing[-1])
        init_record = _read_json(out / INIT_RECORD) if (out / INIT_RECORD).is_file() else None
        start_step, tokens, elapsed = state["step"], state["tokens"], state["elapsed_s"]
    else:
        model = fresh.to(device)
        state, start_step, tokens, elapsed = None, 0, 0, 0.0
        record_files(out, RUN_KIND, ["train_config.json", "train_log.csv", INIT_RECORD])
        (out / "train_config.json").write_text(json.dumps(_config_json(config), indent=2))
        init_record = None
        if transfer is not None and transfer.switched:
            init_record = {"checkpoint": config.init, **transfer.to_dict()}
            (out / INIT_RECORD).write_text(json.dumps(init_record, indent=2))
            if notify is not None:
                notify(f"--init {config.init}: {transfer.describe()}")
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95)
    )
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(
                f"the trainer state in {existing[-1]} does not fit this model's optimizer: {error}"
            ) from None
    log_path = out / "train_log.csv"
    _truncate_log(log_path, start_step)

    autocast = _autocast(device)
    model.train()
    checkpoints = list(existing)
    loss_value = float("nan")
    window_start, window_tokens = time.perf_counter(), 0
    states, noise = None, torch.Generator().manual_seed(config.seed)
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
        cache = state_passing.initial_cache(
            model, config.state_passing, states, config.batch_size, noise
        )
        with autocast:
            output = model(input_ids) if cache is None else model(input_ids, cache=cache)
        if cache is not None:
            states = state_passing.final_states(cache)
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
                _save(model, optimizer, config, out, done, tokens, elapsed, loss_value, init_record)
            )
    model.eval()
    return TrainSummary(out, config.steps, tokens, loss_value, elapsed, checkpoints)


def _initial_model(config: TrainConfig) -> tuple[CausalLM, Transfer | None]:
    """A fresh model (seeded), or the weights of ``config.init`` when given, with what moving
    them took. Those must be the model and shape the config asks for; a MemMamba may differ in
    its ablation switches (:data:`fidelity.ablation.ABLATION_SWITCHES`): every parameter both
    have is loaded, the others dropped or left at their initialization (the Transfer says
    which)."""
    model = build_model(config.model, config.preset, seed=config.seed, **config.model_overrides())
    if config.init is None:
        return model, None
    start = load_model(config.init)
    try:
        transfer = transfer_weights(start, model)
    except InputError as error:
        raise InputError(f"--init {config.init} is {error}") from None
    return model, transfer


def _config_json(config: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _save(model, optimizer, config, out, step, tokens, elapsed, loss, init_record) -> Path:
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
            **({"init": init_record} if init_record else {}),
        }
    }
    names = [*CHECKPOINT_FILES, STATE_TENSORS + ".tmp", STATE_JSON + ".tmp"]
    record_files(out, RUN_KIND, [f"{directory.name}/{name}" for name in names])
    save_checkpoint(model, directory, meta=meta, overwrite=True)
    save_trainer_state(directory, optimizer, step=step, tokens=tokens, elapsed_s=elapsed)
    return directory


CHECKPOINT_FILES = ("config.json", "model.safetensors", STATE_TENSORS, STATE_JSON)
"""What training writes into each ``ckpt-<step>`` directory."""


def save_trainer_state(
    directory: Path, optimizer: torch.optim.Optimizer, *, step: int, tokens: int, elapsed_s: float
) -> None:
    """``optimizer``'s state and the loop counters in ``directory``: tensors (named
    ``<parameter index>.<key>``) in :data:`STATE_TENSORS`, everything else in :data:`STATE_JSON`
    (written last: a checkpoint is complete once it exists)."""
    optimizer_state = optimizer.state_dict()
    tensors, slots = {}, {}
    for index, values in optimizer_state["state"].items():
        slot = {"tensors": [], "values": {}}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                slot["tensors"].append(key)
            else:
                slot["values"][key] = value
        slots[str(index)] = slot
    header = {
        "format_version": STATE_FORMAT,
        "step": step,
        "tokens": tokens,
        "elapsed_s": elapsed_s,
        "optimizer": {"state": slots, "param_groups": optimizer_state["param_groups"]},
    }
    temporary = directory / (STATE_TENSORS + ".tmp")
    save_file(tensors, str(temporary))
    temporary.replace(directory / STATE_TENSORS)
    temporary = directory / (STATE_JSON + ".tmp")
    temporary.write_text(json.dumps(header, indent=1))
    temporary.replace(directory / STATE_JSON)


def load_trainer_state(directory: Path) -> dict:
    """What :func:`save_trainer_state` wrote: ``step``, ``tokens``, ``elapsed_s`` and
    ``optimizer`` (a state dict for ``load_state_dict``). InputError for a corrupt state."""
    header = _read_json(directory / STATE_JSON)
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
    except (SafetensorError, OSError) as error:
        raise InputError(
            f"{directory / STATE_TENSORS} is not a readable tensor file: {error}"
        ) from None
    try:
        if header["format_version"] != STATE_FORMAT:
            raise InputError(
                f"{directory / STATE_JSON} has format version {header['format_version']!r}; "
                f"this version reads {STATE_FORMAT}"
            )
        counters = {key: header[key] for key in ("step", "tokens", "elapsed_s")}
        if not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in counters.values()
        ):
            raise TypeError("step, tokens and elapsed_s must be numbers")
        state = {}
        for index, slot in header["optimizer"]["state"].items():
            values = dict(slot["values"])
            for key in slot["tensors"]:
                values[key] = tensors[f"{index}.{key}"]
            state[int(index)] = values
        groups = [
            {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
            for group in header["optimizer"]["param_groups"]
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(
            f"{directory / STATE_JSON} is not a valid trainer state ({type(error).__name__}: "
            f"{error}); resume from another checkpoint or start over with --force"
        ) from None
    return {**counters, "optimizer": {"state": state, "param_groups": groups}}


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is missing; the run directory is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None


def check_run_directory(out: str | Path, *, resume: bool, force: bool) -> None:
    """Raise unless ``train(..., out, resume=resume, force=force)`` may write ``out``: a new or
    empty directory, or a training run fidelity wrote (continued with ``resume``, cleared of
    fidelity's files with ``force``), writable, with no pickled trainer state to resume."""
    out = Path(out)
    if out.exists() and (out.is_symlink() or not out.is_dir()):
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    if resume:
        legacy = sorted(
            p.parent.name
            for p in out.glob(f"ckpt-*/{LEGACY_STATE}")
            if not (p.parent / STATE_JSON).exists()
        )
        if legacy:
            raise InputError(
                f"{out}/{legacy[-1]} holds its trainer state as a pickle ({LEGACY_STATE}, older "
                "versions), which fidelity does not load because unpickling can run code; "
                "train into another --out"
            )
    if out.is_dir() and any(out.iterdir()):
        if owned_files(out, RUN_KIND) is None:
            raise FileExistsError(
                f"{out} is not empty and holds no training run written by fidelity (no {MANIFEST}"
                " of kind 'training'); refusing to write there, even with --force: choose "
                "another --out"
            )
        if not (resume or force):
            raise FileExistsError(
                f"{out} already holds a run; pass resume=True (--resume) to continue it or "
                "force=True (--force) to start over"
            )
        owned = set(owned_files(out, RUN_KIND) or [])
        foreign = sorted(
            p.relative_to(out).as_posix()
            for p in out.glob("ckpt-*/*")
            if p.relative_to(out).as_posix() not in owned
        )
        if foreign:
            raise FileExistsError(
                f"{out / foreign[0]} was not written by fidelity, and checkpoint directories are "
                "replaced whole; move it out of the run directory first"
            )
    check_writable(out)


def _prepare_out(out: Path, *, resume: bool, force: bool) -> list[Path]:
    """Check ``out`` (:func:`check_run_directory`) and make it ready: the checkpoints to resume
    from, or an empty start (fidelity's files of an old run deleted)."""
    check_run_directory(out, resume=resume, force=force)
    existing = checkpoint_dirs(out) if resume and out.is_dir() else []
    if existing:
        return existing
    if out.is_dir() and any(out.iterdir()):
        clear_owned(out, RUN_KIND)
    out.mkdir(parents=True, exist_ok=True)
    return []


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
