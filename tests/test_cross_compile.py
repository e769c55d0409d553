"""Cross-compile every shipped Triton kernel configuration for sm_90, sm_80 and sm_86 without a GPU.

`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))` builds the
real PTX and cubin (ptxas ships inside the triton wheel). For each kernel x config x arch we assert: it
compiles; no register spills (cuobjdump -res-usage from the wheel: LOCAL and STACK are 0); shared memory
(metadata.shared) within its class's opt-in budget (configs.SMEM_BUDGET; the sm86 class is the 99 KB parts);
for the matmul kernels on sm_90, that the PTX uses wgmma; and that Triton's DISABLE_MMA_V3 switch, which the
benchmark's triton_mma_sync diagnostic uses, trades wgmma for mma.sync. The compiles run in a subprocess
without TRITON_INTERPRET (the interpreter replaces @triton.jit at decoration time), two at a time. Run with
-s to see the table.

ASTSource's (fn, signature, constexprs, attrs) form with string keys is the API of triton 3.3+ (checked in
3.7.1's triton/compiler/compiler.py); the H200 machine's triton 3.6 has the same.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from adassl_fast.kernels.configs import SMEM_BUDGET
from tests.compiled import resource_usage, run_worker

ARCH_CC = {"sm90": 90, "sm80": 80, "sm86": 86}
DTYPES = {"16": "bf16"}
# fp32 inputs (kernels/configs.py operand_dtype): fp32 rows in, the normalised rows u, v as fp16 operands; with
# normalize=False the rows as given, as bf16 operands
F32_INPUTS = dict(dtype="fp32", operand="fp16")
F32_GIVEN = dict(dtype="fp32", operand="bf16")

# argument name -> pointer type ("X" = the input dtype, "S" = the statistics dtype)
_PTRS = {
    "part_ptr": "S", "dsc_ptr": "S", "dv_ptr": "S", "rinv_ptr": "S", "cinv_ptr": "S", "lse_ptr": "S", "lsec_ptr": "S",
    "scale_ptr": "S", "grad_ptr": "S", "greg_ptr": "S", "inv_ptr": "S", "reg_ptr": "S", "loss_ptr": "S",
    "pos_ptr": "i64", "excl_ptr": "i64", "vinv_ptr": "S", "cpart_ptr": "S", "gsum_ptr": "S",
}
_X = {"emb_a", "emb_b", "post_a", "post_b", "prior_a", "prior_b", "noise_a", "noise_b", "u_ptr", "v_ptr",
      "out_ptr", "dst_a", "dst_b", "dpost_a", "dpost_b", "dprior_a", "dprior_b", "vout_ptr", "targ_a", "targ_b",
      "cdst_a", "cdst_b"}
_OPERANDS = {"u_ptr", "v_ptr", "out_ptr", "vout_ptr"}  # the normalised rows: the job's operand dtype
_FLOATS = {"inv_t", "clamp2"}
_ALIGNED_INTS = {"d", "ld"}  # d % 16 == 0 specialises d like this; ld (normalize_rows) always is


_ROW_SYM = [("_bwd_row_kernel", "sym", dict(ATOMIC=False, SYM=True)),
            ("_bwd_row_kernel", "atomic-sym", dict(ATOMIC=True, SYM=True))]


def jobs():
    """Every (kernel, variant, config, arch) to compile, as JSON-able dicts, in a fixed order."""
    from adassl_fast.kernels.configs import atomic_shipped, shipped_configs

    out = []
    shipped = shipped_configs()
    own_sym = {(arch, dt, bd, cfg.name.split(f"_sym_{arch}")[0])
               for arch, dt, bd, cfg in shipped if "_sym_" in cfg.name}
    own_sigmoid = {(arch, dt, bd) for arch, dt, bd, cfg in shipped if cfg.name.startswith("fwd_sigmoid_")}
    for arch, dt, bd, cfg in shipped:
        kind = cfg.name.split(f"_{arch}")[0]
        prec = "tf32"
        base = dict(arch=arch, dtype=DTYPES[dt], config=cfg.name, matmul=True,
                    options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        # what the launchers run with this config (kernels/forward.py forward_core, kernels/backward.py backward_core);
        # nt_xent and AdaSSL share these kernels (both stream normalised rows)
        # (symmetric info_nce's SYM variants run with the plain kind's config unless the entry names a
        # "<kind>_sym" config of their own; kernels/configs.py)
        plain_runs_sym = (arch, dt, bd, kind) not in own_sym
        # (likewise SigLIP's forward: the "fwd" config unless the entry names a "fwd_sigmoid" one)
        sigmoid_ok = kind != "fwd" or (arch, dt, bd) not in own_sigmoid
        # (an entry with "atomic": False never runs the atomic row kernel)
        atomic = atomic_shipped(arch, dt, bd)
        row_sym = [v for v in _ROW_SYM if atomic or not v[2]["ATOMIC"]]
        if kind in ("fwd", "fwd_sigmoid"):
            variants = [("_fwd_kernel", "-", {})]
        elif kind == "bwd_row":
            variants = [("_bwd_row_kernel", "det", dict(ATOMIC=False, SYM=False))]
            variants += [("_bwd_row_kernel", "atomic", dict(ATOMIC=True, SYM=False))] if atomic else []
            variants += row_sym if plain_runs_sym else []
        elif kind == "bwd_col":
            variants = [("_bwd_col_kernel", "-", dict(SYM=False))]
            variants += [("_bwd_col_kernel", "sym", dict(SYM=True))] if plain_runs_sym else []
        elif kind == "bwd_row_sym":
            variants = row_sym
        else:
            variants = [("_bwd_col_kernel", "sym", dict(SYM=True))]
        for kernel, label, extra in variants:
            if kernel == "_bwd_col_kernel":  # owns cfg.block_m rows of v, streams cfg.block_n rows of u
                blocks = dict(BLOCK_M=cfg.block_n, BLOCK_N=cfg.block_m)
            else:
                blocks = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
            plain = dict(BLOCK_D=bd, UPCAST=False, PREC=prec, NORMALIZE=True, SIGMOID=False, LABELS=False, **blocks,
                         **extra)
            # the modes of kernels/tiles.py: SigLIP's SIGMOID logits (no clamp, never SYM) and label-defined
            # positives (LABELS, with the clamp: the most registers). Their fp32-input (fp16 operand) twins are
            # left out: on 2026-12-03 each of the 93 compiled to the registers and shared memory of its bf16 job
            # (all 464 jobs passed), and they would add ~1.5 min to this test
            sigmoid = [("sigmoid-", False, dict(plain, CLAMP=False, SIGMOID=True))]
            if kind == "fwd_sigmoid":
                modes = sigmoid
            else:
                modes = [("", False, dict(plain, CLAMP=False)), ("", True, dict(plain, CLAMP=True))]
                modes += sigmoid if sigmoid_ok and not extra.get("SYM") else []
                modes += [("labels-", True, dict(plain, CLAMP=True, LABELS=True))]
            for mode, clamp, consts in modes:
                name = f"{mode}{label}{'-clamp' if clamp else ''}"
                out.append(dict(base, kernel=kernel, variant=name, constexprs=consts))
                if clamp and not mode:
                    # fp32 inputs stream fp16 operands through the same shapes (with the clamp: the most registers)
                    out.append(dict(base, **F32_INPUTS, kernel=kernel, variant=f"{name}-f32in", constexprs=consts))
                    # rows taken as given (normalize=False, bf16 operands also for fp32 rows): the clamp always
                    # applies (tiles.clamp_binds)
                    if arch in ("sm90", "sm80"):
                        out.append(dict(base, kernel=kernel, variant=f"{name}-given",
                                        constexprs=dict(consts, NORMALIZE=False)))
    # the O(M d) helpers at each shipped BLOCK_D, with the launchers' rows per program: for sm_90 and sm_80
    # (they use at most 256 bytes of shared memory; tests/test_launch_path.py compiles them for sm_86 too)
    from adassl_fast.kernels.launch import rows_per_program

    # normalize=False: fp32 rows in, bf16 rows out, and (finishing kernel only) bf16 rows
    for arch, inputs, normalize in (("sm90", {}, True), ("sm80", {}, True), ("sm90", F32_INPUTS, True),
                                    ("sm80", F32_INPUTS, True), ("sm90", F32_GIVEN, False), ("sm80", F32_GIVEN, False),
                                    ("sm90", {}, False), ("sm80", {}, False)):
        small = dict(dict(arch=arch, dtype="bf16", options=dict(num_warps=4, num_stages=1), matmul=False), **inputs)
        suffix = ("-f32in" if inputs else "") + ("" if normalize else "-given")
        for bd in sorted({b for a, _, b, _ in shipped_configs() if a == arch}):
            # bf16 rows as given are only cast: the plain rows (the cores' and SigLIP's), no AdaSSL prologue
            prologues = ((0, "nt_xent"), (1, "adassl_v"), (2, "adassl_s")) if inputs or normalize else ((0, "nt_xent"),)
            for prologue, label in prologues:
                block = rows_per_program(bd, prologue, False)
                tblock = rows_per_program(bd, 0, False)  # the targ side's rows per program, in the same launch
                out.append(dict(small, kernel="_normalize_kernel", variant=label + suffix,
                                config=f"m{block}_t{tblock}_d{bd}",
                                constexprs=dict(BLOCK_M=block, BLOCK_T=tblock, BLOCK_D=bd, PROLOGUE=prologue,
                                                NORMALIZE=normalize)))
            # the finishing launches backward_core makes: plain ops finish both sides in one launch; AdaSSL (its
            # sinks alias) the targ side, then the edited rows adding to it
            cblock = rows_per_program(bd, 0, True, normalize)
            for label, prologue, accum, dscale, both in (("nt_xent-both", 0, False, True, True),
                                                         ("adassl-targ", 0, False, False, False),
                                                         ("adassl_v", 1, True, True, False),
                                                         ("adassl_s", 2, True, True, False)):
                fblock = rows_per_program(bd, prologue, True, normalize)
                out.append(dict(small, kernel="_finish_kernel", variant=label + suffix, config=f"m{fblock}_d{bd}",
                                constexprs=dict(BLOCK_M=fblock, BLOCK_D=bd, PROLOGUE=prologue, TWO_PART=True,
                                                ACCUM=accum, DSCALE=dscale, BOTH=both, BLOCK_C=cblock,
                                                TWO_PART_C=False, NORMALIZE=normalize)))
        if not inputs and normalize:
            for sigmoid in (False, True):
                out.append(dict(small, kernel="_fwd_merge_kernel", variant="sigmoid" if sigmoid else "-",
                                config="b128", constexprs=dict(BLOCK=128, SIGMOID=sigmoid)))
    for j in out:
        j["id"] = f"{j['kernel']}-{j['variant']}-{j['config']}-{j['arch']}"
    return out


def diagnostic_jobs():
    """The benchmark's triton_mma_sync rows (adassl_fast/apps/benchmark.py) run the sm_90 kernels under Triton's
    DISABLE_MMA_V3=1: check on the shipped d = 128 forward that the switch trades wgmma for mma.sync."""
    fwd = next(j for j in jobs() if j["kernel"] == "_fwd_kernel" and j["arch"] == "sm90" and "_d128_" in j["config"]
               and j["variant"] == "-")
    return [dict(fwd, variant="DISABLE_MMA_V3", env={"DISABLE_MMA_V3": "1"}, id=fwd["id"] + "-DISABLE_MMA_V3")]


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget

    from adassl_fast.kernels import backward, forward, normalize

    fn = next(getattr(m, job["kernel"]) for m in (forward, backward, normalize) if hasattr(m, job["kernel"]))
    consts = job["constexprs"]
    stat = "fp32"
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in _PTRS:
            sig[n] = "*" + {"S": stat}.get(_PTRS[n], _PTRS[n])
        elif n in _OPERANDS:
            sig[n] = "*" + job.get("operand", job["dtype"])
        elif n in _X:
            sig[n] = "*" + job["dtype"]
        elif n in _FLOATS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n in _ALIGNED_INTS}
    cc = ARCH_CC[job["arch"]]
    row = dict(id=job["id"], kernel=job["kernel"], variant=job["variant"], config=job["config"], arch=job["arch"],
               matmul=job["matmul"])
    saved = {k: os.environ.get(k) for k in job.get("env", {})}
    os.environ.update(job.get("env", {}))  # read by Triton's compiler (and its cache key) at compile time
    try:
        k = triton.compile(triton.compiler.ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                           options=job["options"])
    except Exception as exc:  # reported, and the test asserts on it
        row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        return row
    finally:  # the pool's processes compile other jobs next
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
    row.update(**resource_usage(k.asm["cubin"]), shared=int(k.metadata.shared),
               wgmma="wgmma.mma_async" in k.asm["ptx"], mma_sync="mma.sync.aligned" in k.asm["ptx"])
    return row


def _worker():
    from concurrent.futures import ProcessPoolExecutor

    todo = jobs() + diagnostic_jobs()
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        rows = list(pool.map(_compile_one, todo))
    print(json.dumps(rows))
    sys.stdout.flush()


@pytest.fixture(scope="module")
def table():
    rows = {r["id"]: r for r in run_worker("tests.test_cross_compile")}
    lines = [f"{'kernel':<18} {'variant':<16} {'config':<36} {'arch':<5} {'regs':>4} {'spill':>5} {'smem':>7} wgmma"]
    for r in rows.values():
        if "error" in r:
            lines.append(f"{r['kernel']:<18} {r['variant']:<16} {r['config']:<36} {r['arch']:<5} COMPILE ERROR")
            continue
        spill = r["stack"] + r["local"]
        lines.append(f"{r['kernel']:<18} {r['variant']:<16} {r['config']:<36} {r['arch']:<5} {r['registers']:>4} "
                     f"{spill:>5} {r['shared']:>7} {'yes' if r['wgmma'] else 'no'}")
    print("\n" + "\n".join(lines))
    return rows


_JOBS = jobs()


@pytest.mark.parametrize("job", _JOBS, ids=[j["id"] for j in _JOBS])
def test_compiles_without_spills_within_smem(table, job):
    row = table[job["id"]]
    assert "error" not in row, row.get("error")
    assert row["stack"] == 0 and row["local"] == 0, f"spills: {row}"
    budget = SMEM_BUDGET[row["arch"]]
    assert row["shared"] <= budget, f"shared {row['shared']} > {budget}"
    if row["matmul"] and row["arch"] == "sm90":
        assert row["wgmma"], "sm_90 matmul kernel without wgmma"


@pytest.mark.parametrize("job", diagnostic_jobs(), ids=lambda j: j["id"])
def test_mma_sync_switch_trades_wgmma_for_mma_sync(table, job):
    plain, switched = table[job["id"].removesuffix("-DISABLE_MMA_V3")], table[job["id"]]
    assert "error" not in switched, switched.get("error")
    assert plain["wgmma"] and not plain["mma_sync"], plain
    assert switched["mma_sync"] and not switched["wgmma"], switched


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    os.environ.pop("TRITON_INTERPRET", None)
    _worker()
