"""load_model: names, presets, shipped and derived defaults, directories, clear errors."""

import pytest
import torch

import fidelity.models.registry as registry
from fidelity.models.checkpoint import save_checkpoint
from fidelity.models.decimamba import DeciMambaLM
from fidelity.models.loading import load_model
from fidelity.models.registry import build_config, build_model


def test_presets_and_overrides_build_untrained_models():
    model = load_model("memmamba", preset="tiny", pool_size=5)
    assert model.config.pool_size == 5 and model.config.d_model == 32
    assert model.provenance["trained"] is False and not model.training
    assert build_config("mamba2", "mini").d_state == 16
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("mamba", "huge")
    with pytest.raises(ValueError, match="unknown MemMambaConfig options"):
        load_model("memmamba", preset="tiny", pool_sise=5)


def test_every_registered_model_builds_and_runs_at_tiny():
    ids = torch.randint(0, 256, (1, 40))
    for name in registry.model_names():
        model = build_model(name, "tiny").eval()
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape[-1] == 256 and torch.isfinite(logits).all(), name


def test_shipped_and_derived_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "DATA_DIR", tmp_path)
    with pytest.warns(UserWarning, match="no trained checkpoint is shipped"):
        assert load_model("mamba", preset=None).provenance["trained"] is False
    mamba = build_model("mamba", "tiny")
    save_checkpoint(mamba, tmp_path / "mamba", meta={"training": {"length": 64}})
    shipped = load_model("mamba")
    assert shipped.provenance["shipped_default"] and shipped.provenance["trained"]
    decimamba = load_model("decimamba")
    assert isinstance(decimamba, DeciMambaLM)
    assert decimamba.config.decimation_base_length == 64
    assert decimamba.provenance["derived_from"].endswith("mamba")
    torch.testing.assert_close(decimamba.embedding.weight, shipped.embedding.weight)


def test_directories_and_errors(tmp_path, monkeypatch):
    directory = save_checkpoint(build_model("mamba", "tiny"), tmp_path / "ckpt")
    assert load_model(directory).config.d_model == 32
    with pytest.raises(ValueError, match="apply to model names"):
        load_model(directory, preset="tiny")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        load_model(tmp_path / "file.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="registered name"):
        load_model("gpt5")
    # A folder named like a registered model does not shadow the name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mamba").mkdir()
    assert load_model("mamba", preset="tiny").config.d_model == 32
