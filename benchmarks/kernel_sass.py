"""What the Triton kernels of an image-v2-base step compile to, on a machine without a GPU.

Triton compiles for a CUDA architecture ahead of time anywhere: its wheel brings ``ptxas``,
``nvdisasm`` and ``cuobjdump``. So the machine code of a kernel can be read where no GPU is
lent: registers, shared memory, spills (local memory), the instruction mix, and how global
memory is read (128-bit vectors or narrower; ``cp.async`` copies into shared memory, which is
what Triton's pipeliner emits for a loop it pipelines). Static counts say nothing about speed
directly; they do say whether a kernel compiled to the structure meant (benchmarks/README.md,
"GPU, seventh pass").

The kernels are compiled exactly as their launchers would launch them, under the settings
tables of the moment: a launcher runs on ``meta`` tensors of image-v2-base's shapes at batch
128 (the decoder convolution: 2048 x 196 positions, 768 channels in 16 groups, 3x3, under each
forward setting asked for; the blocks' norms, MLP backward and attention: 2048 x 40 tokens;
the decoder layers' row kernels: 2048 x 196 rows), with the kernel replaced by a recorder of
its arguments; the recorded arguments are then compiled, pointers 16-byte aligned and integers
that are multiples of 16 marked so, as Triton's launcher specializes them on a GPU. Each loop's
body is reported on its own (a loop's instructions are issued once per iteration).

    python benchmarks/kernel_sass.py [--arch 90] [--settings default pipelined ...] [--no-blocks]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from data2vec.nn import (
    token_attention,
    token_conv,
    token_conv_kernels,
    token_layer,
    token_loss,
    token_mlp,
    token_norm,
)
from data2vec.nn.triton_gate import triton

sys.path.insert(0, str(Path(__file__).parent))
from gpu_kernels import settings  # a sibling script module

# The forward kernel's settings to compile (token_conv.FORWARD values over the defaults).
SETTINGS: dict[str, dict[str, int]] = {
    "default": {},
    "unrolled": {"PIPELINE": 0, "SWAP_AB": 0},
    "pipelined": {"PIPELINE": 1, "SWAP_AB": 0},
    "swapped": {"PIPELINE": 0, "SWAP_AB": 1},
    "pipelined swapped": {"PIPELINE": 1, "SWAP_AB": 1},
}

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64"}
_CLASSES = {  # SASS opcodes, by what they do
    "tensor_core": ("HGMMA", "HMMA"),
    "async_copy": ("LDGSTS",),
    "global_load": ("LDG",),
    "global_store": ("STG",),
    "shared": ("LDS", "STS", "LDSM"),
    "float": ("FADD", "FMUL", "FFMA", "FSEL", "FSETP", "FMNMX", "MUFU", "F2FP", "F2F"),
    "integer": ("IMAD", "IADD3", "LOP3", "ISETP", "SHF", "LEA", "IABS", "SEL", "VIADD", "PRMT",
                "SGXT", "PLOP3", "P2R", "IMNMX", "VIADDMNMX"),
    "barrier": ("BAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "MEMBAR", "FENCE", "ARRIVES",
                "SYNCS"),
}  # fmt: skip


# "/*0120*/   @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;": the opcode and its modifiers
_INSTRUCTION = re.compile(
    r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)"
)


# ".L_x_3:" (a branch target) and "BRA `(.L_x_3)"
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")
# Triton GPU IR: a matrix product, or a read of shared memory into registers
_TILE_READ = re.compile(r"\b(tt\.dot|ttng\.warp_group_dot|ttg\.local_load)\b")


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the
    arguments instead of launching."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@contextlib.contextmanager
def _recording(module: Any, name: str) -> Iterator[_Recorder]:
    """``module.name`` (a kernel) replaced by a :class:`_Recorder` for the block."""
    recorder, kernel = _Recorder(), getattr(module, name)
    setattr(module, name, recorder)
    try:
        yield recorder
    finally:
        setattr(module, name, kernel)


def record(module: Any, name: str, run: Callable[[], Any]) -> tuple[Any, tuple, dict]:
    """``(kernel, args, kwargs)`` of the one launch of ``module.name`` that ``run()`` makes."""
    with _recording(module, name) as recorder:
        run()
    ((args, kwargs),) = recorder.calls
    return getattr(module, name), args, kwargs


def launches(batch: int = 128, clones: int = 16) -> dict[str, tuple[Any, tuple, dict]]:
    """The decoder convolution's launches at image-v2-base's shapes, ``{name: (kernel, args,
    kwargs)}``: the forward (of a bf16 input, and of the float32 input of the decoder's first
    layer), the input gradient (float32, the residual's gradient added, as a decoder layer's
    backward asks for it) and the weight and bias gradients. (On ``meta`` tensors the weight
    gradient splits its rows as for a 2-multiprocessor device: a longer loop, the same loop
    body, which is what the counts describe.)"""
    M, C, G, hw = batch * clones * 196, 768, 16, (14, 14)
    meta = {"device": "meta", "dtype": torch.bfloat16}
    x, x32, gy = (
        torch.empty(M, C, **meta),
        torch.empty(M, C, device="meta"),
        torch.empty(M, C, **meta),
    )
    weight = torch.empty(C, C // G, 3, 3, **meta)
    bias = torch.empty(C, device="meta")
    w_t = token_conv.forward_weight(weight, G)
    runs = {
        "forward": lambda: token_conv.conv_tokens_forward(x, w_t, bias, hw, C),
        "forward, float32 input": lambda: token_conv.conv_tokens_forward(x32, w_t, bias, hw, C),
        "input gradient": lambda: token_conv.conv_tokens_forward(
            gy,
            token_conv.input_grad_weight(weight, G),
            None,
            hw,
            C,
            out_dtype=torch.float32,
            add=x32,
        ),
        "weight gradient": lambda: token_conv.conv_tokens_grads(
            x, gy, hw, (G, 3, 3, C // G, C // G), bias=True
        ),
    }
    return {
        name: record(
            token_conv_kernels, "wgrad_kernel" if name == "weight gradient" else "conv_kernel", run
        )
        for name, run in runs.items()
    }


def block_launches(batch: int = 128, clones: int = 16) -> dict[str, tuple[Any, tuple, dict]]:
    """The image-v2-base student blocks' Triton launches at batch 128 (``batch * clones``
    sequences of 40 visible tokens, 768 wide, 12 heads): the fused norm's forward and backward,
    the MLP's fused backward over the 3072-wide hidden layer, and the short-sequence attention's
    forward and backward, each recorded through its module's own entry point; and the
    decoder layers' row kernels (``batch * clones * 196`` rows of 768: LayerNorm, GELU and the
    residual, forward and backward), as ``token_layer`` launches them."""
    B, T, C, H = batch * clones, 40, 768, 12
    M = B * T
    bf16 = {"device": "meta", "dtype": torch.bfloat16}
    f32 = {"device": "meta", "dtype": torch.float32}
    weight, bias = torch.empty(C, **f32), torch.empty(C, **f32)
    norm_ctx = SimpleNamespace(saved_tensors=(torch.empty(M, C, **f32), weight), eps=1e-6,
                               a_dtype=torch.bfloat16)  # fmt: skip
    qkv = torch.empty(B, T, 3 * C, **bf16)

    def norm_forward() -> None:
        x, a = torch.empty(M, C, **f32), torch.empty(M, C, **bf16)
        token_norm._forward(x, a, weight, bias, 1e-6, torch.bfloat16, save_z=True)

    def norm_backward() -> None:
        gy, glow = torch.empty(M, C, **f32), torch.empty(M, C, **bf16)
        token_norm._AddLayerNorm.backward(norm_ctx, gy, glow)

    def mlp_backward() -> None:
        token_mlp.gelu_grad(torch.empty(M, 4 * C, **bf16), torch.empty(M, 4 * C, **bf16))

    def attention_forward() -> None:
        token_attention._forward(qkv, H, save_lse=True)

    def attention_backward() -> None:  # as a training step runs it: the bias sums included
        token_attention._backward(qkv, torch.empty(B, T, C, **bf16), torch.empty(B, T, C, **bf16),
                                  torch.empty(B * H, T, **f32), H, 0.125, sums=True)  # fmt: skip

    rows = batch * clones * 196
    y, grid_blocks = torch.empty(rows, C, **bf16), token_layer.split_launch(rows, C)

    def rows_forward() -> None:
        token_layer._forward_kernel[grid_blocks[0]](
            y, torch.empty(rows, C, **f32), torch.empty(rows, C, **f32), torch.empty_like(y),
            rows, 1e-5, C=C, HAS_RES=True, HAS_LOW=True, **grid_blocks[1],
        )  # fmt: skip

    def rows_backward() -> None:
        token_layer._backward_kernel[grid_blocks[0]](
            y, torch.empty(rows, C, **f32), torch.empty_like(y), rows, 1e-5, C=C, **grid_blocks[1]
        )  # fmt: skip

    # the loss's 321536 masked rows (16 clones x 157 of 196 patches) against the (B·196, 768)
    # table of targets
    loss_rows = batch * clones * 157
    pred, table = torch.empty(loss_rows, C, **bf16), torch.empty(batch * 196, C, **f32)
    index = torch.empty(loss_rows, device="meta", dtype=torch.int64)

    def loss_forward() -> None:
        token_loss._GatheredSquaredError.forward(SimpleNamespace(save_for_backward=lambda *t: None),
                                                 pred, table, index)  # fmt: skip

    def loss_backward() -> None:
        loss_ctx = SimpleNamespace(saved_tensors=(pred, table, index))
        token_loss._GatheredSquaredError.backward(loss_ctx, torch.empty((), **f32))

    runs = {
        "norm forward": (token_norm, "_add_norm_forward", norm_forward),
        "norm backward": (token_norm, "_add_norm_backward", norm_backward),
        "mlp backward": (token_mlp, "_gelu_grad_kernel", mlp_backward),
        "attention forward": (token_attention, "_attention_forward", attention_forward),
        "attention backward": (token_attention, "_attention_backward", attention_backward),
        "decoder rows forward": (token_layer, "_forward_kernel", rows_forward),
        "decoder rows backward": (token_layer, "_backward_kernel", rows_backward),
        "loss forward": (token_loss, "_squared_error_forward", loss_forward),
        "loss backward": (token_loss, "_squared_error_backward", loss_backward),
    }
    return {name: record(module, kernel, run) for name, (module, kernel, run) in runs.items()}


def compile_launch(kernel: Any, args: tuple, kwargs: dict, arch: int = 90) -> Any:
    """Compile one recorded launch for ``sm_<arch>`` (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    signature, attrs = {}, {}
    for i, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # CUDA allocations are 256-byte aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in kwargs})
    source = ASTSource(fn=kernel, signature=signature, constexprs=kwargs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def conditional_tile_reads(ttgir: str) -> int:
    """Matrix products (``tt.dot``, ``ttng.warp_group_dot``) and reads of shared memory
    (``ttg.local_load``) under an ``scf.if`` inside an ``scf.for`` of a kernel's Triton GPU IR.

    Triton 3.6's pipeliner leaves such a product out when it decides how long a loaded tile
    must stay in shared memory, and can overwrite the tile while the product reads it: the
    decoder convolution's bias sums under a run-time ``if`` came out wrong on an H200
    (benchmarks/README.md, "GPU, tenth pass"). The IR nests regions one per line: an opening
    line ends with ``{``, a closing one starts with ``}`` (``} else {`` does both).
    """
    stack: list[str] = []
    count = 0
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            stack.pop()
        if text.endswith("{"):
            stack.append("for" if "scf.for" in text else "if" if "scf.if" in text or
                         text.startswith("} else") else "other")  # fmt: skip
        elif _TILE_READ.search(text) and "for" in stack:
            count += "if" in stack[stack.index("for") :]
    return count


def sass_stats(compiled: Any) -> dict[str, Any]:
    """Registers, shared and local memory, the instruction mix of a compiled kernel, and the
    instruction mix of each of its loops' bodies."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
    ops: collections.Counter[str] = collections.Counter()
    memory: collections.Counter[str] = collections.Counter()
    sequence: list[str] = []  # opcodes in program order
    labels: dict[str, int] = {}  # label -> index of the next instruction
    loops: list[dict[str, Any]] = []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(sequence)
            continue
        m = _INSTRUCTION.match(line)
        if m:
            ops[m.group(1)] += 1
            if m.group(1) in ("LDG", "LDGSTS", "STG"):
                memory[m.group(1) + m.group(2)] += 1
            sequence.append(m.group(1))
            target = _BRANCH.search(line) if m.group(1) == "BRA" else None
            if target and target.group(1) in labels:  # a branch back: a loop's last instruction
                body = sequence[labels[target.group(1)] :]
                if body != ["BRA"]:  # (not the branch to itself that ends every kernel)
                    counts = dict(collections.Counter(body))
                    loops.append({"instructions": len(body), "ops": counts})
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "shared_bytes": compiled.metadata.shared,
        "local_bytes": int(local.group(1)) if local else None,  # > 0: registers spilled
        "instructions": sum(ops.values()),
        "by_class": {
            name: sum(n for op, n in ops.items() if op in opcodes)
            for name, opcodes in _CLASSES.items()
        },
        "global_memory": dict(memory),
        "loops": loops,  # each loop's body (from its label to the branch back), in code order
        "conditional_tile_reads": conditional_tile_reads(compiled.asm["ttgir"]),
    }


def report(names: list[str], arch: int = 90, blocks: bool = False) -> dict[str, Any]:
    """:func:`sass_stats` of each convolution launch under each forward setting in ``names``,
    and with ``blocks`` of the blocks' launches (:func:`block_launches`)."""
    out: dict[str, Any] = {"triton": triton.__version__, "arch": f"sm_{arch}", "settings": {}}
    if blocks:
        out["blocks"] = {
            name: sass_stats(compile_launch(kernel, args, kwargs, arch))
            for name, (kernel, args, kwargs) in block_launches().items()
        }
    for name in names:
        with settings(token_conv.FORWARD, **SETTINGS[name]):
            out["settings"][name] = {
                "forward_settings": dict(token_conv.FORWARD),
                **{
                    launch: sass_stats(compile_launch(kernel, args, kwargs, arch))
                    for launch, (kernel, args, kwargs) in launches().items()
                },
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--no-blocks", action="store_true", help="the convolution's kernels only")
    args = p.parse_args()
    if triton is None or token_conv.interpreting():
        sys.exit("kernel_sass.py needs a Triton the kernels support, and TRITON_INTERPRET unset")
    print(json.dumps(report(args.settings, args.arch, blocks=not args.no_blocks), indent=1))


if __name__ == "__main__":
    main()
