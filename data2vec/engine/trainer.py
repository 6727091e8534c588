"""The pretraining loop.

The model returns its loss and logs; the engine owns everything else, in this order, every
step: learning rate -> (for each of ``train.accum_steps`` micro-batches: autocast forward ->
backward) -> loss normalization -> clip -> (fused AdamW: the update queued, to be skipped on
the device if anything is not finite) -> one read of the losses, logs and gradient norm ->
finite check -> optimizer step -> explicit teacher update -> logs -> collapse guard ->
checkpoint. The read is the step's only wait for a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
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
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from data2vec._runtime import choose_heap_mode, release_free_memory
from data2vec.compile import compile_model
from data2vec.config import Config
from data2vec.data.batch import PretrainBatch
from data2vec.data.registry import PretrainData, build_pretrain_data
from data2vec.data.sampling import Coverage
from data2vec.data.skips import SkipLog
from data2vec.engine import checkpoint as ckpt
from data2vec.engine import distributed, fsdp, kernel_check
from data2vec.engine.distributed import DistInfo
from data2vec.engine.metrics import MetricsWriter
from data2vec.engine.optim import build_optimizer
from data2vec.engine.persist import load_trainer_state, load_weights, save, summarize
from data2vec.engine.runtime import (
    autocast,
    check_precision,
    configure_threads,
    resolve_device,
)
from data2vec.engine.schedules import ScheduleFit, lr_at
from data2vec.errors import DataError, UserError
from data2vec.models.data2vec2 import Data2Vec2
from data2vec.models.registry import build_model
from data2vec.nn import token_conv

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    model: Data2Vec2
    optimizer: torch.optim.Optimizer
    step: int = 0  # optimizer steps taken
    batches_seen: int = 0  # data position (differs from step when steps are skipped)
    skipped_steps: int = 0
    samples_seen: int = 0  # samples this rank trained on in this process (not checkpointed)
    nonfinite_in_a_row: int = 0
    # fp16 only: dynamic loss scaling (bf16 and fp32 have fp32's exponent range and need none).
    scaler: torch.amp.GradScaler | None = None
    # What runs the forward pass: the model, or its DistributedDataParallel wrapper.
    forward_module: torch.nn.Module | None = None
    dist: DistInfo = field(default_factory=DistInfo)
    sharded: bool = False  # the model is sharded with FSDP (train.distributed=fsdp)
    kernel_check: dict[str, Any] | None = None  # what the start-up kernel check found

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
    state: TrainState,
    micro: PretrainBatch | list[PretrainBatch],
    cfg: Config,
    device: torch.device,
) -> StepResult:
    """One optimizer step on ``micro`` (a batch, or the micro-batches of one accumulated step).

    Gradients of all micro-batches are summed (synchronized across ranks on the last one only)
    and normalized by their total masked-token count over all ranks, as fairseq's
    ``update_freq`` does; see :func:`distributed.micro_batches`. The step is skipped and counted
    when a loss or the gradient is not finite.
    """
    model, opt = state.model, state.optimizer
    micro = [micro] if isinstance(micro, PretrainBatch) else micro
    k = len(micro)
    lr = lr_at(
        state.step,
        cfg.optim.lr,
        cfg.optim.warmup_steps,
        cfg.train.max_steps,
        cfg.optim.schedule,
        cfg.optim.final_lr_ratio,
    )
    lr *= _lr_scale(model, micro)
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    scaler = state.scaler
    counts: list[int] = []  # masked tokens of each micro-batch, summed over ranks
    losses: list[Tensor] = []
    logs: dict[str, Tensor | float] = {}
    for i, batch in enumerate(micro):
        with _gradient_sync(state, i == k - 1):
            with (
                autocast(device, cfg.train.precision),
                distributed.micro_batches(k),
                _stage("forward"),
            ):
                pad = batch.padding_mask
                # a joint model's batches name their modality
                extra = {} if batch.modality is None else {"modality": batch.modality}
                # The mask goes as the loader made it: the model checks and counts it on the
                # host and moves it itself (data2vec 2.0 needs its counts on the host).
                out = state.runner(
                    batch.source.to(device, non_blocking=True),
                    batch.mask,
                    None if pad is None else pad.to(device, non_blocking=True),
                    **extra,
                )
            losses.append(out.loss.detach())
            for key, v in out.logs.items():
                value = v.detach() if isinstance(v, Tensor) else float(v)
                logs[key] = logs.get(key, 0.0) + value / k
            counts.append(max(out.sample_size // k, 1))
            # The model divided by k * counts[i]; reweight to counts[i] / counts[0] now and by
            # k * counts[0] / total below, once the total is known (exact for the per-token
            # mean; k == 1 leaves the loss untouched).
            loss = out.loss if k == 1 else out.loss * (counts[i] / counts[0])
            if device.type == "cpu":
                # The forward's temporaries are free now; hand their heap pages back before
                # backward allocates its own (glibc heap holes; see data2vec/_runtime.py).
                release_free_memory()
            # Backward runs even where the loss is not finite (the step is skipped below): its
            # value is read with the gradient norm's, in one wait for the device, instead of
            # stalling the GPU between the forward and the backward pass of every step.
            with _stage("backward"):
                (scaler.scale(loss) if scaler is not None else loss).backward()
    total = sum(counts)
    if scaler is not None:
        scaler.unscale_(opt)  # clip the true gradients
    if k > 1:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, k * counts[0] / total)
    clip = cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else math.inf
    norm = fsdp.full(torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True))
    # The update is queued before the values are read where the optimizer can skip it on the
    # device (PyTorch's fused AdamW takes a ``found_inf`` flag, as from a loss scaler): the host
    # then prepares it while the GPU still runs the backward pass, instead of after the read.
    queued = scaler is None and not (distributed.active() or state.sharded) and _fused(opt)
    if queued:
        bad = ~torch.isfinite(norm)
        for v in losses:
            bad |= ~torch.isfinite(v)
        opt.found_inf = bad.float()  # type: ignore[attr-defined]
        try:
            with _stage("optimizer"):
                opt.step()
        finally:
            del opt.found_inf  # type: ignore[attr-defined]
    with _stage("read"):
        values = read_scalars([norm, *losses, *logs.values()])
    grad_norm, loss_values = values[0], values[1 : k + 1]
    host_logs = dict(zip(logs, values[k + 1 :]))
    loss_value = sum(v * k * n / total for v, n in zip(loss_values, counts))
    # Every rank must skip together (DDP's gradients are averaged, so a non-finite gradient
    # is everywhere; a rank's non-finite loss is not): any_rank runs on every rank, every step.
    loss_bad = distributed.any_rank(not all(math.isfinite(v) for v in loss_values), device)
    if loss_bad or not math.isfinite(grad_norm):
        if scaler is not None:
            # unscale_ ran, so the scaler expects an update; after an overflow it lowers the
            # loss scale for the next step
            scaler.update()
        return _skip_step(state, loss_value, lr, host_logs)
    with _stage("optimizer"):
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        elif not queued:
            opt.step()
        opt.zero_grad(set_to_none=True)
    state.step += 1
    state.nonfinite_in_a_row = 0
    with _stage("teacher"):
        if state.sharded:
            decay = fsdp.update_teacher(model, state.step)
        else:
            decay = model.update_teacher(state.step)
    if device.type == "cpu":
        choose_heap_mode()  # once, now that the process's size is known (data2vec/_runtime.py)
        # No trim here, though the step's activations are all free: the next forward pass
        # reuses their resident holes, where after a trim it would fault every page back in
        # (text-v2-base b8: 1.3-1.5M faults and 4-5 s of system time per step with it, 1.1M and
        # 3.0-3.5 s without, the same peak; benchmarks/README.md, eighth pass).
    return StepResult(loss_value, lr, grad_norm, decay, True, host_logs)


def check_kernels(
    state: TrainState, batch: PretrainBatch, cfg: Config, device: torch.device
) -> None:
    """Check the Triton kernels on a few samples of ``batch``; the kinds of layer whose
    kernels any rank found off take the torch ops for the rest of the process
    (``train.kernel_check``; see :mod:`data2vec.engine.kernel_check`). What it found goes to
    ``summary.json``."""
    if not cfg.train.kernel_check or state.sharded:
        return
    if cfg.train.compile and not kernel_check.checks_compiled_models():
        return
    found = kernel_check.check_pretraining(state.model, batch, device, cfg.train.precision)
    # every rank runs the collective; what one rank turns off, all do
    mine = kernel_check.kinds_to_disable(found)
    agreed = distributed.agree([kind in mine for kind in token_conv.KINDS], device)
    off = [kind for kind, bad in zip(token_conv.KINDS, agreed) if bad]
    state.kernel_check = kernel_check.act_on(found, off)


def _fused(opt: torch.optim.Optimizer) -> bool:
    """Whether every parameter group of ``opt`` runs PyTorch's fused kernel (which can skip
    an update on the device: ``found_inf``)."""
    return bool(opt.param_groups) and all(g.get("fused") for g in opt.param_groups)


def _stage(name: str) -> contextlib.AbstractContextManager:
    """A named range of the step in ``torch.profiler`` traces (``data2vec::forward``, ...):
    ``benchmarks/gpu_gaps.py`` says in which stage a GPU waited for the host."""
    return torch.profiler.record_function(f"data2vec::{name}")


def read_scalars(values: list[Tensor | float]) -> list[float]:
    """Python floats of scalar tensors and numbers, in order, with one device-to-host copy per
    device (a step's loss, logs and gradient norm: one wait for the GPU, not one each)."""
    out: list[float | None] = [v if isinstance(v, float | int) else None for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, Tensor):
            by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        stacked = torch.stack([values[i].detach().reshape(()).float() for i in idx])  # type: ignore[union-attr]
        for i, x in zip(idx, stacked.tolist()):
            out[i] = x
    return [float(v) for v in out]  # type: ignore[arg-type]


def _lr_scale(model: torch.nn.Module, micro: list[PretrainBatch]) -> float:
    """A joint model's learning-rate factor for this step's modalities (1 for other models)."""
    names = {b.modality for b in micro if b.modality is not None}
    scale = getattr(model, "lr_scale", None)
    return scale(names) if callable(scale) and names else 1.0


@contextlib.contextmanager
def _gradient_sync(state: TrainState, sync: bool) -> Iterator[None]:
    """Forward and backward of one micro-batch; gradients are reduced across ranks only when
    ``sync`` (the last micro-batch of a step): DDP's ``no_sync``, FSDP's gradient-sync flag."""
    if state.sharded:
        fsdp.set_gradient_sync(state.model, sync)
        yield
    elif sync or not isinstance(state.forward_module, DistributedDataParallel):
        yield
    else:
        with state.forward_module.no_sync():
            yield


def new_state(model: Data2Vec2, cfg: Config, device: torch.device) -> TrainState:
    """Fresh training state: AdamW over the student, a loss scaler for fp16."""
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    if cfg.train.compile:
        compile_model(model, device)  # in place: names, checkpoints and the teacher unchanged
    return TrainState(model, build_optimizer(model, cfg.optim), scaler=scaler)


def _skip_step(state: TrainState, loss: float, lr: float, logs: dict[str, float]) -> StepResult:
    state.optimizer.zero_grad(set_to_none=True)
    state.skipped_steps += 1
    state.nonfinite_in_a_row += 1
    log.warning("non-finite loss or gradient at step %d: update skipped", state.step)
    return StepResult(loss, lr, float("nan"), float("nan"), False, logs)


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
    data: PretrainData,
    cfg: Config,
    start_batch: int,
    info: DistInfo | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """The pretraining loader; ``pin_memory`` for CUDA, so batches copy asynchronously."""
    info = info or DistInfo()
    workers = cfg.data.num_workers
    if data.make_stream is not None:  # tar shards: the stream batches itself per worker
        dataset: Any = data.make_stream(start_batch, info.rank, info.world_size)
        batching: dict[str, Any] = {"batch_size": cfg.data.batch_size}
    else:
        assert data.make_sampler is not None
        dataset = data.dataset
        batching = {"batch_sampler": data.make_sampler(start_batch, info.rank, info.world_size)}
    return DataLoader(
        dataset,
        **batching,
        collate_fn=data.collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=pin_memory,
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
    if cfg.train.distributed == "fsdp":
        fsdp.check_supported(cfg, device)
    info = distributed.init_distributed(device)
    device = distributed.local_device(device, info)
    try:
        result = _pretrain(cfg, data, run_dir, resume, device, info)
        # Every rank is done before any tears down: gloo can abort a process whose peer
        # closes its connections while it still finishes (seen rarely on loaded CPUs).
        distributed.barrier()
        return result
    finally:
        if distributed.active():
            # Objects still holding the process group (the DDP wrapper's reducer, if reference
            # cycles keep it) go here, while the interpreter is whole, not during its teardown.
            # A finished rank once aborted at exit there (SIGABRT, "terminate called without
            # an active exception"; one loaded test run); that this cures it is not shown.
            gc.collect()
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
    sharded = info.enabled and cfg.train.distributed == "fsdp"
    if cfg.train.distributed == "fsdp" and not info.enabled:
        log.info("train.distributed=fsdp: a single process holds the whole model (no torchrun)")
    # A sharded model is built in host memory: only its shards go to the device.
    model = build_model(cfg).to("cpu" if sharded else device)
    # After build_model, so the EMA teacher's deep copy does not duplicate it.
    model.encoder.tokenizer = pretrain_data.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    found = ckpt.latest_loadable(run_dir) if resume else None
    if found is not None:
        load_weights(model, found)  # before sharding: the checkpoint holds full tensors
    if sharded:
        # Before the optimizer, which must see the sharded parameters; fully_shard moves the
        # shards to this rank's device, the teacher's few unsharded parameters follow.
        fsdp.shard(model)
        model.teacher.to(device)
    state = new_state(model, cfg, device)
    state.dist, state.sharded = info, sharded
    if resume:
        if found is not None:
            load_trainer_state(state, found, cfg.data.batch_size)
        log.info("resumed from %s at step %d", found[0] if found else "(none)", state.step)
    if info.enabled and not sharded:
        state.forward_module = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # LayerDrop leaves whole blocks without gradient in some steps, and a joint
            # model's step trains one modality's encoder and decoder only.
            find_unused_parameters=cfg.model.layerdrop > 0 or cfg.model.modality == "multi",
        )
    if info.enabled:
        # Dropout and mask-token noise differ per rank (the model itself starts identical).
        torch.manual_seed(cfg.train.seed + 1000 * (info.rank + 1) + state.step)
    log.info(
        "device %s, %d threads, %d samples, %.2fM parameters%s",
        device,
        threads,
        pretrain_data.size,
        n_params / 1e6,
        f", rank {info.rank} of {info.world_size} ({cfg.train.distributed})"
        if info.enabled
        else "",
    )
    # A fitted schedule's max_steps is a guess: a resumed run trains its own new budget.
    done = state.step >= cfg.train.max_steps and not cfg.train.fit_schedule
    if cfg.train.max_steps == 0 or done:
        path = save(state, run_dir, cfg, skips)
        return TrainResult(run_dir, state.step, "max_steps", 0.0, path, len(skips))
    loader = make_loader(
        pretrain_data, cfg, state.batches_seen, info, pin_memory=device.type == "cuda"
    )
    coverage = Coverage(loader.batch_sampler, _length(pretrain_data.dataset))
    return _loop(state, cfg, run_dir, loader, skips, device, coverage)


def _length(dataset: object) -> int:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:  # a stream
        return 0


def _max_empty_batches(cfg: Config, coverage: Coverage) -> int:
    """Empty batches in a row after which no input is usable: two epochs' worth (or 1000
    batches of a stream, whose size is unknown)."""
    n = len(coverage.used)
    return 2 * -(-n // cfg.data.batch_size) + 10 if n else 1000


def _no_usable_input(run_dir: Path, skips: SkipLog, batches: int) -> None:
    if distributed.env_info().is_main:
        skips.write(run_dir / "skipped.tsv")
    raise DataError(
        f"no usable input in {batches} batches in a row: every sample was skipped "
        f"({len(skips)} inputs, {skips.summary()}); see {run_dir / 'skipped.tsv'}"
    )


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


def _refit(
    cfg: Config, fit: ScheduleFit, step: int, elapsed: float, device: torch.device, bar: tqdm
) -> Config:
    """``cfg`` with ``train.max_steps`` re-estimated by ``fit`` (the longest estimate of all
    ranks, so they agree on when the schedule ends)."""
    total = fit.update(step, elapsed)
    if total is None:  # the pace is not known yet: a first estimate too short must not end it
        total = max(cfg.train.max_steps, step + 1)
    if distributed.active():
        total = int(distributed.global_max(torch.tensor(total, device=device)))
    if total == cfg.train.max_steps:
        return cfg
    bar.total = total
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=total))


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
    coverage: Coverage | None = None,
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
    samples, stopped, last_ckpt, saved_step = 0, "max_steps", None, -1
    fit = ScheduleFit(budget, state.step) if cfg.train.fit_schedule else None
    history: list[dict[str, float]] = []
    pending: list[PretrainBatch] = []  # the micro-batches of the next optimizer step
    with contextlib.ExitStack() as stack:
        requests = stack.enter_context(_stop_requests())
        stack.callback(bar.close)
        if writer is not None:
            stack.callback(writer.close)
        coverage = coverage or Coverage(None, 0)
        empty = 0  # batches in a row without a usable input
        checked = False  # the kernel check, before this process's first step
        for batch in loader:
            coverage.add(state.batches_seen, batch.positions.tolist())
            state.batches_seen += 1
            skips.extend(batch.skipped)
            # A batch of only bad inputs is dropped on every rank alike (ranks must run the
            # same number of forward passes).
            if distributed.any_rank(len(batch) == 0, device):
                if len(batch):
                    log.warning("batch dropped: another rank's batch had no usable input")
                empty += 1
                if empty >= _max_empty_batches(cfg, coverage):
                    _no_usable_input(run_dir, skips, empty)
                continue
            empty = 0
            pending.append(batch)
            if len(pending) < cfg.train.accum_steps:
                continue
            if not checked:
                checked = True
                check_kernels(state, pending[0], cfg, device)
            result = train_step(state, pending, cfg, device)
            samples += sum(len(b) for b in pending)
            state.samples_seen += sum(len(b) for b in pending)
            pending = []
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
            if fit is not None:
                cfg = _refit(cfg, fit, state.step, time.perf_counter() - start, device, bar)
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
            if state.step % cfg.train.checkpoint_every == 0:
                last_ckpt, saved_step = save(state, run_dir, cfg, skips), state.step
            if state.step >= cfg.train.max_steps:
                break
            if over_budget:
                stopped = "time_budget"
                break
            if interrupted:
                stopped = "interrupted"
                break
    if stopped not in ("collapse", "nonfinite") and saved_step != state.step:
        last_ckpt = save(state, run_dir, cfg, skips)  # every rank: a collective under FSDP
    distributed.barrier()  # no rank leaves (and tears the group down) before rank 0 has saved
    seconds = time.perf_counter() - start
    if main:
        skips.write(run_dir / "skipped.tsv")
    summarize(state, run_dir, stopped, seconds, skips, device, coverage)
    return TrainResult(run_dir, state.step, stopped, seconds, last_ckpt, len(skips), history)
