"""Text readers: layouts, streaming, bad bytes and bad lines counted and reported, labelled data."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from data2vec.data.skips import SkipLog
from data2vec.data.text import (
    MAX_REPORTED_LINES,
    TextStats,
    iter_documents,
    read_labelled_text,
)
from data2vec.errors import DataError, DataNotFoundError


def _read(spec: Path) -> tuple[list[str], TextStats, SkipLog]:
    skips, stats = SkipLog(), TextStats()
    return list(iter_documents(spec, skips, stats)), stats, skips


def test_txt__blank_lines_separate_documents(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("\n first line \nsecond\tline\n\n\n  \nthird\r\n\r\nfourth", encoding="utf-8")
    docs, stats, skips = _read(path)
    assert docs == ["first line second\tline", "third", "fourth"]
    assert stats.documents == 3 and len(skips) == 0


def test_txt__byte_order_mark_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello\n".encode())
    assert _read(path)[0] == ["hello"]


def test_bad_utf8__replaced_and_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 au lait\n\nfine line\n\n\xff\xfe\n")
    docs, stats, _ = _read(path)
    assert docs == ["caf\ufffd au lait", "fine line", "\ufffd\ufffd"]
    assert stats.bad_utf8_lines == 2


def test_jsonl__bad_lines_counted_and_reported_by_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    lines = ['{"text": "one"}', "{broken", '{"title": "no text"}', "[1, 2]", "", '{"text": 5}']
    lines.append('{"text": "two", "id": 7}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs, stats, skips = _read(path)
    assert docs == ["one", "two"]
    assert stats.bad_lines == 4
    reported = dict(skips.items())
    assert sorted(reported) == [f"{path}:{n}" for n in (2, 3, 4, 6)]
    assert reported[f"{path}:2"].startswith("malformed JSON")
    assert reported[f"{path}:3"].startswith("bad record")


def test_jsonl__individual_reports_capped_per_file(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("oops\n" * (MAX_REPORTED_LINES + 50) + '{"text": "ok"}\n', encoding="utf-8")
    docs, stats, skips = _read(path)
    assert docs == ["ok"] and stats.bad_lines == MAX_REPORTED_LINES + 50
    assert len(skips) == MAX_REPORTED_LINES + 1
    assert "50 more" in dict(skips.items())[str(path)]


def test_empty_documents__skipped_and_counted(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "  "}\n{"text": ""}\n{"text": " kept "}\n', encoding="utf-8")
    tsv = tmp_path / "b.tsv"
    tsv.write_text("text\tlabel\n\tx\n  \tx\nreal text\ty\n", encoding="utf-8")
    docs, stats, _ = _read(tmp_path)
    assert docs == ["kept", "real text"]
    assert stats.empty_documents == 4 and stats.documents == 2
    assert stats.as_dict() == {
        "documents": 2,
        "empty_documents": 4,
        "bad_utf8_lines": 0,
        "bad_lines": 0,
    }


def test_directory__recursive_sorted_known_suffixes_only(tmp_path: Path) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "deep" / "z.txt").write_text("deep", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "json"}\n', encoding="utf-8")
    (tmp_path / "c.TSV").write_text("tsv\tlabel\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden" / "x.txt").write_text("ignored", encoding="utf-8")
    assert _read(tmp_path)[0] == ["json", "deep", "tsv"]


def test_errors__missing_unsupported_and_empty_raise_before_reading(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="nope\\.txt"):
        iter_documents(tmp_path / "nope.txt", SkipLog())  # no next(): checked eagerly
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"\.txt, \.jsonl, \.tsv"):
        iter_documents(tmp_path / "data.csv", SkipLog())
    with pytest.raises(DataError, match="no text files"):
        iter_documents(tmp_path, SkipLog())


def test_streaming__first_document_before_the_file_is_complete(tmp_path: Path) -> None:
    """A FIFO delivers the file piece by piece: a reader that read it whole would block until
    the writer gave up, and see ``finished`` set."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo (POSIX)")
    fifo = tmp_path / "stream.txt"
    os.mkfifo(fifo)
    gate, finished = threading.Event(), threading.Event()

    def writer() -> None:
        with fifo.open("wb") as f:
            f.write(b"first doc\n\n")
            f.flush()
            gate.wait(timeout=10)
            f.write(b"second doc\n")
        finished.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    docs = iter_documents(fifo, SkipLog())
    assert isinstance(docs, Iterator)
    assert next(docs) == "first doc"
    assert not finished.is_set()
    gate.set()
    assert list(docs) == ["second doc"]
    thread.join(timeout=10)


def test_labelled_tsv__header_and_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "l.tsv"
    rows = ["text\tlabel", "good one\tpos", "no tab here", "\tneg", "empty label\t ", ""]
    rows.append("second\tneg\textra")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    skips = SkipLog()
    texts, labels = read_labelled_text(path, skips)
    assert texts == ["good one", "second"] and labels == ["pos", "neg"]
    assert sorted(dict(skips.items())) == [f"{path}:{n}" for n in (3, 4, 5)]


def test_labelled_tsv__first_line_that_is_not_the_header_is_data(tmp_path: Path) -> None:
    path = tmp_path / "l.tsv"
    path.write_text("text\tpos\nother\tneg\n", encoding="utf-8")
    assert read_labelled_text(path, SkipLog()) == (["text", "other"], ["pos", "neg"])


def test_labelled_jsonl__int_labels_as_str_bad_records_reported(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    records = [
        {"text": "a", "label": 3},
        {"text": "b", "label": "x"},
        {"text": "c", "label": True},
        {"text": "d"},
        {"label": 1},
    ]
    path.write_text("\n".join(map(json.dumps, records)) + "\nnot json\n", encoding="utf-8")
    skips, stats = SkipLog(), TextStats()
    assert read_labelled_text(path, skips, stats) == (["a", "b"], ["3", "x"])
    assert stats.bad_lines == 4 and len(skips) == 4


def test_labelled__bad_utf8_counted(tmp_path: Path) -> None:
    path = tmp_path / "l.tsv"
    path.write_bytes(b"caf\xe9\tfood\n")
    stats = TextStats()
    assert read_labelled_text(path, SkipLog(), stats) == (["caf\ufffd"], ["food"])
    assert stats.bad_utf8_lines == 1


def test_labelled__nothing_usable__data_error(tmp_path: Path) -> None:
    path = tmp_path / "l.tsv"
    path.write_text("text\tlabel\nno tab\n", encoding="utf-8")
    with pytest.raises(DataError, match="no usable labelled text"):
        read_labelled_text(path, SkipLog())
    (tmp_path / "x.txt").write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported"):
        read_labelled_text(tmp_path / "x.txt", SkipLog())
    with pytest.raises(DataNotFoundError):
        read_labelled_text(tmp_path / "missing.tsv", SkipLog())
