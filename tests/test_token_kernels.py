"""The Triton kernels (``data2vec/nn/token_conv.py``, ``token_layer.py``, ``token_norm.py``,
``token_attention.py``, ``token_mlp.py``).

The kernels themselves are checked against the plain PyTorch ops in a fresh process under
Triton's CPU interpreter (``interpreted_token_*.py``); here, what runs without it.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data2vec.config import load_config
from data2vec.errors import ConfigError
from data2vec.models.decoders import ConvDecoder
from data2vec.models.registry import build_model
from data2vec.nn import token_conv, triton_gate
from data2vec.nn.block import PostLNBlock

HERE = Path(__file__).parent


def _installed_triton() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def test_kernels_match_the_plain_ops_under_the_interpreter():
    installed = _installed_triton()
    assert installed is not None, f"the tests need {triton_gate.NEEDS_TRITON}"
    if not triton_gate.supported_triton(installed):
        # An older Triton (torch 2.4's own 3.0, say): the kernels stay off, and asking for
        # them says which Triton they need.
        assert triton_gate.triton is None
        dec = ConvDecoder(8, 8, 2, 3, 2, grid=(2, 3), conv_impl="triton")
        with pytest.raises(RuntimeError, match=r"Triton >= 3\.2"):
            dec(torch.randn(2, 6, 8))
        return
    assert triton_gate.triton is not None
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    names = ("kernels", "norm", "attention", "mlp", "loss", "gemm")
    inner = [str(HERE / f"interpreted_token_{name}.py") for name in names]
    inner.append(str(HERE / "interpreted_kernel_check.py"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "-o", "python_files=interpreted_*.py", *inner]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "109 passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_device_guard_makes_the_tensors_gpu_current_only_when_it_is_not(monkeypatch):
    """Triton launches on the current GPU: a model on cuda:1 while cuda:0 is current gets a
    guard for cuda:1 around its launches; on the current GPU or the CPU, none."""
    import contextlib

    class OnGpu1:  # stands in for a tensor on cuda:1 (no GPU here)
        is_cuda = True
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = token_conv.device_guard(OnGpu1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert isinstance(token_conv.device_guard(OnGpu1()), contextlib.nullcontext)
    assert isinstance(token_conv.device_guard(torch.zeros(1)), contextlib.nullcontext)


def test_triton_releases_older_than_the_kernels_need_are_refused():
    assert triton_gate.MIN_TRITON == (3, 2)
    for version in ("3.2.0", "3.6.0", "3.10.1", "4.0.0", "3.3.0+git9a2f", "3.2.0rc1"):
        assert triton_gate.supported_triton(version), version
    for version in ("3.1.0", "3.0.0", "2.3.1", "3.1.0+gitabc"):
        assert not triton_gate.supported_triton(version), version


def test_conv_impl_is_validated():
    with pytest.raises(ConfigError, match=r"decoder.conv_impl.*'auto', 'torch', 'triton'"):
        load_config("image-v2-tiny", ["decoder.conv_impl=cudnn"])
    assert load_config("image-v2-tiny", ["decoder.conv_impl=torch"]).decoder.conv_impl == "torch"


@pytest.mark.skipif(token_conv.interpreting(), reason="this process runs the interpreter")
def test_the_cpu_attends_through_sdpa_and_keeps_the_memory_lean_mlp():
    from data2vec.nn import token_attention, token_mlp
    from data2vec.nn.block import Mlp

    qkv = torch.randn(2, 40, 3 * 64)
    assert not token_attention.supports(qkv, 4)
    assert token_mlp.ENABLED and not token_mlp.supports(qkv[..., :64], Mlp(64, 256))


@pytest.mark.skipif(token_conv.interpreting(), reason="this process runs the interpreter")
def test_auto_runs_torch_on_the_cpu_and_triton_says_why_it_cannot():
    torch.manual_seed(0)
    dec = ConvDecoder(8, 8, 2, 3, 2, grid=(2, 3), conv_impl="auto")
    x = torch.randn(2, 6, 8)
    assert not dec.uses_triton(x)
    dec.conv_impl = "triton"
    with pytest.raises(RuntimeError, match=r"decoder\.conv_impl=torch"):
        dec(x)


def test_too_many_channels_per_group_is_not_supported():
    """The weight-gradient kernel holds a group's whole block: at most 128 channels."""
    assert token_conv.supports(torch.empty(256, 128, 3, 3), groups=2)
    assert not token_conv.supports(torch.empty(256, 256, 3, 3), groups=1)
    assert not token_conv.supports(torch.empty(64, 8, 2, 2), groups=8)  # even kernel


def test_vector_loads_are_as_wide_as_the_channels_allow():
    """A vector of packed (tap, channel) pairs must not cross a tap: its width divides the
    group's channels (at most 16)."""
    assert [token_conv._vec(c) for c in (48, 12, 24, 7, 64, 96)] == [16, 4, 8, 1, 16, 16]


def test_norm_impl_is_validated_and_reaches_the_blocks():
    with pytest.raises(ConfigError, match=r"model.norm_impl.*'auto', 'torch', 'triton'"):
        load_config("image-v2-tiny", ["model.norm_impl=apex"])
    cfg = load_config("image-v2-tiny", ["model.norm_impl=torch"])
    blocks = [m for m in build_model(cfg).modules() if isinstance(m, PostLNBlock)]
    assert len(blocks) == 5 and all(b.norm_impl == "torch" for b in blocks)


@pytest.mark.skipif(token_conv.interpreting(), reason="this process runs the interpreter")
def test_auto_norms_stay_plain_on_the_cpu():
    """``auto`` fuses the norms on CUDA only, ``triton`` on the CPU only under the interpreter
    (the interpreted tests show it does there); without autocast neither does."""
    block = PostLNBlock(8, 2, norm_impl="auto")
    x = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not block.uses_fused_norms(x)
        block.norm_impl = "triton"
        assert not block.uses_fused_norms(x)
        block(x)  # and runs the plain ops


@pytest.mark.skipif(token_conv.interpreting(), reason="this process runs the interpreter")
def test_disabled_kernels_give_way_to_the_torch_ops_even_where_triton_was_asked_for():
    """After a failed start-up check (``token_conv.disable`` of the decoder's kind) a decoder
    set to ``triton`` runs the torch convolution instead of refusing, with the same output as
    ``torch``, and the other kinds are untouched; ``enable`` undoes it; an unknown kind is an
    error. Where no kernel runs (the CPU), the check itself does nothing."""
    from data2vec.bench import _synthetic_batch
    from data2vec.engine import kernel_check

    torch.manual_seed(0)
    dec = ConvDecoder(8, 8, 2, 3, 2, grid=(2, 3), conv_impl="triton")
    x = torch.randn(2, 6, 8)
    try:
        token_conv.disable("a test", ["decoder"])
        assert token_conv.disabled() == {"decoder": "a test"}
        assert token_conv.is_suspended("decoder") and not token_conv.is_suspended("norms")
        assert not dec.uses_triton(x)
        out = dec(x)
        dec.conv_impl = "torch"
        torch.testing.assert_close(out, dec(x), rtol=0, atol=0)
        dec.conv_impl = "triton"
    finally:
        token_conv.enable()
    assert token_conv.disabled() == {} and not token_conv.is_suspended("decoder")
    with pytest.raises(ValueError, match=r"unknown kinds of layer \['conv'\]; the kinds are"):
        token_conv.disable("a test", ["conv"])
    with pytest.raises(RuntimeError, match=r"decoder\.conv_impl=torch"):
        dec(x)
    cfg = load_config("image-v2-tiny", ["mask.clones=2"])
    cpu = torch.device("cpu")
    assert not kernel_check.kernels_run_on(cpu)
    assert (
        kernel_check.check_pretraining(build_model(cfg), _synthetic_batch(cfg, 2), cpu, "fp32")
        is None
    )
