"""Process-wide CPU defaults that must be set before ``torch`` is imported.

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
"""

from __future__ import annotations

import os
import sys


def configure_cpu_runtime() -> None:
    """Default ``OMP_WAIT_POLICY`` to PASSIVE unless the user chose or torch is already loaded."""
    if "torch" in sys.modules:
        return  # too late to influence the OpenMP runtime; leave the user's process alone
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
