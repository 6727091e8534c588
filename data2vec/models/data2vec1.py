"""The data2vec 1.0 objective (Baevski et al. 2022, "data2vec: A General Framework for
Self-supervised Learning in Speech, Vision and Language") for speech, text and images.

One training step::

    targets = teacher(unmasked input) -> top-K FFN outputs, per-layer norm, average  (B, T, D)
    x       = student(masked input) -> blocks                         (B, T, D)
    pred    = final_proj(x[mask])                                     (num_masked, D)
    loss    = regression(pred, targets[mask]), averaged over masked tokens

Unlike 2.0, the student is the whole encoder run on the *full* masked sequence (no token
dropping, no clones, no decoder). Speech: a learned mask embedding replaces masked frames before
the positional convolution; the teacher owns everything but the CNN and copies (does not
average) the positional convolution (fairseq ``ema_transformer_only``/``ema_layers_only``);
L2 / sqrt(D); a linear head. Text: masked tokens become ``<mask>``; the teacher owns the whole
encoder but copies the embeddings (fairseq ``ema_transformer_layers_only``); smooth L1 with
beta 4; a 2-layer head. Images: a learned mask embedding replaces masked patches (BEiT
block-wise masks), pre-LN layer-scale blocks with a shared relative position bias
(``nn/beit.py``), targets from the end-of-block outputs of the top 6 blocks (LayerNorm per layer
and of the average), smooth L1 with beta 2 averaged over dimensions, a linear head on the
final LayerNorm's output; the teacher averages the whole encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from data2vec.config import Config
from data2vec.engine import distributed
from data2vec.models.data2vec2 import PretrainOutput
from data2vec.models.encoder import Encoder
from data2vec.targets import TopKTargets, per_dim_std, regression_loss
from data2vec.teacher import EMATeacher


class MaskAndHead(nn.Module):
    """The student's parts outside the encoder: the speech mask embedding and the regression
    head (saved where 2.0 keeps its decoder)."""

    def __init__(self, dim: int, modality: str) -> None:
        super().__init__()
        if modality == "audio":
            self.mask_emb = nn.Parameter(torch.rand(dim))  # fairseq: FloatTensor(D).uniform_()
            self.final_proj: nn.Module = nn.Linear(dim, dim)
        elif modality == "image":
            # data2vec-vision / BEiT: mask token trunc-normal(0.02), lm_head Linear(D, D)
            self.mask_emb = nn.Parameter(nn.init.trunc_normal_(torch.empty(dim), std=0.02))
            self.final_proj = nn.Linear(dim, dim)
            nn.init.trunc_normal_(self.final_proj.weight, std=0.02)
            nn.init.zeros_(self.final_proj.bias)
        else:  # text: fairseq head_layers=2, Linear(D, 2D) -> GELU -> Linear(2D, D)
            self.final_proj = nn.Sequential(
                nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
            )


class Data2Vec1(nn.Module):
    """Student encoder + mask embedding + regression head, with an EMA teacher beside them.

    Args:
        encoder: the student encoder (speech: CNN, positional convolution, post-LN blocks).
        teacher: the EMA teacher of ``encoder``.
        cfg: the run config (``target``, ``loss``, ``model.exact_padding`` are read).
    """

    def __init__(self, encoder: Encoder, teacher: EMATeacher, cfg: Config) -> None:
        super().__init__()
        self.modality = cfg.model.modality
        self.mask_id = getattr(cfg.encoder, "mask_id", None)
        self.vocab_size = getattr(cfg.encoder, "vocab_size", None)
        self.random_token = cfg.mask.random_token
        self.leave_unmasked = cfg.mask.leave_unmasked
        self.scope = cfg.ema.scope
        self.encoder = encoder
        self.decoder = MaskAndHead(encoder.embed_dim, cfg.model.modality)
        self.target_cfg = cfg.target
        self.loss_cfg = cfg.loss
        self.exact_padding = cfg.model.exact_padding
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see EMATeacher

    # ---------------------------------------------------------------- stages

    @torch.no_grad()
    def forward_targets(
        self,
        source: Tensor,
        source_padding: Tensor | None,
        local: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        """Teacher targets on the unmasked input: ``(B, T, D)`` float32.

        A teacher that owns its embeddings (text) reads ``source``; one that shares the
        student's local encoder (speech) reads the student's ``local`` features.
        """
        teacher: Encoder = self.teacher.model  # type: ignore[assignment]
        self.teacher.follow_device(local)
        if self.scope == "all":
            t_local, pad = teacher.modality.embed(source, source_padding)
            ctx = teacher.modality.contextualize(t_local, pad)
        else:
            ctx = teacher.modality.contextualize(local.detach(), padding_mask)
        E = teacher.num_extra_tokens
        targets = TopKTargets(
            len(teacher.blocks),
            self.target_cfg.top_k,
            self.target_cfg.layer_norm,
            self.target_cfg.final_norm,
            padding_mask=padding_mask if self.exact_padding else None,
        )
        # Each block's output is folded into the running average and dropped, as in 2.0: the
        # teacher never holds its K layers at once (the values equal ``build_targets`` on them).
        end_of_block = self.target_cfg.source == "block"
        for x, ffn in teacher.iter_blocks(ctx):
            targets.add((x if end_of_block else ffn)[:, E:])
        return targets.result()

    def text_corruption(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """BERT-style corruption of the selected tokens (Devlin et al. 2019; fairseq
        ``MaskTokensDataset``): ``<mask>``, except ``random_token`` of them get a random
        ordinary token and ``leave_unmasked`` stay as they are.

        Returns:
            The student's tokens and the ``<mask>`` positions (where the loss is computed).
        """
        if self.random_token == 0 and self.leave_unmasked == 0:
            return tokens.masked_fill(mask, self.mask_id), mask
        u = torch.rand(mask.shape, device=mask.device)
        keep = mask & (u < self.leave_unmasked)
        rand = mask & (u >= self.leave_unmasked) & (u < self.leave_unmasked + self.random_token)
        masked = mask & ~keep & ~rand
        # ids 0-4 are the special tokens: random replacements are ordinary tokens
        random_ids = torch.randint_like(tokens, 5, self.vocab_size)
        out = torch.where(rand, random_ids, tokens).masked_fill(masked, self.mask_id)
        return out, masked

    def forward_student(
        self, source: Tensor, local: Tensor, padding_mask: Tensor | None, mask: Tensor
    ) -> Tensor:
        """The full student on the masked input: ``(B, T, D)``.

        Speech and images replace masked local features by the mask embedding; text re-embeds
        the tokens with ``<mask>`` at masked positions (``source`` already corrupted, see
        :meth:`text_corruption`). Extra tokens (the image CLS) are dropped from the output.
        """
        if self.modality == "text":
            local, _ = self.encoder.modality.embed(source)
        else:
            local = torch.where(mask.unsqueeze(-1), self.decoder.mask_emb.to(local.dtype), local)
        ctx = self.encoder.modality.contextualize(local, padding_mask)
        return self.encoder.forward_blocks(ctx).tokens

    def forward(
        self,
        source: Tensor,
        mask: Tensor,
        padding_mask: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> PretrainOutput:
        """One pretraining forward pass.

        Args:
            source: waveforms ``(B, S)``, token ids ``(B, T)`` or images ``(B, C, H, W)``.
            mask: ``(B, T)`` bool frame/token mask, True = masked.
            padding_mask: ``(B, S)`` input padding, True = padding, or None.
            noise: unused (the 2.0 objective's mask-token values; kept for one signature).
        """
        local, pad = self.encoder.modality.embed(source, padding_mask)
        mask = mask.to(local.device, non_blocking=True)
        if mask.shape != local.shape[:2]:
            raise ValueError(f"expected a {tuple(local.shape[:2])} mask, got {tuple(mask.shape)}")
        targets = self.forward_targets(source, padding_mask, local, pad)
        student_input = source
        if self.modality == "text":
            student_input, mask = self.text_corruption(source, mask)
        x = self.forward_student(student_input, local, pad, mask)
        loss_mask = mask if pad is None else mask & ~pad
        pred = self.decoder.final_proj(x[loss_mask])
        y = targets[loss_mask]
        world = distributed.world_size()
        n_masked = int(loss_mask.sum())
        local_size = max(n_masked, 1)
        sample_size = distributed.global_count(n_masked, pred.device)
        scale = self.loss_cfg.scale
        if self.loss_cfg.reduction == "mean":
            scale = 1.0 / pred.shape[-1]  # the element-wise mean, once divided by n_masked
        reg = regression_loss(pred, y, self.loss_cfg.beta, scale)
        logs = {
            "loss_regression": reg.detach() / local_size,
            "target_std": per_dim_std(y),
            "pred_std": per_dim_std(pred.detach()),
            "masked_fraction": loss_mask.float().mean().detach(),
        }
        return PretrainOutput(loss=reg / sample_size * world, sample_size=sample_size, logs=logs)

    def update_teacher(self, step: int) -> float:
        return self.teacher.update(self.encoder, step)
