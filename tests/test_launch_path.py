"""The launchers' own launches, compiled through Triton's JIT for sm_90, sm_80 and sm_86 without a GPU.

tests/test_cross_compile.py compiles every shipped configuration from signatures written out by hand; this runs
what the public ops really launch. nt_xent, symmetric info_nce and both AdaSSL variants run forward + backward
on CPU tensors with Triton's driver stood in (one device per GPU class, a launch that does nothing): each launch
goes through Triton's argument binding, specialisation (integer arguments equal to 1 or divisible by 16, 16-byte
aligned pointers) and compilation exactly as on such a GPU. The hand-written signatures never produce two of
these specialisations: split counts of 1 (M = 65536) and widths that are not multiples of 16 (d = 100, 300),
where the caller's rows are not 16-byte aligned. Asserts: every step runs, and every kernel it compiled fits
its class's shared memory without spilling.

The stand-in replaces two pieces of Triton's runtime (`driver.set_active`, `CompiledKernel._init_handles`; read
in triton 3.7.1, the version CI pins); the worker runs in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from adassl_fast.kernels.configs import SMEM_BUDGET
from tests.compiled import resource_usage, run_worker

# (GPU class, op, M, d, deterministic): odd M with column splits, M = 65536 with one split, d = 100 and 300
# (not multiples of 16; BLOCK_D 128 and 512); bf16, one fp16 case ("nt_xent_f16") and fp32 inputs ("*_f32": fp32
# rows into the normalising and finishing kernels, fp16 operands in the matrix kernels, which must use wgmma on
# sm_90). sm_80 and sm_86 compile what differs from sm_90 the most: the finishing kernel's unaligned rows, and
# the 99 KB class's d = 512 shapes.
CASES = [("sm90", "nt_xent", 1030, 96, True), ("sm90", "nt_xent", 1030, 100, False),
         ("sm90", "nt_xent_f16", 1030, 100, True),
         ("sm90", "nt_xent", 65536, 128, True), ("sm90", "nt_xent", 1030, 300, True),
         ("sm90", "info_nce", 1030, 100, True), ("sm90", "info_nce", 65536, 128, True),
         ("sm90", "adassl_v", 1030, 100, True), ("sm90", "adassl_s", 1030, 300, True),
         ("sm80", "nt_xent", 1030, 100, True), ("sm80", "adassl_v", 1030, 300, True),
         ("sm86", "nt_xent", 1030, 300, True), ("sm86", "adassl_v", 1030, 100, True),
         ("sm90", "nt_xent_f32", 1030, 100, True), ("sm90", "adassl_s_f32", 1030, 300, False),
         ("sm80", "info_nce_f32", 1030, 300, True), ("sm86", "nt_xent_f32", 1030, 300, False),
         # SigLIP (SIGMOID logits) and label-defined positives (LABELS: "labels" one-directional, "supcon" symmetric)
         ("sm90", "siglip", 1030, 100, True), ("sm90", "siglip_f32", 1030, 300, False),
         ("sm86", "siglip", 1030, 300, True),
         ("sm90", "supcon", 1030, 100, False), ("sm90", "labels_f32", 1030, 128, True),
         ("sm80", "supcon_f32", 1030, 300, True),
         # normalize=False ("_given"): fp32 rows as given, bf16 operands, no normalisation backward
         ("sm90", "nt_xent_given_f32", 1030, 100, False), ("sm80", "nt_xent_given_f32", 1030, 100, True)]
DTYPES = {"_f16": "float16", "_f32": "float32"}  # op suffix -> input dtype (else bfloat16)
CLASSES = {"sm90": 90, "sm80": 80, "sm86": 86}  # -> compute capability; the stand-in's device index is the order


def _step(op: str, M: int, d: int, deterministic: bool):
    """Forward + backward of `op` through the public API on CPU tensors, bf16 (or DTYPES' for a suffix);
    nothing is computed. "nt_xent_given": the Triton backend's entry points with normalize=False."""
    import torch

    import adassl_fast
    from adassl_fast import _library
    from adassl_fast.indices import partner_indices

    dtype = getattr(torch, DTYPES.get(op[-4:], "bfloat16"))
    op = op.removesuffix(op[-4:]) if op[-4:] in DTYPES else op

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    if op == "nt_xent_given":
        entry, (pos, excl), scale = _library.backend("triton"), partner_indices(M, "cpu"), torch.tensor(1.0)
        a, b = torch.randn(M, d, dtype=dtype), torch.randn(M, d, dtype=dtype)
        _, lse = entry.nt_xent_forward(a, b, pos, excl, scale, 10.0, 20.0, normalize=False)
        entry.nt_xent_backward(torch.tensor(1.0), a, b, pos, excl, scale, lse, 10.0, 20.0, deterministic,
                               normalize=False)
        return

    if op in ("nt_xent", "info_nce"):
        a, b = leaf(M, d), leaf(M, d)
        fn = adassl_fast.nt_xent if op == "nt_xent" else adassl_fast.info_nce
        torch.autograd.grad(fn(a, b, impl="triton", deterministic=deterministic), (a, b))
        return
    if op == "siglip":  # (its backward's schedule: the deterministic one; `deterministic` picks the normalize flag)
        a, b = leaf(M, d), leaf(M, d)
        torch.autograd.grad(adassl_fast.siglip(a, b, normalize=deterministic, impl="triton"), (a, b))
        return
    if op in ("labels", "supcon"):
        a, b = leaf(M, d), leaf(M, d)
        labels = torch.randperm(M) // 4
        loss = adassl_fast.info_nce(a, b, labels=labels, symmetric=op == "supcon", impl="triton",
                                    deterministic=deterministic)
        torch.autograd.grad(loss, (a, b))
        return
    B, variant = M // 2, op[-1]
    emb, post = [leaf(B, d) for _ in range(2)], [leaf(B, 2 * d) for _ in range(2)]
    prior = [leaf(B, 2 * d) for _ in range(2)] if variant == "v" else [None, None]
    draw = torch.randn if variant == "v" else torch.rand
    noise = [draw(B, d, dtype=dtype) for _ in range(2)]
    l_ssl, l_reg = adassl_fast.adassl_nt_xent(*emb, *post, *prior, variant=variant, noise_xy=noise[0],
                                              noise_yx=noise[1], impl="triton", deterministic=deterministic)
    torch.autograd.grad(l_ssl + l_reg, [*emb, *post] + ([*prior] if variant == "v" else []))


def _worker():
    import torch
    import triton.compiler.compiler as compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    arch = ["sm90"]  # the class the current case runs on

    class StandIn:  # what Triton's launch path asks of the driver (Triton keeps a kernel cache per device)
        def get_current_device(self):
            return list(CLASSES).index(arch[0])

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", CLASSES[arch[0]], 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(StandIn())
    compiled = []

    def init_handles(self):  # instead of loading the cubin onto a device: record it; its launch does nothing
        if self.module is None:
            self.module, self.function, self._run = True, 0, lambda *args: None
            compiled.append(self)

    compiler.CompiledKernel._init_handles = init_handles

    from adassl_fast.kernels import configs

    configs.arch_of = lambda device: arch[0]  # CPU tensors stand for that GPU's
    for name in ("nt_xent", "info_nce", "adassl"):  # the ops' dispatch: "triton" on CPU tensors
        sys.modules[f"adassl_fast.{name}"].resolve_impl = lambda impl, *args: "triton"
    for name in ("info_nce", "siglip"):  # (the ops only some backends have)
        sys.modules[f"adassl_fast.{name}"].resolve_impl_among = lambda impl, *args: "triton"
    out = []
    for case in CASES:
        before = len(compiled)
        arch[0] = case[0]
        try:
            _step(*case[1:])
            error = None
        except Exception as exc:  # reported per case, the test asserts on it
            error = f"{type(exc).__name__}: {str(exc)[-1500:]}"
        kernels = []
        for k in compiled[before:]:
            usage = resource_usage(k.asm["cubin"])
            kernels.append(dict(name=k.name, shared=int(k.metadata.shared), spill=usage["stack"] + usage["local"],
                                registers=usage["registers"], wgmma="wgmma.mma_async" in k.asm["ptx"]))
        out.append(dict(case=list(case), error=error, launches_compiled=kernels))
    print(json.dumps(out))


@pytest.fixture(scope="module")
def report():
    return {tuple(r["case"]): r for r in run_worker("tests.test_launch_path")}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_public_ops_launch_through_triton_jit(report, case):
    r = report[case]
    assert r["error"] is None, r["error"]
    for k in r["launches_compiled"]:  # (a kernel an earlier case compiled is not listed again)
        assert k["spill"] == 0 and k["shared"] <= SMEM_BUDGET[case[0]], k
        if case[0] == "sm90" and k["name"] in ("_fwd_kernel", "_bwd_row_kernel", "_bwd_col_kernel"):
            assert k["wgmma"], k


@pytest.mark.slow
def test_every_case_compiled_its_own_specialisations(report):
    # each class's first case compiles a whole forward + backward; one split, each width and fp16 add their own
    for case in (CASES[0], CASES[9], CASES[11]):
        assert len(report[case]["launches_compiled"]) >= 6, case
    for case in (("sm90", "nt_xent", 65536, 128, True), ("sm90", "nt_xent", 1030, 300, True),
                 ("sm90", "nt_xent_f16", 1030, 100, True), ("sm90", "nt_xent_f32", 1030, 100, True),
                 ("sm90", "nt_xent_given_f32", 1030, 100, False)):
        assert report[case]["launches_compiled"], case


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    os.environ.pop("TRITON_INTERPRET", None)
    _worker()
