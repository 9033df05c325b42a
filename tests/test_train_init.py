"""Training that starts from existing weights (``fidelity train --init``)."""

from __future__ import annotations

import json

import pytest
import torch

from fidelity.errors import InputError
from fidelity.models.registry import load_model
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
