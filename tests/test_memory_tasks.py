"""Memory tasks (induction, selective copy, MQAR): pure functions of the seed, exact answer
positions, the loss mask, training on them, and accuracy through the recurrent cache."""

from __future__ import annotations

import json

import pytest
import torch

from fidelity.metrics.task_accuracy import answer_hits, task_accuracy
from fidelity.models.registry import build_model
from fidelity.probes.memory_tasks import (
    MEMORY_TASKS,
    induction,
    make_memory_task,
    mqar,
    selective_copy,
    task_vocab_size,
)
from fidelity.probes.tasks import TASKS, TRAINING_TASKS, make_probe, training_batch
from fidelity.train import TrainConfig, train


@pytest.mark.parametrize("task", MEMORY_TASKS)
def test_pure_function_of_seed(task):
    first = make_memory_task(task, 200, batch=4, seed=3)
    again = make_memory_task(task, 200, batch=4, seed=3)
    other = make_memory_task(task, 200, batch=4, seed=4)
    assert torch.equal(first.input_ids, again.input_ids)
    assert torch.equal(first.answer_positions, again.answer_positions)
    assert not torch.equal(first.input_ids, other.input_ids)
    assert first.input_ids.shape == (4, 200)
    assert int(first.input_ids.max()) < first.vocab_size


@pytest.mark.parametrize("seed", range(5))
def test_induction_answer_is_the_follower_of_the_first_trigger(seed):
    task = induction(64, batch=16, seed=seed, vocab_size=16)
    ids = task.input_ids
    trigger = 15
    for row in range(16):
        where = (ids[row] == trigger).nonzero().flatten().tolist()
        assert len(where) == 2 and where[1] == 62  # once in the body, once before the answer
        assert where[0] + 1 <= 61  # the follower is a body token
        assert task.answer_positions[row].tolist() == [63]
        assert task.cue_positions[row].tolist() == [where[0] + 1]
        assert ids[row, 63] == ids[row, where[0] + 1] != trigger


@pytest.mark.parametrize("seed", range(3))
def test_induction_with_several_queries(seed):
    task = induction(100, batch=8, seed=seed, n_queries=5)
    for row in range(8):
        ids = task.input_ids[row]
        where = (ids == 15).nonzero().flatten().tolist()
        assert len(where) == 6 and where[-1] == 98
        answers = task.answer_positions[row].tolist()
        assert answers == [p + 1 for p in where[1:]]
        assert task.cue_positions[row].tolist() == [where[0] + 1] * 5
        assert set(ids[answers].tolist()) == {int(ids[where[0] + 1])}
    assert task.loss_mask.sum().item() == 8 * 5


@pytest.mark.parametrize("seed", range(3))
def test_selective_copy_answers_are_the_data_in_order(seed):
    task = selective_copy(100, batch=8, seed=seed, vocab_size=16, n_data=16)
    region = 100 - 16 - 1
    for row in range(8):
        ids = task.input_ids[row]
        data_at = (ids[:region] != 0).nonzero().flatten()
        assert torch.equal(data_at, task.cue_positions[row])
        assert ids[region] == 15
        assert task.answer_positions[row].tolist() == list(range(region + 1, 100))
        assert torch.equal(ids[region + 1 :], ids[data_at])
        assert int(ids[data_at].min()) >= 1 and int(ids[data_at].max()) <= 14


@pytest.mark.parametrize("seed", range(3))
def test_mqar_queries_ask_every_key_once(seed):
    n_pairs = 6
    task = mqar(64, batch=8, seed=seed, vocab_size=32, n_pairs=n_pairs, replace=False)
    for row in range(8):
        ids = task.input_ids[row].tolist()
        pairs = {ids[2 * i]: ids[2 * i + 1] for i in range(n_pairs)}
        assert len(pairs) == n_pairs and all(1 <= k < 16 for k in pairs)
        assert all(16 <= v < 32 for v in pairs.values())
        answers = task.answer_positions[row].tolist()
        queried = [ids[a - 1] for a in answers]
        assert sorted(queried) == sorted(pairs)
        assert [ids[a] for a in answers] == [pairs[k] for k in queried]
        for answer, cue in zip(answers, task.cue_positions[row].tolist(), strict=True):
            assert ids[cue] == ids[answer] and ids[cue - 1] == ids[answer - 1]
        others = set(range(2 * n_pairs, 64)) - set(answers) - {a - 1 for a in answers}
        assert all(ids[p] == 0 for p in others)


@pytest.mark.parametrize("seed", range(3))
def test_mqar_with_replacement_asks_keys_of_the_row_at_exact_places(seed):
    n_pairs, n_queries = 3, 12
    options = {"vocab_size": 32, "n_pairs": n_pairs, "n_queries": n_queries, "replace": True}
    task = mqar(40, batch=8, seed=seed, **options)
    again = mqar(40, batch=8, seed=seed, **options)
    assert torch.equal(task.input_ids, again.input_ids)
    assert torch.equal(task.answer_positions, again.answer_positions)
    assert task.options == options
    assert task.answer_positions.shape == (8, n_queries)
    for row in range(8):
        ids = task.input_ids[row].tolist()
        pairs = {ids[2 * i]: ids[2 * i + 1] for i in range(n_pairs)}
        assert len(pairs) == n_pairs and len(set(pairs.values())) == n_pairs  # distinct
        answers = task.answer_positions[row].tolist()
        assert answers == sorted(answers) and all(a % 2 == 1 for a in answers)
        assert all(ids[a - 1] in pairs and ids[a] == pairs[ids[a - 1]] for a in answers)
        for answer, cue in zip(answers, task.cue_positions[row].tolist(), strict=True):
            assert cue < 2 * n_pairs and ids[cue - 1 : cue + 1] == ids[answer - 1 : answer + 1]
        others = set(range(2 * n_pairs, 40)) - set(answers) - {a - 1 for a in answers}
        assert all(ids[p] == 0 for p in others)


def test_mqar_replacement_draws_each_query_key_uniformly():
    task = mqar(16, batch=3000, seed=7, vocab_size=16, n_pairs=4)  # replace=True by default
    pair = (task.cue_positions - 1) // 2  # which pair each query asks, (3000, 4)
    counts = torch.bincount(pair.flatten(), minlength=4).double() / pair.numel()
    assert torch.allclose(counts, torch.full((4,), 0.25, dtype=torch.double), atol=0.02)
    distinct = torch.tensor([len(set(r)) for r in pair.tolist()])
    # four independent uniform draws of four keys are all distinct with chance 4!/4^4 = 9.4%
    assert abs((distinct == 4).double().mean().item() - 24 / 256) < 0.02
    without = mqar(16, batch=200, seed=7, vocab_size=16, n_pairs=4, replace=False)
    assert all(len(set(r)) == 4 for r in ((without.cue_positions - 1) // 2).tolist())
    fewer = mqar(16, batch=200, seed=7, vocab_size=16, n_pairs=4, n_queries=2, replace=False)
    assert fewer.answer_positions.shape == (200, 2)
    assert all(len(set(r)) == 2 for r in ((fewer.cue_positions - 1) // 2).tolist())


def test_mqar_option_validation():
    with pytest.raises(ValueError, match="replace=true"):
        mqar(64, n_pairs=4, n_queries=5, replace=False)
    with pytest.raises(ValueError, match="length"):
        mqar(24, n_pairs=4, n_queries=9, replace=True)  # needs 2 * (4 + 9) = 26
    with pytest.raises(TypeError, match="replace"):
        mqar(64, n_pairs=4, replace=1)
    with pytest.raises(ValueError, match="n_queries"):
        mqar(64, n_pairs=4, n_queries=0)


@pytest.mark.parametrize("task", MEMORY_TASKS)
def test_loss_mask_marks_exactly_the_answer_predecessors(task):
    built = make_memory_task(task, 128, batch=3, seed=1)
    ids, mask = training_batch(task, 128, 3, seed=1)
    assert torch.equal(ids, built.input_ids)
    expected = torch.zeros(3, 128, dtype=torch.bool)
    for row in range(3):
        for position in built.answer_positions[row].tolist():
            expected[row, position - 1] = True
    assert torch.equal(mask, expected)
    assert not mask[:, -1].any()
    assert torch.equal(ids[:, 1:][mask[:, :-1]], built.answers.flatten())


def test_options_and_validation():
    assert task_vocab_size("induction") == 16
    assert task_vocab_size("mqar", {"vocab_size": 128}) == 128
    assert make_memory_task("mqar", 256, n_pairs=16, vocab_size=128).answers.shape == (1, 16)
    with pytest.raises(TypeError, match="does not take"):
        make_memory_task("induction", 64, n_pairs=3)
    with pytest.raises(ValueError, match="length"):
        induction(20, n_queries=10)
    with pytest.raises(ValueError, match="length"):
        selective_copy(20, n_data=16)
    with pytest.raises(ValueError, match="vocab_size"):
        mqar(256, n_pairs=16, vocab_size=16)
    with pytest.raises(ValueError, match="unknown memory task"):
        make_memory_task("copy", 64)
    with pytest.raises(TypeError, match="no task options"):
        training_batch("text", 64, 1, seed=0, task_options={"n_pairs": 2})


def test_probe_carries_the_answer_positions():
    assert set(MEMORY_TASKS) <= set(TASKS) and set(MEMORY_TASKS) <= set(TRAINING_TASKS)
    probe = make_probe("mqar", 64, batch=2, seed=5, n_pairs=4, vocab_size=32)
    built = mqar(64, batch=2, seed=5, n_pairs=4, vocab_size=32)
    assert torch.equal(probe.input_ids, built.input_ids)
    assert probe.answer_positions == tuple(map(tuple, built.answer_positions.tolist()))
    assert probe.answer_ids == tuple(map(tuple, built.answers.tolist()))
    with pytest.raises(ValueError, match="own vocabulary"):
        make_probe("induction", 64, tokenizer="bytes")


@pytest.mark.parametrize("name", ["mamba", "memmamba", "mamba2", "transformer"])
def test_chunked_accuracy_matches_one_forward(name):
    model = build_model(name, "tiny", seed=1, vocab_size=16).eval()
    for task in (induction(150, batch=3, seed=2), selective_copy(150, batch=3, seed=2)):
        whole = answer_hits(model, task, chunk_size=None)
        with torch.no_grad():
            logits = model(task.input_ids).logits
        direct = logits.argmax(-1).gather(1, task.answer_positions - 1) == task.answers
        assert torch.equal(whole, direct)
        assert torch.equal(answer_hits(model, task, chunk_size=32), whole)
    result = task_accuracy(model, "induction", 100, trials=10, batch=4, chunk_size=32)
    assert result.trials == 10 and 0 <= result.solved <= 10
    assert result.low <= result.accuracy <= result.high


def test_training_on_a_memory_task_builds_the_task_vocabulary(tmp_path):
    config = TrainConfig(
        model="mamba",
        preset="tiny",
        task="mqar",
        task_options={"n_pairs": 4, "vocab_size": 24},
        length=64,
        batch_size=2,
        steps=2,
        save_every=2,
        warmup_steps=1,
        device="cpu",
    )
    summary = train(config, tmp_path / "run")
    saved = json.loads((summary.checkpoints[-1] / "config.json").read_text())
    assert saved["config"]["vocab_size"] == 24
    assert saved["meta"]["training"]["task_options"] == {"n_pairs": 4, "vocab_size": 24}
    with pytest.raises(ValueError, match="smaller than"):
        TrainConfig(task="induction", overrides={"vocab_size": 8}).validate()
    with pytest.raises(ValueError, match="does not take"):
        TrainConfig(task="induction", length=64, task_options={"n_pairs": 2}).validate()
    with pytest.raises(ValueError, match="no task options"):
        TrainConfig(task="text", task_options={"n_pairs": 2}).validate()


def test_shipped_task_checkpoint_loads_by_name_and_is_described(tmp_path, monkeypatch, capsys):
    from fidelity.cli import main
    from fidelity.models import loading, registry
    from fidelity.models.checkpoint import save_checkpoint

    data = tmp_path / "data"
    model = build_model("mamba", "tiny", vocab_size=16)
    training = {"task": "induction", "task_options": {"n_queries": 16}, "length": 256}
    save_checkpoint(model, data / "mamba-induction", meta={"training": {**training, "steps": 7}})
    monkeypatch.setattr(registry, "DATA_DIR", data)
    assert registry.shipped_task_checkpoints() == ["mamba-induction"]
    loaded = loading.load_model("mamba-induction")
    assert loaded.config.vocab_size == 16 and loaded.provenance["name"] == "mamba-induction"
    with pytest.raises(ValueError, match="shipped checkpoint"):
        loading.load_model("mamba-induction", preset="tiny")
    assert main(["models"]) == 0
    printed = capsys.readouterr().out
    assert "mamba-induction" in printed and "n_queries=16" in printed and "7 steps" in printed


def test_cli_trains_and_analyzes_a_memory_task(tmp_path, capsys):
    from fidelity.cli import main

    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--model", "mamba2", "--preset", "tiny"]
    argv += ["--task", "induction", "--task-option", "n_queries=4", "--length", "64"]
    assert main([*argv, "--steps", "1", "--batch-size", "2", "--device", "cpu"]) == 0
    assert (
        main(
            [
                "train",
                "--out",
                str(tmp_path / "bad"),
                "--task",
                "mqar",
                "--task-option",
                "n_data=4",
                "--length",
                "64",
            ]
        )
        == 2
    )
    assert "does not take" in capsys.readouterr().err
    status = main(
        [
            "analyze",
            "--model",
            str(out / "ckpt-1"),
            "--length",
            "128",
            "--probe",
            "induction",
            "--anchors",
            "16",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert status == 0
