"""Batches for CUDA are handed over in page-locked memory (``DataLoader(pin_memory=True)``).

This CPU build of PyTorch cannot pin memory, so ``Tensor.pin_memory`` is replaced by a copy
that records which tensors went through it: what is checked is that every tensor of a batch
is pinned and nothing else about it changes, and that loaders ask for pinning only when
training runs on CUDA.
"""

from __future__ import annotations

import torch

from data2vec.data.batch import PretrainBatch
from data2vec.finetune.model import SupervisedBatch
from data2vec.finetune.trainer import FineTuneConfig, pin_batches


def _fake_pinning(monkeypatch) -> list[torch.Tensor]:
    pinned: list[torch.Tensor] = []

    def pin(t: torch.Tensor) -> torch.Tensor:
        copy = t.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    return pinned


def _same_pinned(a: torch.Tensor, b: torch.Tensor, pinned: list[torch.Tensor]) -> bool:
    return torch.equal(a, b) and any(b is p for p in pinned) and a is not b


def test_pretrain_batch_pins_every_tensor(monkeypatch):
    pinned = _fake_pinning(monkeypatch)
    batch = PretrainBatch(
        torch.randn(2, 8), torch.rand(4, 5) < 0.5, torch.arange(2),
        skipped=[("a.wav", "empty")], padding_mask=torch.zeros(2, 8, dtype=torch.bool),
        modality="audio",
    )  # fmt: skip
    out = batch.pin_memory()
    assert _same_pinned(batch.source, out.source, pinned)
    assert _same_pinned(batch.mask, out.mask, pinned)
    assert _same_pinned(batch.padding_mask, out.padding_mask, pinned)
    assert out.skipped == batch.skipped and out.modality == "audio"
    assert PretrainBatch(torch.randn(1, 3), torch.ones(1, 2, dtype=torch.bool),
                         torch.arange(1)).pin_memory().padding_mask is None  # fmt: skip


def test_supervised_batch_pins_every_tensor(monkeypatch):
    pinned = _fake_pinning(monkeypatch)
    batch = SupervisedBatch(
        torch.randn(2, 16), torch.zeros(2, 16, dtype=torch.bool), torch.tensor([[1, 2], [3, 0]]),
        torch.tensor([2, 1]), [("x", "too short")],
    )  # fmt: skip
    out = batch.pin_memory()
    for name in ("source", "padding_mask", "targets", "target_lengths"):
        assert _same_pinned(getattr(batch, name), getattr(out, name), pinned), name
    assert out.skipped == batch.skipped


def test_loaders_pin_only_for_cuda():
    assert not pin_batches(FineTuneConfig(device="cpu"))
    # a malformed device is reported by the trainer (naming finetune.device), not the loader
    assert not pin_batches(FineTuneConfig(device="not-a-device"))
    assert pin_batches(FineTuneConfig(device="auto")) == torch.cuda.is_available()
