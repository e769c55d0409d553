"""adassl_fast.compat against its peers in float64: OpenCLIP's ClipLoss and SigLipLoss, lightly's NTXentLoss.

Each peer's function is written here from its documentation and source conventions (cited per test; their
code is not copied), values and every gradient (features, logit_scale, logit_bias). Where OpenCLIP's wheel is
on this machine, its loss.py is also loaded by file path (it is not a dependency) for a direct comparison,
single-process and on 2 gloo ranks.
"""

import importlib.util
import itertools
import os
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from adassl_fast import compat
from tests.test_distributed import _init

IMPLS = ["reference", "torch"]
WHEELS = Path(os.environ.get("ADASSL_FAST_PEER_WHEELS", "/opt/pypi/files"))


def _open_clip_loss_source() -> str | None:
    """open_clip/loss.py's text from an installed open_clip or its wheel, else None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin:
        return (Path(spec.origin).parent / "loss.py").read_text()
    wheels = sorted(WHEELS.glob("open_clip_torch-*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[-1]) as z:
        return z.read("open_clip/loss.py").decode()


def _load_open_clip(source: str, where: Path):
    where.mkdir(parents=True, exist_ok=True)
    path = where / "open_clip_loss.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OPEN_CLIP = _open_clip_loss_source()
needs_open_clip = pytest.mark.skipif(OPEN_CLIP is None, reason="open_clip (or its wheel) is not on this machine")


def _leaves(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    text = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    scale = torch.tensor(2.7, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.3, dtype=torch.float64, requires_grad=True)
    return image, text, scale, bias


def _grads(loss, leaves):
    return [torch.zeros_like(t) if g is None else g
            for t, g in zip(leaves, torch.autograd.grad(loss, leaves, allow_unused=True), strict=True)]


def _assert_same(got, want, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(got[0].detach(), want[0].detach(), rtol=rtol, atol=atol)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------
# OpenCLIP ClipLoss. Convention (open_clip/loss.py, ClipLoss.get_logits / forward; README "logit_scale" is the
# exponentiated learnable temperature): logits_per_image = logit_scale * I T^T (+ logit_bias),
# logits_per_text = logit_scale * T I^T (+ logit_bias), labels = arange(N), loss = (CE + CE) / 2, features as
# given (the model normalised them).


def clip_formula(image, text, scale, bias=None):
    per_image = scale * image @ text.t()
    per_text = scale * text @ image.t()
    if bias is not None:
        per_image, per_text = per_image + bias, per_text + bias
    labels = torch.arange(len(image))
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_matches_open_clip_formula(impl, with_bias):
    leaves = _leaves(13, 37, 0)
    image, text, scale, bias = leaves
    args = (image, text, scale, bias if with_bias else None)
    want = clip_formula(*args)
    got = compat.ClipLoss(impl=impl)(*args)
    _assert_same((got, _grads(got, leaves)), (want, _grads(want, leaves)))
    out = compat.ClipLoss(impl=impl)(*args, output_dict=True)
    assert set(out) == {"contrastive_loss"} and torch.equal(out["contrastive_loss"], got)


# ----------------------------------------------------------------------------------------------------
# OpenCLIP SigLipLoss. Convention (open_clip/loss.py SigLipLoss._loss; Zhai et al. 2023 eq. 1): logits =
# logit_scale * I T^T + logit_bias, labels 2 I - 1, loss = -sum log sigmoid(labels * logits) / N_image.


def siglip_formula(image, text, scale, bias):
    logits = scale * image @ text.t() + (0.0 if bias is None else bias)
    labels = 2 * torch.eye(len(image), dtype=image.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_siglip_loss_matches_open_clip_formula(impl, with_bias):
    leaves = _leaves(11, 29, 1)
    image, text, scale, bias = leaves
    args = (image, text, scale, bias if with_bias else None)
    want = siglip_formula(*args)
    got = compat.SigLipLoss(impl=impl)(*args)
    _assert_same((got, _grads(got, leaves)), (want, _grads(want, leaves)))
    assert set(compat.SigLipLoss(impl=impl)(*args, output_dict=True)) == {"contrastive_loss"}


@needs_open_clip
@pytest.mark.parametrize("impl", IMPLS)
def test_direct_parity_with_open_clip(impl, tmp_path):
    oc = _load_open_clip(OPEN_CLIP, tmp_path)
    worst = {}
    for name, ours, theirs in (("ClipLoss", compat.ClipLoss(impl=impl), oc.ClipLoss()),
                               ("SigLipLoss", compat.SigLipLoss(impl=impl), oc.SigLipLoss())):
        leaves = _leaves(17, 40, 2)
        got, want = ours(*leaves), theirs(*leaves)
        _assert_same((got, _grads(got, leaves)), (want, _grads(want, leaves)))
        worst[name] = max((got - want).abs().item(), *((g - w).abs().max().item() for g, w in zip(
            _grads(ours(*leaves), leaves), _grads(theirs(*leaves), leaves), strict=True)))
    print("worst float64 error vs open_clip", impl, worst)


def test_open_clip_argument_errors():
    with pytest.raises(ValueError, match="horovod"):
        compat.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        compat.SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank"):
        compat.ClipLoss(rank=2, world_size=2)
    with pytest.raises(RuntimeError, match="not initialised"):
        compat.ClipLoss(rank=0, world_size=2)(*_leaves(4, 3, 0)[:3])


# ----------------------------------------------------------------------------------------------------
# lightly NTXentLoss (lightly/loss/ntx_ent_loss.py, docs "lightly.loss.NTXentLoss"): out0, out1 normalised;
# without a memory bank the logits are [out0 out1^T, out0 out0^T without its diagonal] for the out0 rows and
# [out1 out0^T, out1 out1^T without its diagonal] for the out1 rows, / temperature, labels arange(B) twice.
# With a memory bank (MoCo, lightly/models/modules/memory_bank.py): logits [<out0_i, out1_i>, out0_i bank^T] /
# temperature, label 0; the bank is read before the update, and updated with out1 (detached) only when out0
# requires grad, FIFO from bank_ptr, a batch that reaches the end filling it and dropping the rest.


def lightly_formula(out0, out1, temperature, bank=None):
    z0, z1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    if bank is not None:
        logits = torch.cat([(z0 * z1).sum(1, keepdim=True), z0 @ bank.t()], 1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(z0), dtype=torch.long))
    b = len(z0)
    off = ~torch.eye(b, dtype=torch.bool)
    rows0 = torch.cat([z0 @ z1.t(), (z0 @ z0.t())[off].view(b, b - 1)], 1)
    rows1 = torch.cat([z1 @ z0.t(), (z1 @ z1.t())[off].view(b, b - 1)], 1)
    return F.cross_entropy(torch.cat([rows0, rows1]) / temperature, torch.arange(b).repeat(2))


@pytest.mark.parametrize("impl", IMPLS)
def test_lightly_ntxent_without_bank(impl):
    out0, out1, *_ = _leaves(9, 21, 3)
    want = lightly_formula(out0, out1, 0.2)
    got = compat.NTXentLoss(temperature=0.2, impl=impl)(out0, out1)
    _assert_same((got, _grads(got, [out0, out1])), (want, _grads(want, [out0, out1])))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [10, (10, 21), (10,)])
def test_lightly_memory_bank_over_several_steps(impl, size):
    torch.manual_seed(4)
    loss_fn = compat.NTXentLoss(temperature=0.3, memory_bank_size=size, impl=impl).double()
    assert loss_fn.bank.shape == ((10, 21) if size == (10, 21) else (10,))  # else allocated on the first batch
    bank, ptr = None, 0
    for step in range(6):
        out0, out1, *_ = _leaves(4, 21, 10 + step)
        train = step not in (0, 3)  # no gradient: no update (lightly: update=out0.requires_grad)
        if not train:
            out0, out1 = out0.detach(), out1.detach()
        got = loss_fn(out0, out1)
        if bank is None:  # after a call without update: the initial bank, random rows normalised
            bank = loss_fn.bank.clone()
            assert bank.shape == (10, 21)
            torch.testing.assert_close(bank.norm(dim=1), torch.ones(10, dtype=torch.float64))
        want = lightly_formula(out0, out1, 0.3, bank)  # the bank as it was before this call's update
        if train:
            _assert_same((got, _grads(got, [out0, out1])), (want, _grads(want, [out0, out1])))
            z1 = F.normalize(out1.detach(), dim=1)
            bank = bank.clone()
            if ptr + 4 >= 10:  # steps 1, 2 fill rows 0-7; step 4 writes 8, 9 and drops the rest; step 5 0-3
                bank[ptr:] = z1[: 10 - ptr]
                ptr = 0
            else:
                bank[ptr : ptr + 4] = z1
                ptr += 4
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss_fn.bank, bank, rtol=0, atol=0)
        assert int(loss_fn.bank_ptr) == ptr
        assert not loss_fn.bank.requires_grad


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_lightly_memory_bank_on_fp32_backends(impl):
    """MoCo's loss through the core op on each CPU backend (fp32; Triton in its interpreter) against float64."""
    torch.manual_seed(6)
    loss_fn = compat.NTXentLoss(temperature=0.2, memory_bank_size=(37, 19), impl=impl)
    bank = loss_fn.bank.double()
    out0, out1, *_ = _leaves(13, 19, 7)
    want = lightly_formula(out0, out1, 0.2, bank)
    got_in = [t.detach().float().requires_grad_() for t in (out0, out1)]
    got = loss_fn(*got_in)
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-4)
    for g, w in zip(_grads(got, got_in), _grads(want, [out0, out1]), strict=True):
        torch.testing.assert_close(g.double(), w, rtol=2e-3, atol=2e-4)


def test_lightly_argument_errors():
    with pytest.raises(ValueError, match="memory_bank_size"):
        compat.NTXentLoss(memory_bank_size=-1)
    with pytest.raises(ValueError, match="temperature"):
        compat.NTXentLoss(temperature=0.0)


# ----------------------------------------------------------------------------------------------------
# Distributed, 2 gloo ranks: per-rank gradients against open_clip's own classes (same worker, same inputs) and
# against lightly's per-rank semantics written out: every rank's local rows against every rank's columns,
# gathered with gradient (lightly/utils/dist.py GatherLayer: the gradients of the gathered copies summed back
# to their owner), so rank r's features get world_size x the global loss's gradient.

WORLD, N_LOCAL, D_FEAT = 2, 5, 12
CLIP_MODES = list(itertools.product([False, True], [False, True]))  # (local_loss, gather_with_grad)


def _global_leaves(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(WORLD * N_LOCAL, D_FEAT, generator=g, dtype=torch.float64) for _ in range(2)]


def _local(t, rank):
    return t[rank * N_LOCAL : (rank + 1) * N_LOCAL].clone().requires_grad_()


def _compat_worker(rank, world, store, out, open_clip_source):
    torch.set_num_threads(1)
    _init(rank, world, store)
    results = {}
    oc = _load_open_clip(open_clip_source, Path(out) / f"r{rank}") if open_clip_source else None
    image, text = _global_leaves(0)
    for mode in CLIP_MODES:
        for name in ("ClipLoss", "SigLipLoss"):
            if name == "SigLipLoss" and mode != CLIP_MODES[0]:
                continue
            for who, module in (("ours", compat), ("theirs", oc)):
                if module is None:
                    continue
                kw = dict(local_loss=mode[0], gather_with_grad=mode[1]) if name == "ClipLoss" else {}
                leaves = [_local(image, rank), _local(text, rank), torch.tensor(2.1, dtype=torch.float64,
                          requires_grad=True), torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)]
                loss = getattr(module, name)(rank=rank, world_size=world, **kw)(*leaves)
                results[(name, mode, who)] = (loss.item(), _grads(loss, leaves))
    for bank in (0, 8):
        torch.manual_seed(3)  # the same initial bank on every rank
        loss_fn = compat.NTXentLoss(temperature=0.4, memory_bank_size=(bank, D_FEAT) if bank else 0,
                                    gather_distributed=True).double()
        leaves = [_local(image, rank), _local(text, rank)]
        initial = loss_fn.bank.clone()
        loss = loss_fn(*leaves)
        results[("lightly", bank)] = (loss.item(), _grads(loss, leaves), initial, loss_fn.bank.clone())
    os.makedirs(out, exist_ok=True)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def compat_runs(tmp_path_factory):
    """Both ranks' results. Started fresh ("spawn", a few seconds of imports), not forked: a process that has run
    gloo before (tests/test_distributed.py's one-rank group) holds threads whose locks a fork can inherit held."""
    tmp = tmp_path_factory.mktemp("compat")
    store = tmp / "store"
    mp.start_processes(_compat_worker, args=(WORLD, str(store), str(tmp), OPEN_CLIP), nprocs=WORLD, join=True,
                       start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@needs_open_clip
@pytest.mark.parametrize("mode", CLIP_MODES, ids=lambda m: f"local_loss={m[0]}-gather_with_grad={m[1]}")
def test_distributed_clip_loss_gives_open_clips_gradients(compat_runs, mode):
    theirs_values = [r[("ClipLoss", mode, "theirs")][0] for r in compat_runs]
    for rank, res in enumerate(compat_runs):
        value, grads = res[("ClipLoss", mode, "ours")]
        their_value, their_grads = res[("ClipLoss", mode, "theirs")]
        for g, w in zip(grads, their_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m, r=rank: f"rank {r}: {m}")
        # the value: OpenCLIP's except (True, True), where it is the mean of OpenCLIP's per-rank local losses
        want = sum(theirs_values) / WORLD if mode == (True, True) else their_value
        assert value == pytest.approx(want, rel=1e-12)


@needs_open_clip
def test_distributed_siglip_loss_gives_open_clips_gradients(compat_runs):
    theirs_values = [r[("SigLipLoss", CLIP_MODES[0], "theirs")][0] for r in compat_runs]
    for res in compat_runs:
        value, grads = res[("SigLipLoss", CLIP_MODES[0], "ours")]
        _, their_grads = res[("SigLipLoss", CLIP_MODES[0], "theirs")]
        for g, w in zip(grads, their_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert value == pytest.approx(sum(theirs_values) / WORLD, rel=1e-12)  # the global loss


def test_distributed_lightly_without_bank(compat_runs):
    image, text = (t.requires_grad_() for t in _global_leaves(0))
    want = lightly_formula(image, text, 0.4)
    gi, gt = torch.autograd.grad(want, [image, text])
    for rank, res in enumerate(compat_runs):
        value, grads, _, _ = res[("lightly", 0)]
        assert value == pytest.approx(want.item(), rel=1e-12)  # the global loss (lightly: the local rows' loss)
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        torch.testing.assert_close(grads[0], WORLD * gi[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads[1], WORLD * gt[rows], rtol=1e-10, atol=1e-12)


def test_distributed_lightly_bank_is_local_and_enqueues_every_rank(compat_runs):
    image, text = _global_leaves(0)
    for rank, res in enumerate(compat_runs):
        value, grads, initial, after = res[("lightly", 8)]
        out0, out1 = _local(image, rank), _local(text, rank)
        want = lightly_formula(out0, out1, 0.4, initial)  # each rank's own rows against the bank, no gradient across
        assert value == pytest.approx(want.item(), rel=1e-12)
        for g, w in zip(grads, torch.autograd.grad(want, [out0, out1]), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        every = F.normalize(text, dim=1)  # both ranks' out1 in rank order, the first 8 rows of them (ptr 0 -> 0)
        torch.testing.assert_close(after, every[:8], rtol=0, atol=0)
