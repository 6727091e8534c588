"""Text recipe sweep: pretrain several variants of a tiny text preset and probe each checkpoint.

Each variant is a preset plus ``key=value`` overrides and a step count; every variant runs in
its own process (several at once, e.g. on one GPU), checkpoints at the given steps, and each
checkpoint is embedded and probed (linear + kNN) on the WordNet demo's split — the same probe
as ``data2vec demo --modality text``. A randomly initialized encoder is probed once as the
reference. One JSON line per probed checkpoint goes to ``OUT/results.jsonl`` (each worker's
log to ``OUT/NAME.log``).

python benchmarks/text_recipe_sweep.py --data WORDNET_DIR --variants variants.json \
    --out sweep [--parallel 8] [--device cuda]

``variants.json``: ``[{"name": ..., "preset": ..., "overrides": [...], "steps": N,
"probe_at": [n1, n2, ...]}, ...]``. ``WORDNET_DIR`` holds ``corpus.txt``, ``train.tsv`` and
``test.tsv`` (as the text demo builds them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def probe(run: Path, data: Path, device: str) -> dict[str, float]:
    """Linear and kNN accuracy of the student encoder saved at ``run``."""
    import torch

    from data2vec.commands import evaluate_features
    from data2vec.evaluate.features import embed_source, load_encoder
    from data2vec.evaluate.text import open_text_source

    cfg, encoder = load_encoder(run)
    sources = [open_text_source(str(data / f"{split}.tsv")) for split in ("train", "test")]
    feats = [
        embed_source(encoder, cfg, src, device=torch.device(device), progress=False)
        for src in sources
    ]
    return {
        "linear": evaluate_features(*feats, "linear")["accuracy"],
        "knn": evaluate_features(*feats, "knn")["accuracy"],
    }


def run_variant(v: dict[str, Any], data: Path, out: Path, device: str) -> list[dict[str, Any]]:
    """Pretrain one variant, then probe each checkpoint of ``probe_at``."""
    from data2vec.config import load_config
    from data2vec.engine.checkpoint import list_checkpoints
    from data2vec.engine.trainer import pretrain

    steps, probe_at = int(v["steps"]), sorted(int(s) for s in v.get("probe_at", [v["steps"]]))
    every = probe_at[0] if len(probe_at) == 1 else min(b - a for a, b in
                                                       zip([0, *probe_at], probe_at))  # fmt: skip
    overrides = [*v.get("overrides", []), f"train.max_steps={steps}",
                 f"train.checkpoint_every={max(every, 1)}", "train.keep_checkpoints=1000",
                 "train.progress=false", f"train.device={device}"]  # fmt: skip
    run_dir = out / v["name"]
    start = time.perf_counter()
    pretrain(load_config(v["preset"], overrides), str(data / "corpus.txt"), run_dir)
    seconds = time.perf_counter() - start
    rows = []
    targets = [run_dir] if steps == 0 else [
        c for c in list_checkpoints(run_dir) if int(c.name.split("_")[-1]) in probe_at
    ]  # fmt: skip
    for ckpt in targets:
        step = 0 if steps == 0 else int(ckpt.name.split("_")[-1])
        row = {"name": v["name"], "step": step, "pretrain_s": round(seconds, 1),
               **probe(ckpt, data, device)}  # fmt: skip
        print(json.dumps(row), flush=True)
        with (out / "results.jsonl").open("a") as f:  # at once: a killed sweep keeps its rows
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--variants", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("text_sweep"))
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads per variant process")
    p.add_argument("--one", help=argparse.SUPPRESS)  # worker mode: run the named variant
    args = p.parse_args()
    variants = json.loads(args.variants.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        (v,) = [v for v in variants if v["name"] == args.one]
        run_variant(v, args.data, args.out, args.device)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    pending, running = list(variants), []
    while pending or running:
        while pending and len(running) < args.parallel:
            v = pending.pop(0)
            cmd = [sys.executable, __file__, "--data", str(args.data), "--variants",
                   str(args.variants), "--out", str(args.out), "--device", args.device,
                   "--one", v["name"]]  # fmt: skip
            err = (args.out / f"{v['name']}.log").open("w")
            running.append((v, subprocess.Popen(cmd, env=env, stdout=err, stderr=err)))
        time.sleep(1.0)
        for item in list(running):
            v, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                print(json.dumps({"name": v["name"], "error": proc.returncode}), flush=True)


if __name__ == "__main__":
    main()
