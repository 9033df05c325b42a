"""benchmarks/claim_small.py: lengths as multiples of each model's training length, the per-cell
cache (hits, invalidation by a changed checkpoint), "not measured" cells, the filler per task
and refused options, on tiny untrained checkpoints at very short lengths."""

from pathlib import Path

import pytest
import repo_scripts

from fidelity.budget import MemoryBudgetError
from fidelity.errors import InputError
from fidelity.models.checkpoint import save_checkpoint
from fidelity.models.registry import build_model
from fidelity.train import STATE_JSON, STATE_TENSORS

bench = repo_scripts.load("benchmarks/claim_small.py")

pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(directory: Path, training_length: int | None, seed: int = 0) -> Path:
    """A tiny untrained Mamba (seeded by ``seed``) saved to ``directory``, recording
    ``training_length`` as its training length (none when None)."""
    model = build_model("mamba", "tiny", seed=seed).eval()
    meta = {"training": {"length": training_length, "steps": 3}} if training_length else {}
    return save_checkpoint(model, directory, meta=meta, overwrite=True)


@pytest.fixture
def pair(tmp_path):
    """Two checkpoints trained "at" 150 and 200 tokens, and the arguments naming them."""
    a = _checkpoint(tmp_path / "a", 150)
    b = _checkpoint(tmp_path / "b", 200, seed=1)
    return a, b, ["--models", f"a={a},b={b}", "--reference", "a"]


def _arguments(tmp_path, *extra):
    return [
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "claim.md"),
        "--trials",
        "1",
        "--no-memory",
        *extra,
    ]


@pytest.fixture
def counted(monkeypatch):
    """Counts the real cell measurements as (label-free) (task, length) pairs."""
    calls = []
    original = bench.measure_cell

    def counting(model, task, length, trials, progress, rows=None):
        calls.append((task, length))
        return original(model, task, length, trials, progress, rows)

    monkeypatch.setattr(bench, "measure_cell", counting)
    return calls


def _table(report: str, task: str) -> str:
    """The extrapolation table of ``task`` in ``report``."""
    section = report.split(f"## {bench.TASK_TITLES[task]}")[1]
    return section.split("By needle depth")[0]


def test_multiples_resolve_per_model_from_its_training_length(pair, tmp_path):
    a, b, _ = pair
    entries = bench.load_entries({"a": str(a), "b": str(b)})
    assert [e.training_length for e in entries] == [150, 200]
    points = [bench.Point(2.0, True), bench.Point(4.0, True)]
    cells = bench.plan_cells(entries, ["kv"], points)
    found = {(c.entry.label, c.point.heading): c.length for c in cells}
    assert found == {("a", "2x"): 300, ("b", "2x"): 400, ("a", "4x"): 600, ("b", "4x"): 800}
    assert [c.length for c in cells] == sorted(c.length for c in cells)  # short cells first
    absolute = bench.plan_cells(entries, ["kv"], [bench.Point(300.0, False)])
    assert [(c.length, c.multiple) for c in absolute] == [(300, 2.0), (300, 1.5)]


def test_a_training_run_directory_means_its_newest_checkpoint_and_says_state_passing(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        _checkpoint(run / f"ckpt-{step}", 100, seed=step)
    for step in (1, 2):  # ckpt-3 lacks its trainer state: incomplete
        (run / f"ckpt-{step}" / STATE_JSON).write_text("{}")
        (run / f"ckpt-{step}" / STATE_TENSORS).write_bytes(b"")
    assert bench.resolve(str(run)) == str(run / "ckpt-2")
    assert bench.resolve("mamba") == "mamba"
    (run / "train_config.json").write_text('{"state_passing": "carry", "init": "mamba"}')
    (entry,) = bench.load_entries({"sp": str(run)})
    assert entry.model.provenance["checkpoint"] == str(run / "ckpt-2")
    assert "state passing: carry (" in bench.recipe(entry) and "started from mamba" in bench.recipe(
        entry
    )


def test_cached_cells_are_read_not_measured_again_and_a_changed_checkpoint_is(
    pair, tmp_path, counted
):
    _, b, models = pair
    arguments = _arguments(tmp_path, *models, "--multiples", "2", "--tasks", "kv,passkey-text")
    first = bench.run(arguments)
    assert sorted(counted) == [
        ("kv", 300),
        ("kv", 400),
        ("passkey-text", 300),
        ("passkey-text", 400),
    ]
    assert len(list((tmp_path / "cache" / "retrieval").glob("*.json"))) == 4
    counted.clear()
    second = bench.run(arguments)
    assert counted == []
    assert _table(first, "kv") == _table(second, "kv")
    _checkpoint(b, 200, seed=7)  # new weights in the same directory
    bench.run(arguments)
    assert sorted(counted) == [("kv", 400), ("passkey-text", 400)]
    counted.clear()
    bench.run([*arguments, "--tasks", "kv", "--trials", "2"])  # other settings: other cells
    assert sorted(counted) == [("kv", 300), ("kv", 400)]


def test_unmeasured_cells_say_why_and_are_never_zeros(pair, tmp_path, counted):
    models = pair[2]
    arguments = _arguments(tmp_path, *models, "--multiples", "2,4", "--tasks", "kv")
    text = bench.run([*arguments, "--only", "a", "--max-multiple", "kv=2"])
    assert counted == [("kv", 300)]
    table = _table(text, "kv")
    row_a = next(line for line in table.splitlines() if line.startswith("| a |"))
    row_b = next(line for line in table.splitlines() if line.startswith("| b |"))
    assert "(300)" in row_a and "not measured (beyond --max-multiple 2)" in row_a
    assert row_b.count("not measured (not in the cache; not in --only)") == 2
    assert "0.00" not in row_b
    assert "not compared, b not measured" in text
    # a later run extends the table from the cache without measuring the cached cell again
    counted.clear()
    text = bench.run([*arguments, "--max-multiple", "3"])
    assert sorted(counted) == [("kv", 400)]
    assert "not measured (beyond --max-multiple 3)" in _table(text, "kv")
    counted.clear()
    text = bench.run([*arguments, "--cached-only"])
    assert counted == []
    assert _table(text, "kv").count("not measured") == 2
    assert (tmp_path / "claim.md").read_text().rstrip() == text.rstrip()


def test_each_table_is_measured_with_its_filler(pair, tmp_path, monkeypatch):
    a = pair[0]
    seen = []

    def recording(model, task, *, lengths, trials, seed, filler, progress, rows_per_pass):
        seen.append((task, filler))
        raise InputError("recorded")  # the cell then reads "not measured (recorded)"

    monkeypatch.setattr(bench, "retrieval_accuracy", recording)
    text = bench.run(_arguments(tmp_path, "--models", f"a={a}", "--multiples", "2"))
    assert seen == [("passkey", "standard"), ("passkey", "text"), ("kv", None)]
    assert text.count("not measured (recorded)") == 3


def test_a_cell_that_would_not_fit_in_memory_is_refused_before_it_runs(
    pair, tmp_path, counted, monkeypatch
):
    def too_big(estimate):
        assert estimate.added > 0  # a real estimate of the cell's run
        raise MemoryBudgetError("this run needs about 9 GiB but memory allows 1 GiB; use less")

    monkeypatch.setattr(bench, "check_fits", too_big)
    text = bench.run(_arguments(tmp_path, *pair[2], "--multiples", "2", "--tasks", "kv"))
    assert counted == []
    refused = "not measured (memory: this run needs about 9 GiB but memory allows 1 GiB)"
    assert _table(text, "kv").count(refused) == 2


def test_a_cell_too_big_for_one_batch_is_read_one_prompt_at_a_time(pair, tmp_path, monkeypatch):
    batches, estimate_run = {}, bench.estimate_run

    def estimating(model, length, *, batch, **options):
        estimate = estimate_run(model, length, batch=batch, **options)
        batches[id(estimate)] = batch
        return estimate

    def only_single_rows(estimate):
        if batches[id(estimate)] > 1:
            raise MemoryBudgetError("this run needs about 9 GiB but memory allows 1 GiB; use less")

    passes = []
    original = bench.retrieval_accuracy

    def recording(*args, rows_per_pass=None, **kwargs):
        passes.append(rows_per_pass)
        return original(*args, rows_per_pass=rows_per_pass, **kwargs)

    monkeypatch.setattr(bench, "estimate_run", estimating)
    monkeypatch.setattr(bench, "check_fits", only_single_rows)
    monkeypatch.setattr(bench, "retrieval_accuracy", recording)
    text = bench.run(_arguments(tmp_path, *pair[2], "--multiples", "2", "--tasks", "kv"))
    assert passes and set(passes) == {1}
    assert "not measured" not in _table(text, "kv")


def test_a_model_without_a_training_length_needs_lengths(pair, tmp_path):
    plain = _checkpoint(tmp_path / "plain", None)
    with pytest.raises(InputError, match="no training length"):
        bench.run(_arguments(tmp_path, "--models", f"p={plain}", "--multiples", "1"))
    text = bench.run(
        _arguments(tmp_path, "--models", f"p={plain}", "--lengths", "300", "--tasks", "kv")
    )
    assert "(?x)" not in text and "| p | ? |" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "passkey"], "--tasks takes"),
        (["--max-multiple", "qa=3"], "--max-multiple TASK=N"),
        (["--max-multiple", "kv=-1"], "positive"),
        (["--multiples", "1,x"], "comma-separated numbers"),
        (["--only", "c"], "unknown labels"),
        (["--models", "a b=x"], "label or label=path"),
    ],
)
def test_bad_options_exit_2_with_one_line(pair, tmp_path, capsys, extra, message):
    models = pair[2]
    assert bench.main(_arguments(tmp_path, *models, *extra)) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "claim.md").exists()
