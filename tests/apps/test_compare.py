"""`adassl-fast compare`: the JSON's documented keys, the paired table, one default shared with `train`, its
worker processes (same results as one process, errors raised, safe under `python -m`),
its runs equal to `adassl-fast train`'s, one mixing per seed, and one-line command-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adassl_fast.apps import cli, compare, train


def test_compare_tiny_budget_writes_json_and_prints_its_path_last(tmp_path, capsys):
    rc = cli.main(["compare", "--seeds", "2", "--steps", "6", "--batch-size", "32", "--eval-samples", "256",
                   "--out", str(tmp_path / "cmp")])
    assert rc == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    path = Path(lines[-1])
    assert path == tmp_path / "cmp" / "compare.json" and path.exists()
    report = json.loads(path.read_text())
    for method in ("simclr", "adassl-v", "adassl-s"):
        for metric in ("r2", "mcc", "dci_d"):
            stats = report[method][metric]
            assert set(stats) >= {"mean", "std"}
            assert len(stats["values"]) == 2
            assert isinstance(stats["mean"], float) and stats["std"] >= 0
        assert report[method]["temperature"] == 0.05
    assert report["meta"]["protocol"]["seeds"] == 2
    assert (tmp_path / "cmp" / "compare.png").exists()
    assert any("adassl-v" in line and "+-" in line for line in lines)
    # Paired against SimCLR, seed by seed.
    paired = report["meta"]["paired"]["adassl-s"]["mcc"]
    expected = [a - b for a, b in zip(report["adassl-s"]["mcc"]["values"], report["simclr"]["mcc"]["values"],
                                      strict=True)]
    assert paired["deltas"] == pytest.approx(expected)
    assert paired["ahead"] == sum(d > 0 for d in expected)
    assert any(line.startswith("adassl-s") and "ahead on" in line and "/2" in line for line in lines)
    assert "compare (6 runs): building the data" in captured.err  # the progress bar, before the first step
    assert "compare (6 runs): 100%" in captured.err and "36/36" in captured.err  # timed from the first step


def test_compare_tune_tau_keeps_each_methods_best(tmp_path, capsys):
    rc = cli.main(["compare", "--seeds", "1", "--steps", "3", "--batch-size", "16", "--eval-samples", "128",
                   "--workers", "1", "--methods", "simclr", "--tune-tau", "--taus", "0.1,0.5",
                   "--out", str(tmp_path / "tune")])
    assert rc == 0
    report = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    sweep = report["meta"]["per_temperature"]["simclr"]
    assert set(sweep) == {"0.1", "0.5"}
    best = max(sweep, key=lambda t: sweep[t]["r2"]["mean"])
    assert report["simclr"]["temperature"] == float(best)


def _compare_args(*argv):
    return compare.build_parser().parse_args(list(argv))


def test_compare_runs_are_adassl_fast_train_runs(tmp_path):
    """A stacked group trains each run exactly as `adassl-fast train` trains it alone (same init, data, noise,
    clipping and schedule): after a few steps the encoders agree to float rounding. Adam turns rounding in a
    near-zero gradient into a step of up to ~lr, so a few weights may differ by ~1e-4; the mean difference is
    ~1e-8, where a wrong noise stream or learning rate gives ~1e-4."""
    steps = 4
    args = _compare_args("--steps", str(steps), "--batch-size", "32", "--eval-samples", "128")
    configs = [compare.run_config(m, 1, 0.05, args) for m in compare.METHODS]
    runs = compare.Runs(configs)
    for step in range(1, steps + 1):
        runs.step(step)
    for r, cfg in enumerate(configs):
        out = tmp_path / cfg.method
        train.train(train.make_config(**{**cfg.__dict__, "out": str(out)}))
        alone = train.load_checkpoint(out / train.CHECKPOINT)["model"]
        layers = [k for k in alone if k.startswith("encoder.") and k.endswith(".weight")]
        for i, key in enumerate(layers):
            diff = (runs.encoder.weights[i][r].T - alone[key]).abs()
            assert diff.mean() < 1e-6 and diff.max() < 1e-3, (cfg.method, key, diff.mean(), diff.max())
        assert len(layers) == len(runs.encoder.weights)


def test_beta_warmup_has_one_default_shared_by_train_and_compare():
    assert train.Config().beta_warmup_steps == -1  # docs/spec.md 7's share, resolved by train.beta_warmup_steps
    steps = 1500
    args = _compare_args("--steps", str(steps))
    for method, expected in (("adassl-v", 100), ("adassl-s", 0)):
        from_cli = train.config_from_args(["--method", method, "--steps", str(steps)])
        alone = train.SSLModel(from_cli, train.make_encoder(from_cli)).head
        runs = compare.Runs([compare.run_config(method, 0, 0.05, args)])
        assert alone.beta_warmup_steps == runs.models[0].head.beta_warmup_steps == expected


def test_steps_and_learning_rate_schedule_have_one_default_shared_by_train_and_compare():
    """`adassl-fast compare` with no flags trains each run as `adassl-fast train --method M` with no flags: the
    same steps, learning rate and schedule, so the same learning rate at every step."""
    args = _compare_args()
    for method in compare.METHODS:
        run = compare.run_config(method, 0, 0.05, args)
        alone = train.config_from_args([f"--{k.replace('_', '-')}={v}" for k, v in compare.METHODS[method].items()])
        assert (run.steps, run.lr, run.lr_schedule) == (alone.steps, alone.lr, alone.lr_schedule)
        assert [train.lr_at(k, run) for k in (1, run.steps // 2, run.steps)] == \
            [train.lr_at(k, alone) for k in (1, alone.steps // 2, alone.steps)]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "wsd"])
def test_every_learning_rate_schedule_of_train_passes_through_compare(schedule):
    assert schedule in train.OPTIONS["lr_schedule"].choices
    args = _compare_args("--lr-schedule", schedule, "--steps", "50")
    run = compare.run_config("adassl-v", 0, 0.05, args)
    alone = train.config_from_args(["--method", "adassl-v", "--lr-schedule", schedule, "--steps", "50"])
    assert run.lr_schedule == alone.lr_schedule == schedule
    assert [train.lr_at(k, run) for k in range(1, 51)] == [train.lr_at(k, alone) for k in range(1, 51)]


def test_each_seed_has_its_own_mixing_shared_by_the_methods():
    args = _compare_args("--steps", "1")
    runs = compare.Runs([compare.run_config(m, s, 0.05, args) for m in ("simclr", "adassl-s") for s in (0, 1)])
    sets = list(runs.datasets.values())
    assert len(sets) == 2 and [d.seed for d in sets] == [0, 1]
    assert not torch.equal(sets[0].mixing[0].weight, sets[1].mixing[0].weight)
    assert runs.run_data.tolist() == [0, 1, 0, 1]  # simclr and adassl-s of seed s see seed s's mixing and stream


def test_paired_differences_per_seed():
    summary = {"simclr": {k: {"values": [0.5, 0.6, 0.7]} for k in compare.METRICS},
               "adassl-s": {k: {"values": [0.6, 0.5, 0.8]} for k in compare.METRICS}}
    p = compare.paired(summary, "adassl-s")["r2"]
    assert p["deltas"] == pytest.approx([0.1, -0.1, 0.1]) and p["ahead"] == 2
    assert p["mean"] == pytest.approx(0.1 / 3)


@pytest.mark.parametrize("argv", [
    ["--methods", "moco"], ["--methods", ","], ["--steps", "0"], ["--steps", "ten"], ["--seeds", "-1"],
    ["--temperature", "0"], ["--temperature", "nan"], ["--lr", "-1e-3"], ["--lr-schedule", "linear"],
    ["--taus", "0.1,x"], ["--workers", "0"], ["--batch-size", "1"], ["--no-such-flag"],
])
def test_command_line_errors_are_one_line_and_exit_2(argv, capsys):
    assert cli.main(["compare", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("adassl-fast compare: error: "), err


def test_unwritable_out_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["compare", "--steps", "1", "--out", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("adassl-fast compare: error: --out"), err


def test_every_flag_has_a_type_or_choices_a_default_and_help():
    for action in compare.build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        assert action.default is not None, action.dest
        assert action.type is not None or action.choices or action.nargs == 0 or action.const is not None, action.dest
    assert compare.build_parser().format_help().count("(default:") >= 12


def test_worker_processes_train_what_one_process_trains():
    """train_groups (a spawned worker per group) gives each run the metrics, curve and run-step count that
    the same group trained here gives."""
    args = _compare_args("--steps", "4", "--batch-size", "32", "--eval-samples", "128")
    groups = [[compare.run_config("adassl-v", 0, 0.05, args)],
              [compare.run_config(m, 1, 0.05, args) for m in ("simclr", "adassl-s")]]
    counted = []
    in_workers = compare.train_groups(groups, eval_steps=(2,), advance=counted.append)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(groups)))  # as each worker
    try:
        here = [compare.Runs(g).train(eval_steps=(2,)) for g in groups]
    finally:
        torch.set_num_threads(threads)
    assert in_workers == here
    assert sum(counted) == 4 * 3


def test_a_failing_worker_raises_its_error():
    args = _compare_args("--steps", "4", "--batch-size", "32", "--eval-samples", "128")
    mismatched = train.make_config(**{**compare.run_config("simclr", 0, 0.05, args).__dict__, "lr": 5e-4})
    groups = [[compare.run_config("simclr", 0, 0.05, args)], [compare.run_config("adassl-s", 0, 0.05, args),
                                                               mismatched]]
    with pytest.raises(ValueError, match="runs trained together must share"):
        compare.train_groups(groups)


def test_compare_spawns_its_workers_from_python_dash_m(tmp_path):
    """`python -m adassl_fast compare`: the spawned workers must not rerun the package's __main__ (the CLI)."""
    proc = subprocess.run([sys.executable, "-m", "adassl_fast", "compare", "--seeds", "1", "--steps", "2",
                           "--batch-size", "16", "--eval-samples", "128", "--methods", "simclr", "--no-progress",
                           "--out", str(tmp_path / "cmp")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "cmp" / "compare.json")
    assert proc.stderr.count("compare: 1 methods") == 1  # the CLI ran once, not again in a worker


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C in any command (here during compare's training): `adassl-fast: interrupted` and the shell's
    status for SIGINT, not a traceback."""
    import signal

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "_train_all", interrupted)
    assert cli.main(["compare", "--steps", "1"]) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip().splitlines()[-1] == "adassl-fast: interrupted"
