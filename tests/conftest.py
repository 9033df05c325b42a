"""Test-wide settings: Triton's interpreter for the CPU-only suite, deterministic seeds, and
derandomized property tests in CI.

``TRITON_INTERPRET=1`` must be set before anything imports Triton: Triton decides between
interpreter and compiler when a function is decorated, and its own standard library
(``tl.sum`` and friends) is decorated on first import, which other libraries (transformers,
torch's compiler) may trigger early. The Triton kernels are then tested on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import settings

# CI runs the property tests on a fixed sequence of examples (set CI=1, as .ci/run does): a
# failure there is reproducible and never depends on the draw. Locally they explore freely.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    its models are tiny, and more threads only add scheduling noise on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
