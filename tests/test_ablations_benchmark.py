"""The pure parts of benchmarks/ablations.py: variant settings, stage B run status, entries of
the evaluation-time variants (distinct cache identities), not-trained rows, arguments."""

from __future__ import annotations

import pytest
import repo_scripts

from fidelity.errors import InputError
from fidelity.models.checkpoint import save_checkpoint
from fidelity.models.registry import build_model
from fidelity.train import STATE_JSON, STATE_TENSORS

repo_scripts.load("benchmarks/claim_small.py")  # what ablations.py imports it as
bench = repo_scripts.load("benchmarks/ablations.py")


def test_settings_and_commands_name_the_switch() -> None:
    assert bench.setting("no Note Block") == "use_note_block=false"
    assert bench.setting("tau2 = 0.7") == "tau2=0.7"
    command = bench.stage_b_command("FIFO pool", bench.Path("runs/abl-b"))
    assert "--set pool_policy=fifo --out runs/abl-b/fifo" in command
    assert f"--init {bench.INIT}" in command and "--steps 500" in command


def fake_checkpoint(run, step: int) -> None:
    directory = run / f"ckpt-{step}"
    directory.mkdir(parents=True)
    for name in ("config.json", STATE_JSON, STATE_TENSORS):
        (directory / name).write_text("{}")


def test_stage_b_status_counts_steps_and_needs_the_last(tmp_path) -> None:
    assert bench.stage_b_status(tmp_path / "absent") == (None, 0)
    run = tmp_path / "fifo"
    fake_checkpoint(run, 50)
    fake_checkpoint(run, 100)
    assert bench.stage_b_status(run) == (None, 100)
    entries, missing = bench.stage_b_entries(tmp_path)
    assert entries == [] and missing["FIFO pool"] == 100 and missing["no Note Block"] == 0
    assert len(missing) == len(bench.VARIANTS)
    fake_checkpoint(run, 500)
    assert bench.stage_b_status(run) == (run / "ckpt-500", 500)
    rows = bench.not_trained_rows({"FIFO pool": 100}, 4)
    assert rows == ["| FIFO pool (stage B) | 512 | not trained (100/500 steps) | - | - | - |"]


def test_evaluation_entries_are_distinct_models_of_the_full_one(tmp_path) -> None:
    model = build_model("memmamba", "tiny", seed=1)
    save_checkpoint(model, tmp_path / "full", meta={"training": {"length": 64}})
    (full,) = bench.load_entries({"full": str(tmp_path / "full")})
    entries = bench.evaluation_entries(full)
    assert len(entries) == len(bench.VARIANTS)
    identities = [repr(e.identity) for e in [full, *entries]]
    assert len(set(identities)) == len(identities)
    no_token = next(e for e in entries if e.label.startswith("no cross-token"))
    assert no_token.model.config.use_cross_token is False and no_token.training_length == 64
    assert no_token.identity["sha256"] == full.identity["sha256"]


def test_arguments_are_checked() -> None:
    args = bench.parse_arguments(["--max-multiple", "4", "--only", "Mamba"])
    assert [p.value for p in args.points] == [1, 4, 16, 64]
    assert args.bounds.only == frozenset({"Mamba"}) and args.bounds.max_multiple == {"": 4.0}
    with pytest.raises(InputError):
        bench.parse_arguments(["--multiples", "0,4"])
    with pytest.raises(InputError):
        bench.parse_arguments(["--trials", "0"])


def test_reference_and_init_replace_the_shipped_full_model_and_its_a2(tmp_path) -> None:
    """A retrained A2 checkpoint and its own full-model stage B: both reach the report's text
    and the commands; the default is the shipped memmamba and the recorded A2 checkpoint."""
    default = bench.parse_arguments([])
    assert default.reference == "memmamba" and default.init == bench.INIT
    assert bench.reference_text(default) == "the shipped `memmamba`"
    args = bench.parse_arguments(
        ["--reference", "runs/pk8/memmamba", "--init", "runs/pk8/memmamba-passkey-a2/ckpt-1000"]
    )
    assert "`runs/pk8/memmamba`" in bench.reference_text(args)
    command = bench.stage_b_command("tau1 = 0.3", bench.Path("runs/abl-b2"), args.init)
    assert "--init runs/pk8/memmamba-passkey-a2/ckpt-1000 " in command
    assert command.endswith("--set tau1=0.3 --out runs/abl-b2/tau1-0.3")
    assert bench.sources(default) == []
    assert bench.sources(args) == [
        "--reference", "runs/pk8/memmamba", "--init", "runs/pk8/memmamba-passkey-a2/ckpt-1000"
    ]  # fmt: skip
