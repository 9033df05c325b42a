"""Retrieval accuracy: oracles that copy the needle score 1, random models 0; intervals;
teacher-forced scoring against an explicit greedy loop; exact prompt lengths."""

import re

import pytest
import torch
from torch import nn

from fidelity.errors import InputError
from fidelity.metrics.retrieval import (
    FRAME_COLUMNS,
    retrieval_accuracy,
    teacher_forced_predictions,
    wilson_interval,
)
from fidelity.models.base import CausalLM, LMOutput
from fidelity.models.config import ModelConfig
from fidelity.models.decimamba import DeciMambaLM
from fidelity.models.registry import build_model
from fidelity.probes.tasks import make_probe

VOCAB = 256


pytestmark = pytest.mark.usefixtures("one_thread")


def needle_next_byte(text: str) -> int | None:
    """The byte that continues ``text`` with the needle's answer, read from the text itself
    (passkey: "The pass key is KEY."; kv: the line "KEY: VALUE" of the queried key)."""
    passkey = re.search(r"The pass key is (\d+)\. Remember it", text)
    question = re.search(r"The pass key is([^\n]*)$", text)
    if passkey and question:
        target, written = " " + passkey[1], question[1]
    else:
        queried = re.search(r"The value of key (\w+) is([^\n]*)$", text)
        if queried is None:
            return None
        line = re.search(rf"^{queried[1]}: (\d+)$", text, re.MULTILINE)
        target, written = " " + line[1], queried[2]
    if len(written) < len(target) and target.startswith(written):
        return ord(target[len(written)])
    return None


def _one_hot_next(rows: list[list[int]]) -> torch.Tensor:
    """`(batch, vocab)` logits: 1 at each row's needle byte, zeros otherwise."""
    logits = torch.zeros(len(rows), VOCAB)
    for index, row in enumerate(rows):
        byte = needle_next_byte(bytes(row).decode("utf-8", errors="replace"))
        if byte is not None:
            logits[index, byte] = 1.0
    return logits


class NeedleCopyingOracle(nn.Module):
    """Test double without a cache: predicts the needle's bytes at the last ``tail``
    positions of its input (uniform logits elsewhere)."""

    def __init__(self, tail: int = 8) -> None:
        super().__init__()
        self.tail = tail
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, VOCAB)
        for end in range(max(1, length - self.tail + 1), length + 1):
            logits[:, end - 1] = _one_hot_next(input_ids[:, :end].tolist())
        return logits


class CachedNeedleCopyingOracle(CausalLM):
    """Test double with our cache interface: the cache holds the tokens seen so far and the
    sizes of the prefill chunks (to check lengths and chunking)."""

    def __init__(self) -> None:
        super().__init__(ModelConfig(d_model=4, n_layer=1, vocab_size=VOCAB))

    def init_cache(self, batch_size, device=None, dtype=None):
        return {"rows": [[] for _ in range(batch_size)], "chunks": []}

    def forward(self, input_ids, cache=None, output_hidden_states=False):
        cache = cache if cache is not None else self.init_cache(input_ids.shape[0])
        cache["chunks"].append(input_ids.shape[1])
        for row, ids in zip(cache["rows"], input_ids.tolist(), strict=True):
            row.extend(ids)
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits[:, -1] = _one_hot_next(cache["rows"])
        return LMOutput(logits=logits)

    def step(self, tokens, cache):
        for row, token in zip(cache["rows"], tokens.tolist(), strict=True):
            row.append(token)
        return _one_hot_next(cache["rows"])


class Uncached(nn.Module):
    """Hides our model's cache (so retrieval takes the no-cache path): logits only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids).logits


@pytest.mark.parametrize("task", ["passkey", "kv"])
@pytest.mark.parametrize("oracle_class", [NeedleCopyingOracle, CachedNeedleCopyingOracle])
def test_an_oracle_that_copies_the_needle_scores_one(task, oracle_class):
    frame = retrieval_accuracy(
        oracle_class(), task, lengths=[300, 420], depths=[0.0, 0.5, 1.0], trials=3, chunk_size=64
    )
    assert list(frame.columns) == list(FRAME_COLUMNS)
    assert len(frame) == 2 * 2 * 3
    assert set(frame["metric"]) == {f"{task}_acc", f"{task}_digit_acc"}
    assert (frame["value"] == 1.0).all()
    assert (frame[["layer", "source_layer"]] == -1).all().all()
    assert (frame["n"] == 3).all()
    accuracy = frame[frame["metric"] == f"{task}_acc"]
    assert accuracy["ci_low"].to_numpy() == pytest.approx(wilson_interval(3, 3)[0])


def test_lengths_distances_and_chunked_prefill_are_exact():
    oracle = CachedNeedleCopyingOracle()
    seen = []
    original = oracle.init_cache

    def recording_init_cache(batch_size, device=None, dtype=None):
        seen.append(original(batch_size))
        return seen[-1]

    oracle.init_cache = recording_init_cache
    frame = retrieval_accuracy(oracle, "passkey", lengths=["1k"], depths=[0.25], trials=2)
    assert seen[0]["chunks"] == [1000]  # "auto" chunks only beyond 8192 tokens
    retrieval_accuracy(oracle, "passkey", lengths=[1000], depths=[0.25], trials=2, chunk_size=300)
    assert seen[1]["chunks"] == [300, 300, 300, 100]
    assert [len(row) for row in seen[1]["rows"]] == [1000 + 5] * 2  # prompt, then 5 steps
    probe = make_probe("passkey", 1000, batch=1, depth=0.25)
    expected = 1000 - probe.needle_spans[0][1]
    # the needle sits at the same place in every trial of a cell (5-digit keys)
    assert set(frame["distance"]) == {expected}
    assert set(frame["length"]) == {1000} and set(frame["depth"]) == {0.25}


def test_a_random_model_retrieves_nothing():
    model = build_model("mamba", "tiny").eval()
    frame = retrieval_accuracy(model, "passkey", lengths=[300], depths=[0.5], trials=4)
    accuracy = frame.set_index("metric")["value"]
    assert accuracy["passkey_acc"] == 0.0
    assert accuracy["passkey_digit_acc"] <= 0.5


def _greedy(model, prompt, n):
    """Explicit greedy decoding by re-running the growing sequence: `(batch, n)`."""
    sequence = prompt
    for _ in range(n):
        logits = model(sequence)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence[:, prompt.shape[1] :]


@pytest.mark.parametrize("name", ["mamba", "memmamba", "transformer"])
def test_teacher_forcing_reproduces_greedy_decoding(name):
    model = build_model(name, "tiny").double().eval()
    prompt = torch.randint(0, VOCAB, (3, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        greedy = _greedy(model, prompt, 6)
    # fed its own greedy tokens, teacher forcing predicts exactly them (cached, chunked path
    # and the plain forward path); any other answer token breaks the match from there on
    assert torch.equal(teacher_forced_predictions(model, prompt, greedy, chunk_size=16), greedy)
    assert torch.equal(teacher_forced_predictions(Uncached(model), prompt, greedy), greedy)
    wrong = greedy.clone()
    wrong[:, 2] = (wrong[:, 2] + 1) % VOCAB
    predicted = teacher_forced_predictions(model, prompt, wrong, chunk_size=16)
    assert torch.equal(predicted[:, :3], greedy[:, :3])
    assert not torch.equal(predicted[:, 2], wrong[:, 2])


def test_decimamba_reads_the_surviving_last_position():
    mamba = build_model("mamba", "tiny").double().eval()
    deci = DeciMambaLM.from_mamba(mamba, decimation_base_length=16, decimation_min_length=4)
    prompt = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = deci(prompt)
        assert output.logits.shape[1] < 80  # decimation dropped positions
        cache = deci.init_cache(2)
        first = deci(prompt, cache=cache).logits[:, -1].argmax(-1)
        second = deci.step(first, cache).argmax(-1)
    answers = torch.stack([first, second], dim=1)
    assert torch.equal(teacher_forced_predictions(deci, prompt, answers, chunk_size=16), answers)
    frame = retrieval_accuracy(deci, "passkey", lengths=[300], depths=[1.0], trials=2)
    assert len(frame) == 2


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (0, 5, 0.0, 0.43448),
        (5, 5, 0.56552, 1.0),
        (3, 10, 0.10779, 0.60322),
        (1, 2, 0.09453, 0.90547),
    ],
)
def test_wilson_interval_matches_published_values(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-5)


def test_bad_arguments_are_refused():
    oracle = NeedleCopyingOracle()
    with pytest.raises(ValueError, match="task must be one of"):
        retrieval_accuracy(oracle, "qa", lengths=[300])
    with pytest.raises(ValueError, match="depths must be numbers in"):
        retrieval_accuracy(oracle, lengths=[300], depths=[1.5])
    with pytest.raises(ValueError, match="trials"):
        retrieval_accuracy(oracle, lengths=[300], trials=0)
    with pytest.raises(ValueError, match="invalid length"):
        retrieval_accuracy(oracle, lengths=["abc"])
    with pytest.raises(ValueError, match="passkey needs length"):
        retrieval_accuracy(oracle, lengths=[20])
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(6, 5)


def _passkey_prompts(filler: str | None) -> tuple[list[str], float]:
    """The prompts (text) a cached oracle is given for 2 passkey trials of 400 tokens with
    ``filler``, and its exact-match accuracy."""
    oracle = CachedNeedleCopyingOracle()
    caches = []
    original = oracle.init_cache

    def recording_init_cache(batch_size, device=None, dtype=None):
        caches.append(original(batch_size))
        return caches[-1]

    oracle.init_cache = recording_init_cache
    frame = retrieval_accuracy(
        oracle, "passkey", lengths=[400], depths=[0.5], trials=2, filler=filler, n_boot=0
    )
    prompts = [bytes(row[:400]).decode() for row in caches[0]["rows"]]
    return prompts, float(frame.set_index("metric")["value"]["passkey_acc"])


def test_the_filler_changes_the_passkey_prompts_and_is_refused_for_kv():
    default, standard, text = (_passkey_prompts(f) for f in (None, "standard", "text"))
    assert default == standard  # "standard" is the default
    assert standard[0] != text[0]
    for prompt in standard[0]:
        assert "The grass is green." in prompt
    for prompt in text[0]:
        assert "The grass is green." not in prompt
    for prompts, accuracy in (standard, text):  # the same needle and question either way
        assert accuracy == 1.0
        assert all(p.endswith("What is the pass key? The pass key is") for p in prompts)
    with pytest.raises(InputError, match="filler applies to the passkey task only"):
        retrieval_accuracy(CachedNeedleCopyingOracle(), "kv", lengths=[400], filler="standard")
    with pytest.raises(InputError, match="filler must be one of"):
        retrieval_accuracy(CachedNeedleCopyingOracle(), "passkey", lengths=[400], filler="grass")


@pytest.mark.parametrize("name", ["mamba", "memmamba", "transformer"])
def test_prompts_read_a_few_at_a_time_give_the_same_rows(name):
    model = build_model(name, "tiny", seed=3).eval()
    together = retrieval_accuracy(model, "passkey", lengths=[300], trials=3, seed=5, n_boot=0)
    apart = retrieval_accuracy(
        model, "passkey", lengths=[300], trials=3, seed=5, n_boot=0, rows_per_pass=2
    )
    assert together.equals(apart)
    with pytest.raises(InputError, match="rows_per_pass"):
        retrieval_accuracy(model, "passkey", lengths=[300], rows_per_pass=0)


def test_wilson_interval_contains_the_estimate_and_is_exact_at_the_ends():
    for n in range(1, 80):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
        for successes in range(n + 1):
            low, high = wilson_interval(successes, n)
            assert 0.0 <= low <= successes / n <= high <= 1.0
