"""Checkpoint directories: save ours, load ours and (through :mod:`fidelity.models.importers`)
foreign ones.

Our format (written by :func:`save_checkpoint`): ``config.json`` ::

    {"library": "memory-fidelity", "format_version": 1, "model_type": ..., "config": {...},
     "preset": ..., "weights_dtype": "float32", "meta": {...}}

and ``model.safetensors`` (tied weights stored once).

:func:`load_checkpoint` also reads mamba_ssm and Hugging Face Mamba / GPT-NeoX directories,
recognized from ``config.json`` by :func:`fidelity.models.importers.importer_for`. Whatever the
format, every expected weight must be present, nothing unexpected may be left over and every
shape must match; otherwise a ``ValueError`` lists what was expected and what was found.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fidelity.atomic import atomic_directory
from fidelity.errors import InputError
from fidelity.models.base import CausalLM
from fidelity.models.checkpoint_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Source,
    require_keys,
)
from fidelity.models.config import ModelConfig
from fidelity.models.importers import importer_for
from fidelity.models.registry import config_from_dict, model_from_config

LIBRARY = "memory-fidelity"
FORMAT_VERSION = 1
ACCEPTED_FORMATS = (
    "a memory-fidelity checkpoint (config.json with a 'library' key), a mamba_ssm "
    "MambaLMHeadModel directory (config.json with d_model, n_layer, ssm_cfg), or a Hugging Face "
    "MambaForCausalLM / GPTNeoXForCausalLM directory (config.json with model_type 'mamba' / "
    "'gpt_neox')"
)
_SHOWN = 5  # how many offending keys an error message lists


# -- saving ------------------------------------------------------------------------------------
def save_checkpoint(
    model: CausalLM,
    directory: str | os.PathLike,
    *,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` to ``directory`` (``config.json`` + ``model.safetensors``); return it.

    ``meta`` (JSON-serializable) is stored as is and merged into ``model.provenance`` on load:
    e.g. ``{"step": 5000, "tokens": 2e7}``; ``{"trained": False}`` marks an untrained model
    (checkpoints count as trained otherwise). Floating-point weights are stored in ``dtype``
    (float16 for small shipped files; they load back as float32).

    The write is atomic: files go to a temporary sibling directory that is renamed into place.
    An existing ``directory`` is refused unless ``overwrite=True``; then it is replaced (it must
    be empty or hold a ``config.json``, so that no unrelated directory is ever deleted).
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be a fidelity CausalLM, got {type(model).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float16), got {dtype!r}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")
    target = Path(directory)
    _check_target(target, overwrite)
    provenance = getattr(model, "provenance", None) or {}
    header = {
        "library": LIBRARY,
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "config": model.config.to_dict(),
        "preset": provenance.get("preset"),
        "weights_dtype": str(dtype).removeprefix("torch."),
        "meta": meta or {},
    }
    try:
        config_text = json.dumps(header, indent=2)
    except (TypeError, ValueError) as error:
        raise TypeError(f"meta must be JSON-serializable: {error}") from None
    tensors = {
        name: (tensor.to(dtype) if tensor.is_floating_point() else tensor).detach().cpu()
        for name, tensor in unique_state(model).items()
    }
    with atomic_directory(target, lambda path: _check_target(path, overwrite)) as staging:
        (staging / CONFIG_FILE).write_text(config_text + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / WEIGHTS_FILE))
    return target


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without aliases: a tensor shared by several names (tied
    embeddings) is kept under its first name only."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if identity in seen:
            continue
        seen.add(identity)
        state[name] = tensor
    return state


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is a file, not a checkpoint directory")
    if target.is_dir():
        if not overwrite:
            raise FileExistsError(
                f"checkpoint directory {target} already exists; pass overwrite=True to replace it"
            )
        if any(target.iterdir()) and not (target / CONFIG_FILE).is_file():
            raise InputError(
                f"refusing to overwrite {target}: it is neither empty nor a checkpoint "
                f"directory (no {CONFIG_FILE})"
            )


# -- loading -----------------------------------------------------------------------------------
def load_checkpoint(
    directory: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> CausalLM:
    """Load the checkpoint in ``directory`` (any format in the module docstring) in eval mode,
    with ``dtype`` floating-point weights (float32 by default, also for half-precision files).

    The model carries ``model.provenance``: ``name``, ``checkpoint`` (the directory),
    ``trained``, ``preset``, ``format`` and the checkpoint's stored ``meta``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = Path(directory)
    header = _read_config(path)
    source = _detect_source(path, header)
    with torch.random.fork_rng(devices=[]):
        model = _model_for(source.config, path)
    model.to(dtype)
    weights = _read_weights(path, source.weight_files)
    _load_weights(model, weights, source.rename, path)
    model.to(device=device)
    model.eval()
    model.provenance = {
        "name": source.config.model_type,
        "checkpoint": str(path),
        "trained": True,
        "preset": None,
        **source.provenance,
    }
    return model


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise InputError(f"{path} is a file, not a checkpoint directory")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; expected {ACCEPTED_FORMATS}")
    try:
        header = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise InputError(f"{config_path} must hold a JSON object, got {type(header).__name__}")
    return header


def _detect_source(path: Path, header: dict[str, Any]) -> Source:
    if "library" in header:
        return _ours(path, header)
    importer = importer_for(header)
    if importer is None:
        raise InputError(
            f"{path / CONFIG_FILE} is in no known checkpoint format (keys found: "
            f"{sorted(header)[:10]}); expected {ACCEPTED_FORMATS}"
        )
    return importer(header)


def _model_for(config: ModelConfig, path: Path) -> CausalLM:
    try:
        return model_from_config(config)
    except ImportError as error:
        raise InputError(
            f"{path} holds a {config.model_type!r} model, whose module is not available in this "
            f"version of memory-fidelity ({error})"
        ) from None


def _read_weights(path: Path, candidates: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The first weight file of ``candidates`` found in ``path`` (a ``*.index.json`` names
    shards); ``.safetensors`` through safetensors, ``.bin`` with ``weights_only=True``."""
    for name in candidates:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(_read_index(file).values()))
            weights = {}
            for shard in shards:
                weights.update(_read_weight_file(path / shard))
            return weights
        return _read_weight_file(file)
    raise FileNotFoundError(f"{path} has no weights file; expected one of {list(candidates)}")


def _read_index(file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(file.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise InputError(f"{file} is not a valid shard index (a 'weight_map'): {error}") from None
    return weight_map


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"weights file {file} (named by the shard index) does not exist")
    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise InputError(f"could not read weights file {file}: {reason}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise InputError(f"{file} must hold a state dict (name -> tensor)")
    return dict(state)


def _load_weights(
    model: CausalLM,
    weights: dict[str, torch.Tensor],
    rename: Callable[[str], str | None],
    path: Path,
) -> None:
    """Copy ``weights`` (renamed onto our names) into ``model``, checking names and shapes."""
    expected = unique_state(model)
    found: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in weights.items():
        ours = rename(name)
        if ours is None:
            continue
        if ours in expected:
            found[ours] = tensor
        else:
            unexpected.append(name)
    head = next((n for n in weights if rename(n) == "lm_head.weight"), None)
    if model.config.tie_embeddings and head is not None:
        unexpected.remove(head)
        embedding = found.get("embedding.weight")
        if embedding is not None and not torch.equal(weights[head], embedding):
            raise InputError(
                f"{path}: the config ties the LM head to the embedding, but the stored "
                f"{head!r} differs from the embedding"
            )
    missing = [name for name in expected if name not in found]
    mismatched = [
        f"{name}: expected {tuple(expected[name].shape)}, found {tuple(tensor.shape)}"
        for name, tensor in found.items()
        if tensor.shape != expected[name].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing weights {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected weights {_first(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_first(mismatched)}")
    if problems:
        raise InputError(
            f"weights in {path} do not fit the {type(model).__name__} its config describes: "
            + "; ".join(problems)
        )
    with torch.no_grad():
        for name, tensor in found.items():
            expected[name].copy_(tensor)


def _first(items: list[str]) -> str:
    shown = ", ".join(repr(item) for item in items[:_SHOWN])
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"[{shown}{more}] ({len(items)} in all)"


# -- our format --------------------------------------------------------------------------------
def _ours(path: Path, header: dict[str, Any]) -> Source:
    if header["library"] != LIBRARY:
        raise InputError(
            f"{path / CONFIG_FILE} was written by {header['library']!r}, not {LIBRARY!r}"
        )
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(
            f"{path / CONFIG_FILE}: 'format_version' must be a whole number such as "
            f"{FORMAT_VERSION} (not a string), got {version!r}"
        )
    if version > FORMAT_VERSION:
        raise InputError(
            f"{path} has checkpoint format version {version!r}; this version of memory-fidelity "
            f"reads versions up to {FORMAT_VERSION}"
        )
    require_keys(header, ("config",), "memory-fidelity")
    if not isinstance(header["config"], dict):
        raise InputError(
            f"{path / CONFIG_FILE}: 'config' must be a JSON object of model settings (with "
            f"'model_type'), got {type(header['config']).__name__} {header['config']!r:.60}"
        )
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise InputError(f"{path / CONFIG_FILE}: 'meta' must be a JSON object")
    try:
        config = config_from_dict(header["config"])
    except ImportError as error:
        raise InputError(
            f"{path} holds a {header.get('model_type')!r} model, whose module is not available "
            f"in this version of memory-fidelity ({error})"
        ) from None
    return Source(
        config=config,
        rename=lambda name: name,
        weight_files=(WEIGHTS_FILE,),
        provenance={"preset": header.get("preset"), "format": LIBRARY, **meta},
    )
