"""Batch normalisation over the batch and spatial dims of an (N, C, *) tensor, per channel.

The input is viewed as X (N, C, S), S = prod(spatial dims), with explicit strides, so contiguous,
channels_last and transposed-(N, L, C) layouts are read in place; the reduction runs over the
R = N * S elements of each channel, indexed r = n * S + s. Everything is float32 (float64 for
float64 inputs) inside; outputs are in the input's dtype.

Training forward, three launches::

    1. stats     grid (G, C / BLOCK_C): each program reduces a contiguous run of r for a block of
                 channels to a partial (count, mean, M2), tile by tile: the tile's own mean and
                 M2 are exact two-pass values from registers, merged into the running partial
                 with Chan's parallel formula  delta = mean_b - mean_a,
                 mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
    2. finalize  grid (C / BLOCK_C): merges the G partials of a channel in a fixed order (no float
                 atomics: bitwise reproducible), BLOCK_G at a time (a block's own mean and M2
                 exactly, then Chan's merge of the blocks), var = M2 / R, rstd = 1 / sqrt(var + eps), and
                 updates the running buffers in place:
                 running_mean = (1 - momentum) * running_mean + momentum * mean
                 running_var  = (1 - momentum) * running_var  + momentum * M2 / (R - 1)
    3. apply     grid (R / BLOCK_R, C / BLOCK_C):  y = ((x - pivot) - mean) * rstd * w + b

Every statistic is taken of x - pivot, where the pivot is the channel's first element x[0, c, 0]:
for values close to each other that subtraction is exact, so a large common offset (|mean| >>
std) never enters a float32 sum, and the centred value x - mean keeps its digits in the apply
and backward passes too (mean itself rounded to float32 would be off by ulp(mean) ~ std).
Saved for the backward: ``mean`` (of x - pivot) and ``rstd``, each (C,); the pivot is re-read
from x. Evaluation uses the running buffers instead (mean = running_mean, pivot = 0).

Backward. With xhat = (x - mean) * rstd::

    dweight = sum_r(dy * xhat),   dbias = sum_r(dy)
    training:  dx = w * rstd * (dy - dbias / R - xhat * dweight / R)
    eval:      dx = w * rstd * dy

The two sums are per-program partial rows (G, C) added by ``sum_partials`` in a fixed order,
then a second elementwise launch writes dx. Every 2-D grid here is launched folded into axis 0
(``utils.grid_2d``): more than 65,535 channel blocks would not fit on a CUDA grid's axis 1.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import PER_CALL_ARGS, acc_dtype, check_grid, grid_2d, num_programs, num_warps_for, sum_partials

# Elements in one [BLOCK_C, BLOCK_R] tile. Channels are the first tile dim and r the last. In
# (N, C, S) layouts r is fastest (Triton's default order, and the VEC hints of _tile_offsets make
# it vectorise); a channels_last tensor's channel stride of 1 is specialised at launch, and that
# proven contiguity makes channels fastest there.
TILE_ELEMENTS = 4096
# The finalize merges [FINALIZE_BLOCK_G, FINALIZE_BLOCK_C] tiles of per-program partials: 128
# bytes of a partial row per load, and G / 64 dependent merge steps (an H100 has G up to 528).
FINALIZE_BLOCK_G = 64
FINALIZE_BLOCK_C = 32


@triton.jit
def _tile_offsets(rows, cols, S, stride_n, stride_c, stride_s, FLAT: tl.constexpr, VEC: tl.constexpr):
    """int64 element offsets of the [BLOCK_C, BLOCK_R] tile at reduction indices ``rows`` (r = n * S
    + s) and channels ``cols`` of an (N, C, S) strided tensor.

    FLAT: r's offset is ``r * stride_s`` (the launcher passes r's own stride: channels_last,
    (N, L, C)-transposed and (N, C) inputs), with no division by S. VEC > 1: r has unit stride and
    every aligned group of VEC indices shares n, its first offset a multiple of VEC (checked by
    ``_r_vector``); the hint lets the loads and stores move VEC elements at a time, and only the
    first index of a group is divided by S.
    """
    if FLAT:
        row_off = rows.to(tl.int64) * stride_s
    else:
        n = rows // S
        s = rows - n * S
        row_off = n.to(tl.int64) * stride_n + s.to(tl.int64) * stride_s
    offs = cols.to(tl.int64)[:, None] * stride_c + row_off[None, :]
    if VEC > 1:
        offs = tl.max_contiguous(tl.multiple_of(offs, [1, VEC]), [1, VEC])
    return offs


@triton.jit
def _rows_below(rows, end, VEC: tl.constexpr):
    """rows < end, with end a multiple of VEC: written on rows // VEC so that the compiler sees
    the mask constant over aligned groups of VEC rows (otherwise it would split the vectors)."""
    if VEC > 1:
        return rows // VEC < end // VEC
    else:
        return rows < end


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _bn_stats_kernel(
    X, PART_MEAN, PART_M2,  # X: (N, C, S) strided; PART_*: (G, C) float32/64
    C, S, R, tiles_per_program, stride_n, stride_c, stride_s,
    FLAT: tl.constexpr, VEC: tl.constexpr, IDX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r, pid_c = grid_2d(tl.cdiv(R, tiles_per_program * BLOCK_R))
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    pivot = tl.load(X + cols.to(tl.int64) * stride_c, mask=col_mask, other=0.0).to(ACC)
    # Tile starts built from BLOCK_R (not from a row count) are provably multiples of VEC.
    row0 = pid_r.to(IDX) * tiles_per_program * BLOCK_R
    row_end = row0 + tl.minimum(tiles_per_program * BLOCK_R, R - row0)  # no int32 overflow
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(0, tl.cdiv(row_end - row0, BLOCK_R)):
        rows = row0 + t * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = _rows_below(rows, row_end, VEC)
        mask = col_mask[:, None] & row_mask[None, :]
        x = tl.load(X + _tile_offsets(rows, cols, S, stride_n, stride_c, stride_s, FLAT, VEC), mask=mask,
                    other=0.0)
        xs = tl.where(mask, x.to(ACC) - pivot[:, None], 0.0)
        # The tile's exact statistics, then Chan's merge into this program's running partial.
        n_b = tl.sum(row_mask.to(ACC), axis=0)
        mean_b = tl.sum(xs, axis=1) / n_b
        d = tl.where(mask, xs - mean_b[:, None], 0.0)
        m2_b = tl.sum(d * d, axis=1)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (count * n_b / total)
        count = total
    part = pid_r.to(tl.int64) * C + cols
    tl.store(PART_MEAN + part, mean, mask=col_mask)
    tl.store(PART_M2 + part, m2, mask=col_mask)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _bn_finalize_kernel(
    X, PART_MEAN, PART_M2, MEAN, RSTD, RUNNING_MEAN, RUNNING_VAR,  # MEAN, RSTD: (C,) float32/64
    C, R, G, rows_per_program, last_count, stride_c, momentum: tl.float64, eps: tl.float64,
    UPDATE_RUNNING: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    if ACC != tl.float64:  # float64 scalars: see kernels/utils.py
        momentum = tl.cast(momentum, ACC)
        eps = tl.cast(eps, ACC)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    # BLOCK_G partials at a time: a block's own (count, mean, M2) exactly from registers, then
    # Chan's merge of the blocks in program order -- G / BLOCK_G dependent steps instead of G,
    # and the same result whatever the scheduling.
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        n_g = tl.where(g < G, tl.where(g == G - 1, last_count, rows_per_program), 0).to(ACC)
        mask = (g < G)[:, None] & col_mask[None, :]
        part = g.to(tl.int64)[:, None] * C + cols[None, :]
        mean_g = tl.load(PART_MEAN + part, mask=mask, other=0.0)
        m2_g = tl.load(PART_M2 + part, mask=mask, other=0.0)
        n_b = tl.sum(n_g, axis=0)
        mean_b = tl.sum(n_g[:, None] * mean_g, axis=0) / n_b
        d = mean_g - mean_b[None, :]
        m2_b = tl.sum(m2_g + n_g[:, None] * d * d, axis=0)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (count * n_b / total)
        count = total
    rstd = 1.0 / tl.sqrt(m2 / R + eps)
    tl.store(MEAN + cols, mean, mask=col_mask)
    tl.store(RSTD + cols, rstd, mask=col_mask)
    if UPDATE_RUNNING:
        pivot = tl.load(X + cols.to(tl.int64) * stride_c, mask=col_mask, other=0.0).to(ACC)
        running_mean = tl.load(RUNNING_MEAN + cols, mask=col_mask, other=0.0).to(ACC)
        running_var = tl.load(RUNNING_VAR + cols, mask=col_mask, other=0.0).to(ACC)
        running_mean = momentum * (pivot + mean) + (1.0 - momentum) * running_mean
        running_var = momentum * (m2 / (R - 1)) + (1.0 - momentum) * running_var  # unbiased
        tl.store(RUNNING_MEAN + cols, running_mean.to(RUNNING_MEAN.dtype.element_ty), mask=col_mask)
        tl.store(RUNNING_VAR + cols, running_var.to(RUNNING_VAR.dtype.element_ty), mask=col_mask)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _bn_running_stats_kernel(
    RUNNING_MEAN, RUNNING_VAR, MEAN, RSTD, C, eps: tl.float64,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Evaluation: mean and rstd (C,) in the accumulation type from the running buffers."""
    if ACC != tl.float64:  # float64 scalars: see kernels/utils.py
        eps = tl.cast(eps, ACC)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    var = tl.load(RUNNING_VAR + cols, mask=col_mask, other=1.0).to(ACC)
    tl.store(MEAN + cols, tl.load(RUNNING_MEAN + cols, mask=col_mask, other=0.0).to(ACC), mask=col_mask)
    tl.store(RSTD + cols, 1.0 / tl.sqrt(var + eps), mask=col_mask)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _bn_apply_kernel(
    X, Y, MEAN, RSTD, W, B,  # X, Y: (N, C, S) strided; MEAN, RSTD, W, B: (C,)
    C, S, R, stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    SHIFTED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, FLAT: tl.constexpr, VEC: tl.constexpr,
    IDX: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r, pid_c = grid_2d(tl.cdiv(R, BLOCK_R))
    rows = pid_r.to(IDX) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = col_mask[:, None] & _rows_below(rows, R, VEC)[None, :]
    mean = tl.load(MEAN + cols, mask=col_mask, other=0.0)
    if SHIFTED:
        pivot = tl.load(X + cols.to(tl.int64) * stride_xc, mask=col_mask, other=0.0).to(ACC)
    else:
        pivot = tl.zeros([BLOCK_C], dtype=ACC)
    scale = tl.load(RSTD + cols, mask=col_mask, other=0.0)
    if HAS_W:
        scale = scale * tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    x = tl.load(X + _tile_offsets(rows, cols, S, stride_xn, stride_xc, stride_xs, FLAT, VEC), mask=mask,
                other=0.0)
    y = ((x.to(ACC) - pivot[:, None]) - mean[:, None]) * scale[:, None]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(ACC)[:, None]
    tl.store(Y + _tile_offsets(rows, cols, S, stride_yn, stride_yc, stride_ys, FLAT, VEC), y, mask=mask)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _bn_bwd_reduce_kernel(
    X, DY, MEAN, RSTD, PART_DY, PART_DYXHAT,  # PART_*: (G, C) float32/64
    C, S, R, tiles_per_program, stride_xn, stride_xc, stride_xs, stride_dn, stride_dc, stride_ds,
    SHIFTED: tl.constexpr, FLAT: tl.constexpr, VEC: tl.constexpr, IDX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r, pid_c = grid_2d(tl.cdiv(R, tiles_per_program * BLOCK_R))
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean = tl.load(MEAN + cols, mask=col_mask, other=0.0)
    if SHIFTED:
        pivot = tl.load(X + cols.to(tl.int64) * stride_xc, mask=col_mask, other=0.0).to(ACC)
    else:
        pivot = tl.zeros([BLOCK_C], dtype=ACC)
    rstd = tl.load(RSTD + cols, mask=col_mask, other=0.0)
    row0 = pid_r.to(IDX) * tiles_per_program * BLOCK_R
    row_end = row0 + tl.minimum(tiles_per_program * BLOCK_R, R - row0)  # no int32 overflow
    sum_dy = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    sum_dyxc = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    for t in range(0, tl.cdiv(row_end - row0, BLOCK_R)):
        rows = row0 + t * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = col_mask[:, None] & _rows_below(rows, row_end, VEC)[None, :]
        x = tl.load(X + _tile_offsets(rows, cols, S, stride_xn, stride_xc, stride_xs, FLAT, VEC), mask=mask,
                    other=0.0)
        dy = tl.load(DY + _tile_offsets(rows, cols, S, stride_dn, stride_dc, stride_ds, FLAT, VEC), mask=mask,
                     other=0.0).to(ACC)
        xc = tl.where(mask, (x.to(ACC) - pivot[:, None]) - mean[:, None], 0.0)
        sum_dy += dy
        sum_dyxc += dy * xc
    part = pid_r.to(tl.int64) * C + cols
    tl.store(PART_DY + part, tl.sum(sum_dy, axis=1), mask=col_mask)
    tl.store(PART_DYXHAT + part, tl.sum(sum_dyxc, axis=1) * rstd, mask=col_mask)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _bn_bwd_dx_kernel(
    X, DY, DX, MEAN, RSTD, W, SUM_DY, SUM_DYXHAT,  # SUM_*: (C,) float32/64 (training only)
    C, S, R, stride_xn, stride_xc, stride_xs, stride_dn, stride_dc, stride_ds,
    stride_gn, stride_gc, stride_gs,
    TRAINING: tl.constexpr, HAS_W: tl.constexpr, FLAT: tl.constexpr, VEC: tl.constexpr,
    IDX: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r, pid_c = grid_2d(tl.cdiv(R, BLOCK_R))
    rows = pid_r.to(IDX) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = col_mask[:, None] & _rows_below(rows, R, VEC)[None, :]
    rstd = tl.load(RSTD + cols, mask=col_mask, other=0.0)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    dy = tl.load(DY + _tile_offsets(rows, cols, S, stride_dn, stride_dc, stride_ds, FLAT, VEC), mask=mask,
                 other=0.0).to(ACC)
    if TRAINING:
        mean = tl.load(MEAN + cols, mask=col_mask, other=0.0)
        pivot = tl.load(X + cols.to(tl.int64) * stride_xc, mask=col_mask, other=0.0).to(ACC)
        mean_dy = tl.load(SUM_DY + cols, mask=col_mask, other=0.0) / R
        mean_dyxhat = tl.load(SUM_DYXHAT + cols, mask=col_mask, other=0.0) / R
        x = tl.load(X + _tile_offsets(rows, cols, S, stride_xn, stride_xc, stride_xs, FLAT, VEC), mask=mask,
                other=0.0)
        xhat = ((x.to(ACC) - pivot[:, None]) - mean[:, None]) * rstd[:, None]
        dx = (dy - mean_dy[:, None] - xhat * mean_dyxhat[:, None]) * scale[:, None]
    else:
        dx = dy * scale[:, None]
    tl.store(DX + _tile_offsets(rows, cols, S, stride_gn, stride_gc, stride_gs, FLAT, VEC), dx, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *) as (N, C, S): a view whenever the spatial dims can be merged (contiguous,
    channels_last, (N, L, C)-transposed), otherwise a contiguous copy."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _empty_like_input(x: torch.Tensor) -> torch.Tensor:
    """An output in the memory format torch's batch_norm gives: channels_last for a channels_last
    input, contiguous otherwise (so it can always be viewed as (N, C, S))."""
    fmt = torch.contiguous_format
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            fmt = torch.channels_last
        elif x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            fmt = torch.channels_last_3d
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _blocks(x3: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): wide in channels when channels are the fastest-moving dim in memory
    (channels_last, (N, C) input), long in r otherwise, so a warp reads contiguous runs either way."""
    N, C, S = x3.shape
    R = N * S
    channels_fastest = x3.stride(1) == 1 and (S == 1 or x3.stride(2) >= C)
    max_c = 64 if channels_fastest else 4
    block_c = max(2, min(triton.next_power_of_2(C), max_c))
    block_r = max(16, min(triton.next_power_of_2(R), TILE_ELEMENTS // block_c))
    return block_r, block_c


def _split(x3: torch.Tensor, block_r: int, block_c: int) -> tuple[int, int]:
    """(programs G along r, rows per program): enough programs to fill the device, each taking a
    whole number of tiles."""
    N, C, S = x3.shape
    R = N * S
    c_blocks = triton.cdiv(C, block_c)
    target = num_programs(x3.device, 1 << 30)
    tiles = triton.cdiv(R, block_r)
    programs = max(1, min(tiles, triton.cdiv(target, c_blocks)))
    rows_per_program = triton.cdiv(tiles, programs) * block_r
    return triton.cdiv(R, rows_per_program), rows_per_program


def _row_stride(t3: torch.Tensor) -> int | None:
    """The stride of r = n * S + s in an (N, C, S) tensor when one stride describes it (S or N of
    1, or n's stride S times s's: channels_last, (N, L, C)-transposed, (N, C)), else None."""
    N, _, S = t3.shape
    stride_n, _, stride_s = t3.stride()
    if S == 1:
        return stride_n
    if N == 1 or stride_n == S * stride_s:
        return stride_s
    return None


def _rows_layout(*tensors: torch.Tensor) -> tuple[bool, int, list[tuple[int, int, int]]]:
    """How one launch indexes r in ``tensors`` (N, C, S), the same shape: (FLAT, VEC, strides).

    FLAT when every tensor has a single r stride (passed as the third stride): no division by S.
    VEC, the r-vector width (a power of two up to 16 bytes), when every tensor has unit r stride,
    N * S is a multiple of VEC and, unless flat, so is S and n's and c's strides (for flat ones,
    c's): each aligned group of VEC rows is then VEC contiguous elements starting at a multiple of
    VEC. The launch's tiles and bounds start on multiples of VEC, so the kernels' hints hold.
    """
    N, _, S = tensors[0].shape
    row_strides = [_row_stride(t) for t in tensors]
    flat = all(r is not None for r in row_strides)
    strides = [(t.stride(0), t.stride(1), r if flat else t.stride(2)) for t, r in zip(tensors, row_strides)]
    vec = 16 // tensors[0].element_size()
    while vec > 1:
        def aligned(stride_n, stride_c, stride_r):
            if stride_r != 1 or (N * S) % vec or stride_c % vec:
                return False
            return flat or (S % vec == 0 and stride_n % vec == 0)
        if all(aligned(*st) for st in strides):
            break
        vec //= 2
    return flat, vec, strides


def _index_dtype(R: int, block_r: int):
    return tl.int64 if R + block_r >= 2**31 else tl.int32


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_norm_fwd(x, weight, bias, running_mean, running_var, training: bool, momentum: float,
                   eps: float):
    """Batch norm of x (N, C, *) fp16/bf16/fp32/fp64, any strides; weight, bias: (C,) or None.

    ``training``: batch statistics, and the running buffers (C,) -- when given -- are updated in
    place. Otherwise the running buffers normalise. Returns y (same shape and dtype as x,
    channels_last if x is), and mean, rstd (C,) in float32 (float64 for float64 x) for
    :func:`batch_norm_bwd` (in training the mean is relative to the pivot x[0, c, 0]).
    """
    N, C = x.shape[0], x.shape[1]
    x3 = _as_3d(x)
    S = x3.shape[2]
    R = N * S
    # The kernels index the (C,) parameters by channel: a strided or expanded one is copied.
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = _empty_like_input(x)
    y3 = y.view(N, C, S)
    stats = _stats_dtype(x)
    mean = torch.zeros(C, dtype=stats, device=x.device)
    rstd = torch.zeros(C, dtype=stats, device=x.device)
    if R == 0 or C == 0:  # as torch: nothing to normalise, running buffers untouched
        return y, mean, rstd
    ACC = acc_dtype(x.dtype)
    BLOCK_R, BLOCK_C = _blocks(x3)
    IDX = _index_dtype(R, BLOCK_R)
    c_blocks = triton.cdiv(C, BLOCK_C)
    if training:
        G, rows_per_program = _split(x3, BLOCK_R, BLOCK_C)
        part_mean = torch.empty((G, C), dtype=stats, device=x.device)
        part_m2 = torch.empty((G, C), dtype=stats, device=x.device)
        flat, vec, (x_strides,) = _rows_layout(x3)
        _bn_stats_kernel[check_grid((G * c_blocks,), "batch_norm")](
            x3, part_mean, part_m2, C, S, R, rows_per_program // BLOCK_R, *x_strides,
            FLAT=flat, VEC=vec, IDX=IDX, ACC=ACC, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
            # 16 warps for a full tile: its three running per-channel statistics and the pivot,
            # on top of the tile, spilled at 8 (fp16, 64 x 64 channels-last tiles, sm_90a).
            num_warps=16 if BLOCK_R * BLOCK_C >= TILE_ELEMENTS else num_warps_for(BLOCK_R * BLOCK_C))
        update = running_mean is not None
        # Running buffers are updated through contiguous storage; copied back if they were views.
        rm = running_mean.contiguous() if update else mean
        rv = running_var.contiguous() if update else rstd
        fin_c = min(FINALIZE_BLOCK_C, max(2, triton.next_power_of_2(C)))
        _bn_finalize_kernel[check_grid((triton.cdiv(C, fin_c),), "batch_norm")](
            x3, part_mean, part_m2, mean, rstd, rm, rv,
            C, R, G, rows_per_program, R - (G - 1) * rows_per_program, x3.stride(1),
            float(momentum), float(eps), UPDATE_RUNNING=update, ACC=ACC,
            BLOCK_G=FINALIZE_BLOCK_G, BLOCK_C=fin_c)
        if update and rm.data_ptr() != running_mean.data_ptr():
            running_mean.copy_(rm)
        if update and rv.data_ptr() != running_var.data_ptr():
            running_var.copy_(rv)
    else:
        FIN_C = 128
        _bn_running_stats_kernel[check_grid((triton.cdiv(C, FIN_C),), "batch_norm")](
            running_mean.contiguous(), running_var.contiguous(), mean, rstd, C, float(eps),
            ACC=ACC, BLOCK_C=FIN_C)
    flat, vec, (x_strides, y_strides) = _rows_layout(x3, y3)
    _bn_apply_kernel[check_grid((triton.cdiv(R, BLOCK_R) * c_blocks,), "batch_norm")](
        x3, y3, mean, rstd, weight if weight is not None else mean, bias if bias is not None else mean,
        C, S, R, *x_strides, *y_strides,
        SHIFTED=training, HAS_W=weight is not None, HAS_B=bias is not None, FLAT=flat, VEC=vec,
        IDX=IDX, ACC=ACC, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        num_warps=num_warps_for(BLOCK_R * BLOCK_C))
    return y, mean, rstd


def batch_norm_bwd(dy, x, weight, mean, rstd, training: bool, need_param_grads: bool):
    """Gradients of :func:`batch_norm_fwd`. dy, x: (N, C, *) any strides; weight (C,) or None;
    mean, rstd from the forward (``training`` as there).

    Returns dx (x's shape and dtype, channels_last if x is), and dweight = sum(dy * xhat) and
    dbias = sum(dy), each (C,) in float32 (float64 for float64 x) -- or None, None when
    ``need_param_grads`` is False and they are not needed for dx (evaluation).
    """
    N, C = x.shape[0], x.shape[1]
    x3, dy3 = _as_3d(x), _as_3d(dy)
    S = x3.shape[2]
    weight = None if weight is None else weight.contiguous()  # indexed by channel, as in the forward
    R = N * S
    dx = _empty_like_input(x)
    dx3 = dx.view(N, C, S)
    # The two channel sums are needed for dx in training, and for the parameter gradients.
    reduce = training or need_param_grads
    sum_dy = torch.zeros(C, dtype=mean.dtype, device=x.device)
    sum_dyxhat = torch.zeros(C, dtype=mean.dtype, device=x.device)
    if R == 0 or C == 0:
        return (dx, sum_dyxhat, sum_dy) if need_param_grads else (dx, None, None)
    ACC = acc_dtype(x.dtype)
    BLOCK_R, BLOCK_C = _blocks(x3)
    IDX = _index_dtype(R, BLOCK_R)
    c_blocks = triton.cdiv(C, BLOCK_C)
    warps = num_warps_for(BLOCK_R * BLOCK_C)
    if reduce:
        G, rows_per_program = _split(x3, BLOCK_R, BLOCK_C)
        part_dy = torch.empty((G, C), dtype=mean.dtype, device=x.device)
        part_dyxhat = torch.empty((G, C), dtype=mean.dtype, device=x.device)
        flat, vec, strides = _rows_layout(x3, dy3)
        _bn_bwd_reduce_kernel[check_grid((G * c_blocks,), "batch_norm")](
            x3, dy3, mean, rstd, part_dy, part_dyxhat, C, S, R, rows_per_program // BLOCK_R,
            *strides[0], *strides[1], SHIFTED=training, FLAT=flat, VEC=vec, IDX=IDX, ACC=ACC, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps)
        sum_dy, sum_dyxhat = sum_partials((part_dy, mean.dtype), (part_dyxhat, mean.dtype))
    # x is read in training only: evaluation's layout is dy's and dx's.
    flat, vec, strides = _rows_layout(dy3, dx3, *((x3,) if training else ()))
    (dy_strides, dx_strides), x_strides = strides[:2], (strides[2] if training else x3.stride())
    _bn_bwd_dx_kernel[check_grid((triton.cdiv(R, BLOCK_R) * c_blocks,), "batch_norm")](
        x3, dy3, dx3, mean, rstd, weight if weight is not None else mean, sum_dy, sum_dyxhat,
        C, S, R, *x_strides, *dy_strides, *dx_strides,
        TRAINING=training, HAS_W=weight is not None, FLAT=flat, VEC=vec,
        IDX=IDX, ACC=ACC, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps)
    return (dx, sum_dyxhat, sum_dy) if need_param_grads else (dx, None, None)
