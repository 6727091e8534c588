"""GPU check: image-v2-base bf16 throughput and MFU on CUDA, and CUDA-vs-CPU agreement.

Prints one JSON object. Without a CUDA device it says so in that object and exits 0, so the
script can sit in any checklist.

1. **Agreement** (tiny image model, fp32, TF32 off): the same weights, input, masks and decoder
   noise on the CPU and on the GPU; loss, targets and every gradient are compared. Passes
   when the loss agrees to 1e-4 (relative) and the worst gradient to 1e-3 (relative to the
   gradient's own scale).
2. **Throughput**: ``data2vec bench`` of image-v2-base in bf16 autocast for each ``--batch``
   (FLOPs from ``torch.utils.flop_counter``, MFU against the measured bf16 matmul peak of the
   same GPU), plus the peak GPU memory.
3. **Profile** (``--profile``): the top CUDA kernels of a few steps at the last batch size.

python benchmarks/gpu_check.py [--batch 32 128] [--steps 10] [--profile]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from data2vec.bench import bench, matmul_peak_flops
from data2vec.config import load_config
from data2vec.masking import inverse_block_mask, make_rng
from data2vec.models.registry import build_model

TINY = [
    "model.embed_dim=192",
    "model.depth=4",
    "model.num_heads=3",
    "encoder.prenet_depth=2",
    "decoder.dim=192",
    "mask.clones=4",
    "target.top_k=4",
]


def _forward_backward(model, x, mask, noise) -> dict[str, Any]:
    model.zero_grad(set_to_none=True)
    out = model(x, mask, None, noise)
    out.loss.backward()
    return {
        "loss": out.loss.detach().double().cpu(),
        "grads": {
            n: p.grad.detach().double().cpu()
            for n, p in model.named_parameters()
            if p.grad is not None
        },
    }


def agreement(device: torch.device, batch: int = 4, seed: int = 0) -> dict[str, Any]:
    """Loss and gradient differences of one fp32 step of a tiny model, CPU vs ``device``."""
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    torch.backends.cudnn.allow_tf32 = False
    cfg = load_config("image-v2-base", TINY)
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    size, grid = cfg.encoder.image_size, cfg.encoder.image_size // cfg.encoder.patch_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    rows = batch * cfg.mask.clones
    mask = torch.from_numpy(inverse_block_mask(grid, grid, rows, cfg.mask.ratio, make_rng(seed)))
    noise = 0.01 * torch.randn(int(mask.sum()), cfg.model.embed_dim)
    cpu = _forward_backward(model, x, mask, noise)
    model.to(device)
    gpu = _forward_backward(model, x.to(device), mask.to(device), noise.to(device))
    loss_rel = float(abs(gpu["loss"] - cpu["loss"]) / abs(cpu["loss"]))
    worst_name, worst = "", 0.0
    for name, g in cpu["grads"].items():
        rel = float((gpu["grads"][name] - g).abs().max() / g.abs().max().clamp_min(1e-12))
        if rel > worst:
            worst_name, worst = name, rel
    return {
        "loss_cpu": float(cpu["loss"]),
        "loss_cuda": float(gpu["loss"]),
        "loss_rel_diff": loss_rel,
        "grad_max_rel_diff": worst,
        "grad_worst_param": worst_name,
        "pass": loss_rel < 1e-4 and worst < 1e-3,
    }


def throughput(batch: int, steps: int) -> dict[str, Any]:
    """``data2vec bench`` of image-v2-base in bf16 on CUDA, with the peak GPU memory."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    r = bench("image-v2-base", batch=batch, steps=steps, warmup=2, precision="bf16",
              overrides=["train.device=cuda"])  # fmt: skip
    r["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return r


def profile(batch: int, steps: int = 3, top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` CUDA kernels by total time over ``steps`` bench steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        bench("image-v2-base", batch=batch, steps=steps, warmup=1, precision="bf16",
              overrides=["train.device=cuda"])  # fmt: skip
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events) or 1.0
    return [
        {"kernel": e.key[:90], "share": e.self_device_time_total / total, "calls": e.count}
        for e in events[:top]
    ]


_SHOW = ("batch", "step_time_s", "mfu", "peak_gpu_memory_gb", "error")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="top kernels of the last setting")
    args = p.parse_args()
    result: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        result["message"] = "no CUDA device: nothing to measure (run this on a GPU machine)"
        print(json.dumps(result))
        return
    device = torch.device("cuda")
    result["device"] = torch.cuda.get_device_name(device)
    start = time.perf_counter()
    result["agreement"] = agreement(device)
    torch.backends.cuda.matmul.allow_tf32 = True  # throughput runs as users would
    result["bf16_matmul_peak_flops"] = matmul_peak_flops(torch.bfloat16, device, n=8192)
    result["throughput"] = []
    for batch in args.batch:
        try:
            r = throughput(batch, args.steps)
        except torch.OutOfMemoryError as exc:  # report and keep the other sizes
            r = {"batch": batch, "error": str(exc).splitlines()[0]}
            torch.cuda.empty_cache()
        result["throughput"].append(r)
        print(json.dumps({k: r.get(k) for k in _SHOW}), file=sys.stderr, flush=True)
    if args.profile:
        result["profile"] = profile(args.batch[-1])
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result))
    sys.exit(0 if result["agreement"]["pass"] else 1)


if __name__ == "__main__":
    main()
