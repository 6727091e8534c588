"""Pretraining throughput with OMP_WAIT_POLICY=PASSIVE vs the libgomp default (spin-waiting).

Each policy runs in fresh processes (the variable is read when the OpenMP runtime starts):
``data2vec pretrain`` of the tiny preset on Fashion-MNIST for a fixed number of steps with one
data-loader worker, as the demo does, once alone and once as two concurrent runs (more threads
than cores, as on a shared machine). Prints one JSON object with samples/s per setting.

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

# `python -c` imports torch before data2vec could set its default, so the policy in the
# environment (or libgomp's own default when unset) is what the process runs with.
CODE = "import sys, torch; from data2vec.cli import main; sys.exit(main(sys.argv[1:]))"


SETTINGS = {
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "libgomp default": {},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
}


def run(policy: str, steps: int, data: str, copies: int) -> dict:
    """``copies`` identical pretraining processes at once (2 copies = 4 threads on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[policy])
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(copies):
            cmd = [
                sys.executable,
                "-c",
                CODE,
                "pretrain",
                "--preset",
                "image-v2-tiny",
                "--data",
                data,
                "--out",
                f"{tmp}/{i}",
                "--max-steps",
                str(steps),
                "train.progress=false",
                "train.tensorboard=false",
                "train.log_every=5",
            ]
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError(f"pretraining failed under OMP_WAIT_POLICY={policy}")
        rates = []
        for i in range(copies):
            lines = (Path(tmp) / str(i) / "metrics.jsonl").read_text().splitlines()
            rates += [json.loads(x)["samples_per_s"] for x in lines[2:]]  # skip start-up
    return {
        "policy": policy or "libgomp default",
        "copies": copies,
        "samples_per_s_median": statistics.median(rates),
        "samples_per_s_min": min(rates),
        "samples_per_s_max": max(rates),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--data", default="fashion-mnist:train")
    args = p.parse_args()
    results = []
    for copies in (1, 2):
        rows = [run(pol, args.steps, args.data, copies) for pol in SETTINGS]
        for r in rows:
            r["relative_to_passive"] = r["samples_per_s_median"] / rows[0]["samples_per_s_median"]
        results += rows
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
