"""Figures: each plot kind checked on real properties (axes, scales, line data, labels).

Inputs are the synthetic tables of ``tests/fixtures_results.py`` (plumbing only).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.text
import matplotlib.ticker
import numpy as np
import pandas as pd
import pytest
from fixtures_results import synthetic_frame, synthetic_result
from matplotlib.collections import PolyCollection, QuadMesh
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from fidelity.reports import plots
from fidelity.results import Comparison


@pytest.fixture(scope="module")
def frame():
    return synthetic_frame(n_layer=3, length=512)


def _curve_lines(ax, prefix: str = "layer"):
    return [line for line in ax.get_lines() if line.get_label().startswith(prefix)]


def _values(frame, metric, layer, x="distance"):
    rows = frame[(frame["metric"] == metric) & (frame["layer"] == layer)].sort_values(x)
    return rows[x].to_numpy(), rows["value"].to_numpy()


def test_forgetting_curve_lines_bands_axes_and_reference_lines(frame):
    figure = plots.forgetting_curve(frame)
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    lines = _curve_lines(ax)
    assert [line.get_label() for line in lines] == [
        "layer 0 (embeddings)",
        "layer 1",
        "layer 2",
        "layer 3",
    ]
    for layer, line in enumerate(lines):
        x, y = _values(frame, "etmf_norm", layer)
        np.testing.assert_array_equal(line.get_xdata(), x)
        np.testing.assert_array_equal(line.get_ydata(), y)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 4
    assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] < 0  # distance 0 is visible
    assert ax.get_xlabel() == "distance (tokens)"
    assert "normalized ETMF" in ax.get_ylabel()
    reference = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()}
    assert reference["chance (0)"] == 0.0 and reference["memory threshold (0.5)"] == 0.5
    assert "memmamba" in ax.get_title() and "512" in ax.get_title()
    colours = {to_hex(line.get_color()) for line in lines}
    assert len(colours) == 4


def test_forgetting_curve_subsamples_many_layers_and_checks_requests():
    many = synthetic_frame(n_layer=12, length=64, retrieval=False, decay=False, influence=False)
    figure = plots.forgetting_curve(many)
    lines = _curve_lines(figure.axes[0])
    assert len(lines) == plots.MAX_CURVES
    assert lines[0].get_label().startswith("layer 0") and lines[-1].get_label() == "layer 12"
    assert "9 of 13 layers shown" in figure.legends[0].get_title().get_text()
    picked = plots.forgetting_curve(many, layers=[3, 5])
    assert [line.get_label() for line in _curve_lines(picked.axes[0])] == ["layer 3", "layer 5"]
    with pytest.raises(ValueError, match=r"layers \[40\] have no rows; available layers"):
        plots.forgetting_curve(many, layers=[40])


def test_depth_curve_panels_hold_embedding_and_adjacent_transfer(frame):
    figure = plots.depth_curve(frame)
    left, right = figure.axes[:2]
    assert left.get_xlabel() == right.get_xlabel() == "target layer"
    assert "embeddings" in left.get_title() and "adjacent" in right.get_title()
    vertical = frame[frame["metric"] == "eclmf_norm"]
    from_embeddings = vertical[vertical["source_layer"] == 0].sort_values("layer")
    adjacent = vertical[vertical["distance"] == 1].sort_values("layer")
    for ax, expected in ((left, from_embeddings), (right, adjacent)):
        (line,) = _curve_lines(ax, "ECLMF")
        np.testing.assert_array_equal(line.get_xdata(), expected["layer"])
        np.testing.assert_array_equal(line.get_ydata(), expected["value"])
        assert len(_curve_lines(ax, "CKA")) == 1
    assert "memmamba" in figure.get_suptitle()


def test_heatmap_cells_are_the_normalized_scores(frame):
    figure = plots.forgetting_heatmap(frame)
    ax = figure.axes[0]
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    rows = frame[frame["metric"] == "etmf_norm"]
    grid = rows.pivot(index="layer", columns="distance", values="value")
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(grid.shape), grid)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["0", "1", "2"]
    assert ax.get_xlabel() == "distance (tokens)" and "layer" in ax.get_ylabel()
    assert mesh.get_clim() == (0.0, 1.0)
    assert len(figure.axes) == 2  # the colour bar


def test_decay_curves_are_log_log_without_distance_zero(frame):
    figure = plots.decay_curves(frame)
    ax = figure.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    lines = _curve_lines(ax)
    assert [line.get_label() for line in lines] == ["layer 1", "layer 2", "layer 3"]
    for line in lines:
        assert min(line.get_xdata()) >= 1
    _, y = _values(frame, "ssm_decay", 2)
    np.testing.assert_array_equal(lines[1].get_ydata(), y)


def test_decay_tick_labels_are_plain_text_at_the_log_scale_ticks(frame):
    """The log y axis keeps matplotlib's ticks and numbers, written without mathtext."""
    figure = plots.decay_curves(frame)
    figure.canvas.draw()
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and not any("$" in text for text in labels)
    reference = matplotlib.ticker.LogFormatterSciNotation()
    reference.set_axis(ax.yaxis)
    reference.set_locs(ax.yaxis.get_majorticklocs())
    for location, label in zip(ax.yaxis.get_majorticklocs(), ax.get_yticklabels(), strict=True):
        expected = reference(location)
        exponent = expected.removeprefix("$\\mathdefault{10^{").removesuffix("}}$")
        assert label.get_text() == ("10" + exponent.translate(SUPERSCRIPT) if expected else "")
    assert not any("$" in text.get_text() for text in figure.findobj(matplotlib.text.Text))


SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


@pytest.mark.parametrize(
    ("value", "only_decades", "text"),
    [
        (1e-28, True, "10⁻²⁸"),
        (1e-3, True, "10⁻³"),
        (1.0, True, "10⁰"),
        (100.0, True, "10²"),
        (2e-3, True, ""),
        (2e-3, False, "2×10⁻³"),
        (5e4, False, "5×10⁴"),
    ],
)
def test_plain_log_formatter(value, only_decades, text):
    formatter = plots.PlainLogFormatter(labelOnlyBase=only_decades)
    assert formatter(value) == text


def test_influence_curves_show_distance_zero(frame):
    figure = plots.influence_curves(frame)
    ax = figure.axes[0]
    assert ax.get_xscale() == "symlog" and ax.get_yscale() == "log"
    lines = _curve_lines(ax)
    assert len(lines) == 3 and lines[0].get_xdata()[0] == 0
    assert "relative to d = 0" in ax.get_ylabel()


def test_retrieval_grid_annotates_every_cell(frame):
    figure = plots.retrieval_grid(frame)
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["passkey retrieval", "key-value retrieval"]
    passkey = frame[frame["metric"] == "passkey_acc"]
    texts = [t.get_text() for t in panels[0].texts]
    assert len(texts) == len(passkey)  # one annotated cell per (length, depth)
    expected = sorted(f"{100 * v:.0f}%" for v in passkey["value"])
    assert sorted(texts) == expected
    assert panels[0].get_xlabel() == "context length (tokens)"
    assert panels[0].yaxis_inverted()  # 0% depth (start of context) on top
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["128", "256", "512"]


def test_retrieval_grid_pools_repeated_cells_by_trials(frame):
    rows = frame[frame["metric"] == "passkey_acc"].iloc[:1]
    doubled = rows.copy()
    doubled["value"], doubled["n"] = 1.0, 30
    rows = rows.assign(value=0.0, n=10)
    figure = plots.retrieval_grid(pd.concat([rows, doubled]))
    (text,) = figure.axes[0].texts
    assert text.get_text() == "75%"  # (0 * 10 + 1 * 30) / 40


def test_plots_without_data_or_with_several_runs_explain(frame):
    horizontal = frame[frame["metric"].isin(["etmf_norm", "etmf"])]
    with pytest.raises(
        ValueError, match=r"needs metric 'ssm_decay'.*holds metrics: etmf, etmf_norm"
    ):
        plots.decay_curves(horizontal)
    with pytest.raises(ValueError, match="'passkey_acc' or 'kv_acc'"):
        plots.retrieval_grid(horizontal)
    two_runs = horizontal.copy()
    two_runs.loc[two_runs.index[:3], "model"] = "mamba"
    with pytest.raises(ValueError, match="holds 2"):
        plots.forgetting_curve(two_runs)
    with pytest.raises(ValueError, match="several rows share"):
        plots.forgetting_curve(pd.concat([horizontal, horizontal.iloc[:1]]))


@pytest.fixture(scope="module")
def comparison():
    a = synthetic_result(n_layer=5, length=256, seed=0, retrieval=False)
    b = synthetic_result(model="mamba", n_layer=5, length=256, seed=1, memory_scale=0.25)
    return Comparison([a, b])


def test_comparison_overlay_one_panel_per_layer_one_colour_per_run(comparison):
    figure = plots.comparison_overlay(comparison.frame)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [
        "layer 0 (embeddings)",
        *[f"layer {i}" for i in range(1, 6)],
    ]
    for ax in panels:
        runs = [line for line in ax.get_lines() if line.get_label() in comparison.labels]
        assert [line.get_label() for line in runs] == comparison.labels
        assert len({to_hex(line.get_color()) for line in runs}) == 2
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == comparison.labels
    bottom = [ax for ax in panels if ax.get_xlabel()]
    assert {ax.get_xlabel() for ax in bottom} == {"distance (tokens)"}
    assert len(bottom) == 4  # the lowest visible panel of each of the 4 columns


def test_comparison_depth_and_summary(comparison):
    depth = plots.comparison_depth(comparison.frame)
    assert len(depth.axes) == 3
    for ax in depth.axes:
        assert [line.get_label() for line in _curve_lines(ax, "m")] == comparison.labels
    summary = plots.comparison_summary(comparison.summary)
    farthest, peak, mass, half_life = summary.axes
    assert farthest.get_ylabel() == "farthest distance (tokens)"
    assert peak.get_ylabel() == "peak distance (tokens)"
    assert mass.get_ylabel() == "memory mass (doublings)"
    assert half_life.get_ylabel() == "half-life (tokens)"
    assert half_life.get_yscale() == "log"  # half-lives span > 10x
    bars = half_life.containers  # one errorbar container per run
    assert [bar.get_label() for bar in bars] == comparison.labels
    first = comparison.summary[comparison.summary["run"] == comparison.labels[0]]
    data_line = bars[0].lines[0]
    np.testing.assert_array_equal(data_line.get_ydata(), first["half_life"])
    assert (data_line.get_xdata() < first["layer"]).all()  # runs dodged side by side
    with pytest.raises(ValueError, match="need a 'run' column"):
        plots.comparison_overlay(comparison.results[0].frame)


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0"), (512, "512"), (4096, "4096"), (1500, "1.5k"), (60_000, "60k"), (2_000_000, "2M")],
)
def test_format_token_count(count, text):
    assert plots.format_token_count(count) == text


def test_figures_stay_out_of_pyplot(frame):
    before = plt.get_fignums()
    plots.forgetting_curve(frame)
    plots.retrieval_grid(frame)
    assert plt.get_fignums() == before


def test_figures_display_in_notebooks_without_pyplot(frame):
    figure = plots.forgetting_heatmap(frame)
    assert figure._repr_png_().startswith(b"\x89PNG\r\n\x1a\n")
    formatter = pytest.importorskip("IPython.core.formatters")
    png_formatter = formatter.PNGFormatter()
    assert png_formatter(figure).startswith(b"\x89PNG")
