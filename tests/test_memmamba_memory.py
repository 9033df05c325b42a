"""MemMamba's memory metric: write and firing rates, note ages and the zeroed-memory loss,
each checked against an independent computation on a tiny random MemMamba; its report panel
and command-line lines; no rows and no error for other models."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import fidelity.analysis as analysis
import fidelity.metrics.memmamba_memory as memory
from fidelity import cli
from fidelity.cli import main
from fidelity.metrics.memmamba_memory import (
    CONTEXT_SHARE,
    FIRE_RATE,
    LOSS_DELTA,
    LOSS_FULL,
    LOSS_ZEROED,
    NOTE_AGE,
    NOTE_AGE_MEDIAN,
    NOTE_AGE_OLDEST,
    POOL_FILL,
    WRITE_RATE,
    memmamba_memory,
    observe_memmamba_memory,
)
from fidelity.metrics.position_loss import observe_position_loss
from fidelity.models.registry import build_model
from fidelity.probes.capture import capture
from fidelity.probes.memmamba_ablation import zeroed_memory_contexts
from fidelity.reports.html import render_report

LENGTH = 160
ANCHORS = torch.tensor([0, 7, 40, 99, 159])


def tiny_memmamba(**overrides):
    """A random float64 MemMamba whose scorers write and fire often (bias 0: about half)."""
    options = {"write_init_bias": 0.0, "pool_size": 6, "block_size": 32, "n_layer": 4}
    options.update(overrides)
    torch.manual_seed(0)
    model = build_model("memmamba", "tiny", **options).double().eval()
    with torch.no_grad():  # the trigger's bias is zeroed at init: spread its scores
        for block in model.layers:
            if block.trigger is not None:
                block.trigger.scorer.weight.normal_(std=1.0)
    return model


def ids(batch=2, length=LENGTH, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=generator)


def run_metric(model, input_ids, chunk_size=None, layers=None):
    """The metric's frames for ``model`` on ``input_ids``, observed over one capture."""
    layers = list(range(model.config.n_layer + 1)) if layers is None else layers
    with observe_memmamba_memory(model, tuple(input_ids.shape)) as observation:
        capture(model, input_ids, layers=[0], chunk_size=chunk_size)
    per_layer, losses = memmamba_memory(
        model, input_ids, observation, ANCHORS, layers, chunk_size=chunk_size, n_boot=50
    )
    return per_layer.set_index(["metric", "layer"]), losses.set_index("metric")


def nll(logits, input_ids):
    """Mean next-token loss over every sequence, float64."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).double(), input_ids[:, 1:]).item()


@torch.no_grad()
def test_rates_equal_counts_recomputed_from_each_block():
    model = tiny_memmamba()
    input_ids = ids()
    per_layer, _ = run_metric(model, input_ids)
    hidden = model(input_ids, output_hidden_states=True).hidden_states  # input of every block
    for index, block in enumerate(model.layers):
        x = hidden[index]
        normed = block.memory_norm(x + block.mixer(block.norm(x)))
        writes = torch.sigmoid(block.note_block.scorer(normed)[..., 0]) > model.config.tau1
        state = block.trigger(normed)  # position t fires when t - 1 scores above tau2
        fires = torch.cat([torch.zeros_like(state[:, :1]), state[:, :-1]], 1) > model.config.tau2
        layer = index + 1
        assert 0 < writes.sum() < writes.numel() and 0 < fires.sum() < fires.numel()
        assert per_layer.loc[(WRITE_RATE, layer), "value"] == writes.double().mean().item()
        assert per_layer.loc[(FIRE_RATE, layer), "value"] == fires.double().mean().item()
        assert per_layer.loc[(WRITE_RATE, layer), "n"] == input_ids.numel()
        h = x + block.mixer(block.norm(x))  # the block adds its memory contexts to h
        share = ((hidden[index + 1] - h).norm(dim=-1) / h.norm(dim=-1)).mean()
        assert per_layer.loc[(CONTEXT_SHARE, layer), "value"] == pytest.approx(share.item())
        low, high = per_layer.loc[(WRITE_RATE, layer), ["ci_low", "ci_high"]]
        assert low <= per_layer.loc[(WRITE_RATE, layer), "value"] <= high


@torch.no_grad()
def test_note_ages_equal_the_explicit_pools_of_the_recurrent_model():
    model = tiny_memmamba()
    input_ids = ids()
    per_layer, _ = run_metric(model, input_ids, chunk_size=48)
    means, oldest, fill, every = {}, {}, {}, {}
    for anchor in ANCHORS.tolist():
        cache = model.init_cache(input_ids.shape[0])
        if anchor:
            model(input_ids[:, :anchor], cache=cache)  # pools hold the notes of 0 .. anchor - 1
        for block in range(model.config.n_layer):
            pool = cache.layers[block].pool
            for row in range(input_ids.shape[0]):
                ages = (anchor - pool.positions[row][pool.valid[row]]).double()
                fill.setdefault(block, []).append(len(ages))
                if len(ages):
                    means.setdefault(block, []).append(ages.mean())
                    oldest.setdefault(block, []).append(ages.max())
                    every.setdefault(block, []).append(ages)
    for block in range(model.config.n_layer):
        layer = block + 1
        expected = {
            NOTE_AGE: torch.stack(means[block]).mean(),
            NOTE_AGE_OLDEST: torch.stack(oldest[block]).mean(),
            NOTE_AGE_MEDIAN: torch.cat(every[block]).median(),
            POOL_FILL: torch.tensor(fill[block], dtype=torch.float64).mean(),
        }
        for metric, value in expected.items():
            assert per_layer.loc[(metric, layer), "value"] == pytest.approx(value.item(), abs=1e-9)
        # anchor 0 sees an empty pool in both rows: no age there
        assert per_layer.loc[(NOTE_AGE, layer), "n"] == len(means[block]) <= 2 * len(ANCHORS) - 2


@torch.no_grad()
def test_zeroed_loss_equals_a_forward_without_memory_contexts():
    model = tiny_memmamba()
    input_ids = ids()
    _, losses = run_metric(model, input_ids)
    x = model.embedding(input_ids)  # by hand: every block adds its mixer's output only
    for block in model.layers:
        x = x + block.mixer(block.norm(x))
    manual = nll(model.lm_head(model.norm_f(x))[..., : model.config.vocab_size], input_ids)
    full = nll(model(input_ids).logits, input_ids)
    assert losses.loc[LOSS_ZEROED, "value"] == pytest.approx(manual, rel=1e-10)
    assert losses.loc[LOSS_FULL, "value"] == pytest.approx(full, rel=1e-10)
    assert losses.loc[LOSS_DELTA, "value"] == pytest.approx(manual - full, abs=1e-10)
    assert manual != pytest.approx(full, rel=1e-6)  # the memory path does move this model
    assert losses.loc[LOSS_FULL, "length"] == LENGTH
    assert losses.loc[LOSS_FULL, "n"] == input_ids.shape[0] * (LENGTH - 1)


@pytest.mark.parametrize("fusion", ["weighted", "residual", "gated"])
@pytest.mark.parametrize("chunk_size", [None, 48])
def test_zeroed_losses_equal_the_model_run_with_zeroed_contexts(fusion, chunk_size):
    """The zeroed pass runs the mixers' path alone: the losses of the whole model run under
    zeroed_memory_contexts, bit for bit (float32, several fusions, one pass and chunked)."""
    model = tiny_memmamba(fusion=fusion).float()
    input_ids = ids(seed=5)
    step = chunk_size or LENGTH
    cache = model.init_cache(input_ids.shape[0]) if chunk_size else None
    with zeroed_memory_contexts(model) as n_zeroed, observe_position_loss(model, LENGTH) as seen:
        for start in range(0, LENGTH, step):
            model(input_ids[:, start : start + step], cache=cache)
    assert n_zeroed > 0
    zeroed = memory.zeroed_losses(model, input_ids, chunk_size)
    assert zeroed.dtype == torch.float64 and zeroed.shape == input_ids.shape
    assert torch.equal(zeroed.nan_to_num(-1.0), seen.losses.nan_to_num(-1.0))
    assert bool(zeroed[:, 1:].isfinite().all()) and bool(zeroed[:, 0].isnan().all())


@torch.no_grad()
def test_zeroing_changes_nothing_without_cross_token_and_cross_layer():
    model = tiny_memmamba(use_cross_token=False, use_cross_layer=False)
    input_ids = ids()
    with zeroed_memory_contexts(model) as n_zeroed:
        zeroed = model(input_ids).logits
    assert n_zeroed == 0
    torch.testing.assert_close(zeroed, model(input_ids).logits, rtol=0, atol=0)
    per_layer, losses = run_metric(model, input_ids, chunk_size=64)
    assert losses.loc[LOSS_DELTA, "value"] == pytest.approx(0.0, abs=1e-12)
    assert losses.loc[LOSS_ZEROED, "value"] == pytest.approx(losses.loc[LOSS_FULL, "value"])
    assert FIRE_RATE not in per_layer.index.get_level_values("metric")
    assert (per_layer.xs(CONTEXT_SHARE, level="metric")["value"] == 0).all()


@torch.no_grad()
def test_zeroing_hooks_are_removed_even_on_error():
    model = tiny_memmamba()
    input_ids = ids(batch=1, length=40)
    before = model(input_ids).logits
    with pytest.raises(RuntimeError, match="boom"), zeroed_memory_contexts(model):
        raise RuntimeError("boom")
    for block in model.layers:
        for attention in (block.cross_token, block.cross_layer):
            assert attention is None or not attention._forward_hooks
    torch.testing.assert_close(model(input_ids).logits, before, rtol=0, atol=0)
    with pytest.raises(TypeError, match="MemMambaLM"), zeroed_memory_contexts(build_model("mamba")):
        pass


def test_analyze_runs_it_by_default_chunked_and_bounds_the_zeroed_pass(monkeypatch):
    prefix = 181  # a bin edge of position_loss's log grid at 600 tokens
    monkeypatch.setattr(memory, "ZEROED_TOKENS", prefix)
    model = build_model("memmamba", "tiny", write_init_bias=0.0)
    options = analysis.AnalysisOptions(
        600, "random", "position_loss,memmamba_memory", 32, chunk_size=128, n_boot=20
    )
    plan = analysis.plan_run(model, options, time_it=False)
    assert plan.extra_tokens == {"memmamba_memory": prefix}
    assert f"memmamba_memory +{prefix} tokens" in plan.describe()
    result = analysis.run_analysis(model, options, progress=False)
    frame = result.frame
    rows = frame[frame["metric"].str.startswith("memmamba_")]
    assert set(rows["metric"]) == set(memory.METRICS)
    assert sorted(rows[rows["metric"] == WRITE_RATE]["layer"]) == [1, 2]
    full = rows[rows["metric"] == LOSS_FULL].iloc[0]
    assert full["length"] == prefix and full["n"] == prefix - 1
    assert (rows[rows["layer"] >= 0]["length"] == 600).all()
    assert any(f"first {prefix} of 600 tokens" in note for note in result.meta["notes"])
    # the full-model loss is the analysis's own pass: position_loss's bins over 1 .. prefix - 1
    bins = frame[frame["metric"] == "position_loss"]
    assert prefix in set(bins["distance"])
    covered = bins[bins["distance"] < prefix]
    expected = (covered["value"] * covered["n"]).sum() / covered["n"].sum()
    assert full["value"] == pytest.approx(expected, rel=1e-9)


def test_on_by_default_in_the_api_and_on_the_command_line():
    assert "memmamba_memory" in analysis.DEFAULT_METRICS
    command_line = inspect.signature(cli.analyze).parameters["metrics"].default
    assert set(command_line.split(",")) == set(analysis.DEFAULT_METRICS)


def test_other_models_give_no_rows_no_note_and_no_cost():
    model = build_model("mamba", "tiny")
    options = analysis.AnalysisOptions(400, "random", "position_loss,memmamba_memory", 32)
    assert analysis.plan_run(model, options, time_it=False).extra_tokens == {}
    result = analysis.run_analysis(model, options, progress=False)
    assert not result.frame["metric"].str.startswith("memmamba_").any()
    assert not any("memmamba" in note for note in result.meta["notes"])
    assert "MemMamba memory" not in render_report(result, figures={})


@pytest.fixture(scope="module")
def memmamba_run(tmp_path_factory):
    target = tmp_path_factory.mktemp("run") / "mm"
    argv = ["analyze", "--model", "memmamba", "--preset", "tiny", "--length", "600"]
    argv += ["--anchors", "32", "--no-progress", "--metrics", "etmf,memmamba_memory"]
    return target, main([*argv, "--out", str(target)])


def test_cli_summary_prints_the_memory_lines(memmamba_run, capsys, tmp_path):
    argv = ["analyze", "--model", "memmamba", "--preset", "tiny", "--length", "600"]
    argv += ["--anchors", "32", "--no-progress", "--metrics", "memmamba_memory"]
    code = main([*argv, "--out", str(tmp_path / "cli")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "memmamba_memory +600 tokens" in err  # the plan states the extra forward
    assert "MemMamba memory by layer" in out and "note age" in out
    assert "Memory path: text loss over the first 600 tokens" in out


def test_report_html_has_the_panel(memmamba_run):
    target, code = memmamba_run
    assert code == 0
    html = (target / "report.html").read_text()
    assert "MemMamba memory by layer" in html and "every pool context zeroed" in html
    for header in ("writes", "fires", "note age: mean", "oldest", "notes in pool", "context share"):
        assert f"<th>{header}</th>" in html
    (target / "report.html").unlink()  # rebuilt from the saved tables
    assert main(["report", str(target)]) == 0
    assert (target / "report.html").read_text().count("MemMamba memory by layer") == 1


@pytest.mark.parametrize("policy", ["priority", "fifo"])
def test_pools_at_equals_a_rebuild_per_position_with_tied_importances(policy):
    from fidelity.models.state_pool import rank_order
    from fidelity.probes.memmamba_trace import MemMambaTrace, _BlockLog

    generator = torch.Generator().manual_seed(3)
    positions = torch.randperm(300, generator=generator)[:120].sort().values
    importance = torch.randint(0, 4, (120,), generator=generator).float() / 4  # many ties
    rows = torch.randint(0, 2, (120,), generator=generator)
    log = _BlockLog.allocate(2, 300)
    log.written[rows, positions] = True
    log.importance[rows, positions] = importance
    trace = MemMambaTrace(pool_size=7, policy=policy, tau2=0.5, logs={0: log})
    queries = torch.arange(0, 302, 3)
    for row in range(2):
        ranked, member = trace.pools_at(0, queries, row)
        for query, kept in zip(queries.tolist(), member, strict=True):
            mine = (rows == row) & (positions < query)  # the old rebuild: rank what came before
            p, i = positions[mine], importance[mine]
            order = rank_order(i[None], p[None], torch.ones_like(p[None], dtype=torch.bool), policy)
            expected = p[order[0][:7]].sort().values
            assert torch.equal(ranked[kept].sort().values, expected)
            assert torch.equal(trace.pool_at(0, query, row), expected)


@torch.no_grad()
def test_note_ages_do_not_depend_on_the_anchor_blocks(monkeypatch):
    model = tiny_memmamba()
    input_ids = ids()
    whole, _ = run_metric(model, input_ids)
    monkeypatch.setattr(memory, "AGE_BLOCK_ELEMENTS", 3)  # one anchor per block
    blocked, _ = run_metric(model, input_ids)
    ages = [NOTE_AGE, NOTE_AGE_OLDEST, NOTE_AGE_MEDIAN, POOL_FILL]
    assert whole.loc[ages].equals(blocked.loc[ages])


def test_block_means_equal_nanmeans_of_each_block():
    generator = torch.Generator().manual_seed(4)
    for n in (1, 127, 128, 300, 1000):
        values = torch.randn(3, n, generator=generator, dtype=torch.float64)
        values[torch.rand(3, n, generator=generator) < 0.2] = torch.nan
        values[1, : min(n, 200)] = torch.nan  # whole blocks empty: NaN means
        bounds = torch.tensor_split(torch.arange(n), max(1, -(-n // memory.BLOCK_TOKENS)))
        expected = torch.stack([values[:, b].nanmean(dim=1) for b in bounds]).flatten()
        got = torch.from_numpy(memory._block_means(values))
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


@torch.no_grad()
def test_trace_records_are_allocated_up_front_and_refuse_extra_tokens():
    from fidelity.probes.memmamba_trace import tracing_memmamba

    model = tiny_memmamba()
    input_ids = ids(batch=1, length=64)
    with tracing_memmamba(model, (1, 64)) as trace:
        assert trace.logs[0].written.shape == (1, 64)  # before any forward pass
        model(input_ids)
        with pytest.raises(ValueError, match="set up for 64 tokens"):
            model(input_ids[:, :1], cache=model.init_cache(1))
