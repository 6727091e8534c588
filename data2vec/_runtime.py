"""Process-wide CPU defaults: the OpenMP wait policy (set before ``torch`` is imported),
giving glibc's free heap memory back to the system at a few points of a training step, and
how glibc's heap serves large blocks (a speed and a memory mode).

libgomp (PyTorch's OpenMP runtime on Linux) spin-waits between parallel regions by default.
Measured with ``benchmarks/omp_wait_policy.py`` (tiny preset, Fashion-MNIST, 2 cores, 100 steps):

================================  ============  ===================================
setting                           alone         two runs sharing the 2 cores
================================  ============  ===================================
``OMP_WAIT_POLICY=PASSIVE``       74 samples/s  43 samples/s each
libgomp default (spin, then wait) 87 samples/s  20 samples/s each (worst step 3)
================================  ============  ===================================

Spinning wins 17 % on an idle machine and loses 2x (and up to 13x on single steps) as soon as
anything else wants the cores - another run, a data-loader worker under load, the test suite.
We default to PASSIVE for the robust case. A user's own ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` always wins (``GOMP_SPINCOUNT=300000`` restores libgomp's spinning).

glibc's malloc keeps freed memory resident. Tensors below its mmap threshold (up to 32 MiB)
live in one heap, and after a training step that heap is full of holes a few MiB wide - too
small for the next step's tensors, so each step's activations take fresh pages while the holes
stay resident (text-v2-base: 1.6 GB of them). :func:`release_free_memory` (``malloc_trim(0)``)
returns the holes' pages; called after the forward pass, halfway through the blocks both ways
and a quarter of the way back (``models/encoder.py``) and where the backward pass has freed
the transformer's activations, it lowers the peak RSS of a step by 0.5-1.8 GB (see
``benchmarks/README.md``). Not between steps:
the next forward pass reuses the step's holes while they are resident. The pages come back as
page faults when the heap is reused, which small models notice: image-v2-tiny (500 MB) +15-20 %
step time for 20 MB less; the issue's tiny ViT (width 192, 224 px, 16 x 16 clones, 1.7 GB)
2.72-2.84 s without against 3.09-3.16 s with, for 20 MB less, because the next step reuses the
same holes. So it only runs while the process holds more than ``TRIM_MIN_RSS`` (2 GiB; the base
presets hold 2.4-6 GB where it is called). ``DATA2VEC_MALLOC_TRIM=0`` turns it off; with
another allocator (``LD_PRELOAD`` jemalloc, tcmalloc, ...) or another C library it does
nothing.

Small processes pay for page faults in another way too: glibc serves every allocation of 32 MiB
or more with a fresh ``mmap`` and unmaps it on free, so a tensor that size is faulted in, page
by page, every time it is made. The issue's tiny ViT makes dozens per step (its decoder's
``(256, 192, 14, 14)`` activations are 38.5 MB): 360-500k page faults and 0.7-1.0 s of system
time per 2.6-2.8 s step. :func:`choose_heap_mode` therefore decides once, after the second
training step, between two modes (``DATA2VEC_HEAP=auto|speed|memory``, default ``auto``):

- ``speed`` (``auto`` picks it when the process peaked under 2.25 GiB): ``mallopt`` keeps large
  blocks in the heap (no mmap, no trimming of its top), where the next step reuses them, and
  :func:`release_free_memory` does nothing. The tiny ViT (``data2vec bench``, alternating):
  2.20-2.25 s per step against 2.61-2.74 s, 0-4k faults and under 0.1 s system time per step
  once the heap has settled (its first step in speed mode); peak RSS 2.17-2.33 instead of
  1.89-1.97 GB.
  audio-v2-tiny 0.64-0.66 s against 0.71-0.76 s; image-v2-tiny, image-v1-tiny and
  text-v2-tiny within noise.
- ``memory`` (``auto`` from 2.25 GiB): glibc's default and the trims above. The base presets
  stay here: without mmap image-v2-base b8 peaks at 6.3-6.4 GB instead of 5.5 GB, for 1-2 %
  less time; text-v2-base b8 about the same memory, 2-4 % less time; audio-v2-base b4 about
  the same memory, 1-7 % more time.

A user's own ``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
``GLIBC_TUNABLES`` malloc setting wins: the mode is then ``memory``, glibc as they set it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from collections.abc import Callable

from data2vec.errors import ConfigError

log = logging.getLogger(__name__)


def configure_cpu_runtime() -> None:
    """Default ``OMP_WAIT_POLICY`` to PASSIVE unless the user chose or torch is already loaded."""
    if "torch" in sys.modules:
        return  # too late to influence the OpenMP runtime; leave the user's process alone
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


@functools.cache
def _glibc_malloc() -> ctypes.CDLL | None:
    """The C library when it is glibc and its malloc serves this process, else None."""
    if not sys.platform.startswith("linux"):
        return None
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc: not glibc's
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        return ctypes.CDLL(None)
    except (OSError, ValueError):
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where it is off or would not touch the allocator."""
    libc = _glibc_malloc()
    if libc is None or os.environ.get("DATA2VEC_MALLOC_TRIM", "1") == "0":
        return None
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


TRIM_MIN_RSS = 2 << 30


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory(min_rss: int = TRIM_MIN_RSS) -> bool:
    """Return the pages of glibc's free heap chunks to the system (``malloc_trim(0)``).

    Takes 20-80 ms when it returns hundreds of MB; the larger cost is paid later, as page
    faults, by whatever reuses those chunks. Returns False where it does nothing: off, not
    glibc, the heap in ``speed`` mode, or fewer than ``min_rss`` bytes resident (see the
    module docs).
    """
    trim = _malloc_trim()
    if trim is None or _heap_mode == "speed" or _resident_bytes() < min_rss:
        return False
    trim(0)
    return True


def release_free_memory_hook(grad: object) -> None:
    """A tensor hook (``t.register_hook``): :func:`release_free_memory` when backward reaches
    ``t``. Returns None, so the gradient passes on unchanged."""
    release_free_memory()


HEAP_MODES = ("auto", "speed", "memory")
# auto picks speed below this peak RSS after the second step: between the nearest presets on
# either side, the tiny ViT (1.85-1.97 GB) and audio-v2-base b4 (2.8-3.0 GB).
SPEED_HEAP_MAX_RSS = 2304 << 20
# The first step's peak understates a run: the optimizer's state is made at its very end.
HEAP_DECISION_STEP = 2
SPEED_HEAP_GROWTH = 2.0  # auto's speed mode ends when RSS passes this times the peak at the choice
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
_GLIBC_TRIM_THRESHOLD, _GLIBC_MMAP_MAX = 128 * 1024, 65536  # its defaults (DEFAULT_* in malloc.c)
_INT_MAX = 2**31 - 1
# Environment variables through which a user sets what the speed mode would set.
_USER_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_heap_mode: str | None = None  # decided by choose_heap_mode; None until then
_steps_seen = 0
_speed_rss_limit: int | None = None  # set while auto's speed mode holds


def requested_heap_mode() -> str:
    """``DATA2VEC_HEAP`` (``auto`` when unset), checked.

    Raises:
        ConfigError: any other value.
    """
    value = os.environ.get("DATA2VEC_HEAP", "auto").strip().lower() or "auto"
    if value not in HEAP_MODES:
        raise ConfigError(
            f"DATA2VEC_HEAP={os.environ['DATA2VEC_HEAP']!r} is not a heap mode "
            f"(use {', '.join(HEAP_MODES)})"
        )
    return value


def peak_resident_bytes() -> int:
    """The process's peak RSS since it started or the kernel's counter was last reset
    (``VmHWM``); 0 where ``/proc`` does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _user_tunes_malloc() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(k in os.environ for k in _USER_MALLOC_ENV) or "glibc.malloc." in tunables


def _set_malloc(mmap_max: int, trim_threshold: int) -> bool:
    """``mallopt`` both; False where glibc's malloc is not this process's or refuses."""
    libc = _glibc_malloc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    accepted = mallopt(_M_MMAP_MAX, mmap_max), mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    return accepted == (1, 1)


def _choose(requested: str) -> str:
    global _speed_rss_limit
    peak = peak_resident_bytes()
    limit = None
    if requested == "auto":
        if not 0 < peak < SPEED_HEAP_MAX_RSS:  # large, or of unknown size
            return "memory"
        requested, limit = "speed", int(SPEED_HEAP_GROWTH * peak)
    # No mmap for large blocks, and no automatic trimming of the heap's top either: the blocks
    # a step frees last coalesce there, and giving them back would fault them in again on the
    # next step (278k instead of 0-4k faults per step on the tiny ViT).
    if requested == "speed" and not _user_tunes_malloc() and _set_malloc(0, _INT_MAX):
        _speed_rss_limit = limit
        return "speed"
    return "memory"


def choose_heap_mode() -> str | None:
    """How glibc's heap serves large blocks in this process (see the module docs).

    Called after every training step on CPU. ``DATA2VEC_HEAP=speed|memory`` takes effect at the
    first call, ``auto`` at the ``HEAP_DECISION_STEP``-th (None before), when the process's
    peak RSS shows how large a step is: ``speed`` turns glibc's mmap and heap trimming off
    (``mallopt``) and :func:`release_free_memory` with them; ``memory`` changes nothing. Not
    glibc, another allocator, or the user's own malloc settings: ``memory``. Later calls
    return the same mode, except that a speed mode ``auto`` chose is left for good once the
    process holds more than ``SPEED_HEAP_GROWTH`` times its peak at the choice: the heap keeps
    holes that fit no later block (a pattern of same-sized blocks can take 4x their size before
    it settles), and a process whose shapes keep changing must not grow without bound.
    """
    global _heap_mode, _speed_rss_limit, _steps_seen
    if _heap_mode is None:
        _steps_seen += 1
        requested = requested_heap_mode()
        if requested != "auto" or _steps_seen >= HEAP_DECISION_STEP:
            _heap_mode = _choose(requested)
    elif _speed_rss_limit is not None and (held := _resident_bytes()) > _speed_rss_limit:
        log.info(
            "glibc heap: %.2f GB resident, over the speed mode's %.2f GB; back to glibc's "
            "defaults (DATA2VEC_HEAP=speed keeps the speed mode)",
            held / 1e9,
            _speed_rss_limit / 1e9,
        )
        _set_malloc(_GLIBC_MMAP_MAX, _GLIBC_TRIM_THRESHOLD)
        _heap_mode, _speed_rss_limit = "memory", None
        release_free_memory(0)
    return _heap_mode


def heap_mode() -> str | None:
    """The mode :func:`choose_heap_mode` chose, or None before it ran."""
    return _heap_mode
