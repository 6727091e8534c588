"""Task heads on top of an :class:`~data2vec.models.encoder.EncoderOutput`.

Both heads are modality-agnostic: they see tokens and a padding mask, never images or audio.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from data2vec.evaluate.features import pool_tokens
from data2vec.models.encoder import EncoderOutput

Pool = Literal["mean", "cls"]

# MAE fine-tuning initializes the classifier with trunc-normal std 2e-5: the untrained head
# predicts (almost) uniformly, so the first steps do not push large gradients into the encoder.
HEAD_INIT_STD = 2e-5


class ClassificationHead(nn.Module):
    """``pool -> LayerNorm -> dropout -> Linear`` (data2vec / MAE image fine-tuning, DESIGN §5).

    Args:
        dim: encoder width ``D``.
        n_classes: number of classes ``C``.
        pool: ``mean`` over the non-extra, non-padded tokens, or the first extra (``cls``) token.
        dropout: dropout before the linear layer.
    """

    def __init__(self, dim: int, n_classes: int, pool: Pool = "mean", dropout: float = 0.0) -> None:
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool={pool!r}; expected 'mean' or 'cls'")
        self.pool = pool
        self.dropout_p = dropout
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(dim, n_classes)
        nn.init.trunc_normal_(self.linear.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.linear.bias)

    @property
    def n_classes(self) -> int:
        return self.linear.out_features

    def spec(self) -> dict:
        """The arguments that rebuild this head (see :func:`build_head`)."""
        return {
            "type": "classification",
            "n_classes": self.n_classes,
            "pool": self.pool,
            "dropout": self.dropout_p,
        }

    def forward(self, out: EncoderOutput) -> Tensor:
        """``out.x: (B, E + T, D)`` -> logits ``(B, C)``."""
        pooled = pool_tokens(out, self.pool)  # (B, D)
        return self.linear(self.dropout(self.norm(pooled)))


class CTCHead(nn.Module):
    """``dropout -> Linear`` per frame to vocabulary logits (wav2vec 2.0 CTC fine-tuning).

    Extra tokens (e.g. a CLS token) are dropped: every output row is one input frame.

    Args:
        dim: encoder width ``D``.
        vocab_size: ``V``, the blank (index 0) included.
        dropout: dropout on the encoder output (fairseq ``final_dropout``).
    """

    def __init__(self, dim: int, vocab_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(dim, vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.linear.out_features

    def spec(self) -> dict:
        """The arguments that rebuild this head (see :func:`build_head`)."""
        return {"type": "ctc", "vocab_size": self.vocab_size, "dropout": self.dropout_p}

    def forward(self, out: EncoderOutput) -> Tensor:
        """``out.x: (B, E + T, D)`` -> logits ``(B, T, V)``."""
        return self.linear(self.dropout(out.tokens))


def build_head(spec: dict, dim: int) -> ClassificationHead | CTCHead:
    """A head from its :meth:`spec` (as stored in ``finetune.json``) for encoder width ``dim``."""
    kind = spec.get("type")
    if kind == "classification":
        return ClassificationHead(
            dim, int(spec["n_classes"]), spec.get("pool", "mean"), float(spec.get("dropout", 0.0))
        )
    if kind == "ctc":
        return CTCHead(dim, int(spec["vocab_size"]), float(spec.get("dropout", 0.0)))
    raise ValueError(f"unknown head type {kind!r}; expected 'classification' or 'ctc'")
