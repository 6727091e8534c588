"""The supervised fine-tuning loop, shared by every modality and task.

Every step: learning rate (warm-up + cosine, scaled per layer) -> encoder frozen or not ->
autocast forward -> finite check -> backward -> clip -> AdamW step. Every ``eval_every`` steps
and at the end: evaluate, log, and save the model if it is the best so far. The loop sees only
:class:`~data2vec.finetune.model.SupervisedBatch` objects; datasets live in per-modality modules
(``finetune/image.py``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data2vec._runtime import choose_heap_mode
from data2vec.config import Config, _build_section, _parse_scalar
from data2vec.data.skips import SkipLog
from data2vec.engine import kernel_check
from data2vec.engine.metrics import MetricsWriter
from data2vec.engine.optim import adamw
from data2vec.engine.runtime import autocast, configure_threads, resolve_device
from data2vec.engine.schedules import lr_at
from data2vec.errors import ConfigError, UserError
from data2vec.finetune import metrics as M
from data2vec.finetune.ctc import CharVocab, ctc_greedy_decode, ctc_loss
from data2vec.finetune.model import (
    FineTuneModel,
    SupervisedBatch,
    Task,
    layer_decay_groups,
    save_finetuned,
)

log = logging.getLogger(__name__)

MAX_NONFINITE_IN_A_ROW = 20
BEST_DIR = "best"


@dataclass
class FineTuneConfig:
    """Fine-tuning settings (``key=value`` or ``finetune.key=value`` on the command line).

    Defaults follow MAE / data2vec 2.0 ViT-B fine-tuning where one exists (AdamW, weight decay
    0.05, layer decay 0.65, label smoothing 0.1, warm-up then cosine), scaled to short runs.
    """

    SECTION: ClassVar[str] = "finetune"

    # Peak lr of the head (MAE base lr per 256 samples); block k from the top gets lr·decay^k.
    lr: float = 5e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.65  # 1 = no layer-wise decay
    warmup_steps: int = 100
    max_steps: int = 2000
    batch_size: int = 32
    eval_every: int = 200  # evaluate (and maybe save) every N steps, and always at the end
    clip_norm: float = 4.0  # 0 disables clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 1
    freeze_encoder_steps: int = 0  # train only the head for the first N steps
    label_smoothing: float = 0.1  # classification only
    pool: Literal["mean", "cls"] = "mean"  # classification head pooling
    head_dropout: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    device: str = "auto"
    threads: int | None = None
    num_workers: int = 2
    progress: bool = True
    tensorboard: bool = True
    # Before the first step, where the Triton kernels run (NVIDIA GPUs): check them against the
    # torch ops on a few samples and take the torch ops if they are off (train.kernel_check's
    # counterpart; data2vec/engine/kernel_check.py).
    kernel_check: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("layer_decay", 0 < self.layer_decay <= 1, "in (0, 1]"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("max_steps", self.max_steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("clip_norm", self.clip_norm >= 0, ">= 0 (0 disables clipping)"),
            ("freeze_encoder_steps", self.freeze_encoder_steps >= 0, ">= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("head_dropout", 0 <= self.head_dropout < 1, "in [0, 1)"),
            ("betas", all(0 <= b < 1 for b in self.betas), "two values in [0, 1)"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("threads", self.threads is None or self.threads >= 1, ">= 1 or null"),
            ("precision", self.precision in ("fp32", "bf16"), "fp32 or bf16"),
            ("pool", self.pool in ("mean", "cls"), "mean or cls"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"finetune.{name}={getattr(self, name)!r} must be {expected}")

    @classmethod
    def from_overrides(cls, overrides: Iterable[str] = ()) -> FineTuneConfig:
        """Defaults plus ``key=value`` / ``finetune.key=value`` items, validated.

        Raises:
            ConfigError: malformed item, unknown field, or a value of the wrong type or range.
        """
        values: dict[str, Any] = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            key = key.strip()
            if key.startswith(f"{cls.SECTION}."):
                key = key[len(cls.SECTION) + 1 :]
            if not sep or not key or "." in key:
                fields = [f.name for f in dataclasses.fields(cls)]
                # Pretraining's sectioned keys (train.max_steps, optim.lr) have flat
                # counterparts here; name the one meant where there is one.
                flat = key.rpartition(".")[2]
                hint = f"; did you mean {flat}={value.strip()}?" if sep and flat in fields else ""
                raise ConfigError(
                    f"fine-tuning override {item!r} must look like key=value or "
                    f"finetune.key=value (e.g. lr=1e-4){hint} Fields: {', '.join(fields)}"
                )
            values[key] = _parse_scalar(value.strip())
        return _build_section(cls.SECTION, cls, values)

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


@dataclass
class FineTuneResult:
    """Outcome of :func:`finetune`.

    Attributes:
        out_dir: the run directory.
        best_dir: the saved best model (a model directory), or None if no evaluation ran.
        task: ``classification`` or ``ctc``.
        steps: optimizer steps taken.
        seconds: wall-clock time of the loop.
        best_step: step of the best evaluation.
        best_metrics: validation metrics of the best model.
        final_metrics: validation metrics at the last step.
        history: every validation record, ``{"step", **metrics}``.
        skipped_inputs: inputs that could not be read.
        skipped_steps: updates skipped for a non-finite loss or gradient.
        stopped: ``max_steps`` or ``nonfinite``.
        kernel_check: what the start-up kernel check found (None: it did not run).
    """

    out_dir: Path
    best_dir: Path | None
    task: str
    steps: int
    seconds: float
    best_step: int
    best_metrics: dict[str, float]
    final_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_inputs: int = 0
    skipped_steps: int = 0
    stopped: str = "max_steps"
    kernel_check: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (paths as strings)."""
        out = dataclasses.asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["best_dir"] = None if self.best_dir is None else str(self.best_dir)
        out["seconds"] = round(self.seconds, 3)
        return out


def _cycle(loader: Iterable[SupervisedBatch]) -> Iterator[SupervisedBatch]:
    """Batches forever: a finite loader is restarted (a new epoch), an endless one just runs."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError("the training data gave no batches")


def task_loss(
    model: FineTuneModel, batch: SupervisedBatch, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean loss of ``batch`` (cross-entropy, or CTC per target label), in float32."""
    if model.task == "classification":
        logits = model(batch.source, batch.padding_mask)
        return F.cross_entropy(logits.float(), batch.targets, label_smoothing=label_smoothing)
    logits, lengths = model(batch.source, batch.padding_mask)
    if batch.target_lengths is None:
        raise ValueError("a CTC batch needs target_lengths")
    return ctc_loss(logits, lengths, batch.targets, batch.target_lengths)


@torch.no_grad()
def evaluate(
    model: FineTuneModel,
    loader: Iterable[SupervisedBatch],
    device: torch.device,
    precision: str = "fp32",
    vocab: CharVocab | None = None,
    skips: SkipLog | None = None,
) -> dict[str, float]:
    """Validation metrics over one pass of ``loader``.

    Returns:
        classification: ``loss`` (cross-entropy without smoothing), ``accuracy`` (+ ``f1`` of
        class 1 with 2 classes), ``n``; CTC: ``loss``, ``cer``, ``wer`` (greedy decoding,
        corpus-level rates over ``vocab``-decoded text), ``n``.
    """
    if model.task == "ctc" and vocab is None:
        raise ValueError("CTC evaluation needs the vocabulary to decode text")
    model.eval()
    loss_sum, n = 0.0, 0
    preds: list[int] = []
    targets: list[int] = []
    refs: list[str] = []
    hyps: list[str] = []
    n_classes = 0
    for batch in loader:
        if skips is not None:
            skips.extend(batch.skipped)
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        with autocast(device, precision):
            out = model(batch.source, batch.padding_mask)
        if model.task == "classification":
            logits = out.float()
            n_classes = logits.shape[1]
            loss_sum += float(F.cross_entropy(logits, batch.targets, reduction="sum"))
            preds += logits.argmax(1).tolist()
            targets += batch.targets.tolist()
        else:
            assert vocab is not None and batch.target_lengths is not None
            logits, lengths = out
            losses = ctc_loss(
                logits, lengths, batch.targets, batch.target_lengths, reduction="none"
            )
            loss_sum += float((losses / batch.target_lengths.clamp_min(1)).sum())
            hyps += [vocab.decode(h) for h in ctc_greedy_decode(logits, lengths)]
            for row, length in zip(batch.targets.tolist(), batch.target_lengths.tolist()):
                refs.append(vocab.decode(row[:length]))
        n += len(batch)
    if n == 0:
        raise UserError("the validation data gave no usable samples")
    result = {"loss": loss_sum / n}
    if model.task == "classification":
        result["accuracy"] = M.accuracy(preds, targets)
        if n_classes == 2:
            result["f1"] = M.binary_f1(preds, targets)
    else:
        result["cer"] = M.cer(refs, hyps)
        result["wer"] = M.wer(refs, hyps)
    return result | {"n": float(n)}


def _score(task: str, metrics: dict[str, float]) -> tuple[float, float]:
    """Larger is better: accuracy then lower loss (classification); lower WER then CER (CTC)."""
    if task == "classification":
        return metrics["accuracy"], -metrics["loss"]
    return -metrics["wer"], -metrics["cer"]


@dataclass
class StepOutput:
    """One training step.

    Attributes:
        loss: the batch loss.
        lr: the scheduled learning rate (the head's; blocks get it times their ``lr_scale``).
        grad_norm: the gradient norm before clipping.
        updated: False when the loss or gradient was not finite and the update was skipped.
    """

    loss: float
    lr: float
    grad_norm: float
    updated: bool


def train_step(
    model: FineTuneModel,
    optimizer: torch.optim.Optimizer,
    batch: SupervisedBatch,
    step: int,
    cfg: FineTuneConfig,
    device: torch.device,
) -> StepOutput:
    """Schedule -> freeze or not -> autocast forward -> backward -> clip -> AdamW step."""
    model.train()
    model.set_encoder_frozen(step < cfg.freeze_encoder_steps)
    lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    batch = batch.to(device)
    with autocast(device, cfg.precision):
        loss = task_loss(model, batch, cfg.label_smoothing)
    loss.backward()
    loss_value = float(loss.detach())
    clip = cfg.clip_norm if cfg.clip_norm > 0 else math.inf
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    updated = math.isfinite(loss_value) and math.isfinite(grad_norm)
    if updated:
        optimizer.step()
    else:
        log.warning("non-finite loss or gradient at step %d: update skipped", step)
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cpu":
        choose_heap_mode()  # once, now that the process's size is known (data2vec/_runtime.py)
    return StepOutput(loss_value, lr, grad_norm, updated)


def check_kernels(
    model: FineTuneModel, batch: SupervisedBatch, cfg: FineTuneConfig, device: torch.device
) -> dict[str, Any] | None:
    """The start-up kernel check (:mod:`data2vec.engine.kernel_check`) on the task loss of the
    first samples of ``batch``, encoder included; returns what it found (None: not run)."""
    if not cfg.kernel_check or not kernel_check.kernels_run_on(device):
        return None
    n = min(len(batch), kernel_check.SAMPLES)
    parts = (batch.source, batch.padding_mask, batch.targets, batch.target_lengths)
    few = SupervisedBatch(*(None if t is None else t[:n].to(device) for t in parts))
    model.train()
    model.set_encoder_frozen(False)  # the encoder's kernels too (train_step sets it each step)
    found = kernel_check.check_kernels(
        model, lambda: task_loss(model, few, cfg.label_smoothing), device, cfg.precision
    )
    return kernel_check.act_on(found, kernel_check.kinds_to_disable(found))


def _prepare_run_dir(run_dir: Path, cfg: FineTuneConfig, encoder_config: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "finetune_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    encoder_config.save(run_dir / "config.yaml")


def pin_batches(cfg: FineTuneConfig) -> bool:
    """Whether loaders should hand over page-locked batches: when training runs on CUDA, so
    that ``SupervisedBatch.to`` copies asynchronously. A bad device is reported later, by
    :func:`finetune`, naming the field."""
    try:
        return _device(cfg).type == "cuda"
    except ConfigError:
        return False


def _device(cfg: FineTuneConfig) -> torch.device:
    try:
        return resolve_device(cfg.device)
    except ConfigError as exc:  # the runtime names the pretraining field
        raise ConfigError(str(exc).replace("train.device", "finetune.device")) from exc


def finetune(
    model: FineTuneModel,
    train_loader: Iterable[SupervisedBatch],
    valid_loader: Iterable[SupervisedBatch],
    cfg: FineTuneConfig,
    out_dir: str | Path,
    task: Task,
    *,
    encoder_config: Config,
    info: dict[str, Any] | None = None,
    vocab: CharVocab | None = None,
    skips: SkipLog | None = None,
) -> FineTuneResult:
    """Fine-tune ``model`` and keep the best model by validation score in ``out_dir/best``.

    Args:
        model: encoder + head; moved to ``cfg.device``.
        train_loader: training batches (finite loaders are restarted; endless ones run on).
        valid_loader: validation batches; one pass per evaluation.
        cfg: fine-tuning settings.
        out_dir: run directory: ``metrics.jsonl``, ``finetune_config.json``, ``config.yaml``,
            ``skipped.tsv``, ``best/`` (``config.yaml`` + ``model.safetensors`` +
            ``finetune.json``).
        task: ``classification`` or ``ctc`` (must match ``model.task``).
        encoder_config: the pretrained encoder's config, saved with the model.
        info: extra JSON-ready entries for ``finetune.json`` (e.g. ``classes``).
        vocab: the CTC vocabulary (required for ``ctc``; saved with the model).
        skips: inputs already skipped while scanning the data (more are added while reading).
    """
    if task != model.task:
        raise ValueError(f"task={task!r} but the model was built for {model.task!r}")
    run_dir = Path(out_dir)
    device = _device(cfg)
    configure_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # dropout, drop path
    info = dict(info or {}) | {"finetune": cfg.to_dict()}
    if vocab is not None:
        info["vocab"] = vocab.to_dict()
    _prepare_run_dir(run_dir, cfg, encoder_config)
    model.to(device)
    optimizer = adamw(
        lambda: layer_decay_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay),
        lr=cfg.lr,
        betas=cfg.betas,
    )
    skips = skips if skips is not None else SkipLog()
    writer = MetricsWriter(run_dir, cfg.tensorboard)
    bar = tqdm(total=cfg.max_steps, disable=not cfg.progress, desc="finetune", dynamic_ncols=True)
    result = FineTuneResult(run_dir, None, task, 0, 0.0, 0, {}, {})
    best_score: tuple[float, float] | None = None
    start, nonfinite = time.perf_counter(), 0
    checked = False  # the kernel check, before the first step
    try:
        for batch in _cycle(train_loader):
            skips.extend(batch.skipped)
            if len(batch) == 0:
                continue
            if not checked:
                checked = True
                result.kernel_check = check_kernels(model, batch, cfg, device)
            out = train_step(model, optimizer, batch, result.steps, cfg, device)
            if not out.updated:
                result.skipped_steps, nonfinite = result.skipped_steps + 1, nonfinite + 1
                if nonfinite >= MAX_NONFINITE_IN_A_ROW:
                    result.stopped = "nonfinite"
                    break
                continue
            result.steps, nonfinite = result.steps + 1, 0
            step = result.steps
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{out.lr:.2e}")
            writer.log(step, {"loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm})
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                metrics = evaluate(model, valid_loader, device, cfg.precision, vocab, skips)
                writer.log(step, {f"valid_{k}": v for k, v in metrics.items()}, prefix="valid")
                result.history.append({"step": step, **metrics})
                result.final_metrics = metrics
                log.info("step %d: %s", step, _fmt(metrics))
                if best_score is None or _score(task, metrics) > best_score:
                    best_score = _score(task, metrics)
                    record = info | {"metrics": metrics, "step": step}
                    result.best_dir = save_finetuned(
                        run_dir / BEST_DIR, model, encoder_config, record
                    )
                    result.best_step, result.best_metrics = step, metrics
            if step >= cfg.max_steps:
                break
    finally:
        bar.close()
        writer.close()
        skips.write(run_dir / "skipped.tsv")
    result.seconds = time.perf_counter() - start
    result.skipped_inputs = len(skips)
    return result


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
