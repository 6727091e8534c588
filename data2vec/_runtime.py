"""Process-wide CPU defaults that must be set before ``torch`` is imported.

libgomp spin-waits between parallel regions by default; on the 2-core machines we develop on a
training step was up to 4x slower that way than with ``OMP_WAIT_POLICY=PASSIVE`` (measured in
``benchmarks/omp_wait_policy.py``). A user's own setting always wins.
"""

from __future__ import annotations

import os
import sys


def configure_cpu_runtime() -> None:
    """Default ``OMP_WAIT_POLICY`` to PASSIVE unless the user set it or torch is already loaded."""
    if "torch" in sys.modules:
        return  # too late to influence the OpenMP runtime; leave the user's process alone
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
