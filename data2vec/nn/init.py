"""Weight initialization of data2vec 2.0 (DESIGN §3; fairseq ``init_bert_params``)."""

from __future__ import annotations

from torch import nn


def init_bert_params(module: nn.Module) -> None:
    """Linear and Embedding weights ~ N(0, 0.02²), biases 0 (BERT / fairseq default).

    Apply with ``model.apply(init_bert_params)``; modality encoders then re-initialize the
    parts that differ (patch convolution, CLS token, decoder projection).
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
