"""Where one stacked training step of `adassl-fast compare` spends its time: torch.profiler over 40 steps of
the larger of the two default groups (5 of the 9 runs: simclr seeds 0, 2, adassl-v seed 1, adassl-s seeds 0, 2),
one thread, after 20 warm-up steps. Prints the operators by self CPU time.

    python profile_step.py > profile_step.txt
"""

import torch
from torch.profiler import ProfilerActivity, profile

from adassl_fast.apps import compare

torch.set_num_threads(1)
args = compare.build_parser().parse_args(["--steps", "200"])
jobs = [(m, s) for m in compare.METHODS for s in range(3)]
runs = compare.Runs([compare.run_config(m, s, 0.05, args) for m, s in jobs[0::2]])
for step in range(1, 21):
    runs.step(step)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for step in range(21, 61):
        runs.step(step)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
