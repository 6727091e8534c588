"""Random-access audio sources: class folders, flat folders and manifests of wav/flac/ogg files.

Every source gives ``len``, ``name(i)``, ``label(i)``, ``labels()``, ``classes``,
``transcript(i)``, ``num_samples(i)`` and ``load(i)``: a float32 mono waveform ``(S,)`` at 16 kHz,
not normalized (see :func:`normalize`). An unusable file makes ``load`` raise
:class:`~data2vec.data.skips.SkipError` with the reason, so the caller can record it and go on.
The design mirrors :mod:`data2vec.data.images`.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from data2vec.data.files import class_folder_files
from data2vec.data.images import _manifest_labels
from data2vec.data.resample import TARGET_SAMPLE_RATE, resample, resampled_length
from data2vec.data.skips import SkipError, SkipLog
from data2vec.errors import DataError, DataNotFoundError

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS: frozenset[str] = frozenset({".wav", ".flac", ".ogg"})
"""File extensions (lower case) that :class:`AudioFolder` takes as audio."""

DEFAULT_MIN_SAMPLES = 400
"""Shortest usable clip at 16 kHz: the receptive field of the wav2vec 2.0 CNN (25 ms)."""

_ACCEPTED_LAYOUTS = (
    "a directory of .wav/.flac/.ogg files (flat, or one sub-folder per class), a .tsv manifest "
    "with a header line 'path[<TAB>label][<TAB>transcript]...', a wav2vec/fairseq .tsv manifest "
    "(a root folder, then path<TAB>frames lines), or a .txt list of one path[<TAB>label] per line"
)
# A RIFF data chunk whose size field holds one of these was written by a streaming encoder that
# could not seek back to fill it in: the size is unknown, not wrong.
_WAV_UNKNOWN_SIZES = frozenset({0, 0xFFFFFFFF})


def _wav_truncation(path: Path, nbytes: int) -> str | None:
    """Why a RIFF/WAVE file is cut short, or ``None``.

    libsndfile quietly clamps a WAV whose ``data`` chunk runs past the end of the file to the
    bytes present, so a half-copied file would pass as a shorter, valid one.
    """
    try:
        with path.open("rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None  # no data chunk: libsndfile reports the real problem
                cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"data":
                    have = nbytes - f.tell()
                    if size > have and size not in _WAV_UNKNOWN_SIZES:
                        return (
                            f"truncated file: WAV data chunk declares {size} bytes, {have} present"
                        )
                    return None
                f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to even sizes
    except OSError:
        return None


def _read_mono(path: Path) -> tuple[np.ndarray, int]:
    """Decode a whole file to float32 mono ``(S,)`` at its own rate; ``SkipError`` if unusable."""
    try:
        nbytes = path.stat().st_size
    except OSError as e:
        raise SkipError(f"unreadable file: {e.strerror or e}") from None
    if nbytes == 0:
        raise SkipError("empty file (0 bytes)")
    cut = _wav_truncation(path, nbytes)
    if cut:
        raise SkipError(cut)
    try:
        with sf.SoundFile(path) as f:
            declared, sr = f.frames, f.samplerate
            data = f.read(dtype="float32", always_2d=True)  # (S, C)
    except PermissionError as e:
        raise SkipError(f"unreadable file: {e.strerror or e}") from None
    except Exception as e:
        # libsndfile raises LibsndfileError for unknown formats and corrupt streams; other
        # decoder failures must not stop a run either.
        raise SkipError(f"not audio or corrupt: {type(e).__name__}: {e}") from None
    if 0 < len(data) < declared:
        raise SkipError(f"truncated file: header declares {declared} samples, {len(data)} decoded")
    # Mix down by averaging (as fairseq's RawAudioDataset does), so levels stay in [-1, 1].
    return data.mean(axis=1, dtype=np.float32), sr


def load_audio_file(path: str | Path, min_samples: int = DEFAULT_MIN_SAMPLES) -> np.ndarray:
    """Read one audio file as a float32 mono waveform at 16 kHz, not normalized.

    Args:
        path: A wav, flac or ogg (vorbis) file, any sample rate, any number of channels.
        min_samples: Skip clips shorter than this many samples at 16 kHz.

    Returns:
        float32 ``(S,)`` at :data:`TARGET_SAMPLE_RATE`, channels averaged.

    Raises:
        SkipError: Missing, unreadable, empty, not audio, truncated/corrupt, non-finite samples
            or too short; the message is the reason.
    """
    wave, sr = _read_mono(Path(path))
    if len(wave) == 0:
        raise SkipError("no audio samples (empty or truncated stream)")
    if not np.isfinite(wave).all():
        bad = int((~np.isfinite(wave)).sum())
        raise SkipError(f"non-finite samples: {bad} of {len(wave)} are NaN or Inf")
    wave = resample(wave, sr, TARGET_SAMPLE_RATE)
    if len(wave) < min_samples:
        raise SkipError(
            f"too short: {len(wave)} samples at 16 kHz ({len(wave) / TARGET_SAMPLE_RATE:.3f} s), "
            f"min_samples is {min_samples}"
        )
    return wave


def audio_num_samples(path: str | Path) -> int:
    """The length of a file at 16 kHz from its header alone (no decoding).

    Exact for a file whose header is right (the decoded, resampled length equals it).

    Raises:
        SkipError: The header cannot be read.
    """
    try:
        if Path(path).stat().st_size == 0:
            raise SkipError("empty file (0 bytes)")
        info = sf.info(str(path))
    except SkipError:
        raise
    except OSError as e:
        raise SkipError(f"unreadable file: {e.strerror or e}") from None
    except Exception as e:
        raise SkipError(f"not audio or corrupt: {type(e).__name__}: {e}") from None
    return resampled_length(info.frames, info.samplerate, TARGET_SAMPLE_RATE)


class AudioSource:
    """Random access to a labelled or unlabelled set of audio clips.

    Subclasses set ``classes`` (empty when unlabelled) and implement ``__len__``, ``name``,
    ``labels``, ``transcript``, ``num_samples`` and ``load``.
    """

    classes: list[str]
    sample_rate: int = TARGET_SAMPLE_RATE

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, i: int) -> str:
        """A human-readable identity of clip ``i`` (its file path)."""
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        """All labels at once, int64 ``(N,)``; ``-1`` for unlabelled clips."""
        raise NotImplementedError

    def label(self, i: int) -> int:
        """The class index of clip ``i``, ``-1`` when unlabelled."""
        return int(self.labels()[i])

    def transcript(self, i: int) -> str | None:
        """The text spoken in clip ``i``, ``None`` when unknown."""
        return None

    def num_samples(self, i: int) -> int:
        """Length of clip ``i`` at 16 kHz from the file header; ``SkipError`` if the header is
        unreadable. Cheap: meant for length bucketing before any decoding."""
        raise NotImplementedError

    def lengths(self, skips: SkipLog | None = None) -> np.ndarray:
        """:meth:`num_samples` of every clip, int64 ``(N,)``; 0 (and recorded in ``skips``)
        for a file whose header cannot be read, so bucketing can go on without it."""
        out = np.zeros(len(self), dtype=np.int64)
        for i in range(len(self)):
            try:
                out[i] = self.num_samples(i)
            except SkipError as e:
                if skips is not None:
                    skips.add(self.name(i), str(e))
        return out

    def load(self, i: int) -> np.ndarray:
        """Clip ``i``: float32 mono ``(S,)`` at 16 kHz; raises :class:`SkipError` if unusable."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} clips, {len(self.classes)} classes)"


class _FileListSource(AudioSource):
    """An audio source backed by a list of files with labels and optional transcripts."""

    def __init__(
        self,
        paths: list[Path],
        labels: np.ndarray,
        classes: list[str],
        transcripts: list[str | None] | None,
        min_samples: int,
    ) -> None:
        self.paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self._transcripts = transcripts
        self.min_samples = min_samples

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return str(self.paths[i])

    def labels(self) -> np.ndarray:
        return self._labels

    def transcript(self, i: int) -> str | None:
        return None if self._transcripts is None else self._transcripts[i]

    def num_samples(self, i: int) -> int:
        return audio_num_samples(self.paths[i])

    def load(self, i: int) -> np.ndarray:
        return load_audio_file(self.paths[i], self.min_samples)


class AudioFolder(_FileListSource):
    """``root/<class>/**/<clip>`` (labels = sorted class-folder names) or a flat folder.

    A folder with sub-folders is read as one class per sub-folder (files directly in ``root``
    are then skipped); a folder with only files is unlabelled. Files whose extension is not in
    :data:`AUDIO_EXTENSIONS` are recorded in ``skips``; hidden files and folders are ignored.
    Order: class by class, files sorted by relative path. Transcripts are unknown (``None``).
    """

    def __init__(
        self,
        root: str | Path,
        skips: SkipLog | None = None,
        *,
        min_samples: int = DEFAULT_MIN_SAMPLES,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"audio folder not found or not a directory: {self.root}")
        paths, labels, classes = class_folder_files(
            self.root, AUDIO_EXTENSIONS, "audio", "audio files", skips
        )
        super().__init__(paths, np.array(labels), classes, None, min_samples)


def _manifest_rows(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, tab-separated fields)`` of the non-blank, non-comment lines."""
    rows: list[tuple[int, list[str]]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append((lineno, [x.strip() for x in line.split("\t")]))
    return rows


def _fairseq_root(path: Path, rows: list[tuple[int, list[str]]]) -> Path | None:
    """The root folder of a wav2vec/fairseq manifest (first line a folder, then
    ``relative_path<TAB>num_frames``), or ``None`` when ``rows`` are not one."""
    if path.suffix.lower() != ".tsv" or not rows or len(rows[0][1]) != 1:
        return None
    root = Path(rows[0][1][0]).expanduser()
    root = root if root.is_absolute() else path.parent / root
    tail_ok = all(len(r) == 2 and r[1].isdigit() for _, r in rows[1:])
    return root if root.is_dir() and tail_ok else None


def _parse_audio_manifest(path: Path) -> tuple[list[Path], dict[str, list[str]]]:
    """The ``(paths, columns)`` of a manifest: relative paths resolved, cells as strings.

    Three layouts: a header line ``path<TAB>name...`` (columns by name, missing trailing cells
    ``""``); a fairseq manifest (column ``frames``); or header-less ``path[<TAB>label]`` lines.
    """
    rows = _manifest_rows(path)
    base = path.parent
    root = _fairseq_root(path, rows)
    if rows and rows[0][1][0].lower() == "path":
        names = [n.lower() for n in rows[0][1]]
        if len(set(names)) != len(names) or "" in names:
            raise DataError(f"{path}:{rows[0][0]}: header has empty or repeated column names")
        rows = rows[1:]
    elif root is not None:
        names, rows, base = ["path", "frames"], rows[1:], root
    else:
        names = ["path", "label"]
        if any(len(r) > 2 for _, r in rows):
            raise DataError(
                f"{path}: expected 'path' or 'path<TAB>label' lines, or a header line "
                "'path<TAB>label<TAB>transcript' naming the columns"
            )
    columns: dict[str, list[str]] = {n: [] for n in names}
    for lineno, fields in rows:
        if len(fields) > len(names) or not fields[0]:
            raise DataError(
                f"{path}:{lineno}: expected up to {len(names)} tab-separated fields "
                f"({', '.join(names)}) with a non-empty path, got {fields!r}"
            )
        fields = fields + [""] * (len(names) - len(fields))
        for n, value in zip(names, fields):
            columns[n].append(value)
    paths = [Path(p).expanduser() for p in columns.pop("path")]
    return [p if p.is_absolute() else base / p for p in paths], columns


class AudioManifest(_FileListSource):
    """A text file listing one clip per line, optionally with labels and transcripts.

    Accepted layouts:

    * ``.tsv`` with a header line ``path<TAB>label<TAB>transcript`` (any subset after ``path``,
      any order; other columns are kept in :attr:`fields`, e.g. ``voice``);
    * ``.txt``/``.tsv`` without a header: ``path`` or ``path<TAB>label`` per line;
    * a wav2vec/fairseq manifest: first line a root folder, then ``path<TAB>num_frames``.

    Relative paths are relative to the manifest's folder (or the fairseq root); blank lines and
    ``#`` comments are ignored; an empty cell is a missing value. Labels are integers (used as
    is; classes ``"0".."max"``) or class names (indexed in sorted order), on every line or none.
    Listed files are not checked here: a missing or bad file raises :class:`SkipError` on load.

    Attributes:
        fields: The columns other than ``path``, ``label`` and ``transcript``, as strings.
    """

    def __init__(
        self,
        path: str | Path,
        skips: SkipLog | None = None,
        *,
        min_samples: int = DEFAULT_MIN_SAMPLES,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataNotFoundError(f"audio manifest not found: {self.path}")
        self.skips = skips  # kept for symmetry with AudioFolder: nothing is skipped at parse time
        paths, columns = _parse_audio_manifest(self.path)
        if not paths:
            raise DataError(f"audio manifest {self.path} lists no audio files")
        raw_labels = [x or None for x in columns.pop("label", [""] * len(paths))]
        labels, classes = _manifest_labels(self.path, raw_labels)
        texts = columns.pop("transcript", None)
        transcripts = None if texts is None else [t or None for t in texts]
        self.fields = columns
        super().__init__(paths, labels, classes, transcripts, min_samples)


def open_audio_source(
    spec: str | Path,
    skips: SkipLog | None = None,
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> AudioSource:
    """Open an audio source from a command-line style spec.

    Args:
        spec: A directory (see :class:`AudioFolder`) or a ``.tsv``/``.txt`` manifest (see
            :class:`AudioManifest`).
        skips: Receives the files that are not taken (folder sources).
        min_samples: Clips shorter than this at 16 kHz raise ``SkipError`` on load.

    Raises:
        DataNotFoundError: ``spec`` does not exist.
        DataError: ``spec`` exists but is none of the accepted layouts, or is empty/malformed.
    """
    path = Path(str(spec)).expanduser()
    if not path.exists():
        raise DataNotFoundError(f"audio source not found: {path} (accepted: {_ACCEPTED_LAYOUTS})")
    if path.is_dir():
        return AudioFolder(path, skips, min_samples=min_samples)
    if path.suffix.lower() in {".tsv", ".txt"}:
        return AudioManifest(path, skips, min_samples=min_samples)
    raise DataError(f"cannot read {path} as an audio source (accepted: {_ACCEPTED_LAYOUTS})")


def normalize(wave: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Per-utterance zero mean, unit variance: ``(wave - mean) / sqrt(var + eps)``.

    The input normalization of wav2vec 2.0 / data2vec (fairseq's ``RawAudioDataset.postprocess``
    applies ``F.layer_norm`` over the whole utterance: biased variance, eps 1e-5). Apply it to
    each clip before padding, so the padding does not enter the statistics.

    Args:
        wave: float ``(S,)``.
        eps: Added to the variance; keeps silence finite.

    Returns:
        float32 ``(S,)``.
    """
    x = np.asarray(wave, dtype=np.float64)  # float64 sums: long clips lose digits in float32
    return ((x - x.mean()) / np.sqrt(x.var() + eps)).astype(np.float32)


def random_crop(wave: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A window of ``max_samples`` at a uniformly random start; ``wave`` itself when not longer.

    Args:
        wave: ``(S,)``.
        max_samples: Longest allowed length.
        rng: Draws the start (one ``integers`` call, only when cropping).

    Returns:
        ``(min(S, max_samples),)``, a view of ``wave``.
    """
    extra = len(wave) - max_samples
    if extra <= 0:
        return wave
    start = int(rng.integers(0, extra + 1))
    return wave[start : start + max_samples]


def length_buckets(
    lengths: np.ndarray | list[int],
    batch_size: int,
    rng: np.random.Generator,
    chunk_batches: int = 50,
) -> list[list[int]]:
    """Batches of similar-length clips, so padding a batch to its longest clip wastes little.

    The indices are shuffled, cut into chunks of ``chunk_batches`` batches, sorted by length
    within each chunk and cut into batches; then the batch order is shuffled. Chunking keeps the
    batch contents random from epoch to epoch while bounding the length spread of a batch.

    Args:
        lengths: Clip lengths ``(N,)`` (e.g. :meth:`AudioSource.lengths`).
        batch_size: Clips per batch; the last batch of each chunk may be smaller.
        rng: Shuffles the indices and the batch order.
        chunk_batches: Batches per sorting chunk (larger: less padding, less randomness).

    Returns:
        Lists of indices into ``lengths``; every index appears exactly once.
    """
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(
            f"batch_size and chunk_batches must be >= 1, got {batch_size}, {chunk_batches}"
        )
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    chunk = batch_size * chunk_batches
    batches: list[list[int]] = []
    for lo in range(0, len(order), chunk):
        part = order[lo : lo + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[j : j + batch_size].tolist() for j in range(0, len(part), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]
