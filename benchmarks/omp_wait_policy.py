"""Pretraining throughput with OMP_WAIT_POLICY=PASSIVE vs the libgomp default (spin-waiting).

Each policy runs in a fresh process (the variable is read when the OpenMP runtime starts):
``data2vec pretrain`` of the tiny preset on Fashion-MNIST for a fixed number of steps with one
data-loader worker, as the demo does. Prints one JSON object with samples/s per policy.

    python benchmarks/omp_wait_policy.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(policy: str | None, steps: int, data: str) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    with tempfile.TemporaryDirectory() as tmp:
        # `python -c` imports torch before data2vec could set its default: the policy in `env`
        # (or libgomp's own default when None) is what the process runs with.
        code = "import sys, torch; from data2vec.cli import main; sys.exit(main(sys.argv[1:]))"
        cmd = [
            sys.executable,
            "-c",
            code,
            "pretrain",
            "--preset",
            "image-v2-tiny",
            "--data",
            data,
            "--out",
            tmp,
            "--max-steps",
            str(steps),
            "train.progress=false",
            "train.tensorboard=false",
            "train.log_every=5",
        ]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        records = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records[2:]]  # skip start-up
    return {
        "policy": policy or "libgomp default",
        "samples_per_s_median": statistics.median(rates),
        "samples_per_s_min": min(rates),
        "samples_per_s_max": max(rates),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--data", default="fashion-mnist:train")
    args = p.parse_args()
    results = [run(policy, args.steps, args.data) for policy in ("PASSIVE", None, "ACTIVE")]
    base = results[0]["samples_per_s_median"]
    for r in results:
        r["relative_to_passive"] = r["samples_per_s_median"] / base
    print(
        json.dumps(
            {
                "benchmark": "omp_wait_policy",
                "steps": args.steps,
                "cpus": os.cpu_count(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
