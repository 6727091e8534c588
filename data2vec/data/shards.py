"""WebDataset-style tar shards: writing them from a folder, and reading them as a stream.

A shard is a plain (uncompressed) tar file; a sample is the run of consecutive members that
share a *key*, the member name up to its first dot::

    OUT/shard-000000.tar    00000000_cat.jpg  00000000_cat.cls   00000001_dog.jpg ...
    OUT/shard-000001.tar    ...
    OUT/shards.json         {"modality", "classes", "shards": [{"name", "samples"}], "samples"}

A sample holds the source file's bytes unchanged under its own extension (``.jpg``, ``.wav``;
text: one document per ``.txt`` member, UTF-8), and ``.cls`` (the class index as text) when the
source is a folder of class folders. Only the standard library's :mod:`tarfile` is used; the
layout is the one the ``webdataset`` package reads (https://github.com/webdataset/webdataset,
"the WebDataset format"), so shards written here work there too.

Reading is split across (rank, loader worker) pairs by whole shards, and by samples for the
shards left over. See :func:`reader_plan`.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import numpy as np

from data2vec.data.files import class_folder_files
from data2vec.data.skips import SkipLog
from data2vec.errors import DataError, DataNotFoundError
from data2vec.masking import make_rng

log = logging.getLogger(__name__)

INDEX_FILE = "shards.json"
SHARD_PATTERN = "shard-{:06d}.tar"


@dataclass
class Sample:
    """One sample of a shard: its key, ``{extension: bytes}`` and where it came from."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    origin: str = ""  # "<shard path>/<key>", for skip reports

    @property
    def label(self) -> int:
        """The class index of a ``.cls`` member, ``-1`` without one."""
        raw = self.files.get("cls")
        return int(raw.decode().strip()) if raw is not None else -1


def _key(index: int, stem: str) -> str:
    # A key may not contain a dot (the extension starts at the first one) nor a slash.
    return f"{index:08d}_" + re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:64]


class ShardWriter:
    """Writes samples into ``OUT/shard-NNNNNN.tar``, a new shard every ``shard_size`` samples
    (or once a shard holds ``max_bytes``), then ``shards.json``.

    Each shard is written under a temporary name and renamed when complete, so a reader never
    sees half a shard.
    """

    def __init__(self, out: Path, shard_size: int, max_bytes: int = 1 << 30) -> None:
        if shard_size < 1:
            raise DataError(f"--shard-size={shard_size} must be >= 1 (samples per shard)")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        if any(self.out.glob("shard-*.tar")):
            raise DataError(f"{self.out} already holds shards; choose an empty folder")
        self.shard_size, self.max_bytes = shard_size, max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0

    def _open(self) -> tarfile.TarFile:
        if self._tar is None:
            name = SHARD_PATTERN.format(len(self.shards))
            # closed in _close (a shard spans many write calls)
            self._tar = tarfile.open(self.out / f".{name}.tmp", "w")  # noqa: SIM115
            self.shards.append({"name": name, "samples": 0})
            self._count = self._bytes = 0
        return self._tar

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            name = self.shards[-1]["name"]
            (self.out / f".{name}.tmp").replace(self.out / name)
            self._tar = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Append one sample: ``files`` maps extensions (no dot) to contents."""
        tar = self._open()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
            self._bytes += len(data)
        self._count += 1
        self.shards[-1]["samples"] += 1
        if self._count >= self.shard_size or self._bytes >= self.max_bytes:
            self._close()

    def finish(self, modality: str, classes: list[str]) -> dict:
        """Close the last shard and write the index; returns it."""
        self._close()
        index = {
            "modality": modality,
            "classes": classes,
            "samples": sum(s["samples"] for s in self.shards),
            "shards": self.shards,
        }
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        return index


def detect_modality(src: Path) -> str:
    """``image``, ``audio`` or ``text`` from the file extensions under ``src`` (most common)."""
    from data2vec.data.audio import AUDIO_EXTENSIONS
    from data2vec.data.images import IMAGE_EXTENSIONS
    from data2vec.data.text import TEXT_SUFFIXES

    files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
    counts = {"image": 0, "audio": 0, "text": 0}
    for p in files:
        ext = p.suffix.lower()
        kind = (
            "image"
            if ext in IMAGE_EXTENSIONS
            else "audio"
            if ext in AUDIO_EXTENSIONS
            else "text"
            if ext in TEXT_SUFFIXES
            else None
        )
        if kind:
            counts[kind] += 1
    best = max(counts, key=lambda k: counts[k])
    if counts[best] == 0:
        raise DataError(f"{src}: no image, audio or text files to shard")
    return best


def write_shards(
    src: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    modality: str | None = None,
    max_bytes: int = 1 << 30,
) -> dict:
    """Shard the images, audio files or text documents of ``src`` into ``out``.

    Images and audio: every file of a flat folder or of class folders (labels kept as
    ``.cls``), bytes unchanged, in the folders' sorted order; files are not decoded here (a bad
    one is skipped when training reads it). Text: every document of the corpus (see
    :func:`data2vec.data.text.iter_documents`) as one ``.txt`` sample.

    Returns:
        The index (also written to ``out/shards.json``) plus ``skipped`` inputs.
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DataNotFoundError(f"nothing to shard: {src} does not exist")
    modality = modality or detect_modality(src)
    skips = SkipLog()
    writer = ShardWriter(out, shard_size, max_bytes)
    classes: list[str] = []
    if modality == "text":
        from data2vec.data.text import iter_documents

        for i, doc in enumerate(iter_documents(src, skips)):
            writer.write(_key(i, "doc"), {"txt": doc.encode("utf-8")})
    else:
        from data2vec.data.audio import AUDIO_EXTENSIONS
        from data2vec.data.images import IMAGE_EXTENSIONS

        exts = IMAGE_EXTENSIONS if modality == "image" else AUDIO_EXTENSIONS
        if not src.is_dir():
            raise DataError(f"{src}: {modality} shards are written from a folder")
        paths, labels, classes = class_folder_files(src, exts, modality, f"{modality} files", skips)
        for i, (path, label) in enumerate(zip(paths, labels)):
            files = {path.suffix.lower().lstrip("."): path.read_bytes()}
            if label >= 0:
                files["cls"] = str(label).encode()
            writer.write(_key(i, path.stem), files)
    index = writer.finish(modality, classes)
    skips.write(out / "skipped.tsv")
    log.info("wrote %d samples into %d shards in %s", index["samples"], len(index["shards"]), out)
    return {**index, "skipped": len(skips), "out": str(out)}


def find_shards(spec: str | Path) -> list[Path] | None:
    """The shards ``spec`` names, sorted, or None when it names none.

    ``spec``: a folder holding ``*.tar`` files, a ``.tar`` file, or a glob pattern
    (``data/shard-*.tar``; a pattern matching nothing is an error).
    """
    text = str(spec)
    if any(c in text for c in "*?["):
        found = sorted(Path(p) for p in glob(text) if p.endswith(".tar"))
        if not found:
            raise DataNotFoundError(f"no .tar shards match {text}")
        return found
    path = Path(text)
    if path.is_file() and path.suffix == ".tar":
        return [path]
    if path.is_dir():
        found = sorted(path.glob("*.tar"))
        return found or None
    return None


def shard_index(shards: list[Path]) -> dict:
    """The ``shards.json`` next to the shards (modality, classes, sizes), or ``{}``."""
    path = shards[0].parent / INDEX_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def read_samples(shard: Path) -> Iterator[Sample | tuple[str, str]]:
    """The samples of one shard in order.

    A damaged shard (truncated, not a tar) ends early: the samples read whole before the damage
    come first, then one ``(shard path, reason)`` pair for the skip report.
    """
    current: Sample | None = None
    try:
        with tarfile.open(shard, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = Sample(key, origin=f"{shard}/{key}")
                handle = tar.extractfile(member)
                current.files[ext.lower()] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        # The sample being read when the shard broke may be incomplete: it is not yielded.
        yield (str(shard), f"damaged shard: {type(e).__name__}: {e}")
        return
    if current is not None:
        yield current


def reader_plan(
    n_shards: int, epoch: int, seed: int, reader: int, readers: int
) -> list[tuple[int, int, int]]:
    """What reader ``reader`` of ``readers`` (rank × loader worker) reads in ``epoch``.

    Returns ``(shard index, offset, stride)`` triples: the reader keeps samples ``offset``,
    ``offset + stride``, ... of each listed shard (counted over the listed shards that share a
    stride). The epoch's seeded shard order is dealt out whole, ``readers`` shards at a time;
    the shards left over (fewer than ``readers``) are split sample by sample. So every sample
    reaches exactly one reader per epoch, and readers' shares differ by at most a sample per
    left-over shard.
    """
    order = make_rng(seed, 0x5AAD, epoch).permutation(n_shards).tolist()
    whole = (n_shards // readers) * readers
    plan = [(i, 0, 1) for i in order[:whole][reader::readers]]
    return plan + [(i, reader, readers) for i in order[whole:]]


def shuffled(items: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    """``items`` in a random order, holding at most ``buffer`` at a time.

    Each new item replaces a uniformly chosen one in the buffer, which is yielded (the
    WebDataset / ``tf.data`` shuffle buffer); the rest come out in random order at the end.
    """
    held: list = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        j = int(rng.integers(len(held)))
        held[j], item = item, held[j]
        yield item
    order = rng.permutation(len(held))
    for j in order:
        yield held[j]
