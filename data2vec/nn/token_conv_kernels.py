"""The decoder convolution's Triton kernels: an implicit GEMM over channels-last tokens
(``conv_kernel``: the forward and the input gradient) and the weight gradient's partial sums
(``wgrad_kernel``). What they compute, their launch settings and their autograd are in
:mod:`data2vec.nn.token_conv`.
"""

from __future__ import annotations

from data2vec.nn.triton_gate import tl, triton

if triton is not None:

    @triton.jit
    def _packed_rows(rows, in_rows, yy, xx, ks, g, H, W, C_IN, CIN_G, KH, KW, VEC: tl.constexpr):
        """Offsets and mask of ``x[row + shift(tap), g*CIN_G + i]`` for rows x packed pairs.

        ``ks`` numbers (tap, input channel) pairs as ``tap * CIN_G + i``; positions whose tap
        falls outside the image, and pairs past the last, read zeros. Returns
        ``(BLOCK_M, BLOCK_K)`` offsets into ``x: (M, C_IN)`` and the mask.
        """
        tap = ks // CIN_G
        dy = tap // KW - KH // 2
        dx = tap % KW - KW // 2
        ys = yy[:, None] + dy[None, :]
        xs = xx[:, None] + dx[None, :]
        ok = in_rows[:, None] & (ks[None, :] < KH * KW * CIN_G)
        ok = ok & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        src = (rows[:, None] + (dy * W + dx)[None, :]).to(tl.int64) * C_IN
        src = src + (g * CIN_G + ks % CIN_G)[None, :]
        # Runs of VEC pairs share a tap and have consecutive channels: whole vectors load.
        src = tl.max_contiguous(tl.multiple_of(src, [1, VEC]), [1, VEC])
        return src, tl.max_constancy(ok, [1, VEC])

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        """``acc + a @ b``; float32 operands multiply in full precision where ``IEEE`` (else
        as TF32), 16-bit ones as they are."""
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _packed_step(
        acc, k0, x_ptr, w_g, rows, in_rows, yy, xx, cols, g, H, W, C_IN, CIN_G, COUT_G, KH, KW,
        BLOCK_K: tl.constexpr, VEC: tl.constexpr, SWAP: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One step of :func:`conv_kernel`'s packed sum: ``acc`` plus the product of the input
        gathered at (tap, channel) pairs ``k0 .. k0 + BLOCK_K`` and the group's weight rows
        ``w_g[k0 .. k0 + BLOCK_K]``; ``acc`` is ``(BLOCK_M, BLOCK_N)``, or its transpose with
        ``SWAP``."""
        ks = k0 + tl.arange(0, BLOCK_K)
        b = tl.load(
            w_g + ks[:, None] * COUT_G + cols[None, :],
            mask=(ks[:, None] < KH * KW * CIN_G) & (cols[None, :] < COUT_G),
            other=0.0,
        )
        src, ok = _packed_rows(rows, in_rows, yy, xx, ks, g, H, W, C_IN, CIN_G, KH, KW, VEC)
        # float32 activations are rounded to the weight's dtype here, in registers, rather
        # than by a separate cast over the whole tensor.
        a = tl.load(x_ptr + src, mask=ok, other=0.0).to(b.dtype)
        if SWAP:  # (BLOCK_N, BLOCK_M) += (BLOCK_N, BLOCK_K) @ (BLOCK_K, BLOCK_M)
            acc = _dot(tl.trans(b), tl.trans(a), acc, IEEE)
        else:
            acc = _dot(a, b, acc, IEEE)
        return acc

    @triton.jit
    def conv_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        add_ptr,
        out_ptr,
        M,
        H,
        W,
        C_IN: tl.constexpr,
        C_OUT: tl.constexpr,
        CIN_G: tl.constexpr,
        COUT_G: tl.constexpr,
        KH: tl.constexpr,
        KW: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_ADD: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PACK: tl.constexpr,
        VEC: tl.constexpr,
        SWAP: tl.constexpr,
        PIPE: tl.constexpr,
    ):
        """``out[m, g*COUT_G + o] = sum_{tap, i} x[m + shift(tap), g*CIN_G + i] w[g, tap, i, o]``.

        ``x: (M, C_IN)``, ``w: (G, KH*KW, CIN_G, COUT_G)``, ``out: (M, C_OUT)``, all
        contiguous; rows are ``(n, y, x)`` positions of ``H x W`` images, row-major. Plus
        ``bias[c]`` (``HAS_BIAS``) and ``add[m, c]`` (``HAS_ADD``, e.g. a residual's gradient).
        ``PACK``: the sum runs over ``BLOCK_K`` (tap, channel) pairs at a time (see
        :func:`_packed_rows`) instead of one tap's channels at a time; ``VEC``: a power of two
        dividing ``CIN_G`` (the runs of contiguous channels the loads may assume). ``SWAP``
        (with ``PACK``): the products run transposed, ``out^T = w^T x^T``, so that the many
        rows are the products' wide side and the group's few channels the narrow one (the
        shape in which a Hopper GPU's tensor cores run fastest: 64 x up to 256). ``PIPE``
        (with ``PACK``): the packed steps run as a loop the compiler pipelines (see below)
        instead of unrolled.
        """
        # Programs of one row tile run side by side (group fastest), so the rows they read
        # are fetched from memory once and then served from the cache.
        n_tiles = tl.cdiv(COUT_G, BLOCK_N)
        pid = tl.program_id(0)
        pid_gn = pid % ((C_OUT // COUT_G) * n_tiles)
        pid_m = pid // ((C_OUT // COUT_G) * n_tiles)
        g = pid_gn // n_tiles
        cols = (pid_gn % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        in_rows = rows < M
        pos = rows % (H * W)
        yy = pos // W
        xx = pos % W
        tl.static_assert(PACK or not (SWAP or PIPE), "SWAP and PIPE need PACK")
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PACK:
            # One group's weight is a (KH*KW*CIN_G, COUT_G) matrix, rows in (tap, channel)
            # order; the input is gathered in the same order, so no column of a product is
            # padding except past the last pair (48 channels x 9 taps: 7 steps of 64, not 9).
            w_g = w_ptr + g * KH * KW * CIN_G * COUT_G
            if PIPE:
                # A loop (not unrolled) is what Triton's pipeliner works on: the next steps'
                # tiles are copied to shared memory asynchronously (cp.async, num_stages
                # deep) while the tensor cores run this step's product. Unrolled, the
                # compiled kernel loads through registers and num_stages has no effect
                # (benchmarks/README.md, "GPU, seventh pass").
                for k0 in tl.range(0, KH * KW * CIN_G, BLOCK_K):
                    acc = _packed_step(
                        acc, k0, x_ptr, w_g, rows, in_rows, yy, xx, cols, g, H, W, C_IN, CIN_G,
                        COUT_G, KH, KW, BLOCK_K, VEC, SWAP, IEEE,
                    )  # fmt: skip
            else:
                for k0 in tl.static_range(0, KH * KW * CIN_G, BLOCK_K):
                    acc = _packed_step(
                        acc, k0, x_ptr, w_g, rows, in_rows, yy, xx, cols, g, H, W, C_IN, CIN_G,
                        COUT_G, KH, KW, BLOCK_K, VEC, SWAP, IEEE,
                    )  # fmt: skip
            if SWAP:
                acc = tl.trans(acc)
        else:
            for ky in tl.static_range(KH):
                for kx in tl.static_range(KW):
                    dy = ky - KH // 2
                    dx = kx - KW // 2
                    ok = in_rows & (yy + dy >= 0) & (yy + dy < H) & (xx + dx >= 0) & (xx + dx < W)
                    src = (rows + dy * W + dx).to(tl.int64) * C_IN + g * CIN_G
                    tap_w = w_ptr + (g * KH * KW + ky * KW + kx) * CIN_G * COUT_G
                    for k0 in tl.static_range(0, CIN_G, BLOCK_K):
                        ks = k0 + tl.arange(0, BLOCK_K)
                        b = tl.load(
                            tap_w + ks[:, None] * COUT_G + cols[None, :],
                            mask=(ks[:, None] < CIN_G) & (cols[None, :] < COUT_G),
                            other=0.0,
                        )
                        # float32 activations are rounded to the weight's dtype here, in
                        # registers, rather than by a separate cast over the whole tensor.
                        a = tl.load(
                            x_ptr + src[:, None] + ks[None, :],
                            mask=ok[:, None] & (ks[None, :] < CIN_G),
                            other=0.0,
                        ).to(b.dtype)
                        acc = _dot(a, b, acc, IEEE)
        if HAS_BIAS:
            bias = tl.load(b_ptr + g * COUT_G + cols, mask=cols < COUT_G, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        dst = rows.to(tl.int64)[:, None] * C_OUT + g * COUT_G + cols[None, :]
        ok_out = in_rows[:, None] & (cols[None, :] < COUT_G)
        if HAS_ADD:
            acc += tl.load(add_ptr + dst, mask=ok_out, other=0.0).to(tl.float32)
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=ok_out)

    @triton.jit
    def wgrad_kernel(
        x_ptr,
        gy_ptr,
        ws_ptr,
        bs_ptr,
        M,
        H,
        W,
        C_IN: tl.constexpr,
        C_OUT: tl.constexpr,
        CIN_G: tl.constexpr,
        COUT_G: tl.constexpr,
        KH: tl.constexpr,
        KW: tl.constexpr,
        IEEE: tl.constexpr,
        ITERS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_I: tl.constexpr,
        PACK: tl.constexpr,
        VEC: tl.constexpr,
        N_COLS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HC: tl.constexpr,
        WC: tl.constexpr,
    ):
        """Partial weight (and bias) gradients, one per slice of rows.

        ``ws[s, g, tap, o, i] = sum_{m in slice s} gy[m, g*COUT_G + o] x[m + shift, g*CIN_G + i]``;
        ``ws: (S, G, KH*KW, COUT_G, CIN_G)`` float32, one slice ``s`` of ``ITERS * BLOCK_M``
        rows per program; ``BLOCK_O >= COUT_G`` and ``BLOCK_I >= CIN_G``. With ``PACK`` a
        program computes ``BLOCK_I`` packed (tap, channel) columns ``k = tap * CIN_G + i``
        instead of one tap's, into ``ws: (S, G, COUT_G, KH*KW*CIN_G)``; ``VEC`` as in
        :func:`conv_kernel`. ``HAS_BIAS``: the first column block's programs also write the
        slice's column sums of ``gy``, ``bs[s, g*COUT_G + o]`` (the bias gradient's partial
        sums, from the tiles of ``gy`` they load anyway). ``HC, WC``: ``H, W`` known when
        compiling (0: take the arguments; the launcher passes them for 2-D grids, which a
        model fixes, not for 1-D ones, whose length varies with the batch).
        """
        if HC > 0:
            # The grid as compile-time constants: the positions' divisions by W below become
            # multiplications (313 -> 238 instructions per iteration, sm_90).
            H = HC
            W = WC
        # Column blocks fastest, then groups: the programs of one slice run together and share
        # its rows (N_COLS column blocks: KH*KW taps, or the packed columns' blocks).
        pid = tl.program_id(0)
        kc = pid % N_COLS
        g = (pid // N_COLS) % (C_OUT // COUT_G)
        s = pid // (N_COLS * (C_OUT // COUT_G))
        outs = tl.arange(0, BLOCK_O)
        ins = tl.arange(0, BLOCK_I)
        if PACK:
            ks = kc * BLOCK_I + ins
        else:
            ks = ins
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        # The bias sums as a product with a column of ones (beside 15 of zeros: a product is at
        # least 16 wide) on the tensor cores, from the gy tile already in shared memory. Summed
        # in registers (tl.sum over rows) they crossed threads and warps every iteration: 459
        # instructions per iteration against 313 (sm_90). Every program adds them (only the
        # first column block's programs store them): a product under a run-time condition was
        # left out of Triton 3.6's pipeliner, which then overwrote the gy tile in shared memory
        # while that product could still read it (wrong bias gradients on an H200, 2026-11-28).
        gsum = tl.zeros((BLOCK_O, 16), dtype=tl.float32)
        ones = tl.where(tl.arange(0, 16)[None, :] == 0, 1.0, tl.zeros((BLOCK_M, 16), tl.float32))
        ones = ones.to(gy_ptr.dtype.element_ty)
        # A compile-time trip count (a power of two, so few variants get compiled) and the
        # same loop in every program.
        for it in range(ITERS):
            rows = (s * ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)
            in_rows = rows < M
            pos = rows % (H * W)
            gy = tl.load(
                gy_ptr + rows.to(tl.int64)[:, None] * C_OUT + g * COUT_G + outs[None, :],
                mask=in_rows[:, None] & (outs[None, :] < COUT_G),
                other=0.0,
            )
            if HAS_BIAS:  # compile-time: no branch in the loop
                gsum = _dot(tl.trans(gy), ones, gsum, IEEE)
            if PACK:
                src, ok = _packed_rows(
                    rows, in_rows, pos // W, pos % W, ks, g, H, W, C_IN, CIN_G, KH, KW, VEC
                )
                xs = tl.load(x_ptr + src, mask=ok, other=0.0).to(gy.dtype)
            else:
                dy = kc // KW - KH // 2
                dx = kc % KW - KW // 2
                yy = pos // W + dy
                xx = pos % W + dx
                ok = in_rows & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
                src = (rows + dy * W + dx).to(tl.int64) * C_IN + g * CIN_G
                xs = tl.load(
                    x_ptr + src[:, None] + ins[None, :],
                    mask=ok[:, None] & (ins[None, :] < CIN_G),
                    other=0.0,
                ).to(gy.dtype)
            acc = _dot(tl.trans(gy), xs, acc, IEEE)
        if HAS_BIAS and kc == 0:  # one program of each (slice, group); columns 1-15 hold zeros
            tl.store(bs_ptr + s * C_OUT + g * COUT_G + outs, tl.sum(gsum, axis=1),
                     mask=outs < COUT_G)  # fmt: skip
        if PACK:
            dst = (s * (C_OUT // COUT_G) + g) * COUT_G * KH * KW * CIN_G
            tl.store(
                ws_ptr + dst + outs[:, None] * KH * KW * CIN_G + ks[None, :],
                acc,
                mask=(outs[:, None] < COUT_G) & (ks[None, :] < KH * KW * CIN_G),
            )
        else:
            dst = ((s * (C_OUT // COUT_G) + g) * KH * KW + kc) * COUT_G * CIN_G
            tl.store(
                ws_ptr + dst + outs[:, None] * CIN_G + ins[None, :],
                acc,
                mask=(outs[:, None] < COUT_G) & (ins[None, :] < CIN_G),
            )
