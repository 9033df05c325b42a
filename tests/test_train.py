"""The training loop: schedule, loss, checkpoints that load, exact resume, learning happens."""

import csv
import itertools
import math
import shutil

import pytest
import torch

from fidelity.models.loading import load_model
from fidelity.train import TrainConfig, checkpoint_dirs, learning_rate, masked_lm_loss, train


def small_config(**overrides):
    values = {
        "model": "mamba",
        "preset": "tiny",
        "task": "text",
        "length": 64,
        "batch_size": 2,
        "steps": 6,
        "save_every": 3,
        "log_every": 1,
        "warmup_steps": 2,
        "device": "cpu",
    }
    return TrainConfig(**{**values, **overrides})


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(config, 0) == pytest.approx(1e-4)
    assert learning_rate(config, 9) == pytest.approx(1e-3)
    assert learning_rate(config, 100) == pytest.approx(1e-4)
    rates = [learning_rate(config, s) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_masked_loss_averages_rows_equally_and_skips_empty_rows():
    logits = torch.randn(3, 5, 7)
    ids = torch.randint(0, 7, (3, 5))
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, 2] = True
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="none"
    ).view(3, 4)
    expected = (per_token[0].mean() + per_token[1, 2]) / 2
    torch.testing.assert_close(masked_lm_loss(logits, ids, mask), expected)


def test_checkpoints_load_and_the_log_is_written(tmp_path):
    summary = train(small_config(), tmp_path / "run")
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["ckpt-3", "ckpt-6"]
    model = load_model(tmp_path / "run" / "ckpt-6")
    assert model.provenance["trained"] is True
    assert model(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, 256)
    with (tmp_path / "run" / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert summary.tokens == 6 * 2 * 64 and math.isfinite(summary.final_loss)


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    train(small_config(), tmp_path / "whole")
    train(small_config(), tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "ckpt-6")  # as if killed between step 3 and 6
    train(small_config(), tmp_path / "killed", resume=True)
    whole = load_model(tmp_path / "whole" / "ckpt-6").state_dict()
    resumed = load_model(tmp_path / "killed" / "ckpt-6").state_dict()
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    with (tmp_path / "killed" / "train_log.csv").open() as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_an_existing_run_needs_resume_or_force(tmp_path):
    train(small_config(steps=3), tmp_path / "run")
    with pytest.raises(FileExistsError, match="resume"):
        train(small_config(steps=3), tmp_path / "run")
    with pytest.raises(ValueError, match="same settings"):
        train(small_config(steps=3, lr=0.5), tmp_path / "run", resume=True)
    train(small_config(steps=3), tmp_path / "run", force=True)


def test_training_lowers_the_loss(tmp_path):
    """Forty steps on byte-level text must beat the uniform guess (ln 256 = 5.55) clearly."""
    summary = train(small_config(steps=40, lr=5e-3, save_every=40, length=128), tmp_path)
    assert summary.final_loss < 4.0


@pytest.mark.parametrize("task", ["passkey", "kv", "mix"])
def test_every_task_trains_memmamba(task, tmp_path):
    config = small_config(model="memmamba", task=task, length=256, steps=2, save_every=2)
    summary = train(config, tmp_path / task)
    assert math.isfinite(summary.final_loss)


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        train(small_config(model="gpt5"), tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        train(small_config(task="poems"), tmp_path)
    with pytest.raises(ValueError, match="steps must be"):
        train(small_config(steps=0), tmp_path)
