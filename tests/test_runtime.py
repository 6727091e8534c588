import os
import subprocess
import sys

import pytest

from data2vec._runtime import _USER_MALLOC_ENV

CODE = "import os, data2vec, torch; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, "PASSIVE"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
        ({"GOMP_SPINCOUNT": "1000"}, "None"),
    ],
)
def test_omp_wait_policy_default_respects_the_user(env, expected):
    assert _policy(env) == expected


def test_threads_never_exceed_available_cores():
    from data2vec.engine.runtime import available_cores, configure_threads

    assert configure_threads(10_000) == available_cores()
    assert configure_threads(1) == 1
    configure_threads(None)


TRIM_CODE = "import data2vec._runtime as r; print(r.release_free_memory(0))"


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "glibc" not in os.confstr("CS_GNU_LIBC_VERSION"),
    reason="malloc_trim is glibc's",
)
@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, "True"),
        ({"DATA2VEC_MALLOC_TRIM": "0"}, "False"),
        ({"LD_PRELOAD": "libjemalloc.so.2"}, "False"),
    ],
)
def test_release_free_memory__glibc_only_and_can_be_turned_off(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("DATA2VEC_MALLOC_TRIM", "LD_PRELOAD")}
    out = subprocess.run(
        [sys.executable, "-c", TRIM_CODE], env={**base, **env}, capture_output=True, text=True
    )
    assert out.stdout.strip() == expected, out.stderr


def test_audio_embed__releases_free_memory_once_when_backward_reaches_the_cnn(monkeypatch):
    import torch

    import data2vec._runtime as runtime
    from data2vec.config import load_config
    from data2vec.models.registry import build_model
    from tests.conftest import TINY_AUDIO

    calls = []
    monkeypatch.setattr(runtime, "release_free_memory", lambda: calls.append(1))
    model = build_model(load_config("audio-v2-tiny", TINY_AUDIO))
    local, _ = model.encoder.modality.embed(torch.randn(2, 3200))
    assert calls == []
    grad = torch.randn_like(local)
    (g,) = torch.autograd.grad(local, model.encoder.modality.local_encoder.proj.bias, grad)
    assert calls == [1]
    torch.testing.assert_close(g, grad.sum((0, 1)))  # the hook leaves the gradient as it is
    with torch.no_grad():
        model.encoder.modality.embed(torch.randn(2, 3200))  # no graph, no hook
    assert calls == [1]


def test_encoder__releases_free_memory_halfway_through_the_blocks_and_a_quarter_back(
    monkeypatch,
):
    import torch

    import data2vec._runtime as runtime
    import data2vec.models.encoder as encoder
    from data2vec.config import load_config
    from data2vec.modalities.base import Context
    from data2vec.models.registry import build_model

    events = []
    monkeypatch.setattr(encoder, "release_free_memory", lambda: events.append("trim"))
    monkeypatch.setattr(runtime, "release_free_memory", lambda: events.append("backward trim"))
    model = build_model(load_config("image-v2-tiny", ["encoder.image_size=32"])).encoder.eval()
    blocks = list(model.blocks)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: events.append(f"block {i}"))
        block.register_full_backward_pre_hook(lambda m, g, i=i: events.append(f"back {i}"))
    x = torch.randn(2, 5, model.embed_dim, requires_grad=True)
    out = model.forward_blocks(Context(x, None, None))
    n, mid, late = len(blocks), len(blocks) // 2, 3 * len(blocks) // 4
    assert n == 4 and (mid, late) == (2, 3)  # the positions the assertions below spell out
    assert events == ["block 0", "block 1", "trim", "block 2", "block 3"]
    events.clear()
    grad = torch.randn_like(out.x)
    (g,) = torch.autograd.grad(out.x, x, grad)
    # once the last quarter's (block 3's) backward is done, and again halfway back
    assert events == ["back 3", "backward trim", "back 2", "backward trim", "back 1", "back 0"]
    # the hooks leave the gradient as it is: the same as with the hooks' trims switched off
    events.clear()
    monkeypatch.setattr(encoder, "_release_midway", lambda x: None)
    monkeypatch.setattr(encoder, "_release_a_quarter_back", lambda x: None)
    (plain,) = torch.autograd.grad(model.forward_blocks(Context(x, None, None)).x, x, grad)
    torch.testing.assert_close(g, plain, rtol=0, atol=0)
    monkeypatch.undo()
    monkeypatch.setattr(encoder, "release_free_memory", lambda: events.append("trim"))
    with torch.no_grad():  # no graph: nothing to release for
        model.forward_blocks(Context(x, None, None))
    assert "trim" not in events


def test_release_free_memory__skips_small_processes():
    from data2vec._runtime import release_free_memory

    assert release_free_memory(min_rss=1 << 50) is False  # no process holds a petabyte


def test_train_step__releases_free_memory_before_backward_only(monkeypatch):
    import torch

    import data2vec.engine.trainer as trainer
    from data2vec.bench import _synthetic_batch
    from data2vec.config import load_config
    from data2vec.models.registry import build_model

    events = []
    monkeypatch.setattr(trainer, "release_free_memory", lambda: events.append("trim"))
    monkeypatch.setattr(trainer, "choose_heap_mode", lambda: events.append("heap"))
    cfg = load_config("image-v2-tiny", ["encoder.image_size=32", "mask.clones=2"])
    device = torch.device("cpu")
    state = trainer.new_state(build_model(cfg), cfg, device)
    backward = torch.Tensor.backward

    def traced_backward(self, *args, **kwargs):
        events.append("backward")
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", traced_backward)
    result = trainer.train_step(state, _synthetic_batch(cfg, 2, 1.0, 16), cfg, device)
    assert result.updated and state.step == 1
    assert events == ["trim", "backward", "heap"]


GLIBC = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "glibc" not in os.confstr("CS_GNU_LIBC_VERSION"),
    reason="the heap modes are glibc's",
)


# In a fresh process (the mode is process-wide and chosen once): choose the mode, run "steps"
# that each make and free three 50 MiB tensors (above glibc's 32 MiB mmap ceiling), and count
# the page faults of the last one; then whether release_free_memory still trims. argv[1]
# replaces SPEED_HEAP_MAX_RSS (the line); argv[2] = "shrink" puts the speed mode's RSS limit
# below the process before the last step.
HEAP_CODE = """
import resource, sys, torch
import data2vec._runtime as r
if len(sys.argv) > 1:
    r.SPEED_HEAP_MAX_RSS = int(sys.argv[1])
first = r.choose_heap_mode()  # after a first step: auto waits for the second
assert first == r.heap_mode()
mode = first or r.choose_heap_mode()
assert r.choose_heap_mode() == mode == r.heap_mode()
def step():
    blocks = [torch.empty(50 * 2**20 // 4).fill_(1.0) for _ in range(3)]
    del blocks
for _ in range(8):  # a few steps to settle: see choose_heap_mode
    step()
limit = r._speed_rss_limit
if sys.argv[2:] == ["shrink"]:
    r._speed_rss_limit = 1
    mode = r.choose_heap_mode()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(mode, faults, r.release_free_memory(0), limit, first)
"""
HEAP_ENV = ("DATA2VEC_HEAP", "GLIBC_TUNABLES", *_USER_MALLOC_ENV)
FRESH_PAGES = 3 * 50 * 2**20 // 4096  # 38400: every page of the three blocks


def _heap_run(env: dict[str, str], *args: str) -> tuple[str, int, str, str, str]:
    base = {k: v for k, v in os.environ.items() if k not in (*HEAP_ENV, "LD_PRELOAD")}
    out = subprocess.run(
        [sys.executable, "-c", HEAP_CODE, *args],
        env={**base, **env},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    mode, faults, trimmed, limit, first = out.stdout.split()
    return mode, int(faults), trimmed, limit, first


@GLIBC
def test_heap_speed_mode__reuses_large_blocks_without_page_faults():
    mode, faults, trimmed, limit, first = _heap_run({})  # auto; this process is far below the line
    assert (first, mode, trimmed) == ("None", "speed", "False")  # chosen at the second step
    assert faults < 100
    assert 0 < int(limit) < 2 * 2**31  # twice the peak at the choice
    # Forced: from the first step, even in a process above the line, and without a limit.
    mode, faults, trimmed, limit, first = _heap_run({"DATA2VEC_HEAP": "speed"}, "0")
    assert (first, mode, faults < 100, trimmed, limit) == ("speed", "speed", True, "False", "None")


@GLIBC
def test_heap_speed_mode__auto_leaves_it_when_the_process_outgrows_its_limit():
    mode, faults, trimmed, _, _ = _heap_run({}, str(2**31), "shrink")  # auto picks speed first
    assert (mode, trimmed) == ("memory", "True")
    assert faults >= FRESH_PAGES * 0.95  # large blocks are mapped afresh again


@GLIBC
@pytest.mark.parametrize(
    "env,args",
    [
        ({"DATA2VEC_HEAP": "memory"}, ()),
        ({}, ("0",)),  # auto in a process that peaked above the line: glibc as it is
        ({"DATA2VEC_HEAP": "speed", "MALLOC_MMAP_THRESHOLD_": "33554432"}, ()),  # the user's own
        ({"DATA2VEC_HEAP": "speed", "GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"}, ()),
        ({"DATA2VEC_HEAP": "speed", "LD_PRELOAD": "libjemalloc.so.2"}, ()),  # not glibc's malloc
    ],
)
def test_heap_memory_mode__leaves_glibc_as_it_is(env, args):
    mode, faults, trimmed, limit, first = _heap_run(env, *args)
    assert (mode, limit) == ("memory", "None")
    assert first == ("None" if "DATA2VEC_HEAP" not in env else "memory")  # auto waits a step
    if "LD_PRELOAD" not in env:  # a preloaded allocator that does not exist: glibc still serves
        assert faults >= FRESH_PAGES * 0.95
        assert trimmed == "True"


def test_heap_mode__a_bad_setting_is_a_config_error_before_any_work(monkeypatch):
    from data2vec.engine.runtime import configure_threads
    from data2vec.errors import ConfigError

    monkeypatch.setenv("DATA2VEC_HEAP", "fast")
    with pytest.raises(ConfigError, match=r"DATA2VEC_HEAP='fast'.*auto, speed, memory"):
        configure_threads(1)
    monkeypatch.setenv("DATA2VEC_HEAP", " Memory ")
    assert configure_threads(1) == 1
    configure_threads(None)


def test_finetune_step__chooses_the_heap_mode_on_cpu(monkeypatch):
    import torch

    import data2vec.finetune.trainer as ft
    from data2vec.finetune.model import SupervisedBatch

    class Tiny(torch.nn.Linear):
        def set_encoder_frozen(self, frozen: bool) -> None:
            pass

    calls = []
    monkeypatch.setattr(ft, "choose_heap_mode", lambda: calls.append(1))
    monkeypatch.setattr(ft, "task_loss", lambda m, b, s: m(b.source).square().mean())
    model = Tiny(3, 2)
    opt = torch.optim.SGD([{"params": list(model.parameters()), "lr_scale": 1.0}], lr=0.1)
    batch = SupervisedBatch(torch.ones(4, 3), None, torch.zeros(4, dtype=torch.long))
    out = ft.train_step(model, opt, batch, 0, ft.FineTuneConfig(), torch.device("cpu"))  # type: ignore[arg-type]
    assert calls == [1] and out.updated
