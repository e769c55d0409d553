"""adassl_fast/core.py: the nt_xent core op's registration (its numerics are tested through every loss)."""

import pytest
import torch

from adassl_fast.core import nt_xent_forward_backward_op
from adassl_fast.indices import partner_indices


def test_one_pass_op_refuses_other_backends():
    cont, targ = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    pos, excl = partner_indices(6, "cpu")
    with pytest.raises(ValueError, match="torch backend"):
        nt_xent_forward_backward_op(cont, targ, pos, excl, torch.tensor(1.0, dtype=torch.float64), 10.0, 20.0,
                                    "triton", True, True)
