"""Reading text: unlabelled documents for pretraining (streamed) and labelled texts for probes.

Files are read line by line in binary and each line is decoded as UTF-8 on its own, with
undecodable bytes replaced (U+FFFD) and counted, so one bad byte costs one character, not a file,
and a file of any size is never held in memory. Bad lines (malformed JSON, a missing ``"text"``,
a TSV line without a label) are counted and recorded in the run's :class:`SkipLog` as
``path:line`` entries, at most :data:`MAX_REPORTED_LINES` per file; they never stop a run.

Layouts:

* ``.txt``: documents separated by one or more blank lines; the lines of a document are
  stripped and joined with a single space.
* ``.jsonl``: one JSON object per line, the document in ``"text"`` (and the class in
  ``"label"`` for labelled data).
* ``.tsv``: ``text<TAB>label`` per line (for pretraining only the first column is used); a first
  line that is a header (first column exactly ``text``) is skipped.
* a directory: every ``*.txt``, ``*.jsonl`` and ``*.tsv`` file under it, recursively, sorted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from data2vec.data.files import walk_files
from data2vec.data.skips import SkipLog
from data2vec.errors import DataError, DataNotFoundError

log = logging.getLogger(__name__)

TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".tsv")
"""File suffixes (lower case) read as unlabelled text."""

LABELLED_SUFFIXES: tuple[str, ...] = (".tsv", ".jsonl")
"""File suffixes read as labelled text."""

MAX_REPORTED_LINES = 100
"""Bad lines of one file recorded individually in the skip log; the rest get one summary entry."""


@dataclass
class TextStats:
    """What a reader saw, for the run log.

    Attributes:
        documents: documents yielded.
        empty_documents: documents skipped because they held only whitespace.
        bad_utf8_lines: lines with undecodable bytes (kept, with U+FFFD replacements).
        bad_lines: lines skipped as malformed (bad JSON, no ``"text"``, no label).
    """

    documents: int = 0
    empty_documents: int = 0
    bad_utf8_lines: int = 0
    bad_lines: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _BadLines:
    """Records the bad lines of one file: the first few individually, then a summary."""

    def __init__(self, path: Path, skips: SkipLog, stats: TextStats) -> None:
        self.path, self.skips, self.stats, self.count = path, skips, stats, 0

    def add(self, lineno: int, reason: str) -> None:
        self.count += 1
        self.stats.bad_lines += 1
        if self.count <= MAX_REPORTED_LINES:
            self.skips.add(f"{self.path}:{lineno}", reason)

    def close(self) -> None:
        if self.count > MAX_REPORTED_LINES:
            more = self.count - MAX_REPORTED_LINES
            self.skips.add(self.path, f"bad lines: {more} more not listed ({self.count} in all)")


def _lines(path: Path, stats: TextStats) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of every line, decoded one at a time, without the line end."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.bad_utf8_lines += 1
                line = raw.decode("utf-8", errors="replace")
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte order mark is not text
            yield lineno, line.rstrip("\r\n")


def _txt_documents(path: Path, stats: TextStats) -> Iterator[str]:
    parts: list[str] = []
    for _, line in _lines(path, stats):
        line = line.strip()
        if line:
            parts.append(line)
        elif parts:
            yield " ".join(parts)
            parts = []
    if parts:
        yield " ".join(parts)


def _json_record(line: str) -> tuple[dict | None, str]:
    """The object on a JSONL line, or ``None`` and why not."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} at column {e.colno}"
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        return None, 'bad record: expected an object with a string "text"'
    return record, ""


def _jsonl_documents(path: Path, stats: TextStats, bad: _BadLines) -> Iterator[str]:
    for lineno, line in _lines(path, stats):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) are not records
        record, why = _json_record(line)
        if record is None:
            bad.add(lineno, why)
        else:
            yield record["text"]


def _tsv_documents(path: Path, stats: TextStats) -> Iterator[str]:
    for lineno, line in _lines(path, stats):
        text = line.split("\t", 1)[0]
        if lineno == 1 and text.strip() == "text":
            continue  # the header
        if line.strip():
            yield text


def _file_documents(path: Path, skips: SkipLog, stats: TextStats) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from _txt_documents(path, stats)
        return
    if suffix == ".tsv":
        yield from _tsv_documents(path, stats)
        return
    bad = _BadLines(path, skips, stats)
    try:
        yield from _jsonl_documents(path, stats, bad)
    finally:  # also when the consumer stops early
        bad.close()


def text_files(spec: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files ``spec`` names (itself, or those under a directory); checks existence/suffix."""
    allowed = ", ".join(suffixes)
    if not spec.exists():
        raise DataNotFoundError(f"text data not found: {spec}")
    if spec.is_dir():
        files = walk_files(spec, suffixes, "text", None)
        if not files:
            raise DataError(f"{spec}: no text files found (looked for {allowed}, recursively)")
        return files
    if spec.suffix.lower() not in suffixes:
        raise DataError(f"{spec}: unsupported text file suffix {spec.suffix!r}; allowed: {allowed}")
    return [spec]


def iter_documents(
    spec: str | Path, skips: SkipLog, stats: TextStats | None = None
) -> Iterator[str]:
    """Stream the documents of a text file or directory (see the module docstring for layouts).

    The path is checked now; the files are read lazily, one line at a time, as the returned
    iterator is consumed. Documents are stripped of surrounding whitespace and never empty.

    Args:
        spec: a ``.txt``, ``.jsonl`` or ``.tsv`` file, or a directory of them.
        skips: receives ``path:line`` entries for malformed lines.
        stats: counters updated while reading (a fresh one if ``None``).

    Raises:
        DataNotFoundError: ``spec`` does not exist.
        DataError: unsupported suffix, or a directory without text files.
    """
    files = text_files(Path(spec), TEXT_SUFFIXES)
    return _documents(files, skips, stats if stats is not None else TextStats())


SNIFF_BYTES = 65536
"""Bytes read from the start of a text file to tell text from binary data."""

MAX_BAD_BYTE_FRACTION = 0.25
"""More undecodable bytes than this in the sniffed start: the file is not UTF-8 text."""


def text_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be text (the reason for the skip report), or None if it can.

    A zero-byte file; a file with NUL bytes near its start (binary data: ``git`` and ``grep``
    use the same test); or one where over :data:`MAX_BAD_BYTE_FRACTION` of the first
    :data:`SNIFF_BYTES` bytes are not UTF-8 (another encoding, or binary). A few bad bytes in
    real text are repaired line by line instead (see :func:`_lines`).
    """
    if not path.is_file():
        return None  # a pipe or device: read as a stream, never sniffed (it cannot rewind)
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        return f"unreadable file: {e.strerror or e}"
    if not head:
        return "empty file (0 bytes)"
    if b"\0" in head:
        return "not UTF-8 text: NUL bytes (binary data)"
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - head.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > MAX_BAD_BYTE_FRACTION * len(head):
        return f"not UTF-8 text: {bad} of the first {len(head)} bytes are not UTF-8"
    return None


def _documents(files: list[Path], skips: SkipLog, stats: TextStats) -> Iterator[str]:
    for path in files:
        problem = text_file_problem(path)
        if problem is not None:
            skips.add(path, problem)
            continue
        found = 0
        for doc in _file_documents(path, skips, stats):
            doc = doc.strip()
            if not doc:
                stats.empty_documents += 1
                continue
            stats.documents += 1
            found += 1
            yield doc
        if not found:
            skips.add(path, "no text: the file holds no non-empty document")


def _label(value: object) -> str | None:
    """A JSON label as a string: strings and integers (not booleans) only."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _labelled_pairs(path: Path, stats: TextStats, bad: _BadLines) -> Iterator[tuple[str, str]]:
    jsonl = path.suffix.lower() == ".jsonl"
    for lineno, line in _lines(path, stats):
        if not line.strip() or (not jsonl and lineno == 1 and line.strip() == "text\tlabel"):
            continue
        if jsonl:
            record, why = _json_record(line)
            if record is None:
                bad.add(lineno, why)
                continue
            text, label = record["text"].strip(), _label(record.get("label"))
        else:
            if "\t" not in line:
                bad.add(lineno, "bad line: expected text<TAB>label, found no tab")
                continue
            # Extra columns, if any, are ignored: text is the first, label the second.
            text, label = (f.strip() for f in line.split("\t")[:2])
        if not text or not label:
            bad.add(lineno, f"bad line: empty or missing {'text' if not text else 'label'}")
            continue
        yield text, label


def read_labelled_text(
    path: str | Path, skips: SkipLog, stats: TextStats | None = None
) -> tuple[list[str], list[str]]:
    """Read labelled texts for probes and fine-tuning.

    Args:
        path: a ``.tsv`` (``text<TAB>label`` per line; an optional first line exactly
            ``text<TAB>label`` is a header) or ``.jsonl`` (``{"text": ..., "label": ...}``, the
            label a string or an integer) file.
        skips: receives ``path:line`` entries for unusable lines.
        stats: counters updated while reading (a fresh one if ``None``).

    Returns:
        ``(texts, labels)``, equally long, labels as strings.

    Raises:
        DataNotFoundError: no such file.
        DataError: unsupported suffix, or no usable line.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: labelled text must be one file ({', '.join(LABELLED_SUFFIXES)})")
    text_files(path, LABELLED_SUFFIXES)
    stats = stats if stats is not None else TextStats()
    bad = _BadLines(path, skips, stats)
    texts: list[str] = []
    labels: list[str] = []
    try:
        for text, label in _labelled_pairs(path, stats, bad):
            texts.append(text)
            labels.append(label)
    finally:
        bad.close()
    stats.documents += len(texts)
    if stats.bad_utf8_lines:
        log.warning("%s: %d lines had invalid UTF-8 bytes", path, stats.bad_utf8_lines)
    if not texts:
        raise DataError(
            f"{path}: no usable labelled text ({stats.bad_lines} bad lines); expected "
            f'text<TAB>label lines (.tsv) or {{"text": ..., "label": ...}} objects (.jsonl)'
        )
    return texts, labels
