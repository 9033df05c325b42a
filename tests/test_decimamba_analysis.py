"""DeciMamba through capture and the metrics: captured rows sit at their original positions,
dropped positions are NaN (and only those), and the metrics use exactly the samples that exist."""

import warnings

import pandas as pd
import pytest
import torch

import fidelity
from fidelity.analysis import plan_analysis
from fidelity.cli import main
from fidelity.metrics.eclmf import eclmf
from fidelity.metrics.etmf import etmf_frame, etmf_per_anchor
from fidelity.models.decimamba import DeciMambaLM
from fidelity.models.registry import build_model
from fidelity.probes.capture import NonFiniteHiddenStateError, capture, capturing
from fidelity.probes.tasks import make_probe

# Blocks 1 and 2 of 4 decimate: 80 tokens -> 24 (+1 kept last) -> max(12, 4) + 1 = 13 rows.
DECIMATING = {
    "decimating_layers": [1, 2],
    "decimation_base_length": 24,
    "decimation_beta": 0.5,
    "decimation_min_length": 4,
}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def deci(dtype):
    mamba = build_model("mamba", "tiny", seed=0, n_layer=4).to(dtype).eval()
    return DeciMambaLM.from_mamba(mamba, **DECIMATING)


def tokens(batch, length, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def expected_states(model, ids, chunk_size=None):
    """Every layer at every position from the model's own ``hidden_states`` and
    ``layer_positions`` (NaN where a position is not in a layer), chunk by chunk if asked."""
    length = ids.shape[1]
    chunk_size = chunk_size or length
    cache = model.init_cache(ids.shape[0]) if chunk_size < length else None
    layers = {}
    with torch.no_grad():
        for start in range(0, length, chunk_size):
            out = model(ids[:, start : start + chunk_size], cache, output_hidden_states=True)
            for layer, (hidden, positions) in enumerate(
                zip(out.hidden_states, out.layer_positions, strict=True)
            ):
                layers.setdefault(layer, []).append((hidden, positions))
    expected = {}
    for layer, pieces in layers.items():
        full = torch.full((ids.shape[0], length, pieces[0][0].shape[-1]), torch.nan)
        full = full.to(pieces[0][0].dtype)
        for hidden, positions in pieces:
            full.scatter_(1, positions[..., None].expand(-1, -1, hidden.shape[-1]), hidden)
        expected[layer] = full
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("positions", [None, [0, 5, 17, 40, 63, 79]])
def test_capture_places_rows_at_their_original_positions(dtype, positions):
    model = deci(dtype)
    ids = tokens(3, 80, seed=1)
    cap = capture(model, ids, positions=positions)
    expected = expected_states(model, ids)
    index = torch.arange(80) if positions is None else torch.tensor(positions)
    kept_rows = []
    for layer in range(5):
        want = expected[layer][:, index]
        got = cap[layer]
        assert got.shape == (3, len(index), 32) and got.dtype == dtype
        # NaN exactly where the model has no row for the position, equal values elsewhere
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
        kept_rows.append((~torch.isnan(got).any(-1)).sum(dim=1).tolist())
    if positions is None:  # 80 -> 80 -> 25 -> 13 -> 13 rows, as the docstring budgets say
        assert kept_rows == [[80] * 3, [80] * 3, [25] * 3, [13] * 3, [13] * 3]
        with torch.no_grad():
            layer_positions = model(ids).layer_positions
        for layer in range(5):
            present = ~torch.isnan(cap[layer]).any(-1)  # (batch, 80)
            for row in range(3):
                assert torch.equal(present[row].nonzero()[:, 0], layer_positions[layer][row])


@pytest.mark.parametrize("chunk_size", [None, 25])
def test_without_drops_the_tracked_capture_is_mambas_capture(chunk_size):
    """Budgets above the length: nothing is dropped, and following row positions must give
    exactly what the consecutive-rows capture of the same Mamba weights gives."""
    mamba = build_model("mamba", "tiny", seed=0, n_layer=4).double().eval()
    model = DeciMambaLM.from_mamba(mamba, **{**DECIMATING, "decimation_base_length": 500})
    ids = tokens(2, 70, seed=6)
    positions = [1, 2, 30, 69]
    ours = capture(model, ids, positions=positions, chunk_size=chunk_size)
    reference = capture(mamba, ids, positions=positions, chunk_size=chunk_size)
    for layer in reference.layers:
        assert torch.equal(ours[layer], reference[layer])


@pytest.mark.parametrize("chunk_size", [16, 30])
def test_chunked_capture_decimates_each_chunk_like_the_model(chunk_size):
    model = deci(torch.float64)
    ids = tokens(2, 90, seed=2)
    positions = torch.arange(0, 90, 3)
    cap = capture(model, ids, layers=[0, 2, 3, 4], positions=positions, chunk_size=chunk_size)
    expected = expected_states(model, ids, chunk_size)
    for layer in cap.layers:
        want = expected[layer][:, positions]
        assert torch.equal(torch.isnan(cap[layer]), torch.isnan(want))
        torch.testing.assert_close(cap[layer].nan_to_num(0.0), want.nan_to_num(0.0), rtol=0, atol=0)
    # a 30-token chunk keeps 24 + 1 rows of 30 in layer 2: some positions are dropped
    assert torch.isnan(cap[2]).any() == (chunk_size > 25)


def test_a_users_chunk_loop_under_capturing_matches_capture():
    model = deci(torch.float64)
    ids = tokens(1, 60, seed=3)
    with torch.no_grad(), capturing(model, 60, layers=[3]) as cap:
        cache = model.init_cache(1)
        for start in range(0, 60, 40):
            model(ids[:, start : start + 40], cache=cache)
    reference = capture(model, ids, layers=[3], chunk_size=40)
    assert torch.equal(cap[3].nan_to_num(7.0), reference[3].nan_to_num(7.0))
    with (
        pytest.raises(ValueError, match="expected one sequence of 70 tokens"),
        torch.no_grad(),
        capturing(model, 70),
    ):
        model(ids)


def test_real_non_finite_output_is_reported_at_its_original_position():
    model = deci(torch.float32)
    ids = tokens(1, 80, seed=4)
    with torch.no_grad():
        kept = model(ids).layer_positions[3][0]  # rows of block 2's output

    def poison(_module, _args, output):
        output = output.clone()
        output[0, 5, 0] = float("inf")  # row 5 of 13
        return output

    handle = model.layers[2].register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteHiddenStateError) as error:
            capture(model, ids)
        cap = capture(model, ids, check_finite=False)
    finally:
        handle.remove()
    assert (error.value.layer, error.value.position) == (3, int(kept[5]))
    assert torch.isinf(cap[3][0, kept[5], 0])
    assert torch.isnan(cap[3]).any()  # the dropped positions, which raised nothing


def test_analyze_decimamba_end_to_end_counts_the_samples_that_exist():
    model = build_model("decimamba", "tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ssm_decay and ETMF say what they skip
        result = fidelity.analyze(model, 600, progress=False, n_boot=20)
    frame = result.frame
    plan = plan_analysis(model, 600, time_it=False)
    probe = make_probe("text", 600, batch=1, seed=0)
    with torch.no_grad():
        kept = model(probe.input_ids).layer_positions[2][0]  # block 1 decimates 600 -> 17
    assert len(kept) == 17
    n_in_layer_2 = int(torch.isin(plan.anchors, kept).sum())
    etmf_2 = frame[(frame.metric == "etmf") & (frame.layer == 2)]
    assert int(etmf_2[etmf_2.distance == 0].n.iloc[0]) == n_in_layer_2
    assert (etmf_2.n <= 17).all() and etmf_2.value.notna().all()
    etmf_1 = frame[(frame.metric == "etmf") & (frame.layer == 1)]
    assert (etmf_1.n == etmf_1.distance.map(lambda d: int((plan.anchors + d < 600).sum()))).all()
    eclmf_2 = frame[(frame.metric == "eclmf") & (frame.layer == 2)]
    assert set(eclmf_2.n) == {n_in_layer_2}
    assert list(result.summary.layer) == [0, 1, 2]
    assert "ssm_decay skipped layers 2 and above" in " ".join(result.meta["notes"])


def test_cli_analyze_decimamba(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["analyze", "--model", "decimamba", "--preset", "tiny", "--length", "600"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([*argv, "--out", str(out), "--no-progress", "--metrics", "etmf,eclmf"])
    assert code == 0, capsys.readouterr().err
    results = pd.read_csv(out / "results.csv")
    assert {0, 1, 2} <= set(results[results.metric == "etmf_norm"].layer)


def test_metrics_on_a_decimamba_capture_use_only_present_pairs():
    """Layer 3 keeps 13 of 80 positions: ETMF and ECLMF there equal the same computation on
    the anchors whose pair exists (every anchor is in layer 0 and 1)."""
    model = deci(torch.float64)
    ids = tokens(1, 80, seed=5)
    cap = capture(model, ids)
    anchors = torch.arange(80)
    present_3 = (~torch.isnan(cap[3]).any(-1))[0]  # (80,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = etmf_per_anchor(cap, anchors, torch.tensor([0, 1]), [1, 3], alpha=1e-3)
        frame = etmf_frame(result, n_boot=0)
    at_zero = frame[(frame.distance == 0) & (frame.metric == "etmf")].set_index("layer").n
    assert at_zero.to_dict() == {1: 80, 3: int(present_3.sum())}
    assert torch.equal(torch.isnan(result.score[1, 0]), ~present_3)
    ec = eclmf(cap, anchors, pairs=[(1, 3)], n_boot=0, alpha=1e-3)
    assert set(ec.n) == {int(present_3.sum())}
