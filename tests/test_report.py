"""HTML reports: self-contained, escaped, and carrying the numbers and context a reader needs."""

from __future__ import annotations

import base64
import re

import pytest
from fixtures_results import synthetic_frame, synthetic_meta, synthetic_result, synthetic_summary

from fidelity.reports import html
from fidelity.results import Comparison, FidelityResult

_EXTERNAL = re.compile(r"""(?:src|href|url)\s*[=(]\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def _result(model="memmamba", trained=True, notes=None) -> FidelityResult:
    frame = synthetic_frame(model=model, n_layer=2, length=256, retrieval=False, influence=False)
    summary = synthetic_summary(frame)
    summary.loc[summary["layer"] == 1, ["half_life", "half_life_low", "half_life_high"]] = (
        37.5,
        33.25,
        41.75,
    )
    summary.loc[summary["layer"] == 2, "contiguous_length"] = 1234.0
    summary.loc[summary["layer"] == 2, ["half_life", "half_life_r2"]] = (float("nan"), 0.41)
    meta = synthetic_meta(model=model, length=60_000, trained=trained)
    if notes is not None:
        meta["notes"] = notes
    return FidelityResult(frame, summary, meta)


@pytest.fixture(scope="module")
def report() -> str:
    return html.render_report(_result())


def _assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert not _EXTERNAL.search(page), _EXTERNAL.search(page)
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert "@import" not in page


def test_report_is_self_contained_with_embedded_pngs(report):
    _assert_self_contained(report)
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', report)
    assert len(images) == 4  # forgetting, depth, heatmap, decay
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")


def test_report_contains_the_summary_numbers(report):
    assert "37.5 [33.2, 41.8]" in report  # half-life of layer 1 with its interval
    assert ">1234 [" in report  # contiguous length of layer 2
    assert ">not decaying<" in report  # layer 2's half-life: a fit with R² 0.41
    assert ">0.41<" in report
    for header in ("farthest distance", "peak distance", "memory mass", "contiguous length"):
        assert header in report, header
    assert "normalized ETMF at d = 64" in report


def test_report_states_what_was_measured(report):
    for text in (
        "60k (60000)",  # length
        "memory-fidelity 0.1.0",  # versions
        "12.5 s",  # wall time
        "3.00 GiB",  # peak memory
        "2025-01-02T03:04:05+00:00",  # date
        "123,456",  # parameters
        "<th>probe</th><td>text</td>",
        "<th>seed</th><td>0</td>",
        "<th>weights</th><td>trained</td>",
    ):
        assert text in report, text
    assert "Untrained" not in report


def test_report_explains_how_to_read_it(report):
    section = report[report.index("How to read this") :]
    terms = ("ETMF", "ECLMF", "Chance", "Normalized score", "Half-life", "Farthest distance")
    terms += ("Peak distance", "Memory mass", "Contiguous length", "not decaying")
    for term in terms:
        assert term in section, term


def test_untrained_weights_are_announced_prominently():
    page = html.render_report(_result(trained=False))
    banner = page.index("class='banner untrained'")
    assert banner < page.index("What was measured")
    assert "random initialization" in page[banner : banner + 400]


def test_everything_from_the_result_is_escaped():
    hostile = '<script>alert("x")</script>'
    page = html.render_report(_result(model=hostile, notes=["<b>note</b> & more"]))
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;b&gt;note&lt;/b&gt; &amp; more" in page


def test_pre_rendered_png_bytes_are_embedded_as_given():
    png = b"\x89PNG\r\n\x1a\nnot really an image"
    page = html.render_report(_result(), figures={"forgetting": png})
    assert page.count("data:image/png;base64,") == 1
    assert base64.b64encode(png).decode() in page


def test_comparison_report_shows_runs_warnings_and_differences():
    a = synthetic_result(n_layer=1, length=64, retrieval=False, decay=False, influence=False)
    b = synthetic_result(
        model="<mamba>",
        n_layer=1,
        length=128,
        probe="passkey",
        trained=False,
        memory_scale=0.5,
        retrieval=False,
        decay=False,
        influence=False,
    )
    comparison = Comparison([a, b])
    page = html.render_comparison(comparison)
    _assert_self_contained(page)
    assert page.count("data:image/png;base64,") == 3
    assert "Check before comparing" in page and "runs differ in probe" in page
    assert "&lt;mamba&gt;" in page and "<mamba>" not in page
    assert "Untrained weights (random initialization): &lt;mamba&gt;" in page
    row = comparison.summary[
        (comparison.summary["run"] == comparison.labels[1]) & (comparison.summary["layer"] == 1)
    ].iloc[0]
    for column in ("half_life", "farthest_distance", "memory_mass"):
        difference = (
            f"{html.format_number(row[f'{column}_diff'])} "
            f"[{html.format_number(row[f'{column}_diff_low'])}, "
            f"{html.format_number(row[f'{column}_diff_high'])}]"
        )
        assert difference in page, column
    assert "conservative" in page


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (float("nan"), "–"),
        (None, "–"),
        (0, "0"),
        (37.5, "37.5"),
        (0.87345, "0.873"),
        (1234.4, "1234"),
        (-0.0125, "-0.0125"),
        (1.5e-7, "1.50e-07"),
        (float("inf"), "∞"),
    ],
)
def test_format_number(value, text):
    assert html.format_number(value) == text


def test_format_bytes_and_seconds():
    assert html.format_bytes(512) == "512 B"
    assert html.format_bytes(3 * 2**30) == "3.00 GiB"
    assert html.format_seconds(12.5) == "12.5 s"
    assert html.format_seconds(754) == "12 min 34 s"
    assert html.format_seconds(7300) == "2 h 1 min"


def test_summary_table_has_one_row_per_layer():
    result = _result()
    table = html.summary_table(result.summary)
    assert table.count("<tr>") == 1 + len(result.summary)
    # layer; farthest, peak and its value, mass, contiguous, half-life and its R²; 3 distances
    n_columns = table.count("<th>")
    assert n_columns == 1 + 7 + 3
    assert table.count("<td") == n_columns * len(result.summary)
