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

from .utils import acc_dtype, block_size, ensure_contiguous, num_programs, num_warps_for, sum_partials


@triton.jit
def _norm_fwd_kernel(
    X, Y, W, B, MEAN, RSTD,  # X, Y: (M, N); W, B: (N,); MEAN, RSTD: (M,) float32/64
    stride_x_row, stride_y_row, N, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
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
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
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
            if HAS_W:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
            if HAS_B:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
            tl.store(Y + cols, y, mask=mask)
    mean = shift + m
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
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
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        dw = tl.zeros([BLOCK_N], dtype=ACC)
        db = tl.zeros([BLOCK_N], dtype=ACC)
        for i in range(0, num_rows):
            r = row_start + i
            x = tl.load(X + r * stride_x_row + cols, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + r * stride_dy_row + cols, mask=mask, other=0.0).to(ACC)
            rstd = tl.load(RSTD + r)
            if IS_RMS:
                xhat = x * rstd
            else:
                # The stored mean is rounded to float32; re-centre on it exactly (see the forward).
                xs = tl.where(mask, x - tl.load(MEAN + r), 0.0)
                xhat = tl.where(mask, (xs - tl.sum(xs, axis=0) / N) * rstd, 0.0)
            g = dy * w if HAS_W else dy
            c1 = tl.sum(xhat * g, axis=0) / N
            if IS_RMS:
                dx = (g - xhat * c1) * rstd
            else:
                dx = (g - xhat * c1 - tl.sum(g, axis=0) / N) * rstd
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
        # private to this program (zero-initialised by the launcher), so read-modify-write is safe.
        for i in range(0, num_rows):
            r = row_start + i
            rstd = tl.load(RSTD + r)
            mean = 0.0 if IS_RMS else tl.load(MEAN + r)
            # Pass 1: sum(g * xs), sum(g), sum(xs) with xs = x - mean; the last one corrects the
            # float32 rounding of the stored mean, as in the one-block case.
            sum_gxs = tl.zeros([BLOCK_N], dtype=ACC)
            sum_g = tl.zeros([BLOCK_N], dtype=ACC)
            sum_xs = tl.zeros([BLOCK_N], dtype=ACC)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + r * stride_x_row + cols, mask=mask, other=0.0).to(ACC)
                xs = tl.where(mask, x - mean, 0.0)
                g = tl.load(DY + r * stride_dy_row + cols, mask=mask, other=0.0).to(ACC)
                if HAS_W:
                    g = g * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                sum_gxs += xs * g
                sum_g += g
                sum_xs += xs
            centre = 0.0 if IS_RMS else tl.sum(sum_xs, axis=0) / N
            total_g = tl.sum(sum_g, axis=0)
            c1 = (tl.sum(sum_gxs, axis=0) - centre * total_g) * rstd / N
            c2 = 0.0 if IS_RMS else total_g / N
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
                if HAS_W:
                    part = tl.load(DW_PART + cols, mask=mask, other=0.0)
                    tl.store(DW_PART + cols, part + dy * xhat, mask=mask)
                if HAS_B:
                    part = tl.load(DB_PART + cols, mask=mask, other=0.0)
                    tl.store(DB_PART + cols, part + dy, mask=mask)


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
    BLOCK_N = block_size(N)
    _norm_fwd_kernel[(M,)](
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
    part_shape = (programs, N)
    dw_part = torch.zeros(part_shape if has_w else (0,), dtype=rstd.dtype, device=x.device)
    db_part = torch.zeros(part_shape if has_bias else (0,), dtype=rstd.dtype, device=x.device)
    if M > 0 and N > 0:
        BLOCK_N = block_size(N)
        _norm_bwd_kernel[(programs,)](
            x, weight if has_w else x, dy, dx, mean if mean is not None else rstd, rstd,
            dw_part, db_part, x.stride(0), dy.stride(0), dx.stride(0), M, N, rows_per_program,
            IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias,
            ACC=acc_dtype(x.dtype), BLOCK_N=BLOCK_N, ONE_BLOCK=BLOCK_N >= N,
            num_warps=num_warps_for(BLOCK_N),
        )
    dw = sum_partials(dw_part, weight.dtype) if has_w else None
    db = sum_partials(db_part, weight.dtype if has_w else x.dtype) if has_bias else None
    return dx, dw, db


def layer_norm_fwd(x, weight, bias, eps: float):
    """LayerNorm over the last dim. x: (M, N) fp16/bf16/fp32/fp64; weight, bias: (N,) or None.

    Returns y (M, N) in x's dtype, mean (M,) and rstd (M,) in float32 (float64 for float64 x).
    """
    return _norm_fwd(x, weight, bias, eps, is_rms=False)


def layer_norm_bwd(dy, x, weight, mean, rstd, has_bias: bool):
    """Gradients of :func:`layer_norm_fwd`. dy, x: (M, N); mean, rstd: (M,) from the forward.

    Returns dx (M, N) in x's dtype; dweight, dbias (N,) in the weight's dtype, or None when there
    is no weight / ``has_bias`` is False.
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
