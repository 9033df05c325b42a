"""Test-wide settings: Triton's interpreter for the CPU-only suite, and deterministic seeds.

``TRITON_INTERPRET=1`` must be set before anything imports Triton: Triton decides between
interpreter and compiler when a function is decorated, and its own standard library
(``tl.sum`` and friends) is decorated on first import, which other libraries (transformers,
torch's compiler) may trigger early. The Triton kernels are then tested on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
