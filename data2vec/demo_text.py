"""The text demo: WordNet glosses, data2vec 2.0, and a 26-way noun-category probe.

Pretraining reads one document per WordNet synset (``"words: gloss"``, all parts of speech;
Debian ``wordnet-base``). The probe predicts a noun synset's lexicographer category
(``noun.animal``, ``noun.artifact``, ... 26 classes) from its gloss alone, on a stratified
split whose test glosses are left out of the pretraining corpus. The classical baseline is
TF-IDF over the training glosses' words with the same logistic-regression probe.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data2vec.config import load_config
from data2vec.data.skips import SkipLog
from data2vec.demo import Recipe
from data2vec.errors import UserError
from data2vec.evaluate.features import Features
from data2vec.evaluate.text import TextSource, open_text_source
from data2vec.evaluate.tfidf import TfIdf

log = logging.getLogger("data2vec.demo")

PRESET = "text-v2-tiny"
# Probe sizes: enough for a stable 26-way accuracy, small enough to embed in seconds.
MAX_TRAIN, MAX_TEST = 10_000, 5_000


def tfidf_features(
    train: TextSource, test: TextSource, cfg: object, skips: SkipLog | None = None
) -> tuple[Features, Features]:
    """TF-IDF rows of both splits, the vocabulary and IDF fitted on the training texts."""
    model = TfIdf().fit(train.texts)

    def features(src: TextSource) -> Features:
        names = [src.name(i) for i in range(len(src))]
        return Features(model.transform(src.texts), src.labels(), names, list(src.classes))

    return features(train), features(test)


def _wordnet(data: str | None, out: Path) -> Path:
    if data not in (None, "wordnet"):
        root = Path(data)
        for name in ("corpus.txt", "train.tsv", "test.tsv"):
            if not (root / name).is_file():
                raise UserError(
                    f"--data {data}: expected 'wordnet' or a folder with corpus.txt (pretraining "
                    "text), train.tsv and test.tsv (text<TAB>label)"
                )
        return root
    root = out / "wordnet"
    if not (root / "test.tsv").is_file():
        from data2vec.data.wordnet import build_wordnet_demo

        print(f"[0/4] building the WordNet corpus and probe split into {root}")
        counts = build_wordnet_demo(root, max_train=MAX_TRAIN, max_test=MAX_TEST)
        log.info("wordnet: %s", counts)
    return root


def text_recipe(data: str | None, out: Path) -> Recipe:
    root = _wordnet(data, out)
    return Recipe(
        preset=PRESET,
        train=str(root / "train.tsv"),
        test=str(root / "test.tsv"),
        pretrain=str(root / "corpus.txt"),
        open_source=open_text_source,
        baseline_name="TF-IDF (4k words)",
        baseline=tfidf_features,
        fit_baseline=True,
        seq_len=load_config(PRESET).data.block_size,
    )
