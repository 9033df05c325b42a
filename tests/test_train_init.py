"""Training that starts from existing weights (``fidelity train --init``)."""

from __future__ import annotations

import json

import pytest
import torch

from fidelity.cli import main
from fidelity.errors import InputError
from fidelity.models.loading import load_model
from fidelity.train import TrainConfig, train


def config(**overrides) -> TrainConfig:
    values = {
        "model": "mamba",
        "preset": "tiny",
        "task": "text",
        "length": 32,
        "batch_size": 2,
        "steps": 2,
        "save_every": 2,
        "warmup_steps": 1,
        "device": "cpu",
    }
    return TrainConfig(**{**values, **overrides})


def test_init_starts_from_the_given_weights(tmp_path) -> None:
    first = train(config(seed=1), tmp_path / "first").checkpoints[-1]
    start = load_model(first)
    # lr so small that one step leaves the weights where --init put them (to float precision)
    summary = train(config(init=str(first), steps=1, save_every=1, lr=1e-12), tmp_path / "second")
    continued = load_model(summary.checkpoints[-1])
    fresh = load_model(
        train(config(steps=1, save_every=1, lr=1e-12), tmp_path / "fresh").checkpoints[-1]
    )
    for name, value in start.state_dict().items():
        assert torch.allclose(continued.state_dict()[name], value, atol=1e-6)
    assert any(
        not torch.allclose(fresh.state_dict()[name], value)
        for name, value in start.state_dict().items()
    )
    saved = json.loads((tmp_path / "second" / "train_config.json").read_text())
    assert saved["init"] == str(first)


def test_init_must_match_the_model_and_shape(tmp_path) -> None:
    first = train(config(), tmp_path / "first").checkpoints[-1]
    with pytest.raises(InputError, match="is not a mamba of this shape"):
        train(config(init=str(first), overrides={"d_model": 64}), tmp_path / "other")


def test_cli_init_and_state_passing(tmp_path, capsys) -> None:
    common = ["train", "--model", "mamba", "--preset", "tiny", "--task", "text", "--length", "32"]
    common += ["--steps", "1", "--save-every", "1", "--device", "cpu"]
    missing = tmp_path / "missing-run"
    assert main([*common, "--init", str(tmp_path / "nowhere"), "--out", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.exists()
    out = tmp_path / "run"
    assert main([*common, "--state-passing", "carry", "--out", str(out)]) == 0
    assert json.loads((out / "train_config.json").read_text())["state_passing"] == "carry"
    args = [
        *common,
        "--model",
        "memmamba",
        "--state-passing",
        "noise",
        "--out",
        str(tmp_path / "m"),
    ]
    assert main(args) == 2 and "fixed-size tensor" in capsys.readouterr().err
