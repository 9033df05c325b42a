"""Importers of foreign checkpoint directories, recognized from their ``config.json``:

- a mamba_ssm ``MambaLMHeadModel`` directory (``d_model``, ``n_layer``, ``ssm_cfg``, ...;
  ``pytorch_model.bin``) -> :class:`~fidelity.models.mamba.MambaLM` (``ssm_cfg.layer ==
  "Mamba2"`` -> :class:`~fidelity.models.mamba2.Mamba2LM`);
- a Hugging Face ``MambaForCausalLM`` directory (``"model_type": "mamba"``) -> ``MambaLM``;
- a Hugging Face ``GPTNeoXForCausalLM`` directory (``"model_type": "gpt_neox"``, e.g. Pythia)
  -> :class:`~fidelity.models.transformer.TransformerLM`.

Each importer turns the foreign config into ours and says how the foreign weight names map onto
ours (a :class:`~fidelity.models.checkpoint_format.Source`); reading and checking the weights is
left to :func:`~fidelity.models.checkpoint.load_checkpoint`. Compute-only flags of the sources
(``residual_in_fp32``, ``fused_add_norm``) do not change the function a float32 model computes
and are not carried over.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from fidelity.errors import InputError
from fidelity.models.checkpoint_format import WEIGHTS_FILE, Source, renamer, require_keys
from fidelity.models.mamba import MambaConfig
from fidelity.models.mamba2 import Mamba2Config
from fidelity.models.transformer import TransformerConfig


def importer_for(header: dict[str, Any]) -> Callable[[dict[str, Any]], Source] | None:
    """The importer for a foreign ``config.json`` (parsed), or None when no format fits."""
    if header.get("model_type") == "mamba" and "hidden_size" in header:
        return _huggingface_mamba
    if header.get("model_type") == "gpt_neox":
        return _huggingface_gpt_neox
    if {"d_model", "n_layer", "vocab_size"} <= set(header):
        return _mamba_ssm
    return None


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


def _mamba_ssm(header: dict[str, Any]) -> Source:
    if header.get("rms_norm", True) is not True:
        raise InputError("mamba_ssm checkpoints with LayerNorm (rms_norm=false) are not supported")
    if header.get("d_intermediate", 0) or header.get("attn_layer_idx"):
        raise InputError(
            "mamba_ssm checkpoints with MLP (d_intermediate > 0) or attention layers "
            "(attn_layer_idx) are not supported"
        )
    unknown = sorted(set(header) - _MAMBA_SSM_KNOWN)
    if unknown:
        warnings.warn(f"ignoring unknown mamba_ssm config keys {unknown}", stacklevel=3)
    ssm_cfg = header.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise InputError(
            f"mamba_ssm config.json: 'ssm_cfg' must be a JSON object (e.g. "
            f'{{"layer": "Mamba1", "d_state": 16}}), got {ssm_cfg!r}'
        )
    ssm_cfg = dict(ssm_cfg)
    layer = ssm_cfg.get("layer", "Mamba1")
    ssm = {key: value for key, value in ssm_cfg.items() if key not in _MAMBA_SSM_INIT_ONLY}
    if layer == "Mamba1":
        config_class = MambaConfig
        if ssm.get("dt_rank") == "auto":
            ssm["dt_rank"] = 0  # our spelling of ceil(d_model / 16)
    elif layer == "Mamba2":
        config_class = Mamba2Config
        ssm = _mamba2_options(ssm, header["d_model"])
    else:
        raise InputError(f"unknown mamba_ssm ssm_cfg.layer {layer!r}; accepted: Mamba1, Mamba2")
    unsupported = sorted(set(ssm) - set(config_class.__dataclass_fields__))
    if unsupported:
        raise InputError(
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
    config.checked()
    return Source(
        config=config,
        rename=renamer(_MAMBA_SSM_RULES),
        weight_files=("pytorch_model.bin", WEIGHTS_FILE),
        provenance={"format": "mamba_ssm"},
    )


def _mamba2_options(ssm: dict[str, Any], d_model: int) -> dict[str, Any]:
    """mamba_ssm ``Mamba2`` keyword arguments -> ``Mamba2Config`` fields; options our Mamba-2
    does not compute (a dt clamp, per-channel D, MLP channels beside the SSM) are errors."""
    ssm = dict(ssm)
    dt_limit = ssm.pop("dt_limit", (0.0, float("inf")))
    if list(dt_limit) != [0.0, float("inf")]:
        raise InputError(f"mamba_ssm Mamba2 with dt_limit {dt_limit} is not supported (no clamp)")
    if ssm.pop("D_has_hdim", False):
        raise InputError("mamba_ssm Mamba2 with D_has_hdim=True is not supported")
    d_ssm = ssm.pop("d_ssm", None)
    if d_ssm is not None and d_ssm != ssm.get("expand", 2) * d_model:
        raise InputError(f"mamba_ssm Mamba2 with d_ssm={d_ssm} < d_inner is not supported")
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


def _huggingface_mamba(header: dict[str, Any]) -> Source:
    require_keys(header, ("hidden_size", "num_hidden_layers", "vocab_size"), "Hugging Face Mamba")
    if header.get("hidden_act", "silu") != "silu":
        raise InputError(
            f"Hugging Face Mamba with hidden_act {header['hidden_act']!r} is not "
            "supported (only 'silu')"
        )
    expand = header.get("expand", 2)
    intermediate = header.get("intermediate_size", expand * header["hidden_size"])
    if intermediate != expand * header["hidden_size"]:
        raise InputError(
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
    config.checked()
    return Source(
        config=config,
        rename=renamer(_HF_MAMBA_RULES),
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


def _huggingface_gpt_neox(header: dict[str, Any]) -> Source:
    require_keys(
        header,
        ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
        "Hugging Face GPT-NeoX",
    )
    activation = header.get("hidden_act", "gelu")
    if activation not in _GELU_NAMES:
        raise InputError(
            f"GPT-NeoX hidden_act {activation!r} is not supported; accepted: {sorted(_GELU_NAMES)}"
        )
    rope = header.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or header.get("rope_scaling"):
        raise InputError(
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
    config.checked()
    return Source(
        config=config,
        rename=renamer(_GPT_NEOX_RULES, _GPT_NEOX_IGNORED),
        weight_files=_HF_WEIGHT_FILES,
        provenance={"format": "huggingface-gpt_neox"},
    )
