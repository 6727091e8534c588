"""The pretraining loop.

The model returns its loss and logs; the engine owns everything else, in this order, every
step: learning rate -> autocast forward -> finite check -> backward -> clip -> optimizer step
-> explicit teacher update -> logs -> collapse guard -> checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data2vec.config import Config
from data2vec.data.batch import PretrainBatch
from data2vec.data.registry import PretrainData, build_pretrain_data
from data2vec.data.skips import SkipLog
from data2vec.engine import checkpoint as ckpt
from data2vec.engine import distributed
from data2vec.engine.distributed import DistInfo
from data2vec.engine.metrics import MetricsWriter
from data2vec.engine.optim import build_optimizer
from data2vec.engine.runtime import (
    autocast,
    check_precision,
    configure_threads,
    resolve_device,
)
from data2vec.engine.schedules import lr_at
from data2vec.errors import UserError
from data2vec.models.data2vec2 import Data2Vec2
from data2vec.models.registry import build_model

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    model: Data2Vec2
    optimizer: torch.optim.Optimizer
    step: int = 0  # optimizer steps taken
    batches_seen: int = 0  # data position (differs from step when steps are skipped)
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    # fp16 only: dynamic loss scaling (bf16 and fp32 have fp32's exponent range and need none).
    scaler: torch.amp.GradScaler | None = None
    # What runs the forward pass: the model, or its DistributedDataParallel wrapper.
    forward_module: torch.nn.Module | None = None
    dist: DistInfo = field(default_factory=DistInfo)

    @property
    def runner(self) -> torch.nn.Module:
        return self.forward_module if self.forward_module is not None else self.model


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float
    ema_decay: float
    updated: bool
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    stopped: str  # "max_steps" | "time_budget" | "collapse" | "nonfinite" | "interrupted"
    seconds: float
    checkpoint: Path | None
    skipped_inputs: int
    history: list[dict[str, float]] = field(default_factory=list)


def train_step(
    state: TrainState, batch: PretrainBatch, cfg: Config, device: torch.device
) -> StepResult:
    """One optimizer step on ``batch``; skipped and counted when loss or gradient is not finite."""
    model, opt = state.model, state.optimizer
    total = cfg.train.max_steps
    lr = lr_at(
        state.step,
        cfg.optim.lr,
        cfg.optim.warmup_steps,
        total,
        cfg.optim.schedule,
        cfg.optim.final_lr_ratio,
    )
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    with autocast(device, cfg.train.precision):
        pad = batch.padding_mask
        out = state.runner(
            batch.source.to(device, non_blocking=True),
            batch.mask.to(device, non_blocking=True),
            None if pad is None else pad.to(device, non_blocking=True),
        )
    loss = out.loss
    loss_value = float(loss.detach())
    logs = {k: float(v) for k, v in out.logs.items()}
    # Every rank must skip together, or the others would wait in DDP's gradient all-reduce.
    if distributed.any_rank(not math.isfinite(loss_value), device):
        return _skip_step(state, loss_value, lr, logs)
    scaler = state.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients
    else:
        loss.backward()
    clip = cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True))
    if not math.isfinite(grad_norm):
        if scaler is not None:
            scaler.update()  # overflow: lower the loss scale for the next step
        return _skip_step(state, loss_value, lr, logs)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    state.step += 1
    state.nonfinite_in_a_row = 0
    decay = model.update_teacher(state.step)
    return StepResult(loss_value, lr, grad_norm, decay, True, logs)


def new_state(model: Data2Vec2, cfg: Config, device: torch.device) -> TrainState:
    """Fresh training state: AdamW over the student, a loss scaler for fp16."""
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    return TrainState(model, build_optimizer(model, cfg.optim), scaler=scaler)


def _skip_step(state: TrainState, loss: float, lr: float, logs: dict[str, float]) -> StepResult:
    state.optimizer.zero_grad(set_to_none=True)
    state.skipped_steps += 1
    state.nonfinite_in_a_row += 1
    log.warning("non-finite loss or gradient at step %d: update skipped", state.step)
    return StepResult(loss, lr, float("nan"), float("nan"), False, logs)


def save(state: TrainState, run_dir: Path, cfg: Config, skips: SkipLog) -> Path:
    skips.write(run_dir / "skipped.tsv")
    trainer_state: dict[str, Any] = {
        "step": state.step,
        "batches_seen": state.batches_seen,
        "skipped_steps": state.skipped_steps,
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": ckpt.rng_state(),
    }
    model_state = {f"encoder.{k}": v for k, v in state.model.encoder.state_dict().items()}
    model_state |= {f"decoder.{k}": v for k, v in state.model.decoder.state_dict().items()}
    return ckpt.save_checkpoint(
        run_dir,
        state.step,
        model_state,
        state.model.teacher.state_dict(),
        trainer_state,
        cfg,
        cfg.train.keep_checkpoints,
        encoder=state.model.encoder,
    )


def restore(state: TrainState, run_dir: Path) -> Path | None:
    """Load the newest loadable checkpoint of ``run_dir`` into ``state``."""
    found = ckpt.latest_loadable(run_dir)
    if found is None:
        return None
    path, (model_state, teacher_state, trainer_state) = found
    enc = {k[len("encoder.") :]: v for k, v in model_state.items() if k.startswith("encoder.")}
    dec = {k[len("decoder.") :]: v for k, v in model_state.items() if k.startswith("decoder.")}
    state.model.encoder.load_state_dict(enc, strict=True)
    state.model.decoder.load_state_dict(dec, strict=True)
    if teacher_state is not None:
        state.model.teacher.load_state_dict(teacher_state)
    state.optimizer.load_state_dict(trainer_state["optimizer"])
    if state.scaler is not None and trainer_state.get("scaler"):
        state.scaler.load_state_dict(trainer_state["scaler"])
    state.step = trainer_state["step"]
    state.batches_seen = trainer_state["batches_seen"]
    state.skipped_steps = trainer_state["skipped_steps"]
    ckpt.set_rng_state(trainer_state["rng"])
    return path


def _collapsed(cfg: Config, step: int, logs: dict[str, float]) -> str | None:
    after = (
        cfg.train.collapse_after if cfg.train.collapse_after is not None else cfg.optim.warmup_steps
    )
    if step < after:
        return None
    if logs.get("target_std", math.inf) < cfg.train.min_target_std:
        return (
            f"target std {logs['target_std']:.4g} < train.min_target_std={cfg.train.min_target_std}"
        )
    if logs.get("pred_std", math.inf) < cfg.train.min_pred_std:
        return (
            f"prediction std {logs['pred_std']:.4g} < train.min_pred_std={cfg.train.min_pred_std}"
        )
    return None


def make_loader(
    data: PretrainData, cfg: Config, start_batch: int, info: DistInfo | None = None
) -> DataLoader:
    info = info or DistInfo()
    workers = cfg.data.num_workers
    return DataLoader(
        data.dataset,
        batch_sampler=data.make_sampler(start_batch, info.rank, info.world_size),
        collate_fn=data.collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # The loader draws its workers' base seed from this generator, not the global RNG, so
        # starting a loader on resume does not shift the model's random stream (dropout, noise).
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def pretrain(
    cfg: Config, data: str | Path, out_dir: str | Path, resume: bool = False
) -> TrainResult:
    """Pretrain ``cfg`` on ``data``, writing everything into ``out_dir``.

    ``cfg.train.max_steps == 0`` writes the freshly initialized model (the random-init baseline).
    Under ``torchrun`` every rank trains on its own slice of each global batch (the batch size
    is per rank); rank 0 writes the run directory.
    """
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and ckpt.list_checkpoints(run_dir):
        raise UserError(
            f"{run_dir} already holds checkpoints: pass --resume or choose another --out"
        )
    device = resolve_device(cfg.train.device)
    check_precision(device, cfg.train.precision)
    info = distributed.init_distributed(device)
    device = distributed.local_device(device, info)
    try:
        return _pretrain(cfg, data, run_dir, resume, device, info)
    finally:
        distributed.shutdown()


def _pretrain(
    cfg: Config, data: str | Path, run_dir: Path, resume: bool, device: torch.device, info: DistInfo
) -> TrainResult:
    threads = configure_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    skips = SkipLog()
    # Rank 0 derives what the data needs once (text: tokenizer, token store); the others wait
    # and then read it.
    if not info.is_main:
        distributed.barrier()
    pretrain_data = build_pretrain_data(cfg, data, skips, run_dir)
    if info.is_main:
        cfg.save(run_dir / "config.yaml")
        skips.write(run_dir / "skipped.tsv")
        distributed.barrier()
    model = build_model(cfg).to(device)
    # After build_model, so the EMA teacher's deep copy does not duplicate it.
    model.encoder.tokenizer = pretrain_data.tokenizer
    state = new_state(model, cfg, device)
    state.dist = info
    if resume:
        path = restore(state, run_dir)
        log.info("resumed from %s at step %d", path or "(no checkpoint)", state.step)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        state.forward_module = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # LayerDrop leaves whole blocks without gradient in some steps.
            find_unused_parameters=cfg.model.layerdrop > 0,
        )
        # Dropout and mask-token noise differ per rank (the model itself starts identical).
        torch.manual_seed(cfg.train.seed + 1000 * (info.rank + 1) + state.step)
    log.info(
        "device %s, %d threads, %d samples, %.2fM parameters%s",
        device,
        threads,
        pretrain_data.size,
        sum(p.numel() for p in model.parameters()) / 1e6,
        f", rank {info.rank} of {info.world_size}" if info.enabled else "",
    )
    if cfg.train.max_steps == 0 or state.step >= cfg.train.max_steps:
        path = save(state, run_dir, cfg, skips) if info.is_main else None
        return TrainResult(run_dir, state.step, "max_steps", 0.0, path, len(skips))
    loader = make_loader(pretrain_data, cfg, state.batches_seen, info)
    return _loop(state, cfg, run_dir, loader, skips, device)


@contextlib.contextmanager
def _stop_requests() -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C / SIGTERM into a request to stop after the current step.

    Stopping between steps keeps the saved state consistent (never half an optimizer step);
    a second Ctrl-C interrupts at once.
    """
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        log.warning("stop requested: finishing this step and saving a checkpoint")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _record(
    state: TrainState,
    result: StepResult,
    samples: int,
    seconds: float,
    elapsed: float,
    skips: SkipLog,
) -> dict[str, float]:
    return {
        "loss": result.loss,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "ema_decay": result.ema_decay,
        **result.logs,
        "samples_per_s": samples / max(seconds, 1e-9),
        "elapsed_s": elapsed,
        "skipped_inputs": len(skips),
        "skipped_steps": state.skipped_steps,
    }


def _loop(
    state: TrainState,
    cfg: Config,
    run_dir: Path,
    loader: DataLoader,
    skips: SkipLog,
    device: torch.device,
) -> TrainResult:
    """Train until max_steps, the time budget, a collapse, repeated non-finite steps or Ctrl-C.

    The last good state is checkpointed on every exit except collapse and non-finite stops,
    where the previous checkpoint is the last good one and is left untouched.
    """
    main = state.dist.is_main
    writer = MetricsWriter(run_dir, cfg.train.tensorboard) if main else None
    bar = tqdm(
        total=cfg.train.max_steps,
        initial=state.step,
        disable=not cfg.train.progress or not main,
        desc="pretrain",
        dynamic_ncols=True,
    )
    start = last_log = time.perf_counter()
    budget = cfg.train.max_minutes * 60 if cfg.train.max_minutes else math.inf
    samples, stopped, last_ckpt = 0, "max_steps", None
    history: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        requests = stack.enter_context(_stop_requests())
        stack.callback(bar.close)
        if writer is not None:
            stack.callback(writer.close)
        for batch in loader:
            state.batches_seen += 1
            skips.extend(batch.skipped)
            if len(batch) == 0:
                continue
            result = train_step(state, batch, cfg, device)
            samples += len(batch)
            if state.nonfinite_in_a_row >= cfg.train.max_nonfinite:
                log.error(
                    "%d non-finite steps in a row; stopping (last checkpoint kept)",
                    state.nonfinite_in_a_row,
                )
                stopped = "nonfinite"
                break
            if not result.updated:
                continue
            bar.update(1)
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                now = time.perf_counter()
                record = _record(state, result, samples, now - last_log, now - start, skips)
                if writer is not None:
                    writer.log(state.step, record)
                history.append({"step": state.step, **record})
                bar.set_postfix(
                    loss=f"{result.loss:.4f}",
                    lr=f"{result.lr:.2e}",
                    samples_s=f"{record['samples_per_s']:.1f}",
                )
                last_log, samples = now, 0
            reason = _collapsed(cfg, state.step, result.logs)
            # One agreed decision per step: a rank that stopped alone would hang the others.
            collapse, over_budget, interrupted = distributed.agree(
                [reason is not None, time.perf_counter() - start > budget, requests["stop"]],
                device,
            )
            if collapse:
                log.error(
                    "representation collapse at step %d: %s; stopping (last checkpoint kept)",
                    state.step,
                    reason or "on another rank",
                )
                stopped = "collapse"
                break
            if state.step % cfg.train.checkpoint_every == 0 and main:
                last_ckpt = save(state, run_dir, cfg, skips)
            if state.step >= cfg.train.max_steps:
                break
            if over_budget:
                stopped = "time_budget"
                break
            if interrupted:
                stopped = "interrupted"
                break
    saved_now = last_ckpt is not None and last_ckpt.name == f"step_{state.step:08d}"
    if stopped not in ("collapse", "nonfinite") and not saved_now and main:
        last_ckpt = save(state, run_dir, cfg, skips)
    distributed.barrier()  # no rank leaves (and tears the group down) before rank 0 has saved
    if main:
        skips.write(run_dir / "skipped.tsv")
    if len(skips):
        log.warning(
            "%d inputs were skipped (%s); see %s",
            len(skips),
            skips.summary(),
            run_dir / "skipped.tsv",
        )
    return TrainResult(
        run_dir, state.step, stopped, time.perf_counter() - start, last_ckpt, len(skips), history
    )
