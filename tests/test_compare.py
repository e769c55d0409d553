"""`adassl-fast compare` with a tiny budget: the JSON's documented keys, the chart, the path printed last."""

import json
from pathlib import Path

from adassl_fast import cli


def test_compare_tiny_budget_writes_json_and_prints_its_path_last(tmp_path, capsys):
    rc = cli.main(["compare", "--seeds", "2", "--steps", "6", "--batch-size", "32", "--eval-samples", "256",
                   "--workers", "1", "--out", str(tmp_path / "cmp")])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
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


def test_compare_rejects_unknown_methods(capsys):
    assert cli.main(["compare", "--methods", "moco"]) == 2
