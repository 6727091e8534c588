"""``benchmarks/kernel_sass.py``: the Triton kernels of an image-v2-base step compiled for an
H100 (sm_90) on this machine, which has no GPU, and read back as machine code."""

import sys

import pytest

from data2vec.nn import token_conv, token_conv_kernels, triton_gate
from tests.conftest import benchmark_module


@pytest.fixture(scope="module")
def sass():
    with benchmark_module("kernel_sass") as module:
        yield module


@pytest.fixture(scope="module")
def report(sass, tmp_path_factory):
    if triton_gate.triton is None:
        return None
    # Triton caches what it compiles; a directory of the test's own, wherever HOME points
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton_cache")))
        return sass.report(["unrolled", "pipelined"], blocks=True)


def test_launches_are_recorded_as_the_launchers_make_them_and_the_kernels_restored(
    sass, monkeypatch
):
    if triton_gate.triton is None:  # an older Triton: no kernels to compile, and it says so
        monkeypatch.setattr(sys, "argv", ["kernel_sass.py"])
        with pytest.raises(SystemExit, match="needs a Triton"):
            sass.main()
        return
    kernel = token_conv_kernels.conv_kernel
    launches = sass.launches()
    assert token_conv_kernels.conv_kernel is kernel  # the recorder is gone
    fn, args, kwargs = launches["forward"]
    assert fn is kernel and args[5] == 2048 * 196  # M: image-v2-base at batch 128
    assert kwargs["PIPE"] == bool(token_conv.FORWARD["PIPELINE"])
    assert kwargs["num_warps"] == token_conv.FORWARD["num_warps"]
    assert launches["weight gradient"][0] is token_conv_kernels.wgrad_kernel
    assert launches["forward, float32 input"][1][0].dtype.itemsize == 4


def test_only_the_pipelined_loop_copies_asynchronously(report):
    if report is None:
        pytest.skip("Triton < 3.2: the kernels are not defined (see the test above)")
    unrolled, pipelined = report["settings"]["unrolled"], report["settings"]["pipelined"]
    for launch in ("forward", "forward, float32 input", "input gradient"):
        assert unrolled[launch]["by_class"]["async_copy"] == 0, launch
        assert pipelined[launch]["by_class"]["async_copy"] > 0, launch
        # the loop body holds one step's products; unrolled, every step's are in the code
        products = pipelined[launch]["by_class"]["tensor_core"]
        assert products > 0
        assert products < unrolled[launch]["by_class"]["tensor_core"]
    # the weight gradient's loop is pipelined either way (the setting is the forward's)
    assert unrolled["weight gradient"] == pipelined["weight gradient"]
    assert unrolled["weight gradient"]["by_class"]["async_copy"] > 0


def test_the_pipelined_copies_are_whole_16_byte_vectors(report):
    """Pipelined, the activations and weights come into shared memory as 16-byte copies
    (``LDGSTS.E.BYPASS.128``, cp.async.cg). An opt-in for 8-byte copies through L1 (eighth
    pass) made the whole step 5-12 % slower on an H200 and is gone ("GPU, tenth pass")."""
    if report is None:
        pytest.skip("Triton < 3.2: the kernels are not defined (see the first test)")
    pipelined = report["settings"]["pipelined"]
    for launch in ("forward", "forward, float32 input", "input gradient"):
        copies = {k: n for k, n in pipelined[launch]["global_memory"].items() if "LDGSTS" in k}
        assert set(copies) == {"LDGSTS.E.BYPASS.128"}, (launch, copies)


def test_the_weight_gradient_loop_sums_on_the_tensor_cores_and_divides_by_constants(report):
    """Each iteration of the weight gradient's loop adds its tile's bias sums by a product with
    a column of ones, not by sums across threads (shuffles), and finds the image positions of
    its rows without dividing by a value known only at run time (``IABS``/``MUFU.RCP`` are
    the signs of one), since a 2-D grid is compiled in."""
    if report is None:
        pytest.skip("Triton < 3.2: the kernels are not defined (see the first test)")
    (loop,) = report["settings"]["unrolled"]["weight gradient"]["loops"]
    ops = loop["ops"]
    assert ops.get("HGMMA", 0) > 0 and ops.get("LDGSTS", 0) > 0, ops  # the products, the copies
    assert ops.get("SHFL", 0) == 0, ops
    assert ops.get("IABS", 0) == 0 and ops.get("MUFU", 0) == 0, ops


def test_decoder_rows_split_in_two_tiles_run_fewer_instructions(sass, monkeypatch, tmp_path):
    """768 channels as tiles of 512 and 256 rather than one of 1024: the lanes that worked on
    the padding columns are gone, in both row kernels (the backward is bound by issuing
    instructions on an H100)."""
    if triton_gate.triton is None:
        pytest.skip("Triton < 3.2: the kernels are not defined (see the first test)")
    from data2vec.nn import token_layer

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # not under HOME
    counts = {}
    for split in (False, True):
        monkeypatch.setattr(token_layer, "SPLIT_ROWS", split)
        launches = sass.block_launches()
        for name in ("decoder rows forward", "decoder rows backward"):
            kernel, args, kwargs = launches[name]
            assert kwargs["BLOCK_B"] == (256 if split else 0)
            stats = sass.sass_stats(sass.compile_launch(kernel, args, kwargs))
            assert stats["local_bytes"] == 0
            counts[split, name] = stats["instructions"]
    for name in ("decoder rows forward", "decoder rows backward"):
        assert counts[True, name] < 0.85 * counts[False, name], counts


def test_register_caps_reach_the_compiled_kernels_without_spills(sass, monkeypatch, tmp_path):
    """``maxnreg`` settings reach the launches (none is passed while they are 0, so a Triton
    without the option is never asked for it) and compile to at most that many registers,
    without spilling, for the kernels whose occupancy they are meant to raise."""
    if triton_gate.triton is None:
        pytest.skip("Triton < 3.2: the kernels are not defined (see the first test)")
    from data2vec.nn import token_attention, token_norm

    forward = sass.launches()["forward"]
    assert "maxnreg" not in forward[2]
    monkeypatch.setitem(token_conv.FORWARD, "maxnreg", 128)
    monkeypatch.setattr(token_norm, "BACKWARD_MAXNREG", 128)
    monkeypatch.setattr(token_attention, "BACKWARD_MAXNREG", 128)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # not under HOME
    conv, blocks = sass.launches(), sass.block_launches()
    capped = [conv["forward"], conv["input gradient"], blocks["norm backward"],
              blocks["attention backward"]]  # fmt: skip
    for kernel, args, kwargs in capped:
        assert kwargs["maxnreg"] == 128
        stats = sass.sass_stats(sass.compile_launch(kernel, args, kwargs))
        assert stats["registers"] <= 128 and stats["local_bytes"] == 0, (kernel, stats)


def test_the_input_gradient_reads_whole_16_byte_vectors_and_nothing_spills(report):
    if report is None:
        pytest.skip("Triton < 3.2: the kernels are not defined (see the test above)")
    for setting in report["settings"].values():
        reads = {k: n for k, n in setting["input gradient"]["global_memory"].items()
                 if k.startswith("LDG")}  # fmt: skip
        assert reads and all(k.endswith(".128") for k in reads), reads
        for launch, stats in setting.items():
            if launch != "forward_settings":
                assert stats["local_bytes"] == 0, launch  # no registers spilled
                assert stats["registers"] <= 255


def test_the_blocks_kernels_move_whole_16_byte_vectors_and_nothing_spills(report):
    """The fused norms and the MLP's backward are bound by memory traffic: every access a
    128-bit vector. The attention reads and writes its float32 log-sum-exp rows narrower; the
    loss reads its row indices and writes its one partial sum narrower, and each row of the
    predictions (bf16), of the targets (float32) and of the gradient in 128-bit vectors."""
    if report is None:
        pytest.skip("Triton < 3.2: the kernels are not defined (see the first test)")
    blocks = report["blocks"]
    assert set(blocks) == {"norm forward", "norm backward", "mlp backward", "attention forward",
                           "attention backward", "decoder rows forward",
                           "decoder rows backward", "loss forward", "loss backward"}  # fmt: skip
    for name, stats in blocks.items():
        assert stats["local_bytes"] == 0, name
        accesses = stats["global_memory"]
        if name.startswith("loss"):
            # a 16 x 256 tile per step, 128 threads: 4 bf16 and 8 float32 vectors per thread
            loop_loads = [loop["ops"].get("LDG", 0) for loop in stats["loops"]]
            assert loop_loads == [12] and accesses.get("LDG.E.128", 0) >= 12, (name, accesses)
            stores = {k: n for k, n in accesses.items() if k.startswith("STG")}
            assert stores == ({"STG.E": 1} if name == "loss forward" else {"STG.E.128": 4})
        elif not name.startswith("attention"):
            assert accesses and all(k.endswith(".128") for k in accesses), (name, accesses)
        else:
            assert sum(n for k, n in accesses.items() if k.endswith(".128")) > 10, accesses


def test_the_gemm_experiment_runs_on_hoppers_tensor_cores_without_spills(
    sass, tmp_path, monkeypatch
):
    """``gpu_gemm.py``'s fused ``fc1`` + GELU at image-v2-base's batch-128 shapes, under its
    first setting: warpgroup products (``HGMMA``) fed by asynchronous copies, within the
    registers and shared memory of an H100, no spills."""
    if triton_gate.triton is None:
        pytest.skip("Triton < 3.2: the kernels are not defined (see the first test)")
    import torch

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with benchmark_module("gpu_gemm") as gpu_gemm:
        meta = {"device": "meta", "dtype": torch.bfloat16}
        x, w = torch.empty(81920, 768, **meta), torch.empty(3072, 768, **meta)
        config = gpu_gemm.CONFIGS[0]
        kernel, args, kwargs = sass.record(
            gpu_gemm, "_linear_gelu_kernel",
            lambda: gpu_gemm.linear_gelu(x, w, torch.empty(3072, **meta), config),
        )  # fmt: skip
        stats = sass.sass_stats(sass.compile_launch(kernel, args, kwargs))
    assert stats["local_bytes"] == 0 and stats["registers"] <= 255
    assert stats["shared_bytes"] <= 227 * 1024
    assert stats["by_class"]["tensor_core"] >= 12 and stats["by_class"]["async_copy"] > 0
    assert stats["global_memory"].get("STG.E.128", 0) > 0  # h and gelu(h) as 128-bit vectors


# The most shared memory one block may use on sm_86 and sm_89 (the CUDA C++ Programming Guide's
# table "Technical Specifications per Compute Capability": 99 KB; 8.0 163 KB, 9.0 227 KB).
SM86_SHARED_BYTES = 99 * 1024


def test_the_default_kernels_fit_every_gpu_auto_takes_them_on(sass, tmp_path, monkeypatch):
    """`decoder.conv_impl=auto` and the blocks' kernels run on every NVIDIA GPU of compute
    capability 8.0 or newer. A consumer Ampere or Ada card (sm_86, sm_89) gives a block less than
    half the shared memory of an H100, and a launch asking for more fails at the first step. So
    every kernel an image-v2-base step launches, under the default settings, compiles for sm_86
    within 99 KB, with no spills (sm_89 compiles to the same sizes, sm_80 allows more), and
    with no product or shared-memory read under a condition in a loop (see below)."""
    if triton_gate.triton is None:
        pytest.skip("Triton < 3.2: the kernels are not defined (see the first test)")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    out = sass.report(["default"], arch=86, blocks=True)
    assert out["arch"] == "sm_86"
    compiled = {**out["blocks"], **out["settings"]["default"]}
    compiled.pop("forward_settings")
    assert len(compiled) == 9 + 4  # the blocks' nine launches, the convolution's four
    for name, stats in compiled.items():
        assert 0 <= stats["shared_bytes"] <= SM86_SHARED_BYTES, (name, stats["shared_bytes"])
        assert stats["local_bytes"] == 0 and stats["registers"] <= 255, name
        assert stats["conditional_tile_reads"] == 0, name


def test_no_matrix_product_runs_under_a_condition_inside_a_loop(report):
    """Every launch of the step, under the forward settings compiled: no product or read of
    shared memory under an ``scf.if`` in a loop, which Triton's pipeliner mishandles (the
    decoder's bias gradient came out wrong on an H200 when its bias sums were taken under
    ``if kc == 0`` in the loop)."""
    if report is None:
        pytest.skip("Triton < 3.2: the kernels are not defined (see the first test)")
    launches = {f"blocks/{name}": stats for name, stats in report["blocks"].items()}
    for setting, stats in report["settings"].items():
        launches |= {f"{setting}/{k}": v for k, v in stats.items() if k != "forward_settings"}
    assert len(launches) > 10
    assert {k: v["conditional_tile_reads"] for k, v in launches.items()} == dict.fromkeys(
        launches, 0
    )


def test_conditional_tile_reads_are_found_in_compiled_ir(sass, monkeypatch, tmp_path):
    """The check above finds such a product: a loop whose product runs under a run-time ``if``
    (as the weight gradient's bias sums did) counts it with its operands' reads of shared
    memory, the same loop with the product outside the ``if`` nothing."""
    if triton_gate.triton is None:
        pytest.skip("Triton < 3.2: the kernels are not defined (see the first test)")
    import torch

    from data2vec.nn.triton_gate import tl, triton

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))

    @triton.jit
    def loop(a_ptr, out_ptr, flag, ITERS: tl.constexpr, GUARD: tl.constexpr):
        r = tl.arange(0, 16)
        acc = tl.zeros((16, 16), dtype=tl.float32)
        for i in range(ITERS):
            a = tl.load(a_ptr + i * 256 + r[:, None] * 16 + r[None, :])
            if GUARD:
                if flag > 0:
                    acc = tl.dot(a, a, acc)
            else:
                acc = tl.dot(a, a, acc)
        tl.store(out_ptr + r[:, None] * 16 + r[None, :], acc)

    a = torch.empty(64 * 256, dtype=torch.bfloat16, device="meta")
    out = torch.empty(256, dtype=torch.float32, device="meta")
    counts = [
        sass.conditional_tile_reads(
            sass.compile_launch(loop, (a, out, 1), {"ITERS": 64, "GUARD": g}).asm["ttgir"]
        )
        for g in (True, False)
    ]
    assert counts[0] > 0 and counts[1] == 0, counts
    ir = "scf.for {\n scf.if %c {\n tt.dot\n } else {\n ttg.local_load\n }\n tt.dot\n}\ntt.dot"
    assert sass.conditional_tile_reads(ir) == 2  # the two under the if, in the loop
