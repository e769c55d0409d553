"""Backend selection, ADASSL_FAST_IMPL, info() and the `info` command."""

import json
import subprocess
import sys

import pytest
import torch

import adassl_fast
from adassl_fast._dispatch import _triton_reason, resolve_impl, unavailable_reason


def test_auto_picks_torch_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("ADASSL_FAST_IMPL", raising=False)
    assert resolve_impl("auto", torch.device("cpu")) == "torch"


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("ADASSL_FAST_IMPL", "reference")
    assert resolve_impl("auto", torch.device("cpu")) == "reference"
    cont, targ = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    assert adassl_fast.nt_xent(cont, targ).item() == adassl_fast.nt_xent(cont, targ, impl="reference").item()
    monkeypatch.setenv("ADASSL_FAST_IMPL", "nonsense")
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("auto", torch.device("cpu"))


def test_explicit_impl_beats_the_environment(monkeypatch):
    monkeypatch.setenv("ADASSL_FAST_IMPL", "reference")
    assert resolve_impl("torch", torch.device("cpu")) == "torch"


def test_info_lists_every_backend_with_a_reason(monkeypatch):
    monkeypatch.setenv("ADASSL_FAST_CUDA_WGMMA", "1")
    report = adassl_fast.info()
    assert report["backends"]["cuda"]["wgmma"]  # the opt-in tile path is reported
    assert set(report["backends"]) == {"reference", "torch", "triton", "cuda"}
    for entry in report["backends"].values():
        assert entry["available"] == (entry["reason"] is None)
    assert report["backends"]["torch"]["available"]
    if not torch.cuda.is_available():
        assert "no CUDA device" in report["backends"]["cuda"]["reason"]


def test_triton_is_unavailable_on_a_gpu_its_table_does_not_cover(monkeypatch):
    from adassl_fast.kernels import configs

    def t4(device):
        return configs.arch_class(7, 5, 65536)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        for arch_of, expected in ((t4, "need compute capability >= 8.0 (bf16 tensor cores); this GPU is 7.5"),
                                  (lambda device: "sm86", None)):
            _triton_reason.cache_clear()  # probed once a process
            monkeypatch.setattr(configs, "arch_of", arch_of)
            reason = unavailable_reason("triton")
            assert reason is None if expected is None else expected in reason
    finally:
        _triton_reason.cache_clear()


def test_info_command_prints_json():
    out = subprocess.run([sys.executable, "-m", "adassl_fast", "info"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["backends"]["torch"]["available"] is True


def test_import_needs_no_triton_and_no_gpu():
    code = ("import sys; sys.modules['triton'] = None; import adassl_fast; "
            "print(adassl_fast.info()['backends']['triton'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "not importable" in out.stdout


@pytest.mark.triton
def test_triton_without_a_vetted_gpu_config_is_unavailable_or_skipped_by_auto(monkeypatch):
    from adassl_fast.kernels import configs

    monkeypatch.delenv("ADASSL_FAST_IMPL", raising=False)
    monkeypatch.setattr(configs, "arch_of", lambda device: "sm90")  # as on an H200
    here = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the interpreter runs Triton
    assert resolve_impl("triton", here, torch.bfloat16, 128) == "triton"
    with pytest.raises(adassl_fast.BackendUnavailable, match='impl="triton" cannot run: no vetted Triton config'):
        resolve_impl("triton", here, torch.float64, 128)
    if not torch.cuda.is_available():  # auto moves on to cuda, then torch
        assert resolve_impl("auto", torch.device("cuda"), torch.float64, 128) == "torch"
        assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16, 512) == "triton"  # the widest entry
        assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16, 600) == "torch"


@pytest.mark.triton
@pytest.mark.parametrize("arch", ["sm90", "sm80", "sm86"])
def test_auto_picks_triton_for_float32_cuda_tensors(monkeypatch, arch):
    """fp32 features (F.normalize's output under AMP) stay on the fused path (fp16 operands, fp32 statistics:
    docs/backends.md), never falling to a first-use CUDA build or the torch backend."""
    from adassl_fast.kernels import configs

    monkeypatch.delenv("ADASSL_FAST_IMPL", raising=False)
    monkeypatch.setattr(configs, "arch_of", lambda device: arch)
    cuda = torch.device("cuda")
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        _triton_reason.cache_clear()
        monkeypatch.setattr(adassl_fast._dispatch, "_cuda_reason", lambda: "no CUDA build here")
    try:
        for d in (5, 100, 128, 300, 512):
            assert resolve_impl("auto", cuda, torch.float32, d) == "triton", d
            assert configs.pick_config("bwd_row", cuda, torch.float32, d) == configs.pick_config(
                "bwd_row", cuda, torch.float16, d)  # the fp16 operands' shapes
        assert resolve_impl("auto", cuda, torch.float32, 600) == "torch"  # past the widest entry
        monkeypatch.setenv("ADASSL_FAST_IMPL", "torch")  # the opt-out for true fp32 operands
        assert resolve_impl("auto", cuda, torch.float32, 128) == "torch"
    finally:
        _triton_reason.cache_clear()
