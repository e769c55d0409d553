#!/usr/bin/env bash
# The one script a lent GPU machine runs (docs/perf.md says what it measures and how):
#   environment -> install this tree (no network) -> CUDA extension build -> GPU tests -> benchmark sweep for
#   the docs/perf.md targets -> plots -> summary, printed LAST (the device tool returns only the output's tail).
#
#   bash bench/device_check.sh             # GPU: files in $OUT, else bench/results/<date>-<device>/
#   bash bench/device_check.sh --dry-run   # the same path on CPU with tiny sizes; files in a temp dir (CI runs it)
#
# Every step has its own timeout and the benchmark a deadline, so one hang cannot eat the lease; a step
# that fails is recorded and the next one runs. At most 8 files are written: device_check.log, tune.json,
# rows.json, rows.csv and 3 PNGs.
#
# Environment: PYTHON (default python3: on the H200 the system one that holds torch), BUDGET_S (total seconds,
# default 420), OUT (output folder), ADASSL_FAST_COMMIT (the commit, where the tree arrives without .git:
# e.g. `ADASSL_FAST_COMMIT=<sha> bash bench/device_check.sh`), SKIP_BUILD=1, SKIP_TESTS=1, TEST_MARKERS (pytest -m
# expression, default "gpu or triton or cuda"), BENCH_ARGS (replaces the benchmark's arguments, for a short rerun),
# TUNE=1 with TUNE_ARGS / TUNE_S (first measure block configurations with bench/tune_triton.py; its table then
# feeds the benchmark; off by default: the shipped table holds the last measurement and the lease is short),
# SKIP_OVERHEAD=1, OVERHEAD_ARGS (bench/launch_overhead.py: is small M launch-bound?), FAMILY_ARGS (replaces the
# loss-family rows' benchmark arguments: SigLIP and labelled InfoNCE beside info_nce).
#
# How the package is imported: `pip install --no-deps --no-build-isolation --no-index --target $SITE .` (a
# non-editable install, as a user's: the CUDA backend builds from the adassl_fast/csrc sources the wheel
# carries), with a plain copy of adassl_fast/ as the fallback. PYTHONPATH=$SITE and PYTHONSAFEPATH=1, so the
# checks exercise the install, not this tree; the tests run from a copy in $SITE for the same reason
# (tests/__init__.py makes pytest put the tests' parent folder first on sys.path).
set -u
set -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --skip-build) SKIP_BUILD=1 ;;
        --skip-tests) SKIP_TESTS=1 ;;
        -h|--help) awk 'NR > 1 && /^set -u/ {exit} NR > 1' "$0"; exit 0 ;;
        *) echo "device_check.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
PY=$(command -v "${PYTHON:-python3}") || { echo "device_check.sh: no ${PYTHON:-python3}" >&2; exit 2; }
START=$(date +%s)
BUDGET=${BUDGET_S:-420}
RESERVE=150  # seconds kept for the benchmark when the build and the tests run long
if [ "$DRY" = 1 ]; then BUDGET=${BUDGET_S:-300}; RESERVE=30; fi
left() { echo $((BUDGET - ($(date +%s) - START))); }
clip() { local want=$1 avail; avail=$(($(left) - ${2:-0})); [ "$avail" -lt "$want" ] && want=$avail; [ "$want" -lt 5 ] && want=5; echo "$want"; }

if [ -z "${OUT:-}" ]; then
    if [ "$DRY" = 1 ]; then
        OUT=$(mktemp -d /tmp/device_check_dry.XXXXXX)
    else
        gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9._\n-' '-')
        OUT="$REPO/bench/results/$(date +%Y-%m-%d_%H%M)-${gpu:-nogpu}"
    fi
fi
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
export DRY OUT LOG PY REPO
: > "$LOG"
STEPS=()
say() { echo "$*" | tee -a "$LOG"; }
# step NAME SECONDS CMD...: run with a timeout, output to the terminal and the log, record the status.
step() {
    local name=$1 secs=$2 rc t0
    shift 2
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then export -f "$1"; set -- bash -c "$1"; fi  # timeout runs functions in a child bash
    say ""
    say "=== $name (timeout ${secs}s, $(left)s of ${BUDGET}s left)"
    timeout -k 5 "$secs" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local why="ok"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && why="TIMEOUT"
    [ "$rc" != 0 ] && [ "$why" = ok ] && why="FAILED rc=$rc"
    STEPS+=("$(printf '%-10s %-14s %4ss' "$name" "$why" "$(($(date +%s) - t0))")")
    return "$rc"
}

# --- environment ------------------------------------------------------------------------------------
env_report() {
    echo "date: $(date -Is)  host: $(hostname)  dry-run: $DRY  out: $OUT"
    uname -srm
    if [ "$DRY" = 0 ]; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
            --format=csv 2>&1 || echo "nvidia-smi: not available"
        (nvcc --version 2>&1 || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>&1) | tail -2
    fi
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], sys.executable); print('torch', \
torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() \
else None)"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
}
step env 30 env_report

# --- the commit these numbers belong to -------------------------------------------------------------
if [ -z "${ADASSL_FAST_COMMIT:-}" ]; then
    if git -C "$REPO" rev-parse --verify -q HEAD >/dev/null 2>&1; then
        ADASSL_FAST_COMMIT=$(git -C "$REPO" rev-parse --short=12 HEAD)
        if ! git -C "$REPO" diff --quiet HEAD -- 2>/dev/null || \
           [ -n "$(git -C "$REPO" status --porcelain --untracked-files=all -- adassl_fast 2>/dev/null)" ]; then
            ADASSL_FAST_COMMIT="$ADASSL_FAST_COMMIT-dirty"
        fi
    else
        ADASSL_FAST_COMMIT="unknown (no .git; pass ADASSL_FAST_COMMIT)"
    fi
fi
export ADASSL_FAST_COMMIT
say "commit: $ADASSL_FAST_COMMIT"

# --- install: the package, from this tree, offline ------------------------------
SITE=$(mktemp -d /tmp/adassl_site.XXXXXX)
export SITE
# SKIP_BUILD=1: no CUDA extension at all, not even the one setup.py builds ahead of time during the install
if [ "${SKIP_BUILD:-0}" = 1 ]; then export ADASSL_FAST_SKIP_CUDA_BUILD=1; fi
install_pkg() {
    if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --no-compile --target "$SITE" "$REPO"; then
        echo "installed: pip install --no-deps --no-build-isolation --no-index --target $SITE (non-editable)"
    else
        echo "pip install failed: copying adassl_fast/ into $SITE instead"
        rm -rf "$SITE/adassl_fast" && cp -r "$REPO/adassl_fast" "$SITE/adassl_fast" || return 1
    fi
    rm -rf "$SITE/tests" && cp -r "$REPO/tests" "$SITE/tests" && cp "$REPO/pyproject.toml" "$SITE/"
    find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
}
step install 180 install_pkg
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
step import 60 "$PY" -c "import adassl_fast, adassl_fast.kernels, json; print('adassl_fast from', adassl_fast.__file__); \
print(json.dumps(adassl_fast.info()['backends']))"

# --- the CUDA extension (built on first use; the tests and the benchmark reuse the cache) ------------------
build_cuda() {
    "$PY" - <<'EOF'
import time
from adassl_fast._dispatch import unavailable_reason
t = time.time()
reason = unavailable_reason("cuda")
print(f"cuda backend: {'available' if reason is None else 'unavailable: ' + reason} ({time.time() - t:.1f} s)")
try:
    from adassl_fast import _cuda
    log = str(_cuda.info().get("build_log") or "")
    print("build log (tail):", log[-3000:] if log else "(none)")
except Exception as exc:
    print("no build log:", type(exc).__name__, exc)
EOF
}
if [ "${SKIP_BUILD:-0}" = 1 ]; then say "build: skipped (SKIP_BUILD=1)"; else step build "$(clip 180 $((RESERVE + 60)))" build_cuda; fi

# --- GPU tests: Triton and CUDA against the reference (the dry run only collects them) ----------------------
if [ "${SKIP_TESTS:-0}" = 1 ]; then
    say "tests: skipped (SKIP_TESTS=1)"
elif [ "$DRY" = 1 ]; then
    step tests 60 bash -c "set -o pipefail; cd '$SITE' && '$PY' -m pytest -q -p no:cacheprovider --collect-only -m 'gpu or triton or cuda' tests | tail -3"
else
    # the CUDA backend's opt-in wgmma path in a process of its own: a kernel that broke the CUDA context
    # there cannot take the other tests down
    step tests "$(clip 150 "$RESERVE")" bash -c "cd '$SITE' || exit 1; rc=0; \
        '$PY' -m pytest -q -p no:cacheprovider -rs -m '${TEST_MARKERS:-gpu or triton or cuda}' -k 'not wgmma' \
            --durations=5 tests || rc=1; \
        '$PY' -m pytest -q -p no:cacheprovider -rs -m '${TEST_MARKERS:-gpu or triton or cuda}' -k wgmma tests || rc=1; \
        exit \$rc"
fi

# --- block configurations measured here (bench/tune_triton.py); the benchmark below runs with them ----------
if [ "$DRY" = 1 ] || [ "${TUNE:-0}" != 1 ]; then
    say "tune: skipped (TUNE=1 runs it)"
else
    read -r -a TUNE <<< "${TUNE_ARGS:---M 8192,65536 --d 128 --dtype bf16}"
    TUNE_S=$(clip "${TUNE_S:-200}" "$RESERVE")
    step tune "$TUNE_S" "$PY" "$REPO/bench/tune_triton.py" "${TUNE[@]}" --budget-s $((TUNE_S - 40)) --out "$OUT"
    if [ -f "$OUT/tune.json" ]; then export ADASSL_FAST_TRITON_CONFIGS="$OUT/tune.json"; say "bench uses $OUT/tune.json"; fi
fi

# --- the benchmark sweep the docs/perf.md targets need -----------------------------------------------------
if [ "$DRY" = 1 ]; then
    BENCH=(--device cpu --op nt_xent,adassl --impl triton,cuda,torch,reference --M 128,256 --d 32 --dtype fp32
           --phase full --err-max-m 256 --budget-s 0.2 --min-reps 2 --interpret-max-m 128 --isolate run)
    export TRITON_INTERPRET=1  # the Triton rows run in the interpreter, at the smallest size only
elif [ -n "${BENCH_ARGS:-}" ]; then
    read -r -a BENCH <<< "$BENCH_ARGS"
else
    # (symmetric info_nce, the CLIP loss: at 8192 and 65536 only, so it adds no torch.compile row; the
    # diagnostics: triton_atomic times Triton's deterministic=False backward (6 M^2 d, the floor's schedule);
    # then, last, triton_mma_sync says how much of cuda/triton is mma.sync against wgmma and cuda_wgmma times
    # the CUDA backend's opt-in wgmma path)
    # (M = 262144 and 2^20 are left out to leave the diagnostics time; BENCH_ARGS brings them back)
    BENCH=(--op nt_xent,adassl,info_nce
           --impl triton,cuda,torch,reference,compile,triton_atomic,cuda_wgmma,triton_mma_sync
           --M 8192,32768,65536,2097152
           --d 128 --dtype bf16 --phase full --sizes-for reference=8192,32768 --sizes-for compile=32768
           --sizes-for torch=8192,32768 --sizes-for info_nce=8192,65536 --sizes-for triton_atomic=8192,65536
           --sizes-for triton_mma_sync=32768,65536 --sizes-for cuda_wgmma=8192,32768,65536
           --err-max-m 8192 --budget-s 0.5)
fi
FAMILIES_S=90  # kept for the loss families' rows below
[ "$DRY" = 1 ] && FAMILIES_S=60
BENCH_S=$(clip 600 $((40 + FAMILIES_S)))  # the worker is stopped at the deadline + 30 s; SIGTERM still writes the rows
DEADLINE_S=$((BENCH_S - 45)); [ "$DEADLINE_S" -lt $((BENCH_S / 2)) ] && DEADLINE_S=$((BENCH_S / 2))
step bench "$BENCH_S" "$PY" -m adassl_fast bench "${BENCH[@]}" --deadline-s "$DEADLINE_S" --grace-s 30 \
    --no-progress --out "$OUT"

# --- the loss families beside info_nce: SigLIP and label-defined positives ("supcon": info_nce with labels=), the
# Triton path at N = 32768 and 65536; their rows join rows.json (merged, so the file count stays within 8) -------
if [ "$DRY" = 1 ]; then
    FAMILIES=(--device cpu --op siglip,supcon --impl triton,torch --M 64 --d 32 --dtype fp32 --phase full
              --err-max-m 64 --budget-s 0.2 --min-reps 2 --interpret-max-m 64 --isolate run)
else
    read -r -a FAMILIES <<< "${FAMILY_ARGS:---op siglip,supcon,info_nce --impl triton --M 32768,65536 --d 128 --dtype bf16 --phase full --err-max-m 0 --budget-s 0.5}"
fi
FAM_DIR=$(mktemp -d /tmp/adassl_families.XXXXXX)
export FAM_DIR
merge_families() {
    [ -f "$FAM_DIR/rows.json" ] || { echo "no loss-family rows"; return 1; }
    "$PY" - "$OUT" "$FAM_DIR" <<'EOF_MERGE'
import json, sys
from pathlib import Path
from adassl_fast.apps.benchmark import write_rows
out, fam = Path(sys.argv[1]), Path(sys.argv[2])
rows = json.loads((out / "rows.json").read_text()) if (out / "rows.json").exists() else []
extra = json.loads((fam / "rows.json").read_text())
write_rows(rows + extra, out)
print(f"merged {len(extra)} loss-family rows into {out / 'rows.json'}")
EOF_MERGE
}
FAM_S=$(clip "$FAMILIES_S" 10)
step families "$FAM_S" "$PY" -m adassl_fast bench "${FAMILIES[@]}" --deadline-s $((FAM_S * 2 / 3)) --grace-s 10 \
    --no-progress --out "$FAM_DIR"
step merge 30 merge_families
rm -rf "$FAM_DIR"

# --- small M: launch-bound or not (host enqueue vs GPU vs CUDA-graph time; printed to the log only) ------------
if [ "$DRY" = 0 ] && [ "${SKIP_OVERHEAD:-0}" != 1 ]; then
    read -r -a OVERHEAD <<< "${OVERHEAD_ARGS:---impl triton,cuda --M 8192,32768}"
    step overhead "$(clip 60 10)" "$PY" "$REPO/bench/launch_overhead.py" "${OVERHEAD[@]}"
fi

# --- plots and the summary ----------------------------------------------------------------------------------
if [ -f "$OUT/rows.json" ]; then
    # three plots: with tune.json that makes the 8 files the device tool returns (time.png has the floor line,
    # so the TFLOP/s plot would repeat it; `bench/plot.py rows.json` draws it later)
    step plot 60 "$PY" "$REPO/bench/plot.py" "$OUT/rows.json" --out "$OUT" --only time,memory,speedup
fi
echo "" >> "$LOG"
{
    echo ""
    echo "=== steps"
    printf '  %s\n' "${STEPS[@]}"
    echo "files: $OUT"
    ls "$OUT" | sed 's/^/  /'
    echo ""
    if [ -f "$OUT/rows.json" ]; then
        "$PY" -m adassl_fast bench --summary "$OUT/rows.json"
    else
        echo "no rows.json: the benchmark wrote nothing"
    fi
} 2>&1 | tee -a "$LOG"
rm -rf "$SITE"
exit 0
