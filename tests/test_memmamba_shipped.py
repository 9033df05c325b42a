"""The shipped MemMamba checkpoints compute what they computed when they were shipped: logits
on a fixed input against a reference saved by the code before the session-27 speed changes
(fused projections, the output projection inside the fusion, the pool membership by counts)."""

from pathlib import Path

import pytest
import torch

from fidelity.models.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCE = Path(__file__).parent / "data" / "memmamba_shipped_logits.pt"
NAMES = ("memmamba", "memmamba-induction")
LENGTH = 2048  # four query segments of 512; the mini pool of 50 overflows
POSITIONS = torch.arange(0, LENGTH, 32)


def shipped_input(vocab_size: int) -> torch.Tensor:
    """`(1, LENGTH)` token ids from a fixed linear congruential sequence (the same on every
    machine and torch version)."""
    state, ids = 12345, []
    for _ in range(LENGTH):
        state = (1103515245 * state + 12345) % 2**31
        ids.append((state >> 16) % vocab_size)
    return torch.tensor([ids])


@pytest.mark.parametrize("name", NAMES)
def test_shipped_logits_are_unchanged(name):
    reference = torch.load(REFERENCE, weights_only=True)[name]
    model = load_model(name)
    with torch.no_grad():
        logits = model(shipped_input(model.config.vocab_size)).logits[0, POSITIONS]
    # float32 noise: the same arithmetic in another order (one matmul for several projections)
    scale = reference.abs().max()
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5 * float(scale))
