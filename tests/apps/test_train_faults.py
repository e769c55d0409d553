"""Fault injection on the trainer: a process killed while writing a checkpoint, a checkpoint with flipped
bytes or cut short, a resumption with another world size or fewer steps than the checkpoint holds, a
checkpoint that does not fit the model, a torn metrics line, bad image files. Each ends in an exact
resumption or one clear error, never in a run that continues from garbage."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adassl_fast.apps import train

TINY = dict(train.PRESETS["tiny"], eval_samples=256, method="adassl-v", steps=6, log_every=1, ckpt_every=2)


def _run(run_dir, **kw):
    return train.train(train.make_config(**dict(TINY, out=str(run_dir), **kw)))


def _losses(run_dir):
    lines = [json.loads(s) for s in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if not r.get("eval")]


def _main_error(capsys, argv):
    """`adassl-fast train argv` must fail as a user error: exit 2 and one line on stderr."""
    try:
        rc = train.main(argv)
    except SystemExit as e:  # argparse's errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("adassl-fast train: error: "), err
    return err


def _argv(run_dir, *extra):
    return ["--preset", "tiny", "--method", "adassl-v", "--steps", "6", "--eval-samples", "256", "--log-every", "1",
            "--ckpt-every", "2", "--out", str(run_dir), *extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 6-step run every resumption below must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight")
    return run_dir, _run(run_dir)


# A training process that dies (SIGKILL: no cleanup, no exception handlers) at an injected point of the
# checkpoint write of step 4, after the step-2 checkpoint was written.
KILLED = textwrap.dedent("""
    import os, signal, sys
    from adassl_fast.apps import train

    where, out = sys.argv[1], sys.argv[2]
    saves = []
    write_file, replace = train._write_file, os.replace

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def torn_write(path, data):  # half the bytes reach the disk, then the process is gone
        if len(saves) == 1:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        saves.append(path)
        write_file(path, data)

    def killed_between_renames(src, dst):  # step 2's checkpoint moved aside, step 4's not yet in place
        replace(src, dst)
        if len(saves) == 2 and dst.name.endswith(".prev.pt"):
            die()

    if where == "write":
        train._write_file = torn_write
    else:
        train._write_file = lambda path, data: (saves.append(path), write_file(path, data))
        train.os.replace = killed_between_renames
    train.main(["--preset", "tiny", "--method", "adassl-v", "--steps", "6", "--eval-samples", "256",
                "--log-every", "1", "--ckpt-every", "2", "--out", out])
""")


@pytest.mark.parametrize("where", ["write", "rename"])
def test_killed_during_a_checkpoint_write_resumes_exactly(tmp_path, straight, capsys, where):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLED, where, str(run_dir)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if where == "write":  # the torn temp file is all that was lost; step 2's checkpoint is intact
        assert list(run_dir.glob("checkpoint.pt.tmp*"))
        assert train.load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2
    else:  # no checkpoint.pt at all: step 2's waits as the previous checkpoint
        assert not (run_dir / "checkpoint.pt").exists()
    resumed = _run(run_dir, resume=True)
    if where == "rename":
        assert "resuming from the previous checkpoint" in capsys.readouterr().err
    assert _losses(run_dir) == _losses(straight[0])
    assert resumed["eval"] == straight[1]["eval"]
    assert not list(run_dir.glob("*.tmp*"))


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped":
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    else:
        del data[len(data) * 3 // 4:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, capsys, how):
    run_dir = tmp_path / "run"
    _run(run_dir, stop_after=4)  # checkpoints at steps 2 and 4
    ckpt = run_dir / "checkpoint.pt"
    _damage(ckpt, how)
    resumed = _run(run_dir, resume=True)
    err = capsys.readouterr().err
    assert f"{ckpt} is corrupted" in err and "resuming from the previous checkpoint" in err
    # from step 2: steps 3-6 rerun, the same trajectory as the uninterrupted run
    assert _losses(run_dir) == _losses(straight[0])
    assert resumed["eval"] == straight[1]["eval"]


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_damaged_checkpoint_without_a_previous_one_is_one_clear_error(tmp_path, capsys, how):
    run_dir = tmp_path / "run"
    _run(run_dir, stop_after=2)  # one checkpoint only
    ckpt = run_dir / "checkpoint.pt"
    assert not train.previous_checkpoint(ckpt).exists()
    _damage(ckpt, how)
    damaged = ckpt.read_bytes()
    err = _main_error(capsys, _argv(run_dir, "--resume"))
    assert f"{ckpt} is corrupted" in err and "left untouched" in err
    assert ckpt.read_bytes() == damaged


def _rewrite_checkpoint(ckpt: Path, change) -> None:
    payload = train.load_checkpoint(ckpt)
    change(payload)
    train.save_checkpoint(ckpt, payload)


def test_resume_refuses_a_changed_world_size(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _run(run_dir, stop_after=2)
    # as written by a 2-rank torchrun: one RNG state per rank
    _rewrite_checkpoint(run_dir / "checkpoint.pt", lambda p: p.update(rng=p["rng"] * 2))
    err = _main_error(capsys, _argv(run_dir, "--resume"))
    assert "written by 2 rank(s) but this run has 1" in err and "2 x 32 to 1 x 32 pairs" in err


def test_resume_refuses_steps_below_the_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _run(run_dir, stop_after=4)
    err = _main_error(capsys, ["--preset", "tiny", "--method", "adassl-v", "--steps", "3", "--eval-samples", "256",
                               "--out", str(run_dir), "--resume"])
    assert "is at step 4 but --steps is 3; pass --steps 4 or more" in err
    assert train.load_checkpoint(run_dir / "checkpoint.pt")["step"] == 4


def test_resume_refuses_other_steps_when_a_schedule_scales_with_them(tmp_path, capsys):
    """AdaSSL-V's default beta warm-up is steps / 15: a longer --steps on resume would change it mid-run."""
    run_dir = tmp_path / "run"
    _run(run_dir, stop_after=4)
    err = _main_error(capsys, _argv(run_dir, "--resume", "--steps", "60"))
    assert "--steps 60 differs from the run's 6" in err and "beta warm-up" in err


def test_resume_may_extend_a_run_whose_schedules_do_not_scale_with_steps(tmp_path):
    run_dir = tmp_path / "run"
    _run(run_dir, method="simclr", stop_after=4)
    result = _run(run_dir, method="simclr", steps=8, resume=True)
    assert result["step"] == 8


def test_a_checkpoint_that_does_not_fit_the_model_is_one_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _run(run_dir, stop_after=2)

    def widen_first_layer(payload):
        name = next(k for k in payload["model"] if k.endswith("weight"))
        payload["model"][name] = payload["model"][name].repeat(2, 1)

    _rewrite_checkpoint(run_dir / "checkpoint.pt", widen_first_layer)
    err = _main_error(capsys, _argv(run_dir, "--resume"))
    assert "the model state in" in err and "does not fit this model" in err


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, straight):
    run_dir = tmp_path / "run"
    _run(run_dir, stop_after=4)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # the crash came mid-line
    _run(run_dir, resume=True)
    assert _losses(run_dir) == _losses(straight[0])


def test_bad_image_files_stop_the_run_at_startup_listing_them(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    img = tmp_path / "img"
    img.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (12, 12), color=(1, 2, 3)).save(img / name)
    (img / "fake.png").write_text("not an image")
    (tmp_path / "pairs.csv").write_text("img/a.png,img/b.png\nimg/a.png,img/missing.png\nimg/fake.png,img/b.png\n")
    err = _main_error(capsys, ["--preset", "tiny", "--data", "csv", "--data-path", str(tmp_path / "pairs.csv"),
                               "--out", str(tmp_path / "run")])
    assert "2 of 4 image files are unusable" in err
    assert "line 2: " in err and "missing.png: no such file" in err
    assert "line 3: " in err and "fake.png: not a readable image" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before step 1


def test_overwrite_leaves_no_checkpoint_of_the_old_run_to_fall_back_to(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _run(run_dir, stop_after=4)  # the old run: checkpoints of steps 2 and 4
    (run_dir / "checkpoint.pt").unlink()  # as after a kill between the renames: only the previous one is left
    with pytest.raises(train.CheckpointError, match=r"checkpoint.prev.pt exists: pass --resume"):
        _run(run_dir, steps=2, temperature=0.2)  # a fresh run would have rotated the old run's checkpoint away
    _run(run_dir, steps=2, temperature=0.2, overwrite=True)
    assert not train.previous_checkpoint(run_dir / "checkpoint.pt").exists()
    _damage(run_dir / "checkpoint.pt", "flipped")
    err = _main_error(capsys, _argv(run_dir, "--resume", "--steps", "2", "--temperature", "0.2"))
    assert "is corrupted" in err and "previous" not in err
