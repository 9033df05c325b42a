"""Output-level metrics (effective remembrance, loss by position, context-length probing) on
systems with known answers: a model that reads only the last k tokens, a unigram model, a
trigram lookup table built by hand; chunked (cached) runs against one pass; the analysis,
plan, plots and comparison around them."""

import math

import pytest
import torch
from torch import nn

from fidelity.analysis import AnalysisOptions, analyze, compare, plan_run
from fidelity.errors import InputError
from fidelity.metrics.context_probe import context_probe, context_probe_tokens, probe_targets
from fidelity.metrics.cut_context import log_grid, log_probs_at
from fidelity.metrics.effrem import effrem, effrem_pairs, effrem_tokens
from fidelity.metrics.position_loss import (
    PositionLossCollector,
    observe_position_loss,
    position_bins,
    position_loss_frame,
)
from fidelity.models.registry import build_model
from fidelity.probes.capture import capture
from fidelity.results import FidelityResult

VOCAB = 11


pytestmark = pytest.mark.usefixtures("one_thread")


class LastK(nn.Module):
    """Logits at ``i`` = ``bias + sum_{j < k} W[j, x_{i - j}]`` (terms before the window's
    start are absent): the prediction depends on the last ``k`` tokens only; ``k = 0`` is a
    unigram model."""

    def __init__(self, k: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.k = k
        self.bias = nn.Parameter(torch.randn(VOCAB, generator=generator, dtype=torch.float64))
        self.weight = nn.Parameter(
            torch.randn(k, VOCAB, VOCAB, generator=generator, dtype=torch.float64)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.bias.expand(*ids.shape, VOCAB).clone()  # (batch, n, vocab)
        for j in range(self.k):
            logits[:, j:] += self.weight[j][ids[:, : ids.shape[1] - j]]
        return logits


class Trigram(nn.Module):
    """A trigram lookup table: the logits at ``i`` are ``log P[x_{i-1}, x_i]`` with
    ``x_{-1}`` the start symbol ``VOCAB``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        table = torch.randn(VOCAB + 1, VOCAB, VOCAB, generator=generator, dtype=torch.float64)
        self.log_p = nn.Parameter(torch.log_softmax(2 * table, dim=-1))

    def previous(self, ids: torch.Tensor) -> torch.Tensor:
        start = torch.full_like(ids[:, :1], VOCAB)
        return torch.cat([start, ids[:, :-1]], dim=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.log_p[self.previous(ids), ids]


def _ids(length: int, batch: int = 2, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _curve(frame, metric: str, length: int | None = None) -> dict[int, float]:
    rows = frame[frame["metric"] == metric]
    if length is not None:
        rows = rows[rows["length"] == length]
    return dict(zip(rows["distance"], rows["value"], strict=True))


# -- known answers ------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 4])
def test_effrem_is_exactly_zero_beyond_the_last_k_tokens_and_positive_inside(window):
    k, length = 3, 200
    frame = effrem(LastK(k), _ids(length), n_ends=2, window=window, n_boot=20)
    assert set(frame["length"]) == {200, 100}
    for end in (199, 99):
        first = end - window + 1  # the window's first target
        curve = _curve(frame, "effrem", end + 1)
        assert min(curve) == 1 and max(curve) == first
        for cut, value in curve.items():
            if cut <= first - k + 1:  # every target keeps >= k tokens
                assert value == 0.0, (end, cut)
            else:
                assert value > 1e-3, (end, cut)
    assert (frame["n"] == 2 * window).all()


def test_context_probe_of_a_last_k_model_stops_changing_at_k():
    k = 3
    frame = context_probe(LastK(k), _ids(256), n_targets=12, n_boot=20)
    loss, gain = _curve(frame, "context_probe"), _curve(frame, "context_probe_gain")
    assert sorted(loss) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert len({value for c, value in loss.items() if c >= 4}) == 1  # k = 3 < 4: all equal
    assert all(value == 0.0 for c, value in gain.items() if c >= 8)
    assert gain[2] == pytest.approx(loss[1] - loss[2], abs=1e-12)


def test_a_unigram_model_is_flat_in_position_and_context():
    model = LastK(0)
    ids = _ids(512, batch=3, seed=4)
    with observe_position_loss(model, 512) as collector:
        model(ids)
    expected = -torch.log_softmax(model.bias.detach(), -1)[ids]  # (3, 512)
    torch.testing.assert_close(collector.losses[:, 1:], expected[:, 1:], rtol=0, atol=1e-12)
    assert collector.losses[:, 0].isnan().all()
    frame = collector.frame(n_boot=0)
    for start, stop in position_bins(512):
        value = _curve(frame, "position_loss")[start]
        assert value == pytest.approx(float(expected[:, start:stop].mean()), abs=1e-12)
    with torch.no_grad():
        model.bias.zero_()  # uniform: every token's loss is log V, exactly flat
    with observe_position_loss(model, 512) as collector:
        model(ids)
    flat = collector.frame(n_boot=10)
    assert flat["value"].to_numpy() == pytest.approx(math.log(VOCAB), abs=1e-12)
    probe = context_probe(model, ids, n_targets=8)
    values = list(_curve(probe, "context_probe").values())
    assert values == pytest.approx([math.log(VOCAB)] * len(values), abs=1e-12)
    assert set(_curve(probe, "context_probe_gain").values()) == {0.0}
    assert set(effrem(model, ids, n_ends=1, window=2)["value"]) == {0.0}


def test_a_trigram_lookup_table_gives_the_hand_computed_numbers():
    model = Trigram()
    ids = _ids(300, batch=2, seed=7)
    log_p = model.log_p.detach()
    previous = model.previous(ids)
    with observe_position_loss(model, 300) as collector:
        model(ids)
    by_hand = -log_p[previous[:, :-1], ids[:, :-1], ids[:, 1:]]  # (2, 299): tokens 1..299
    torch.testing.assert_close(collector.losses[:, 1:], by_hand, rtol=0, atol=1e-12)

    frame = context_probe(model, ids, n_targets=10, seed=3, n_boot=0)
    loss = _curve(frame, "context_probe")
    targets = probe_targets(300, 128, 10, seed=3)
    nxt = ids[:, targets + 1]
    one = -log_p[VOCAB, ids[:, targets], nxt]  # (2, 10): one token of context
    two = -log_p[ids[:, targets - 1], ids[:, targets], nxt]  # two tokens: the whole trigram
    assert loss[1] == pytest.approx(float(one.mean()), abs=1e-12)
    assert loss[2] == pytest.approx(float(two.mean()), abs=1e-12)
    assert len({value for c, value in loss.items() if c >= 2}) == 1
    assert _curve(frame, "context_probe_gain")[2] == pytest.approx(loss[1] - loss[2])

    rows = effrem(model, ids, n_ends=1, window=1, n_boot=0)
    curve = _curve(rows, "effrem")
    end = 299
    assert all(value == 0.0 for cut, value in curve.items() if cut < end)
    full = log_p[ids[:, end - 1], ids[:, end]].exp()  # (2, vocab)
    alone = log_p[VOCAB, ids[:, end]].exp()
    tv = 0.5 * (full - alone).abs().sum(-1).mean()
    assert curve[end] == pytest.approx(float(tv), abs=1e-12)


# -- chunked (cached) against one pass ------------------------------------------------------
@pytest.mark.parametrize("name", ["mamba", "memmamba", "transformer", "mamba2"])
def test_chunked_runs_give_the_one_pass_numbers(name):
    model = build_model(name, "tiny").double().eval()
    ids = _ids(160, batch=2, seed=11, vocab=256)  # fresh random tokens
    for metric, run in (
        ("effrem", lambda c: effrem(model, ids, n_ends=2, window=4, chunk_size=c, n_boot=0)),
        ("context_probe", lambda c: context_probe(model, ids, n_targets=4, chunk_size=c)),
    ):
        one_pass, chunked = run(None), run(23)
        assert len(one_pass) == len(chunked) > 0
        # float64 models; the chunked path carries exact states: only rounding differs
        difference = (one_pass["value"] - chunked["value"]).abs().max()
        assert difference <= 1e-9, (metric, difference)
    for chunk in (None, 37):
        with observe_position_loss(model, 160) as collector:
            capture(model, ids, layers=[0], positions=[0], chunk_size=chunk)
        if chunk is None:
            reference = collector.losses
    torch.testing.assert_close(collector.losses, reference, rtol=0, atol=1e-9, equal_nan=True)


def test_log_probs_at_reads_the_requested_positions_only():
    model = build_model("mamba", "tiny").double().eval()
    ids = _ids(50, batch=1, seed=2, vocab=256)
    full = torch.log_softmax(model(ids).logits, -1)
    picked = log_probs_at(model, ids, torch.tensor([0, 13, 49]), chunk_size=8)
    torch.testing.assert_close(picked, full[:, [0, 13, 49]], rtol=0, atol=1e-10)


# -- grids and cost -------------------------------------------------------------------------
def test_grids_and_stated_costs():
    assert log_grid(100) == [1, 2, 4, 8, 16, 32, 64]
    assert log_grid(64, 0.5) == [1, 4, 16, 64]
    assert log_grid(0) == []
    passes = effrem_pairs([99, 199], window=4)
    assert min(passes) == 1 and passes[1] == [99, 199]  # a start cut serves every end
    tokens = sum(max(ends) - cut + 1 for cut, ends in passes.items())
    assert effrem_tokens(200, n_ends=2, window=4) == 200 + tokens
    # sub-quadratic, as the docstrings state: < (4 + log2(L) / 2) and <= n_targets forwards
    for length in (8_000, 60_000, 400_000):
        assert effrem_tokens(length) < (4 + math.log2(length) / 2) * length
        assert context_probe_tokens(length) <= 8 * length
    assert [stop - start for start, stop in position_bins(10, 1)] == [1, 2, 4, 2]


def test_position_loss_bins_cover_every_position_once():
    losses = torch.rand(2, 1000, dtype=torch.float64)
    losses[:, 0] = torch.nan
    frame = position_loss_frame(losses, n_boot=50)
    assert frame["n"].sum() == 2 * 999
    assert (frame["ci_low"] <= frame["value"]).all() and (frame["value"] <= frame["ci_high"]).all()


def test_incomplete_passes_and_bad_options_are_refused():
    collector = PositionLossCollector(10)
    with pytest.raises(RuntimeError, match="saw 0 of 10"):
        collector.frame()
    with pytest.raises(InputError, match="too short for the effrem"):
        AnalysisOptions(20, metrics="effrem")
    with pytest.raises(InputError, match="context lengths"):
        context_probe(LastK(1), _ids(30), contexts=[40])
    with pytest.raises(InputError, match="window"):
        effrem(LastK(1), _ids(30), window=0)


# -- the analysis around them ---------------------------------------------------------------
def test_analysis_runs_plans_plots_and_compares_them(tmp_path):
    model = build_model("mamba", "tiny").eval()
    metrics = "etmf,position_loss,effrem,context_probe"
    options = AnalysisOptions(256, metrics=metrics, anchors=16, n_boot=20)
    plan = plan_run(model, options, time_it=False)
    assert set(plan.extra_tokens) == {"effrem", "context_probe"}
    assert "effrem +" in plan.describe() and "context_probe +" in plan.describe()
    result = analyze(model, 256, metrics=metrics, anchors=16, progress=False, n_boot=20)
    held = set(result.frame["metric"])
    assert {"position_loss", "effrem", "context_probe", "context_probe_gain"} <= held
    assert {"effrem", "position_loss", "context_probe"} <= set(result.plot_kinds())
    effrem_rows = result.frame[result.frame["metric"] == "effrem"]
    assert (effrem_rows["layer"] == -1).all() and effrem_rows["length"].max() == 256
    saved = FidelityResult.load(result.save(tmp_path / "a"))
    assert saved.frame.equals(result.frame)
    other = analyze(model, 256, metrics=metrics, anchors=16, progress=False, seed=1, n_boot=0)
    comparison = compare([result, other], labels=["a", "b"])
    for kind in ("effrem", "position_loss", "context_probe"):
        assert kind in comparison.plot_kinds()
        assert comparison.plot(kind).axes
    figure = comparison.plot("position_loss", training_length={"a": 100, "b": 100})
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert "training length 100" in labels


def test_position_loss_is_on_by_default_and_marks_the_training_length():
    model = build_model("mamba", "tiny").eval()
    model.provenance = {"name": "mamba", "training": {"length": 64}}
    result = analyze(model, 128, anchors=16, progress=False, n_boot=0)
    assert "position_loss" in set(result.frame["metric"])
    assert result.meta["training_length"] == 64
    labels = result.plot("position_loss").axes[0].get_legend_handles_labels()[1]
    assert "training length 64" in labels


def test_decimamba_scores_the_positions_it_keeps():
    from fidelity.models.decimamba import DeciMambaLM

    mamba = build_model("mamba", "tiny", seed=0, n_layer=4).double().eval()
    options = {"decimating_layers": [1], "decimation_base_length": 24, "decimation_min_length": 4}
    model = DeciMambaLM.from_mamba(mamba, **options)  # block 1 keeps 24 (+ the last) of 80
    ids = _ids(80, batch=2, seed=5, vocab=256)
    with torch.no_grad(), observe_position_loss(model, 80) as collector:
        output = model(ids)
    log_probs = torch.log_softmax(output.logits, -1)
    for row in range(2):
        kept = output.positions[row]
        scored = kept[kept < 79]
        expected = -log_probs[row, kept < 79].gather(1, ids[row, scored + 1][:, None])[:, 0]
        torch.testing.assert_close(collector.losses[row, scored + 1], expected, rtol=0, atol=1e-10)
        assert int(collector.losses[row].isfinite().sum()) == len(scored)
    with pytest.warns(UserWarning, match=r"token losses are missing"):
        assert collector.frame(n_boot=0)["n"].sum() < 2 * 79
    frame = effrem(model, ids, n_ends=1, window=8, n_boot=0)
    assert frame["value"].notna().all() and (frame["n"] < 16).any()  # dropped targets: absent
    assert (frame["n"] >= 2).all()  # the last position is always kept
    # not causal: each end runs on its own window, so no later token reaches its prediction
    rows = effrem(model, ids, n_ends=2, window=1, n_boot=0)
    assert set(rows["length"]) == {80, 40}
    with torch.no_grad():
        full = torch.log_softmax(model(ids[:, :40]).logits[:, -1], -1).exp()
        cut = torch.log_softmax(model(ids[:, 4:40]).logits[:, -1], -1).exp()
    by_hand = float(0.5 * (full - cut).abs().sum(-1).mean())
    value = rows[(rows["length"] == 40) & (rows["distance"] == 4)]["value"].item()
    assert value == pytest.approx(by_hand, abs=1e-12)


def test_the_command_line_plans_runs_and_compares_them(tmp_path, capsys):
    from fidelity.cli import main

    tiny = ["--preset", "tiny", "--length", "300", "--anchors", "16", "--no-progress"]
    metrics = ["--metrics", "position_loss,effrem,context_probe"]
    for name, model in (("a", "mamba"), ("b", "memmamba")):
        assert (
            main(["analyze", "--model", model, *tiny, *metrics, "--out", str(tmp_path / name)]) == 0
        )
        plan = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
        assert "effrem +" in plan and "context_probe +" in plan  # the stated cost, up front
        for kind in ("effrem", "position_loss", "context_probe"):
            assert (tmp_path / name / f"{kind}.png").is_file()
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert main(["compare", *runs, "--out", str(tmp_path / "cmp")]) == 0
    for kind in ("effrem", "position_loss", "context_probe"):
        assert (tmp_path / "cmp" / f"{kind}.png").is_file()
    assert main(["analyze", "--model", "mamba", *tiny[:2], "--length", "20", *metrics]) == 2
    assert "too short for the effrem metric" in capsys.readouterr().err
