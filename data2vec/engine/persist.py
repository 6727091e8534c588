"""Saving and restoring the training state, and the end-of-run summary.

A checkpoint holds full (unsharded) tensors in the layout of :mod:`data2vec.engine.checkpoint`
whatever the run's distribution, plus the data position as a stream position, so any run
(one process, DDP, FSDP; another batch size or accumulation) resumes at the same sample.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data2vec.config import Config
from data2vec.data.sampling import Coverage
from data2vec.data.skips import SkipLog
from data2vec.engine import checkpoint as ckpt
from data2vec.engine import distributed, fsdp
from data2vec.engine.optim import keep_implementation
from data2vec.models.data2vec2 import Data2Vec2

if TYPE_CHECKING:
    from data2vec.engine.trainer import TrainState

log = logging.getLogger(__name__)


def save(state: TrainState, run_dir: Path, cfg: Config, skips: SkipLog) -> Path | None:
    """Checkpoint ``state`` (rank 0 writes; every rank calls it when the model is sharded,
    since gathering the full tensors is a collective). Returns the checkpoint on rank 0."""
    if state.sharded:
        model_state, teacher_state, optim_state = fsdp.full_state(state.model, state.optimizer)
        optim_format = fsdp.OPTIMIZER_FORMAT
    elif state.dist.is_main:
        model_state = {f"encoder.{k}": v for k, v in state.model.encoder.state_dict().items()}
        model_state |= {f"decoder.{k}": v for k, v in state.model.decoder.state_dict().items()}
        teacher_state = state.model.teacher.state_dict()
        optim_state, optim_format = state.optimizer.state_dict(), "index"
    if not state.dist.is_main:
        return None
    skips.write(run_dir / "skipped.tsv")
    trainer_state: dict[str, Any] = {
        "step": state.step,
        "batches_seen": state.batches_seen,
        # The next stream position (batch k of rank r holds positions (k·W + r)·B + j): lets a
        # run with another world size, batch size or accumulation resume at the same sample.
        "data_position": state.batches_seen * cfg.data.batch_size * state.dist.world_size,
        "skipped_steps": state.skipped_steps,
        "optimizer": optim_state,
        "optimizer_format": optim_format,
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": ckpt.rng_state(),
    }
    return ckpt.save_checkpoint(
        run_dir,
        state.step,
        model_state,
        teacher_state,
        trainer_state,
        cfg,
        cfg.train.keep_checkpoints,
        encoder=state.model.encoder,
    )


Found = tuple[Path, tuple[dict, dict | None, dict]]


def load_weights(model: Data2Vec2, found: Found) -> None:
    """Student and teacher weights of a checkpoint into an unsharded ``model``."""
    _, (model_state, teacher_state, _) = found
    enc = {k[len("encoder.") :]: v for k, v in model_state.items() if k.startswith("encoder.")}
    dec = {k[len("decoder.") :]: v for k, v in model_state.items() if k.startswith("decoder.")}
    model.encoder.load_state_dict(enc, strict=True)
    model.decoder.load_state_dict(dec, strict=True)
    if teacher_state is not None:
        model.teacher.load_state_dict(teacher_state)


def load_trainer_state(state: TrainState, found: Found, batch_size: int) -> None:
    """Optimizer, loss scaler, counters and RNG states of a checkpoint into ``state``.

    ``batch_size`` (per rank) converts the saved data position into this run's batches.
    """
    _, (_, _, trainer_state) = found
    with keep_implementation(state.optimizer):
        if trainer_state.get("optimizer_format", "index") == fsdp.OPTIMIZER_FORMAT:
            fsdp.load_optimizer(state.model, state.optimizer, trainer_state["optimizer"])
        else:
            state.optimizer.load_state_dict(trainer_state["optimizer"])
    if state.scaler is not None and trainer_state.get("scaler"):
        state.scaler.load_state_dict(trainer_state["scaler"])
    state.step = trainer_state["step"]
    state.batches_seen = trainer_state["batches_seen"]
    if "data_position" in trainer_state:
        per_batch = batch_size * state.dist.world_size
        state.batches_seen, rest = divmod(int(trainer_state["data_position"]), per_batch)
        if rest:
            log.warning(
                "data position %d is not a multiple of this run's %d samples per batch (batch "
                "size x ranks); resuming %d samples earlier",
                trainer_state["data_position"],
                per_batch,
                rest,
            )
    state.skipped_steps = trainer_state["skipped_steps"]
    ckpt.set_rng_state(trainer_state["rng"])


def restore(state: TrainState, run_dir: Path, batch_size: int) -> Path | None:
    """Load the newest loadable checkpoint of ``run_dir`` into ``state`` (unsharded model)."""
    found = ckpt.latest_loadable(run_dir)
    if found is None:
        return None
    load_weights(state.model, found)
    load_trainer_state(state, found, batch_size)
    return found[0]


def summarize(
    state: TrainState,
    run_dir: Path,
    stopped: str,
    seconds: float,
    skips: SkipLog,
    device: torch.device,
    coverage: Coverage | None,
) -> None:
    """Log the end-of-run summary and write it to ``summary.json`` (rank 0)."""
    samples = int(distributed.global_sum(torch.tensor(float(state.samples_seen), device=device)))
    distinct = None
    if coverage is not None and coverage.enabled:
        # Ranks draw disjoint slots, but a sample can reach two ranks in different epochs:
        # count the union (a max over the bitmaps, not a sum).
        used = distributed.global_max(torch.from_numpy(coverage.used).to(device, torch.uint8))
        distinct = int(used.sum())
    summary = {
        "stopped": stopped,
        "steps": state.step,
        "seconds": round(seconds, 3),
        "samples_trained": samples,  # in this process's run, over all ranks
        "distinct_samples_trained": distinct,  # of the data set (None for streams)
        "skipped_steps": state.skipped_steps,
        "skipped_inputs": len(skips),
        "skipped_by_reason": skips.summary(),
        "kernel_check": state.kernel_check,  # None: not run (no Triton kernel on the device)
    }
    if state.dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info(
        "run summary: stopped (%s) at step %d after %.1fs, %d samples trained (%s distinct), "
        "%d steps skipped",
        stopped,
        state.step,
        seconds,
        samples,
        distinct,
        state.skipped_steps,
    )
    if len(skips):
        log.warning(
            "%d inputs were skipped (%s); see %s",
            len(skips),
            skips.summary(),
            run_dir / "skipped.tsv",
        )
