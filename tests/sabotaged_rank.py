"""A ``torchrun`` worker for ``interpreted_kernel_check.py``: on rank 1 only, the decoder's bias
gradients come out 25 % too large (the H200's wrong kernel in small); then ``data2vec`` runs
with the command line's arguments."""

from __future__ import annotations

import os
import sys

from data2vec import cli
from data2vec.nn import token_conv

if os.environ.get("RANK") == "1":
    right = token_conv.weight_bias_grad

    def wrong(*args, **kwargs):
        gw, gb = right(*args, **kwargs)
        return gw, None if gb is None else 1.25 * gb

    token_conv.weight_bias_grad = wrong

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
