"""The demo's time-budgeted schedule when the machine's speed changes during the run.

Pretrains image-v2-tiny on Fashion-MNIST for ``--minutes`` exactly as the image demo does
(first guess of ``train.max_steps`` from a few timed steps), while ``--hogs`` busy processes
compete for the cores from ``--hog-delay`` seconds on for ``--hog-seconds``. Prints one JSON
object: the first guess, the steps trained, why the run stopped, its seconds, and the
learning rate of its last step (0 at the cosine's end; with ``--no-fit`` a machine that got
faster stops the run early, one that got slower cuts the cosine off).

    python benchmarks/schedule_fit.py --hog-delay 0 --hog-seconds 45          # faster later
    python benchmarks/schedule_fit.py --hog-delay 20 --hog-seconds 100 --no-fit  # slower later
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path


def busy(delay: float, seconds: float) -> None:
    """Spin one core for ``seconds``, starting ``delay`` seconds from now."""
    time.sleep(delay)
    end, x = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        x += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--hogs", type=int, default=2, help="busy processes (this machine: 2 cores)")
    p.add_argument("--hog-delay", type=float, default=0.0)
    p.add_argument("--hog-seconds", type=float, default=45.0)
    p.add_argument("--no-fit", action="store_true", help="train.fit_schedule=false")
    p.add_argument("--data", default="fashion-mnist:train")
    args = p.parse_args()

    hogs = [
        mp.Process(target=busy, args=(args.hog_delay, args.hog_seconds)) for _ in range(args.hogs)
    ]
    for h in hogs:
        h.start()
    from data2vec.config import load_config
    from data2vec.demo import PRESET, _fit_schedule
    from data2vec.engine.metrics import read_metrics
    from data2vec.engine.trainer import pretrain

    overrides = ["train.progress=false", f"train.fit_schedule={str(not args.no_fit).lower()}"]
    cfg = load_config(PRESET, [f"train.max_minutes={args.minutes}", *overrides])
    cfg = _fit_schedule(cfg, args.minutes, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        result = pretrain(cfg, args.data, Path(tmp) / "run")
        history = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    for h in hogs:
        h.join()
    print(json.dumps({
        "fit_schedule": cfg.train.fit_schedule,
        "hog": [args.hogs, args.hog_delay, args.hog_seconds],
        "first_guess": cfg.train.max_steps,
        "steps": result.steps,
        "stopped": result.stopped,
        "seconds": round(result.seconds, 1),
        "last_lr": history[-1]["lr"],
        "peak_lr": cfg.optim.lr,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
