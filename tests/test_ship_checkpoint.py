"""scripts/ship_checkpoint.py: a shipped default records every stage of its curriculum."""

from __future__ import annotations

import json
import sys

import repo_scripts

from fidelity.models import registry
from fidelity.train import TrainConfig, train

ship = repo_scripts.load("scripts/ship_checkpoint.py")


def config(**overrides) -> TrainConfig:
    values = {"model": "mamba", "preset": "tiny", "length": 300, "batch_size": 2}
    values |= {"warmup_steps": 1, "device": "cpu", "save_every": 2}
    return TrainConfig(**{**values, **overrides})


def test_an_init_chain_is_shipped_as_its_stages_with_their_sums(tmp_path, monkeypatch):
    first = train(config(task="passkey", steps=2), tmp_path / "runs" / "a")
    second = train(
        config(task="text", steps=3, init=str(first.checkpoints[-1]), seed=1),
        tmp_path / "runs" / "b",
    )
    monkeypatch.setattr(ship, "DATA", tmp_path / "data")
    monkeypatch.setattr(sys, "argv", ["ship", str(tmp_path / "runs" / "b"), "mamba"])
    ship.main()
    header = (tmp_path / "data" / "mamba" / "config.json").read_text()
    training = json.loads(header)["meta"]["training"]
    stages = training["stages"]
    assert [s["steps"] for s in stages] == [2, 3]
    assert stages[0]["init"] is None and stages[1]["init"] == str(first.checkpoints[-1])
    assert "--task passkey" in stages[0]["command"] and "--task text" in stages[1]["command"]
    assert training["steps"] == 5 and training["tokens"] == 5 * 2 * 300
    # each stage's time is stored to 0.01 s, so their sum is within 0.01 s of the true sum
    assert abs(training["wall_time_s"] - (first.wall_time_s + second.wall_time_s)) <= 0.01 + 1e-9
    assert training["command"] == stages[1]["command"] and training["task"] == "text"
    described = registry.training_description(tmp_path / "data" / "mamba")
    assert "5 steps in 2 stages (passkey x 2 then text x 3)" in described
