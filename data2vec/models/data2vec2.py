"""The data2vec 2.0 objective (Baevski et al. 2022, "Efficient Self-supervised Learning with
Contextualized Target Representations for Vision, Speech and Language").

One training step::

    local   = student.embed(source)                         (B, T, D)   once per sample
    targets = teacher(source | local)  -> top-K average     (B, T, D)   once per sample
    x       = student.contextualize(local, M masks) -> blocks  (B·M, E + V, D)  visible only
    pred    = decoder(x scattered back, noise at masked)    (B·M, T, D)
    loss    = L2(pred[mask], targets[mask]) / √D, averaged over masked tokens (+ CLS loss)

``forward`` composes named stages; the engine does backward, the optimizer step and then
``model.update_teacher(step)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from data2vec.config import Config
from data2vec.engine import distributed
from data2vec.masking import MaskInfo, true_rows
from data2vec.models.encoder import Encoder, EncoderOutput
from data2vec.nn.lean import lean_dropout
from data2vec.targets import TopKTargets, per_dim_std, per_dim_std_of_rows, regression_loss
from data2vec.teacher import EMATeacher


@dataclass
class PretrainOutput:
    """What one forward pass of an objective returns to the engine.

    Attributes:
        loss: scalar to back-propagate: the mean over masked tokens of the summed,
            scaled regression error, plus the weighted CLS loss.
        sample_size: number of masked tokens in the loss (the normalizer).
        logs: detached scalars to log (``target_std`` and ``pred_std`` are always present).
    """

    loss: Tensor
    sample_size: int
    logs: dict[str, Tensor] = field(default_factory=dict)


# Which student modules the teacher leaves shared, per EMA scope (see EMAConfig.scope).
EXCLUDED_BY_SCOPE = {
    "all": (),
    "context": ("modality.local_encoder",),
    "blocks": ("modality",),
}


class Data2Vec2(nn.Module):
    """Student encoder + decoder, with an EMA teacher kept beside them.

    Args:
        encoder: the student encoder.
        decoder: maps ``(N, T, D)`` (masked slots filled) to predictions (see ``ConvDecoder``).
        teacher: the EMA teacher of ``encoder``.
        cfg: the run config (``mask``, ``target``, ``loss``, ``decoder``, ``ema.scope`` and
            ``model.exact_padding`` are read).
    """

    def __init__(
        self, encoder: Encoder, decoder: nn.Module, teacher: EMATeacher, cfg: Config
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.clones = cfg.mask.clones
        self.noise_std = cfg.mask.noise_std
        self.decoder_input_dropout = cfg.decoder.input_dropout
        self.target_cfg = cfg.target
        self.loss_cfg = cfg.loss
        self.scope = cfg.ema.scope
        self.exact_padding = cfg.model.exact_padding
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see EMATeacher
        encoder.activation_checkpointing = cfg.model.activation_checkpointing
        if cfg.loss.cls_weight > 0 and encoder.num_extra_tokens == 0:
            raise ValueError("loss.cls_weight > 0 needs an extra (CLS) token in the encoder")

    # ---------------------------------------------------------------- stages

    @torch.no_grad()
    def forward_targets(
        self,
        source: Tensor,
        source_padding: Tensor | None,
        local: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        """Teacher targets on the unmasked input, once per sample.

        Args:
            source: the raw batch (used when the teacher owns its local encoder).
            source_padding: ``(B, S)`` padding of ``source``, or None.
            local: ``(B, T, D)`` student local features (used when it does not).
            padding_mask: ``(B, T)`` padding of ``local``, True = padding, or None.

        Returns:
            ``(B, T, D)`` float32 targets (extra tokens removed).
        """
        teacher: Encoder = self.teacher.model  # type: ignore[assignment]
        self.teacher.follow_device(local)
        if self.scope == "all":
            t_local, pad = teacher.modality.embed(source, source_padding)
            ctx = teacher.modality.contextualize(t_local, pad)
        elif self.scope == "context":
            ctx = teacher.modality.contextualize(local.detach(), padding_mask)
        else:  # "blocks": the student's own (gradient-free) context encoder feeds the teacher
            ctx = self.encoder.modality.contextualize(local.detach(), padding_mask)
        E = teacher.num_extra_tokens
        targets = TopKTargets(
            len(teacher.blocks),
            self.target_cfg.top_k,
            self.target_cfg.layer_norm,
            self.target_cfg.final_norm,
            padding_mask=padding_mask if self.exact_padding else None,
        )
        # Each block's output is folded into the running average and dropped: the teacher
        # never holds its K layers at once.
        end_of_block = self.target_cfg.source == "block"
        for x, ffn in teacher.iter_blocks(ctx):
            targets.add((x if end_of_block else ffn)[:, E:])
        return targets.result()

    def forward_student(
        self, local: Tensor, padding_mask: Tensor | None, mask: MaskInfo
    ) -> EncoderOutput:
        """Student on the visible tokens of every clone: ``(B, T, D)`` -> ``x: (B·M, E + V, D)``."""
        ctx = self.encoder.modality.contextualize(local, padding_mask, mask)
        return self.encoder.forward_blocks(ctx)

    def decoder_input(
        self, student: EncoderOutput, mask: MaskInfo, noise: Tensor | None = None
    ) -> Tensor:
        """Put visible outputs back in place; fill masked slots with N(0, noise_std²).

        Args:
            student: ``x: (N, E + V, D)``.
            mask: the masks of the ``N`` rows.
            noise: optional ``(num_masked, D)`` values for the masked slots (tests inject the
                reference implementation's draw); drawn fresh when None.

        Returns:
            ``(N, T, D)``.
        """
        visible = lean_dropout(student.tokens, self.decoder_input_dropout, self.training)  # (N,V,D)
        N, V, D = visible.shape
        T = mask.mask.shape[1]
        full = visible.new_empty(N, T, D)
        if noise is None:
            # Every slot is drawn and the visible ones overwritten: one pass over the output
            # instead of two boolean-mask assignments (each finds the mask's nonzeros first;
            # 2.6 ms per step at image-v2-base batch 128 on an H100, where the draw and the
            # scatter now take under 1 ms each).
            full.normal_(0.0, self.noise_std)
        else:
            full[mask.mask] = noise.to(visible.dtype)
        # Row n's visible outputs go to positions ids_keep[n] (ascending, as they came out).
        return full.scatter_(1, mask.ids_keep.unsqueeze(-1).expand(N, V, D), visible)

    def forward_loss(
        self,
        pred: Tensor,
        targets: Tensor,
        student: EncoderOutput,
        loss_mask: Tensor,
        loss_rows: Tensor | None = None,
    ) -> PretrainOutput:
        """Loss over the masked (non-padded) positions only.

        Args:
            pred: ``(num_loss, D)`` decoder predictions, row-major over ``loss_mask``.
            targets: ``(B, T, D)`` un-cloned teacher targets.
            student: the student's output (its first token is the CLS prediction).
            loss_mask: ``(B·M, T)`` bool: masked and not padding.
            loss_rows: ``loss_mask``'s positions as flat row-major indices into ``B·M x T``
                (:meth:`MaskInfo.masked_rows`), if known; found from ``loss_mask`` otherwise
                (which waits for the device).
        """
        N, B = loss_mask.shape[0], targets.shape[0]
        T = loss_mask.shape[1]
        if loss_rows is None:
            loss_rows = true_rows(loss_mask)
        M, D = N // B, targets.shape[-1]
        rows, cols = loss_rows.div(T, rounding_mode="floor"), loss_rows.remainder(T)
        # Clone row n belongs to sample n // M: each prediction's target is a row of the
        # (B·T, D) table, read by index instead of the targets being repeated M times.
        table = targets.reshape(B * T, D)
        index = rows.div(M, rounding_mode="floor").mul_(T).add_(cols)  # (num_loss,)
        local_size = max(int(rows.numel()), 1)
        # The loss is a mean over the masked tokens of *all* workers: DDP averages gradients
        # over W ranks, so each rank scales its sum by W / (global count).
        world = distributed.world_size()
        sample_size = distributed.global_count(int(rows.numel()), pred.device)
        reg = regression_loss(pred, table, self.loss_cfg.beta, self.loss_cfg.scale, index)
        loss = reg / sample_size * world
        logs = {"loss_regression": reg.detach() / local_size}
        if self.loss_cfg.cls_weight > 0:
            cls_target = targets.mean(dim=1).repeat_interleave(N // B, dim=0)  # (N, D)
            cls_pred = student.x[:, self.encoder.num_extra_tokens - 1]
            cls = regression_loss(cls_pred, cls_target, self.loss_cfg.beta, self.loss_cfg.scale)
            # fairseq weights the CLS term by cls_loss * sample_size before the trainer divides
            # by sample_size: net effect cls_weight * (sum over the N rows).
            cls = self.loss_cfg.cls_weight * cls
            loss = loss + cls * world  # a sum over the rows of all workers
            logs["loss_cls"] = cls.detach()
        # the std of the repeated targets, from how often each is repeated
        counts = loss_mask.reshape(B, M, T).sum(dim=1).reshape(-1)  # (B·T,)
        logs["target_std"] = per_dim_std_of_rows(table, counts)
        logs["pred_std"] = per_dim_std(pred.detach())
        logs["masked_fraction"] = torch.tensor(rows.numel() / loss_mask.numel())
        return PretrainOutput(loss=loss, sample_size=sample_size, logs=logs)

    # ---------------------------------------------------------------- composition

    def forward(
        self,
        source: Tensor,
        mask: Tensor,
        padding_mask: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> PretrainOutput:
        """One pretraining forward pass.

        Args:
            source: the batch (images ``(B, C, H, W)``, waveforms ``(B, S)``).
            mask: ``(B·M, T)`` bool, True = masked, sample-major (row ``b·M + c``).
            padding_mask: ``(B, S)`` input padding, True = padding, or None.
            noise: optional fixed mask-token values (see :meth:`decoder_input`).
        """
        # Checked and counted where the loader left it (the host), so nothing in the forward
        # pass waits for the GPU before the loss is read.
        info = MaskInfo.from_mask(mask, source.device)
        if info.mask.shape[0] != source.shape[0] * self.clones:
            raise ValueError(
                f"expected {source.shape[0]} x {self.clones} clones = "
                f"{source.shape[0] * self.clones} mask rows, got {info.mask.shape[0]}"
            )
        local, pad = self.encoder.modality.embed(source, padding_mask)
        targets = self.forward_targets(source, padding_mask, local, pad)
        student = self.forward_student(local, pad, info)
        # Padded frames never count in the loss nor reach the decoder's valid outputs (fairseq,
        # exact_padding=False, lets masked padding into the loss).
        loss_mask, dec_pad = info.mask, None
        if pad is not None and self.exact_padding:
            dec_pad = pad.repeat_interleave(self.clones, dim=0)  # (N, T)
            loss_mask = info.mask & ~dec_pad
            # Rows differ in their count of masked frames: found on the device.
            loss_rows = true_rows(loss_mask)
        else:
            loss_rows = info.masked_rows()
        full = self.decoder_input(student, info, noise)
        pred = self.decoder(full, loss_rows, dec_pad)
        return self.forward_loss(pred, targets, student, loss_mask, loss_rows)

    def update_teacher(self, step: int) -> float:
        """EMA step after ``step`` optimizer updates; returns the decay used."""
        return self.teacher.update(self.encoder, step)
