"""What each speed change buys: the training step, or its part, with one change reverted.

End to end: real training steps (``engine.trainer.train_step``) of one preset on the synthetic
batch ``data2vec bench`` uses, with one of the toolkit's choices swapped back for the
straightforward alternative by patching, for the duration of the variant:

* ``no_sdpa`` - attention as explicit ``softmax(q k^T / sqrt(d)) v`` instead of
  ``F.scaled_dot_product_attention`` (student and teacher);
* ``teacher_per_clone`` - the EMA teacher encodes every clone (``B x M`` rows) instead of every
  sample once, and the targets of each sample's first copy are used;
* ``clone_loop`` - the student's shared blocks run one clone group of ``B`` rows at a time in a
  Python loop instead of all ``B x M`` rows in one batch;
* ``plain_layers`` - every memory-lean layer of ``nn/lean.py``/``nn/lean_fused.py`` back to the
  plain ops (what the memory work costs or saves in time);
* ``onednn_conv_grad`` - oneDNN's weight gradient for the strided float32 1-D convolutions
  (the speech CNN) instead of ``nn/conv_taps.py``'s matrix products per tap.

The variants take turns (the order rotates every round) in one process, so slow drifts of the
machine hit them alike; the median per variant is reported.

Parts too small to see in a whole step's noise are timed alone on the model's own parameters
(random gradients): the AdamW step (fused kernel, foreach, single-tensor loop), the EMA teacher
update (one ``torch._foreach_lerp_`` or a per-tensor ``lerp_`` loop; and its host time alone, with
the teacher/student pairs kept or found anew each update), gradient clipping
(``foreach=True`` or per-tensor norms), and drawing one batch's masks in the main process (what
the data-loader workers take off the training loop).

Prints one JSON object per line.

python benchmarks/speed_ablations.py --preset image-v2-base --batch 8 --steps 1 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # saved_activations beside this file

from saved_activations import CHANGES, plain

import data2vec.nn.attention as attention_mod
from data2vec.bench import _synthetic_batch
from data2vec.config import load_config
from data2vec.data.image_pretrain import ImageMaskGenerator
from data2vec.engine.optim import param_groups
from data2vec.engine.runtime import configure_threads
from data2vec.engine.trainer import TrainState, new_state, train_step
from data2vec.masking import make_rng
from data2vec.modalities.base import Context
from data2vec.models.registry import build_model
from data2vec.nn import conv_taps


def _explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, **_):
    """``softmax(q k^T / sqrt(d) + mask) v`` with dropout, in plain autograd ops."""
    logits = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        logits = logits + attn_mask
    return F.dropout(logits.softmax(-1), dropout_p) @ v


@contextlib.contextmanager
def _patched(obj: object, name: str, value: object) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _teacher_per_clone(model) -> contextlib.AbstractContextManager:
    original = model.forward_targets
    M = model.clones

    def per_clone(source, source_padding, local, padding_mask):
        with torch.no_grad():
            rep = [None if t is None else t.repeat_interleave(M, dim=0)
                   for t in (source, source_padding, local, padding_mask)]  # fmt: skip
        return original(*rep)[::M]  # each sample's first copy: (B, T, D)

    return _patched(model, "forward_targets", per_clone)


def _clone_loop(model) -> contextlib.AbstractContextManager:
    encoder = model.encoder
    original = encoder.forward_blocks
    M = model.clones

    def looped(ctx: Context, keep_layers: bool = False):
        N = ctx.x.shape[0]
        rows = torch.arange(N, device=ctx.x.device).view(-1, M)  # row b*M + c: clone c of b
        outs = []
        for c in range(M):
            idx = rows[:, c]
            am = ctx.attn_mask
            part = Context(
                ctx.x[idx],
                None if ctx.padding_mask is None else ctx.padding_mask[idx],
                am[idx] if am is not None and am.shape[0] == N else am,
            )
            outs.append(original(part, keep_layers))
        out = outs[0]
        # (B, M, T, D) -> (B*M, T, D): back in sample-major row order
        out.x = torch.stack([o.x for o in outs], dim=1).flatten(0, 1)
        out.padding_mask = ctx.padding_mask
        return out

    return _patched(encoder, "forward_blocks", looped)


@contextlib.contextmanager
def _ema_loop() -> Iterator[None]:
    def lerp_loop(targets, sources, weight):
        for t, s in zip(targets, sources):
            t.lerp_(s, weight)

    with _patched(torch, "_foreach_lerp_", lerp_loop):
        yield


def _median_seconds(fn: Callable[[], object], reps: int = 5) -> float:
    fn()  # warm-up (optimizer state, caches)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_seconds(state: TrainState, cfg) -> dict[str, float]:
    """Optimizer step, EMA update and gradient clipping, each implementation timed alone."""
    model = state.model
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    o = cfg.optim
    out = {}
    for name, impl in (("fused", {"fused": True}), ("foreach", {"foreach": True}),
                       ("loop", {"foreach": False})):  # fmt: skip
        opt = torch.optim.AdamW(
            param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, **impl
        )
        out[f"adamw_{name}_s"] = _median_seconds(opt.step)
    out["ema_foreach_s"] = _median_seconds(lambda: model.update_teacher(1))
    with _ema_loop():
        out["ema_loop_s"] = _median_seconds(lambda: model.update_teacher(1))
    # The host's share alone (what a GPU waits for): the update with its arithmetic removed,
    # the teacher/student pairs kept from the last update (as in training) or found anew.
    with _patched(torch, "_foreach_lerp_", lambda *args: None):
        out["ema_host_s"] = _median_seconds(lambda: model.update_teacher(1), reps=50)
        out["ema_host_pairs_found_s"] = _median_seconds(
            lambda: (setattr(model.teacher, "_pairs", None), model.update_teacher(1)), reps=50
        )
    clip = torch.nn.utils.clip_grad_norm_
    out["grad_norm_foreach_s"] = _median_seconds(lambda: clip(params, 1e9, foreach=True))
    out["grad_norm_loop_s"] = _median_seconds(lambda: clip(params, 1e9, foreach=False))
    return out


def mask_seconds(cfg, batch: int, reps: int = 5) -> float | None:
    """Median time to draw one batch's masks in this process (image presets)."""
    if cfg.model.modality != "image":
        return None
    grid = (cfg.encoder.image_size // cfg.encoder.patch_size,) * 2
    gen = ImageMaskGenerator(cfg, grid)
    return _median_seconds(lambda: [gen(make_rng(cfg.train.seed, i)) for i in range(batch)], reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="image-v2-base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="*", help="a subset of the end-to-end variants")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args()

    cfg = load_config(args.preset, [f"data.batch_size={args.batch}", *args.overrides])
    threads = configure_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cpu")
    model = build_model(cfg).to(device)
    state = new_state(model, cfg, device)
    data = _synthetic_batch(cfg, args.batch)

    variants: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
        "baseline": contextlib.nullcontext,
        "no_sdpa": lambda: _patched(
            attention_mod.F, "scaled_dot_product_attention", _explicit_attention
        ),
        "teacher_per_clone": lambda: _teacher_per_clone(model),
        "clone_loop": lambda: _clone_loop(model),
        "plain_layers": lambda: plain(model, set(CHANGES)),
        "onednn_conv_grad": lambda: _patched(conv_taps, "worth_it", lambda *_: False),
    }
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in {"baseline", *args.variants}}
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    train_step(state, data, cfg, device)  # warm-up
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotating order
            with variants[name]():
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    train_step(state, data, cfg, device)
                    times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["baseline"])
    info = {"preset": cfg.preset, "batch": args.batch, "clones": cfg.mask.clones}
    for name, ts in times.items():
        med = statistics.median(ts)
        print(json.dumps({
            **info, "variant": name, "step_time_s": med, "times": [round(t, 3) for t in ts],
            "slower_than_baseline_s": med - base, "ratio": med / base,
        }))  # fmt: skip
    print(json.dumps({
        **info, **part_seconds(state, cfg), "mask_generation_s": mask_seconds(cfg, args.batch),
        "threads": threads, "torch": torch.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
