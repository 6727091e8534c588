"""A start-up check of data2vec's Triton kernels against the PyTorch ops, on the run's own
model and first batch.

The kernels (the decoder's convolution, the blocks' fused norms, the MLP's backward, the
short-sequence attention, the loss) are tested against the PyTorch ops on the CPU, under
Triton's interpreter, which runs each loop in program order. On a GPU the compiler pipelines
those loops, and that step can go wrong where the interpreter cannot show it: Triton 3.6 once
refilled a shared-memory buffer before a conditional product had read it, and the decoder's
bias gradient came out 25 % off on an H200 while the loss agreed to the last bit
(``benchmarks/README.md``, "GPU, tenth pass"). Nothing in a run's loss curve would show that.

So before the first step, on the first :data:`SAMPLES` samples of the first batch, one forward
and backward pass runs three times, each with the same random numbers:

1. the reference: float32, the torch ops, TF32 off;
2. the torch ops in the run's precision;
3. the Triton kernels in the run's precision (the fused norms at any size, so that they run
   on a few samples as they would on the whole batch).

Each parameter's gradient, and the loss, must be as close to the reference with the kernels
as twice the torch ops' own distance plus :data:`TOLERANCE` (relative L2 distances), and the
kernels must run at all (one that does not compile or launch on this GPU fails the check, not
the run). Where one is not, the third pass runs again once for each kind of layer
(``token_conv.KINDS``: decoder, norms, MLP, attention, loss) with only that kind on its
kernels, which finds the kinds that are wrong on their own. A warning names the gradient and
those kinds, and they take the torch ops for the rest of the process
(:func:`data2vec.nn.token_conv.disable`): slower, but right. Where no kind fails on its own,
every kind does. The check costs three passes on a few samples (up to five more where it
fails) and the kernels' compilation for those shapes (seconds on a GPU);
``train.kernel_check=false`` skips it (fine-tuning, which checks its task loss the same way:
``kernel_check=false``). Without a kernel to check (the CPU, an older GPU, no Triton) it does
nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from data2vec.data.batch import PretrainBatch
from data2vec.engine import distributed
from data2vec.engine.runtime import autocast
from data2vec.nn import token_conv, token_norm

log = logging.getLogger(__name__)

# Added to twice the torch ops' distance. In bf16 autocast (tiny image model, two samples x 16
# clones, on the CPU) the torch ops' own gradients were 0.6 % from float32 for the median
# parameter and up to 15 % (the CLS token); the wrong bias gradient above was 25 % off.
TOLERANCE = 0.02
SAMPLES = 2  # enough rows for every kernel's loop to run several steps (weight gradient: >= 8)
SEED = 0


@dataclass
class KernelCheck:
    """What :func:`check_kernels` found.

    Attributes:
        passed: every gradient and the loss were within their allowance.
        worst: the parameter (or ``"loss"``) furthest past its allowance, or nearest to it.
        triton_error: its relative L2 distance from the float32 reference, with the kernels.
        torch_error: the same with the torch ops in the run's precision.
        failed: everything past its allowance.
        seconds: how long the check took.
        error: why the pass with the kernels did not finish (a kernel that does not compile
            or launch on this GPU), or None.
        culprits: where it failed, the kinds of layer (``token_conv.KINDS``) that fail with
            only their own kernels on.
    """

    passed: bool
    worst: str
    triton_error: float
    torch_error: float
    failed: list[str]
    seconds: float = 0.0
    error: str | None = None
    culprits: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def kernels_run_on(device: torch.device) -> bool:
    """Whether any Triton kernel can run on ``device`` in this process."""
    on = [k for k in token_conv.KINDS if not token_conv.is_suspended(k)]
    return bool(on) and token_conv.available(torch.empty(0, device=device))


def checks_compiled_models() -> bool:
    """Whether the check can run a ``torch.compile``-d model's passes eagerly here (PyTorch 2.6
    and later: ``torch.compiler.set_stance``)."""
    return hasattr(torch.compiler, "set_stance")


def uncompiled() -> contextlib.AbstractContextManager:
    """Compiled modules run eagerly inside: the check's few samples must not compile graphs
    for their own shapes (a recompilation per check, after which dynamo may make the run's
    own graph dynamic). Run eagerly, the compiled blocks take the kernels, which the run then
    leaves to inductor's code; the decoder and the loss run uncompiled in the run too
    (``data2vec/compile.py``), so their check is the run's."""
    if not checks_compiled_models():
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def check_kernels(
    model: nn.Module, run: Callable[[], Tensor], device: torch.device, precision: str
) -> KernelCheck:
    """Compare the gradients of ``run()`` (a scalar loss of ``model``) with the kernels and
    with the torch ops, each against float32; see the module's docstring.

    ``model``'s gradients, the random number generators and the TF32 settings are as before
    afterwards; the kernels stay as they were (the caller decides what a failure means).
    """
    start = time.perf_counter()
    kept = [(p, p.grad) for p in model.parameters()]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    # No collectives inside (distributed.rank_local): under torchrun, only the ranks whose
    # check fails run its extra passes.
    try:
        with distributed.rank_local(), uncompiled():
            with token_conv.suspended():
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
                ref = _gradients(model, run, device, "fp32")
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
                torch_err = _distances(ref, _gradients(model, run, device, precision))
            found = _kernel_pass(model, run, device, precision, ref, torch_err)
            if not found.passed:
                found.culprits = [
                    kind
                    for kind in token_conv.KINDS
                    if not token_conv.is_suspended(kind)
                    and not _kernel_pass(model, run, device, precision, ref, torch_err, kind).passed
                ]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for p, grad in kept:
            p.grad = grad
    found.seconds = time.perf_counter() - start
    return found


def _kernel_pass(
    model: nn.Module,
    run: Callable[[], Tensor],
    device: torch.device,
    precision: str,
    ref: dict[str, Tensor],
    torch_err: dict[str, float],
    kind: str | None = None,
) -> KernelCheck:
    """The pass with the kernels (only ``kind``'s where given) judged against ``ref`` with
    the allowance that ``torch_err`` gives."""
    only = token_conv.only(kind) if kind is not None else contextlib.nullcontext()
    try:
        with only, _norms_at_any_size():
            triton_err = _distances(ref, _gradients(model, run, device, precision))
    except Exception as exc:  # a kernel that cannot run here fails the check
        lines = str(exc).strip().splitlines() or [""]
        return KernelCheck(
            passed=False,
            worst="(the kernels did not run)",
            triton_error=math.nan,
            torch_error=0.0,
            failed=[],
            error=f"{type(exc).__name__}: {lines[0][:300]}",
        )
    # how far past its allowance each one is (NaN, from a non-finite gradient, counts as past)
    excess = {}
    for name, err in triton_err.items():
        over = err - (2 * torch_err[name] + TOLERANCE)
        excess[name] = math.inf if math.isnan(over) else over
    worst = max(excess, key=excess.__getitem__)
    return KernelCheck(
        passed=all(v <= 0 for v in excess.values()),
        worst=worst,
        triton_error=triton_err[worst],
        torch_error=torch_err[worst],
        failed=[name for name, v in excess.items() if v > 0],
    )


def check_pretraining(
    model: nn.Module, batch: PretrainBatch, device: torch.device, precision: str
) -> KernelCheck | None:
    """:func:`check_kernels` on a pretraining model's loss over the first :data:`SAMPLES`
    samples of ``batch`` (None where no kernel runs on ``device``)."""
    if not kernels_run_on(device):
        return None
    n = min(len(batch), SAMPLES)
    clones = batch.mask.shape[0] // len(batch)  # the mask's rows are sample-major
    source = batch.source[:n].to(device)
    mask = batch.mask[: n * clones]
    pad = None if batch.padding_mask is None else batch.padding_mask[:n].to(device)
    extra = {} if batch.modality is None else {"modality": batch.modality}
    model.train()
    return check_kernels(model, lambda: model(source, mask, pad, **extra).loss, device, precision)


def kinds_to_disable(found: KernelCheck | None) -> list[str]:
    """The kinds of layer a check turns off: its culprits, or every kind where it failed
    without one (none where it passed or did not run)."""
    if found is None or found.passed:
        return []
    return found.culprits or list(token_conv.KINDS)


def act_on(found: KernelCheck | None, off: list[str]) -> dict[str, Any] | None:
    """Act on a check's result: turn ``off`` (:func:`kinds_to_disable` of this check, or, for
    ``torchrun``, of any rank's) onto the torch ops for the rest of the process and warn, or
    log a pass. Returns what to record (None where nothing was checked)."""
    if found is None and not off:
        return None
    if off:
        where = "on another rank"
        if found is not None and found.error is not None:
            where = f"a kernel failed: {found.error}"
        elif found is not None and not found.passed:
            where = (
                f"gradient of {found.worst} {found.triton_error:.2%} from float32 with the "
                f"kernels, {found.torch_error:.2%} with the torch ops"
            )
        token_conv.disable(f"the start-up kernel check failed: {where}", off)
        log.warning(
            "the Triton kernels disagree with the PyTorch ops on this device (%s): layers of "
            "kind %s take the PyTorch ops in this run (slower). Please report it with the "
            "output of `python benchmarks/gpu_check.py --batch --mlp --attention --loss`.",
            where,
            ", ".join(off),
        )
    elif found is not None:
        log.info(
            "Triton kernels checked against the PyTorch ops in %.1fs (closest to its limit: "
            "%s, %.2g from float32 against %.2g)",
            found.seconds,
            found.worst,
            found.triton_error,
            found.torch_error,
        )
    summary = found.summary() if found is not None else {}
    return summary | {"kernels_off": off}


def _gradients(
    model: nn.Module, run: Callable[[], Tensor], device: torch.device, precision: str
) -> dict[str, Tensor]:
    """The loss (as ``"loss"``) and every parameter's gradient (float32 copies) of one
    forward and backward pass of ``run`` in ``precision``, with the random numbers of
    :data:`SEED` (the caller's generators are left as they were)."""
    for p in model.parameters():
        p.grad = None
    gpus = []
    if device.type == "cuda":
        gpus = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(SEED)
        with autocast(device, precision):
            loss = run()
        loss.backward()
    named = model.named_parameters()
    out = {n: p.grad.detach().float().clone() for n, p in named if p.grad is not None}
    out["loss"] = loss.detach().float()
    for p in model.parameters():
        p.grad = None
    return out


def _distances(ref: dict[str, Tensor], got: dict[str, Tensor]) -> dict[str, float]:
    """Relative L2 distance of each of ``got`` from ``ref`` (1.0 where ``got`` lacks one), read
    from the device at once."""
    tiny = torch.finfo(torch.float32).tiny
    dists = [
        (got[name] - r).norm() / r.norm().clamp_min(tiny)
        if name in got
        else torch.ones((), device=r.device)
        for name, r in ref.items()
    ]
    return dict(zip(ref, torch.stack(dists).tolist()))


@contextlib.contextmanager
def _norms_at_any_size() -> Iterator[None]:
    """The blocks' fused norms (``model.norm_impl=auto``) on any number of tokens, not only
    from ``token_norm.MIN_ROWS`` on."""
    before, token_norm.MIN_ROWS = token_norm.MIN_ROWS, 0
    try:
        yield
    finally:
        token_norm.MIN_ROWS = before
