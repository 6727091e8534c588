"""Shared test helpers: tiny configs and synthetic image folders."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator

# Before torch loads (see data2vec/_runtime.py): libgomp's spin-waiting makes 2-core runs crawl.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data2vec.config import Config, load_config
from data2vec.masking import inverse_block_mask, make_rng

FIXTURES = Path(__file__).parent / "fixtures"

# A model small enough for many steps per second on 2 CPU cores.
TINY = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "encoder.image_size=16",
    "encoder.patch_size=4",
    "encoder.prenet_depth=1",
    "mask.clones=2",
    "mask.ratio=0.5",
    "decoder.dim=16",
    "decoder.groups=4",
    "decoder.layers=2",
    "target.top_k=2",
    "data.batch_size=8",
    "data.num_workers=0",
    "optim.warmup_steps=2",
    "train.progress=false",
    "train.tensorboard=false",
    "train.log_every=1",
]


def tiny_config(*overrides: str) -> Config:
    return load_config("image-v2-tiny", [*TINY, *overrides])


def image_batch(cfg: Config, B: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` random images of ``cfg``'s size and ``B x clones`` inverse block masks over its
    patch grid at its mask ratio, both drawn from ``seed``: ``(x, mask)``."""
    size, p = cfg.encoder.image_size, cfg.encoder.patch_size
    g = size // p
    x = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))
    mask = inverse_block_mask(g, g, B * cfg.mask.clones, cfg.mask.ratio, make_rng(seed))
    return x, torch.from_numpy(mask)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def torch_dropout_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean dropout layers draw their masks as PyTorch's CPU dropout does
    (``bernoulli_(1 - p)`` on a tensor like the input), so that they can be compared bit for
    bit with ``nn.Dropout`` and SDPA under one seed."""
    import data2vec.nn.lean as lean

    monkeypatch.setattr(
        lean, "keep_mask", lambda like, p: torch.empty_like(like).bernoulli_(1 - p).bool()
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of ``a`` from the reference ``b``, relative to ``b``'s largest
    magnitude (computed in float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def reference_attention_bf16(q, k, v, attn_mask, p):
    """Attention with dropout as fairseq's data2vec 2.0 ``AltAttention`` computes it under bf16
    autocast, in plain autograd ops: both products in bf16, the mask and softmax in float32 (q
    and k scaled by ``d**-0.25`` each, as PyTorch's composite does); the dropout mask drawn
    like PyTorch's CPU dropout (use with ``torch_dropout_draws``). ``(B, H, T, d)`` bf16 out."""
    s = (1.0 / q.shape[-1] ** 0.5) ** 0.5
    with torch.autocast("cpu", enabled=False):
        logits = ((q * s) @ (k * s).transpose(-2, -1)).float() + attn_mask.float()
        probs = torch.softmax(logits, -1)
        keep = torch.empty_like(probs).bernoulli_(1 - p).bool()
        return (probs * keep.float().div(1 - p)).to(v.dtype) @ v


def make_image_folder(root: Path, n_per_class: int = 6, size: int = 20, classes: int = 2) -> Path:
    """Class folders of simple, class-dependent images: stripes (class 0) vs. blobs (class 1)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            if c == 0:
                arr[:, ::4] = 255
            else:
                arr[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 230
            Image.fromarray(arr).save(folder / f"img{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def make_audio_folder(
    root: Path, n_per_class: int = 6, rates: tuple[int, ...] = (16000, 22050, 8000)
) -> Path:
    """Class folders of short tones (class 0 low, class 1 high) at mixed sample rates/lengths."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    for c, base in enumerate((300.0, 1800.0)):
        folder = root / f"tone{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            sr = rates[i % len(rates)]
            t = np.arange(int(sr * rng.uniform(0.4, 0.9))) / sr
            f = base * (1 + 0.3 * rng.random())
            wave = 0.3 * np.sin(2 * np.pi * f * t) + 0.02 * rng.standard_normal(t.shape)
            sf.write(folder / f"clip{i}.wav", wave.astype(np.float32), sr)
    return root


TINY_AUDIO = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=4", "encoder.cnn_channels=16",
    "encoder.pos_conv_groups=4", "decoder.dim=16", "decoder.groups=4", "decoder.layers=2",
    "target.top_k=2", "mask.clones=2", "data.batch_size=4", "data.num_workers=0",
    "data.min_samples=3200", "data.max_samples=16000", "optim.warmup_steps=2",
    "train.progress=false", "train.tensorboard=false",
]  # fmt: skip


def tiny_audio_config(*overrides: str) -> Config:
    return load_config("audio-v2-tiny", [*TINY_AUDIO, *overrides])


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator[types.ModuleType]:
    """``benchmarks/<name>.py`` imported as a module, with ``benchmarks/`` on the path for the
    block (the scripts import their sibling modules by name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
