"""N-d signal sources: folders of ``.npy``/``.npz`` arrays and UCR/UEA ``.ts`` files.

Every source gives ``len``, ``name(i)``, ``labels()``, ``classes``, ``length(i)`` and
``load(i)``: a float32 array ``(channels, d1, ..., dn)`` as stored (NaN = missing). An unusable
input makes ``load`` raise :class:`~data2vec.data.skips.SkipError` with the reason.
:class:`SignalTransform` then fits an array to the model: channel check, per-channel
normalization, resampling or cropping to ``encoder.size``.

Data specs:
- a folder of ``.npy``/``.npz`` files, flat or one sub-folder per class (``root/<label>/<f>``);
- a ``.ts`` file (UCR/UEA format, see :mod:`data2vec.data.ts_format`);
- ``ucr:<Name>:<train|test>``: a data set shipped inside the ``aeon`` wheel (read by path,
  aeon is never imported).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data2vec.config import Config, SignalEncoderConfig
from data2vec.data.files import class_folder_files
from data2vec.data.skips import SkipError, SkipLog
from data2vec.data.ts_format import read_ts
from data2vec.errors import ConfigError, DataError, DataNotFoundError

log = logging.getLogger(__name__)

SIGNAL_EXTENSIONS: frozenset[str] = frozenset({".npy", ".npz"})
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


class SignalSource:
    """Random access to labelled or unlabelled N-d arrays (see the module docstring)."""

    classes: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        """``(N,)`` int64 class indices, -1 for unlabelled inputs."""
        raise NotImplementedError

    def load(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def length(self, index: int) -> int:
        """Length of the first signal axis (for batching by length), 0 when unknown."""
        return 0


class ArrayFolder(SignalSource):
    """``.npy``/``.npz`` files in class folders or a flat folder, loaded on demand.

    A ``.npz`` file is read through its only array, or its array named ``x``.
    """

    def __init__(self, root: Path, skips: SkipLog | None = None) -> None:
        self.root = root
        self.paths, labels, self.classes = class_folder_files(
            root, SIGNAL_EXTENSIONS, "array", "arrays (.npy/.npz)", skips
        )
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return str(self.paths[index])

    def labels(self) -> np.ndarray:
        return self._labels

    def load(self, index: int) -> np.ndarray:
        path = self.paths[index]
        try:
            data = np.load(path, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                with data:
                    keys = list(data.files)
                    if len(keys) != 1 and "x" not in keys:
                        raise SkipError(
                            f"npz holds arrays {keys[:5]}: expected one, or one named x"
                        )
                    data = data[keys[0] if len(keys) == 1 else "x"]
        except SkipError:
            raise
        except Exception as exc:  # numpy raises ValueError/OSError/EOFError/zipfile errors
            raise SkipError(f"not a readable numpy array: {type(exc).__name__}: {exc}") from None
        if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
            raise SkipError(f"not a real numeric array (dtype {data.dtype})")
        return np.asarray(data, dtype=np.float32)


class TsSource(SignalSource):
    """The cases of a UCR/UEA ``.ts`` file, held in memory (``(C, L)`` each)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        ts = read_ts(path)
        self.series = ts.series
        self.classes = list(ts.classes) if ts.labels is not None else []
        index = {c: i for i, c in enumerate(self.classes)}
        self._labels = np.asarray(
            [index[lab] for lab in ts.labels] if ts.labels is not None else [-1] * len(ts.series),
            dtype=np.int64,
        )

    def __len__(self) -> int:
        return len(self.series)

    def name(self, index: int) -> str:
        return f"{self.path}#{index}"

    def labels(self) -> np.ndarray:
        return self._labels

    def load(self, index: int) -> np.ndarray:
        return self.series[index]

    def length(self, index: int) -> int:
        return int(self.series[index].shape[1])


def aeon_data_dir() -> Path:
    """The folder of data sets inside the installed ``aeon`` wheel (found, never imported)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            "ucr: data sets come from the aeon wheel: pip install --no-deps aeon==1.6.0 "
            "(aeon==1.3.0 on Python 3.10; scripts/setup.sh does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def resolve_ucr(spec: str) -> Path:
    """``ucr:<Name>:<train|test>`` -> the ``.ts`` file inside the aeon wheel."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[2].lower() not in ("train", "test"):
        raise DataError(f"{spec!r}: expected ucr:<Name>:train or ucr:<Name>:test")
    name, split = parts[1], parts[2].upper()
    path = aeon_data_dir() / name / f"{name}_{split}.ts"
    if not path.is_file():
        have = sorted(p.parent.name for p in aeon_data_dir().glob("*/*_TRAIN.ts"))
        raise DataNotFoundError(f"{spec!r}: no {path.name} in aeon; available: {', '.join(have)}")
    return path


def open_signal_source(spec: str | Path, skips: SkipLog | None = None) -> SignalSource:
    """The source a data spec names (see the module docstring)."""
    text = str(spec)
    if text.startswith("ucr:"):
        return TsSource(resolve_ucr(text))
    path = Path(text)
    if not path.exists():
        raise DataNotFoundError(f"signal data not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".ts":
            raise DataError(f"{path}: expected a .ts file or a folder of .npy/.npz arrays")
        return TsSource(path)
    return ArrayFolder(path, skips)


def resolve_from_data(cfg: Config, source: SignalSource, limit: int = 2000) -> None:
    """Fill in what a signal config takes from the pretraining data, in place.

    ``encoder.in_chans=0`` becomes the first usable input's channel count; with
    ``encoder.normalize=dataset`` and no statistics yet, ``channel_mean``/``channel_std`` become
    the per-channel mean and std of the observed values of the first ``limit`` inputs.

    Raises:
        DataError: no usable input among them.
    """
    enc = cfg.encoder
    if not isinstance(enc, SignalEncoderConfig):
        return
    need_stats = enc.normalize == "dataset" and enc.channel_mean is None
    if enc.in_chans > 0 and not need_stats:
        return
    n = len(enc.size)
    total = total_sq = count = None
    for i in range(min(len(source), limit)):
        try:
            x = source.load(i)
        except SkipError:
            continue
        x = x[None] if x.ndim == n else x
        if x.ndim != n + 1 or (enc.in_chans and x.shape[0] != enc.in_chans):
            continue
        if enc.in_chans == 0:
            enc.in_chans = int(x.shape[0])
            log.info("encoder.in_chans=%d (from %s)", enc.in_chans, source.name(i))
        if not need_stats:
            return
        flat = x.reshape(x.shape[0], -1).astype(np.float64)
        ok = np.isfinite(flat)
        values = np.where(ok, flat, 0.0)
        total = values.sum(1) + (0 if total is None else total)
        total_sq = (values**2).sum(1) + (0 if total_sq is None else total_sq)
        count = ok.sum(1) + (0 if count is None else count)
    if count is None or enc.in_chans == 0:
        chans = f"{enc.in_chans} channels and " if enc.in_chans else ""
        raise DataError(
            f"no usable signal among the first {min(len(source), limit)} inputs: expected "
            f"{chans}{n} signal axes (encoder.in_chans, encoder.size={list(enc.size)})"
        )
    if need_stats:
        mean = total / np.maximum(count, 1)
        std = np.sqrt(np.maximum(total_sq / np.maximum(count, 1) - mean**2, 0.0))
        enc.channel_mean = tuple(float(v) for v in mean)
        enc.channel_std = tuple(float(v) if v > 1e-8 else 1.0 for v in std)
        log.info("encoder.channel_mean/std from %d inputs", min(len(source), limit))


def normalize_channels(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per channel over its observed (non-NaN) values; NaN -> 0.

    ``x: (C, ...)``. A constant channel is only centred.
    """
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    observed = ~np.isnan(flat)
    count = observed.sum(1, keepdims=True).clip(min=1)
    mean = np.where(observed, flat, 0.0).sum(1, keepdims=True) / count
    var = (np.where(observed, flat - mean, 0.0) ** 2).sum(1, keepdims=True) / count
    std = np.sqrt(var)
    out = (flat - mean) / np.where(std > 1e-8, std, 1.0)
    return np.nan_to_num(out, nan=0.0).reshape(x.shape).astype(np.float32)


class SignalTransform:
    """Fit one stored array to the model input ``(C, L, d2, ..., dn)``.

    Steps: add a channel axis to an ``n``-d array, check the channel count, refuse infinite
    values, normalize per channel (``encoder.normalize``; missing values become the channel
    mean, 0) and fit the length: ``encoder.fit=resample`` interpolates every axis to
    ``encoder.size``; ``crop`` crops a longer first axis to ``size[0]`` (at a random start when
    given a generator, else at the start) and keeps a shorter one (the batch pads it).
    """

    def __init__(self, cfg: Config) -> None:
        enc = cfg.encoder
        if not isinstance(enc, SignalEncoderConfig):
            raise TypeError("SignalTransform needs a signal encoder config")
        self.enc = enc
        self.mean = self.std = None
        if enc.normalize == "dataset":
            if enc.channel_mean is None or enc.channel_std is None:
                raise ConfigError(
                    "encoder.normalize=dataset needs encoder.channel_mean and channel_std "
                    "(pretraining sets them from the data); or use normalize=sample|none"
                )
            self.mean = np.asarray(enc.channel_mean, np.float32)
            self.std = np.asarray(enc.channel_std, np.float32)

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        enc, n = self.enc, len(self.enc.size)
        if x.ndim == n:
            x = x[None]
        if x.ndim != n + 1:
            raise SkipError(
                f"shape {tuple(x.shape)}: expected (channels, {n} axes) for encoder.size="
                f"{list(enc.size)}"
            )
        if x.shape[0] != enc.in_chans:
            raise SkipError(f"{x.shape[0]} channels, encoder.in_chans={enc.in_chans}")
        if min(x.shape[1:]) == 0:
            raise SkipError(f"empty signal of shape {tuple(x.shape)}")
        if np.isinf(x).any():
            raise SkipError(f"{int(np.isinf(x).sum())} infinite values")
        if self.enc.normalize == "sample":
            x = normalize_channels(x)
        elif self.mean is not None and self.std is not None:
            shape = (-1,) + (1,) * n
            x = (x - self.mean.reshape(shape)) / self.std.reshape(shape)
        x = np.nan_to_num(x, nan=0.0).astype(np.float32)
        if enc.fit == "resample":
            return self._resample(x)
        if tuple(x.shape[2:]) != tuple(enc.size[1:]):
            raise SkipError(
                f"axes after the first are {list(x.shape[2:])}, encoder.size has "
                f"{list(enc.size[1:])} (encoder.fit=crop only crops the first axis)"
            )
        excess = x.shape[1] - enc.size[0]
        if excess > 0:
            start = int(rng.integers(0, excess + 1)) if rng is not None else 0
            x = x[:, start : start + enc.size[0]]
        return np.ascontiguousarray(x)

    def _resample(self, x: np.ndarray) -> np.ndarray:
        size = tuple(self.enc.size)
        if tuple(x.shape[1:]) == size:
            return np.ascontiguousarray(x)
        t = torch.from_numpy(np.ascontiguousarray(x))[None]  # (1, C, d1, ..., dn)
        mode = _INTERPOLATION[len(size)]
        return F.interpolate(t, size=size, mode=mode, align_corners=False)[0].numpy()


def pad_batch(arrays: list[np.ndarray], multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad ``(C, L_b, ...)`` arrays along the first signal axis into one batch.

    The padded length is the longest ``L_b`` rounded up to ``multiple`` (whole patches).

    Returns:
        ``source (B, C, L, ...)`` float32 and ``padding (B, L)`` bool, True = padding.
    """
    longest = max(a.shape[1] for a in arrays)
    longest += -longest % multiple
    first = arrays[0]
    source = np.zeros((len(arrays), first.shape[0], longest, *first.shape[2:]), np.float32)
    padding = np.ones((len(arrays), longest), dtype=bool)
    for b, a in enumerate(arrays):
        source[b, :, : a.shape[1]] = a
        padding[b, : a.shape[1]] = False
    return source, padding


def export_arrays(source: SignalSource, root: Path) -> Path:
    """Write every input of ``source`` as ``root/<label>/<index>.npy`` (``root/<index>.npy``
    when unlabelled): the ``.npy`` folder form of a ``.ts`` file, as stored (NaN = missing)."""
    labels = source.labels()
    width = len(str(max(len(source) - 1, 0)))
    for i in range(len(source)):
        folder = root / source.classes[labels[i]] if labels[i] >= 0 else root
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{i:0{width}d}.npy", source.load(i))
    return root
