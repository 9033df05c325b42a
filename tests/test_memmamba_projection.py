"""MemMamba's memory norm and the linear maps that read it, with gradients in one
:class:`_NormProjection` (by blocks of rows, one matmul, one gradient of the norm's input),
against the norm followed by each map, in float64 on fresh random inputs, gradients included."""

import pytest
import torch

from fidelity.models import memmamba as memmamba_module
from fidelity.models.base import RMSNorm
from fidelity.models.memmamba import MemMambaBlock, _NormProjection
from fidelity.models.registry import build_model

EXACT = {"rtol": 1e-12, "atol": 1e-12}


@pytest.mark.parametrize("n_rows", [1, 7, 40])
def test_norm_projection_equals_the_norm_then_the_maps(monkeypatch, n_rows):
    """Several row blocks (NORM_ROWS 3), one, and a partial last block; gradcheck too."""
    monkeypatch.setattr(memmamba_module, "NORM_ROWS", 3)
    generator = torch.Generator().manual_seed(n_rows)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    h, norm_weight, weight, bias = tensor(n_rows, 6), tensor(6), tensor(5, 6), tensor(5)
    norm = RMSNorm(6, eps=1e-5).double()
    grad = torch.randn(n_rows, 5, generator=generator, dtype=torch.float64)
    inputs = (h, norm_weight, weight, bias)
    projection, normed = _NormProjection.apply(h, norm_weight, weight, bias, 1e-5)
    got = torch.autograd.grad(projection, inputs, grad)
    with torch.no_grad():
        norm.weight.copy_(norm_weight)  # the module's forward, with the same weight
    want_normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight
    want_projection = torch.nn.functional.linear(want_normed, weight, bias)
    want = torch.autograd.grad(want_projection, inputs, grad)
    torch.testing.assert_close(normed, norm(h).detach(), **EXACT)
    torch.testing.assert_close(projection, want_projection, **EXACT)
    for got_grad, want_grad in zip(got, want, strict=True):
        torch.testing.assert_close(got_grad, want_grad, **EXACT)
    assert not normed.requires_grad  # read only: its gradient-carrying uses are the maps
    assert torch.autograd.gradcheck(lambda *args: _NormProjection.apply(*args, 1e-5)[0], inputs)


def plain_memory_inputs(block: MemMambaBlock, h: torch.Tensor):
    """The form the fused path replaces: the norm module, each map in its own module."""
    return block.memory_norm(h), None


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_note_block": False}, {"use_cross_token": False}, {"fusion": "gated"}],
)
def test_training_forward_and_gradients_equal_the_plain_norm_and_maps(monkeypatch, overrides):
    """A tiny MemMamba (pools overflow, cross-layer attention in layers 1 and 3), training
    mode: logits, write-rate loss and every parameter's gradient, fused against plain."""
    monkeypatch.setattr(memmamba_module, "NORM_ROWS", 16)  # several blocks per chunk
    settings = {"pool_size": 4, "block_size": 32, "note_window": 3, "cross_layer_every": 2}
    model = build_model("memmamba", "tiny", seed=0, n_layer=4, **settings, **overrides)
    model = model.double().train()
    with torch.no_grad():
        for layer in model.layers:  # about half the positions write notes and fire
            layer.note_block.scorer.bias.fill_(0.0)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 75), generator=torch.Generator().manual_seed(9)
    )
    results = []
    for plain in (False, True):
        if plain:
            monkeypatch.setattr(MemMambaBlock, "_memory_inputs", plain_memory_inputs)
        model.zero_grad(set_to_none=True)
        output = model(ids)
        loss = torch.nn.functional.cross_entropy(
            output.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
        )
        if output.aux_loss is not None:
            loss = loss + output.aux_loss
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        results.append([output.logits, output.aux_loss, *grads])
    for got, want in zip(*results, strict=True):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
