"""The UCR/UEA ``.ts`` time-series format: a reader and a writer (no aeon/sktime at run time).

A file is ``#`` comment lines, ``@key value`` header lines and, after ``@data``, one case per
line: the dimensions separated by ``:``, the values of a dimension by ``,``, ``?`` for a
missing value and, when ``@classLabel true``, the class label as the last ``:`` field::

    @problemName Example
    @univariate false
    @dimensions 2
    @equalLength false
    @classLabel true up down
    @data
    1.0,2.0,?,4.0:0.5,0.25,0.0,1.0:up

Series with time stamps (``@timeStamps true``) are refused: their ``(t, v)`` tuples are not a
plain grid of values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data2vec.errors import DataError


@dataclass
class TsData:
    """The cases of one ``.ts`` file.

    Attributes:
        series: one float32 array ``(C, L)`` per case (``L`` may differ; NaN = missing).
        labels: the class label of each case, or None without ``@classLabel true``.
        classes: the labels declared in the header (in header order), or those that occur.
        header: the ``@key value`` pairs, keys lower-cased.
    """

    series: list[np.ndarray]
    labels: list[str] | None
    classes: list[str]
    header: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.header.get("problemname", "")


def _error(path: Path, line: int, message: str) -> DataError:
    return DataError(f"{path}:{line}: {message}")


def _parse_values(text: str, path: Path, line: int) -> np.ndarray:
    """``"1.0,?,3"`` -> ``[1.0, nan, 3.0]``."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if item in ("?", "", "NaN", "nan"):
            out.append(np.nan)
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise _error(path, line, f"not a number: {item[:40]!r}") from None
    return np.asarray(out, dtype=np.float32)


def _parse_header(lines: list[tuple[int, str]], path: Path) -> tuple[dict[str, str], int]:
    """The header pairs and the index of the first data line (after ``@data``)."""
    header: dict[str, str] = {}
    for i, (number, text) in enumerate(lines):
        key, _, value = text[1:].partition(" ") if text.startswith("@") else ("", "", "")
        if not key:
            raise _error(path, number, f"expected an @key line or @data, got {text[:40]!r}")
        key = key.lower()
        if key == "data":
            return header, i + 1
        header.setdefault(key, value.strip())  # a repeated key keeps its first value
    raise DataError(f"{path}: no @data line")


def _flag(header: dict[str, str], key: str, default: bool) -> bool:
    value = header.get(key.lower())
    return default if value is None else value.split()[0].lower() == "true"


def read_ts(path: str | Path) -> TsData:
    """Read a ``.ts`` file.

    Raises:
        DataError: missing file, time stamps, a malformed line or a case whose dimension
            count disagrees with the header; the message names the file and line.
    """
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = [(n + 1, t.strip()) for n, t in enumerate(raw) if t.strip() and t[:1] != "#"]
    header, start = _parse_header(lines, path)
    if _flag(header, "timestamps", False):
        raise DataError(f"{path}: @timeStamps true is not supported (only plain value lists)")
    labelled = _flag(header, "classlabel", False)
    declared = header.get("classlabel", "").split()[1:] if labelled else []
    dims = 1 if _flag(header, "univariate", True) else int(header.get("dimensions", "0") or 0)
    series, labels = [], []
    for number, text in lines[start:]:
        fields = text.split(":")
        if labelled:
            if len(fields) < 2:
                raise _error(path, number, "no class label (expected values:...:label)")
            labels.append(fields.pop().strip())
        if dims and len(fields) != dims:
            raise _error(path, number, f"{len(fields)} dimensions, the header declares {dims}")
        values = [_parse_values(f, path, number) for f in fields]
        length = max(len(v) for v in values)
        case = np.full((len(values), length), np.nan, dtype=np.float32)
        for c, v in enumerate(values):  # a shorter dimension ends in missing values
            case[c, : len(v)] = v
        series.append(case)
    if not series:
        raise DataError(f"{path}: no cases after @data")
    classes = declared or sorted(set(labels))
    if labelled and (unknown := sorted(set(labels) - set(classes))):
        raise DataError(f"{path}: labels {unknown[:5]} are not declared in @classLabel")
    return TsData(series, labels if labelled else None, classes, header)


def _format_values(row: np.ndarray) -> str:
    return ",".join("?" if np.isnan(v) else repr(float(v)) for v in row)


def write_ts(
    path: str | Path,
    series: list[np.ndarray],
    labels: list[str] | None = None,
    name: str = "data",
    classes: list[str] | None = None,
) -> Path:
    """Write cases ``(C, L)`` (NaN = missing) as a ``.ts`` file that :func:`read_ts` reads back.

    Args:
        path: the file to write.
        series: one ``(C, L)`` array per case; all must have the same ``C``.
        labels: one class label per case (written as the last field), or None.
        name: the ``@problemName``.
        classes: the ``@classLabel`` list (default: the sorted labels).
    """
    path = Path(path)
    channels = {int(np.asarray(s).shape[0]) for s in series}
    if len(channels) != 1:
        raise ValueError(f"all cases must have the same number of channels, got {channels}")
    dims = channels.pop()
    lengths = {int(np.asarray(s).shape[1]) for s in series}
    missing = any(np.isnan(np.asarray(s, dtype=np.float64)).any() for s in series)
    head = [
        f"@problemName {name}",
        "@timeStamps false",
        f"@missing {str(missing).lower()}",
        f"@univariate {str(dims == 1).lower()}",
    ]
    if dims > 1:
        head.append(f"@dimensions {dims}")
    head.append(f"@equalLength {str(len(lengths) == 1).lower()}")
    if len(lengths) == 1:
        head.append(f"@seriesLength {lengths.pop()}")
    if labels is not None:
        head.append("@classLabel true " + " ".join(classes or sorted(set(labels))))
    else:
        head.append("@classLabel false")
    head.append("@data")
    body = []
    for i, s in enumerate(series):
        fields = [_format_values(row) for row in np.asarray(s, dtype=np.float32)]
        if labels is not None:
            fields.append(str(labels[i]))
        body.append(":".join(fields))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head + body) + "\n", encoding="utf-8")
    return path
