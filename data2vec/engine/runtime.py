"""Device, threads and precision helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from data2vec._runtime import requested_heap_mode
from data2vec.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and cgroup pinning)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None) -> int:
    """Use ``threads`` torch threads (default: the available cores); never more than the cores.

    Every run calls it first, so it also checks ``DATA2VEC_HEAP`` before any work starts (the
    heap mode itself is chosen after the second step: ``data2vec/_runtime.py``).
    """
    requested_heap_mode()
    n = min(threads or available_cores(), available_cores())
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an unavailable CUDA request is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(
            f"train.device={name!r} is not a device (use auto, cpu, cuda, cuda:N)"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse a precision the device cannot run, before any work starts."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 on CPU")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for the forward pass (weights, targets and loss stay fp32)."""
    if precision == "fp32":
        yield
        return
    check_precision(device, precision)
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield
