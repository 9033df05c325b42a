"""Weights moved between MemMamba variants that differ in ablation switches (fidelity.ablation),
for evaluation (``ablated``) and for ``fidelity train --init``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fidelity.ablation import ABLATION_SWITCHES, ablated, transfer_weights
from fidelity.errors import InputError
from fidelity.models.loading import load_model
from fidelity.models.registry import build_model
from fidelity.train import INIT_RECORD, TrainConfig, train


def memmamba(seed: int, **overrides):
    return build_model("memmamba", "tiny", seed=seed, **overrides)


def test_switching_a_part_off_drops_its_parameters_and_keeps_the_rest() -> None:
    source = memmamba(1)
    target = memmamba(2, use_cross_token=False)
    transfer = transfer_weights(source, target)
    assert transfer.switched == {"use_cross_token": [True, False]}
    assert transfer.initialized == []
    assert "layers.0.cross_token.q_proj.weight" in transfer.dropped
    assert "layers.1.trigger.scorer.weight" in transfer.dropped
    assert "layers.1.fusion.weights[token]" in transfer.dropped
    assert not any("cross_layer" in name for name in transfer.dropped)
    found, loaded = source.state_dict(), target.state_dict()
    for name, value in loaded.items():
        if "fusion" not in name:
            assert torch.equal(value, found[name]), name
    # layer 1 fused (token, layer); without the token context its one row is the layer row
    assert torch.equal(loaded["layers.1.fusion.weights"], found["layers.1.fusion.weights"][1:])
    assert loaded["layers.0.fusion.weights"].shape[0] == 0


def test_switching_a_part_on_leaves_its_parameters_at_initialization() -> None:
    source = memmamba(1, use_cross_layer=False)
    target = memmamba(2)
    before = {name: value.clone() for name, value in target.state_dict().items()}
    transfer = transfer_weights(source, target)
    assert transfer.dropped == []
    assert "layers.1.cross_layer.k_proj.weight" in transfer.initialized
    assert "layers.1.fusion.weights[layer]" in transfer.initialized
    loaded, found = target.state_dict(), source.state_dict()
    assert torch.equal(
        loaded["layers.1.cross_layer.k_proj.weight"], before["layers.1.cross_layer.k_proj.weight"]
    )
    assert torch.equal(loaded["layers.1.fusion.weights"][1], before["layers.1.fusion.weights"][1])
    assert torch.equal(loaded["layers.1.fusion.weights"][0], found["layers.1.fusion.weights"][0])
    assert torch.equal(
        loaded["layers.0.mixer.in_proj.weight"], found["layers.0.mixer.in_proj.weight"]
    )


def test_other_differences_are_refused() -> None:
    with pytest.raises(InputError, match="summary_dim=16 \\(wanted 32\\)"):
        transfer_weights(memmamba(1), memmamba(1, summary_dim=32))
    with pytest.raises(InputError, match="d_model"):
        transfer_weights(
            build_model("mamba", "tiny", seed=1), build_model("mamba", "tiny", d_model=48)
        )
    with pytest.raises(InputError, match="not ablation switches"):
        ablated(memmamba(1), pool_size=4)


def test_ablated_without_a_change_computes_the_same_logits() -> None:
    model = memmamba(3, write_init_bias=5.0).eval()  # nearly every position writes a note
    same, transfer = ablated(model, tau2=model.config.tau2)
    off, _ = ablated(model, use_cross_layer=False, pool_policy="fifo")
    ids = torch.randint(
        0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        full = model(ids).logits
        assert torch.equal(same(ids).logits, full)
        assert not torch.allclose(off(ids).logits, full)
    assert transfer.switched == {} and not same.training
    assert set(ABLATION_SWITCHES) >= {"use_note_block", "use_cross_token", "use_cross_layer"}
    assert off.provenance["ablated_at_evaluation"]["switched"]["pool_policy"] == [
        "priority",
        "fifo",
    ]


def config(**overrides) -> TrainConfig:
    values = {
        "model": "memmamba",
        "preset": "tiny",
        "task": "text",
        "length": 32,
        "batch_size": 2,
        "steps": 1,
        "save_every": 1,
        "warmup_steps": 1,
        "device": "cpu",
    }
    return TrainConfig(**{**values, **overrides})


def test_train_init_across_a_switch_records_what_was_dropped(tmp_path) -> None:
    first = train(config(seed=1), tmp_path / "full").checkpoints[-1]
    lines: list[str] = []
    variant = config(init=str(first), lr=1e-12, steps=2, overrides={"use_cross_token": False})
    summary = train(variant, tmp_path / "variant", notify=lines.append)
    assert len(lines) == 1 and "dropped" in lines[0] and "layers.0.trigger" in lines[0]
    record = json.loads((tmp_path / "variant" / INIT_RECORD).read_text())
    assert record["switched"] == {"use_cross_token": [True, False]}
    assert "layers.1.cross_token.v_proj.weight" in record["dropped"]
    first_step = load_model(summary.checkpoints[0])
    assert first_step.provenance["training"]["init"] == record
    start = load_model(first).state_dict()
    for name, value in first_step.state_dict().items():
        if "fusion" not in name:
            assert torch.allclose(value, start[name], atol=1e-6), name
    # a resumed run (the last checkpoint lost) keeps the record in its later checkpoints
    shutil.rmtree(summary.checkpoints[-1])
    resumed = train(variant, tmp_path / "variant", resume=True)
    assert load_model(resumed.checkpoints[-1]).provenance["training"]["init"] == record


def test_train_init_refuses_a_shape_change_before_writing(tmp_path) -> None:
    first = train(config(seed=1), tmp_path / "full").checkpoints[-1]
    out = tmp_path / "other"
    with pytest.raises(InputError, match="pool_size=8 \\(wanted 4\\)"):
        train(config(init=str(first), overrides={"pool_size": 4}), out)
    assert not out.exists()
    plain = train(config(init=str(first)), tmp_path / "same")  # no switch: no record
    assert not (plain.out / INIT_RECORD).exists()
