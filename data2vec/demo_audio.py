"""The speech demo: spoken words from Debian's synthesizers, data2vec 2.0, probes and CTC.

The corpus (``data2vec data synth-speech``) has 20 words spoken by ~50 espeak-ng and flite
voices; test voices never occur in training, so the probe measures generalization to new
speakers. The classical baseline is MFCC statistics (mean and std of 13 MFCCs, deltas and
delta-deltas) with the same logistic-regression probe. A short CTC fine-tune of the pretrained
encoder reports character and word error rates on the held-out voices.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from data2vec.config import load_config
from data2vec.data.audio import AudioSource, open_audio_source
from data2vec.data.mfcc import utterance_features
from data2vec.data.skips import SkipLog, load_usable
from data2vec.demo import Recipe
from data2vec.errors import UserError
from data2vec.evaluate.features import Features

log = logging.getLogger("data2vec.demo")

PRESET = "audio-v2-tiny"
CTC_STEPS_PER_MINUTE = 80  # of pretraining budget: 400 CTC steps (~1.7 min) for 5 minutes


def mfcc_features(source: AudioSource, cfg: object, skips: SkipLog | None = None) -> Features:
    """The MFCC baseline: one 78-d statistics vector per clip (unreadable clips skipped)."""
    rows, kept = load_usable(source, utterance_features, skips)
    names = np.array([source.name(i) for i in kept])
    return Features(np.stack(rows), source.labels()[kept], names, list(source.classes))


def build_sentences(
    corpus: Path, out: Path, words: tuple[int, int] = (5, 9), passes: int = 4, seed: int = 0
) -> int:
    """Concatenate each training voice's word clips into "sentences" for pretraining.

    Single words are ~20 frames long, all within reach of the positional convolution's view of
    the clip edges: on such clips the teacher's targets are predictable from position alone and
    pretraining learns little (measured: a probe at chance level). Sentences of 5-8 words
    (~2-4 s, 100-200 frames, 60-200 ms pauses) make content the only way to predict the middle.
    Only training voices are used, so the held-out voices stay unseen. Each of ``passes``
    shuffles of a voice's clips gives new word sequences.

    Returns:
        The number of sentences written to ``out`` (one ``.wav`` per sentence).
    """
    import soundfile as sf

    source = open_audio_source(corpus / "train.tsv")
    voices = source.fields["voice"]
    rng = np.random.default_rng(seed)
    by_voice: dict[str, list[int]] = {}
    for i, v in enumerate(voices):
        by_voice.setdefault(v, []).append(i)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for _, (voice, clips) in itertools.product(range(passes), sorted(by_voice.items())):
        order = [int(i) for i in rng.permutation(clips)]
        while order:
            n = int(rng.integers(words[0], words[1]))
            take, order = order[:n], order[n:]
            parts = []
            for i in take:
                parts.append(source.load(i))
                parts.append(np.zeros(int(rng.uniform(0.06, 0.2) * 16000), dtype=np.float32))
            sf.write(out / f"{voice}_{count}.wav", np.concatenate(parts), 16000, subtype="PCM_16")
            count += 1
    return count


def _corpus(data: str | None, out: Path) -> Path:
    if data not in (None, "synthetic-speech"):
        root = Path(data)
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            raise UserError(f"--data {data}: expected a folder with train/ and test/ class folders")
        return root
    root = out / "corpus"
    if not (root / "train.tsv").is_file():
        from data2vec.data.synth_speech import synthesize_corpus

        print(f"[0/4] synthesizing the spoken-word corpus into {root}")
        summary = synthesize_corpus(root)
        log.info("corpus: %s", summary)
    if not (root / "sentences").is_dir():
        n = build_sentences(root, root / "sentences")
        log.info("wrote %d pretraining sentences to %s", n, root / "sentences")
    return root


def _ctc_step(run_dir: Path, out: Path, train: str, test: str, steps: int) -> dict[str, Any]:
    """Fine-tune the pretrained encoder with CTC on the word transcripts; report test CER/WER."""
    from data2vec.finetune import run_finetune

    print(f"[3b] CTC fine-tuning the pretrained encoder for {steps} steps")
    settings = [
        f"max_steps={steps}",
        f"eval_every={max(10, steps // 4)}",
        "lr=1e-3",
        "layer_decay=0.75",
        f"warmup_steps={max(1, steps // 10)}",
        "batch_size=16",
        "num_workers=1",
        "label_smoothing=0.0",
    ]
    summary = run_finetune("ctc", run_dir, train, test, out / "ctc", settings)
    best = summary["best_metrics"]
    return {
        "ctc": summary,
        "report": [
            "",
            f"CTC fine-tune ({steps} steps, greedy decoding, held-out voices): "
            f"CER {100 * best['cer']:.1f}%, WER {100 * best['wer']:.1f}%",
        ],
    }


def audio_recipe(data: str | None, out: Path, minutes: float = 5.0) -> Recipe:
    root = _corpus(data, out)
    train, test = str(root / "train"), str(root / "test")
    pretrain_data = str(root / "sentences") if (root / "sentences").is_dir() else train
    lengths = open_audio_source(pretrain_data).lengths()
    crop = load_config(PRESET).data.max_samples
    ctc_steps = max(50, int(CTC_STEPS_PER_MINUTE * minutes))
    return Recipe(
        preset=PRESET,
        train=train,
        test=test,
        pretrain=pretrain_data,
        open_source=open_audio_source,
        baseline_name="MFCC + deltas (78-d)",
        baseline=mfcc_features,
        # training crops are at most data.max_samples long: that sets the step time
        clip_seconds=min(float(np.median(lengths[lengths > 0])), crop) / 16000,
        extra=lambda run_dir, out_dir: _ctc_step(run_dir, out_dir, train, test, ctc_steps),
    )
