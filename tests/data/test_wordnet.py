"""WordNet parsing and the text demo's corpus/probe files, on a fake database in the real format."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from data2vec.data.wordnet import (
    LEXNAMES,
    WORDNET_DIR,
    Synset,
    build_wordnet_demo,
    load_synsets,
    read_lexnames,
)
from data2vec.errors import DataError, DataNotFoundError

LICENSE = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2   \n"
VERB = (
    "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 002 * 00005041 v 0000 "
    "+ 03110322 a 0301 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs  \n"
)
ADJ = (
    "00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in abundance\n"
    "00020103 00 s 02 outback(a) 0 remote 0 000 | inaccessible and sparsely populated  \n"
    '00019731 44 a 01 ready_to_hand(p) 0 000 | easy to reach; "found a handy spot"  \n'
)
ADV = "00001740 02 r 01 a_cappella 0 000 | without musical accompaniment  \n"
NOUN_CLASSES = {5: "noun.animal", 6: "noun.artifact", 13: "noun.food"}  # lex_filenum -> name


def _noun_line(offset: int, filenum: int, k: int) -> str:
    words = f"thing_{filenum}_{k} 0 alias{k} 1"
    return (
        f"{offset:08d} {filenum:02d} n 02 {words} 001 @ 00001740 n 0000 | gloss {filenum} {k}  \n"
    )


def make_wordnet(root: Path, nouns_per_class: int = 10, lexnames: bool = False) -> Path:
    """A tiny WordNet 3.0 database: 3 noun classes, 1 verb, 3 adjectives, 1 adverb."""
    root.mkdir(parents=True, exist_ok=True)
    nouns = [
        _noun_line(100 * (i + 1) + k, filenum, k)
        for i, filenum in enumerate(NOUN_CLASSES)
        for k in range(nouns_per_class)
    ]
    for name, body in [("noun", "".join(nouns)), ("verb", VERB), ("adj", ADJ), ("adv", ADV)]:
        (root / f"data.{name}").write_text(LICENSE + body, encoding="utf-8")
    if lexnames:
        text = "".join(f"{i:02d}\tcustom{i}\t1\n" for i in range(45))
        (root / "lexnames").write_text(text, encoding="utf-8")
    return root


def test_load__fields_words_and_markers(tmp_path: Path) -> None:
    synsets = load_synsets(make_wordnet(tmp_path / "wn", nouns_per_class=1))
    assert Counter(s.pos for s in synsets) == {"n": 3, "v": 1, "a": 3, "r": 1}
    verb = next(s for s in synsets if s.pos == "v")
    assert verb == Synset(
        1740,
        "v",
        "verb.body",
        ["breathe", "take a breath", "respire", "suspire"],
        "draw air into, and expel out of, the lungs",
    )
    adjectives = [s for s in synsets if s.pos == "a"]
    assert [s.words for s in adjectives] == [
        ["abounding", "galore"],
        ["outback", "remote"],
        ["ready to hand"],
    ]
    assert [s.lexname for s in adjectives] == ["adj.all", "adj.all", "adj.ppl"]
    assert adjectives[2].gloss == 'easy to reach; "found a handy spot"'
    adverb = synsets[-1]
    assert (
        adverb.lexname == "adv.all"
        and adverb.document == "a cappella: without musical accompaniment"
    )
    assert {s.lexname for s in synsets if s.pos == "n"} == set(NOUN_CLASSES.values())


def test_lexnames__file_read_when_present(tmp_path: Path) -> None:
    root = make_wordnet(tmp_path / "wn", nouns_per_class=1, lexnames=True)
    assert read_lexnames(root)[29] == "custom29"
    assert next(s for s in load_synsets(root) if s.pos == "v").lexname == "custom29"
    assert len(LEXNAMES) == 45 and LEXNAMES[3] == "noun.Tops" and LEXNAMES[43] == "verb.weather"


def test_load__missing_directory_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="apt-get install wordnet-base"):
        load_synsets(tmp_path / "nowhere")
    root = make_wordnet(tmp_path / "wn")
    (root / "data.adv").unlink()
    with pytest.raises(DataNotFoundError, match=r"data\.adv"):
        load_synsets(root)


def test_load__malformed_line_names_file_and_line(tmp_path: Path) -> None:
    root = make_wordnet(tmp_path / "wn", nouns_per_class=1)
    (root / "data.adv").write_text(LICENSE + ADV + "00009999 02 r 03 only_one 0 000 | x\n")
    with pytest.raises(DataError, match=r"data\.adv:4"):
        load_synsets(root)


def _tsv(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "text\tlabel"
    return [tuple(line.split("\t")) for line in lines[1:]]  # type: ignore[misc]


def test_demo__split_is_stratified_and_held_out_of_the_corpus(tmp_path: Path) -> None:
    root = make_wordnet(tmp_path / "wn", nouns_per_class=10)
    counts = build_wordnet_demo(tmp_path / "out", root=root, test_fraction=0.2, seed=3)
    train, test = _tsv(tmp_path / "out" / "train.tsv"), _tsv(tmp_path / "out" / "test.tsv")
    assert counts == {"documents": 30 + 5 - 6, "train": 24, "test": 6, "classes": 3}
    assert Counter(label for _, label in test) == {name: 2 for name in NOUN_CLASSES.values()}
    assert not {g for g, _ in train} & {g for g, _ in test}
    assert all(g.startswith("gloss ") for g, _ in train + test)  # gloss only, no lemma words
    corpus = (tmp_path / "out" / "corpus.txt").read_text(encoding="utf-8").split("\n\n")
    assert len(corpus) == counts["documents"]
    glosses_in_corpus = {doc.strip().split(": ", 1)[1] for doc in corpus}
    assert not glosses_in_corpus & {g for g, _ in test}  # test nouns never pretrained on
    assert {g for g, _ in train} <= glosses_in_corpus
    assert "breathe, take a breath, respire, suspire: draw air into" in corpus[24]


def test_demo__seeded_split_and_caps(tmp_path: Path) -> None:
    root = make_wordnet(tmp_path / "wn", nouns_per_class=10)
    build_wordnet_demo(tmp_path / "a", root=root, seed=1)
    build_wordnet_demo(tmp_path / "b", root=root, seed=1)
    build_wordnet_demo(tmp_path / "c", root=root, seed=2)
    read = [_tsv(tmp_path / d / "test.tsv") for d in "abc"]
    assert read[0] == read[1] and read[0] != read[2]
    counts = build_wordnet_demo(tmp_path / "d", root=root, max_train=5, max_test=2, seed=1)
    assert counts["train"] == 5 and counts["test"] == 2
    assert len(_tsv(tmp_path / "d" / "train.tsv")) == 5
    # Capping the test set does not change the corpus: all test-split nouns stay held out.
    corpus = [(tmp_path / d / "corpus.txt").read_text(encoding="utf-8") for d in "ad"]
    assert corpus[0] == corpus[1]


@pytest.mark.skipif(not WORDNET_DIR.exists(), reason="Debian package wordnet-base not installed")
def test_real_wordnet__synset_counts_and_noun_classes() -> None:
    synsets = load_synsets()
    assert Counter(s.pos for s in synsets) == {"n": 82115, "v": 13767, "a": 18156, "r": 3621}
    assert len({s.lexname for s in synsets if s.pos == "n"}) == 26
    assert all(s.gloss and s.words for s in synsets)
