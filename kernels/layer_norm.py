"""LayerNorm and RMSNorm over the last dimension of a (M, N) matrix.

Forward, one program per row, statistics in float32 (float64 for float64 inputs)::

    LayerNorm:  mean = sum(x) / N,  var = sum((x - mean)^2) / N,  rstd = 1 / sqrt(var + eps)
                y = (x - mean) * rstd * w + b
    RMSNorm:    rstd = 1 / sqrt(sum(x^2) / N + eps),  y = x * rstd * w

The variance is taken around the mean (two passes over the row, the second from registers or
cache) rather than as E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std.
A row of up to ``MAX_FUSED_ELEMENTS`` stays in registers and is read from memory once; a longer
row (up to 64K and beyond) is streamed in blocks, reading it three times (sum, squares, output).
Saved for the backward: ``mean`` (LayerNorm only) and ``rstd``, each (M,) float32.

Backward. With xhat = (x - mean) * rstd (RMSNorm: x * rstd) and g = dy * w::

    dx = rstd * (g - xhat * mean(g * xhat) - mean(g))     (RMSNorm: no mean(g) term)
    dw = sum_rows(dy * xhat),  db = sum_rows(dy)

A fixed number of programs each take a contiguous run of rows, write dx, and accumulate their
rows' share of dw/db into a private row of a (programs, N) float32 buffer; ``sum_partials`` then
adds those rows in a fixed order. No float atomics, so gradients are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout import keep_scale
from .utils import (MAX_FUSED_ELEMENTS, PER_CALL_ARGS, acc_dtype, block_size, check_grid, dropout_counters,
                    dropout_keep, dropout_threshold, ensure_contiguous, num_programs, num_warps_for,
                    partial_rows, sum_partials)


@triton.jit
def scale_shift(y, W, B, cols, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """y * W[cols] + B[cols] in ACC: the norms' affine step (the weight left out without HAS_W,
    the bias without HAS_B)."""
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
    return y


@triton.jit
def _add_to_partial_rows(DW_PART, DB_PART, cols, mask, dw, db, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """DW_PART[cols] += dw, DB_PART[cols] += db: a streamed row's block of dw/db added to the partial
    rows of its program (private to that program, zero-initialised by the launcher)."""
    if HAS_W:
        tl.store(DW_PART + cols, tl.load(DW_PART + cols, mask=mask, other=0.0) + dw, mask=mask)
    if HAS_B:
        tl.store(DB_PART + cols, tl.load(DB_PART + cols, mask=mask, other=0.0) + db, mask=mask)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _norm_fwd_kernel(
    X, Y, W, B, MEAN, RSTD,  # X, Y: (M, N); W, B: (N,); MEAN, RSTD: (M,) float32/64
    stride_x_row, stride_y_row, N, eps: tl.float64,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    if ACC != tl.float64:  # float64 scalars: see kernels/utils.py
        eps = tl.cast(eps, ACC)
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2^31
    X += row * stride_x_row
    Y += row * stride_y_row
    # LayerNorm centres the row on its first element before summing: x - x[0] is exact for
    # nearby values, so a large common offset cannot swamp the float32 sums (|mean| >> std).
    shift = 0.0 if IS_RMS else tl.load(X).to(ACC)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        xs = tl.where(mask, tl.load(X + cols, mask=mask, other=0.0).to(ACC) - shift, 0.0)
        m = 0.0 if IS_RMS else tl.sum(xs, axis=0) / N
        xc = tl.where(mask, xs - m, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = scale_shift(xc * rstd, W, B, cols, mask, HAS_W, HAS_B, ACC)
        tl.store(Y + cols, y, mask=mask)
    else:
        m = 0.0
        if not IS_RMS:
            acc = tl.zeros([BLOCK_N], dtype=ACC)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                acc += tl.where(mask, tl.load(X + cols, mask=mask, other=0.0).to(ACC) - shift, 0.0)
            m = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            xc = tl.where(mask, tl.load(X + cols, mask=mask, other=0.0).to(ACC) - shift - m, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            y = (tl.load(X + cols, mask=mask, other=0.0).to(ACC) - shift - m) * rstd
            y = scale_shift(y, W, B, cols, mask, HAS_W, HAS_B, ACC)
            tl.store(Y + cols, y, mask=mask)
    mean = shift + m
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _row_grad(x, dy, w, mean, rstd, mask, N, IS_RMS: tl.constexpr, HAS_W: tl.constexpr):
    """(xhat, dx) for one row held in registers (see the module docstring); ``w`` is ignored
    without HAS_W, ``mean`` with IS_RMS. The stored mean is rounded to float32, so the row is
    re-centred on it exactly: xs = x - mean, then xhat = (xs - mean(xs)) * rstd."""
    if IS_RMS:
        xhat = x * rstd
    else:
        xs = tl.where(mask, x - mean, 0.0)
        xhat = tl.where(mask, (xs - tl.sum(xs, axis=0) / N) * rstd, 0.0)
    g = dy * w if HAS_W else dy
    c1 = tl.sum(xhat * g, axis=0) / N
    if IS_RMS:
        dx = (g - xhat * c1) * rstd
    else:
        dx = (g - xhat * c1 - tl.sum(g, axis=0) / N) * rstd
    return xhat, dx


@triton.jit
def _long_row_grad_coeffs(X_ROW, DY_ROW, W, mean, rstd, N, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """One pass over a row too long for registers. Returns (centre, c1, c2) such that, block by
    block, xhat = (x - mean - centre) * rstd and dx = (g - xhat * c1 - c2) * rstd with g = dy * w.
    ``centre`` = mean(x - mean) corrects the float32 rounding of the stored mean."""
    sum_gxs = tl.zeros([BLOCK_N], dtype=ACC)
    sum_g = tl.zeros([BLOCK_N], dtype=ACC)
    sum_xs = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        xs = tl.where(mask, tl.load(X_ROW + cols, mask=mask, other=0.0).to(ACC) - mean, 0.0)
        g = tl.load(DY_ROW + cols, mask=mask, other=0.0).to(ACC)
        if HAS_W:
            g = g * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        sum_gxs += xs * g
        sum_g += g
        sum_xs += xs
    centre = 0.0 if IS_RMS else tl.sum(sum_xs, axis=0) / N
    total_g = tl.sum(sum_g, axis=0)
    c1 = (tl.sum(sum_gxs, axis=0) - centre * total_g) * rstd / N
    c2 = 0.0 if IS_RMS else total_g / N
    return centre, c1, c2


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _norm_bwd_kernel(
    X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART,  # DW_PART, DB_PART: (programs, N) float32/64
    stride_x_row, stride_dy_row, stride_dx_row, M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: row * stride may pass 2^31
    num_rows = tl.minimum(rows_per_program, M - row_start)
    DW_PART += pid.to(tl.int64) * N
    DB_PART += pid.to(tl.int64) * N
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        w = 1.0
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        dw = tl.zeros([BLOCK_N], dtype=ACC)
        db = tl.zeros([BLOCK_N], dtype=ACC)
        for i in range(0, num_rows):
            r = row_start + i
            x = tl.load(X + r * stride_x_row + cols, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + r * stride_dy_row + cols, mask=mask, other=0.0).to(ACC)
            mean = 0.0 if IS_RMS else tl.load(MEAN + r)
            xhat, dx = _row_grad(x, dy, w, mean, tl.load(RSTD + r), mask, N, IS_RMS, HAS_W)
            tl.store(DX + r * stride_dx_row + cols, dx, mask=mask)
            if HAS_W:
                dw += dy * xhat
            if HAS_B:
                db += dy
        if HAS_W:
            tl.store(DW_PART + cols, dw, mask=mask)
        if HAS_B:
            tl.store(DB_PART + cols, db, mask=mask)
    else:
        # Long rows: one pass for the two row sums, one for dx. The partial dw/db rows are
        # private to this program (zero-initialised by the launcher): each row adds to them.
        for i in range(0, num_rows):
            r = row_start + i
            rstd = tl.load(RSTD + r)
            mean = 0.0 if IS_RMS else tl.load(MEAN + r)
            centre, c1, c2 = _long_row_grad_coeffs(X + r * stride_x_row, DY + r * stride_dy_row, W, mean,
                                                   rstd, N, IS_RMS, HAS_W, ACC, BLOCK_N)
            # Pass 2: dx, and this program's share of dw/db.
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + r * stride_x_row + cols, mask=mask, other=0.0).to(ACC)
                dy = tl.load(DY + r * stride_dy_row + cols, mask=mask, other=0.0).to(ACC)
                xhat = (x - mean - centre) * rstd
                if HAS_W:
                    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                else:
                    g = dy
                tl.store(DX + r * stride_dx_row + cols, (g - xhat * c1 - c2) * rstd, mask=mask)
                _add_to_partial_rows(DW_PART, DB_PART, cols, mask, dy * xhat, dy, HAS_W, HAS_B)
            # The next row reads these partial sums back, and the compiler may store them in another
            # layout than it loads them (another thread per element): a barrier orders the two.
            tl.debug_barrier()


# Rows longer than one block are streamed in blocks of this many elements: a bigger block buys
# nothing once the row is streamed, and at 16384 elements the looping kernels spill registers.
STREAM_BLOCK = 4096
# The backward keeps x, dy, w and the dw/db sums of a row in registers: beyond 8192 elements it
# spills (16384 at fp16, Triton 3.6), so longer rows take its streaming path.
BWD_MAX_FUSED = 8192
# ... and streams them in blocks of 2048 over 8 warps: three running sums and the next block's
# loads per element spilled at 4096 over 8 warps (bf16), and 16 warps cap a thread at 128 registers.
BWD_STREAM_BLOCK = 2048


def _bwd_row_block(N: int) -> int:
    block = block_size(N, BWD_MAX_FUSED)
    return block if block >= N else BWD_STREAM_BLOCK


def _bwd_num_warps(BLOCK_N: int, N: int, add_norm: bool = False) -> int:
    """Warps of the backward kernels: 8 for a streamed row (see BWD_STREAM_BLOCK) and, in the norm
    backward, from 1024 elements on (RMSNorm's with a weight spilled 16 bytes in 4 warps on
    sm_90a, Triton 3.6). The add & norm backward also holds dpre and its dropout bits: at least
    4 warps from 512 elements on (2 spilled 12 bytes on sm_80)."""
    if BLOCK_N < N:
        return 8
    warps = num_warps_for(BLOCK_N)
    if add_norm:
        return max(warps, 4) if BLOCK_N >= 512 else warps
    return max(warps, 8) if BLOCK_N >= 1024 else warps


def _row_block(N: int, max_fused: int = MAX_FUSED_ELEMENTS) -> int:
    """BLOCK_N for rows of N elements: the whole row when it fits in ``max_fused``, else
    STREAM_BLOCK (the kernels take the streaming path whenever BLOCK_N < N)."""
    block = block_size(N, max_fused)
    return block if block >= N else STREAM_BLOCK


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@ensure_contiguous
def _norm_fwd(x, weight, bias, eps: float, is_rms: bool):
    M, N = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(0 if is_rms else M, dtype=_stats_dtype(x), device=x.device)
    rstd = torch.empty(M, dtype=_stats_dtype(x), device=x.device)
    if M == 0 or N == 0:
        return y, (None if is_rms else mean), rstd
    BLOCK_N = _row_block(N)
    _norm_fwd_kernel[check_grid((M,), "norm")](
        x, y, weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
        x.stride(0), y.stride(0), N, eps,
        IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None,
        ACC=acc_dtype(x.dtype), BLOCK_N=BLOCK_N, ONE_BLOCK=BLOCK_N >= N,
        num_warps=num_warps_for(BLOCK_N),
    )
    return y, (None if is_rms else mean), rstd


@ensure_contiguous
def _norm_bwd(dy, x, weight, mean, rstd, has_bias: bool, is_rms: bool):
    M, N = x.shape
    dx = torch.empty_like(x)
    has_w = weight is not None
    programs = num_programs(x.device, M)
    rows_per_program = triton.cdiv(M, programs) if M else 0
    programs = triton.cdiv(M, rows_per_program) if M else 0
    BLOCK_N = _bwd_row_block(N)
    dw_part, db_part = (partial_rows(programs, N, wanted, rstd.dtype, x.device, BLOCK_N < N)
                        for wanted in (has_w, has_bias))
    if M > 0 and N > 0:
        _norm_bwd_kernel[check_grid((programs,), "norm")](
            x, weight if has_w else x, dy, dx, mean if mean is not None else rstd, rstd,
            dw_part, db_part, x.stride(0), dy.stride(0), dx.stride(0), M, N, rows_per_program,
            IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias,
            ACC=acc_dtype(x.dtype), BLOCK_N=BLOCK_N, ONE_BLOCK=BLOCK_N >= N,
            num_warps=_bwd_num_warps(BLOCK_N, N),
        )
    dw, db = sum_partials((dw_part, weight.dtype) if has_w else None,
                          (db_part, weight.dtype if has_w else rstd.dtype) if has_bias else None)
    return dx, dw, db


def layer_norm_fwd(x, weight, bias, eps: float):
    """LayerNorm over the last dim. x: (M, N) fp16/bf16/fp32/fp64; weight, bias: (N,) or None.

    Returns y (M, N) in x's dtype, mean (M,) and rstd (M,) in float32 (float64 for float64 x).
    """
    return _norm_fwd(x, weight, bias, eps, is_rms=False)


def layer_norm_bwd(dy, x, weight, mean, rstd, has_bias: bool):
    """Gradients of :func:`layer_norm_fwd`. dy, x: (M, N); mean, rstd: (M,) from the forward.

    Returns dx (M, N) in x's dtype; dweight, dbias (N,) in the weight's dtype (dbias in rstd's
    without a weight), or None when there is no weight / ``has_bias`` is False.
    """
    return _norm_bwd(dy, x, weight, mean, rstd, has_bias, is_rms=False)


def rms_norm_fwd(x, weight, eps: float):
    """RMSNorm over the last dim. x: (M, N); weight: (N,) or None.

    Returns y (M, N) in x's dtype and rstd (M,) in float32 (float64 for float64 x).
    """
    y, _, rstd = _norm_fwd(x, weight, None, eps, is_rms=True)
    return y, rstd


def rms_norm_bwd(dy, x, weight, rstd):
    """Gradients of :func:`rms_norm_fwd`: dx (M, N) and dweight (N,) or None."""
    dx, dw, _ = _norm_bwd(dy, x, weight, None, rstd, has_bias=False, is_rms=True)
    return dx, dw


# ---------------------------------------------------------------------------------------------
# Fused dropout + residual add + LayerNorm ("add & norm" of a Transformer block).
#
# Forward, one program per row of the (M, N) inputs; keep(seed, r, c) is lane c % 4 of Philox
# counter r * ceil(N / 4) + c // 4 (``kernels.dropout.keep_mask(x.shape, p, seed)``), four columns
# per Philox call; with p = 0 (or in eval) the DROPOUT switch compiles the generator out::
#
#     s   = residual + (keep(seed, r, c) ? x / (1 - p) : 0)   written out as pre_norm_sum
#     out = LayerNorm(s) * w + b                              statistics as in _norm_fwd_kernel
#
# s is rounded to pre_norm_sum's dtype before it is normalised, so out is exactly
# LayerNorm(pre_norm_sum) as the caller sees it. Saved for the backward: pre_norm_sum (an output),
# mean and rstd (M,) float32 -- no mask, no x, no residual.
#
# Backward, with ds_out the LayerNorm backward of dout (see the module docstring) and dpre the
# gradient arriving at pre_norm_sum from downstream (pre-norm blocks reuse it as the next residual)::
#
#     ds = ds_out + dpre,   dresidual = ds,   dx = keep(seed, r, c) ? ds / (1 - p) : 0
#     dw = sum_rows(dout * xhat),   db = sum_rows(dout)       per-program partials + sum_partials
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dropout_add(X, RES, PRE, row, start, N, seed, threshold, scale, DROPOUT: tl.constexpr,
                 HAS_RES: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """residual + dropout(x) at columns start .. start + BLOCK_N - 1 of ``row``, rounded to the
    dtype of pre_norm_sum (PRE), returned in ACC (0 past N)."""
    cols = start + tl.arange(0, BLOCK_N)
    mask = cols < N
    offsets = row * N + cols
    s = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    if DROPOUT:
        keep = dropout_keep(seed, dropout_counters(row, start, N, BLOCK_N), threshold)
        s = tl.where(keep, s * scale, s * 0.0)  # 0 * inf = NaN, as torch
    if HAS_RES:
        s += tl.load(RES + offsets, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, s.to(PRE.dtype.element_ty).to(ACC), 0.0)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _dropout_add_norm_fwd_kernel(
    X, RES, W, B, Y, PRE, MEAN, RSTD,  # X, RES, Y, PRE: (M, N) contiguous; W, B: (N,); MEAN, RSTD: (M,)
    SEED, N, eps: tl.float64, threshold, scale: tl.float64,  # SEED: (1,) int64, read with DROPOUT
    DROPOUT: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    if ACC != tl.float64:  # float64 scalars: see kernels/utils.py
        eps = tl.cast(eps, ACC)
        scale = tl.cast(scale, ACC)
    row = tl.program_id(0).to(tl.int64)
    base = row * N  # int64: flat offsets (and the random stream) may pass 2^31
    seed = tl.load(SEED) if DROPOUT else 0
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        s = _dropout_add(X, RES, PRE, row, 0, N, seed, threshold, scale, DROPOUT, HAS_RES, ACC, BLOCK_N)
        tl.store(PRE + base + cols, s, mask=mask)
        # Centre on the first element before summing, as _norm_fwd_kernel does (|mean| >> std).
        shift = tl.sum(tl.where(cols == 0, s, 0.0), axis=0)
        xs = tl.where(mask, s - shift, 0.0)
        m = tl.sum(xs, axis=0) / N
        xc = tl.where(mask, xs - m, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = scale_shift(xc * rstd, W, B, cols, mask, HAS_W, HAS_B, ACC)
        tl.store(Y + base + cols, y, mask=mask)
    else:
        # Long rows: s is recomputed in each pass from x, residual and the seed (cheaper than
        # a round trip through memory, and free of read-after-write ordering questions).
        cols = tl.arange(0, BLOCK_N)
        first = _dropout_add(X, RES, PRE, row, 0, N, seed, threshold, scale, DROPOUT, HAS_RES, ACC, BLOCK_N)
        shift = tl.sum(tl.where(cols == 0, first, 0.0), axis=0)
        acc = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            s = _dropout_add(X, RES, PRE, row, start, N, seed, threshold, scale, DROPOUT, HAS_RES, ACC,
                             BLOCK_N)
            acc += tl.where(mask, s - shift, 0.0)
        m = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            s = _dropout_add(X, RES, PRE, row, start, N, seed, threshold, scale, DROPOUT, HAS_RES, ACC,
                             BLOCK_N)
            xc = tl.where(mask, s - shift - m, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            s = _dropout_add(X, RES, PRE, row, start, N, seed, threshold, scale, DROPOUT, HAS_RES, ACC,
                             BLOCK_N)
            tl.store(PRE + base + cols, s, mask=mask)
            y = (s - shift - m) * rstd
            y = scale_shift(y, W, B, cols, mask, HAS_W, HAS_B, ACC)
            tl.store(Y + base + cols, y, mask=mask)
    tl.store(MEAN + row, shift + m)
    tl.store(RSTD + row, rstd)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _dropout_add_norm_bwd_kernel(
    DOUT, DPRE, PRE, W, MEAN, RSTD, DX, DRES, DW_PART, DB_PART,  # (M, N) contiguous; parts (G, N)
    SEED, M, N, rows_per_program, threshold, scale: tl.float64,
    DROPOUT: tl.constexpr, HAS_DPRE: tl.constexpr, HAS_DRES: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    if ACC != tl.float64:  # float64 scalars: see kernels/utils.py
        scale = tl.cast(scale, ACC)
    pid = tl.program_id(0)
    seed = tl.load(SEED) if DROPOUT else 0
    row_start = pid.to(tl.int64) * rows_per_program
    num_rows = tl.minimum(rows_per_program, M - row_start)
    DW_PART += pid.to(tl.int64) * N
    DB_PART += pid.to(tl.int64) * N
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        w = 1.0
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        dw = tl.zeros([BLOCK_N], dtype=ACC)
        db = tl.zeros([BLOCK_N], dtype=ACC)
        for i in range(0, num_rows):
            offsets = (row_start + i) * N + cols
            s = tl.load(PRE + offsets, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DOUT + offsets, mask=mask, other=0.0).to(ACC)
            xhat, ds = _row_grad(s, dy, w, tl.load(MEAN + row_start + i), tl.load(RSTD + row_start + i),
                                 mask, N, False, HAS_W)
            if HAS_DPRE:
                ds += tl.load(DPRE + offsets, mask=mask, other=0.0).to(ACC)
            if HAS_DRES:
                tl.store(DRES + offsets, ds, mask=mask)
            if DROPOUT:
                keep = dropout_keep(seed, dropout_counters(row_start + i, 0, N, BLOCK_N), threshold)
                ds = tl.where(keep, ds * scale, ds * 0.0)
            tl.store(DX + offsets, ds, mask=mask)
            if HAS_W:
                dw += dy * xhat
            if HAS_B:
                db += dy
        if HAS_W:
            tl.store(DW_PART + cols, dw, mask=mask)
        if HAS_B:
            tl.store(DB_PART + cols, db, mask=mask)
    else:
        # Long rows: one pass for the row sums, one for the gradients (as _norm_bwd_kernel).
        for i in range(0, num_rows):
            row = row_start + i
            rstd = tl.load(RSTD + row)
            mean = tl.load(MEAN + row)
            centre, c1, c2 = _long_row_grad_coeffs(PRE + row * N, DOUT + row * N, W, mean, rstd, N,
                                                   False, HAS_W, ACC, BLOCK_N)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                offsets = row * N + cols
                s = tl.load(PRE + offsets, mask=mask, other=0.0).to(ACC)
                dy = tl.load(DOUT + offsets, mask=mask, other=0.0).to(ACC)
                xhat = (s - mean - centre) * rstd
                if HAS_W:
                    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                else:
                    g = dy
                ds = (g - xhat * c1 - c2) * rstd
                if HAS_DPRE:
                    ds += tl.load(DPRE + offsets, mask=mask, other=0.0).to(ACC)
                if HAS_DRES:
                    tl.store(DRES + offsets, ds, mask=mask)
                if DROPOUT:
                    keep = dropout_keep(seed, dropout_counters(row, start, N, BLOCK_N), threshold)
                    ds = tl.where(keep, ds * scale, ds * 0.0)
                tl.store(DX + offsets, ds, mask=mask)
                _add_to_partial_rows(DW_PART, DB_PART, cols, mask, dy * xhat, dy, HAS_W, HAS_B)
            # The next row reads these partial sums back, and the compiler may store them in another
            # layout than it loads them (another thread per element): a barrier orders the two.
            tl.debug_barrier()


@ensure_contiguous
def dropout_add_layer_norm_fwd(x, residual, weight, bias, p: float, eps: float, seed: torch.Tensor | None):
    """out = LayerNorm(residual + dropout(x)) over the last dim, and the pre-norm sum.

    x: (M, N) fp16/bf16/fp32/fp64; residual: (M, N) any float dtype, or None (zero);
    weight, bias: (N,) or None; seed: (1,) int64 on x's device, or None when p = 0 (no dropout,
    no random numbers generated); the mask is ``kernels.dropout.keep_mask(x.shape, p, seed)``.
    Returns out, pre_norm_sum (M, N) in the promoted dtype of x and residual, and mean, rstd (M,)
    in float32 (float64 for float64 inputs).
    """
    M, N = x.shape
    pre_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty((M, N), dtype=pre_dtype, device=x.device)
    pre = torch.empty((M, N), dtype=pre_dtype, device=x.device)
    stats = torch.float64 if pre_dtype == torch.float64 else torch.float32
    mean = torch.empty(M, dtype=stats, device=x.device)
    rstd = torch.empty(M, dtype=stats, device=x.device)
    if M == 0 or N == 0:
        return out, pre, mean, rstd
    BLOCK_N = _row_block(N)
    _dropout_add_norm_fwd_kernel[check_grid((M,), "dropout_add_norm")](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, out, pre, mean, rstd,
        seed if seed is not None else mean, N, eps, dropout_threshold(p), keep_scale(p),
        DROPOUT=seed is not None and p > 0.0, HAS_RES=residual is not None, HAS_W=weight is not None,
        HAS_B=bias is not None,
        ACC=acc_dtype(pre_dtype), BLOCK_N=BLOCK_N, ONE_BLOCK=BLOCK_N >= N,
        num_warps=num_warps_for(BLOCK_N),
    )
    return out, pre, mean, rstd


@ensure_contiguous
def dropout_add_layer_norm_bwd(dout, dpre, pre, weight, mean, rstd, p: float, seed: torch.Tensor | None,
                               x_dtype: torch.dtype, residual_dtype: torch.dtype | None,
                               bias_dtype: torch.dtype | None):
    """Gradients of :func:`dropout_add_layer_norm_fwd`.

    dout: (M, N) gradient of out; dpre: (M, N) gradient of pre_norm_sum, or None; pre, mean, rstd
    from the forward. Returns dx (M, N) in ``x_dtype``; dresidual (M, N) in ``residual_dtype``, or
    None when that is None; dweight (N,) in the weight's dtype and dbias (N,) in ``bias_dtype``, each
    None when there is no weight / bias.
    """
    M, N = pre.shape
    has_w = weight is not None
    has_res = residual_dtype is not None
    has_bias = bias_dtype is not None
    dx = torch.empty((M, N), dtype=x_dtype, device=pre.device)
    dres = torch.empty((M, N), dtype=residual_dtype, device=pre.device) if has_res else None
    programs = num_programs(pre.device, M)
    rows_per_program = triton.cdiv(M, programs) if M else 0
    programs = triton.cdiv(M, rows_per_program) if M else 0
    BLOCK_N = _bwd_row_block(N)
    dw_part, db_part = (partial_rows(programs, N, wanted, rstd.dtype, pre.device, BLOCK_N < N)
                        for wanted in (has_w, has_bias))
    if M > 0 and N > 0:
        _dropout_add_norm_bwd_kernel[check_grid((programs,), "dropout_add_norm")](
            dout, dpre if dpre is not None else dout, pre, weight if has_w else pre, mean, rstd,
            dx, dres if has_res else dx, dw_part, db_part,
            seed if seed is not None else mean, M, N, rows_per_program, dropout_threshold(p),
            keep_scale(p), DROPOUT=seed is not None and p > 0.0, HAS_DPRE=dpre is not None,
            HAS_DRES=has_res, HAS_W=has_w, HAS_B=has_bias,
            ACC=acc_dtype(pre.dtype), BLOCK_N=BLOCK_N, ONE_BLOCK=BLOCK_N >= N,
            num_warps=_bwd_num_warps(BLOCK_N, N, add_norm=True),
        )
    dw, db = sum_partials((dw_part, weight.dtype) if has_w else None,
                          (db_part, bias_dtype) if has_bias else None)
    return dx, dres, dw, db
