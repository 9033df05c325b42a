"""Checkpoint directories: save and load ours, import mamba_ssm and Hugging Face ones.

Our format (written by :func:`save_checkpoint`): ``config.json`` ::

    {"library": "memory-fidelity", "format_version": 1, "model_type": ..., "config": {...},
     "preset": ..., "weights_dtype": "float32", "meta": {...}}

and ``model.safetensors`` (tied weights stored once).

:func:`load_checkpoint` also reads, recognized from ``config.json``:

- a mamba_ssm ``MambaLMHeadModel`` directory (``d_model``, ``n_layer``, ``ssm_cfg``, ...;
  ``pytorch_model.bin``) -> :class:`~fidelity.models.mamba.MambaLM` (``ssm_cfg.layer ==
  "Mamba2"`` -> ``Mamba2LM`` when :mod:`fidelity.models.mamba2` exists);
- a Hugging Face ``MambaForCausalLM`` directory (``"model_type": "mamba"``) -> ``MambaLM``;
- a Hugging Face ``GPTNeoXForCausalLM`` directory (``"model_type": "gpt_neox"``, e.g. Pythia)
  -> :class:`~fidelity.models.transformer.TransformerLM`.

Every expected weight must be present, nothing unexpected may be left over and every shape
must match; otherwise a ``ValueError`` lists what was expected and what was found.
Compute-only flags of the sources (``residual_in_fp32``, ``fused_add_norm``) do not change
the function a float32 model computes and are not carried over.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fidelity.models.base import CausalLM
from fidelity.models.config import ModelConfig

LIBRARY = "memory-fidelity"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
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
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        (staging / CONFIG_FILE).write_text(config_text + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / WEIGHTS_FILE))
        _move_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
            raise ValueError(
                f"refusing to overwrite {target}: it is neither empty nor a checkpoint "
                f"directory (no {CONFIG_FILE})"
            )


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and
    restored if the rename fails (a directory cannot be replaced in one atomic step)."""
    _check_target(target, overwrite)
    if not target.exists():
        staging.rename(target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    backup.rmdir()
    target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# -- loading -----------------------------------------------------------------------------------
@dataclass
class _Source:
    """What a checkpoint format contributes: our config, how its weight names map onto ours
    (``None``: a name to ignore), where its weights are and what to record as provenance."""

    config: ModelConfig
    rename: Callable[[str], str | None]
    weight_files: tuple[str, ...]
    provenance: dict[str, Any]


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
        raise ValueError(f"{path} is a file, not a checkpoint directory")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; expected {ACCEPTED_FORMATS}")
    try:
        header = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(header).__name__}")
    return header


def _detect_source(path: Path, header: dict[str, Any]) -> _Source:
    if "library" in header:
        return _ours(path, header)
    if header.get("model_type") == "mamba" and "hidden_size" in header:
        return _huggingface_mamba(header)
    if header.get("model_type") == "gpt_neox":
        return _huggingface_gpt_neox(header)
    if {"d_model", "n_layer", "vocab_size"} <= set(header):
        return _mamba_ssm(header)
    raise ValueError(
        f"{path / CONFIG_FILE} is in no known checkpoint format (keys found: "
        f"{sorted(header)[:10]}); expected {ACCEPTED_FORMATS}"
    )


def _model_for(config: ModelConfig, path: Path) -> CausalLM:
    from fidelity.models.registry import model_from_config

    try:
        return model_from_config(config)
    except ImportError as error:
        raise ValueError(
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
        raise ValueError(f"{file} is not a valid shard index (a 'weight_map'): {error}") from None
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
        raise ValueError(f"could not read weights file {file}: {reason}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ValueError(f"{file} must hold a state dict (name -> tensor)")
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
            raise ValueError(
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
        raise ValueError(
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


def _renamer(rules: list[tuple[str, str]], ignored: str | None = None) -> Callable[[str], str]:
    """Map a source weight name with the first matching ``(pattern, replacement)``; names
    matching ``ignored`` map to None; unmatched names are kept (and then reported)."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    ignored_pattern = re.compile(ignored) if ignored else None

    def rename(name: str) -> str | None:
        if ignored_pattern is not None and ignored_pattern.search(name):
            return None
        for pattern, replacement in compiled:
            if pattern.match(name):
                return pattern.sub(replacement, name, count=1)
        return name

    return rename


def _require(header: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [key for key in keys if key not in header]
    if missing:
        raise ValueError(f"{what} config.json lacks {missing}")


# -- the formats -------------------------------------------------------------------------------
def _ours(path: Path, header: dict[str, Any]) -> _Source:
    from fidelity.models.registry import config_from_dict

    if header["library"] != LIBRARY:
        raise ValueError(
            f"{path / CONFIG_FILE} was written by {header['library']!r}, not {LIBRARY!r}"
        )
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {version!r}; this version of memory-fidelity "
            f"reads versions up to {FORMAT_VERSION}"
        )
    _require(header, ("config",), "memory-fidelity")
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path / CONFIG_FILE}: 'meta' must be a JSON object")
    try:
        config = config_from_dict(header["config"])
    except ImportError as error:
        raise ValueError(
            f"{path} holds a {header.get('model_type')!r} model, whose module is not available "
            f"in this version of memory-fidelity ({error})"
        ) from None
    return _Source(
        config=config,
        rename=lambda name: name,
        weight_files=(WEIGHTS_FILE,),
        provenance={"preset": header.get("preset"), "format": LIBRARY, **meta},
    )


# mamba_ssm's ssm_cfg keys that only affect initialization or speed, not the function computed
_MAMBA_SSM_INIT_ONLY = {"layer", "dt_init", "dt_scale", "conv_init", "use_fast_path",
                        "use_mem_eff_path"}  # fmt: skip
_MAMBA_SSM_KNOWN = {
    "d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
    "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
    "tie_embeddings", "norm_epsilon",
}  # fmt: skip
_MAMBA_SSM_RULES = [
    (r"^backbone\.embedding\.", "embedding."),
    (r"^backbone\.layers\.", "layers."),
    (r"^backbone\.norm_f\.", "norm_f."),
]


def _mamba_ssm(header: dict[str, Any]) -> _Source:
    if header.get("rms_norm", True) is not True:
        raise ValueError("mamba_ssm checkpoints with LayerNorm (rms_norm=false) are not supported")
    if header.get("d_intermediate", 0) or header.get("attn_layer_idx"):
        raise ValueError(
            "mamba_ssm checkpoints with MLP (d_intermediate > 0) or attention layers "
            "(attn_layer_idx) are not supported"
        )
    unknown = sorted(set(header) - _MAMBA_SSM_KNOWN)
    if unknown:
        warnings.warn(f"ignoring unknown mamba_ssm config keys {unknown}", stacklevel=3)
    ssm_cfg = dict(header.get("ssm_cfg") or {})
    layer = ssm_cfg.get("layer", "Mamba1")
    ssm = {key: value for key, value in ssm_cfg.items() if key not in _MAMBA_SSM_INIT_ONLY}
    if layer == "Mamba1":
        from fidelity.models.mamba import MambaConfig

        config_class = MambaConfig
        if ssm.get("dt_rank") == "auto":
            ssm["dt_rank"] = 0  # our spelling of ceil(d_model / 16)
    elif layer == "Mamba2":
        try:
            from fidelity.models.mamba2 import Mamba2Config
        except ImportError:
            raise ValueError(
                "this mamba_ssm checkpoint uses Mamba-2 layers (ssm_cfg.layer = 'Mamba2'), but "
                "fidelity.models.mamba2 is not available in this version"
            ) from None
        config_class = Mamba2Config
        ssm = _mamba2_options(ssm, header["d_model"])
    else:
        raise ValueError(f"unknown mamba_ssm ssm_cfg.layer {layer!r}; accepted: Mamba1, Mamba2")
    unsupported = sorted(set(ssm) - set(config_class.__dataclass_fields__))
    if unsupported:
        raise ValueError(
            f"mamba_ssm ssm_cfg keys {unsupported} have no counterpart in {config_class.__name__}"
        )
    config = config_class(
        d_model=header["d_model"],
        n_layer=header["n_layer"],
        vocab_size=header["vocab_size"],
        pad_vocab_size_multiple=header.get("pad_vocab_size_multiple", 8),
        tie_embeddings=header.get("tie_embeddings", True),
        norm_epsilon=header.get("norm_epsilon", 1e-5),
        **ssm,
    )
    config.validate()
    return _Source(
        config=config,
        rename=_renamer(_MAMBA_SSM_RULES),
        weight_files=("pytorch_model.bin", WEIGHTS_FILE),
        provenance={"format": "mamba_ssm"},
    )


def _mamba2_options(ssm: dict[str, Any], d_model: int) -> dict[str, Any]:
    """mamba_ssm ``Mamba2`` keyword arguments -> ``Mamba2Config`` fields; options our Mamba-2
    does not compute (a dt clamp, per-channel D, MLP channels beside the SSM) are errors."""
    ssm = dict(ssm)
    dt_limit = ssm.pop("dt_limit", (0.0, float("inf")))
    if list(dt_limit) != [0.0, float("inf")]:
        raise ValueError(f"mamba_ssm Mamba2 with dt_limit {dt_limit} is not supported (no clamp)")
    if ssm.pop("D_has_hdim", False):
        raise ValueError("mamba_ssm Mamba2 with D_has_hdim=True is not supported")
    d_ssm = ssm.pop("d_ssm", None)
    if d_ssm is not None and d_ssm != ssm.get("expand", 2) * d_model:
        raise ValueError(f"mamba_ssm Mamba2 with d_ssm={d_ssm} < d_inner is not supported")
    if "A_init_range" in ssm:
        ssm["A_init_min"], ssm["A_init_max"] = ssm.pop("A_init_range")
    return ssm


_HF_WEIGHT_FILES = (
    WEIGHTS_FILE,
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HF_MAMBA_RULES = [
    (r"^backbone\.embeddings\.", "embedding."),
    (r"^backbone\.layers\.", "layers."),
    (r"^backbone\.norm_f\.", "norm_f."),
]


def _huggingface_mamba(header: dict[str, Any]) -> _Source:
    from fidelity.models.mamba import MambaConfig

    _require(header, ("hidden_size", "num_hidden_layers", "vocab_size"), "Hugging Face Mamba")
    if header.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"Hugging Face Mamba with hidden_act {header['hidden_act']!r} is not "
            "supported (only 'silu')"
        )
    expand = header.get("expand", 2)
    intermediate = header.get("intermediate_size", expand * header["hidden_size"])
    if intermediate != expand * header["hidden_size"]:
        raise ValueError(
            f"intermediate_size {intermediate} != expand * hidden_size "
            f"({expand} * {header['hidden_size']}); not supported"
        )
    dt_rank = header.get("time_step_rank", "auto")
    config = MambaConfig(
        d_model=header["hidden_size"],
        n_layer=header["num_hidden_layers"],
        vocab_size=header["vocab_size"],
        pad_vocab_size_multiple=1,  # Hugging Face does not pad the embedding
        tie_embeddings=header.get("tie_word_embeddings", True),
        norm_epsilon=header.get("layer_norm_epsilon", 1e-5),
        d_state=header.get("state_size", 16),
        d_conv=header.get("conv_kernel", 4),
        expand=expand,
        dt_rank=0 if dt_rank == "auto" else dt_rank,
        dt_min=header.get("time_step_min", 0.001),
        dt_max=header.get("time_step_max", 0.1),
        dt_init_floor=header.get("time_step_floor", 1e-4),
        conv_bias=header.get("use_conv_bias", True),
        bias=header.get("use_bias", False),
    )
    config.validate()
    return _Source(
        config=config,
        rename=_renamer(_HF_MAMBA_RULES),
        weight_files=_HF_WEIGHT_FILES,
        provenance={"format": "huggingface-mamba"},
    )


_GELU_NAMES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh"}  # fmt: skip
_GPT_NEOX_RULES = [
    (r"^gpt_neox\.embed_in\.", "embedding."),
    (r"^gpt_neox\.final_layer_norm\.", "norm_f."),
    (r"^(embed_out|lm_head)\.", "lm_head."),
    (r"^gpt_neox\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.ln_attn."),
    (r"^gpt_neox\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ln_mlp."),
    (r"^gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.", r"layers.\1.attention.qkv."),
    (r"^gpt_neox\.layers\.(\d+)\.attention\.dense\.", r"layers.\1.attention.out_proj."),
    (r"^gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"layers.\1.mlp.fc_in."),
    (r"^gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"layers.\1.mlp.fc_out."),
]
# buffers older GPT-NeoX checkpoints store: the causal mask and the rotary frequencies
_GPT_NEOX_IGNORED = r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$"


def _huggingface_gpt_neox(header: dict[str, Any]) -> _Source:
    from fidelity.models.transformer import TransformerConfig

    _require(
        header,
        ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
        "Hugging Face GPT-NeoX",
    )
    activation = header.get("hidden_act", "gelu")
    if activation not in _GELU_NAMES:
        raise ValueError(
            f"GPT-NeoX hidden_act {activation!r} is not supported; accepted: {sorted(_GELU_NAMES)}"
        )
    rope = header.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or header.get("rope_scaling"):
        raise ValueError(
            "GPT-NeoX checkpoints with scaled RoPE (rope_type / rope_scaling) are "
            "not supported; only the default RoPE"
        )
    config = TransformerConfig(
        d_model=header["hidden_size"],
        n_layer=header["num_hidden_layers"],
        vocab_size=header["vocab_size"],
        pad_vocab_size_multiple=1,  # Hugging Face does not pad the embedding
        tie_embeddings=header.get("tie_word_embeddings", False),
        norm_epsilon=header.get("layer_norm_eps", 1e-5),
        n_heads=header["num_attention_heads"],
        d_mlp=header.get("intermediate_size", 4 * header["hidden_size"]),
        activation=_GELU_NAMES[activation],
        rotary_pct=rope.get("partial_rotary_factor", header.get("rotary_pct", 0.25)),
        rotary_base=rope.get("rope_theta", header.get("rotary_emb_base", 10000.0)),
        use_parallel_residual=header.get("use_parallel_residual", True),
        attention_bias=header.get("attention_bias", True),
    )
    config.validate()
    return _Source(
        config=config,
        rename=_renamer(_GPT_NEOX_RULES, _GPT_NEOX_IGNORED),
        weight_files=_HF_WEIGHT_FILES,
        provenance={"format": "huggingface-gpt_neox"},
    )
