"""Byte-level and Hugging Face tokenizers, and probes built with a Hugging Face tokenizer."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fidelity.probes.corpus import load_corpus, tokenize_corpus
from fidelity.probes.tasks import FILLER, KV_LINE, PASSKEY_INTRO, PASSKEY_NEEDLE, make_probe
from fidelity.probes.tokenizer import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    Tokenizer,
    as_tokenizer,
    load_tokenizer,
)


@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode(text: str) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= token < tokenizer.vocab_size for token in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_byte_tokenizer_replaces_invalid_utf8() -> None:
    tokenizer = ByteTokenizer()
    euro = tokenizer.encode("€")  # three bytes
    assert len(euro) == 3
    assert tokenizer.decode(euro[:2] + tokenizer.encode("A")) == "\ufffdA"
    assert tokenizer.decode([0xFF]) == "\ufffd"


def test_byte_tokenizer_interface() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 256
    assert tokenizer.name == "bytes"
    assert isinstance(tokenizer, Tokenizer)


@pytest.mark.parametrize("ids", [[256], [-1], [[65, 66]]])
def test_byte_tokenizer_rejects_bad_ids(ids: list) -> None:
    with pytest.raises(ValueError, match="token ids"):
        ByteTokenizer().decode(ids)


def test_byte_tokenizer_rejects_non_text() -> None:
    with pytest.raises(TypeError, match="str"):
        ByteTokenizer().encode(b"bytes")  # type: ignore[arg-type]


def test_load_tokenizer_none_is_bytes() -> None:
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(as_tokenizer(None), ByteTokenizer)
    tokenizer = ByteTokenizer()
    assert as_tokenizer(tokenizer) is tokenizer


def test_load_tokenizer_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(a_file)
    with pytest.raises(TypeError, match="tokenizer path"):
        load_tokenizer(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tokenizer must be"):
        as_tokenizer(3)  # type: ignore[arg-type]


def test_load_tokenizer_from_a_directory_without_tokenizer_files(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
    with pytest.raises(ValueError, match="could not load"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_without_transformers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes the import fail
    with pytest.raises(ImportError, match="transformers"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE tokenizer trained offline and saved as a Hugging Face directory."""
    tokenizers = pytest.importorskip("tokenizers", reason="needs the tokenizers package")
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
    )
    sample = [PASSKEY_INTRO, FILLER, PASSKEY_NEEDLE.format(key="12345"), "def f(x):\n    return x"]
    model.train_from_iterator(sample * 20, trainer)
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>").save_pretrained(
        directory
    )
    return directory


def test_hf_tokenizer_loads_and_round_trips(hf_directory: Path) -> None:
    tokenizer = load_tokenizer(hf_directory)
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.vocab_size == len(tokenizer.hf_tokenizer) > 256
    assert tokenizer.name == str(hf_directory.resolve())
    text = "The grass is green. Ünïcode 12345\n"
    ids = tokenizer.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned and used
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(torch.tensor(ids)) == text


@pytest.mark.parametrize("with_answer", [False, True])
def test_retrieval_probes_with_hf_tokenizer(hf_directory: Path, with_answer: bool) -> None:
    tokenizer = load_tokenizer(hf_directory)
    for task in ("passkey", "kv"):
        probe = make_probe(
            task, 300, batch=3, seed=5, tokenizer=tokenizer, depth=0.4, with_answer=with_answer
        )
        assert probe.input_ids.shape == (3, 300)
        assert probe.tokenizer_name == tokenizer.name
        for row in range(3):
            start, end = probe.needle_spans[row]
            needle = tokenizer.decode(probe.input_ids[row, start:end])
            answer = probe.answers[row]
            if task == "passkey":
                assert needle == PASSKEY_NEEDLE.format(key=answer)
            else:
                queried = re.search(r"value of key (\w+)\?", tokenizer.decode(probe.input_ids[row]))
                assert needle == KV_LINE.format(key=queried[1], value=answer)
            assert tokenizer.decode(probe.answer_ids[row]) == " " + answer
            if with_answer:
                answer_start, answer_end = probe.answer_spans[row]
                assert answer_end == 300
                assert probe.input_ids[row, answer_start:].tolist() == list(probe.answer_ids[row])


def test_text_probe_with_hf_tokenizer(hf_directory: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(hf_directory)
    (tmp_path / "a.txt").write_text(FILLER * 40)
    (tmp_path / "b.txt").write_text("def f(x):\n    return x\n" * 40)
    probe = make_probe(
        "text", 64, batch=4, seed=1, tokenizer=tokenizer, paths=tmp_path, split="all"
    )
    assert probe.input_ids.shape == (4, 64)
    assert int(probe.input_ids.max()) < tokenizer.vocab_size
    corpus = tokenize_corpus(load_corpus(tmp_path, split="all"), tokenizer)
    assert tokenize_corpus(load_corpus(tmp_path, split="all"), tokenizer) is corpus  # cached
    for row in range(4):
        first = corpus.doc_names.index(probe.sources[row][0])
        start = int(corpus.doc_starts[first]) + probe.offsets[row]
        assert probe.input_ids[row].tolist() == corpus.ids[start : start + 64].tolist()
    with pytest.raises(ValueError, match="holds"):
        make_probe("text", len(corpus) + 1, tokenizer=tokenizer, paths=tmp_path, split="all")
