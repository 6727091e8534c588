"""Typed, validated configuration: shallow dataclasses, YAML presets and ``key=value`` overrides.

A config has one level of sections (``model``, ``encoder``, ``mask`` ...), each a dataclass whose
fields are plain values. Defaults are the released data2vec 2.0 ViT-B/16 recipe (fairseq
``examples/data2vec/config/v2/base_images_only_task.yaml``); presets in ``configs/`` override
them. Every value is checked against its annotation when the config is built, and an error
names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from data2vec.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "presets"

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """The shared transformer ("backbone") and which objective trains it."""

    SECTION: ClassVar[str] = "model"

    modality: Literal["image", "audio", "text", "signal", "multi"] = "image"
    algorithm: Literal["v1", "v2"] = "v2"
    embed_dim: int = 768
    depth: int = 10  # shared blocks (ViT-B/16 in data2vec 2.0: 2 prenet + 10 shared = 12)
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    encoder_dropout: float = 0.0  # after the attention output projection
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0  # inside the MLP
    post_mlp_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth of the last shared block (linear from 0)
    layerdrop: float = 0.0  # probability of skipping a whole block in training (audio: 0.05)
    # post_ln: the data2vec 2.0 block (and 1.0 speech/text); layer_scale: the pre-LN BEiT block
    # of data2vec 1.0 vision (layer scale, q/v biases without k bias), see nn/beit.py
    block: Literal["post_ln", "layer_scale"] = "post_ln"
    layer_scale: float = 0.1  # initial gamma of layer_scale blocks (BEiT base 0.1, large 1e-5)
    # layer_scale blocks: a LayerNorm after the last block (False: the raw last-block output,
    # as a Hugging Face Data2VecVisionModel with use_mean_pooling returns it)
    final_norm: bool = True
    # Padded frames/tokens never influence valid ones: zeroed before every convolution over
    # time, excluded from target statistics and from the loss. False reproduces fairseq, where
    # they leak into nearby valid frames (only matters for padded batches).
    exact_padding: bool = True
    # Recompute each shared block of the student in backward instead of keeping its
    # activations (data2vec 2.0): less memory for ~1/3 more block compute; same gradients.
    activation_checkpointing: bool = False
    # Post-LN blocks' LayerNorm(x + branch): "torch" = the PyTorch ops; "triton" = one fused
    # kernel each way (data2vec/nn/token_norm.py), taken under autocast wherever Triton runs
    # (also on the CPU under TRITON_INTERPRET=1); "auto" = Triton on NVIDIA GPUs of compute
    # capability >= 8.0 under autocast when Triton is installed, for blocks of at least 40960
    # tokens (smaller calls are bound by launch costs), torch otherwise. Compiled blocks
    # (train.compile) run the torch ops, which Inductor fuses itself.
    norm_impl: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self) -> None:
        _positive(self, "embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps", "layer_scale")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"model.embed_dim={self.embed_dim} must be divisible by "
                f"model.num_heads={self.num_heads}"
            )
        for name in (
            "encoder_dropout",
            "attention_dropout",
            "activation_dropout",
            "post_mlp_dropout",
            "drop_path",
            "layerdrop",
        ):
            _fraction(self, name)


@dataclass
class ImageEncoderConfig:
    """Image modality encoder: patch embedding, fixed 2-D sin-cos positions, CLS, prenet."""

    SECTION: ClassVar[str] = "encoder"

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    prenet_depth: int = 2
    num_extra_tokens: int = 1  # the CLS token
    # sincos: fixed 2-D sin-cos added to the patches (2.0); relative: a learned relative
    # position bias shared by all blocks, no absolute positions (1.0 / BEiT)
    positions: Literal["sincos", "relative"] = "sincos"

    def __post_init__(self) -> None:
        _positive(self, "image_size", "patch_size", "in_chans")
        _non_negative(self, "prenet_depth", "num_extra_tokens")
        if self.positions == "relative" and self.num_extra_tokens != 1:
            raise ConfigError(
                "encoder.positions=relative needs encoder.num_extra_tokens=1 (the bias table "
                f"has entries for one CLS token), got {self.num_extra_tokens}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"encoder.image_size={self.image_size} must be a multiple of "
                f"encoder.patch_size={self.patch_size}"
            )


@dataclass
class AudioEncoderConfig:
    """Audio modality encoder: wav2vec 2.0 CNN, convolutional positions, ALiBi, prenet.

    The CNN has the wav2vec 2.0 shape (kernels 10,3,3,3,3,2,2; strides 5,2,2,2,2,2,2: 320
    samples per frame, 400-sample receptive field, 20 ms frames at 16 kHz); only its width is
    configurable.
    """

    SECTION: ClassVar[str] = "encoder"

    cnn_channels: int = 512
    pos_conv_layers: int = 5
    pos_conv_width: int = 95  # total width; each layer's kernel is max(3, width // layers) = 19
    pos_conv_groups: int = 16
    prenet_depth: int = 0
    prenet_dropout: float = 0.1
    alibi: bool = True
    alibi_scale: float = 1.0  # initial per-head scale of the ALiBi bias (learned)
    # data2vec 1.0 / wav2vec 2.0: padded frames are zeroed before the positional convolution
    # (2.0 leaves them; with model.exact_padding they never reach valid frames either way)
    zero_padding: bool = False

    def __post_init__(self) -> None:
        _positive(self, "cnn_channels", "pos_conv_layers", "pos_conv_width", "pos_conv_groups")
        _non_negative(self, "prenet_depth", "alibi_scale")
        _fraction(self, "prenet_dropout")

    @property
    def pos_conv_kernel(self) -> int:
        return max(3, self.pos_conv_width // self.pos_conv_layers)


@dataclass
class TextEncoderConfig:
    """Text modality encoder: token embedding + learned positions + LayerNorm + dropout.

    Token ids follow the fairseq/RoBERTa convention of the tokenizer (``<s>`` 0, ``<pad>`` 1,
    ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4). ``vocab_size`` is the size the BPE tokenizer is
    trained to (a small corpus may give fewer; the trained tokenizer's size is what the model
    uses).
    """

    SECTION: ClassVar[str] = "encoder"

    vocab_size: int = 50_000
    max_positions: int = 512
    pad_id: int = 1
    mask_id: int = 4  # <mask>: what data2vec 1.0 puts at masked positions (set from the tokenizer)
    # data2vec 1.0 (fairseq TransformerEncoder) zeroes the embeddings of padding tokens
    zero_padding: bool = False
    dropout: float = 0.1  # after the embedding LayerNorm (fairseq D2vTextConfig.dropout)
    layernorm_embedding: bool = True
    prenet_depth: int = 0
    prenet_dropout: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "max_positions")
        _non_negative(self, "pad_id", "prenet_depth")
        _fraction(self, "dropout", "prenet_dropout")
        if self.pad_id >= self.vocab_size:
            raise ConfigError(
                f"encoder.pad_id={self.pad_id} must be < encoder.vocab_size={self.vocab_size}"
            )


@dataclass
class MultiEncoderConfig:
    """A joint model (``model.modality: multi``): one set of shared blocks, one modality encoder
    and decoder per modality, each modality configured by its own single-modality preset.

    Every preset's ``model`` section is overridden by this config's shared fields (width,
    depth, heads, block type and dropouts), so the blocks fit all modalities; everything else
    (encoder, mask, decoder, target, loss, EMA scope, batch size) stays per modality. The EMA
    decay schedule, the optimizer and the training loop are this config's.
    """

    SECTION: ClassVar[str] = "encoder"

    modalities: tuple[str, ...] = ("image", "audio", "text")
    presets: tuple[str, ...] = ("image-v2-tiny", "audio-v2-tiny", "text-v2-tiny")
    # batches of each modality per round of the interleaving (deterministic, smooth round robin)
    weights: tuple[int, ...] = (1, 1, 1)
    # per-modality overrides, space separated: "image:mask.clones=4 text:optim.lr=1e-4"
    overrides: str = ""
    # EMA clock of the teacher: "modality" = each modality's teacher lags its student by as many
    # of its own steps as alone (its parts move on its steps only, by its step count; the shared
    # blocks by decay ** (rarest weight / sum of weights) per step); "global" = every part moves
    # every step by the global schedule (a rare modality's teacher nearly equals its student).
    teacher_clock: Literal["modality", "global"] = "global"
    # true: each modality's steps run at its own preset's optim.lr (after its overrides) on
    # this config's schedule; a step accumulating several modalities uses the mean of their
    # rates. false: optim.lr for every step.
    modality_lr: bool = False

    def __post_init__(self) -> None:
        allowed = ("image", "audio", "text", "signal")
        for m in self.modalities:
            if m not in allowed:
                raise ConfigError(f"encoder.modalities: {m!r} is not allowed; allowed: {allowed}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"encoder.modalities={list(self.modalities)} repeats a modality")
        if not len(self.modalities) == len(self.presets) == len(self.weights):
            raise ConfigError(
                "encoder.modalities, encoder.presets and encoder.weights must have the same "
                f"length, got {len(self.modalities)}, {len(self.presets)}, {len(self.weights)}"
            )
        if any(w < 1 for w in self.weights):
            raise ConfigError(f"encoder.weights={list(self.weights)} must all be >= 1")
        for item in self.overrides.split():
            if item.split(":", 1)[0] not in self.modalities or ":" not in item:
                raise ConfigError(
                    f"encoder.overrides: {item!r} must look like MODALITY:section.field=value "
                    f"with MODALITY one of {list(self.modalities)}"
                )


@dataclass
class SignalEncoderConfig:
    """Any N-d signal ``(channels, d1, ..., dn)``, n in 1..3: patches, positions, prenet.

    ``size`` is the input size per axis after resampling (``fit: resample``) or the longest
    first axis (``fit: crop``: longer inputs are cropped, shorter ones padded, so time series
    of different lengths share a batch). ``patch_size`` has one entry per axis.
    """

    SECTION: ClassVar[str] = "encoder"

    in_chans: int = 1  # 0 = from the pretraining data (the first usable input)
    size: tuple[int, ...] = (128,)
    patch_size: tuple[int, ...] = (8,)
    # sincos: fixed N-d sin-cos, the width split between the axes; learned: one vector per patch
    positions: Literal["sincos", "learned"] = "sincos"
    fit: Literal["resample", "crop"] = "resample"
    # Per-channel normalization. dataset: one mean/std per channel over the pretraining data
    # (set from the data when pretraining, saved with the model): keeps each channel's level,
    # which often is the information (e.g. cepstra); sample: each input on its own (the UCR
    # z-normalization); none: as stored. Missing values become the mean (0) in all three.
    normalize: Literal["dataset", "sample", "none"] = "dataset"
    channel_mean: tuple[float, ...] | None = None
    channel_std: tuple[float, ...] | None = None
    prenet_depth: int = 0
    num_extra_tokens: int = 0

    def __post_init__(self) -> None:
        _non_negative(self, "in_chans", "prenet_depth", "num_extra_tokens")
        for name in ("channel_mean", "channel_std"):
            stats = getattr(self, name)
            if stats is not None and self.in_chans and len(stats) != self.in_chans:
                raise ConfigError(
                    f"encoder.{name} has {len(stats)} values, encoder.in_chans={self.in_chans}"
                )
        if self.channel_std is not None and min(self.channel_std) <= 0:
            raise ConfigError(f"encoder.channel_std={list(self.channel_std)} must be > 0")
        if not 1 <= len(self.size) <= 3:
            raise ConfigError(
                f"encoder.size={list(self.size)} must have 1 to 3 axes (Conv1d/2d/3d patches)"
            )
        if len(self.patch_size) != len(self.size):
            raise ConfigError(
                f"encoder.patch_size={list(self.patch_size)} needs one entry per axis of "
                f"encoder.size={list(self.size)}"
            )
        for axis, (n, p) in enumerate(zip(self.size, self.patch_size)):
            if n <= 0 or p <= 0:
                raise ConfigError(
                    f"encoder.size={list(self.size)} and encoder.patch_size="
                    f"{list(self.patch_size)} must be > 0 (axis {axis})"
                )
            if n % p:
                raise ConfigError(
                    f"encoder.size[{axis}]={n} must be a multiple of encoder.patch_size[{axis}]={p}"
                )

    @property
    def grid(self) -> tuple[int, ...]:
        """Patches per axis for an input of ``size``."""
        return tuple(n // p for n, p in zip(self.size, self.patch_size))


@dataclass
class MaskConfig:
    """How the student's views are masked (data2vec 2.0 §3)."""

    SECTION: ClassVar[str] = "mask"

    # inverse_block (2.0 images), block (2.0 speech), random (2.0 text), span (1.0 speech:
    # ``ratio`` is the span start probability, ``block`` the span length), beit (1.0 images:
    # rectangles of at least ``min_block`` patches until ``ratio`` of the patches are masked)
    kind: Literal["inverse_block", "block", "random", "span", "beit"] = "inverse_block"
    ratio: float = 0.8
    adjust: float = 0.07  # extra probability compensating for overlapping blocks
    block: int = 3  # side of the 2-D squares (images) or length of the 1-D spans (audio)
    clones: int = 16  # masked copies per sample (the teacher still runs once per sample)
    noise_std: float = 0.01  # std of the N(0, s²) values that fill masked slots in the decoder
    min_block: int = 16  # beit: smallest rectangle in patches (BEiT min_num_patches)
    # data2vec 1.0 text, BERT style (fairseq random_token_prob / leave_unmasked_prob): of the
    # selected tokens these shares get a random token or stay unchanged instead of <mask>; the
    # loss counts only the <mask> positions. The released span recipe uses 0 / 0.
    random_token: float = 0.0
    leave_unmasked: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"mask.ratio={self.ratio} must be in (0, 1)")
        _positive(self, "block", "clones", "min_block")
        _non_negative(self, "adjust", "noise_std")
        _fraction(self, "random_token", "leave_unmasked")
        if self.random_token + self.leave_unmasked >= 1.0:
            raise ConfigError(
                f"mask.random_token={self.random_token} + mask.leave_unmasked="
                f"{self.leave_unmasked} must leave a share for <mask> (sum < 1)"
            )


@dataclass
class DecoderConfig:
    """The light convolutional decoder of data2vec 2.0."""

    SECTION: ClassVar[str] = "decoder"

    dim: int = 768
    groups: int = 16
    kernel: int = 3
    layers: int = 6
    residual: bool = True
    projection_layers: int = 1
    projection_ratio: float = 2.0
    input_dropout: float = 0.0
    # Convolution implementation: "torch" = cuDNN / oneDNN; "triton" = data2vec's Triton
    # kernels over the token layout (data2vec/nn/token_layer.py); "auto" = Triton on NVIDIA
    # GPUs of compute capability >= 8.0 when Triton is installed, torch otherwise. On an
    # H100 (bf16) the Triton decoder made image-v2-base's step 1.55x faster
    # (benchmarks/README.md, "GPU, second pass").
    conv_impl: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self) -> None:
        _positive(
            self, "dim", "groups", "kernel", "layers", "projection_layers", "projection_ratio"
        )
        _fraction(self, "input_dropout")
        if self.dim % self.groups:
            raise ConfigError(
                f"decoder.dim={self.dim} must be divisible by decoder.groups={self.groups}"
            )
        if self.kernel % 2 == 0:
            raise ConfigError(f"decoder.kernel={self.kernel} must be odd ('same' padding)")


@dataclass
class TargetConfig:
    """Teacher targets: per-layer norm -> average of the top-K FFN outputs -> final norm."""

    SECTION: ClassVar[str] = "target"

    top_k: int = 10
    layer_norm: Literal["instance", "layer", "none"] = "instance"
    final_norm: Literal["layer", "instance", "none"] = "layer"
    # ffn: each block's FFN output before the last residual (2.0; 1.0 speech and text);
    # block: the end-of-block output (1.0 vision)
    source: Literal["ffn", "block"] = "ffn"

    def __post_init__(self) -> None:
        _positive(self, "top_k")


@dataclass
class LossConfig:
    """Regression loss on masked positions."""

    SECTION: ClassVar[str] = "loss"

    beta: float = 0.0  # 0 = L2; > 0 = smooth L1 with this beta
    scale: float | None = None  # None = 1/sqrt(D)
    # sum: summed over the D dims, times ``scale``; mean: averaged over them (1.0 vision,
    # smooth-L1 with the default mean reduction; ``scale`` is then ignored)
    reduction: Literal["sum", "mean"] = "sum"
    cls_weight: float = 0.01  # image CLS loss (0 turns it off)

    def __post_init__(self) -> None:
        _non_negative(self, "beta", "cls_weight")
        if self.scale is not None and self.scale <= 0:
            raise ConfigError(f"loss.scale={self.scale} must be > 0 or null (= 1/sqrt(D))")


@dataclass
class EMAConfig:
    """EMA teacher: decay annealed linearly from ``decay`` to ``end_decay``, then held."""

    SECTION: ClassVar[str] = "ema"

    decay: float = 0.9998
    end_decay: float = 0.99999
    anneal_steps: int = 100_000
    # What the teacher owns (and averages): "all" = local encoder, context encoder and blocks
    # (image); "context" = all but the local encoder, which stays shared with the student
    # (audio); "blocks" = the shared blocks only (text).
    scope: Literal["all", "context", "blocks"] = "all"

    def __post_init__(self) -> None:
        for name in ("decay", "end_decay"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"ema.{name}={value} must be in [0, 1]")
        _non_negative(self, "anneal_steps")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    SECTION: ClassVar[str] = "optim"

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_steps: int = 50_040
    schedule: Literal["cosine", "constant"] = "cosine"
    final_lr_ratio: float = 0.0  # cosine ends at lr * final_lr_ratio
    clip_norm: float = 4.0  # 0 disables clipping

    def __post_init__(self) -> None:
        _positive(self, "lr", "eps")
        _non_negative(self, "weight_decay", "warmup_steps", "clip_norm", "final_lr_ratio")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must both be in [0, 1)")


@dataclass
class DataConfig:
    """Input pipeline (the pretraining augmentation of the data2vec 2.0 image recipe)."""

    SECTION: ClassVar[str] = "data"

    batch_size: int = 16
    num_workers: int = 2
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # audio (16 kHz samples): random crop of longer utterances, skip of shorter ones
    max_samples: int = 320_000
    min_samples: int = 32_000
    normalize: bool = True  # zero mean, unit variance per utterance (wav2vec 2.0 / data2vec)
    # text: tokens per packed block, and an existing tokenizer (None = train a byte-level BPE
    # tokenizer of encoder.vocab_size on the pretraining corpus)
    block_size: int = 512
    tokenizer: str | None = None
    # tar shards (data2vec data shard): samples each reader holds to shuffle the stream
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "max_samples", "min_samples", "shuffle_buffer")
        if self.block_size < 3:
            raise ConfigError(f"data.block_size={self.block_size} must be >= 3 (<s> x </s>)")
        if self.min_samples > self.max_samples:
            raise ConfigError(
                f"data.min_samples={self.min_samples} exceeds data.max_samples={self.max_samples}"
            )
        _non_negative(self, "num_workers")
        _fraction(self, "hflip")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(
                f"data.crop_scale={list(self.crop_scale)} must satisfy 0 < lo <= hi <= 1"
            )


@dataclass
class TrainConfig:
    """The run: length, precision, logging and checkpointing."""

    SECTION: ClassVar[str] = "train"

    max_steps: int = 375_300
    max_minutes: float | None = None  # stop (and checkpoint) after this much wall-clock time
    # With max_minutes: re-estimate max_steps every step from the measured pace, so the
    # learning-rate schedule ends when the time budget does (the demo's setting). max_steps is
    # the first estimate; a resumed run fits the schedule to its own new budget.
    fit_schedule: bool = False
    seed: int = 1
    precision: Precision = "fp32"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    threads: int | None = None  # torch CPU threads; None = the cores this process may use
    log_every: int = 1  # metrics.jsonl/TensorBoard every N steps (std stats included)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    # torch.compile the student's transformer blocks (opt-in: compiling takes minutes
    # and needs a C++ compiler on CPU; see data2vec/compile.py)
    compile: bool = False
    # Before the first step, where the Triton kernels run (NVIDIA GPUs): compare the gradients
    # of a few samples with the kernels and with the torch ops, each against float32, and take
    # the torch ops for the whole run if the kernels are off (data2vec/engine/kernel_check.py).
    # Not under FSDP, nor under train.compile before PyTorch 2.6.
    kernel_check: bool = True
    # Collapse guard (fairseq min_target_var / min_pred_var): stop when the per-dimension std of
    # targets or predictions falls below these after ``collapse_after`` steps (None = warm-up).
    min_target_std: float = 0.1
    min_pred_std: float = 0.01
    collapse_after: int | None = None
    # Steps with a non-finite loss or gradient are skipped and counted; this many in a row stop
    # the run (the last checkpoint, written before them, is kept).
    max_nonfinite: int = 20
    # Gradient accumulation: micro-batches of data.batch_size per optimizer step (fairseq
    # update_freq); the loss is normalized by the masked-token count of all of them.
    accum_steps: int = 1
    # How torchrun ranks share the model: ddp replicates it; fsdp shards parameters, gradients
    # and optimizer state (FSDP2 ``fully_shard``) for models that do not fit one device.
    distributed: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self) -> None:
        _non_negative(self, "max_steps", "min_target_std", "min_pred_std")
        _positive(self, "log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite")
        if self.accum_steps < 1:
            raise ConfigError(
                f"train.accum_steps={self.accum_steps} must be an integer >= 1 "
                "(1 = no gradient accumulation)"
            )
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"train.max_minutes={self.max_minutes} must be > 0 or null")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"train.threads={self.threads} must be >= 1 or null")
        if self.fit_schedule and self.max_minutes is None:
            raise ConfigError(
                "train.fit_schedule=true fits the schedule to a time budget: set "
                "train.max_minutes too, or train.fit_schedule=false"
            )


ENCODER_CONFIGS: dict[str, type] = {
    "image": ImageEncoderConfig,
    "audio": AudioEncoderConfig,
    "text": TextEncoderConfig,
    "signal": SignalEncoderConfig,
    "multi": MultiEncoderConfig,
}


@dataclass
class Config:
    """A complete, validated run configuration."""

    preset: str = "image-v2-base"
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: ImageEncoderConfig | AudioEncoderConfig | TextEncoderConfig | SignalEncoderConfig = (
        field(default_factory=ImageEncoderConfig)
    )
    mask: MaskConfig = field(default_factory=MaskConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.modality != "multi" and self.target.top_k > self.model.depth:
            raise ConfigError(
                f"target.top_k={self.target.top_k} exceeds model.depth={self.model.depth} "
                "(only shared blocks give targets)"
            )
        if self.model.algorithm == "v1" and self.mask.clones != 1:
            raise ConfigError(
                f"mask.clones={self.mask.clones}: data2vec 1.0 masks each sample once (clones=1)"
            )
        enc = self.encoder
        if (
            isinstance(enc, SignalEncoderConfig)
            and self.model.algorithm == "v2"
            and self.loss.cls_weight > 0
            and enc.num_extra_tokens == 0
        ):
            raise ConfigError(
                f"loss.cls_weight={self.loss.cls_weight} needs encoder.num_extra_tokens >= 1 "
                "(a CLS token); set loss.cls_weight=0 or add the token"
            )
        if isinstance(enc, TextEncoderConfig) and self.data.block_size > enc.max_positions:
            raise ConfigError(
                f"data.block_size={self.data.block_size} exceeds "
                f"encoder.max_positions={enc.max_positions}"
            )

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as YAML (it loads back with :func:`load_config`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path


# --------------------------------------------------------------------------------------------
# building and validation


def list_presets() -> list[str]:
    """Names of the presets shipped in ``configs/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str | Path = "image-v2-base", overrides: list[str] | None = None) -> Config:
    """Build a config from a preset name or YAML file plus ``section.field=value`` overrides.

    A YAML file may name another preset under ``base:``; its values are applied on top.

    Raises:
        ConfigError: unknown preset/section/field, or a value of the wrong type or range.
    """
    raw, name = _read_preset(preset, seen=())
    for item in overrides or []:
        _apply_override(raw, item)
    raw.setdefault("preset", name)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a nested dict (as saved by :meth:`Config.save`) into a :class:`Config`."""
    raw = dict(raw)
    sections: dict[str, Any] = {}
    model = _build_section("model", ModelConfig, raw.pop("model", {}) or {})
    encoder_cls = ENCODER_CONFIGS[model.modality]
    sections["model"] = model
    sections["encoder"] = _build_section("encoder", encoder_cls, raw.pop("encoder", {}) or {})
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name in ("preset", "model", "encoder"):
            continue
        sections[f.name] = _build_section(f.name, hints[f.name], raw.pop(f.name, {}) or {})
    preset = raw.pop("preset", "custom")
    if raw:
        allowed = [f.name for f in dataclasses.fields(Config)]
        raise ConfigError(f"unknown config section(s) {sorted(raw)}; allowed: {allowed}")
    return Config(preset=str(preset), **sections)


def _read_preset(preset: str | Path, seen: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown preset {str(preset)!r}; available: {', '.join(list_presets())}"
            )
    elif not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if str(path) in seen:
        raise ConfigError(f"preset {path} inherits from itself via 'base:'")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    merged: dict[str, Any] = {}
    if base is not None:
        merged, _ = _read_preset(str(base), (*seen, str(path)))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged, path.stem


def _parse_scalar(text: str) -> Any:
    """Parse an override value: ints, floats (``1e-3`` too), bools, null, lists, strings."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.field (e.g. optim.lr=5e-4)")
    section, name = parts
    if not isinstance(raw.get(section, {}), dict):
        raise ConfigError(f"cannot override {key}: {section!r} is not a section")
    raw.setdefault(section, {})[name] = _parse_scalar(value.strip())


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(f"unknown field {name}.{key}; allowed: {', '.join(allowed)}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid section {name!r}: {exc}") from exc


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against ``annotation``; convert lossless cases (int→float, list→tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r} is not allowed; allowed values: {list(args)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{path}={value!r} must be a non-empty list")
        return tuple(_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}={value!r} must be a list of {len(args)} values")
        return tuple(_coerce(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported annotation {annotation} for {path}")  # a bug, not user input


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{obj.SECTION}.{name}={value} must be > 0")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise ConfigError(f"{obj.SECTION}.{name}={value} must be >= 0")


def _fraction(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value < 1.0 and not (name == "hflip" and value == 1.0):
            raise ConfigError(f"{obj.SECTION}.{name}={value} must be in [0, 1)")
