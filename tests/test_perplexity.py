"""Perplexity: a uniform model scores its vocabulary size; chunks equal one pass; the value
equals a direct cross-entropy over the same windows; bad input is refused."""

import math

import pytest
import torch
import torch.nn.functional as F

from fidelity.metrics.perplexity import FRAME_COLUMNS, perplexity, sequence_nll
from fidelity.models.decimamba import DeciMambaLM
from fidelity.models.registry import build_model
from fidelity.probes.tasks import make_probe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    model = build_model("mamba", "tiny", tie_embeddings=False).double()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: uniform over the 256 tokens
    frame = perplexity(model, [64, "0.2k"], n_sequences=3).set_index(["metric", "length"])
    assert list(perplexity(model, 64, n_sequences=2).columns) == list(FRAME_COLUMNS)
    for length in (64, 200):
        row = frame.loc[("perplexity", length)]
        assert row["value"] == pytest.approx(256, rel=1e-12)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((256, 256), rel=1e-12)
        assert frame.loc[("bits_per_byte", length), "value"] == pytest.approx(8, rel=1e-12)
        assert row["n"] == 3 and row["layer"] == -1 and row["source_layer"] == -1


@pytest.mark.parametrize("name", ["mamba", "memmamba", "transformer", "mamba2"])
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_chunks_give_the_one_pass_numbers(name, chunk_size):
    model = build_model(name, "tiny").double().eval()
    ids = make_probe("text", 150, batch=2, seed=1).input_ids
    one_pass = sequence_nll(model, ids)
    chunked = sequence_nll(model, ids, chunk_size)
    # float64; the chunked path carries exact states, so only rounding differs
    torch.testing.assert_close(chunked, one_pass, rtol=1e-10, atol=0)


def test_the_value_is_the_mean_cross_entropy_of_the_windows():
    model = build_model("mamba", "tiny").double().eval()
    frame = perplexity(model, [100], n_sequences=4, seed=5, chunk_size=30, n_boot=0)
    ids = make_probe("text", 100, batch=4, seed=5, split="heldout").input_ids
    with torch.no_grad():
        logits = model(ids).logits  # (4, 100, vocab)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    values = frame.set_index("metric")["value"]
    assert values["perplexity"] == pytest.approx(math.exp(float(expected)), rel=1e-10)
    assert values["bits_per_byte"] == pytest.approx(float(expected) / math.log(2), rel=1e-10)
    assert frame["ci_low"].isna().all()  # n_boot=0: no interval


def test_text_files_and_interval_order(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    model = build_model("mamba", "tiny").eval()
    frame = perplexity(model, 120, n_sequences=5, text=tmp_path, split="all")
    for row in frame.itertuples():
        assert row.ci_low <= row.value <= row.ci_high


def test_bad_input_is_refused():
    model = build_model("mamba", "tiny").eval()
    with pytest.raises(ValueError, match=">= 2 tokens"):
        perplexity(model, [1])
    with pytest.raises(ValueError, match="invalid length"):
        perplexity(model, ["ten"])
    with pytest.raises(ValueError, match="n_sequences"):
        perplexity(model, [64], n_sequences=0)
    with pytest.raises(ValueError, match="chunk_size"):
        perplexity(model, [64], chunk_size=0)
    with pytest.raises(ValueError, match="split"):
        perplexity(model, [64], split="test")
    deci = DeciMambaLM.from_mamba(model, decimation_base_length=16, decimation_min_length=4)
    with pytest.raises(ValueError, match="logits at every position"):
        perplexity(deci, [80], n_sequences=1)
