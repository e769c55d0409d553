#!/bin/bash
# One round of the side-by-side: OP (default nt_xent) forward + backward, d = 128, float32, for each M given, one fresh
# process per row (`adassl-fast bench`: one warm-up call, then one timed call whose peak RSS is the row's extra
# memory), in the order plain eager / torch backend before (fcc2923) / after, rotated by the round number.
#   usage: [OP=nt_xent|info_nce|adassl] [ROWS="eager before after"] flock /tmp/adassl_timing.lock bash run.sh ROUND M [M ...]
# "before" is the package at fcc2923, unpacked beside: git archive fcc2923 adassl_fast | tar -x -C $BEFORE
set -e
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
before=${BEFORE:-/tmp/adassl_fast_fcc2923}
op=${OP:-nt_xent}
round=$1
shift
for m in "$@"; do
  common=(--op "$op" -M "$m" -d 128 --dtype fp32 --min-reps 1 --max-reps 1 --budget-s 0 --torch-max-m 65536
          --no-progress)
  run_after() { (cd "$repo" && .venv/bin/adassl-fast bench --impl torch "${common[@]}" --out "$here/raw/$op-r$round-m$m-after"); }
  run_eager() { (cd "$repo" && .venv/bin/adassl-fast bench --impl eager "${common[@]}" --out "$here/raw/$op-r$round-m$m-eager"); }
  # (from outside the checkout, so the unpacked old package is imported, not the editable install)
  run_before() { (cd /tmp && ADASSL_FAST_COMMIT=fcc2923 PYTHONPATH="$before" "$repo/.venv/bin/python" -m adassl_fast.benchmark \
                  --impl torch "${common[@]}" --out "$here/raw/$op-r$round-m$m-before"); }
  order=(${ROWS:-eager before after})  # ROWS="before": a subset, to keep one locked command short
  for k in "${!order[@]}"; do
    "run_${order[$(( (k + round) % ${#order[@]} ))]}" | grep -E "^ *$op |not run" || true
  done
done
