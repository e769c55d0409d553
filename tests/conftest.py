"""Test configuration. Without a GPU the Triton kernels run in the interpreter, which must be switched on
before any kernel is decorated, hence before adassl_fast (or anything importing it) is imported."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

UNSHIPPED_CONFIG = "no vetted Triton config"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh but reproducible random inputs per test: the seed comes from the test's name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _triton_tests_on_the_gpu(request):
    """Triton tests create their tensors on the default device: the GPU where there is one (real code
    generation), else the CPU, where the interpreter runs them."""
    if torch.cuda.is_available() and request.node.get_closest_marker("triton"):
        with torch.device("cuda"):
            yield
    else:
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """On a GPU, a Triton test whose dtype / width has no shipped GPU configuration (float64 and float32
    run only in the interpreter) is reported as skipped with that reason, not as a failure."""
    outcome = yield
    exc = outcome.excinfo
    if exc is not None and torch.cuda.is_available() and UNSHIPPED_CONFIG in str(exc[1]):
        outcome.force_exception(pytest.skip.Exception(f"GPU: {exc[1]}", _use_item_location=True))
