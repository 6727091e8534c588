"""Pretraining data of a joint model: one loader that interleaves batches of several modalities.

Every batch holds one modality (each keeps its own batch size, masks and collate). Batch ``k``
of the run belongs to modality ``pattern[k % W]``, a fixed smooth round robin over the
configured weights (``W`` = their sum), so every rank sees the same modality at the same step
and a resumed run knows exactly how far each modality's own stream has got.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Sampler

from data2vec.config import Config, MultiEncoderConfig
from data2vec.data.batch import PretrainBatch
from data2vec.data.registry import PretrainData, build_pretrain_data
from data2vec.data.skips import SkipLog
from data2vec.errors import UserError


def interleave_pattern(weights: Sequence[int]) -> list[int]:
    """Smooth weighted round robin: ``weights`` (2, 1, 1) -> ``[0, 1, 2, 0]``-like orders in
    which each index appears ``weights[i]`` times, spread out rather than in runs."""
    total = sum(weights)
    current = [0] * len(weights)
    out = []
    for _ in range(total):
        current = [c + w for c, w in zip(current, weights)]
        best = max(range(len(weights)), key=lambda i: current[i])  # first maximum
        current[best] -= total
        out.append(best)
    return out


def batches_before(pattern: Sequence[int], index: int, k: int) -> int:
    """How many of the first ``k`` batches belong to modality ``index``."""
    full, rest = divmod(k, len(pattern))
    return full * pattern.count(index) + list(pattern[:rest]).count(index)


class MultiDataset(Dataset):
    """``dataset[(i, key)] -> (i, datasets[i][key])``."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, Any]) -> tuple[int, Any]:
        i, inner = key
        return i, self.datasets[i][inner]


class MultiBatchSampler(Sampler[list[tuple[int, Any]]]):
    """Batches of the modalities in pattern order, from each modality's own endless sampler."""

    def __init__(self, samplers: Sequence[Sampler], pattern: Sequence[int], start: int) -> None:
        self.samplers = list(samplers)
        self.pattern = list(pattern)
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, Any]]]:
        streams = [iter(s) for s in self.samplers]
        k = self.start
        while True:
            i = self.pattern[k % len(self.pattern)]
            yield [(i, key) for key in next(streams[i])]
            k += 1


class MultiCollate:
    """Collate one modality's samples with that modality's collate; tag the batch."""

    def __init__(self, names: Sequence[str], collates: Sequence[Any]) -> None:
        self.names = list(names)
        self.collates = list(collates)

    def __call__(self, items: list[tuple[int, Any]]) -> PretrainBatch:
        i = items[0][0]
        batch = self.collates[i]([item for _, item in items])
        batch.modality = self.names[i]
        return batch


def parse_data_specs(spec: Any, names: Sequence[str]) -> dict[str, str]:
    """``{"image": PATH, ...}`` from a mapping or ``MODALITY=PATH`` strings (one or a list).

    Raises:
        UserError: a malformed item, an unknown modality, or a configured modality without data.
    """
    if isinstance(spec, Mapping):
        out = {str(k): str(v) for k, v in spec.items()}
    else:
        items = [spec] if isinstance(spec, (str, Path)) else list(spec)
        out = {}
        for item in map(str, items):
            name, sep, path = item.partition("=")
            if not sep or not path:
                raise UserError(
                    f"--data {item!r}: a joint model takes one --data MODALITY=PATH per modality "
                    f"({', '.join(names)})"
                )
            out[name] = path
    unknown = sorted(set(out) - set(names))
    missing = [n for n in names if n not in out]
    if unknown or missing:
        raise UserError(
            f"joint model data: unknown modalities {unknown}, missing {missing}; give "
            + " ".join(f"--data {n}=PATH" for n in names)
        )
    return out


def build_multi_data(
    cfg: Config, spec: Any, skips: SkipLog, work_dir: Path | None = None
) -> PretrainData:
    """Each modality's pretraining data, built with its own config, behind one interleaving
    loader. What data preparation sets in a modality's encoder config (text: vocabulary size
    and special ids) is recorded in ``cfg.encoder.overrides``."""
    from data2vec.models.multimodal import modality_configs, record_encoder_changes

    enc = cfg.encoder
    assert isinstance(enc, MultiEncoderConfig)
    names = list(enc.modalities)
    specs = parse_data_specs(spec, names)
    cfgs = modality_configs(cfg)
    parts: list[PretrainData] = []
    for name in names:
        before = copy.deepcopy(cfgs[name])  # data preparation may set encoder fields
        part = build_pretrain_data(cfgs[name], specs[name], skips, work_dir)
        if part.make_sampler is None:
            raise UserError(f"joint pretraining reads files, not tar shards ({specs[name]})")
        record_encoder_changes(cfg, name, before, cfgs[name])
        parts.append(part)
    pattern = interleave_pattern(enc.weights)

    def make_sampler(start: int, rank: int = 0, world: int = 1) -> MultiBatchSampler:
        samplers = [
            part.make_sampler(batches_before(pattern, i, start), rank, world)  # type: ignore[misc]
            for i, part in enumerate(parts)
        ]
        return MultiBatchSampler(samplers, pattern, start)

    tokenizer = next((p.tokenizer for p in parts if p.tokenizer is not None), None)
    return PretrainData(
        MultiDataset([p.dataset for p in parts]),
        MultiCollate(names, [p.collate for p in parts]),
        make_sampler,
        sum(p.size for p in parts),
        tokenizer=tokenizer,
    )


def detect_modality(data: str | Path, available: Sequence[str]) -> str:
    """Which of a joint model's modalities a labelled/unlabelled data set holds.

    ``fashion-mnist:*`` and IDX files are images; ``.tsv``/``.jsonl`` are text unless their
    first field names an image or audio file (a manifest); a folder is judged by the first
    image, audio, array or text file found in it.

    Raises:
        UserError: nothing recognizable, or a modality the model does not have.
    """
    from data2vec.data.audio import AUDIO_EXTENSIONS
    from data2vec.data.images import IMAGE_EXTENSIONS

    kinds = {**dict.fromkeys(IMAGE_EXTENSIONS, "image"), **dict.fromkeys(AUDIO_EXTENSIONS, "audio")}
    kinds |= {".npy": "signal", ".npz": "signal", ".ts": "signal", ".txt": "text"}
    text = str(data)
    path = Path(text)
    found: str | None = None
    if text.startswith("fashion-mnist:") or "idx3" in path.name:
        found = "image"
    elif path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix.lower() in kinds:
                found = kinds[f.suffix.lower()]
                break
    elif path.suffix.lower() in (".tsv", ".jsonl", ".txt", ".json"):
        with path.open(encoding="utf-8", errors="replace") as fh:
            first = fh.readline().split("\t")[0].strip()
        found = kinds.get(Path(first).suffix.lower(), "text") if first else "text"
        found = "text" if found == "signal" else found
    elif path.suffix.lower() in kinds:
        found = kinds[path.suffix.lower()]
    if found is None or found not in available:
        raise UserError(
            f"cannot tell which of this joint model's modalities ({', '.join(available)}) "
            f"{data} holds" + (f" (it looks like {found})" if found else "")
        )
    return found
