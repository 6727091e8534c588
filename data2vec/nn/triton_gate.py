"""Which Triton the token kernels run on: imported where PyTorch ships one that passes their
tests, else ``None`` (the layers then take the PyTorch ops)."""

from __future__ import annotations

import itertools

# The oldest Triton the kernels pass their tests with. Triton 3.0 and 3.1 (what the CUDA builds
# of torch 2.4 and 2.5 bring) fail them in the interpreter ("arange's arguments must be of type
# tl.constexpr"); 3.2, 3.3 and 3.6 pass, and 3.6 ran them on an H100. With an older Triton
# the kernels are not defined and the decoder and the norms take the torch ops.
MIN_TRITON = (3, 2)


def supported_triton(version: str) -> bool:
    """Whether a Triton release (``"3.2.0"``, ``"3.6.0+git1234"``) is :data:`MIN_TRITON` or
    newer."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= MIN_TRITON


try:  # Triton ships with CUDA builds of PyTorch; CPU builds do without it
    import triton
    import triton.language as tl

    if not supported_triton(triton.__version__):
        triton = tl = None
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
    tl = None

NEEDS_TRITON = "Triton >= {}.{} (CUDA builds of PyTorch >= 2.6 bring it)".format(*MIN_TRITON)
