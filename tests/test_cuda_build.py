"""CUDA C++ backend checks that need no GPU: nvcc/ptxas builds for sm_80 and sm_90a (no spills), the
binding links against the installed torch and imports, and the __host__ __device__ math helpers
(csrc/adassl_math.cuh) compiled for the host agree with float64 torch."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from adassl_fast import _cuda, _cuda_build
from adassl_fast._cuda_build import CSRC

pytestmark = pytest.mark.cuda


# ------------------------------------------------------------------------------------------------
# nvcc / ptxas
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_build():
    if _cuda_build.find_cuda_home() is None:
        pytest.fail("no CUDA toolkit found: the CUDA backend cannot be built on this machine")
    _, objs, logs = _cuda_build.compile_kernels(_cuda_build.DEFAULT_GENCODES)
    return objs, logs


@pytest.fixture(scope="module")
def kernel_logs(kernel_build):
    return kernel_build[1]


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> list[dict]:
    """[{kernel, arch, regs, stack, spill_st, spill_ld}] from an `nvcc -Xptxas -v` log."""
    rows: list[dict] = []
    cur = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = _REGS.search(line)
        if m:
            cur["regs"] = int(m.group(1))
    return rows


def _short(name: str) -> str:
    # Readable label from the mangled name: kernel name + template-argument hints.
    m = re.match(r"_ZN6adassl(\d+)", name)
    if not m:
        return name[:60]
    n = int(m.group(1))
    base = name[len(m.group(0)) : len(m.group(0)) + n]
    hints = []
    for key, lab in (("13__nv_bfloat16", "bf16"), ("6__half", "f16"), ("AdaRows", "ada"), ("8AsyncMma", "wgmma")):
        if key in name:
            hints.append(lab)
    if "IdNS" in name or "Idd" in name or name.endswith("IdEEvPKT_lS1_PS1_"):
        hints.append("f64")
    mma = re.search(r"Li(\d+)ELi([012])E", name)
    mode = re.search(r"Li([012])EEEv", name)
    if mma:
        hints.append(f"d{mma.group(1)}")
        hints.append({"0": "fwd", "1": "row", "2": "col"}[mma.group(2)])
    elif mode:
        hints.append({"0": "fwd", "1": "row", "2": "col"}[mode.group(1)])
    return f"{base}<{','.join(hints)}>"


def test_cuda_every_cu_is_built():
    assert sorted(p.name for p in CSRC.glob("*.cu")) == sorted(_cuda_build.KERNEL_SOURCES)


def test_cuda_ptxas_no_spills_sm80_sm90a(kernel_logs):
    table = []
    for src, log in kernel_logs.items():
        rows = parse_ptxas(log)
        archs = {r["arch"] for r in rows}
        assert {"sm_80", "sm_90a"} <= archs, f"{src}: ptxas report lacks an arch ({archs})"
        for r in rows:
            assert "spill_st" in r and "regs" in r, f"{src}: incomplete ptxas report for {r}"
            table.append((src, r["arch"], r["kernel"], r["regs"], r["stack"], r["spill_st"], r["spill_ld"]))
    print("\nsource       arch    regs stack spill_st spill_ld  kernel")
    for src, arch, k, regs, st, ss, sl in sorted(table, key=lambda t: (t[0], t[2], t[1])):
        print(f"{src:12s} {arch:7s} {regs:4d} {st:5d} {ss:8d} {sl:8d}  {_short(k)}  [{k[:90]}]")
    spilled = [t for t in table if t[5] or t[6]]
    assert not spilled, f"kernels spill: {spilled}"


def _cuobjdump() -> str:
    """The toolkit's cuobjdump, else the one the triton wheel ships (this machine's toolkit has none)."""
    for candidate in (Path(_cuda_build.find_cuda_home() or "/nonexistent") / "bin" / "cuobjdump",):
        if candidate.exists():
            return str(candidate)
    try:
        import triton
    except ImportError:
        pytest.fail("no cuobjdump: neither the CUDA toolkit nor triton provides one")
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def test_cuda_wgmma_only_in_the_sm90a_code(kernel_build):
    """The wgmma tile path (AsyncMma) is guarded on the kernel body: sm_90a code issues HGMMA, sm_80 code
    only HMMA (its AsyncMma bodies trap, and the launcher never picks them there)."""
    objs, _ = kernel_build
    for obj in objs:
        sass = {arch: subprocess.run([_cuobjdump(), "-sass", "-arch", arch, str(obj)], capture_output=True,
                                     text=True, check=True).stdout for arch in ("sm_90a", "sm_80")}
        print(f"\n{Path(obj).name}: " + ", ".join(f"{arch} {sass[arch].count('HGMMA')} HGMMA "
                                                   f"{sass[arch].count('HMMA')} HMMA" for arch in sass))
        assert sass["sm_90a"].count("HGMMA") > 0 and sass["sm_90a"].count("HMMA") > 0
        assert sass["sm_80"].count("HGMMA") == 0 and sass["sm_80"].count("HMMA") > 0


# ------------------------------------------------------------------------------------------------
# The binding: links against this torch (the CPU wheel here) and imports.
# ------------------------------------------------------------------------------------------------
def test_cuda_binding_builds_and_imports(monkeypatch):
    monkeypatch.setenv("ADASSL_CUDA_JIT", "1")  # the JIT path even where setup.py prebuilt the module
    mod = _cuda_build.build()
    for name in ("nt_xent_forward", "nt_xent_backward", "adassl_forward", "adassl_backward"):
        assert hasattr(mod, name)
    ok, reason = _cuda.available()
    if not torch.cuda.is_available():
        assert not ok and "torch.cuda.is_available() is False" in reason
        with pytest.raises(RuntimeError, match="is_available"):
            _cuda.nt_xent_forward(None, None, None, None, None, 1.0, None)
    info = _cuda.info()
    assert "ptxas" in info["build_log"] and info["build_dir"]
    monkeypatch.delenv(_cuda.WGMMA_ENV, raising=False)
    assert not _cuda.info()["wgmma"]  # mma.sync unless asked for
    monkeypatch.setenv(_cuda.WGMMA_ENV, "1")
    assert _cuda.info()["wgmma"]


def test_cuda_backend_refuses_a_pre_ampere_gpu_before_building(monkeypatch):
    # a T4 (Colab's default): the kernels' bf16 mma.sync and cp.async need sm_80, so nvcc would fail there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla T4")
    monkeypatch.setattr(_cuda_build, "build", lambda: pytest.fail("must not build for a GPU it cannot run on"))
    _cuda._capability_reason.cache_clear()  # probed once a process
    try:
        ok, reason = _cuda.available()
    finally:
        _cuda._capability_reason.cache_clear()
    assert not ok and reason.endswith("GPU 0 (Tesla T4) is 7.5") and "compute capability >= 8.0" in reason


def test_cuda_toolkit_discovery_through_wrapper(tmp_path, monkeypatch):
    home = _cuda_build.find_cuda_home()
    assert home is not None and Path(home, "bin", "nvcc").is_file()
    # A wrapper script on PATH and no CUDA_HOME: discovery must still find the real toolkit.
    wrapper = tmp_path / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}")
    assert _cuda_build.find_cuda_home() == home


# ------------------------------------------------------------------------------------------------
# Host-compiled device math
# ------------------------------------------------------------------------------------------------
HOST_PROGRAM = r"""
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>
#include "adassl_math.cuh"
#include "adassl_sw128.cuh"
#include <cstdlib>
using namespace adassl;
// operator>> does not parse "inf" / "-inf": read every number through strtod.
static double rd() { std::string s; std::cin >> s; return strtod(s.c_str(), nullptr); }
static int ri() { return (int)rd(); }
// Each input line: an op name and its numbers; prints one line of results (%.17g).
int main() {
  std::string op;
  while (std::cin >> op) {
    if (op == "lse") {  // ntiles, then per tile: n and n values -> merged LSE, single-pass LSE
      int nt = ri();
      LseState<double> acc = lse_empty<double>(), flat = lse_empty<double>();
      for (int t = 0; t < nt; ++t) {
        int n = ri();
        LseState<double> st = lse_empty<double>();
        for (int i = 0; i < n; ++i) { double x = rd(); st = lse_push(st, x); flat = lse_push(flat, x); }
        acc = lse_merge(acc, st);
      }
      printf("%.17g %.17g\n", lse_value(acc), lse_value(flat));
    } else if (op == "lsef") {  // same in float
      int nt = ri();
      LseState<float> acc = lse_empty<float>();
      for (int t = 0; t < nt; ++t) {
        int n = ri();
        LseState<float> st = lse_empty<float>();
        for (int i = 0; i < n; ++i) { float x = (float)rd(); st = lse_push(st, x); }
        acc = lse_merge(acc, st);
      }
      printf("%.17g\n", (double)lse_value(acc));
    } else if (op == "elem") {  // x -> softplus, softplus', log_sigmoid, l0, l0'
      double x = rd();
      printf("%.17g %.17g %.17g %.17g %.17g\n", softplus(x), softplus_grad(x), log_sigmoid(x), l0_term(x),
             l0_grad(x));
    } else if (op == "kl") {  // mu_q a_q mu_p a_p eps -> kl, 4 grads (c = 1), sample, dsample/da
      double mq = rd(), aq = rd(), mp = rd(), ap = rd(), eps = rd();
      KlGrad<double> g = gauss_kl_grad(mq, aq, mp, ap, 1.0);
      printf("%.17g %.17g %.17g %.17g %.17g %.17g %.17g\n", gauss_kl(mq, aq, mp, ap), g.mu_q, g.a_q, g.mu_p,
             g.a_p, gauss_sample(mq, aq, eps), gauss_sample_grad_a(aq, eps));
    } else if (op == "st") {  // logits u -> mask, dy/dlogits
      double l = rd(), u = rd();
      printf("%.17g %.17g\n", st_mask(l, u), st_mask_grad(l, u));
    } else if (op == "sw128") {  // base -> tile offsets (64 x 128), S descriptors (kk < 8), G descriptors (f < 2,
                                 // kk < 4); descriptors as hi lo 32-bit halves
      uint32_t base = (uint32_t)rd();
      for (int r = 0; r < kSwRows; ++r)
        for (int c = 0; c < 128; ++c) printf("%d\n", sw128_offset(r, c));
      for (int kk = 0; kk < 8; ++kk) {
        uint64_t d = s_operand_desc(base, kk);
        printf("%u %u\n", (unsigned)(d >> 32), (unsigned)(d & 0xffffffffu));
      }
      for (int f = 0; f < 2; ++f)
        for (int kk = 0; kk < 4; ++kk) {
          uint64_t d = g_operand_desc(base, f, kk);
          printf("%u %u\n", (unsigned)(d >> 32), (unsigned)(d & 0xffffffffu));
        }
    } else if (op == "clamp") {  // s c -> clamped, indicator (double and float)
      double s = rd(), c = rd();
      printf("%.17g %.17g %.17g %.17g\n", clamp_logit(s, c), clamp_pass(s, c),
             (double)clamp_logit((float)s, (float)c), (double)clamp_pass((float)s, (float)c));
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def host_math(tmp_path_factory):
    d = tmp_path_factory.mktemp("host_math")
    src = d / "host_math.cpp"
    src.write_text(HOST_PROGRAM)
    exe = d / "host_math"
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx:
        cmd = [cxx, "-O2", "-std=c++17", "-x", "c++", str(src), "-I", str(CSRC), "-o", str(exe)]
    else:  # fall back to nvcc as the host compiler driver
        cmd = [
            str(Path(_cuda_build.find_cuda_home(), "bin", "nvcc")),
            "-x",
            "cu",
            "-std=c++17",
            str(src),
            "-I",
            str(CSRC),
            "-o",
            str(exe),
        ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)

    def run(lines: list[str]) -> list[list[float]]:
        out = subprocess.run(
            [str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True
        ).stdout
        return [[float(v) for v in ln.split()] for ln in out.strip().splitlines()]

    return run


def test_cuda_host_lse_merge_across_tiles(host_math):
    g = torch.Generator().manual_seed(0)
    lines, refs, vals = [], [], []
    for trial in range(40):
        n = int(torch.randint(1, 300, (1,), generator=g))
        x = torch.randn(n, generator=g, dtype=torch.float64) * (1 + 10 * (trial % 4))
        if trial % 5 == 0:
            x[::3] = -math.inf  # excluded entries
            x[0] = 0.5
        cuts = sorted(set(torch.randint(0, n, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()))
        tiles = [t for t in torch.tensor_split(x, cuts) if True]
        spec = [str(len(tiles))]
        for t in tiles:
            spec += [str(t.numel())] + [repr(float(v)) for v in t]
        lines.append("lse " + " ".join(spec))
        lines.append("lsef " + " ".join(spec))
        refs.append(float(torch.logsumexp(x, 0)))
        vals.append(x)
    out = host_math(lines)
    for k, ref in enumerate(refs):
        merged, flat = out[2 * k]
        f32 = out[2 * k + 1][0]
        assert merged == pytest.approx(ref, rel=1e-13, abs=1e-13)
        assert flat == pytest.approx(ref, rel=1e-13, abs=1e-13)
        assert f32 == pytest.approx(ref, rel=2e-6, abs=2e-6)
    # empty tiles and all-excluded rows
    out = host_math(["lse 3 0 1 -inf 2 1.5 -2", "lse 2 0 0"])
    assert out[0][0] == pytest.approx(float(torch.logsumexp(torch.tensor([1.5, -2.0], dtype=torch.float64), 0)))
    assert out[1][0] == -math.inf


def test_cuda_host_softplus_logsigmoid_l0(host_math):
    xs = torch.cat(
        [
            torch.linspace(-40, 40, 161, dtype=torch.float64),
            torch.tensor([19.999, 20.0, 20.001, -20.0, 0.0], dtype=torch.float64),
        ]
    )
    out = torch.tensor(host_math([f"elem {float(x)!r}" for x in xs]), dtype=torch.float64)
    x = xs.clone().requires_grad_(True)
    sp = torch.nn.functional.softplus(x)  # beta 1, threshold 20
    (dsp,) = torch.autograd.grad(sp.sum(), x)
    sg = torch.sigmoid(xs)
    torch.testing.assert_close(out[:, 0], sp.detach(), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(out[:, 1], dsp, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(out[:, 2], torch.nn.functional.logsigmoid(xs), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(out[:, 3], sg, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(out[:, 4], sg * (1 - sg), rtol=1e-12, atol=1e-14)


def _kl_ref(mq, aq, mp, ap, eps):
    # docs/spec.md 2.4, written with torch ops (clamp gradient at the bounds depends on the torch version; the
    # inputs below avoid the exact bounds).
    def logvar(a):
        return torch.clamp(2 * torch.log(torch.nn.functional.softplus(a) + 1e-6), -10, 10)

    lq, lp = logvar(aq), logvar(ap)
    kl = 0.5 * (lp - lq + torch.exp(lq) / torch.exp(lp) + (mq - mp) ** 2 / torch.exp(lp) - 1)
    r = mq + eps * torch.exp(0.5 * lq)
    return kl, r


def test_cuda_host_kl_and_sample(host_math):
    g = torch.Generator().manual_seed(1)
    n = 300
    mq, mp, eps = (torch.randn(n, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    aq = torch.randn(n, generator=g, dtype=torch.float64) * 6  # reaches both logvar clamps and softplus > 20
    ap = torch.randn(n, generator=g, dtype=torch.float64) * 6
    aq[:4] = torch.tensor([25.0, -30.0, 200.0, -5.0], dtype=torch.float64)
    out = torch.tensor(
        host_math(
            [
                f"kl {float(a)!r} {float(b)!r} {float(c)!r} {float(d)!r} {float(e)!r}"
                for a, b, c, d, e in zip(mq, aq, mp, ap, eps, strict=True)
            ]
        ),
        dtype=torch.float64,
    )
    ins = [t.clone().requires_grad_(True) for t in (mq, aq, mp, ap)]
    kl, r = _kl_ref(*ins, eps)
    gk = torch.autograd.grad(kl.sum(), ins, retain_graph=True)
    (gr,) = torch.autograd.grad(r.sum(), ins[1])
    torch.testing.assert_close(out[:, 0], kl.detach(), rtol=1e-12, atol=1e-12)
    for k in range(4):
        torch.testing.assert_close(out[:, 1 + k], gk[k], rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(out[:, 5], r.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out[:, 6], gr, rtol=1e-11, atol=1e-12)


def test_cuda_host_straight_through_mask(host_math):
    g = torch.Generator().manual_seed(2)
    n = 200
    logits = torch.randn(n, generator=g, dtype=torch.float64) * 3
    u = torch.rand(n, generator=g, dtype=torch.float64)
    u[:3] = torch.tensor([0.0, 1.0, 1e-9], dtype=torch.float64)
    out = torch.tensor(
        host_math([f"st {float(a)!r} {float(b)!r}" for a, b in zip(logits, u, strict=True)]), dtype=torch.float64
    )
    uc = u.clamp(1e-6, 1 - 1e-6)
    gn = torch.log(uc) - torch.log(1 - uc)
    lg = logits.clone().requires_grad_(True)
    y = torch.sigmoid(lg + gn)
    hard = (y > 0.5).to(torch.float64)
    m = hard - y.detach() + y
    (dm,) = torch.autograd.grad(m.sum(), lg)
    torch.testing.assert_close(out[:, 0], hard, rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1], dm, rtol=1e-12, atol=1e-14)


def test_cuda_host_clamp_indicator_at_boundary(host_math):
    c = 20.0
    cases = [
        20.0,
        -20.0,
        math.nextafter(20.0, 30),
        math.nextafter(-20.0, -30),
        math.nextafter(20.0, 0),
        0.0,
        25.0,
        -25.0,
        19.5,
    ]
    out = host_math([f"clamp {s!r} {c!r}" for s in cases] + [f"clamp 5.0 {math.inf!r}", "clamp -1e30 inf"])
    for s, (cl, ind, clf, indf) in zip(cases, out[: len(cases)], strict=True):
        assert cl == min(max(s, -c), c)
        # inclusive: exactly +-clamp passes the gradient (torch 2.3 semantics, docs/spec.md 2.1)
        assert ind == (1.0 if -c <= s <= c else 0.0), s
        assert indf == (1.0 if -c <= float(torch.tensor(s, dtype=torch.float32)) <= c else 0.0)
        assert clf == pytest.approx(cl, rel=1e-7)
    assert out[-2][:2] == [5.0, 1.0]
    assert out[-1][:2] == [-1e30, 1.0]


def _wgmma_b_address(desc: int, mn_major: bool, k: int, n: int) -> int:
    """Shared-memory byte address wgmma reads for element (k, n) of a 16 x 64 bf16 / fp16 B operand, decoded
    from its descriptor as the PTX ISA defines the 128-byte-swizzle canonical layouts: K-major, 8-row (n)
    groups `stride` bytes apart, 128-byte rows, k contiguous; MN-major, 64-element (n) atoms `leading` bytes
    apart, 8-row (k) groups `stride` bytes apart, 128-byte rows, n contiguous. The swizzle XORs address bits
    4-6 with bits 7-9."""
    assert desc >> 62 == 1 and (desc >> 49) & 7 == 0, "128-byte swizzle, base offset 0"
    start, leading, stride = (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
    if mn_major:
        logical = start + (n // 64) * leading + (k // 8) * stride + (k % 8) * 128 + (n % 64) * 2
    else:
        logical = start + (n // 8) * stride + (n % 8) * 128 + k * 2
    return logical ^ (((logical >> 7) & 7) << 4)


def test_cuda_wgmma_descriptors_address_the_swizzled_tile(host_math):
    """csrc/adassl_sw128.cuh: for every k-step, each element the S = U V^T product (B K-major) and the G V
    product (B MN-major) read through their descriptors is the tile element they need, the tile being stored
    at sw128_offset, which must also be a bijection onto the tile."""
    base = 0x2400  # 1024-aligned, as the kernel checks
    out = host_math(["sw128", str(base)])
    offsets = [int(v[0]) for v in out[: 64 * 128]]
    descs = [(int(hi) << 32) | int(lo) for hi, lo in out[64 * 128 :]]
    assert sorted(offsets) == list(range(64 * 128))
    at = lambda r, c: base + 2 * offsets[r * 128 + c]  # noqa: E731
    s_descs, g_descs = descs[:8], descs[8:]
    for kk, desc in enumerate(s_descs):  # B[k][n] = V[n][16 kk + k]
        for n in range(64):
            for k in range(16):
                assert _wgmma_b_address(desc, False, k, n) == at(n, 16 * kk + k), (kk, n, k)
    for i, desc in enumerate(g_descs):  # B[k][n] = V[16 kk + k][64 f + n]
        f, kk = divmod(i, 4)
        for n in range(64):
            for k in range(16):
                assert _wgmma_b_address(desc, True, k, n) == at(16 * kk + k, 64 * f + n), (f, kk, n, k)
