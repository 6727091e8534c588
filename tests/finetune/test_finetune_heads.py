"""Tests for the fine-tuning heads (data2vec.finetune.heads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data2vec.errors import UserError
from data2vec.finetune.heads import ClassificationHead, CTCHead, build_head
from data2vec.models.encoder import EncoderOutput


def _output() -> EncoderOutput:
    """2 rows, 1 extra token + 3 tokens, D = 2; row 1 has its last token padded."""
    x = torch.tensor(
        [
            [[100.0, -100.0], [1.0, 2.0], [3.0, 6.0], [5.0, 1.0]],
            [[-50.0, 50.0], [2.0, 0.0], [4.0, 4.0], [999.0, -999.0]],
        ]
    )
    pad = torch.tensor([[False, False, False, False], [False, False, False, True]])
    return EncoderOutput(x=x, padding_mask=pad, num_extra_tokens=1)


def _expected(head: ClassificationHead, pooled: torch.Tensor) -> torch.Tensor:
    normed = F.layer_norm(pooled, (2,), head.norm.weight, head.norm.bias, head.norm.eps)
    return normed @ head.linear.weight.T + head.linear.bias


def test_classification_head__mean_pool_skips_extra_and_padded_tokens() -> None:
    head = ClassificationHead(2, 3, pool="mean")
    torch.nn.init.normal_(head.linear.weight)  # a visible head: the default init is ~0
    # By hand: row 0 = mean of (1,2), (3,6), (5,1) = (3, 3); row 1 = mean of (2,0), (4,4) = (3, 2).
    pooled = torch.tensor([[3.0, 3.0], [3.0, 2.0]])
    torch.testing.assert_close(head(_output()), _expected(head, pooled))


def test_classification_head__mean_pool_without_padding_mask_uses_every_token() -> None:
    head = ClassificationHead(2, 3)
    torch.nn.init.normal_(head.linear.weight)
    out = _output()
    out.padding_mask = None
    pooled = torch.tensor([[3.0, 3.0], [1005.0 / 3, -995.0 / 3]])
    torch.testing.assert_close(head(out), _expected(head, pooled))


def test_classification_head__cls_pool_takes_the_first_extra_token() -> None:
    head = ClassificationHead(2, 3, pool="cls")
    torch.nn.init.normal_(head.linear.weight)
    pooled = torch.tensor([[100.0, -100.0], [-50.0, 50.0]])
    torch.testing.assert_close(head(_output()), _expected(head, pooled))


def test_classification_head__cls_pool_needs_an_extra_token() -> None:
    out = EncoderOutput(x=torch.zeros(1, 3, 2), padding_mask=None, num_extra_tokens=0)
    with pytest.raises(UserError, match="cls"):
        ClassificationHead(2, 3, pool="cls")(out)


def test_classification_head__starts_near_uniform() -> None:
    logits = ClassificationHead(2, 4)(_output())
    assert logits.abs().max() < 1e-3


def test_ctc_head__one_row_per_frame_without_extra_tokens() -> None:
    head = CTCHead(2, 5)
    out = _output()
    logits = head(out)
    assert logits.shape == (2, 3, 5)
    torch.testing.assert_close(logits, head.linear(out.x[:, 1:]))


@pytest.mark.parametrize(
    "head",
    [ClassificationHead(8, 3, pool="cls", dropout=0.1), CTCHead(8, 7, dropout=0.2)],
    ids=["classification", "ctc"],
)
def test_build_head__rebuilds_from_spec(head) -> None:
    rebuilt = build_head(head.spec(), 8)
    assert type(rebuilt) is type(head)
    assert rebuilt.spec() == head.spec()
