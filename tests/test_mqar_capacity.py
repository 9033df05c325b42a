"""``benchmarks/mqar_capacity.py``: a 2-step grid trains, resumes nothing twice, and scores
its checkpoints exactly as a direct count of argmax hits on the same test rows."""

import json
import shutil
from argparse import Namespace

import pytest
import repo_scripts
import torch

import fidelity
from fidelity.errors import InputError
from fidelity.probes.memory_tasks import answer_accuracy, mqar


def _benchmark():
    return repo_scripts.load("benchmarks/mqar_capacity.py")


def _grid(tmp_path, *extra):
    return [
        "--models", "mamba,transformer", "--pairs", "2,3", "--steps", "2", "--save-every", "1",
        "--batch-size", "4", "--d-model", "32", "--vocab", "16", "--rows", "6",
        "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "mqar.md"), *extra,
    ]  # fmt: skip


def test_grid_trains_scores_and_reports(tmp_path):
    benchmark = _benchmark()
    benchmark.main(_grid(tmp_path, "--curve"))
    report = (tmp_path / "mqar.md").read_text()
    assert "| model | 2 pairs | 3 pairs |" in report
    assert report.count("| mamba-p3-lr0.003 | 2 |") == 1  # the runs table
    assert "- transformer-p2-lr0.003: 1: " in report  # the curve, checkpoints 1 and 2
    assert "- mamba-p3-lr0.003: 2: " in report  # the training loss at the last step logged

    run = tmp_path / "runs" / "transformer-p3-lr0.003"
    saved = json.loads((run / "train_config.json").read_text())
    options = {"n_pairs": 3, "vocab_size": 16, "n_queries": 16, "replace": True}
    assert saved["task_options"] == options and saved["length"] == 2 * (3 + 16)
    assert "--task-option n_queries=16 --task-option replace=true --length 38" in report
    scored = benchmark.score(run / "ckpt-2", options, length=38, rows=6)
    model = fidelity.load_model(run / "ckpt-2").eval()
    rows = mqar(38, batch=6, seed=benchmark.TEST_SEED, **options)
    with torch.no_grad():
        hits = answer_accuracy(model(rows.input_ids).logits, rows)
    assert (scored.step, scored.queries, scored.rows) == (2, 6 * 16, 6)
    assert scored.correct == int(hits.sum())
    assert scored.solved == int(hits.all(dim=1).sum())
    low, high = scored.query_interval
    assert low <= scored.correct / scored.queries <= high
    assert benchmark.cell_text(scored, 2) == benchmark.cell_text(scored, 1)  # finished
    assert benchmark.cell_text(scored, 3).endswith("(step 2 of 3)")  # stopped early

    before = (tmp_path / "runs" / "_meta" / "mamba-p2-lr0.003.json").read_text()
    benchmark.main(_grid(tmp_path))  # finished runs are evaluated, not trained again
    assert (tmp_path / "runs" / "_meta" / "mamba-p2-lr0.003.json").read_text() == before

    killed = tmp_path / "runs" / "mamba-p3-lr0.003"  # as if killed before its first checkpoint
    for checkpoint in killed.glob("ckpt-*"):
        shutil.rmtree(checkpoint)
    benchmark.main(_grid(tmp_path))  # started over, not refused
    assert sorted(p.name for p in killed.glob("ckpt-*")) == ["ckpt-1", "ckpt-2"]


def _guess_right(task, rule, generator) -> float:
    """Share of ``task``'s queries a binding-free guesser gets right: at each query it knows
    the row's values and the answers shown so far, never which key holds which value, and
    picks uniformly among the values ``rule(values, shown)`` leaves."""
    right = total = 0
    n_pairs = task.options["n_pairs"]
    for ids, answers in zip(task.input_ids.tolist(), task.answer_positions.tolist(), strict=True):
        values, shown = ids[1 : 2 * n_pairs : 2], []
        for answer in answers:
            left = rule(values, shown)
            right += left[int(torch.randint(len(left), (1,), generator=generator))] == ids[answer]
            total += 1
            shown.append(ids[answer])
    return right / total


def _eliminate(values, shown):
    return [v for v in values if v not in shown] or values


def test_unbound_accuracy_is_what_a_guesser_without_binding_gets_on_real_rows():
    benchmark = _benchmark()
    assert benchmark.unbound_accuracy(1, 1, False) == 1.0
    assert benchmark.unbound_accuracy(4, 4, False) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert benchmark.unbound_accuracy(4, 2, False) == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert benchmark.unbound_accuracy(4, 16, True) == 0.25
    assert benchmark.unbound_solved(4, 4, False) == pytest.approx(1 / 24)
    assert benchmark.unbound_solved(4, 3, True) == pytest.approx(1 / 64)
    generator = torch.Generator().manual_seed(0)
    # every key asked once: ruling out the values already answered pays, H(n) / n
    once = mqar(16, batch=4000, seed=1, vocab_size=16, n_pairs=4, replace=False)
    assert _guess_right(once, _eliminate, generator) == pytest.approx(
        benchmark.unbound_accuracy(4, 4, False), abs=0.012
    )
    # with replacement it does not: neither guess beats 1 / n (16000 queries; 3 sigma 0.01)
    drawn = mqar(40, batch=1000, seed=1, vocab_size=16, n_pairs=4, n_queries=16, replace=True)
    expected = benchmark.unbound_accuracy(4, 16, True)
    assert _guess_right(drawn, lambda values, shown: values, generator) == pytest.approx(
        expected, abs=0.012
    )
    assert _guess_right(drawn, _eliminate, generator) < expected + 0.012


def test_row_form_follows_the_options():
    benchmark = _benchmark()
    smallest = Namespace(vocab=0, queries=0, length=0, replace=False)
    assert benchmark.vocab(8, smallest) == 18 and benchmark.queries(8, smallest) == 8
    assert benchmark.row_length(benchmark.Cell("mamba", 8, 3e-3), smallest) == 32
    assert benchmark.task_options(8, smallest) == {
        "n_pairs": 8, "vocab_size": 18, "n_queries": 8, "replace": False
    }  # fmt: skip
    fixed = Namespace(vocab=64, queries=16, length=100, replace=True)
    assert benchmark.task_options(4, fixed)["vocab_size"] == 64
    assert benchmark.row_length(benchmark.Cell("mamba", 4, 3e-3), fixed) == 100


def test_bad_settings_fail_before_training(tmp_path):
    benchmark = _benchmark()
    with pytest.raises(InputError, match="vocab"):  # 3 pairs need a vocabulary of 8
        benchmark.main(_grid(tmp_path, "--vocab", "6"))
    with pytest.raises(InputError, match="list of int"):
        benchmark.main(_grid(tmp_path, "--pairs", "4,x"))
    with pytest.raises(InputError, match="rotated channels"):  # a model shape that cannot be
        benchmark.main(_grid(tmp_path, "--d-model", "16"))  # built: found before mamba trains
    assert not (tmp_path / "runs").exists()
