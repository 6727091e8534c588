"""Implementations of the CLI subcommands (argument namespaces in, exit code or JSON dict out)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data2vec.errors import UserError

log = logging.getLogger("data2vec")


def run_pretrain(args: argparse.Namespace) -> int:
    from data2vec.config import load_config
    from data2vec.engine.trainer import pretrain

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg = load_config(args.preset, overrides)
    data = args.data
    if cfg.model.modality != "multi":
        if len(data) != 1:
            raise UserError(f"--data given {len(data)} times: a {cfg.model.modality} model "
                            "reads one data set")  # fmt: skip
        data = data[0]
    result = pretrain(cfg, data, args.out, resume=args.resume)
    log.info(
        "stopped (%s) after %d steps in %.1fs; checkpoint %s",
        result.stopped,
        result.steps,
        result.seconds,
        result.checkpoint,
    )
    if result.stopped in ("collapse", "nonfinite"):
        return 1
    return 0


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from data2vec.finetune import run_finetune as finetune

    return finetune(
        args.task, args.checkpoint, args.train, args.valid, args.out, list(args.overrides)
    )


def _features(args: argparse.Namespace, data: str, skips) -> Any:
    from data2vec.engine.runtime import resolve_device
    from data2vec.evaluate.features import Features, embed_path

    if data.endswith(".npz"):
        return Features.load(data)
    if args.checkpoint is None:
        raise UserError(f"--checkpoint is required to embed {data} (or pass .npz features)")
    return embed_path(
        args.checkpoint,
        data,
        skips,
        weights=args.weights,
        pool=args.pool,
        layers=args.layers,
        batch_size=args.batch_size,
        device=resolve_device(args.device),
        progress=not args.no_progress,
    )


def run_embed(args: argparse.Namespace) -> int:
    from data2vec.data.skips import SkipLog

    skips = SkipLog()
    feats = _features(args, str(args.data), skips)
    feats.save(args.out)
    if len(skips):
        report = args.out.with_suffix(".skipped.tsv")
        skips.write(report)
        log.warning("%d inputs skipped; see %s", len(skips), report)
    log.info("wrote %s: features %s", args.out, feats.features.shape)
    return 0


def evaluate_features(train, test, probe: str, k: int = 20, seed: int = 0) -> dict[str, Any]:
    """Probe frozen features; returns the JSON-ready result (accuracy is a fraction)."""
    from data2vec.evaluate.knn import knn_classify
    from data2vec.evaluate.linear_probe import linear_probe

    for name, f in (("train", train), ("test", test)):
        if (f.labels < 0).any():
            raise UserError(f"the {name} set has unlabelled samples; probes need labels")
    test_labels = test.labels
    if train.classes and test.classes and list(train.classes) != list(test.classes):
        # Label ids index each set's own sorted class list: match them by class name.
        index = {c: i for i, c in enumerate(train.classes)}
        unknown = sorted(set(test.classes) - set(index))
        if unknown:
            raise UserError(f"test classes {unknown} do not occur in the training set")
        test_labels = np.array([index[c] for c in test.classes], dtype=np.int64)[test.labels]
    tx, ty = torch.from_numpy(train.features), torch.from_numpy(train.labels)
    vx, vy = torch.from_numpy(test.features), torch.from_numpy(test_labels)
    if probe == "linear":
        res = linear_probe(tx, ty, vx, vy, seed=seed).to_dict()
    else:
        res = knn_classify(tx, ty, vx, vy, k=min(k, len(tx))).to_dict()
    return {"probe": probe, **res}


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from data2vec.data.skips import SkipLog

    skips = SkipLog()
    train = _features(args, str(args.train), skips)
    test = _features(args, str(args.test), skips)
    result = evaluate_features(train, test, args.probe, k=args.k, seed=args.seed)
    result["skipped_inputs"] = len(skips)
    return result


def run_convert(args: argparse.Namespace) -> int | dict[str, Any]:
    from data2vec.convert.export import export_encoder, export_model

    route = (args.src_format, args.dst_format)
    if route == ("ours", "hf"):
        from data2vec.convert.hf import export_hf

        export_hf(args.src, args.dst)
        log.info("wrote %s", args.dst)
        return 0
    if route == ("hf", "ours"):
        from data2vec.convert.hf import import_hf

        cfg, encoder = import_hf(args.src)
        export_encoder(args.dst, cfg, encoder)
        log.info("wrote %s", args.dst)
        return 0
    if route != ("fairseq", "ours"):
        raise UserError(
            f"--from {args.src_format} --to {args.dst_format} is not a conversion; supported: "
            "fairseq -> ours, hf -> ours, ours -> hf (convert fairseq -> ours first)"
        )
    from data2vec.convert.fairseq import import_fairseq, verify_against_fixture

    cfg, model = import_fairseq(args.src)
    export_model(args.dst, cfg, model)
    log.info("wrote %s", args.dst)
    if args.verify is None:
        return 0
    result = verify_against_fixture(model, args.verify, args.tolerance)
    import json

    print(json.dumps(result))
    return 0 if result["ok"] else 1


def run_bench(args: argparse.Namespace) -> int | dict[str, Any]:
    from data2vec.bench import bench, format_bench

    result = bench(
        args.preset,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        precision=args.precision,
        image_size=args.image_size,
        overrides=list(args.overrides),
        seconds=args.seconds,
        seq_len=args.seq_len,
    )
    if args.json:
        return result
    print(format_bench(result))
    return 0


def run_data(args: argparse.Namespace) -> dict[str, Any]:
    if args.data_command == "synth-speech":
        from data2vec.data.synth_speech import synthesize_corpus

        return synthesize_corpus(
            args.out,
            seed=args.seed,
            jobs=args.jobs,
            variants=args.variants,
            overwrite=args.overwrite,
        )
    if args.data_command == "train-tokenizer":
        from data2vec.data.skips import SkipLog
        from data2vec.data.text import TextStats, iter_documents
        from data2vec.data.tokenizer import TextTokenizer

        skips, stats = SkipLog(), TextStats()
        docs = iter_documents(args.data, skips, stats)
        tokenizer = TextTokenizer.train(docs, args.vocab_size, args.min_frequency)
        path = tokenizer.save(args.out)
        return {"tokenizer": str(path), "vocab_size": tokenizer.vocab_size, **stats.as_dict()}
    if args.data_command == "shard":
        from data2vec.data.shards import write_shards

        return write_shards(
            args.src,
            args.out,
            shard_size=args.shard_size,
            modality=args.modality,
            max_bytes=int(args.max_shard_mb * 2**20),
        )
    raise UserError(f"unknown data command {args.data_command!r}")


def run_demo(args: argparse.Namespace) -> int:
    from data2vec.demo import run_demo as demo
    from data2vec.demo_all import ALL_OUT, DEFAULTS, check, run_all

    if args.modality == "all":
        check(args.data, list(args.overrides))
        run_all(Path(args.out or ALL_OUT), args.minutes, list(args.overrides))
        return 0
    minutes, out, data = DEFAULTS[args.modality]
    demo(
        out=Path(args.out or out),
        minutes=args.minutes or minutes,
        data=args.data or data,
        overrides=list(args.overrides),
        modality=args.modality,
    )
    return 0
