"""The catalogue of models: registered names (their config and model classes), size presets,
the checkpoints shipped in ``fidelity/data/``, and untrained models built from them.

Loading (a shipped default, a checkpoint directory) is :mod:`fidelity.models.loading`'s job; this
module imports no checkpoint code.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fidelity.errors import InputError
from fidelity.models.base import CausalLM
from fidelity.models.config import ModelConfig

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: where its classes live (``module:ClassName``, imported on first
    use) and a one-line description."""

    name: str
    config_class_path: str
    model_class_path: str
    description: str

    @property
    def config_class(self) -> type[ModelConfig]:
        return _import(self.config_class_path)

    @property
    def model_class(self) -> type[CausalLM]:
        return _import(self.model_class_path)


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    """Add ``spec`` to the registry (``fidelity models`` lists it)."""
    MODELS[spec.name] = spec


for _spec_args in (
    ("mamba", "mamba", "MambaConfig", "MambaLM", "Mamba-1 selective SSM (Gu & Dao 2023)"),
    (
        "memmamba",
        "memmamba",
        "MemMambaConfig",
        "MemMambaLM",
        "Mamba + note pool + sparse cross-token/cross-layer attention (arXiv 2510.03279)",
    ),
    (
        "decimamba",
        "decimamba",
        "DeciMambaConfig",
        "DeciMambaLM",
        "Mamba with Delta-ranked token decimation in chosen layers (Ben-Kish et al. 2024)",
    ),
    (
        "transformer",
        "transformer",
        "TransformerConfig",
        "TransformerLM",
        "causal Pythia/GPT-NeoX-style Transformer (RoPE, parallel attention+MLP)",
    ),
    ("mamba2", "mamba2", "Mamba2Config", "Mamba2LM", "Mamba-2 SSD mixer (Dao & Gu 2024)"),
    (
        "compressive",
        "compressive",
        "CompressiveConfig",
        "CompressiveTransformerLM",
        "Compressive Transformer: memory + compressed memory (Rae et al. 2019)",
    ),
):
    _name, _module, _config_class, _model_class, _description = _spec_args
    register_model(
        ModelSpec(
            _name,
            f"fidelity.models.{_module}:{_config_class}",
            f"fidelity.models.{_module}:{_model_class}",
            _description,
        )
    )

# Size presets: shared fields (each applied where a model's config has it), then per-model
# extras.
PRESETS: dict[str, dict[str, Any]] = {
    # for tests: seconds on a CPU
    "tiny": {"d_model": 32, "n_layer": 2, "d_state": 8},
    # the shipped default checkpoints: trains in well under an hour on 2 CPU cores, a few MB
    "mini": {"d_model": 128, "n_layer": 6, "d_state": 16},
    # around 10M parameters: CPU experiments
    "small": {"d_model": 384, "n_layer": 8, "d_state": 16},
    # mamba-130m's shape (24 x 768); with a byte vocabulary the embedding is tiny
    "130m": {"d_model": 768, "n_layer": 24, "d_state": 16},
    # the paper's ~200M-parameter, 24-layer scale
    "200m": {"d_model": 1024, "n_layer": 24, "d_state": 16},
}
PRESET_EXTRAS: dict[str, dict[str, dict[str, Any]]] = {
    "memmamba": {
        "tiny": {
            "summary_dim": 16,
            "pool_size": 8,
            "n_heads": 2,
            "cross_layer_every": 2,
            "note_window": 4,
            "block_size": 32,
        },
        "mini": {"summary_dim": 64, "pool_size": 50, "cross_layer_every": 2},
        "small": {"cross_layer_every": 4},
        "130m": {"cross_layer_every": 4},
        "200m": {"cross_layer_every": 4},
    },
    "transformer": {
        "tiny": {"n_heads": 2},
        "mini": {"n_heads": 4},
        "small": {"n_heads": 6},
        "130m": {"n_heads": 12},
        "200m": {"n_heads": 16},
    },
    "mamba2": {
        "tiny": {"headdim": 16},
        "mini": {"headdim": 32, "d_state": 16},  # Mamba-1 mini's state size; fits CPU training
        "small": {"headdim": 64, "d_state": 64},
        "130m": {"headdim": 64, "d_state": 128},
        "200m": {"headdim": 64, "d_state": 128},
    },
    "compressive": {
        "tiny": {
            "n_heads": 2,
            "segment_length": 16,
            "memory_length": 16,
            "compressed_memory_length": 8,
        },
        "mini": {
            "n_heads": 4,
            "segment_length": 256,
            "memory_length": 256,
            "compressed_memory_length": 256,
        },
        "small": {"n_heads": 6},
        "130m": {"n_heads": 12},
        "200m": {"n_heads": 16},
    },
    "decimamba": {
        "tiny": {"decimation_base_length": 16, "decimation_min_length": 4},
    },
}
DEFAULT_PRESET = "small"
DERIVED_DEFAULTS = {"decimamba": "mamba"}
"""Models whose default is built from another model's shipped checkpoint (training-free)."""


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def preset_names() -> list[str]:
    return list(PRESETS)


def build_config(name: str, preset: str = DEFAULT_PRESET, **overrides: Any) -> ModelConfig:
    """The config of model ``name`` at size ``preset`` with ``overrides`` applied."""
    spec = _spec(name)
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; available presets: {preset_names()}")
    config_class = spec.config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    shared = {key: value for key, value in PRESETS[preset].items() if key in fields}
    values = {**shared, **PRESET_EXTRAS.get(name, {}).get(preset, {}), **overrides}
    return config_class().replace(**values)


def build_model(
    name: str, preset: str = DEFAULT_PRESET, seed: int | None = 0, **overrides: Any
) -> CausalLM:
    """An untrained (randomly initialized, from ``seed``) model ``name`` at size ``preset``."""
    config = build_config(name, preset, **overrides)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = _spec(name).model_class(config)
    model.provenance = {"name": name, "preset": preset, "checkpoint": None, "trained": False}
    return model


def config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Rebuild a config from :meth:`ModelConfig.to_dict` output."""
    name = values.get("model_type")
    return _spec(name).config_class.from_dict(values)


def model_from_config(config: ModelConfig) -> CausalLM:
    """An untrained model for ``config``."""
    return _spec(config.model_type).model_class(config)


def shipped_checkpoint(name: str) -> Path | None:
    """The default checkpoint directory shipped for ``name``, or None."""
    directory = DATA_DIR / name
    return directory if (directory / "config.json").is_file() else None


def shipped_task_checkpoints() -> list[str]:
    """Names of the further checkpoints shipped in ``fidelity/data/`` (folders that are not a
    registered model's default, e.g. ``mamba-induction``), sorted; load them by name."""
    return sorted(
        path.name
        for path in DATA_DIR.iterdir()
        if path.name not in MODELS and (path / "config.json").is_file()
    )


def training_description(directory: Path) -> str:
    """What the checkpoint in ``directory`` was trained on, from its recorded meta."""
    meta = json.loads((directory / "config.json").read_text()).get("meta", {})
    training = meta.get("training", {})
    if not training:
        return "-"
    options = training.get("task_options") or {}
    task = training.get("task", "?")
    if options:
        task += " (" + ", ".join(f"{key}={value}" for key, value in options.items()) + ")"
    stages = training.get("stages") or []
    steps = f"{training.get('steps', '?')} steps"
    if len(stages) > 1:  # a curriculum: the stages' tasks, first first (the last one's options)
        tasks = " then ".join(_stage_task(stage) for stage in stages)
        steps += f" in {len(stages)} stages ({tasks})"
    length, seed = training.get("length", "?"), training.get("seed", "?")
    return f"{task}, length {length}, {steps}, seed {seed}"


def _stage_task(stage: dict) -> str:
    """The ``--task`` of one recorded curriculum stage's command, with its step count."""
    words = str(stage.get("command", "")).split()
    task = words[words.index("--task") + 1] if "--task" in words[:-1] else "?"
    return f"{task} x {stage.get('steps', '?')}"


def _spec(name: str | None) -> ModelSpec:
    if name not in MODELS:
        raise InputError(f"unknown model type {name!r}; registered models: {model_names()}")
    return MODELS[name]
