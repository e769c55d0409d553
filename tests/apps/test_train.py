"""The trainer end to end: every method learns, resume is exact, checkpoints are safe, torchrun works."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adassl_fast.apps import train

TINY = dict(train.PRESETS["tiny"], eval_samples=256)


def _run(tmp_path, name, **kw):
    values = dict(TINY, out=str(tmp_path / name))
    values.update(kw)
    return train.train(train.make_config(**values))


def _losses(run_dir):
    lines = [json.loads(s) for s in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if not r.get("eval")]


METHODS = [
    dict(method="simclr"),
    dict(method="infonce"),
    dict(method="byol"),
    dict(method="adassl-v"),  # additive editor: the one-pass op
    dict(method="adassl-v", editor="mlp", latent_dim=4, beta_warmup_steps=10),
    dict(method="adassl-s"),  # modular editor
    dict(method="adassl-s", objective="byol"),
]


@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_tiny_training_decreases_the_loss(tmp_path, kw):
    result = _run(tmp_path, "run", steps=40, log_every=1, lr=3e-3, **kw)
    losses = [r["loss"] for r in result["losses"]]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, (first, last)
    assert set(result["eval"]) >= {"r2", "mcc", "dci_d"}
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["method"] == kw["method"] and cfg["steps"] == 40


@pytest.mark.parametrize("method", ["adassl-v", "adassl-s", "byol"])
def test_resume_continues_the_same_trajectory(tmp_path, method):
    straight = _run(tmp_path, "straight", method=method, steps=12, log_every=1, ckpt_every=4)
    _run(tmp_path, "resumed", method=method, steps=12, log_every=1, ckpt_every=4, stop_after=5)
    # Stopped after step 5: the last checkpoint is step 5 (written at the stop), metrics up to 5.
    assert train.load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 5
    resumed = _run(tmp_path, "resumed", method=method, steps=12, log_every=1, ckpt_every=4, resume=True)
    assert resumed["eval"] == straight["eval"]
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


def test_corrupted_or_missing_checkpoint_is_a_clear_error_and_left_alone(tmp_path):
    with pytest.raises(train.CheckpointError, match="no checkpoint"):
        _run(tmp_path, "nothing", resume=True)
    _run(tmp_path, "run", steps=4, ckpt_every=2)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    previous = train.previous_checkpoint(ckpt)
    for path in (ckpt, previous):  # both damaged: nothing to fall back to (tests/test_faults.py has the rest)
        path.write_bytes(path.read_bytes()[:-100])
    corrupted = ckpt.read_bytes()
    with pytest.raises(train.CheckpointError, match="corrupted.*previous checkpoint is no good either"):
        _run(tmp_path, "run", steps=8, resume=True)
    assert ckpt.read_bytes() == corrupted
    # A fresh run does not silently overwrite an existing run's checkpoint either.
    with pytest.raises(train.CheckpointError, match="--resume"):
        _run(tmp_path, "run", steps=8)
    assert ckpt.read_bytes() == corrupted
    assert not list((tmp_path / "run").glob("*.tmp*"))


def test_resume_rejects_a_changed_config(tmp_path):
    _run(tmp_path, "run", steps=4)
    with pytest.raises(train.CheckpointError, match="temperature"):
        _run(tmp_path, "run", steps=8, resume=True, temperature=0.3)


def test_wsd_schedule_is_constant_then_linear_to_zero_over_the_last_fifth():
    cfg = train.make_config(lr=1e-3, lr_schedule="wsd", steps=5000)
    decay = train.wsd_decay_steps(cfg.steps)
    assert decay == 1000  # WSD_DECAY_FRACTION 0.2 of 5000
    start = cfg.steps - decay + 1  # the last step at the full rate; the decay starts after it
    assert [train.lr_at(k, cfg) for k in (1, 2500, start)] == [1e-3, 1e-3, 1e-3]
    assert train.lr_at(start + 1, cfg) == pytest.approx(1e-3 * 999 / 1000, rel=1e-12)
    assert train.lr_at(cfg.steps - 499, cfg) == pytest.approx(1e-3 * 500 / 1000, rel=1e-12)  # half-way down
    assert train.lr_at(cfg.steps, cfg) == pytest.approx(1e-3 / 1000, rel=1e-12)  # the last step: lr / D, not 0
    rates = [train.lr_at(k, cfg) for k in range(1, cfg.steps + 1)]
    assert all(a >= b > 0 for a, b in zip(rates, rates[1:]))
    # An odd length: the decay is round(0.2 x 37) = 7 steps.
    odd = train.make_config(lr=2e-3, lr_schedule="wsd", steps=37)
    assert [train.lr_at(k, odd) / 2e-3 for k in (30, 31, 32, 37)] == pytest.approx([1, 1, 6 / 7, 1 / 7], rel=1e-12)


def test_resume_with_other_steps_is_refused_under_wsd(tmp_path):
    """The wsd decay starts at a share of --steps: a continued run with other --steps would not be the one
    checkpointed."""
    _run(tmp_path, "run", steps=6, lr_schedule="wsd", stop_after=3)
    with pytest.raises(train.CheckpointError, match="wsd learning rate"):
        _run(tmp_path, "run", steps=10, lr_schedule="wsd", resume=True)


def test_cli_flags_override_preset_and_config_file(tmp_path, capsys):
    (tmp_path / "cfg.json").write_text(json.dumps({"temperature": 0.2, "steps": 3}))
    cfg = train.config_from_args(["--preset", "tiny", "--config", str(tmp_path / "cfg.json"), "--steps", "5",
                                  "--latent-hidden", "8-8", "--learnable-scale"])
    assert (cfg.steps, cfg.temperature, cfg.latent_hidden, cfg.learnable_scale) == (5, 0.2, (8, 8), True)
    assert cfg.batch_size == train.PRESETS["tiny"]["batch_size"]
    rc = train.main(["--preset", "tiny", "--steps", "3", "--eval-samples", "256", "--out", str(tmp_path / "cli")])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3
    with pytest.raises(SystemExit) as exit_info:  # argparse's one-line error
        train.main(["--preset", "tiny", "--method", "nope", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2


def test_chunked_backward_matches_full_batch(tmp_path):
    a = _run(tmp_path, "full", method="adassl-v", steps=3, log_every=1)
    b = _run(tmp_path, "chunked", method="adassl-v", steps=3, log_every=1, chunk_size=8)
    for (_, la), (_, lb) in zip(_losses(tmp_path / "full"), _losses(tmp_path / "chunked"), strict=True):
        assert la == pytest.approx(lb, rel=1e-4)
    assert a["eval"]["r2"] == pytest.approx(b["eval"]["r2"], abs=1e-3)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "adassl_fast.apps.train", "--preset", "tiny", "--steps", "4", "--eval-samples", "256",
           "--method", "adassl-v", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_losses(out)) >= 1
    ckpt = train.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2


def test_image_pairs_train_with_the_small_resnet(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    clip = tmp_path / "frames" / "clip0"
    clip.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (24, 20), color=(40 * i, 100, 255 - 40 * i)).save(clip / f"{i:02d}.png")
    result = _run(tmp_path, "img", data="frames", data_path=str(tmp_path / "frames"), frame_gap=2, image_size=16,
                  augment="weak", batch_size=4, steps=2, method="adassl-s", threads=1)
    assert result["step"] == 2 and result["eval"] == {}
    assert "SmallResNet" not in str(train.make_encoder(train.make_config(method="simclr")).__class__)


BAD_FLAGS = [
    (["--impl", "cuda"], "--impl cuda cannot run"),  # (no GPU in this test environment: skipped on one)
    (["--ckpt-every", "0"], "--ckpt-every: must be >= 1"),
    (["--log-every", "0"], "--log-every: must be >= 1"),
    (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--threads", "-1"], "--threads: must be >= 0"),
    (["--encoder", "resnet"], "--encoder resnet cannot take --data synthetic"),
    (["--chunk-size", "-5"], "--chunk-size: must be >= 0"),
    (["--ema-tau", "2"], "--ema-tau: must be <= 1"),
    (["--weight-decay", "-1"], "--weight-decay: must be >= 0"),
    (["--augment", "foo"], "--augment: must be one of 'none', 'weak', 'strong'"),
    (["--n-latents", "0"], "--n-latents: must be >= 1"),
    (["--eval-samples", "2"], "eval_samples must be >= max(100, 10 x n_latents) = 100"),
    (["--temperature", "0"], "--temperature: must be > 0"),
    (["--steps", "1.5"], "--steps: expected an integer, got '1.5'"),
    (["--latent-hidden", "8-x"], "--latent-hidden: expected sizes like 128-128"),
    (["--learnable-scale", "maybe"], "--learnable-scale: expected a boolean"),
    (["--method", "nope"], "--method: must be one of 'simclr'"),
    (["--data", "csv"], "--data csv needs --data-path"),
    (["--config", "/no/such.json"], "--config /no/such.json"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_flags_are_one_line_errors_exit_2_before_training(tmp_path, capsys, flags, message):
    if flags == ["--impl", "cuda"] and torch.cuda.is_available():
        pytest.skip("the CUDA backend may run here")
    try:
        rc = train.main(["--preset", "tiny", "--out", str(tmp_path / "run"), *flags])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("adassl-fast train: error: ") and message in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_every_field_has_an_option_its_default_passes_and_help_shows_it():
    fields = {f.name: getattr(train.Config(), f.name) for f in dataclasses.fields(train.Config)}
    assert set(train.OPTIONS) == set(fields)
    for name, default in fields.items():
        assert train.OPTIONS[name].check(name, default) == default
    helps = {a.dest: a.help for a in train.build_parser()._actions if a.dest != "help"}
    for name in fields:
        assert train.OPTIONS[name].help in helps[name] and "(default: " in helps[name], name
    # the same checks refuse values that come from a config file or keyword arguments
    with pytest.raises(ValueError, match="ema_tau must be <= 1"):
        train.make_config(ema_tau=2.0)
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        train.make_config(batch_size=64.0)
