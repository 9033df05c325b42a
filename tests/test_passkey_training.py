"""Dense passkey training rows (several episodes a row, varied filler), the text filler of the
passkey probe, and the options of passkey / mix training batches."""

from __future__ import annotations

import re

import pytest
import repo_scripts
import torch
from test_retrieval import CachedNeedleCopyingOracle

from fidelity.errors import InputError
from fidelity.models.registry import build_model
from fidelity.probes.corpus import load_corpus
from fidelity.probes.tasks import (
    CLOSE_GAP,
    FILLER,
    PASSKEY_INTRO,
    passkey_probe,
    training_batch,
)
from fidelity.train import TrainConfig

NEEDLE = re.compile(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.")
QUESTION = "What is the pass key? The pass key is"
DENSE = {"episodes": 6, "filler": "mixed"}


def decode(ids: torch.Tensor) -> str:
    return bytes(ids.tolist()).decode("latin-1")


def test_text_filler_comes_from_held_out_text() -> None:
    probe = passkey_probe(1024, batch=3, seed=4, filler="text", depth=0.5)
    held_out = bytes(load_corpus(split="heldout").ids)
    assert probe.input_ids.shape == (3, 1024)
    for row, (start, end), key in zip(
        probe.input_ids, probe.needle_spans, probe.answers, strict=True
    ):
        text = decode(row)
        assert text[start:end] == f"The pass key is {key}. Remember it. {key} is the pass key."
        head = len(PASSKEY_INTRO) + 1
        before, after = text[head : start - 1], text[end + 1 : -len(QUESTION) - 1]
        assert before.encode("latin-1") + after.encode("latin-1") in held_out
        assert FILLER not in text
    again = passkey_probe(1024, batch=3, seed=4, filler="text", depth=0.5)
    assert torch.equal(probe.input_ids, again.input_ids)


def test_standard_filler_is_the_default() -> None:
    default = passkey_probe(512, batch=2, seed=1)
    assert torch.equal(
        default.input_ids, passkey_probe(512, batch=2, seed=1, filler="standard").input_ids
    )
    with pytest.raises(InputError, match="filler must be one of"):
        passkey_probe(512, filler="noise")


def episodes_of(ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[str, str]]:
    """(most recent needle key, supervised answer) for every answer a row supervises."""
    text = decode(ids)
    marked = torch.nonzero(mask).flatten().tolist()
    runs, current = [], [marked[0]]
    for position in marked[1:]:
        if position == current[-1] + 1:
            current.append(position)
        else:
            runs.append(current)
            current = [position]
    runs.append(current)
    pairs = []
    for run in runs:
        answer = text[run[0] + 1 : run[-1] + 2]
        assert text[: run[0] + 1].endswith(QUESTION)
        keys = NEEDLE.findall(text[: run[0] + 1])
        pairs.append((keys[-1], answer))
    return pairs


def test_dense_rows_supervise_every_episode_answer() -> None:
    ids, mask = training_batch("passkey", 1024, 24, seed=3, task_options=DENSE)
    assert ids.shape == mask.shape == (24, 1024)
    counts, fillers = set(), set()
    for row, row_mask in zip(ids, mask, strict=True):
        text = decode(row)
        assert text.startswith(PASSKEY_INTRO + "\n")
        pairs = episodes_of(row, row_mask)
        assert all(answer == " " + key for key, answer in pairs)
        assert len(pairs) == len(NEEDLE.findall(text)) == text.count(QUESTION)
        assert int(row_mask.sum()) == 6 * len(pairs)
        assert text.endswith(QUESTION + pairs[-1][1])  # the last answer ends the row
        counts.add(len(pairs))
        fillers.add("standard" if FILLER[:40] in text else "text")
    assert min(counts) >= 1 and max(counts) <= 6 and len(counts) > 2
    assert fillers == {"standard", "text"}
    again = training_batch("passkey", 1024, 24, seed=3, task_options=DENSE)
    assert torch.equal(ids, again[0]) and torch.equal(mask, again[1])
    assert not torch.equal(ids, training_batch("passkey", 1024, 24, seed=4, task_options=DENSE)[0])


def test_dense_rows_take_text_from_the_train_split() -> None:
    ids, _ = training_batch(
        "passkey", 512, 4, seed=2, task_options={"filler": "text", "episodes": 1}
    )
    train_text = bytes(load_corpus(split="train").ids).decode("latin-1")
    for row in ids:
        text = decode(row)
        start = len(PASSKEY_INTRO) + 1
        needle = NEEDLE.search(text)
        assert text[start : needle.start() - 1] in train_text


def test_dense_rows_drop_episodes_that_do_not_fit() -> None:
    ids, mask = training_batch("passkey", 400, 8, seed=0, task_options={"episodes": 50})
    assert ids.shape == (8, 400)
    for row, row_mask in zip(ids, mask, strict=True):
        assert all(answer == " " + key for key, answer in episodes_of(row, row_mask))
    with pytest.raises(InputError, match="need length >="):
        training_batch("passkey", 200, 1, seed=0, task_options={"episodes": 2})


def test_mix_shares() -> None:
    ids, mask = training_batch("mix", 512, 12, seed=1, task_options={**DENSE, "shares": [0, 1, 0]})
    assert all(QUESTION in decode(row) for row in ids) and not mask.all(dim=1).any()
    _, mask = training_batch("mix", 512, 12, seed=1, task_options={"shares": [1, 0, 0]})
    assert mask[:, :-1].all()
    default = training_batch("mix", 512, 12, seed=1)
    explicit = training_batch("mix", 512, 12, seed=1, task_options={"shares": [0.5, 0.25, 0.25]})
    assert torch.equal(default[0], explicit[0])


@pytest.mark.parametrize(
    ("task", "options", "message"),
    [
        ("passkey", {"episodes": 0}, "episodes must be"),
        ("passkey", {"episodes": True}, "episodes must be"),
        ("passkey", {"filler": "noise"}, "filler must be one of"),
        ("passkey", {"n_pairs": 3}, "unknown option"),
        ("passkey", {"shares": [1, 1, 0]}, "for --task mix only"),
        ("mix", {"shares": [1, 1]}, "shares must be"),
        ("mix", {"shares": [-1, 1, 1]}, "shares must be"),
        ("mix", {"shares": [0, 0, 0]}, "shares must be"),
    ],
)
def test_bad_options(task: str, options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        training_batch(task, 512, 2, seed=0, task_options=options)
    with pytest.raises(InputError, match=message):
        TrainConfig(task=task, length=512, task_options=options).validate()


def test_train_config_accepts_mix_options() -> None:
    TrainConfig(task="mix", length=512, task_options={**DENSE, "shares": [1, 1, 0]}).validate()
    with pytest.raises(InputError, match="takes no task options"):
        TrainConfig(task="text", length=512, task_options=DENSE).validate()


def load_script(name: str):
    return repo_scripts.load(f"scripts/{name}.py")


@pytest.mark.parametrize("filler", ["standard", "text"])
def test_passkey_eval_scores_an_oracle_one_and_a_random_model_zero(filler: str) -> None:
    evaluate = load_script("passkey_eval").evaluate
    hits, digits = evaluate(CachedNeedleCopyingOracle(), 400, filler, trials=2, seed=0)
    assert hits == {depth: (2, 2) for depth in (0.0, 0.25, 0.5, 0.75, 1.0)} and digits == 1.0
    hits, digits = evaluate(build_model("mamba", "tiny"), 400, filler, trials=2, seed=0)
    assert sum(h for h, _ in hits.values()) == 0 and digits < 0.5


def test_repeat_key_supervises_the_key_inside_the_needle_too() -> None:
    options = {"episodes": 4, "repeat_key": True}
    ids, mask = training_batch("passkey", 1024, 6, seed=8, task_options=options)
    for row, row_mask in zip(ids, mask, strict=True):
        text = decode(row)
        keys = NEEDLE.findall(text)
        marked = torch.nonzero(row_mask).flatten().tolist()
        supervised = "".join(text[position + 1] for position in marked)
        assert supervised == "".join(key + " " + key for key in keys)
        for match in NEEDLE.finditer(text):  # the repetition is what "Remember it. " precedes
            second = match.start() + len(f"The pass key is {match[1]}. Remember it. ")
            assert all(row_mask[second - 1 : second + 4])
    with pytest.raises(InputError, match="repeat_key must be"):
        training_batch("passkey", 512, 1, seed=0, task_options={"repeat_key": "yes"})


def test_questions_repeat_after_each_needle() -> None:
    options = {"episodes": 3, "questions": 4, "filler": "mixed"}
    ids, mask = training_batch("passkey", 1000, 8, seed=2, task_options=options)
    for row, row_mask in zip(ids, mask, strict=True):
        text = decode(row)
        pairs = episodes_of(row, row_mask)  # every answer is the most recent needle's key
        assert all(answer == " " + key for key, answer in pairs)
        assert len(pairs) == 4 * len(NEEDLE.findall(text)) == text.count(QUESTION)
        assert text.endswith(QUESTION + pairs[-1][1])
    with pytest.raises(InputError, match="questions must be"):
        training_batch("passkey", 512, 1, seed=0, task_options={"questions": 0})
    with pytest.raises(InputError, match="need length >="):
        training_batch("passkey", 300, 1, seed=0, task_options={"questions": 4})


def question_gaps(text: str) -> tuple[int, list[int]]:
    """The characters from the needle's end to the first question, and between each answer and
    the next question, in a row of one episode."""
    needle = NEEDLE.search(text)
    starts = [m.start() for m in re.finditer(re.escape(QUESTION), text)]
    answer_ends = [start + len(QUESTION) + 6 for start in starts]  # " " and 5 digits
    close = [start - end for end, start in zip(answer_ends, starts[1:], strict=False)]
    return starts[0] - needle.end(), close


def test_far_spacing_asks_close_questions_at_any_distance_from_the_needle() -> None:
    options = {"episodes": 1, "questions": 4, "spacing": "far"}
    ids, mask = training_batch("passkey", 1024, 32, seed=5, task_options=options)
    far, close = [], []
    for row, row_mask in zip(ids, mask, strict=True):
        text = decode(row)
        pairs = episodes_of(row, row_mask)
        assert len(pairs) == 4 and all(answer == " " + key for key, answer in pairs)
        first, gaps = question_gaps(text)
        far.append(first)
        close.extend(gaps)
    newline = 1  # each question starts on its own line
    assert max(close) <= CLOSE_GAP + 2 * newline and min(close) >= 2 * newline
    assert min(far) < 100 and max(far) > 500  # the first question near and far from the needle
    uniform, _ = training_batch(
        "passkey", 1024, 32, seed=5, task_options={**options, "spacing": "uniform"}
    )
    closest = [question_gaps(decode(row))[1] for row in uniform]
    assert max(max(gaps) for gaps in closest) > 2 * CLOSE_GAP  # the old layout spreads them
    again = training_batch("passkey", 1024, 32, seed=5, task_options=options)
    assert torch.equal(ids, again[0]) and torch.equal(mask, again[1])
    with pytest.raises(InputError, match="spacing must be"):
        training_batch("passkey", 512, 1, seed=0, task_options={"spacing": "near"})


def test_far_spacing_fits_short_rows_and_several_episodes() -> None:
    options = {"episodes": 3, "questions": 4, "spacing": "far", "filler": "mixed"}
    ids, mask = training_batch("passkey", 520, 16, seed=1, task_options=options)
    for row, row_mask in zip(ids, mask, strict=True):
        text = decode(row)
        pairs = episodes_of(row, row_mask)
        assert all(answer == " " + key for key, answer in pairs)
        assert len(pairs) == 4 * len(NEEDLE.findall(text))
        assert text.endswith(QUESTION + pairs[-1][1])
