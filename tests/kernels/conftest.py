"""Kernel tests create their tensors on the default device: the GPU where there is one (real Triton
code generation), else the CPU, where tests/conftest.py has switched on the Triton interpreter."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _kernel_device():
    if torch.cuda.is_available():
        with torch.device("cuda"):
            yield
    else:
        yield
