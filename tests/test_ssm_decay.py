"""ssm_decay against independent oracles: the scan's Jacobian and explicit per-step products,
computed from the scan inputs the models really used (recorded by patching the scan call)."""

import math

import pandas as pd
import pytest
import torch

import fidelity.models.mamba as mamba_module
import fidelity.models.mamba2 as mamba2_module
from fidelity.kernels.reference import selective_scan_ref
from fidelity.metrics.ssm_decay import collect_ssm_decay
from fidelity.models.decimamba import DeciMambaLM
from fidelity.models.mamba import MambaConfig, MambaLM
from fidelity.models.registry import build_model
from fidelity.probes.capture import capture
from fidelity.schema import TIDY_COLUMNS

LENGTH = 48
DISTANCES = torch.tensor([0, 1, 2, 3, 5, 8, 13, 21, 34])
# float64 throughout: the collector and the oracles compute the same numbers in different
# orders (cumulative sums versus step-by-step products / backpropagation), so they agree to
# rounding; 1e-10 relative leaves a wide margin above float64 rounding at these lengths.
RTOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")


def _anchors(length=LENGTH, count=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=g)[:count].sort().values


def _ids(batch=2, length=LENGTH, vocab=256, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _measure(model, ids, anchors, distances=DISTANCES, layers=None, chunk_size=None):
    with collect_ssm_decay(model, anchors, distances, ids.shape[1], layers) as collector:
        capture(model, ids, layers=[0], positions=[0], chunk_size=chunk_size)
    return collector


@pytest.fixture
def recorded_mamba_scans(monkeypatch):
    """Every Mamba-1 mixer scan call's inputs, in call order (block 0, block 1, ...)."""
    calls = []
    original = mamba_module.selective_scan

    def recording(u, delta, A, B, C, D=None, z=None, delta_bias=None, *args, **kwargs):
        calls.append(
            {
                "u": u.detach().clone(),
                "delta": delta.detach().clone(),
                "A": A.detach().clone(),
                "B": B.detach().clone(),
                "C": C.detach().clone(),
                "delta_bias": delta_bias.detach().clone(),
            }
        )
        return original(u, delta, A, B, C, D, z, delta_bias, *args, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", recording)
    return calls


def _jacobian_weights(call) -> torch.Tensor:
    """``w[b, t, s] = mean_c |d y_t[c] / d u_s[c]|`` of the reference scan without skip and
    gate, `(batch, length, length)`: the definition's kernel, by backpropagation."""
    u = call["u"].clone().requires_grad_(True)
    y = selective_scan_ref(
        u,
        call["delta"],
        call["A"],
        call["B"],
        call["C"],
        delta_bias=call["delta_bias"],
        delta_softplus=True,
    )  # (batch, d_inner, length); y[b, c, t] depends on u[b, c, :] only
    rows = []
    for t in range(u.shape[-1]):
        (grad,) = torch.autograd.grad(y[:, :, t].sum(), u, retain_graph=True)  # (b, c, s)
        rows.append(grad.abs().mean(dim=1))
    return torch.stack(rows, dim=1)


def _product_weights(call, anchors, distances) -> torch.Tensor:
    """The kernel from explicit step-by-step products of ``exp(delta'_r A)``, averaged over
    the batch: `(n_dist, n_anchors)`, NaN outside the sequence."""
    step = torch.nn.functional.softplus(call["delta"] + call["delta_bias"][:, None])  # (b, c, L)
    A, B, C = call["A"], call["B"], call["C"]  # (c, n), (b, n, L), (b, n, L)
    length = step.shape[-1]
    out = torch.full((len(distances), len(anchors)), math.nan, dtype=torch.float64)
    for i, s in enumerate(anchors.tolist()):
        product = torch.ones(step.shape[0], *A.shape, dtype=torch.float64)  # (b, c, n)
        reached = {s: product.clone()}
        for r in range(s + 1, length):
            product = product * torch.exp(step[:, :, r, None] * A)
            reached[r] = product.clone()
        for j, d in enumerate(distances.tolist()):
            if s + d < length:
                t = s + d
                kernel = (C[:, None, :, t] * reached[t] * B[:, None, :, s]).sum(-1)  # (b, c)
                out[j, i] = (kernel * step[:, :, s]).abs().mean(dim=1).mean()
    return out


def _oracle_from_jacobian(weights, anchors, distances):
    """`(n_dist, n_anchors)` from ``w[b, t, s]`` averaged over the batch."""
    mean = weights.mean(dim=0)  # (t, s)
    out = torch.full((len(distances), len(anchors)), math.nan, dtype=torch.float64)
    for j, d in enumerate(distances.tolist()):
        for i, s in enumerate(anchors.tolist()):
            if s + d < mean.shape[0]:
                out[j, i] = mean[s + d, s]
    return out


@pytest.mark.parametrize(
    ("dtype", "batch", "length", "rtol"),
    [
        (torch.float64, 2, LENGTH, RTOL),
        # float32 models: the collector evaluates the pair kernels in float32 (the running
        # sums stay float64) while the oracle backpropagates in float64 from the recorded
        # inputs; the exponentials and the sum over states then differ by ~1e-6 relative
        (torch.float32, 1, 37, 1e-5),
        (torch.float32, 3, LENGTH, 1e-5),
    ],
)
def test_mamba_matches_the_scan_jacobian(recorded_mamba_scans, dtype, batch, length, rtol):
    model = build_model("mamba", "tiny").to(dtype).eval()
    anchors = _anchors(length=length)
    collector = _measure(model, _ids(batch=batch, length=length), anchors)
    measured = collector.per_anchor()
    assert sorted(measured) == [1, 2]
    for block, call in enumerate(recorded_mamba_scans):
        call = {key: value.double() for key, value in call.items()}
        expected = _oracle_from_jacobian(_jacobian_weights(call), anchors, DISTANCES)
        torch.testing.assert_close(measured[block + 1], expected, rtol=rtol, atol=0, equal_nan=True)
    # distance 0 is the direct path delta'_t C_t . B_t: strictly positive here
    assert bool((measured[1][0] > 0).all())


@pytest.mark.parametrize("chunk_size", [None, 7, 16])
def test_memmamba_matches_products_in_one_pass_or_chunks(recorded_mamba_scans, chunk_size):
    model = build_model("memmamba", "tiny").double().eval()
    ids = _ids(seed=3)
    anchors = _anchors(seed=4)
    collector = _measure(model, ids, anchors, chunk_size=chunk_size)
    recorded_mamba_scans.clear()
    with torch.no_grad():
        model(ids)  # one pass, recording the real scan inputs of every block
    for block, call in enumerate(recorded_mamba_scans):
        expected = _product_weights(call, anchors, DISTANCES)
        torch.testing.assert_close(
            collector.per_anchor()[block + 1], expected, rtol=RTOL, atol=0, equal_nan=True
        )


def test_mamba2_with_groups_matches_the_ssd_jacobian(monkeypatch):
    calls = []
    original = mamba2_module.ssd_scan_chunked

    def recording(x, dt, A, B, C, *args, **kwargs):
        calls.append([t.detach().clone() for t in (x, dt, A, B, C)])
        return original(x, dt, A, B, C, *args, **kwargs)

    monkeypatch.setattr(mamba2_module, "ssd_scan_chunked", recording)
    model = build_model("mamba2", "tiny", ngroups=2).double().eval()
    assert model.config.nheads == 4
    anchors = _anchors(seed=5)
    collector = _measure(model, _ids(seed=6), anchors, chunk_size=20)
    calls.clear()
    with torch.no_grad():
        model(_ids(seed=6))
    for block, (x, dt, A, B, C) in enumerate(calls):
        x = x.clone().requires_grad_(True)
        y = mamba2_module.ssd_scan_ref(x, dt, A, B, C)  # (batch, length, nheads, headdim)
        rows = []
        for t in range(x.shape[1]):
            (grad,) = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
            rows.append(grad.abs().mean(dim=(2, 3)))  # (batch, s): mean over all channels
        expected = _oracle_from_jacobian(torch.stack(rows, dim=1), anchors, DISTANCES)
        torch.testing.assert_close(
            collector.per_anchor()[block + 1], expected, rtol=RTOL, atol=0, equal_nan=True
        )


def test_hugging_face_mamba_equals_ours_with_the_same_weights():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.MambaConfig(
        vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4
    )
    hf = transformers.MambaForCausalLM(hf_config).eval()
    ours = MambaLM(MambaConfig(d_model=16, n_layer=2, d_state=4, vocab_size=64, dt_rank=1)).eval()
    renamed = {
        key.removeprefix("backbone.").replace("embeddings.", "embedding."): value
        for key, value in hf.state_dict().items()
    }
    missing, unexpected = ours.load_state_dict(renamed, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    ids, anchors = _ids(vocab=64, seed=7), _anchors(seed=8)
    expected = _measure(ours, ids, anchors).per_anchor()
    measured = _measure(hf, ids, anchors).per_anchor()
    assert sorted(measured) == [1, 2]
    for layer in (1, 2):
        # float32 models: the two implementations round the projections differently
        torch.testing.assert_close(
            measured[layer], expected[layer], rtol=1e-4, atol=1e-7, equal_nan=True
        )


def test_decimamba_measured_when_nothing_is_dropped_and_skipped_after_a_drop():
    mamba = build_model("mamba", "tiny").double().eval()
    deci = DeciMambaLM.from_mamba(mamba, decimation_base_length=16, decimation_min_length=4)
    short, anchors = _ids(length=12, seed=9), torch.tensor([0, 3, 7, 11])
    reference = _measure(mamba, short, anchors).per_anchor()
    measured = _measure(deci, short, anchors)
    assert not measured.notes
    for layer in (1, 2):
        torch.testing.assert_close(
            measured.per_anchor()[layer], reference[layer], rtol=RTOL, atol=0, equal_nan=True
        )
    long, anchors = _ids(seed=10), _anchors(seed=11)
    with pytest.warns(UserWarning, match="skipped layers 2 and above"):
        dropped = _measure(deci, long, anchors)
    assert len(dropped.notes) == 1
    assert sorted(dropped.per_anchor()) == [1]  # block 0 saw every row; block 1 decimated
    torch.testing.assert_close(
        dropped.per_anchor()[1],
        _measure(mamba, long, anchors).per_anchor()[1],
        rtol=RTOL,
        atol=0,
        equal_nan=True,
    )
    assert set(dropped.frame(n_boot=0)["layer"]) == {1}


def test_memory_does_not_grow_with_the_length():
    model = build_model("mamba", "tiny").double().eval()
    anchors = _anchors(count=12)
    sizes = []
    for length in (96, 960):  # neither equals a model dimension
        collector = _measure(model, _ids(length=length, seed=12), anchors, chunk_size=128)
        kept = [t for state in collector.layers.values() for t in state.kept_tensors()]
        assert all(length not in t.shape for t in kept)
        sizes.append(collector.kept_bytes())
    assert sizes[0] == sizes[1]
    d_inner, d_state, batch, n_dist = 64, 8, 2, len(DISTANCES)
    per_layer = 8 * batch * (d_inner + 12 * (2 * d_inner + d_state) + 12 * n_dist)
    # (cumulative, anchors' S, delta', B, results); our mixer's hooks read its own scan inputs,
    # so no convolution prefix is kept
    assert sizes[0] == 2 * per_layer


def test_frame_has_the_tidy_columns_and_bootstrap_intervals():
    model = build_model("mamba", "tiny").double().eval()
    anchors = _anchors(count=24)
    collector = _measure(model, _ids(), anchors)
    frame = collector.frame(n_boot=100, seed=0)
    assert list(frame.columns) == list(TIDY_COLUMNS)
    assert set(frame["metric"]) == {"ssm_decay"}
    assert (frame["layer"] == frame["source_layer"]).all()
    per_anchor = collector.per_anchor()
    for row in frame.itertuples():
        j = DISTANCES.tolist().index(row.distance)
        valid = int((anchors + row.distance < LENGTH).sum())
        assert row.n == 2 * valid
        assert row.value == pytest.approx(float(per_anchor[row.layer][j, :valid].mean()))
        assert row.ci_low <= row.value <= row.ci_high
    # frames are reproducible for a seed
    pd.testing.assert_frame_equal(frame, collector.frame(n_boot=100, seed=0))


def _enter(*args):
    with collect_ssm_decay(*args):
        pass


def test_non_mamba_models_and_bad_arguments_are_refused():
    transformer = build_model("transformer", "tiny")
    anchors = _anchors()
    with pytest.raises(TypeError, match="not a Mamba-family model"):
        _enter(transformer, anchors, DISTANCES, LENGTH, [1, 2])
    model = build_model("mamba", "tiny")
    with pytest.raises(ValueError, match="sorted and unique"):
        _enter(model, anchors.flip(0), DISTANCES, LENGTH)
    with pytest.raises(ValueError, match="anchors must lie in"):
        _enter(model, anchors, DISTANCES, 10)
    with pytest.raises(ValueError, match="distances must lie in"):
        _enter(model, anchors, torch.tensor([-1, 2]), LENGTH)
    with pytest.raises(ValueError, match="out of range"):
        _enter(model, anchors, DISTANCES, LENGTH, [3])
    with collect_ssm_decay(model, anchors, DISTANCES, LENGTH) as collector, torch.no_grad():
        model(_ids(length=20))
    with pytest.raises(ValueError, match="saw 20 tokens"):
        collector.frame()
