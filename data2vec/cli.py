"""``data2vec`` command line (DESIGN §7).

Exit codes: 0 success, 2 user error (bad config, missing or unreadable data, refused file) with a
one-line message, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import data2vec  # noqa: F401  (sets CPU runtime defaults before torch loads)
from data2vec.errors import UserError

log = logging.getLogger("data2vec")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. optim.lr=5e-4 data.batch_size=32",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data2vec", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain an encoder")
    p.add_argument("--preset", default="image-v2-tiny", help="preset name or YAML file")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="training data (folder, manifest, IDX file, or fashion-mnist:train); a joint "
        "model (multi-* presets) takes one --data MODALITY=PATH per modality",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--max-steps", type=int, help="shortcut for train.max_steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    _add_overrides(p)

    p = sub.add_parser("finetune", help="fine-tune a pretrained encoder with a task head")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument(
        "--task",
        required=True,
        choices=["image-classification", "audio-classification", "ctc", "text-classification"],
    )
    p.add_argument("--train", required=True, help="labelled training data")
    p.add_argument("--valid", required=True, help="labelled validation data")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="fine-tuning settings, e.g. lr=1e-4 max_steps=2000 layer_decay=0.75",
    )

    p = sub.add_parser("embed", help="write frozen features of a data set")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path, help="FEATURES.npz")
    _add_feature_args(p)

    p = sub.add_parser("evaluate", help="linear probe or kNN on frozen features")
    p.add_argument("--checkpoint", type=Path, help="model (omit when --train/--test are .npz)")
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--probe", choices=["linear", "knn"], default="linear")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours")
    p.add_argument("--seed", type=int, default=0)
    _add_feature_args(p)

    p = sub.add_parser("convert", help="convert weights between formats")
    p.add_argument("--from", dest="src_format", choices=["fairseq", "hf", "ours"], required=True)
    p.add_argument("--to", dest="dst_format", choices=["ours", "hf"], required=True)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--verify", type=Path, help="fixture .npz with input and reference outputs")
    p.add_argument("--tolerance", type=float, default=1e-4)

    p = sub.add_parser("bench", help="time pretraining steps (JSON with --json)")
    p.add_argument("--preset", default="image-v2-base")
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=3)
    # Two: the CPU heap mode is chosen after the second step (data2vec/_runtime.py), and the
    # FLOP-counting step after them lets a newly chosen heap settle before the timed steps.
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--image-size", type=int, help="image presets: input size in px")
    p.add_argument("--seconds", type=float, default=2.0, help="audio presets: clip length")
    p.add_argument("--seq-len", type=int, default=128, help="text presets: tokens per sequence")
    p.add_argument("--json", action="store_true")
    _add_overrides(p)

    p = sub.add_parser("data", help="build data sets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser(
        "synth-speech",
        help="spoken words from espeak-ng and flite, "
        "voice-disjoint train/test (Debian packages espeak-ng, flite)",
    )
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--jobs", type=int, default=2, help="synthesizer processes at once")
    q.add_argument("--variants", type=int, default=3, help="clips per voice and word")
    q.add_argument("--overwrite", action="store_true")

    q = data_sub.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer on text (.txt/.jsonl/.tsv or a folder)",
    )
    q.add_argument("--data", required=True, help="the corpus")
    q.add_argument("--out", required=True, type=Path, help="folder (or .json file) to write")
    q.add_argument("--vocab-size", type=int, default=50_000)
    q.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair")

    q = data_sub.add_parser(
        "shard",
        help="write WebDataset-style tar shards from a folder of images/audio or a text corpus",
    )
    q.add_argument("src", type=Path, help="image/audio folder (flat or class folders) or text")
    q.add_argument("out", type=Path, help="folder for shard-000000.tar ... and shards.json")
    q.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    q.add_argument("--max-shard-mb", type=float, default=1024.0, help="bytes per shard, at most")
    q.add_argument("--modality", choices=["image", "audio", "text"], help="default: detected")

    p = sub.add_parser("demo", help="pretrain a tiny model and compare probes")
    p.add_argument(
        "--modality",
        choices=["image", "audio", "text", "signal", "all"],
        default="image",
        help="image: Fashion-MNIST; audio: synthesized spoken words + CTC; text: WordNet "
        "glosses; signal: a UCR/UEA time-series data set; all: each of them in turn on its "
        "default data (about 35 minutes), one table at the end",
    )
    p.add_argument(
        "--minutes",
        type=float,
        help="pretraining budget (image 7, audio 5, text 8, signal 4; all: the total, shared "
        "in those proportions)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default demo_out, demo_audio, demo_text, demo_signal; all: "
        "demo_all, one sub-folder per modality)",
    )
    p.add_argument(
        "--data",
        help="image: fashion-mnist (default) or a folder with train/ and "
        "test/; audio: synthetic-speech (default) or such a folder; text: wordnet (default) "
        "or a folder with corpus.txt, train.tsv and test.tsv; signal: ucr:JapaneseVowels "
        "(default; any ucr:<Name> in the aeon wheel), a folder with train/ and test/ folders "
        "of .npy/.npz arrays, or one with *_TRAIN.ts and *_TEST.ts",
    )
    _add_overrides(p)
    return parser


def _add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=["student", "teacher"], default="student")
    p.add_argument("--pool", choices=["mean", "cls"], default="mean")
    p.add_argument("--layers", type=int, default=1, help="average the last N block outputs")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _dispatch(args)
    except UserError as exc:
        print(f"data2vec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from data2vec import commands

    handler = getattr(commands, f"run_{args.command}")
    result = handler(args)
    if isinstance(result, dict):
        print(json.dumps(result))
        return 0
    return int(result or 0)


def _exit(code: int) -> None:
    """Exit with ``code``. A torchrun worker leaves without running C++ static destructors:
    once its work is saved and its process group destroyed, gloo's background threads can
    still abort the interpreter's teardown ("terminate called without an active exception"),
    turning a finished run into a failed one (seen rarely on loaded CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
