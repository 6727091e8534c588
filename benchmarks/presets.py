"""Run ``data2vec bench`` for several presets and batch sizes; one JSON object per line.

python benchmarks/presets.py image-v2-tiny:64 image-v2-small:8 image-v2-base:8 [--precision bf16]
"""

from __future__ import annotations

import argparse
import json

from data2vec.bench import bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="PRESET:BATCH")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    for run in args.runs:
        preset, _, batch = run.partition(":")
        result = bench(
            preset, batch=int(batch) if batch else None, steps=args.steps, precision=args.precision
        )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
