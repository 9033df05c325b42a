"""Probe inputs (text, passkey, kv, random) and training batches, with the byte tokenizer."""

from __future__ import annotations

import itertools
import json
import re
import sysconfig
from pathlib import Path

import pytest
import torch

from fidelity.probes import tasks
from fidelity.probes.corpus import (
    HELDOUT_FRACTION,
    assign_split,
    clear_corpus_cache,
    load_corpus,
)
from fidelity.probes.memory_tasks import MEMORY_TASKS
from fidelity.probes.tasks import (
    KV_QUESTION,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    TASKS,
    TRAINING_TASKS,
    kv_probe,
    make_probe,
    passkey_probe,
    text_probe,
    training_batch,
)
from fidelity.probes.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()
KV_LINE_PATTERN = re.compile(r"^([A-Za-z0-9]{6}): (\d{5})$", re.MULTILINE)


def decode(ids: torch.Tensor) -> str:
    return BYTES.decode(ids)


def passkey_minimum(with_answer: bool) -> int:
    fixed = PASSKEY_INTRO + "\n" + "\n" + PASSKEY_NEEDLE.format(key="12345") + "\n\n"
    return len(fixed + PASSKEY_QUESTION) + (6 if with_answer else 0)


# --- exact lengths and spans ---------------------------------------------------------------


@pytest.mark.parametrize("with_answer", [False, True])
@pytest.mark.parametrize("task", ["passkey", "kv"])
def test_retrieval_lengths_and_spans(task: str, with_answer: bool) -> None:
    minimum = passkey_minimum(with_answer) if task == "passkey" else 300
    lengths = [minimum, minimum + 1, 777, 4099]
    for length, depth, batch, seed in itertools.product(
        lengths, [0.0, 0.3, 1.0, None], [1, 3], [0, 7]
    ):
        probe = make_probe(
            task, length, batch=batch, seed=seed, depth=depth, with_answer=with_answer
        )
        assert probe.input_ids.shape == (batch, length)
        assert probe.input_ids.dtype == torch.long
        assert (probe.task, probe.seed, probe.with_answer) == (task, seed, with_answer)
        assert len(probe.needle_spans) == len(probe.answers) == len(probe.depths) == batch
        for row in range(batch):
            ids = probe.input_ids[row]
            answer = probe.answers[row]
            start, end = probe.needle_spans[row]
            needle = decode(ids[start:end])
            assert probe.answer_ids[row] == tuple(BYTES.encode(" " + answer))
            if depth is not None:
                assert probe.depths[row] == depth
            assert 0.0 <= probe.depths[row] <= 1.0
            text = decode(ids)
            if with_answer:
                answer_start, answer_end = probe.answer_spans[row]
                assert answer_end == length
                assert decode(ids[answer_start:answer_end]) == " " + answer
                text = decode(ids[:answer_start])
            else:
                assert probe.answer_spans == ()
            if task == "passkey":
                assert re.fullmatch(r"\d{5}", answer)
                assert needle == PASSKEY_NEEDLE.format(key=answer)
                assert text.endswith("\n" + PASSKEY_QUESTION)
            else:
                key = re.search(r"value of key (\w{6})\?", text)[1]
                assert needle == f"{key}: {answer}"
                assert text.endswith(KV_QUESTION.format(key=key))


def test_passkey_depth_places_the_needle() -> None:
    length, depths = 2000, (0.0, 0.25, 0.5, 0.75, 1.0)
    filler = length - passkey_minimum(False)
    for depth in depths:
        probe = passkey_probe(length, depth=depth, seed=3)
        start, end = probe.needle_spans[0]
        assert start == len(PASSKEY_INTRO) + 2 + round(depth * filler)
        if depth == 0.0:
            assert decode(probe.input_ids[0, :start]) == PASSKEY_INTRO + "\n\n"
        if depth == 1.0:
            assert decode(probe.input_ids[0, end:]) == "\n\n" + PASSKEY_QUESTION
        assert decode(probe.input_ids[0]).count("The pass key is") == 2  # needle and question


def test_kv_keys_stay_unique_when_keys_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "KEY_LENGTH", 2)  # 3844 possible keys: ~100 pairs collide often
    probe = kv_probe(1200, batch=8, seed=0)
    for row in range(8):
        keys = re.findall(r"^([A-Za-z0-9]{2}): \d{5}$", decode(probe.input_ids[row]), re.M)
        assert len(keys) == len(set(keys)) > 90


def test_kv_pairs_unique_and_depth() -> None:
    for n_pairs, depth in [(None, 0.0), (None, 1.0), (5, 0.5), (40, 0.25), (1, 0.7)]:
        probe = kv_probe(1200, batch=2, seed=11, n_pairs=n_pairs, depth=depth)
        for row in range(2):
            text = decode(probe.input_ids[row])
            pairs = KV_LINE_PATTERN.findall(text)
            keys = [key for key, _ in pairs]
            assert len(keys) == len(set(keys))
            if n_pairs is not None:
                assert len(pairs) == n_pairs
            else:  # as many as fit: the padding after the intro is shorter than a pair line
                padding = text.split("\n")[1]
                assert KV_LINE_PATTERN.fullmatch(padding) or len(padding) + 1 < 14
            queried = re.search(r"value of key (\w{6})\?", text)[1]
            index = keys.index(queried)
            assert index == round(depth * (len(pairs) - 1))
            assert pairs[index][1] == probe.answers[row]


def test_kv_fills_the_length() -> None:
    probe = kv_probe(2048, seed=0)
    text = decode(probe.input_ids[0])
    pairs = KV_LINE_PATTERN.findall(text)
    overhead = len(KV_QUESTION.format(key="abcdef")) + len(text.split("\n")[0]) + 1
    assert (2048 - overhead) // 14 == len(pairs)  # each "KEY: VALUE\n" line is 14 bytes


def test_random_probe() -> None:
    probe = make_probe("random", 5000, batch=3, seed=4)
    assert probe.input_ids.shape == (3, 5000)
    assert probe.input_ids.dtype == torch.long
    assert int(probe.input_ids.min()) >= 0 and int(probe.input_ids.max()) < 256
    assert len(torch.unique(probe.input_ids)) == 256  # uniform over the vocabulary
    assert not torch.equal(probe.input_ids[0], probe.input_ids[1])


def test_random_probe_within_a_given_vocabulary() -> None:
    probe = make_probe("random", 2000, batch=2, seed=4, vocab_size=16)
    assert torch.equal(torch.unique(probe.input_ids), torch.arange(16))
    assert torch.equal(
        probe.input_ids, make_probe("random", 2000, batch=2, seed=4, vocab_size=16).input_ids
    )
    with pytest.raises(ValueError, match="vocab_size must be an int >= 2"):
        make_probe("random", 100, vocab_size=1)
    with pytest.raises(TypeError, match="vocab_size"):
        make_probe("random", 100, vocab_size=16.0)


# --- text ----------------------------------------------------------------------------------


def test_text_windows_match_their_sources() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for length, batch in [(1, 1), (17, 4), (1000, 2), (20_000, 3)]:
        probe = make_probe("text", length, batch=batch, seed=length)
        assert probe.input_ids.shape == (batch, length)
        assert len(probe.sources) == len(probe.offsets) == batch
        for row in range(batch):
            first = (stdlib / probe.sources[row][0]).read_bytes()
            offset = probe.offsets[row]
            head = first[offset : offset + length]
            assert probe.input_ids[row, : len(head)].tolist() == list(head)
        rows = {tuple(row) for row in probe.input_ids.tolist()}
        if length >= 1000:
            assert len(rows) == batch  # distinct windows


def test_default_corpus_splits() -> None:
    heldout = load_corpus(split="heldout")
    train = load_corpus(split="train")
    everything = load_corpus(split="all")
    assert len(heldout) >= 500_000  # room for 400k-token windows
    assert len(train) >= 2_000_000
    assert not set(heldout.doc_names) & set(train.doc_names)
    assert set(heldout.doc_names) | set(train.doc_names) == set(everything.doc_names)
    assert len(heldout) + len(train) == len(everything)
    assert all(assign_split(name) == "heldout" for name in heldout.doc_names)
    assert not any("site-packages" in name or "/test/" in name for name in everything.doc_names)
    assert load_corpus(split="heldout") is heldout  # cached per process
    share = len(heldout.doc_names) / len(everything.doc_names)
    assert abs(share - HELDOUT_FRACTION) < 0.1
    probe = make_probe("text", 400_000, seed=0)
    assert probe.input_ids.shape == (1, 400_000)
    assert set(probe.sources[0]) <= set(heldout.doc_names)


def test_text_from_directory_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "sub" / "b.md").write_text("# beta\n" * 50)
    (tmp_path / "skip.csv").write_text("not,text\n" * 50)
    (tmp_path / ".hidden.txt").write_text("hidden " * 50)
    (tmp_path / "empty.txt").write_text("")
    records = [{"text": "gamma " * 30}, {"text": ""}, {"body": "x", "text": "delta " * 30}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    corpus = load_corpus(tmp_path, split="all")
    assert corpus.doc_names == ("a.txt", "c.jsonl:1", "c.jsonl:3", "sub/b.md")
    text = bytes(corpus.ids).decode()
    for word in ("alpha", "beta", "gamma", "delta"):
        assert word in text
    assert "hidden" not in text and "not,text" not in text
    probe = make_probe("text", 100, batch=5, seed=2, paths=[tmp_path], split="all")
    assert probe.input_ids.shape == (5, 100)
    assert all(set(sources) <= set(corpus.doc_names) for sources in probe.sources)

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "epsilon " * 20}) + "\n")
    by_field = load_corpus(other, split="all", text_field="body")
    assert bytes(by_field.ids).decode().startswith("epsilon")
    with pytest.raises(ValueError, match="no field 'text'"):
        load_corpus(other, split="all")


def test_user_splits_are_disjoint(tmp_path: Path) -> None:
    for index in range(40):
        (tmp_path / f"doc{index:02d}.txt").write_text(f"document {index}\n" * 10)
    train = load_corpus(tmp_path, split="train")
    heldout = load_corpus(tmp_path, split="heldout")
    assert train.doc_names and heldout.doc_names
    assert not set(train.doc_names) & set(heldout.doc_names)
    assert len(train.doc_names) + len(heldout.doc_names) == 40


def test_user_text_is_used_whole(tmp_path: Path) -> None:
    """The held-out split is the default corpus's: a user's files and directories are read
    whole unless a split is asked for."""
    names = [f"doc{index:02d}.txt" for index in range(40)]
    for name in names:
        (tmp_path / name).write_text(f"{name} " * 20)
    assert load_corpus(tmp_path).doc_names == tuple(names)
    in_train = next(name for name in names if assign_split(name) == "train")
    probe = text_probe(100, paths=tmp_path / in_train)
    assert probe.sources == ((in_train,),)
    records = [{"body": "first " * 30}, {"body": "second " * 30}]
    notes = tmp_path / "notes.jsonl"
    notes.write_text("\n".join(json.dumps(record) for record in records))
    assert load_corpus(notes, text_field="body").doc_names == ("notes.jsonl:1", "notes.jsonl:2")


def test_empty_and_binary_user_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no record"):
        load_corpus(tmp_path / "empty.jsonl")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match=r"image.png looks binary \(a NUL byte at offset 8\)"):
        load_corpus(tmp_path / "image.png")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt looks binary \(byte 3 is not UTF-8"):
        load_corpus(tmp_path / "latin1.txt")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "good.txt").write_text("fine text " * 10)
    (folder / "blank.txt").write_text("")  # found in a directory: skipped
    assert load_corpus(folder).doc_names == ("good.txt",)
    (folder / "bad.txt").write_bytes(b"\x00\x01\x02" * 10)
    clear_corpus_cache()
    with pytest.raises(ValueError, match=r"bad\.txt looks binary"):
        load_corpus(folder)


def test_text_probe_reads_files_again_after_cache_clear(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one " * 20)
    assert len(load_corpus(tmp_path, split="all")) == 80 + 2
    (tmp_path / "a.txt").write_text("two " * 30)
    assert len(load_corpus(tmp_path, split="all")) == 80 + 2  # cached
    clear_corpus_cache()
    assert len(load_corpus(tmp_path, split="all")) == 120 + 2


# --- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_probes_are_deterministic(task: str) -> None:
    first = make_probe(task, 600, batch=3, seed=9)
    again = make_probe(task, 600, batch=3, seed=9)
    other = make_probe(task, 600, batch=3, seed=10)
    assert torch.equal(first.input_ids, again.input_ids)
    assert (first.needle_spans, first.answers, first.depths, first.sources, first.offsets) == (
        again.needle_spans,
        again.answers,
        again.depths,
        again.sources,
        again.offsets,
    )
    assert not torch.equal(first.input_ids, other.input_ids)
    assert not torch.equal(first.input_ids[0], first.input_ids[1])  # rows differ


# --- bad input -----------------------------------------------------------------------------


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected one of text, passkey, kv, random"):
        make_probe("needle", 100)
    with pytest.raises(TypeError, match="n_pairs"):
        make_probe("passkey", 500, n_pairs=3)
    for task in TASKS:
        with pytest.raises(ValueError, match="length must be an int >= 1"):
            make_probe(task, 0)
        with pytest.raises(TypeError, match="length must be an int"):
            make_probe(task, 100.0)
        with pytest.raises(TypeError, match="length must be an int"):
            make_probe(task, True)
        with pytest.raises(ValueError, match="batch must be an int >= 1"):
            make_probe(task, 500, batch=0)
        with pytest.raises(ValueError, match="seed must be an int >= 0"):
            make_probe(task, 500, seed=-1)
    for task in ("passkey", "kv"):
        for depth in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
                make_probe(task, 500, depth=depth)
        with pytest.raises(TypeError, match="depth"):
            make_probe(task, 500, depth="middle")
    minimum = passkey_minimum(False)
    with pytest.raises(ValueError, match=f"length >= {minimum} "):
        make_probe("passkey", minimum - 1)
    with pytest.raises(ValueError, match=f"length >= {minimum + 6} "):
        make_probe("passkey", minimum, with_answer=True)
    with pytest.raises(ValueError, match="kv needs length >= "):
        make_probe("kv", 50)
    with pytest.raises(ValueError, match="n_pairs=100 does not fit"):
        make_probe("kv", 500, n_pairs=100)
    with pytest.raises(ValueError, match="n_pairs must be an int >= 1"):
        make_probe("kv", 500, n_pairs=0)


def test_bad_text_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        make_probe("text", 10, paths=tmp_path / "missing")
    with pytest.raises(ValueError, match="no text files"):
        make_probe("text", 10, paths=tmp_path, split="all")  # empty directory
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="no text files"):
        make_probe("text", 10, paths=tmp_path, split="all")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"blank\.txt is empty"):
        make_probe("text", 10, paths=[tmp_path / "blank.txt"], split="all")
    (tmp_path / "small.txt").write_text("x" * 40)
    with pytest.raises(ValueError, match="holds 42 tokens"):
        make_probe("text", 43, paths=tmp_path / "small.txt", split="all")
    assert make_probe("text", 42, paths=tmp_path / "small.txt", split="all").length == 42
    wrong_split = "train" if assign_split("small.txt") == "heldout" else "heldout"
    with pytest.raises(ValueError, match="split='all'"):
        make_probe("text", 10, paths=tmp_path / "small.txt", split=wrong_split)
    with pytest.raises(ValueError, match="unknown split"):
        make_probe("text", 10, split="test")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2 is not valid JSON"):
        make_probe("text", 10, paths=tmp_path / "broken.jsonl", split="all")
    with pytest.raises(ValueError, match="holds"):
        make_probe("text", 3_000_000)  # more than the default held-out text


# --- training batches ----------------------------------------------------------------------


def answer_mask_ok(ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """The mask marks exactly the positions predicting the final " DIGITS" answer."""
    marked = torch.nonzero(mask).flatten().tolist()
    length = ids.shape[0]
    targets = decode(ids[[position + 1 for position in marked]])
    expected = list(range(length - 7, length - 1))
    return marked == expected and re.fullmatch(r" \d{5}", targets) is not None


@pytest.mark.parametrize("task", [t for t in TRAINING_TASKS if t not in MEMORY_TASKS])
def test_training_batch(task: str) -> None:
    """Text and retrieval rows (memory tasks: tests/test_memory_tasks.py)."""
    input_ids, loss_mask = training_batch(task, 1024, 16, seed=5)
    assert input_ids.shape == loss_mask.shape == (16, 1024)
    assert input_ids.dtype == torch.long and loss_mask.dtype == torch.bool
    assert not loss_mask[:, -1].any()
    kinds = set()
    for ids, mask in zip(input_ids, loss_mask, strict=True):
        if bool(mask[:-1].all()):
            kinds.add("text")
        else:
            assert answer_mask_ok(ids, mask)
            kinds.add("kv" if "value of key" in decode(ids) else "passkey")
    expected = {"text", "passkey", "kv"} if task == "mix" else {task}
    assert kinds == expected
    again = training_batch(task, 1024, 16, seed=5)
    other = training_batch(task, 1024, 16, seed=6)
    assert torch.equal(input_ids, again[0]) and torch.equal(loss_mask, again[1])
    assert not torch.equal(input_ids, other[0])


def test_training_text_uses_the_train_split() -> None:
    rows = training_batch("text", 256, 4, seed=1)[0]
    train_text = bytes(load_corpus(split="train").ids)
    assert all(bytes(row.tolist()) in train_text for row in rows)


def test_training_batch_bad_task() -> None:
    with pytest.raises(ValueError, match="expected one of text, passkey, kv, mix"):
        training_batch("random", 100, 2, seed=0)
