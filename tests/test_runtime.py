import os
import subprocess
import sys

import pytest

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

    import data2vec.modalities.audio as audio
    from data2vec.config import load_config
    from data2vec.models.registry import build_model
    from tests.conftest import TINY_AUDIO

    calls = []
    monkeypatch.setattr(audio, "release_free_memory", lambda: calls.append(1))
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


def test_release_free_memory__skips_small_processes():
    from data2vec._runtime import release_free_memory

    assert release_free_memory(min_rss=1 << 50) is False  # no process holds a petabyte


def test_train_step__releases_free_memory_before_backward_and_after_the_step(monkeypatch):
    import torch

    import data2vec.engine.trainer as trainer
    from data2vec.bench import _synthetic_batch
    from data2vec.config import load_config
    from data2vec.models.registry import build_model

    events = []
    monkeypatch.setattr(trainer, "release_free_memory", lambda: events.append("trim"))
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
    assert events == ["trim", "backward", "trim"]
