"""adassl_fast/indices.py: the core's index vectors, made once per size and device."""

import torch

from adassl_fast._checks import scale_tensor
from adassl_fast.indices import diagonal_indices, partner_indices


def test_index_vectors_are_made_once_per_size_and_device():
    pos, excl = partner_indices(6, "cpu")
    assert pos.tolist() == [0, 1, 2, 3, 4, 5] and excl.tolist() == [3, 4, 5, 0, 1, 2]
    assert partner_indices(6, torch.device("cpu"))[1] is excl  # cached: no kernels the next step
    assert partner_indices(8, "cpu")[1].tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    pos, excl = diagonal_indices(3, "cpu")
    assert pos.tolist() == [0, 1, 2] and excl.tolist() == [-1, -1, -1]
    like = torch.zeros(2, 2, dtype=torch.bfloat16)
    one = scale_tensor(None, like)
    assert one.item() == 1.0 and one.dtype == torch.float32 and scale_tensor(None, like) is one
    assert scale_tensor(2.5, like).item() == 2.5 and scale_tensor(2.5, like.double()).dtype == torch.float64
