"""Checkpoints: our save/load round trip, atomic writes, clear errors, and imports of
mamba_ssm and Hugging Face (Mamba, GPT-NeoX) checkpoint directories."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fidelity.models import checkpoint
from fidelity.models.checkpoint import load_checkpoint, save_checkpoint
from fidelity.models.loading import load_model
from fidelity.models.registry import build_model, model_names

# models whose modules ship with this version: their round trip must run, never skip
# Hugging Face runs the same float32 math in another order (its slow Mamba path, its SDPA
# call): logits of order 1-10 agree to well under 1e-4.
HF_ATOL = 1e-4


def random_tokens(batch, length, vocab=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def tiny(name, **overrides):
    if name == "transformer":
        overrides = {"n_heads": 2, **overrides}
    return build_model(name, "tiny", seed=0, **overrides).eval()


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs)


# -- our format --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", model_names())
def test_round_trip_gives_identical_logits(name, tmp_path):
    model = tiny(name)
    ids = random_tokens(2, 33)
    path = save_checkpoint(model, tmp_path / "ckpt", meta={"step": 12, "tokens": 4096})
    loaded = load_checkpoint(path)
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert not loaded.training
    torch.testing.assert_close(
        logits(loaded, ids).logits, logits(model, ids).logits, rtol=0, atol=0
    )
    assert loaded.provenance == {
        "name": name,
        "checkpoint": str(path),
        "trained": True,
        "preset": "tiny",
        "format": "memory-fidelity",
        "step": 12,
        "tokens": 4096,
    }
    header = json.loads((path / "config.json").read_text())
    assert header["library"] == "memory-fidelity" and header["format_version"] == 1
    assert header["model_type"] == name and header["config"] == model.config.to_dict()
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_tied_weights_are_stored_once_and_tied_again(tmp_path):
    model = tiny("mamba")
    assert model.config.tie_embeddings
    path = save_checkpoint(model, tmp_path / "ckpt")
    stored = load_file(path / "model.safetensors")
    assert "embedding.weight" in stored and "lm_head.weight" not in stored
    loaded = load_checkpoint(path)
    assert loaded.lm_head.weight is loaded.embedding.weight


def test_half_precision_files_load_as_float32(tmp_path):
    model = tiny("transformer")
    full = save_checkpoint(model, tmp_path / "full")
    half = save_checkpoint(model, tmp_path / "half", dtype=torch.float16)
    stored = load_file(half / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in stored.values())
    size = (half / "model.safetensors").stat().st_size
    assert size < 0.6 * (full / "model.safetensors").stat().st_size
    loaded = load_checkpoint(half)
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, model.state_dict()[name].half().float(), rtol=0, atol=0)
    assert load_checkpoint(half, dtype=torch.float64).embedding.weight.dtype == torch.float64


def test_load_model_reads_a_checkpoint_directory(tmp_path):
    path = save_checkpoint(tiny("mamba"), tmp_path / "ckpt", meta={"trained": False})
    model = load_model(path)
    assert model.provenance["checkpoint"] == str(path)
    assert model.provenance["trained"] is False


def test_existing_directory_is_refused_unless_overwrite(tmp_path):
    first, second = tiny("transformer"), build_model("transformer", "tiny", seed=1, n_heads=2)
    path = save_checkpoint(first, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(second, path)
    ids = random_tokens(1, 9)
    torch.testing.assert_close(logits(load_checkpoint(path), ids).logits, logits(first, ids).logits)
    save_checkpoint(second, path, overwrite=True)
    torch.testing.assert_close(
        logits(load_checkpoint(path), ids).logits, logits(second, ids).logits
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_overwrite_never_deletes_an_unrelated_directory_or_a_file(tmp_path):
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="neither empty nor a checkpoint"):
        save_checkpoint(tiny("mamba"), unrelated, overwrite=True)
    assert (unrelated / "thesis.tex").read_text() == "precious"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_checkpoint(tiny("mamba"), a_file, overwrite=True)


def failing_writer(*args, **kwargs):
    raise OSError("disk full (simulated)")


def test_failed_write_leaves_no_checkpoint_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", failing_writer)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tiny("mamba"), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = tiny("mamba")
    path = save_checkpoint(model, tmp_path / "ckpt", meta={"step": 1})
    monkeypatch.setattr(checkpoint, "save_file", failing_writer)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tiny("mamba", d_model=16), path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = load_checkpoint(path)
    assert loaded.provenance["step"] == 1 and loaded.config == model.config


def test_failed_rename_restores_the_old_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tiny("mamba"), tmp_path / "ckpt", meta={"step": 1})
    original_rename = os.rename

    def rename(source, target):
        if Path(source).name.startswith(".ckpt.partial-"):
            raise OSError("rename failed (simulated)")
        return original_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tiny("mamba"), path, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_checkpoint(path).provenance["step"] == 1


def test_bad_save_arguments_are_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="CausalLM"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "a")
    with pytest.raises(TypeError, match="JSON-serializable"):
        save_checkpoint(tiny("mamba"), tmp_path / "b", meta={"when": object()})
    with pytest.raises(TypeError, match="meta must be a dict"):
        save_checkpoint(tiny("mamba"), tmp_path / "c", meta=[1])
    with pytest.raises(TypeError, match=r"floating torch\.dtype"):
        save_checkpoint(tiny("mamba"), tmp_path / "d", dtype=torch.int8)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tmp_path):
    return save_checkpoint(tiny("transformer"), tmp_path / "ckpt")


def edit_header(path, **changes):
    header = json.loads((path / "config.json").read_text())
    header.update(changes)
    (path / "config.json").write_text(json.dumps(header))


def test_missing_paths_are_clear_errors(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_checkpoint(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*memory-fidelity checkpoint"):
        load_checkpoint(tmp_path / "empty")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights file.*model\.safetensors"):
        load_checkpoint(saved)


def test_unreadable_weight_files_are_clear_errors(saved):
    (saved / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(ValueError, match=r"could not read weights file .*model\.safetensors"):
        load_checkpoint(saved)
    mamba_ssm = saved.parent / "mamba_ssm"
    mamba_ssm.mkdir()
    (mamba_ssm / "config.json").write_text(
        json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": 100})
    )
    (mamba_ssm / "pytorch_model.bin").write_bytes(b"garbage" * 9)
    with pytest.raises(ValueError, match=r"could not read weights file .*pytorch_model\.bin"):
        load_checkpoint(mamba_ssm)
    torch.save({"embedding.weight": [1, 2]}, mamba_ssm / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"must hold a state dict \(name -> tensor\)"):
        load_checkpoint(mamba_ssm)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"hello": 1}', r"no known checkpoint format \(keys found: \['hello'\]\)"),
    ],
)
def test_unreadable_or_unknown_config_is_a_clear_error(saved, text, message):
    (saved / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"library": "something-else"}, "written by 'something-else'"),
        ({"format_version": 2}, "format version 2"),
        ({"config": {"model_type": "lstm"}}, "unknown model type 'lstm'"),
        ({"config": {"model_type": "transformer", "n_heads": 3}}, "divisible by n_heads"),
        ({"config": {"model_type": "transformer", "wings": 2}}, r"unknown .* fields \['wings'\]"),
    ],
)
def test_bad_headers_are_clear_errors(saved, changes, message):
    edit_header(saved, **changes)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(saved)


def rewrite_weights(path, change):
    from safetensors.torch import save_file

    weights = load_file(path / "model.safetensors")
    change(weights)
    save_file(weights, str(path / "model.safetensors"))


def test_weight_mismatches_name_the_keys(saved):
    rewrite_weights(saved, lambda w: w.pop("layers.1.mlp.fc_in.bias"))
    with pytest.raises(ValueError, match=r"missing weights \['layers\.1\.mlp\.fc_in\.bias'\]"):
        load_checkpoint(saved)
    rewrite_weights(saved, lambda w: w.update({"layers.1.mlp.fc_in.bias": torch.zeros(128)}))
    rewrite_weights(saved, lambda w: w.update({"layers.9.extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"unexpected weights \['layers\.9\.extra'\]"):
        load_checkpoint(saved)
    rewrite_weights(saved, lambda w: w.pop("layers.9.extra"))
    load_checkpoint(saved)  # repaired
    rewrite_weights(saved, lambda w: w.update({"norm_f.weight": torch.zeros(7)}))
    with pytest.raises(ValueError, match=r"norm_f\.weight: expected \(32,\), found \(7,\)"):
        load_checkpoint(saved)


# -- imports from Hugging Face and mamba_ssm ---------------------------------------------------
@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed")


def hf_mamba(transformers, **overrides):
    config = transformers.MambaConfig(
        hidden_size=32, num_hidden_layers=2, vocab_size=100, state_size=8, **overrides
    )
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():  # move D and the biases off their trivial initial values
        for name, parameter in model.named_parameters():
            if name.endswith(("mixer.D", "bias", "norm.weight", "norm_f.weight")):
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_bias": True, "use_conv_bias": False, "time_step_rank": 5, "expand": 3}],
    ids=["default", "biases-rank5-expand3"],
)
def test_huggingface_mamba_import_matches_logits_and_hidden_states(
    transformers, tmp_path, overrides
):
    reference = hf_mamba(transformers, **overrides)
    reference.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path)
    assert ours.provenance["format"] == "huggingface-mamba"
    ids = random_tokens(2, 21, vocab=100, seed=1)
    theirs = logits(reference, ids, output_hidden_states=True)
    mine = logits(ours, ids, output_hidden_states=True)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=HF_ATOL)
    # Hugging Face Mamba: the output of each block, then the final hidden state after norm_f;
    # ours: the embedding, then the output of each block (before norm_f).
    for theirs_h, mine_h in zip(theirs.hidden_states[:-1], mine.hidden_states[1:], strict=True):
        torch.testing.assert_close(mine_h, theirs_h, rtol=0, atol=HF_ATOL)
    last = ours.norm_f(mine.hidden_states[-1])
    torch.testing.assert_close(last, theirs.hidden_states[-1], rtol=0, atol=HF_ATOL)


def test_mamba_ssm_directory_import_matches_the_same_model(transformers, tmp_path):
    reference = hf_mamba(transformers)
    state = reference.state_dict()
    # mamba_ssm pads the vocabulary to a multiple of 8 (100 -> 104 rows) and stores the tied
    # head as well
    embedding = torch.cat([state.pop("backbone.embeddings.weight"), torch.randn(4, 32)])
    weights = {
        key.replace("backbone.embeddings.", "backbone.embedding."): v for key, v in state.items()
    }
    weights["backbone.embedding.weight"] = embedding
    weights["lm_head.weight"] = embedding
    torch.save(weights, tmp_path / "pytorch_model.bin")
    header = {
        "d_model": 32,
        "d_intermediate": 0,
        "n_layer": 2,
        "vocab_size": 100,
        "ssm_cfg": {"d_state": 8, "dt_rank": "auto"},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
        "tie_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(header))
    ours = load_checkpoint(tmp_path)
    assert ours.provenance["format"] == "mamba_ssm"
    assert ours.embedding.weight.shape == (104, 32)
    ids = random_tokens(2, 19, vocab=100, seed=2)
    torch.testing.assert_close(
        logits(ours, ids).logits, logits(reference, ids).logits, rtol=0, atol=HF_ATOL
    )

    weights["lm_head.weight"] = torch.randn(104, 32)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"ties the LM head .* differs"):
        load_checkpoint(tmp_path)
    weights.pop("lm_head.weight")
    weights["backbone.layers.0.mixer.A_log"] = torch.zeros(64, 9)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"A_log: expected \(64, 8\), found \(64, 9\)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rms_norm": False}, "LayerNorm"),
        ({"d_intermediate": 128}, "d_intermediate"),
        ({"attn_layer_idx": [1]}, "attn_layer_idx"),
        ({"ssm_cfg": {"layer": "Mamba3"}}, "unknown mamba_ssm ssm_cfg.layer 'Mamba3'"),
        ({"ssm_cfg": {"d_state": 8, "wings": 2}}, r"ssm_cfg keys \['wings'\]"),
    ],
)
def test_unsupported_mamba_ssm_configs_are_clear_errors(tmp_path, changes, message):
    header = {"d_model": 32, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {}, **changes}
    (tmp_path / "config.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba_ssm_mamba2_directory_matches_huggingface_mamba2(transformers, tmp_path, n_groups):
    """Hugging Face's Mamba2ForCausalLM names its weights as mamba_ssm does (but for
    ``backbone.embeddings``): renamed, they make a mamba_ssm Mamba-2 directory."""
    config = transformers.Mamba2Config(
        hidden_size=32,
        num_hidden_layers=2,
        vocab_size=100,
        state_size=8,
        head_dim=16,
        num_heads=4,
        n_groups=n_groups,
        chunk_size=8,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    reference = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith(("mixer.D", "dt_bias", "norm.weight", "conv1d.bias")):
                parameter.add_(0.3 * torch.randn_like(parameter))
    weights = {
        key.replace("backbone.embeddings.", "backbone.embedding."): value
        for key, value in reference.state_dict().items()
    }
    torch.save(weights, tmp_path / "pytorch_model.bin")
    ssm_cfg = {
        "layer": "Mamba2",
        "d_state": 8,
        "headdim": 16,
        "ngroups": n_groups,
        "chunk_size": 8,
        "A_init_range": [1, 16],
        "D_has_hdim": False,
        "d_ssm": None,
    }
    header = {"d_model": 32, "n_layer": 2, "vocab_size": 100, "pad_vocab_size_multiple": 1,
              "ssm_cfg": ssm_cfg}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(header))
    ours = load_checkpoint(tmp_path)
    assert ours.config.model_type == "mamba2" and ours.config.ngroups == n_groups
    ids = random_tokens(2, 21, vocab=100, seed=6)
    torch.testing.assert_close(
        logits(ours, ids).logits, logits(reference, ids).logits, rtol=0, atol=HF_ATOL
    )
    header["ssm_cfg"] = {**ssm_cfg, "D_has_hdim": True}
    (tmp_path / "config.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="D_has_hdim=True is not supported"):
        load_checkpoint(tmp_path)


def hf_gpt_neox(transformers, rotary_pct, parallel):
    config = transformers.GPTNeoXConfig(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=80,
        rotary_pct=rotary_pct,
        rotary_emb_base=500,
        use_parallel_residual=parallel,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # LayerNorms away from (1, 0), larger weights: nothing trivial
        for name, parameter in model.named_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
            if "layernorm" in name or "layer_norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def check_gpt_neox_equal(reference, ours, seed):
    ids = random_tokens(2, 40, vocab=120, seed=seed)
    theirs = logits(reference, ids, output_hidden_states=True)
    mine = logits(ours, ids, output_hidden_states=True)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=HF_ATOL)
    # Hugging Face GPT-NeoX: the embedding, each block's output, the last one after the final
    # norm; ours: the same before the final norm.
    for theirs_h, mine_h in zip(theirs.hidden_states[:-1], mine.hidden_states[:-1], strict=True):
        torch.testing.assert_close(mine_h, theirs_h, rtol=0, atol=HF_ATOL)
    last = ours.norm_f(mine.hidden_states[-1])
    torch.testing.assert_close(last, theirs.hidden_states[-1], rtol=0, atol=HF_ATOL)


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_gpt_neox_import_matches_logits_and_hidden_states(
    transformers, tmp_path, rotary_pct, parallel
):
    reference = hf_gpt_neox(transformers, rotary_pct, parallel)
    reference.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path)
    assert ours.provenance["format"] == "huggingface-gpt_neox"
    config = ours.config
    assert (config.n_heads, config.d_mlp, config.rotary_base) == (4, 80, 500)
    assert config.rotary_pct == rotary_pct and config.use_parallel_residual is parallel
    check_gpt_neox_equal(reference, ours, seed=3)


def test_legacy_pythia_layout_imports(transformers, tmp_path):
    """Older Pythia directories: rotary_pct / rotary_emb_base keys, pytorch_model.bin with
    ``embed_out`` and the attention mask / rotary buffers, which are ignored."""
    reference = hf_gpt_neox(transformers, 0.25, True)
    reference.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    for layer in range(3):
        prefix = f"gpt_neox.layers.{layer}.attention."
        weights[prefix + "bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        weights[prefix + "masked_bias"] = torch.tensor(-1e9)
        weights[prefix + "rotary_emb.inv_freq"] = torch.ones(1)
    (tmp_path / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pytorch_model.bin")
    header = json.loads((tmp_path / "config.json").read_text())
    header.pop("rope_parameters")
    header.update(rotary_pct=0.25, rotary_emb_base=500)
    (tmp_path / "config.json").write_text(json.dumps(header))
    check_gpt_neox_equal(reference, load_checkpoint(tmp_path), seed=4)


def test_sharded_huggingface_checkpoint_imports(transformers, tmp_path):
    reference = hf_gpt_neox(transformers, 0.25, False)
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    check_gpt_neox_equal(reference, load_checkpoint(tmp_path), seed=5)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "scaled RoPE"),
        ({"num_attention_heads": 5}, "divisible by n_heads"),
    ],
)
def test_unsupported_gpt_neox_configs_are_clear_errors(transformers, tmp_path, changes, message):
    hf_gpt_neox(transformers, 0.25, True).save_pretrained(tmp_path)
    edit_header(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path)


def test_huggingface_weights_that_do_not_fit_name_the_keys(transformers, tmp_path):
    hf_gpt_neox(transformers, 0.25, True).save_pretrained(tmp_path)
    edit_header(tmp_path, num_hidden_layers=4)
    with pytest.raises(ValueError, match=r"missing weights \['layers\.3\.ln_attn\.weight'"):
        load_checkpoint(tmp_path)
    edit_header(tmp_path, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"unexpected weights \['gpt_neox\.layers\.2\."):
        load_checkpoint(tmp_path)
