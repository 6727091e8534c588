"""Time to accuracy: data2vec 1.0 vs 2.0 with the same tiny model and wall-clock budget.

For one demo data set, pretrain ``{modality}-v1-tiny`` and ``{modality}-v2-tiny`` for the same
number of minutes (each cosine schedule fitted to the budget from its own measured step time),
checkpointing at intervals; then probe every checkpoint (linear probe on the demo's labelled
train/test splits) and report accuracy against pretraining seconds. Prints and writes JSON
(``OUT/time_to_accuracy.json``) and a plot (``OUT/time_to_accuracy.png``).

python benchmarks/time_to_accuracy.py --modality audio --minutes 5 --out tta_audio
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from data2vec.commands import evaluate_features
from data2vec.config import load_config
from data2vec.demo import _fit_schedule
from data2vec.engine.checkpoint import list_checkpoints
from data2vec.engine.metrics import read_metrics
from data2vec.engine.trainer import pretrain
from data2vec.evaluate.features import embed_source, load_encoder


def _recipe(modality: str, out: Path, minutes: float):
    if modality == "audio":
        from data2vec.demo_audio import audio_recipe

        return audio_recipe(None, out, minutes)
    from data2vec.demo_text import text_recipe

    return text_recipe(None, out)


def probe_run(run_dir: Path, recipe, sources) -> list[dict[str, float]]:
    """Linear-probe accuracy of every checkpoint, with its pretraining time."""
    elapsed = {
        int(r["step"]): float(r["elapsed_s"]) for r in read_metrics(run_dir / "metrics.jsonl")
    }
    points = []
    for ckpt in list_checkpoints(run_dir):
        step = int(ckpt.name.split("_")[-1])
        cfg, encoder = load_encoder(ckpt)
        train, test = (embed_source(encoder, cfg, s, progress=False) for s in sources)
        acc = evaluate_features(train, test, "linear")["accuracy"]
        points.append({"step": step, "seconds": elapsed.get(step, 0.0), "linear": acc})
        print(f"{run_dir.name} step {step}: {acc:.4f}", flush=True)
    return points


def time_to_reach(points: list[dict[str, float]], target: float) -> float | None:
    """Seconds of pretraining after which a run's probe first reaches ``target``."""
    for p in sorted(points, key=lambda p: p["seconds"]):
        if p["linear"] >= target:
            return p["seconds"]
    return None


def _plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, points in result["runs"].items():
        ax.plot([p["seconds"] for p in points], [100 * p["linear"] for p in points], "o-",
                label=f"data2vec {algo[1]}.0")  # fmt: skip
    ax.axhline(100 * result["random_init"], color="gray", ls="--", label="random init")
    ax.set_xlabel("pretraining seconds (2 CPU cores)")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.set_title(f"time to accuracy: {result['modality']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modality", choices=["audio", "text"], default="audio")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--checkpoints", type=int, default=8, help="probe points per run")
    p.add_argument("--out", type=Path, default=Path("time_to_accuracy"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(args.modality, args.out, args.minutes)
    sources = [recipe.open_source(s) for s in (recipe.train, recipe.test)]
    data = recipe.pretrain or recipe.train
    runs: dict[str, list[dict[str, float]]] = {}
    for algo in ("v1", "v2"):
        preset = f"{args.modality}-{algo}-tiny"
        cfg = _fit_schedule(
            load_config(preset), args.minutes, [], recipe.clip_seconds, recipe.seq_len
        )
        every = max(1, cfg.train.max_steps // args.checkpoints)
        overrides = [f"train.max_minutes={args.minutes}", f"train.max_steps={cfg.train.max_steps}",
                     f"train.checkpoint_every={every}", "train.keep_checkpoints=1000",
                     "train.progress=false"]  # fmt: skip
        pretrain(load_config(preset, overrides), data, args.out / algo)
        runs[algo] = probe_run(args.out / algo, recipe, sources)
    init = args.out / "random_init"
    pretrain(load_config(f"{args.modality}-v2-tiny", ["train.max_steps=0"]), data, init)
    cfg, encoder = load_encoder(init)
    train, test = (embed_source(encoder, cfg, s, progress=False) for s in sources)
    best_v1 = max(p["linear"] for p in runs["v1"])
    t_v1 = time_to_reach(runs["v1"], best_v1)
    t_v2 = time_to_reach(runs["v2"], best_v1)
    result = {
        "modality": args.modality,
        "minutes": args.minutes,
        "runs": runs,
        "random_init": evaluate_features(train, test, "linear")["accuracy"],
        "v1_best": best_v1,
        "v1_seconds_to_best": t_v1,
        "v2_seconds_to_v1_best": t_v2,
        "speedup": (t_v1 / t_v2) if t_v1 and t_v2 else None,
    }
    (args.out / "time_to_accuracy.json").write_text(json.dumps(result, indent=1))
    _plot(result, args.out / "time_to_accuracy.png")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
