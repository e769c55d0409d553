"""Test configuration. Without a GPU the Triton kernels run in the interpreter, which must be switched on
before any kernel is decorated, hence before adassl_fast (or anything importing it) is imported."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh but reproducible random inputs per test: the seed comes from the test's name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
