"""``benchmarks/mqar_capacity.py``: a 2-step grid trains, resumes nothing twice, and scores
its checkpoints exactly as a direct count of argmax hits on the same test rows."""

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

    checkpoint = tmp_path / "runs" / "transformer-p3-lr0.003" / "ckpt-2"
    scored = benchmark.score(checkpoint, pairs=3, length=12, vocab=16, rows=6)
    model = fidelity.load_model(checkpoint).eval()
    rows = mqar(12, batch=6, seed=benchmark.TEST_SEED, vocab_size=16, n_pairs=3)
    with torch.no_grad():
        hits = answer_accuracy(model(rows.input_ids).logits, rows)
    assert (scored.step, scored.queries, scored.rows) == (2, 18, 6)
    assert scored.correct == int(hits.sum())
    assert scored.solved == int(hits.all(dim=1).sum())
    low, high = scored.query_interval
    assert low <= scored.correct / 18 <= high
    assert benchmark.cell_text(scored, 2) == benchmark.cell_text(scored, 1)  # finished
    assert benchmark.cell_text(scored, 3).endswith("(step 2 of 3)")  # stopped early

    before = (tmp_path / "runs" / "_meta" / "mamba-p2-lr0.003.json").read_text()
    benchmark.main(_grid(tmp_path))  # finished runs are evaluated, not trained again
    assert (tmp_path / "runs" / "_meta" / "mamba-p2-lr0.003.json").read_text() == before


def test_unbound_accuracy_is_the_elimination_guess():
    benchmark = _benchmark()
    assert benchmark.unbound_accuracy(1) == 1.0
    assert benchmark.unbound_accuracy(4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    # Monte Carlo of the strategy itself: guess uniformly among the values not yet asked
    generator = torch.Generator().manual_seed(0)
    right = 0
    for _ in range(4000):
        left = list(range(4))
        for asked in torch.randperm(4, generator=generator).tolist():
            guess = left[int(torch.randint(len(left), (1,), generator=generator))]
            right += guess == asked
            left.remove(asked)
    assert right / 16000 == pytest.approx(benchmark.unbound_accuracy(4), abs=0.02)


def test_bad_settings_fail_before_training(tmp_path):
    benchmark = _benchmark()
    with pytest.raises(InputError, match="vocab"):  # 3 pairs need a vocabulary of 8
        benchmark.main(_grid(tmp_path, "--vocab", "6"))
    with pytest.raises(InputError, match="list of int"):
        benchmark.main(_grid(tmp_path, "--pairs", "4,x"))
    with pytest.raises(InputError, match="rotated channels"):  # a model shape that cannot be
        benchmark.main(_grid(tmp_path, "--d-model", "16"))  # built: found before mamba trains
    assert not (tmp_path / "runs").exists()
