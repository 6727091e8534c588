"""Joint vs separate: one multi-modal model against three single-modality models.

With equal compute, counted in batches so that other load on the machine cannot tilt it:
(a) ``image-v2-tiny``, ``audio-v2-tiny`` and ``text-v2-tiny`` each pretrain on their demo data
set (Fashion-MNIST, the synthetic spoken-word corpus, WordNet glosses) for ``rounds x weight``
steps; (b) ``multi-v2-tiny``, the same three modality encoders around ONE set of shared blocks of
the same size, pretrains for the sum of those steps with batches interleaved by the same
weights, so every modality trains on exactly as many of its batches as alone. The default
weights (24, 7, 40) x 40 rounds give image and speech about three minutes each on an idle
2-core machine and text the ~1600 steps its tiny recipe needs to pay off (about nine
minutes); the joint run then takes ~20 minutes, the whole benchmark ~45. Warm-up: a fifth of
the steps, at most the presets' 200.
Each modality is then linear-probed on its demo split with the separate model, the joint model
and a random-init encoder. Prints and writes ``OUT/joint_vs_separate.json`` and a bar chart
``OUT/joint_vs_separate.png``. ``--reuse`` keeps the runs already finished in ``OUT`` and their
probe results (e.g. the separate and random-init ones, to retrain only the joint model after
changing it).

python benchmarks/joint_vs_separate.py --rounds 40 --out jvs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from time_to_accuracy import SourceSubset, _recipe  # benchmarks/ is this script's directory

from data2vec.commands import evaluate_features
from data2vec.config import load_config
from data2vec.engine.trainer import pretrain
from data2vec.evaluate.features import embed_source, load_encoder
from data2vec.models.multimodal import select_modality

MODALITIES = ("image", "audio", "text")


def _probe(run: Path, modality: str, sources, reuse: bool) -> float:
    """Linear-probe accuracy of ``run``'s ``modality`` encoder, kept in ``run/probe_*.json``."""
    cache = run / f"probe_{modality}.json"
    if reuse and cache.is_file():
        return json.loads(cache.read_text())["accuracy"]
    cfg, encoder = select_modality(*load_encoder(run), modality)
    train, test = (embed_source(encoder, cfg, s, progress=False) for s in sources)
    accuracy = evaluate_features(train, test, "linear")["accuracy"]
    cache.write_text(json.dumps({"accuracy": accuracy}))
    return accuracy


def _warmup(steps: int) -> int:
    return min(200, steps // 5)


def _pretrain(cfg, data, run: Path, reuse: bool) -> None:
    """Pretrain into ``run``; with ``reuse``, keep a run that already reached its steps."""
    if reuse and (run / "checkpoints").is_dir():
        steps = cfg.train.max_steps
        done = steps == 0 or json.loads((run / "summary.json").read_text())["steps"] == steps
        if done:
            print(f"reusing {run} ({steps} steps)", flush=True)
            return
    pretrain(cfg, data, run)


def _plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = ["random init", "separate", "joint"]
    x = np.arange(len(MODALITIES))
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, row in enumerate(rows):
        values = [100 * result["probe"][m][row] for m in MODALITIES]
        ax.bar(x + (i - 1) * 0.27, values, width=0.27, label=row)
    ax.set_xticks(x, MODALITIES)
    ax.set_ylabel("linear probe accuracy (%)")
    steps = ", ".join(f"{m} {n}" for m, n in result["separate_steps"].items())
    ax.set_title(f"joint vs separate (steps: {steps})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--weights", type=int, nargs=3, default=[24, 7, 40], help="image audio text")
    p.add_argument("--out", type=Path, default=Path("joint_vs_separate"))
    p.add_argument("--probe-train", type=int, default=10000, help="images: probe train subset")
    p.add_argument("--probe-test", type=int, default=5000, help="images: probe test subset")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the finished runs (and their probe results) found in OUT",
    )
    p.add_argument(
        "--joint-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the joint model only, e.g. encoder.modality_lr=false",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipes, sources, data, steps = {}, {}, {}, {}
    for m in MODALITIES:
        recipes[m] = r = _recipe(m, args.out / f"data_{m}", 5.0)
        sources[m] = [r.open_source(s) for s in (r.train, r.test)]
        if m == "image":
            sources[m] = [SourceSubset(sources[m][0], args.probe_train, seed=0),
                          SourceSubset(sources[m][1], args.probe_test, seed=1)]  # fmt: skip
        data[m] = r.pretrain or r.train
    probe: dict[str, dict[str, float]] = {m: {} for m in MODALITIES}
    for m, weight in zip(MODALITIES, args.weights):
        steps[m] = args.rounds * weight
        run = args.out / f"separate_{m}"
        _pretrain(load_config(f"{m}-v2-tiny", [f"train.max_steps={steps[m]}",
                                               f"optim.warmup_steps={_warmup(steps[m])}",
                                               "train.progress=false"]), data[m], run,
                  args.reuse)  # fmt: skip
        probe[m]["separate"] = _probe(run, m, sources[m], args.reuse)
        init = args.out / f"random_{m}"
        _pretrain(load_config(f"{m}-v2-tiny", ["train.max_steps=0"]), data[m], init, args.reuse)
        probe[m]["random init"] = _probe(init, m, sources[m], args.reuse)
        print(m, probe[m], flush=True)
    joint = args.out / "joint"
    total = sum(steps.values())
    overrides = [f"train.max_steps={total}", "train.progress=false",
                 f"optim.warmup_steps={_warmup(total)}",
                 f"encoder.weights=[{','.join(map(str, args.weights))}]",
                 *args.joint_override]  # fmt: skip
    _pretrain(load_config("multi-v2-tiny", overrides), data, joint, args.reuse)
    summary = json.loads((joint / "summary.json").read_text())
    cfg = load_config(joint / "config.yaml")
    for m in MODALITIES:
        probe[m]["joint"] = _probe(joint, m, sources[m], args.reuse)
        print(m, probe[m], flush=True)
    result = {
        "weights": dict(zip(MODALITIES, args.weights)),
        "teacher_clock": cfg.encoder.teacher_clock,
        "joint_overrides": args.joint_override,
        "separate_steps": steps,
        "joint_steps": summary["steps"],
        "joint_seconds": summary["seconds"],
        "probe": probe,
    }
    (args.out / "joint_vs_separate.json").write_text(json.dumps(result, indent=1))
    _plot(result, args.out / "joint_vs_separate.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
