"""A run-wide record of inputs that were skipped, and why.

Bad inputs never crash a run (DESIGN §7): each one is counted, logged once and written to
``skipped.tsv`` (``path<TAB>reason``) in the run directory.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class SkipError(Exception):
    """Raised by a loader for one unusable input; its message is the reason in the report."""


class _Indexed(Protocol):
    def __len__(self) -> int: ...
    def load(self, index: int) -> Any: ...
    def name(self, index: int) -> str: ...


def load_usable(
    source: _Indexed,
    fn: Callable[[Any], T],
    skips: SkipLog | None,
    indices: Iterable[int] | None = None,
) -> tuple[list[T], list[int]]:
    """``fn(source.load(i))`` for each index (default: all), in order, and the indices kept.

    An input whose load or ``fn`` raises :class:`SkipError` is left out and recorded in
    ``skips`` (when given) with its reason.
    """
    rows: list[T] = []
    kept: list[int] = []
    for i in range(len(source)) if indices is None else indices:
        try:
            rows.append(fn(source.load(i)))
        except SkipError as exc:
            if skips is not None:
                skips.add(source.name(i), str(exc))
            continue
        kept.append(i)
    return rows, kept


class SkipLog:
    """Collects ``(path, reason)`` pairs; thread-safe, de-duplicated by path."""

    def __init__(self) -> None:
        self._items: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, path: str | Path, reason: str) -> None:
        """Record one skipped input (the first reason given for a path wins)."""
        key = str(path)
        reason = " ".join(str(reason).split())  # one line, no tabs: keeps the TSV parseable
        with self._lock:
            if key in self._items:
                return
            self._items[key] = reason
        log.warning("skipped %s: %s", key, reason)

    def extend(self, items: list[tuple[str, str]]) -> None:
        for path, reason in items:
            self.add(path, reason)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._items.items())

    def summary(self) -> dict[str, int]:
        """Counts per reason prefix (the text before the first ':')."""
        return dict(Counter(reason.split(":")[0] for _, reason in self.items()))

    def write(self, path: str | Path) -> Path:
        """Write ``path<TAB>reason`` lines (an empty file when nothing was skipped)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"{p}\t{r}\n" for p, r in self.items()]
        path.write_text("".join(lines), encoding="utf-8")
        return path
