"""benchmarks/passkey_mechanism.py: needle occlusion, pool-trace flags, verdicts and the table,
on test doubles and tiny random models."""

import json
import math

import numpy as np
import pytest
import repo_scripts
import torch
from test_retrieval import VOCAB, CachedNeedleCopyingOracle

from fidelity.errors import InputError
from fidelity.models.base import CausalLM, LMOutput
from fidelity.models.checkpoint import save_checkpoint
from fidelity.models.config import ModelConfig
from fidelity.models.registry import build_model
from fidelity.probes.memmamba_trace import tracing_memmamba
from fidelity.probes.tasks import PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION, passkey_probe
from fidelity.probes.tokenizer import as_tokenizer

LENGTH = 400  # 151 filler tokens: room for the control span on either side


bench = repo_scripts.load("benchmarks/passkey_mechanism.py")


pytestmark = pytest.mark.usefixtures("one_thread")


class LastTokenModel(CausalLM):
    """Sees only the last token: logits are a fixed random table's row of it, so nothing
    earlier (the needle included) can move the answer."""

    def __init__(self) -> None:
        super().__init__(ModelConfig(d_model=4, n_layer=1, vocab_size=VOCAB))
        self.table = torch.nn.Parameter(
            torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0))
        )

    def init_cache(self, batch_size, device=None, dtype=None):
        return {}

    def forward(self, input_ids, cache=None, output_hidden_states=False):
        return LMOutput(logits=self.table[input_ids])

    def step(self, tokens, cache):
        return self.table[tokens]


def _options(trials=3, **kwargs):
    return bench.CellOptions(trials=trials, **kwargs)


def _record(rows, trials, depths, label=""):
    """What a run saves to its raw file, around ``rows``."""
    return {
        "command": "python benchmarks/passkey_mechanism.py --model x",
        "label": label,
        "date": "2026-12-01",
        "seconds": 60.0,
        "load": "1.0 at the end",
        "filler": "standard",
        "trials": trials,
        "depths": depths,
        "rows": [bench.asdict(r) for r in rows],
    }


def _table(tmp_path, rows, trials, depths, label=""):
    """The markdown the writer makes of ``rows`` (through JSON, as from a raw file)."""
    out = tmp_path / "table.md"
    bench.write_table(out, json.loads(json.dumps(_record(rows, trials, depths, label))))
    return out.read_text()


def test_occlusion_changes_the_key_digits_and_a_filler_span_of_the_same_size():
    tokenizer = as_tokenizer(None)
    probe = passkey_probe(LENGTH, batch=3, seed=1, depth=0.5)
    for row in range(3):
        item = bench.occlusion(probe, row, tokenizer, np.random.default_rng(row))
        start, end = probe.needle_spans[row]
        ids = probe.input_ids[row]
        needle = tokenizer.decode(ids[start:end].tolist())
        key = probe.answers[row]
        assert [needle[p - start] for p in item.key.tolist()] == list(key + key)
        occluded = ids.clone()
        occluded[item.key] = item.key_ids
        other = tokenizer.decode(occluded[start:end].tolist())
        new_key = other.split("The pass key is ")[1][:5]
        assert other == f"The pass key is {new_key}. Remember it. {new_key} is the pass key."
        assert all(a != b for a, b in zip(new_key, key, strict=True))
        # the control: as many positions, all in the filler, every token changed
        assert len(item.control) == len(item.key) == 10
        assert ((item.control < start) | (item.control >= end)).all()
        assert (item.control_ids != ids[item.control]).all()
        assert (item.key - item.control).unique().tolist() == [end - start + 1]


def test_depth_zero_puts_the_control_after_the_needle_and_no_room_gives_none():
    tokenizer = as_tokenizer(None)
    probe = passkey_probe(LENGTH, batch=1, depth=0.0)
    item = bench.occlusion(probe, 0, tokenizer, np.random.default_rng(0))
    assert (item.control > probe.needle_spans[0][1]).all()
    pieces = (PASSKEY_INTRO + "\n", "\n", PASSKEY_NEEDLE.format(key="12345"), "\n")
    fixed = sum(len(tokenizer.encode(text)) for text in (*pieces, "\n" + PASSKEY_QUESTION))
    short = passkey_probe(fixed + 10, batch=1, depth=0.5)  # 5 filler tokens on each side
    assert len(bench.occlusion(short, 0, tokenizer, np.random.default_rng(0)).control) == 0


def test_a_model_that_cannot_see_the_needle_has_exactly_zero_effect():
    rows = bench.measure_cell(LastTokenModel(), "last", LENGTH, 2, _options())
    assert [r.needle_effect for r in rows] == [0.0] * 3
    assert [r.control_effect for r in rows] == [0.0] * 3
    assert not any(r.right for r in rows) and all(r.pool is None for r in rows)


def test_needle_effect_matches_a_direct_computation():
    model = build_model("mamba", "tiny").eval()
    tokenizer = as_tokenizer(None)
    options = _options(trials=2, seed=3)
    rows = bench.measure_cell(model, "mamba", LENGTH, 1, options)
    probe = passkey_probe(LENGTH, batch=2, seed=3 * 1000 + 1, depth=options.depths[1])
    rng = np.random.default_rng([3, LENGTH, 1])
    answers = torch.tensor(probe.answer_ids)

    def direct(prompt):  # one plain forward over prompt + answer
        logits = model(torch.cat([prompt, answers[:, :-1]], dim=1)).logits[:, -6:]
        picked = torch.log_softmax(logits, -1).gather(-1, answers[..., None])[..., 0]
        return picked[:, 1:].sum(1)  # the 5 digits, not the leading space

    occluded = probe.input_ids.clone()
    for row in range(2):
        item = bench.occlusion(probe, row, tokenizer, rng)
        occluded[row, item.key] = item.key_ids
    with torch.no_grad():
        expected = direct(probe.input_ids) - direct(occluded)
        base = direct(probe.input_ids)
    for row, record in enumerate(rows):
        assert record.needle_effect == pytest.approx(float(expected[row]), abs=1e-3)
        assert record.log_prob == pytest.approx(float(base[row]), abs=1e-3)
        last_digit = probe.needle_spans[row][1] - 1 - len(" is the pass key.")
        assert record.distance == LENGTH - last_digit  # the logits at LENGTH give digit 1


def test_the_oracle_is_scored_right_and_reads_the_needle_not_the_filler():
    rows = bench.measure_cell(CachedNeedleCopyingOracle(), "oracle", LENGTH, 2, _options())
    assert all(r.right for r in rows)
    assert all(r.needle_effect > 1.0 for r in rows)  # it now copies the other key
    assert all(r.control_effect == 0.0 for r in rows)
    record = {"rows": [json.loads(json.dumps(bench.asdict(r))) for r in rows]}
    assert bench.verdict(record["rows"]).startswith("3/3 right: carried by the sequence mixer")


def _memmamba():
    # writes and fires often, so the flags have something to count
    return build_model("memmamba", "tiny", write_init_bias=1.0, tau2=0.3).eval()


def test_pool_flags_match_an_independent_count():
    model = _memmamba()
    tokenizer = as_tokenizer(None)
    probe = passkey_probe(LENGTH, batch=3, seed=5, depth=0.75)
    answers = torch.tensor(probe.answer_ids)
    digits = bench.digit_mask(answers, tokenizer)
    keys = [bench.occlusion(probe, r, tokenizer, np.random.default_rng(r)).key for r in range(3)]
    flags = bench.pool_trace(model, probe.input_ids, answers, digits, keys, 64)
    window = model.config.note_window
    answer_positions = list(range(LENGTH, LENGTH + 5))  # the logits there give the 5 digits
    sequence = torch.cat([probe.input_ids, answers[:, :-1]], dim=1)
    with torch.no_grad(), tracing_memmamba(model, tuple(sequence.shape), answer_positions) as trace:
        model(sequence)  # one pass (pool_trace ran chunks of 64)
    # the pool the first answer position (LENGTH) reads: the model's own, after the prompt
    cache = model.init_cache(3)
    with torch.no_grad():
        model(probe.input_ids, cache=cache)
    counted = {"written": 0, "kept": 0}
    for row in range(3):
        covered = {k + offset for k in keys[row].tolist() for offset in range(window)}
        for block in range(model.config.n_layer):
            rows, positions, _ = trace.writes(block)
            written = any(p in covered for p in positions[rows == row].tolist())
            pool = cache.layers[block].pool
            kept = any(p in covered for p in pool.positions[row][pool.valid[row]].tolist())
            fired_rows, fired_positions = trace.fired(block)
            fired = {
                p
                for r, p in zip(fired_rows.tolist(), fired_positions.tolist(), strict=True)
                if r == row
            }
            assert flags[row][block]["written"] == written
            assert flags[row][block]["kept"] == kept
            expected = sum(p in fired for p in answer_positions) / 5
            assert flags[row][block]["fired"] == pytest.approx(expected)
            counted["written"] += written
            counted["kept"] += kept
    assert counted["written"] > 0 and counted["kept"] > 0  # the test saw notes over the key


def test_pool_weights_sum_the_needle_notes_attention():
    model = _memmamba()
    tokenizer = as_tokenizer(None)
    probe = passkey_probe(LENGTH, batch=2, seed=7, depth=0.9)
    answers = torch.tensor(probe.answer_ids)
    digits = bench.digit_mask(answers, tokenizer)
    keys = [bench.occlusion(probe, r, tokenizer, np.random.default_rng(r)).key for r in range(2)]
    flags = bench.pool_trace(model, probe.input_ids, answers, digits, keys, None)
    sequence = torch.cat([probe.input_ids, answers[:, :-1]], dim=1)
    positions = list(range(LENGTH, LENGTH + 5))
    with torch.no_grad(), tracing_memmamba(model, tuple(sequence.shape), positions) as trace:
        model(sequence)
    window = model.config.note_window
    for row in range(2):
        for block in flags[row]:
            for kind in ("token", "layer"):
                shares = []
                for record in trace.attention:
                    if (record.block, record.kind, record.row) != (block, kind, row):
                        continue
                    total = 0.0
                    for note, position in enumerate(record.note_positions.tolist()):
                        if any(0 <= position - k < window for k in keys[row].tolist()):
                            total += record.weights[:, note].mean().item()
                    shares.append(total)
                value = flags[row][block][f"{kind}_weight"]
                if shares:
                    assert value == pytest.approx(sum(shares) / len(shares), abs=1e-6)
                else:
                    assert value is None
    assert any(f[1]["layer_weight"] is not None for f in flags)  # block 1 reads block 0's pool


def test_the_markdown_writer_writes_verdicts_and_tables(tmp_path):
    memmamba = _memmamba()
    frame = bench.fidelity.analyze(
        memmamba, 256, probe="text", metrics="etmf", anchors=32, progress=False, n_boot=0
    ).frame
    rows = bench.measure_cell(memmamba, "memmamba", LENGTH, 0, _options(trials=2), frame)
    rows += bench.measure_cell(CachedNeedleCopyingOracle(), "oracle", LENGTH, 0, _options(2))
    assert set(rows[0].etmf) == {1, 2}
    text = _table(tmp_path, rows, trials=2, depths=[0.0], label="test models")
    assert "**test models**" in text and "python benchmarks/passkey_mechanism.py" in text
    assert f"- **memmamba at {LENGTH}**: 0/2 right: lost (pool:" in text
    assert f"- **oracle at {LENGTH}**: 2/2 right: carried by the sequence mixer" in text
    assert f"| memmamba | {LENGTH} | 0 | wrong | 2 |" in text
    assert f"| oracle | {LENGTH} | 0 | right | 2 |" in text
    pool_lines = [
        line
        for line in text.splitlines()
        if line.startswith(f"| memmamba | {LENGTH} | 0 | wrong | ")
    ]
    assert len(pool_lines) == 1 + 2  # the rows table, then blocks 0 and 1


def test_intervals():
    mean, low, high = bench.mean_interval([1.0, 2.0, 3.0])
    assert high == pytest.approx(2 + (2 - low))
    assert mean == 2.0 and low == pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert bench.mean_interval([None]) is None
    assert bench.rate([True, False, False, False]).startswith("1/4 [")


def test_bad_model_labels_are_input_errors():
    with pytest.raises(InputError, match="distinct labels"):
        bench.parse_models(["a=mamba", "a=memmamba"])
    assert bench.parse_models(["mamba"]) == {"mamba": "mamba"}


def test_a_run_plans_measures_and_writes_the_table_and_raw_rows(tmp_path, capsys):
    directory = save_checkpoint(build_model("mamba", "tiny"), tmp_path / "ckpt")
    out, raw = tmp_path / "table.md", tmp_path / "raw.json"
    arguments = ["--model", f"tiny={directory}", "--lengths", str(LENGTH), "--trials", "1"]
    bench.main([*arguments, "--anchors", "0", "--out", str(out), "--raw", str(raw)])
    printed = capsys.readouterr().out
    assert printed.startswith("plan: 1 model(s) x 1 length(s) x 5 depths x 1 prompts")
    assert "[5/5] tiny 400 depth 1:" in printed
    saved = json.loads(raw.read_text())
    assert len(saved["rows"]) == 5 and saved["trials"] == 1
    assert f"--model tiny={directory}" in saved["command"]
    assert saved["command"].endswith(f" --anchors 0 --out {out}")  # outside the repository
    assert f"- **tiny at {LENGTH}**: 0/5 right" in out.read_text()


def test_decimation_flags_match_the_positions_the_model_reports(tmp_path):
    """What a tiny DeciMamba's decimating layers keep, read by hooks during the scored pass,
    equals what its own forward reports (``layer_positions``); the verdict and table say it."""
    model = build_model(
        "decimamba",
        "tiny",
        seed=0,
        n_layer=4,
        decimating_layers=[1, 2],
        decimation_base_length=300,
        decimation_beta=0.5,
    ).eval()
    rows = bench.measure_cell(model, "deci", LENGTH, 2, _options(trials=3, chunk_size=None))
    tokenizer = as_tokenizer(None)
    probe = passkey_probe(LENGTH, batch=3, seed=2, depth=0.5, tokenizer=tokenizer)
    question = range(LENGTH - len(tokenizer.encode("\n" + PASSKEY_QUESTION)), LENGTH)
    with torch.no_grad():
        reported = model(probe.input_ids, output_hidden_states=True).layer_positions
    rng = np.random.default_rng(0)
    for index, row in enumerate(rows):
        key = bench.occlusion(probe, index, tokenizer, rng).key.tolist()
        assert set(row.decimation) == {1, 2}
        for layer in (1, 2):
            kept = set(reported[layer + 1][index].tolist())  # the rows leaving block `layer`
            flags = row.decimation[layer]
            assert flags["kept"] == pytest.approx(len(kept) / LENGTH)
            assert flags["needle"] == pytest.approx(sum(p in kept for p in key) / len(key))
            assert flags["question"] == pytest.approx(
                sum(p in kept for p in question) / len(question)
            )
        assert row.decimation[2]["kept"] < row.decimation[1]["kept"] < 1.0  # 301, then 151 rows
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    assert bench.measure_cell(_memmamba(), "m", LENGTH, 0, _options(1))[0].decimation is None
    text = _table(tmp_path, rows, trials=3, depths=[0.5])
    share = 100 * np.mean([r.decimation[1]["kept"] for r in rows])
    assert f"; decimation: layer 1 kept {share:.1f}% of the prompt, " in text
    assert "## DeciMamba's decimation, per decimating layer" in text
    section = text.split("## DeciMamba's decimation, per decimating layer")[1]
    layer_rows = [
        line for line in section.splitlines() if line.startswith(f"| deci | {LENGTH} | 0.5 | ")
    ]
    assert {line.split(" | ")[4] for line in layer_rows} == {"1", "2"}


def test_from_raw_rewrites_the_table_without_models(tmp_path, capsys):
    rows = bench.measure_cell(LastTokenModel(), "last", LENGTH, 0, _options(trials=1))
    raw, out = tmp_path / "raw.json", tmp_path / "table.md"
    raw.write_text(json.dumps(_record(rows, trials=1, depths=[0.0])))
    bench.main(["--from-raw", "--raw", str(raw), "--out", str(out)])
    assert f"- **last at {LENGTH}**: 0/1 right" in out.read_text()
    with pytest.raises(SystemExit):
        bench.main(["--lengths", "1k"])
    assert "--model and --lengths are required" in capsys.readouterr().err
