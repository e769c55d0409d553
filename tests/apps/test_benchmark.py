"""The benchmark harness: FLOP / floor arithmetic against docs/perf.md's table, one measurement in process, the
summary's verdicts, and (slow) the `--quick` path end to end through its worker processes."""

import json
import math

import pytest

from adassl_fast.apps import benchmark as bench

H200 = "NVIDIA H200"

# docs/perf.md 1: fwd + bwd, 8 M^2 d at 790 TFLOP/s, bf16 (seconds).
PERF_FLOOR_TABLE = {
    (8192, 128): 87e-6, (8192, 256): 174e-6, (8192, 512): 348e-6,
    (65536, 128): 5.6e-3, (65536, 256): 11.1e-3, (65536, 512): 22.3e-3,
    (262144, 128): 89e-3, (262144, 256): 178e-3, (262144, 512): 356e-3,
}


@pytest.mark.parametrize("op", ["nt_xent", "adassl", "info_nce"])
@pytest.mark.parametrize(("m", "d"), sorted(PERF_FLOOR_TABLE))
def test_floor_matches_perf_table(op, m, d):
    got = bench.floor_seconds(op, "full", m, d, H200)
    assert got == pytest.approx(PERF_FLOOR_TABLE[m, d], rel=0.01)


def test_floor_phases_add_up_and_scale():
    m, d = 8192, 128
    fwd, bwd, full = (bench.floor_seconds("nt_xent", p, m, d, H200) for p in ("fwd", "bwd", "full"))
    assert fwd + bwd == pytest.approx(full)
    assert fwd == pytest.approx(2 * m * m * d / 790e12)
    assert bench.floor_seconds("nt_xent", "full", 2 * m, d, H200) == pytest.approx(4 * full)


def test_executed_flops_per_phase():
    m, d = 1000, 64
    unit = m * m * d
    assert bench.phase_flops("nt_xent", "fwd", m, d) == 2 * unit
    assert bench.phase_flops("nt_xent", "bwd", m, d) == 8 * unit  # deterministic: S recomputed twice
    assert bench.phase_flops("nt_xent", "bwd", m, d, deterministic=False) == 6 * unit  # fp32 atomics for dV
    assert bench.phase_flops("nt_xent", "full", m, d) == 10 * unit
    assert bench.phase_flops("adassl", "full", m, d, deterministic=False) == 8 * unit
    assert bench.phase_flops("info_nce", "fwd", m, d) == 4 * unit  # symmetric: row and column LSEs
    assert bench.phase_flops("info_nce", "fwd", m, d, symmetric=False) == 2 * unit
    assert bench.phase_flops("info_nce", "full", m, d, deterministic=False) == 10 * unit  # docs/perf.md's 10 N^2 d
    assert bench.phase_flops("info_nce", "bwd", m, d) == 8 * unit  # one G for both directions
    assert bench.phase_flops("info_nce", "bwd", m, d, impl="cuda") == 16 * unit  # one backward per direction
    assert bench.phase_flops("info_nce", "bwd", m, d, impl="cuda_wgmma") == 16 * unit
    # deterministic=False where there is no atomic schedule: the CUDA backend, Triton at d > 256
    assert bench.phase_flops("nt_xent", "bwd", m, d, deterministic=False, impl="cuda") == 8 * unit
    assert bench.phase_flops("nt_xent", "bwd", m, 512, deterministic=False) == 8 * m * m * 512
    with pytest.raises(ValueError, match="phase"):
        bench.phase_flops("nt_xent", "both", m, d)


@pytest.mark.parametrize("name", ["AMD EPYC 7B13", "Intel(R) Xeon(R) CPU", "NVIDIA A100-SXM4-80GB", "", None])
def test_no_floor_without_a_measured_ceiling(name):
    assert bench.peak_flops(name) is None
    assert bench.floor_seconds("nt_xent", "full", 8192, 128, name) is None
    assert bench.ratio_to_floor(12.0, None) is None


def test_ratio_tflops_and_quantiles():
    floor_s = bench.floor_seconds("nt_xent", "full", 8192, 128, "NVIDIA H200 NVL")
    assert bench.ratio_to_floor(0.174, floor_s) == pytest.approx(2.0, rel=1e-3)
    assert bench.achieved_tflops(790e12 * 1e-3, 1.0) == pytest.approx(790.0)
    assert bench.achieved_tflops(1e12, None) is None
    assert bench.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert bench.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    assert bench.quantile([7.0], 0.8) == 7.0


def test_repetitions_fit_the_budget_and_the_time_left():
    assert bench._reps(0.01, 1.0, 3, 100, math.inf) == 100
    assert bench._reps(0.4, 1.0, 3, 100, math.inf) == 3
    assert bench._reps(5.0, 1.0, 3, 100, math.inf) == 1
    assert bench._reps(0.1, 1.0, 3, 100, 0.35) == 3
    assert bench._reps(0.1, 1.0, 3, 100, 0.0) == 1


def test_measure_in_process_cpu():
    spec = {"op": "nt_xent", "impl": "torch", "M": 64, "d": 16, "dtype": "float32", "phase": "full",
            "device": "cpu", "deterministic": True}
    settings = {"budget_s": 5.0, "min_reps": 2, "max_reps": 3, "err_max_m": 64}
    out = bench.measure(spec, settings)
    assert out["reps"] >= 2 and out["median_ms"] > 0 and out["p20_ms"] <= out["median_ms"] <= out["p80_ms"]
    assert out["extra_bytes"] is not None and out["extra_bytes"] >= 0
    assert out["max_abs_err"] < 1e-5 and out["err_vs"] == "reference float64"


@pytest.mark.parametrize("op", bench.OPS)
def test_every_op_and_phase_runs_against_the_reference(op):
    settings = {"budget_s": 0.01, "min_reps": 1, "max_reps": 2, "err_max_m": 32}
    for phase in bench.PHASES:
        spec = {"op": op, "impl": "torch", "M": 32, "d": 8, "dtype": "float64", "phase": phase, "device": "cpu",
                "deterministic": True}
        out = bench.measure(spec, settings)
        assert out["max_abs_err"] < 1e-10, (phase, out)


def test_unavailable_backend_becomes_a_row_with_the_reason():
    spec = {"op": "nt_xent", "impl": "cuda", "M": 64, "d": 16, "dtype": "float32", "phase": "full",
            "device": "cpu", "deterministic": True}
    env = {"device": "cpu model", "torch": "x", "triton": None, "commit": "abc", "date": "d", "host": "h"}
    row = bench.run_row(spec, {"budget_s": 0.05, "min_reps": 1, "max_reps": 2, "err_max_m": 0}, env, math.inf)
    assert row["status"] == "skipped" and "cuda" in row["note"]
    assert set(bench.ROW_KEYS) <= set(row) and row["median_ms"] is None and row["floor_ratio"] is None


def _row(op, impl, m, ms, **kw):
    floor_s = bench.floor_seconds(op, "full", m, 128, H200)
    row = {k: None for k in bench.ROW_KEYS + bench.EXTRA_KEYS}
    row.update(op=op, impl=impl, M=m, d=128, dtype="bfloat16", phase="full", median_ms=ms, status="ok", note="",
               device=H200, torch="2.11", triton="3.6", commit="abc", floor_ms=floor_s * 1e3,
               floor_ratio=bench.ratio_to_floor(ms, floor_s), extra_bytes=1 << 20)
    row.update(kw)
    return row


def test_summary_verdicts_and_tables(tmp_path):
    rows = [
        _row("nt_xent", "triton", 8192, 0.15), _row("nt_xent", "cuda", 8192, 0.18),
        _row("nt_xent", "triton", 32768, 2.0), _row("nt_xent", "cuda", 32768, 3.0),
        _row("nt_xent", "reference", 32768, 20.0), _row("nt_xent", "compile", 32768, 4.0),
        _row("nt_xent", "triton", 65536, 7.0), _row("nt_xent", "triton", 2097152, 9000.0),
        _row("nt_xent", "cuda", 65536, 0.0, status="error", note="RuntimeError: boom", median_ms=None),
    ]
    text = bench.summarize(rows)
    assert "PASS  nt_xent triton M=8192 x floor <= 2.5" in text  # 0.15 ms / 87 us = 1.7
    assert "PASS  nt_xent triton M=65536 x floor <= 1.5" in text  # 7.0 / 5.57 = 1.26
    assert "FAIL  nt_xent M=32768 compile/fused >= 2.5: 2" in text
    assert "PASS  nt_xent M=32768 eager/fused >= 5: 10" in text
    assert "FAIL  nt_xent M=32768 cuda/triton <= 1.3: 1.5" in text
    assert "UNMEASURED  nt_xent cuda M=65536 x floor <= 1.5" in text
    assert "PASS  nt_xent M=2097152 fwd+bwd on one GPU" in text
    assert "RuntimeError: boom" in text
    table = bench.format_table(rows)
    assert "not measured:" in table and "10.00" in table  # x eager of triton at 32768
    json_path, csv_path = bench.write_rows(rows, tmp_path)
    assert json.loads(json_path.read_text())[0]["impl"] == "triton"
    assert csv_path.read_text().splitlines()[0].startswith(",".join(bench.ROW_KEYS))


def test_mma_sync_diagnostic_says_why_cuda_trails_triton():
    rows = [_row("nt_xent", "triton", 65536, 10.0), _row("nt_xent", "cuda", 65536, 15.0),
            _row("nt_xent", "triton_mma_sync", 65536, 14.0)]
    text = bench.summarize(rows)
    assert "FAIL  nt_xent M=65536 cuda/triton <= 1.3: 1.5" in text
    # log 1.4 / log 1.5 = 0.83
    assert ("WHY   nt_xent M=65536: cuda/triton 1.50; Triton on mma.sync (DISABLE_MMA_V3=1) is 1.40x Triton on "
            "wgmma and cuda is 1.07x it: the matrix instruction accounts for 1.40x, 83% of the gap") in text
    assert "WHY" not in bench.summarize(rows[:2])  # without the diagnostic row there is nothing to say
    text = bench.summarize(rows + [_row("nt_xent", "cuda_wgmma", 65536, 12.0)])
    assert "PASS  nt_xent M=65536 cuda_wgmma/triton <= 1.3 (opt-in path): 1.2" in text


def test_diagnostic_rows_get_their_own_worker_environment():
    spec = lambda impl, m: {"op": "nt_xent", "impl": impl, "M": m, "d": 16, "dtype": "bfloat16",  # noqa: E731
                            "phase": "full", "device": "cuda:0", "deterministic": True}
    todo = [spec("triton", 1), spec("cuda", 1), spec("triton_mma_sync", 1), spec("triton", 2)]
    assert bench._next_batch(todo, "run") == todo[:2]
    assert bench._next_batch(todo[2:], "run") == todo[2:3]
    assert bench._next_batch(todo, "row") == todo[:1]
    assert bench._child_env(bench._worker_env(todo[2]))["DISABLE_MMA_V3"] == "1"
    assert bench._child_env(bench._worker_env(spec("cuda_wgmma", 1)))["ADASSL_FAST_CUDA_WGMMA"] == "1"
    assert "DISABLE_MMA_V3" not in bench._child_env(bench._worker_env(todo[0]))
    assert bench.loss_function("nt_xent", "triton_mma_sync") is not None
    cpu = dict(spec("triton_mma_sync", 64), device="cpu")
    assert "GPU diagnostic" in bench.pre_skip_reason(cpu, {}, {})
    assert bench._parser().parse_args(["--impl", "triton,triton_mma_sync"]).impl == ["triton", "triton_mma_sync"]


def test_atomic_diagnostic_times_the_one_kernel_backward_beside_the_default():
    specs = bench.build_specs(["nt_xent"], ["triton", "triton_atomic"], [65536], [128], "bfloat16", ["full"],
                              "cuda:0", True)
    assert [(s["impl"], s["deterministic"]) for s in specs] == [("triton", True), ("triton_atomic", False)]
    assert bench._worker_env(specs[1]) == {}  # no switches: it shares the targets' worker
    m, d = 65536, 128
    assert bench.phase_flops("nt_xent", "full", m, d, deterministic=False, impl="triton_atomic") == 8 * m * m * d
    rows = [_row("nt_xent", "triton", 65536, 14.5), _row("nt_xent", "triton_atomic", 65536, 8.0)]
    text = bench.summarize(rows)
    assert "FAIL  nt_xent triton M=65536 x floor <= 1.5: 2.6" in text
    assert "PASS  nt_xent triton_atomic M=65536 x floor <= 1.5: 1.44" in text  # 8.0 / 5.57
    assert "triton_atomic M=8192" not in text  # a diagnostic without a row adds no UNMEASURED line
    assert "triton_atomic" not in bench.summarize(rows[:1])
    cpu = dict(specs[1], device="cpu")
    assert "(triton with deterministic=False)" in bench.pre_skip_reason(cpu, {}, {})


def test_cli_parsing_helpers():
    assert bench._ints("1024, 2^12,4096") == [1024, 4096, 4096]
    assert bench._sizes_for("compile=32768") == ("compile", [32768])
    with pytest.raises(Exception, match="IMPL"):
        bench._sizes_for("nope=1")
    specs = bench.build_specs(["nt_xent"], ["torch", "compile"], [64, 128], [16], "float32", ["full"], "cpu", True,
                              {"compile": [128]})
    assert [(s["impl"], s["M"]) for s in specs] == [("torch", 64), ("torch", 128), ("compile", 128)]
    # an op's sizes and an impl's sizes both apply
    assert bench._sizes_for("info_nce=64") == ("info_nce", [64])
    specs = bench.build_specs(["nt_xent", "info_nce"], ["torch", "compile"], [64, 128], [16], "float32", ["full"],
                              "cpu", True, {"compile": [128], "info_nce": [64]})
    assert [(s["op"], s["impl"], s["M"]) for s in specs] == [
        ("nt_xent", "torch", 64), ("info_nce", "torch", 64), ("nt_xent", "torch", 128), ("nt_xent", "compile", 128)]


@pytest.mark.slow
def test_quick_path_writes_rows_with_every_key(tmp_path, capsys):
    rc = bench.main(["--quick", "--M", "64", "--d", "16", "--budget-s", "0.05", "--min-reps", "2",
                     "--interpret-max-m", "64", "--no-progress", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert (tmp_path / "rows.csv").exists()
    assert {(r["op"], r["impl"]) for r in rows} == {(op, i) for op in ("nt_xent", "adassl") for i in bench.IMPLS}
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r), r
        assert r["status"] in ("ok", "skipped", "error", "oom")
        if r["status"] != "ok":
            assert r["note"], r
    by = {(r["op"], r["impl"]): r for r in rows}
    for op in ("nt_xent", "adassl"):
        for impl in ("reference", "torch"):
            r = by[op, impl]
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["extra_bytes"] >= 0 and r["max_abs_err"] < 1e-4
            assert r["floor_ratio"] is None and r["device"] and r["commit"]
        assert by[op, "cuda"]["status"] == "skipped" and "cuda" in by[op, "cuda"]["note"]
        assert by[op, "compile"]["status"] == "skipped"
    assert "x eager" in printed and rc in (0, 1)


@pytest.mark.parametrize("op", bench.OPS)
def test_plain_eager_peer_computes_the_reference_loss(op):
    import torch

    inputs = bench.make_inputs(op, 34, 10, torch.float64, "cpu")
    eager = bench.loss_function(op, "eager")(*inputs)
    torch.testing.assert_close(eager, bench.loss_function(op, "reference")(*inputs), rtol=1e-12, atol=1e-12)
