"""adassl_fast/_library.py: the dispatch table from `impl` to a backend's entry points."""

import pytest

from adassl_fast import torch_backend
from adassl_fast._library import Backend, backend


def test_the_table_gives_every_entry_point_of_the_torch_backend():
    entry_points = backend("torch")
    assert entry_points == Backend(*(getattr(torch_backend, name) for name in Backend._fields))
    assert backend("torch") is entry_points  # built once


def test_the_table_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="no kernels for impl='reference'"):
        backend("reference")
