import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from data2vec.bench import _conv_backward_flops, _synthetic_batch, bench
from data2vec.config import load_config
from tests.conftest import benchmark_module

SMALL = ["model.depth=1", "target.top_k=1", "mask.clones=2", "train.threads=1"]


def _count(conv, x, mapping=None):
    with FlopCounterMode(display=False, custom_mapping=mapping or {}) as c:
        conv(x).sum().backward()
    return c.get_total_flops()


def test_grouped_conv_backward_counts_two_forwards():
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=8)
    x = torch.randn(2, 32, 5, 5, requires_grad=True)
    forward = 2 * 2 * (32 * 4 * 3 * 3) * 25  # 2 * N * prod(grouped weight) * out pixels
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    assert _count(conv, x, mapping) == 3 * forward  # forward + grad input + grad weight


def test_dense_conv_matches_torch_counter():
    conv = torch.nn.Conv1d(4, 6, 5, padding=2)
    x = torch.randn(3, 4, 10, requires_grad=True)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    assert _count(conv, x, mapping) == _count(conv, x)


@pytest.mark.parametrize(
    ("preset", "shape", "tokens"),
    [("signal-v2-tiny", (2, 1, 64), 16), ("signal3d-v2-tiny", (2, 1, 8, 32, 32), 64)],
)
def test_synthetic_batch__signal_presets_get_signals_and_nd_masks(preset, shape, tokens):
    cfg = load_config(preset, ["mask.clones=2"])
    cfg.encoder.in_chans = 1
    batch = _synthetic_batch(cfg, 2)
    assert tuple(batch.source.shape) == shape
    assert tuple(batch.mask.shape) == (4, tokens)  # (B·M, T), True = masked
    masked = batch.mask.sum(1).float() / tokens
    assert torch.allclose(masked, torch.full((4,), cfg.mask.ratio), atol=1.5 / tokens)


def test_bench__signal_preset_times_steps_with_channels_from_the_default():
    r = bench(
        "signal-v2-tiny",
        batch=2,
        steps=1,
        warmup=0,
        overrides=SMALL,
    )
    assert r["input"] == "1 x 64 signal"
    assert r["flops_per_step"] > 0 and r["step_time_s"] > 0


def test_bench__counts_and_reports_skipped_steps(monkeypatch):
    """A timed step that skipped its update (non-finite loss) is counted, not hidden."""
    import data2vec.bench as bench_module
    from data2vec.engine.trainer import StepResult

    calls = iter(range(100))

    def fake_step(state, data, cfg, device):
        i = next(calls)
        return StepResult(float("nan") if i % 2 else 1.0, 0.0, 0.0, 0.0, updated=not i % 2)

    monkeypatch.setattr(bench_module, "train_step", fake_step)
    r = bench(
        "image-v2-tiny",
        batch=2,
        steps=4,
        warmup=1,
        overrides=SMALL,
    )
    assert r["skipped_steps"] == 2 and r["loss_first"] == 1.0 and math.isnan(r["loss_last"])
    assert "2 timed step(s) SKIPPED" in bench_module.format_bench(r)


@pytest.fixture(scope="module")
def gpu_gaps():
    with benchmark_module("gpu_gaps") as module:
        yield module


def test_gpu_gaps__idle_time_grouped_by_stage_and_host_operation(gpu_gaps):
    # kernels (us): busy 0-100 (two overlapping), idle 100-150, busy 150-160, idle 160-165
    # (under min_us), busy 165-200, idle 200-300, busy 300-310
    kernels = [(0, 60, "a"), (50, 100, "b"), (150, 160, "c"), (165, 200, "d"), (300, 310, "e")]
    assert gpu_gaps.busy_intervals(kernels) == [(0, 100), (150, 160), (165, 200), (300, 310)]
    host = [(90, 140, "cudaStreamSynchronize"), (140, 149, "aten::sum"), (210, 290, "opt")]
    ranges = [(0, 205, "data2vec::forward"), (0, 400, "step"), (205, 400, "data2vec::optimizer")]
    got = gpu_gaps.idle_gaps(kernels, host, ranges, steps=2, min_us=20)
    assert got["idle_ms"] == pytest.approx((50 + 5 + 100) / 1e3 / 2)
    assert got["gaps"] == 1.0  # two gaps of >= 20 us over two steps
    assert [(g["stage"], g["host_first"], g["ms"], g["longest_ms"]) for g in got["by_cause"]] == [
        ("data2vec::optimizer", "opt", pytest.approx(0.05), pytest.approx(0.1)),
        ("data2vec::forward", "cudaStreamSynchronize", pytest.approx(0.025), pytest.approx(0.05)),
    ]
    assert got["by_cause"][1]["host_ops"] == ["cudaStreamSynchronize", "aten::sum"]


def test_train_step__names_its_stages_for_profiles(gpu_gaps):
    """``gpu_gaps`` finds the step's stages in a profile by these names."""
    from torch.profiler import ProfilerActivity, profile

    from data2vec.engine.trainer import new_state, train_step
    from data2vec.models.registry import build_model

    cfg = load_config("image-v2-tiny", ["encoder.image_size=32", *SMALL])
    device = torch.device("cpu")
    state = new_state(build_model(cfg), cfg, device)
    batch = _synthetic_batch(cfg, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(state, batch, cfg, device)
    events = prof.events()
    stages = sorted({e.name for e in events if e.name.startswith("data2vec::")})
    assert stages == [f"data2vec::{s}" for s in sorted(
        ["forward", "backward", "read", "optimizer", "teacher"])]  # fmt: skip
    got = gpu_gaps.from_profiler(events, steps=1)  # no CUDA kernels: nothing idle
    assert got == {"idle_ms": 0.0, "gaps": 0.0, "by_cause": []}
