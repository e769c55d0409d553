"""Host-side launch helpers of the Triton kernels (kernels/launch.py)."""

import torch

from adassl_fast.kernels import adassl as kad
from adassl_fast.kernels import info_nce as kin
from adassl_fast.kernels import launch
from adassl_fast.kernels import nt_xent as ntx


def test_entry_points_run_on_their_inputs_device(monkeypatch):
    # Triton launches on the current device: inputs on another GPU must switch to theirs (no second GPU here,
    # so the switch is recorded rather than made)
    entered = []

    class Switch:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class OnGpu1:  # what the wrapper reads of a tensor on cuda:1
        is_cuda, device = True, torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", Switch)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    launcher = launch.on_input_device(lambda first, *args, **kwargs: (first, args, kwargs))
    assert launcher(OnGpu1, 2, k=3) == (OnGpu1, (2,), {"k": 3}) and entered == [torch.device("cuda", 1)]
    entered.clear()
    OnGpu1.device = torch.device("cuda", 0)  # already current: no switch
    launcher(OnGpu1)
    launcher(torch.zeros(1, device="cpu"))  # the interpreter's CPU tensors
    assert entered == []
    for entry in (ntx.nt_xent_forward, ntx.nt_xent_backward, kin.info_nce_forward, kin.info_nce_backward,
                  kad.adassl_forward, kad.adassl_backward):
        assert entry.__wrapped__, entry  # every Triton entry point goes through the wrapper
