"""Where a GPU waits for the host: idle gaps between kernels in a ``torch.profiler`` trace.

A profile's busy time says how much of a step the GPU computes; the rest is idle, mostly
after the host has waited for the device (a value read back, a synchronization) and before
it has queued enough work again. This module finds those gaps and names what the host was
doing in each: the step stage (``train_step``'s ``data2vec::`` ranges) and the first host
operations that ran in it. ``gpu_check.py --profile`` reports them.

Pure functions over ``(start, end, name)`` intervals in microseconds, so they are tested
without a GPU (``tests/test_bench.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Interval = tuple[float, float, str]


def busy_intervals(kernels: Iterable[Interval]) -> list[tuple[float, float]]:
    """The union of the device's kernel (and copy) intervals, sorted and merged."""
    merged: list[list[float]] = []
    for start, end, _ in sorted(kernels):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _innermost(ranges: Sequence[Interval], t: float) -> str:
    """The shortest range containing time ``t`` ("-" if none)."""
    inside = [r for r in ranges if r[0] <= t < r[1]]
    return min(inside, key=lambda r: r[1] - r[0])[2] if inside else "-"


def idle_gaps(
    kernels: Iterable[Interval],
    host_ops: Sequence[Interval],
    ranges: Sequence[Interval] = (),
    steps: int = 1,
    min_us: float = 20.0,
    top: int = 15,
) -> dict[str, Any]:
    """The device's idle gaps of at least ``min_us`` between its first and last kernel.

    Args:
        kernels: the device's kernels and copies, ``(start, end, name)`` in microseconds.
        host_ops: the host's top-level operations (what it was doing), same form.
        ranges: named stages of the step (e.g. ``data2vec::forward``), same form.
        steps: how many steps the trace covers (times are reported per step).
        min_us: shorter gaps are not reported (launch latency between queued kernels).
        top: how many groups to list.

    Returns:
        ``idle_ms`` (all gaps, per step), ``gaps`` (how many were at least ``min_us``) and
        ``by_cause``: groups of gaps with the same stage and first host operation, the
        longest first, each with ``ms`` per step, ``count`` per step and the longest gap.
    """
    busy = busy_intervals(kernels)
    host = sorted(host_ops)
    # A profile holds tens of thousands of host operations: find each gap's by array compares.
    starts = np.array([op[0] for op in host], dtype=np.float64)
    ends = np.array([op[1] for op in host], dtype=np.float64)
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    idle = 0.0
    n = 0
    for (_, a), (b, _) in itertools.pairwise(busy):
        idle += b - a
        if b - a < min_us:
            continue
        n += 1
        during = [host[i] for i in np.flatnonzero((ends > a) & (starts < b))]
        first = during[0][2] if during else "-"
        key = (_innermost(ranges, (a + b) / 2), first)  # the stage halfway through
        g = groups.setdefault(key, {"stage": key[0], "host_first": first, "us": 0.0,
                                    "count": 0, "longest_us": 0.0, "host_ops": []})  # fmt: skip
        g["us"] += b - a
        g["count"] += 1
        g["longest_us"] = max(g["longest_us"], b - a)
        if not g["host_ops"]:
            g["host_ops"] = [op[2] for op in during[:4]]
    ordered = sorted(groups.values(), key=lambda g: g["us"], reverse=True)[:top]
    return {
        "idle_ms": idle / 1e3 / steps,
        "gaps": n / steps,
        "by_cause": [
            {
                "stage": g["stage"],
                "host_first": g["host_first"],
                "ms": g["us"] / 1e3 / steps,
                "count": g["count"] / steps,
                "longest_ms": g["longest_us"] / 1e3,
                "host_ops": g["host_ops"],
            }
            for g in ordered
        ],
    }


def from_profiler(events: Iterable[Any], steps: int, **kwargs: Any) -> dict[str, Any]:
    """:func:`idle_gaps` of a ``torch.profiler`` run's ``prof.events()``."""
    from torch.autograd import DeviceType

    kernels, host, ranges = [], [], []
    for e in events:
        span = (e.time_range.start, e.time_range.end, e.name)
        if e.device_type == DeviceType.CUDA:
            kernels.append(span)
        elif e.name.startswith("data2vec::"):
            ranges.append(span)
        elif getattr(e, "cpu_parent", None) is None or e.cpu_parent.name.startswith("data2vec::"):
            host.append(span)
    return idle_gaps(kernels, host, ranges, steps, **kwargs)
