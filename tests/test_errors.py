"""Every bad input of docs/api.md 9: a ValueError / TypeError that names the problem, never a crash."""

import pytest
import torch

import adassl_fast


def _pair(m=6, d=4, **kw):
    return torch.randn(m, d, **kw), torch.randn(m, d, **kw)


def test_mismatched_shapes():
    with pytest.raises(ValueError, match=r"targ must have shape \(6, 4\)"):
        adassl_fast.nt_xent(torch.randn(6, 4), torch.randn(6, 5))


def test_mismatched_dtypes():
    with pytest.raises(TypeError, match="targ has dtype torch.float64 but cont has torch.float32"):
        adassl_fast.nt_xent(torch.randn(6, 4), torch.randn(6, 4, dtype=torch.float64))


def test_mismatched_devices():
    with pytest.raises(ValueError, match="targ is on meta but cont is on cpu"):
        adassl_fast.nt_xent(torch.randn(6, 4), torch.randn(6, 4, device="meta"))


def test_odd_number_of_rows_for_nt_xent():
    with pytest.raises(ValueError, match="even number of rows M = 2B.*M = 7"):
        adassl_fast.nt_xent(*_pair(7))


def test_fewer_than_two_rows():
    with pytest.raises(ValueError, match="cont must have at least 2 rows"):
        adassl_fast.nt_xent(*_pair(1))
    with pytest.raises(ValueError, match="query must have at least 2 rows"):
        adassl_fast.info_nce(*_pair(1))


def test_empty_tensor():
    with pytest.raises(ValueError, match="at least 2 rows and 1 column"):
        adassl_fast.nt_xent(torch.randn(0, 4), torch.randn(0, 4))
    with pytest.raises(ValueError, match="at least 2 rows and 1 column"):
        adassl_fast.nt_xent(torch.randn(4, 0), torch.randn(4, 0))


def test_not_a_matrix_or_not_a_tensor_or_not_floating():
    with pytest.raises(ValueError, match="cont must be 2-D"):
        adassl_fast.nt_xent(torch.randn(6), torch.randn(6))
    with pytest.raises(TypeError, match="cont must be a torch.Tensor, got list"):
        adassl_fast.nt_xent([[1.0]], torch.randn(1, 1))
    with pytest.raises(TypeError, match="cont must be float16, bfloat16, float32 or float64"):
        adassl_fast.nt_xent(torch.ones(6, 4, dtype=torch.long), torch.ones(6, 4, dtype=torch.long))


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan"), float("inf")])
def test_temperature_must_be_positive_and_finite(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        adassl_fast.nt_xent(*_pair(), temperature=temperature)


def test_bad_clamp_and_scale():
    with pytest.raises(ValueError, match="clamp must be a finite number > 0"):
        adassl_fast.nt_xent(*_pair(), clamp=0.0)
    with pytest.raises(ValueError, match="scale must be a 0-dim tensor"):
        adassl_fast.nt_xent(*_pair(), scale=torch.ones(2))
    with pytest.raises(TypeError, match="scale must be None, a float or a 0-dim tensor"):
        adassl_fast.nt_xent(*_pair(), scale="2")


def test_unknown_impl_and_unavailable_backend():
    with pytest.raises(ValueError, match="impl must be one of"):
        adassl_fast.nt_xent(*_pair(), impl="fast")
    if not torch.cuda.is_available():
        with pytest.raises(adassl_fast.BackendUnavailable, match='impl="cuda" cannot run: no CUDA device'):
            adassl_fast.nt_xent(*_pair(), impl="cuda")


def test_non_contiguous_inputs_are_made_contiguous():
    cont, targ = torch.randn(4, 6, dtype=torch.float64).t(), torch.randn(4, 6, dtype=torch.float64).t()
    assert not cont.is_contiguous()
    got = adassl_fast.nt_xent(cont, targ, impl="torch")
    ref = adassl_fast.nt_xent(cont.contiguous(), targ.contiguous(), impl="reference")
    torch.testing.assert_close(got, ref)


def test_non_finite_inputs_rejected_only_when_checks_are_on():
    cont, targ = _pair()
    cont[2, 1] = float("nan")
    assert torch.isnan(adassl_fast.nt_xent(cont, targ, impl="torch"))  # off by default: no device sync
    adassl_fast.set_checks(True)
    try:
        with pytest.raises(ValueError, match="cont contains NaN or Inf"):
            adassl_fast.nt_xent(cont, targ)
        with pytest.raises(ValueError, match="scale is NaN or Inf"):
            adassl_fast.nt_xent(*_pair(), scale=torch.tensor(float("inf")))
    finally:
        adassl_fast.set_checks(False)


def _adassl_inputs(b=4, d=3, d_r=3):
    return dict(emb_x=torch.randn(b, d), emb_y=torch.randn(b, d), post_xy=torch.randn(b, 2 * d_r),
                post_yx=torch.randn(b, 2 * d_r), prior_xy=torch.randn(b, 2 * d_r), prior_yx=torch.randn(b, 2 * d_r))


def test_latent_dim_must_equal_embedding_dim_for_the_additive_editor():
    with pytest.raises(ValueError, match="post_xy has d_r = 5 but the additive editor needs d_r == d = 3"):
        adassl_fast.adassl_nt_xent(**_adassl_inputs(d_r=5))


def test_adassl_variant_and_prior_rules():
    with pytest.raises(ValueError, match='variant must be "v"'):
        adassl_fast.adassl_nt_xent(**_adassl_inputs(), variant="x")
    inputs = _adassl_inputs()
    with pytest.raises(ValueError, match='prior_xy must be None for variant "s"'):
        adassl_fast.adassl_nt_xent(**inputs, variant="s")
    del inputs["prior_xy"], inputs["prior_yx"]
    with pytest.raises(ValueError, match='prior_xy is required for variant "v"'):
        adassl_fast.adassl_nt_xent(**inputs, variant="v")


def test_adassl_noise_shape():
    with pytest.raises(ValueError, match=r"noise_xy must have shape \(4, 3\)"):
        adassl_fast.adassl_nt_xent(**_adassl_inputs(), noise_xy=torch.randn(4, 2))


def test_latent_ops_check_their_inputs():
    with pytest.raises(ValueError, match="pre_q must have shape"):
        adassl_fast.gaussian_sample(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"noise must have shape \(3, 4\)"):
        adassl_fast.bernoulli_mask(torch.randn(3, 4), torch.rand(4, 3))
    with pytest.raises(TypeError, match="noise has dtype torch.float64 but the latent inputs has torch.float32"):
        adassl_fast.gaussian_sample(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64))


def test_info_into_a_closed_pipe_exits_quietly():
    """`adassl-fast info | head`: the reader is gone before the JSON is written; no BrokenPipeError."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "adassl_fast", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has imported torch, let alone printed
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Error" not in stderr and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("flags, message", [
    (["--M", "0"], "argument --M/-M: every value must be >= 2, got 0"),
    (["--M", "abc"], "expected a comma list of integers"),
    (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--min-reps", "0"], "argument --min-reps: must be >= 1, got 0"),
    (["--min-reps", "5", "--max-reps", "2"], "--max-reps 2 is below --min-reps 5"),
    (["--budget-s", "-1"], "argument --budget-s: must be >= 0"),
    (["--row-timeout-s", "0"], "argument --row-timeout-s: must be > 0"),
    (["--threads", "0"], "argument --threads: must be >= 1"),
    (["--op", "nope"], "'nope' is not one of nt_xent"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
])
def test_bench_flags_are_checked_with_one_line_errors(capsys, flags, message):
    from adassl_fast.apps import benchmark

    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(flags)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("adassl-fast bench: error: ") and message in err, err


def test_bench_help_gives_every_flag_its_default():
    from adassl_fast.apps import benchmark

    for action in benchmark._parser()._actions:
        if action.dest not in ("help", "worker", "summary", "sizes_for", "op", "impl"):
            assert "default" in action.help, action.dest
