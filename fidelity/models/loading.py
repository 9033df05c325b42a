"""``load_model``: a model by registered name (its shipped default checkpoint, or an untrained
one of a size preset) or by checkpoint directory.

``load_model("memmamba")`` loads the default checkpoint shipped in ``fidelity/data/``;
``load_model("memmamba", preset="tiny")`` builds an untrained model of that size;
``load_model("runs/ckpt-5000")`` loads a checkpoint directory (ours, a mamba_ssm
``MambaLMHeadModel`` directory or a Hugging Face ``MambaForCausalLM`` / ``GPTNeoXForCausalLM``
directory). Names come from :mod:`fidelity.models.registry`, checkpoints are read by
:mod:`fidelity.models.checkpoint`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from fidelity.errors import InputError
from fidelity.models import registry
from fidelity.models.base import CausalLM
from fidelity.models.checkpoint import load_checkpoint
from fidelity.models.decimamba import DeciMambaLM


def load_model(
    name_or_path: str | Path,
    preset: str | None = None,
    *,
    random_init: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> CausalLM:
    """Load a model by registered name or checkpoint directory.

    - a directory: the checkpoint in it (ours, mamba_ssm or Hugging Face; see
      :func:`fidelity.models.checkpoint.load_checkpoint`);
    - a name with ``preset`` or ``random_init=True``: an untrained model of that size
      (``preset`` defaults to the shipped default's size when there is one, else ``small``);
    - a bare name: its shipped default checkpoint (trained; see fidelity/data/TRAINING.md),
      or a further shipped checkpoint (e.g. ``mamba-induction``; see
      :func:`~fidelity.models.registry.shipped_task_checkpoints`).

    ``overrides`` change config fields of untrained models (e.g. ``pool_size=10``). The model
    is returned in eval mode, with ``model.provenance`` saying what it is.
    """
    if not isinstance(name_or_path, str | Path):
        raise TypeError(
            "load_model takes a registered model name (one of "
            f"{', '.join(registry.model_names())}) or a checkpoint directory, got {name_or_path!r}"
        )
    path = Path(name_or_path)
    text = str(name_or_path)
    # a registered name wins over a same-named folder (use ./name for it)
    if text in registry.MODELS:
        model = _load_named(text, preset, random_init, overrides)
    elif text in registry.shipped_task_checkpoints() and not path.exists():
        if preset is not None or random_init or overrides:
            raise InputError(f"{text} is a shipped checkpoint; preset and overrides do not apply")
        model = load_checkpoint(registry.DATA_DIR / text)
        model.provenance = {**model.provenance, "name": text, "shipped_default": True}
    elif path.is_dir():
        if preset is not None or random_init or overrides:
            raise InputError(
                "preset, random_init and config overrides apply to model names, not to a "
                f"checkpoint directory ({text})"
            )
        model = load_checkpoint(path)
    elif path.exists():
        raise InputError(f"{text} is a file, not a checkpoint directory")
    elif "/" in text or "\\" in text or text.startswith("."):
        raise FileNotFoundError(f"checkpoint directory {text} does not exist")
    else:
        raise InputError(
            f"unknown model {text!r}: give a registered name ({', '.join(registry.model_names())}) "
            "or a checkpoint directory"
        )
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _load_named(name: str, preset: str | None, random_init: bool, overrides: dict) -> CausalLM:
    """A registered model: its shipped default, or an untrained one of ``preset``."""
    shipped = registry.shipped_checkpoint(name)
    if preset is None and not random_init and not overrides:
        if shipped is not None:
            model = load_checkpoint(shipped)
            model.provenance = {**model.provenance, "name": name, "shipped_default": True}
            return model
        if (
            name in registry.DERIVED_DEFAULTS
            and registry.shipped_checkpoint(registry.DERIVED_DEFAULTS[name]) is not None
        ):
            return _derived_default(name)
    if preset is None:
        preset = _shipped_preset(shipped) if shipped is not None else registry.DEFAULT_PRESET
        if shipped is None and not random_init:
            warnings.warn(
                f"no trained checkpoint is shipped for {name!r}; using an untrained {preset!r} "
                "model",
                stacklevel=3,
            )
    return registry.build_model(name, preset, **overrides)


def _derived_default(name: str) -> CausalLM:
    """DeciMamba is training-free: its default is the shipped Mamba with decimation, the
    decimation budget set to Mamba's training length (as the DeciMamba paper does)."""
    source = registry.shipped_checkpoint(registry.DERIVED_DEFAULTS[name])
    mamba = load_checkpoint(source)
    training_length = int(mamba.provenance.get("training", {}).get("length", 2000))
    model = DeciMambaLM.from_mamba(mamba, decimation_base_length=training_length)
    model.provenance = {
        **mamba.provenance,
        "name": name,
        "shipped_default": True,
        "derived_from": str(source),
    }
    return model


def _shipped_preset(directory: Path) -> str:
    meta = json.loads((directory / "config.json").read_text())
    return meta.get("preset") or registry.DEFAULT_PRESET
