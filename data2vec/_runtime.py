"""Process-wide CPU defaults: the OpenMP wait policy (set before ``torch`` is imported) and
giving glibc's free heap memory back to the system at a few points of a training step.

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
returns the holes' pages; called between steps and where the backward pass has freed the
transformer's activations, it lowers the peak RSS of a step by 0.4-1.3 GB (see
``benchmarks/README.md``). The pages come back as page faults when the heap is reused, which
small models notice: image-v2-tiny (500 MB) +15-20 % step time for 20 MB less; the issue's
tiny ViT (width 192, 224 px, 16 x 16 clones, 1.7 GB) 2.72-2.84 s without against 3.09-3.16 s
with, for 20 MB less, because the next step reuses the same holes. So it only runs while the
process holds more than ``TRIM_MIN_RSS`` (2 GiB; the base presets hold 2.4-6 GB where it
is called). ``DATA2VEC_MALLOC_TRIM=0`` turns it off; with another allocator (``LD_PRELOAD``
jemalloc, tcmalloc, ...) or another C library it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable


def configure_cpu_runtime() -> None:
    """Default ``OMP_WAIT_POLICY`` to PASSIVE unless the user chose or torch is already loaded."""
    if "torch" in sys.modules:
        return  # too late to influence the OpenMP runtime; leave the user's process alone
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where it is off or would not touch the allocator."""
    if os.environ.get("DATA2VEC_MALLOC_TRIM", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc: not glibc's
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, ValueError):
        return None
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
    glibc, or fewer than ``min_rss`` bytes resident (see the module docs).
    """
    trim = _malloc_trim()
    if trim is None or _resident_bytes() < min_rss:
        return False
    trim(0)
    return True
