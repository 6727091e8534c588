"""The text demo's data: WordNet 3.0 glosses (Debian package ``wordnet-base``).

Every synset (a set of synonyms with a definition, the *gloss*) becomes a pretraining document;
noun synsets also give a probe task: predict the lexicographer file (one of 26 coarse classes
such as ``noun.animal`` or ``noun.artifact``) from the gloss alone. The nouns of the probe's
test split are left out of the pretraining corpus, so the probe measures generalization.

The ``data.*`` format is described in ``wndb(5WN)``: after a license header (lines starting
with two spaces), one synset per line::

    offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [pointer ...] ... | gloss

with ``w_cnt`` and ``lex_id`` in hexadecimal.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data2vec.errors import DataError, DataNotFoundError

log = logging.getLogger(__name__)

WORDNET_DIR = Path("/usr/share/wordnet")
"""Where Debian's ``wordnet-base`` installs the database."""

POS_FILES: dict[str, str] = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
"""Part of speech -> data file, in the order synsets are returned."""

LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)  # fmt: skip
"""Lexicographer file names by number (``lexnames(5WN)``, WordNet 3.0). Used when the database
has no ``lexnames`` file, as Debian's ``wordnet-base`` has not."""

# Syntactic markers of adjectives: (a) attributive, (p) predicative, (ip) immediately postnominal.
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass
class Synset:
    """One WordNet synset.

    Attributes:
        offset: byte offset in its data file (the synset's id within its part of speech).
        pos: ``"n"``, ``"v"``, ``"a"`` or ``"r"`` (adjective satellites ``"s"`` count as ``"a"``).
        lexname: lexicographer file, e.g. ``"noun.animal"``.
        words: its lemmas, underscores as spaces, adjective markers removed.
        gloss: definition and examples.
    """

    offset: int
    pos: str
    lexname: str
    words: list[str]
    gloss: str

    @property
    def document(self) -> str:
        """The pretraining text: ``"word, word: gloss"``."""
        return f"{', '.join(self.words)}: {self.gloss}"


def read_lexnames(root: Path = WORDNET_DIR) -> tuple[str, ...]:
    """Lexicographer file names by number, from ``root/lexnames`` if present, else
    :data:`LEXNAMES`."""
    path = Path(root) / "lexnames"
    if not path.is_file():
        return LEXNAMES
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            names[int(fields[0])] = fields[1]
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{path}: file numbers must run 0..N-1 without gaps")
    return tuple(names[i] for i in range(len(names)))


def parse_data_line(line: str, pos: str, lexnames: tuple[str, ...]) -> Synset:
    """Parse one synset line of a ``data.*`` file; ``ValueError`` if malformed."""
    head, bar, gloss = line.partition("|")
    fields = head.split()
    if not bar or len(fields) < 6:
        raise ValueError("expected 'offset lex_filenum ss_type w_cnt word lex_id ... | gloss'")
    count = int(fields[3], 16)
    raw_words = fields[4 : 4 + 2 * count : 2]
    if count < 1 or len(fields) < 5 + 2 * count:
        raise ValueError(f"w_cnt={fields[3]} but the line holds fewer words")
    words = [_ADJ_MARKER.sub("", w).replace("_", " ") for w in raw_words]
    return Synset(int(fields[0]), pos, lexnames[int(fields[1])], words, gloss.strip())


def load_synsets(root: str | Path = WORDNET_DIR) -> list[Synset]:
    """All synsets of ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv``, in that order.

    Raises:
        DataNotFoundError: the directory or one of its data files is missing.
        DataError: a malformed line (the message names file and line).
    """
    root = Path(root)
    hint = "install the Debian package wordnet-base (apt-get install wordnet-base)"
    if not root.is_dir():
        raise DataNotFoundError(f"WordNet not found at {root}: {hint}")
    lexnames = read_lexnames(root)
    synsets: list[Synset] = []
    for pos, name in POS_FILES.items():
        path = root / name
        if not path.is_file():
            raise DataNotFoundError(f"WordNet file missing: {path}; {hint}")
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if line.startswith("  ") or not line.strip():
                    continue  # license header
                try:
                    synsets.append(parse_data_line(line, pos, lexnames))
                except (ValueError, IndexError) as e:
                    raise DataError(f"{path}:{lineno}: malformed WordNet data line: {e}") from None
    return synsets


def _one_line(text: str) -> str:
    return " ".join(text.split())  # no tab or newline may leak into a TSV cell


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _stratified_split(
    labels: list[str], test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: each class contributes ``round(n · test_fraction)`` to test."""
    train, test = [], []
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    for label in sorted(by_class):
        members = rng.permutation(by_class[label])
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _cap(indices: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or limit >= len(indices):
        return indices
    return np.sort(rng.choice(indices, size=limit, replace=False))


def build_wordnet_demo(
    out: str | Path,
    root: str | Path = WORDNET_DIR,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Write the text demo's corpus and noun-gloss probe task.

    Files in ``out``:

    * ``corpus.txt``: one document per synset (``"words: gloss"``), blank-line separated, of all
      parts of speech, except the nouns of the test split.
    * ``train.tsv``/``test.tsv``: ``gloss<TAB>lexname`` of noun synsets, header
      ``text<TAB>label``. The gloss alone: the lemmas would make it a keyword lookup.

    The split is stratified by lexname (every class keeps its share in both splits); the caps
    then take a uniform random subset. Test nouns dropped by ``max_test`` stay out of the
    corpus too, so the corpus depends only on ``seed`` and ``test_fraction``.

    Returns:
        counts: ``documents``, ``train``, ``test``, ``classes``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    synsets = load_synsets(root)
    nouns = [s for s in synsets if s.pos == "n"]
    rng = np.random.default_rng(seed)
    train, test = _stratified_split([s.lexname for s in nouns], test_fraction, rng)
    held_out = {nouns[i].offset for i in test}
    docs = [s.document for s in synsets if not (s.pos == "n" and s.offset in held_out)]
    _write(out / "corpus.txt", "\n\n".join(_one_line(d) for d in docs) + "\n")
    train, test = _cap(train, max_train, rng), _cap(test, max_test, rng)
    for name, indices in (("train.tsv", train), ("test.tsv", test)):
        rows = [f"{_one_line(nouns[i].gloss)}\t{nouns[i].lexname}\n" for i in indices]
        _write(out / name, "text\tlabel\n" + "".join(rows))
    classes = Counter(nouns[i].lexname for i in np.concatenate([train, test]))
    log.info(
        "WordNet demo in %s: %d documents, %d train, %d test", out, len(docs), len(train), len(test)
    )
    return {
        "documents": len(docs),
        "train": len(train),
        "test": len(test),
        "classes": len(classes),
    }
