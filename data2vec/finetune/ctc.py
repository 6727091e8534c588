"""Connectionist Temporal Classification (Graves et al. 2006) for speech fine-tuning.

The vocabulary is character-level with ``|`` as the word boundary, as in wav2vec 2.0 (Baevski et
al. 2020, §4.3; fairseq's letter dictionaries), and index 0 is the CTC blank. Decoding is greedy:
the most likely label per frame, repeats collapsed, blanks dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from data2vec.errors import DataError

BLANK = "<blank>"
UNK = "<unk>"
WORD_SEP = "|"
UNK_TEXT = "\u2047"  # "⁇": what an unknown label decodes to (one character, never in the data)


class CharVocab:
    """Characters to label ids: ``0 = <blank>``, ``1 = <unk>``, ``2 = |`` (word boundary), ...

    Text is normalized before encoding: whitespace runs become one ``|``, leading and trailing
    whitespace is dropped, and letters are lower-cased when ``lowercase``.

    Args:
        tokens: the labels in id order; ``tokens[0]`` must be ``<blank>``.
        lowercase: lower-case text before encoding.
    """

    def __init__(self, tokens: list[str], lowercase: bool = True) -> None:
        if not tokens or tokens[0] != BLANK:
            raise DataError(f"a CTC vocabulary must start with {BLANK!r} (id 0), got {tokens[:3]}")
        for required in (UNK, WORD_SEP):
            if required not in tokens:
                raise DataError(f"a CTC vocabulary must contain {required!r}")
        if len(set(tokens)) != len(tokens):
            raise DataError("a CTC vocabulary has duplicate tokens")
        self.tokens = list(tokens)
        self.lowercase = lowercase
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.blank = 0
        self.unk = self.index[UNK]

    @classmethod
    def build(cls, transcripts: Iterable[str], lowercase: bool = True) -> CharVocab:
        """Every character of ``transcripts`` (after normalization), sorted, after the specials."""
        chars: set[str] = set()
        for text in transcripts:
            chars |= set(cls._normalize(text, lowercase).replace(" ", ""))
        chars -= {WORD_SEP}
        return cls([BLANK, UNK, WORD_SEP, *sorted(chars)], lowercase)

    @staticmethod
    def _normalize(text: str, lowercase: bool) -> str:
        text = " ".join(text.split())
        return text.lower() if lowercase else text

    def normalize(self, text: str) -> str:
        """The text as it is scored: whitespace collapsed, lower-cased when ``lowercase``."""
        return self._normalize(text, self.lowercase)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Label ids of ``text``; unknown characters become ``<unk>``."""
        norm = self.normalize(text).replace(" ", WORD_SEP)
        return [self.index.get(ch, self.unk) for ch in norm]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of label ids (blanks dropped, ``|`` -> space, ``<unk>`` -> ``⁇``)."""
        chars = []
        for i in ids:
            i = int(i)
            if i == self.blank:
                continue
            token = self.tokens[i] if 0 <= i < len(self.tokens) else UNK
            chars.append(" " if token == WORD_SEP else UNK_TEXT if token == UNK else token)
        return " ".join("".join(chars).split())

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "lowercase": self.lowercase}

    @classmethod
    def from_dict(cls, data: dict) -> CharVocab:
        return cls(list(data["tokens"]), bool(data.get("lowercase", True)))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CharVocab:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read CTC vocabulary {path}: {exc}") from exc
        if not isinstance(data, dict) or "tokens" not in data:
            raise DataError(f"{path}: expected a JSON object with a 'tokens' list")
        return cls.from_dict(data)


def frame_lengths(
    padding_mask: Tensor | None, batch: int, frames: int, device: torch.device | None = None
) -> Tensor:
    """Valid frames per row: ``(B,)`` int64 from a ``(B, T)`` mask (True = padding) or all ``T``."""
    if padding_mask is None:
        return torch.full((batch,), frames, dtype=torch.long, device=device)
    return (~padding_mask).sum(1).long()


def ctc_greedy_decode(
    logits: Tensor, lengths: Tensor | None = None, blank: int = 0
) -> list[list[int]]:
    """Best path decoding.

    Args:
        logits: ``(B, T, V)`` (log-)probabilities or logits.
        lengths: ``(B,)`` valid frames per row, or None (all ``T``).
        blank: the blank id.

    Returns:
        Per row, the label ids after collapsing repeats and dropping blanks.
    """
    best = logits.detach().argmax(-1).cpu()  # (B, T)
    B, T = best.shape
    lengths = frame_lengths(None, B, T) if lengths is None else lengths.detach().cpu()
    valid = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    # A frame emits its label when it differs from the previous frame and is not blank.
    changed = torch.ones_like(valid)
    changed[:, 1:] = best[:, 1:] != best[:, :-1]
    emit = valid & changed & (best != blank)
    return [best[b][emit[b]].tolist() for b in range(B)]


def ctc_loss(
    logits: Tensor,
    lengths: Tensor,
    targets: Tensor,
    target_lengths: Tensor,
    blank: int = 0,
    reduction: str = "mean",
) -> Tensor:
    """CTC loss over a padded batch, computed in float32.

    Args:
        logits: ``(B, T, V)`` unnormalized scores (log-softmax is applied here).
        lengths: ``(B,)`` valid frames per row (see :func:`frame_lengths`); frames after it are
            ignored whatever they hold.
        targets: ``(B, S)`` label ids, padded after ``target_lengths`` (padding ignored).
        target_lengths: ``(B,)`` labels per row.
        blank: the blank id.
        reduction: ``"mean"`` (each row's loss divided by its target length, then averaged:
            PyTorch's convention), ``"sum"`` or ``"none"``.

    Returns:
        The loss. Rows without any valid alignment (more labels than frames can hold) give 0
        instead of ``inf`` (``zero_infinity``), so one bad utterance cannot poison a batch.
    """
    T = logits.shape[1]
    if bool((lengths > T).any()):
        raise ValueError(f"frame lengths {lengths.tolist()} exceed the {T} frames of the logits")
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(
        log_probs,
        targets.long(),
        lengths.long(),
        target_lengths.long(),
        blank=blank,
        reduction=reduction,
        zero_infinity=True,
    )
