"""analyze() end to end on small models: tables, determinism, memory refusal, bad input."""

import math

import pandas as pd
import pytest
import torch

import fidelity.analysis as analysis
from fidelity.budget import MemoryBudgetError
from fidelity.models.base import AUTO_CHUNK_SIZE
from fidelity.models.registry import build_model
from fidelity.probes.capture import NonFiniteHiddenStateError
from fidelity.results import FRAME_COLUMNS, FidelityResult


@pytest.fixture(scope="module")
def tiny_result() -> FidelityResult:
    model = build_model("memmamba", "tiny")
    return analysis.analyze(
        model, 600, probe="random", metrics="etmf,eclmf", anchors=96, progress=False, n_boot=20
    )


def test_result_tables_follow_the_schema(tiny_result):
    frame, summary, meta = tiny_result.frame, tiny_result.summary, tiny_result.meta
    assert list(frame.columns) == list(FRAME_COLUMNS)
    assert set(frame["metric"]) >= {"etmf", "etmf_norm", "etmf_chance", "eclmf", "cka"}
    assert (frame["model"] == "memmamba").all() and (frame["length"] == 600).all()
    assert sorted(summary["layer"]) == [0, 1, 2]
    assert meta["trained"] is False and meta["random_init"] is True
    assert meta["length"] == 600 and meta["probe"] == "random" and meta["anchors"] == 96
    assert meta["versions"]["torch"] == torch.__version__


def test_etmf_behaves_as_defined_on_random_tokens(tiny_result):
    """Layer 0 holds token t exactly at d = 0, and nothing about it elsewhere on random
    tokens (no text statistics to exploit)."""
    frame = tiny_result.frame
    norm = frame[(frame["metric"] == "etmf_norm") & (frame["layer"] == 0)].set_index("distance")
    assert norm.loc[0, "value"] == pytest.approx(1.0, abs=1e-6)
    far = norm[norm.index >= 4]["value"]
    assert far.abs().max() < 0.2
    values = frame[frame["metric"].isin(["etmf", "etmf_raw", "eclmf", "cka"])]["value"]
    assert values.between(-1 - 1e-9, 1 + 1e-9).all()


def test_same_seed_same_numbers_and_a_new_seed_changes_them():
    model = build_model("mamba", "tiny")
    options = {"probe": "text", "metrics": "etmf", "anchors": 64, "progress": False, "n_boot": 10}
    a = analysis.analyze(model, 400, seed=3, **options)
    b = analysis.analyze(model, 400, seed=3, **options)
    c = analysis.analyze(model, 400, seed=4, **options)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    pd.testing.assert_frame_equal(a.summary, b.summary)
    assert not a.frame["value"].equals(c.frame["value"])


def test_memory_estimate_refuses_what_will_not_fit():
    model = build_model("mamba", "tiny")
    with pytest.raises(MemoryBudgetError, match=r"needs about .* allows"):
        analysis.analyze(model, 4000, progress=False, max_memory=1 << 20)


def test_plan_keeps_only_sampled_positions_and_chunks_long_inputs():
    model = build_model("mamba", "tiny")
    plan = analysis.plan_analysis(model, "60k", anchors=128, time_it=False)
    assert plan.chunk_size == AUTO_CHUNK_SIZE
    assert len(plan.positions) < 128 * (len(plan.distances) + 1)
    assert plan.estimate.kept_states == len(plan.positions) * len(plan.layers) * 32 * 4
    assert "60k tokens" in plan.describe()


def test_non_finite_states_are_reported():
    model = build_model("mamba", "tiny")
    with torch.no_grad():
        model.layers[1].mixer.out_proj.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteHiddenStateError, match="layer 2"):
        analysis.analyze(model, 300, metrics="etmf", anchors=32, progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"metrics": "etmf,bogus"}, "unknown metrics"),
        ({"probe": "poem"}, "unknown probe"),
        ({"anchors": 3}, "anchors must be"),
        ({"layers": [7]}, "out of range"),
        ({"distances": [0, 5000]}, "distances must lie"),
    ],
)
def test_bad_arguments_are_clear_errors(options, message):
    model = build_model("mamba", "tiny")
    with pytest.raises(ValueError, match=message):
        analysis.analyze(model, 500, progress=False, **options)


def test_compare_lines_runs_up(tiny_result, tmp_path):
    other = analysis.analyze(
        build_model("mamba", "tiny"),
        600,
        probe="random",
        metrics="etmf",
        anchors=96,
        progress=False,
        n_boot=20,
    )
    tiny_result.save(tmp_path / "a")
    comparison = analysis.compare([tmp_path / "a", other])
    assert set(comparison.frame["run"]) == set(comparison.labels) and len(comparison.labels) == 2
    with pytest.raises(TypeError):
        analysis.compare(tmp_path / "a")


def test_decay_and_influence_without_etmf():
    model = build_model("mamba", "tiny")
    result = analysis.analyze(
        model,
        400,
        probe="random",
        metrics="ssm_decay,influence",
        anchors=32,
        progress=False,
        n_boot=10,
    )
    metrics = set(result.frame["metric"])
    assert metrics == {"ssm_decay", "influence"}
    decay = result.frame[result.frame["metric"] == "ssm_decay"]
    assert (decay["value"] >= 0).all() and set(decay["layer"]) == {1, 2}
    assert list(result.summary["layer"]) == [0, 1, 2]
    statistics = result.summary.drop(columns=["model", "checkpoint", "layer"])
    assert statistics.isna().all().all()  # every statistic needs ETMF


def test_models_without_an_ssm_get_a_note_instead_of_ssm_decay():
    model = build_model("transformer", "tiny")
    result = analysis.analyze(
        model,
        300,
        probe="random",
        metrics="etmf,ssm_decay",
        anchors=32,
        progress=False,
        n_boot=10,
    )
    assert "ssm_decay" not in set(result.frame["metric"])
    assert any(note.startswith("ssm_decay skipped") for note in result.meta["notes"])


def test_retrieval_and_perplexity_metrics_run_their_own_passes():
    model = build_model("mamba", "tiny")
    result = analysis.analyze(
        model,
        1500,
        probe="random",
        metrics="etmf,retrieval,perplexity",
        anchors=32,
        progress=False,
        n_boot=10,
    )
    frame = result.frame
    assert {"etmf", "passkey_acc", "kv_acc", "perplexity"} <= set(frame["metric"])
    # rows of the capture's metrics carry the analysis length beside the retrieval contexts
    assert (frame.loc[frame["metric"] == "etmf", "length"] == 1500).all()
    retrieval = frame[frame["metric"] == "passkey_acc"]
    assert sorted(set(retrieval["length"])) == analysis.context_lengths(1500) == [1024, 1500]
    assert (retrieval["n"] == analysis.RETRIEVAL_TRIALS).all()
    assert "retrieval" in result.plot_kinds()


def test_a_registered_metric_runs_inside_analyze(monkeypatch):
    """Adding a metric is one function plus one METRIC_RUNNERS entry (README, "Adding a
    metric"): the name is then accepted and its rows land in the result's frame."""
    from fidelity.metrics.toolkit import captured_states, tidy_frame

    def mean_norm(context):
        rows = []
        for layer in context.plan.layers:
            states = captured_states(context.capture, layer, context.plan.anchors)
            value = float(states.norm(dim=-1).mean())
            rows.append(("mean_norm", layer, 0, value, float("nan"), float("nan"), 1, layer))
        return [tidy_frame(rows)]

    runners = {**analysis.METRIC_RUNNERS, "mean_norm": analysis.MetricRunner(mean_norm)}
    monkeypatch.setattr(analysis, "METRIC_RUNNERS", runners)
    monkeypatch.setattr(analysis, "METRICS", tuple(runners))
    model = build_model("mamba", "tiny")
    result = analysis.analyze(
        model, 200, probe="random", metrics="mean_norm", anchors=16, progress=False, n_boot=0
    )
    rows = result.frame[result.frame["metric"] == "mean_norm"]
    assert sorted(rows["layer"]) == [0, 1, 2] and (rows["value"] > 0).all()
    assert result.meta["metrics"] == ["mean_norm"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"length": 8}, "too short"),
        ({"metrics": "bogus"}, "unknown metrics"),
        ({"anchors": 8}, "anchors must be an integer >= 16"),
        ({"batch": 0}, "batch must be a positive integer"),
        ({"n_boot": -1}, "n_boot must be an integer >= 0"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"length": 100, "distances": [0, 100]}, r"distances must lie in \[0, 100\)"),
    ],
)
def test_analysis_options_refuse_bad_runs_before_any_model_loads(options, message):
    with pytest.raises(ValueError, match=message):
        analysis.AnalysisOptions(**options)
    # the notebook API validates the same way, before it resolves the model name
    arguments = {"length": 100, **options}
    with pytest.raises(ValueError, match=message):
        analysis.analyze("no-such-model", progress=False, **arguments)


def test_analysis_options_normalize_what_they_are_given():
    options = analysis.AnalysisOptions("1k", metrics="etmf, eclmf", layers=[2, 0], distances=[4])
    assert options.length == 1000 and options.metrics == ("etmf", "eclmf")
    assert options.layers == (2, 0) and options.distances == (4,)
