"""State passing and fitted-noise initial states in training (Buitrago Ruiz and Gu 2025)."""

from __future__ import annotations

import importlib
import itertools
import json
import shutil

import pytest
import torch

from fidelity import state_passing
from fidelity.errors import InputError
from fidelity.models.registry import build_model
from fidelity.train import TrainConfig, train

train_module = importlib.import_module("fidelity.train")  # the module, not fidelity.train()


def config(**overrides) -> TrainConfig:
    values = {
        "model": "mamba",
        "preset": "tiny",
        "task": "text",
        "length": 32,
        "batch_size": 3,
        "steps": 4,
        "save_every": 4,
        "warmup_steps": 1,
        "device": "cpu",
    }
    return TrainConfig(**{**values, **overrides})


def record_states(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list, list]]:
    """Make training's models record, per forward, the cache states at entry and at exit
    (None when no cache was passed)."""
    calls: list[tuple[list, list]] = []
    original = build_model

    def snapshot(cache) -> list | None:
        return None if cache is None else [dict(s) for s in state_passing.final_states(cache)]

    def recording_build(*args, **kwargs):
        model = original(*args, **kwargs)
        forward = model.forward

        def recorded(input_ids, *rest, cache=None, **options):
            entry = snapshot(cache)
            entry = None if entry is None else [{k: v.clone() for k, v in s.items()} for s in entry]
            output = forward(input_ids, *rest, cache=cache, **options)
            calls.append((entry, snapshot(cache)))
            return output

        model.forward = recorded
        return model

    monkeypatch.setattr(train_module, "build_model", recording_build)
    return calls


@pytest.mark.parametrize("model", ["mamba", "mamba2"])
def test_carry_starts_every_step_from_the_previous_final_state(model, tmp_path, monkeypatch):
    calls = record_states(monkeypatch)
    train(config(model=model, state_passing="carry"), tmp_path / "run")
    assert len(calls) == 4
    first_entry, _ = calls[0]
    assert all(not t.any() for layer in first_entry for t in layer.values())  # zeros
    for (_, previous_exit), (entry, _) in itertools.pairwise(calls):
        for carried, final in zip(entry, previous_exit, strict=True):
            assert carried.keys() == final.keys() == {"conv", "ssm"}
            for name in carried:
                assert torch.equal(carried[name], final[name])
                assert final[name].abs().sum() > 0


def test_off_passes_no_cache(tmp_path, monkeypatch):
    calls = record_states(monkeypatch)
    train(config(), tmp_path / "run")
    assert calls and all(entry is None for entry, _ in calls)


def test_noise_is_fitted_to_the_previous_final_states(tmp_path, monkeypatch):
    calls = record_states(monkeypatch)
    train(config(state_passing="noise", batch_size=64, steps=2), tmp_path / "run")
    (_, final), (entry, _) = calls
    for drawn, fitted in zip(entry, final, strict=True):
        for name in ("conv", "ssm"):
            assert not torch.equal(drawn[name], fitted[name])
            mean, std = fitted[name].mean(0), fitted[name].std(0, unbiased=False)
            # 64 draws per element: their mean lies within 5 standard errors of the fitted mean
            error = (drawn[name].mean(0) - mean).abs() / (std / 8).clamp(min=1e-6)
            assert error.max() < 5
            ratio = drawn[name].std(0)[std > 1e-3] / std[std > 1e-3]
            assert 0.6 < float(ratio.median()) < 1.4


def test_initial_cache_draws_noise_from_the_generator() -> None:
    model = build_model("mamba", "tiny")
    previous = [
        {"conv": torch.randn(4, *layer.conv.shape[1:]), "ssm": torch.randn(4, *layer.ssm.shape[1:])}
        for layer in model.init_cache(4, torch.device("cpu"), torch.float32).layers
    ]
    first = state_passing.initial_cache(
        model, "noise", previous, 4, torch.Generator().manual_seed(1)
    )
    again = state_passing.initial_cache(
        model, "noise", previous, 4, torch.Generator().manual_seed(1)
    )
    other = state_passing.initial_cache(
        model, "noise", previous, 4, torch.Generator().manual_seed(2)
    )
    assert all(torch.equal(a.ssm, b.ssm) for a, b in zip(first.layers, again.layers, strict=True))
    assert not all(
        torch.equal(a.ssm, b.ssm) for a, b in zip(first.layers, other.layers, strict=True)
    )
    assert state_passing.initial_cache(model, "off", previous, 4, torch.Generator()) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"state_passing": "sometimes"}, "state_passing must be one of"),
        ({"state_passing": "carry", "model": "memmamba"}, "fixed-size tensor"),
        ({"state_passing": "noise", "model": "transformer"}, "fixed-size tensor"),
    ],
)
def test_bad_state_passing(overrides, message) -> None:
    with pytest.raises(InputError, match=message):
        config(**overrides).validate()


def test_resume_of_a_run_without_the_setting(tmp_path) -> None:
    """Runs written before the setting existed resume with its default."""
    out = tmp_path / "run"
    train(config(steps=2, save_every=1), out)
    saved = json.loads((out / "train_config.json").read_text())
    del saved["state_passing"]
    (out / "train_config.json").write_text(json.dumps(saved))
    shutil.rmtree(out / "ckpt-2")
    summary = train(config(steps=2, save_every=1), out, resume=True)
    assert summary.steps == 2 and (out / "ckpt-2").is_dir()
