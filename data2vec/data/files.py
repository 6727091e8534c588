"""Finding data files in folders, the same way for every file-based modality.

A folder with sub-folders is one class per sub-folder (``root/<class>/**/<file>``, labels in
sorted class-name order); a folder with only files is unlabelled. Hidden files and folders are
ignored; files with other extensions are recorded as skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path

from data2vec.data.skips import SkipLog
from data2vec.errors import DataError

log = logging.getLogger(__name__)


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def walk_files(
    folder: Path, extensions: Collection[str], kind: str, skips: SkipLog | None
) -> list[Path]:
    """All files with ``extensions`` under ``folder``, recursively, sorted by relative path.

    Symlinked folders are followed (common for data set copies) but each real folder is visited
    once, so a symlink loop cannot hang the scan. Other files are recorded in ``skips`` as
    "not an ``kind`` file extension".
    """
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for fname in sorted(filenames):
            if is_hidden(fname):
                continue
            path = Path(dirpath) / fname
            if path.suffix.lower() in extensions:
                found.append(path)
            elif skips is not None:
                skips.add(path, f"not an {kind} file extension")
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def class_folder_files(
    root: Path, extensions: Collection[str], kind: str, plural: str, skips: SkipLog | None
) -> tuple[list[Path], list[int], list[str]]:
    """The files of ``root`` read as class folders or a flat folder.

    Args:
        root: an existing directory.
        extensions: lower-case suffixes to take.
        kind, plural: names for messages ("image", "images"; "audio", "audio files").
        skips: receives files outside class folders and files with other extensions.

    Returns:
        ``(paths, labels, classes)``; labels are class indices, ``-1`` for a flat folder.

    Raises:
        DataError: no matching file at all.
    """
    entries = sorted(e for e in root.iterdir() if not is_hidden(e.name))
    class_dirs = [e for e in entries if e.is_dir()]
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    if class_dirs:
        classes = [d.name for d in class_dirs]
        for e in entries:
            if not e.is_dir() and skips is not None:
                skips.add(e, "not inside a class folder")
        for index, folder in enumerate(class_dirs):
            files = walk_files(folder, extensions, kind, skips)
            if not files:
                log.warning("class folder %s has no %s", folder, plural)
            paths += files
            labels += [index] * len(files)
    else:
        paths = walk_files(root, extensions, kind, skips)
        labels = [-1] * len(paths)
    if not paths:
        exts = " ".join(sorted(extensions))
        raise DataError(
            f"no {plural} found in {root} (expected files with extensions {exts}, "
            "either directly in the folder or in one sub-folder per class)"
        )
    return paths, labels, classes
