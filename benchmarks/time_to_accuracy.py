"""Time to accuracy: data2vec 1.0 vs 2.0 with the same tiny model and wall-clock budget.

For one demo data set, pretrain ``{modality}-v1-tiny`` and ``{modality}-v2-tiny`` for the same
number of minutes (each cosine schedule fitted to the budget from its own measured step time),
checkpointing at intervals; then probe every checkpoint (linear probe on the demo's labelled
train/test splits) and report accuracy against pretraining seconds. Prints and writes JSON
(``OUT/time_to_accuracy.json``) and a plot (``OUT/time_to_accuracy.png``).

python benchmarks/time_to_accuracy.py --modality audio --minutes 5 --out tta_audio

Images probe on fixed random subsets of Fashion-MNIST (``--probe-train``/``--probe-test``
images; the demo's probe uses the full splits) so that probing many checkpoints stays cheap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from data2vec.commands import evaluate_features
from data2vec.config import load_config
from data2vec.demo import _fit_schedule
from data2vec.engine.checkpoint import list_checkpoints
from data2vec.engine.metrics import read_metrics
from data2vec.engine.trainer import pretrain
from data2vec.evaluate.features import embed_source, load_encoder


class SourceSubset:
    """A fixed subset of a labelled source (the part of the interface embedding uses)."""

    def __init__(self, source, count: int, seed: int = 0) -> None:
        self.source = source
        n = len(source)
        rng = np.random.default_rng(seed)
        self.index = np.sort(rng.permutation(n)[: min(count, n)])
        self.classes = source.classes

    def __len__(self) -> int:
        return len(self.index)

    def name(self, i: int) -> str:
        return self.source.name(int(self.index[i]))

    def labels(self) -> np.ndarray:
        return np.asarray(self.source.labels())[self.index]

    def label(self, i: int) -> int:
        return self.source.label(int(self.index[i]))

    def load(self, i: int):
        return self.source.load(int(self.index[i]))


def _recipe(modality: str, out: Path, minutes: float):
    if modality == "image":
        from data2vec.demo import image_recipe

        return image_recipe("fashion-mnist")
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
    p.add_argument("--modality", choices=["image", "audio", "text"], default="audio")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--checkpoints", type=int, default=8, help="probe points per run")
    p.add_argument("--out", type=Path, default=Path("time_to_accuracy"))
    p.add_argument("--probe-train", type=int, default=10000, help="images: probe train subset")
    p.add_argument("--probe-test", type=int, default=5000, help="images: probe test subset")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(args.modality, args.out, args.minutes)
    sources = [recipe.open_source(s) for s in (recipe.train, recipe.test)]
    if args.modality == "image":
        sources = [SourceSubset(sources[0], args.probe_train, seed=0),
                   SourceSubset(sources[1], args.probe_test, seed=1)]  # fmt: skip
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
