"""Embedding lookup (gather), its deterministic backward (segment sum), and the fused BERT
embedding block.

Forward of ``embedding``: ``out[m, :] = weight[idx[m], :]`` for the (M,) flat indices. One program
copies a (BLOCK_M tokens, BLOCK_N columns) tile, so each load is a vectorised slice of a weight row
and a program moves a few thousand elements. Nothing is saved but the indices.

Backward: ``dweight[v] = sum over m with idx[m] == v of dout[m]`` (divided by that count with
``scale_grad_by_freq``; the ``padding_idx`` row stays zero). Many tokens can hit the same row, so a
plain parallel scatter needs float atomics -- whose summation order, and so result, changes from
run to run, and which Triton's interpreter cannot do in fp16 at all. The only path here is
deterministic, by sorting instead:

1. The launcher sorts the flat indices with ``torch.sort(stable=True)``. In sorted order a *run*
   is a stretch of equal indices, cut into *pieces* of at most ``ROWS_PER_PIECE`` tokens, so that a
   padding token or a token-type id repeated 16K times is still summed by many programs in
   parallel. Run and piece boundaries come from comparisons, cumulative max/min and cumsum over
   the sorted list -- tensors of the input's size, never read back, so no host synchronisation.
2. ``_segment_sum_kernel`` runs one slot per sorted position (and column block): a slot that
   starts a piece sums its ``dout`` rows, ``BLOCK_R`` of them per step into a (BLOCK_R, BLOCK_N)
   float32 accumulator reduced once at the end; the other slots return at once. A single-piece
   run (the usual vocabulary lookup) is written straight into ``dweight[v]``; the pieces of a
   longer run go to a (2K / ROWS_PER_PIECE, N) float32 buffer, and a second launch of the same
   kernel adds each long run's pieces in order.

Each row of ``dweight`` is written by exactly one program and every sum has a fixed order, so
gradients are bitwise reproducible; the price is one sort of M integers (cheap next to the M x N
rows moved). Rows never looked up are zero (``dweight`` starts zeroed).

Fused BERT embeddings (one program per token, its D-wide row in registers)::

    s   = word[wid] + position[pid] + token_type[tid]            (float32)
    y   = (s - mean(s)) * rstd * ln_weight + ln_bias,  rstd = 1 / sqrt(var(s) + eps)
    out = keep(seed, m, d) ? y / (1 - p) : 0       dropout: lane d % 4 of Philox counter
                                                    m * ceil(D / 4) + d // 4

Saved for the backward: the three index vectors, mean and rstd (M,) float32 and the seed -- no
sum, no mask. The backward kernel recomputes s from the tables, regenerates the mask, and writes
ds, the LayerNorm input gradient (see kernels/layer_norm.py), as an (M, D) float32 buffer plus
per-program partials of d ln_weight / d ln_bias (reduced by ``sum_partials``). ds is then scattered
into the three tables by one segment sum over the 3M keys ``wid``, ``V + pid``, ``V + P + tid`` of
the stacked (V + P + T, D) gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout import keep_scale
from .layer_norm import scale_shift
from .utils import (INTERPRET, PER_CALL_ARGS, acc_dtype, block_size, check_grid, dropout_counters,
                    dropout_keep, dropout_threshold, ensure_contiguous, num_programs, num_warps_for,
                    partial_rows, sum_partials)

# Elements one gather program moves. The interpreter runs programs one after another, each with a
# fixed overhead, so it gets fewer, larger tiles.
GATHER_TILE = 16384 if INTERPRET else 4096
# Longest run of equal sorted indices one program sums before the sum is split over programs.
ROWS_PER_PIECE = 32 if INTERPRET else 256
# Widest row the fused BERT kernel keeps in registers.
MAX_BERT_DIM = 16384


# ---------------------------------------------------------------------------------------------
# Gather
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _gather_kernel(IDX, W, OUT, M, N, V, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[m, :] = W[IDX[m], :] for one tile. IDX: (M,) int32/int64; W: (V, N); OUT: (M, N).
    An index outside [0, V) reads nothing and gives a zero row (the caller reports it)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    idx = tl.load(IDX + rows, mask=row_mask, other=0).to(tl.int64)  # int64: idx * N may pass 2^31
    mask = row_mask[:, None] & (cols < N)[None, :]
    in_table = ((idx >= 0) & (idx < V))[:, None]
    vals = tl.load(W + idx[:, None] * N + cols[None, :], mask=mask & in_table, other=0.0)
    tl.store(OUT + rows[:, None] * N + cols[None, :], vals, mask=mask)


@ensure_contiguous
def embedding_fwd(idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows of weight (V, N) at idx (M,) int32/int64. Returns (M, N) in weight's dtype; the row of an
    index outside [0, V) is zero (never read out of bounds; the caller checks the range)."""
    M, (V, N) = idx.numel(), weight.shape
    out = torch.empty((M, N), dtype=weight.dtype, device=weight.device)
    if M == 0 or N == 0:
        return out
    BLOCK_N = min(block_size(N), 1024)
    BLOCK_M = min(max(1, GATHER_TILE // BLOCK_N), triton.next_power_of_2(M))
    grid = check_grid((triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N)), "embedding")
    _gather_kernel[grid](idx, weight, out, M, N, V, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                         num_warps=num_warps_for(BLOCK_M * BLOCK_N))
    return out


# ---------------------------------------------------------------------------------------------
# Deterministic scatter-add: segment sums over sorted indices
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _segment_sum_kernel(
    SRC, ROWS, LO, HI, DEST, PART_DEST, COUNTS, OUT, PART,  # SRC: (R, N); ROWS: (K,); LO..COUNTS: (S,)
    N, INDIRECT: tl.constexpr, SCALE_BY_FREQ: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sum rows LO[s] .. HI[s] - 1 of SRC (through ROWS when INDIRECT) for slot s = program_id(0).

    The sum goes to OUT[DEST[s]] (divided by COUNTS[s] when SCALE_BY_FREQ) if DEST[s] >= 0, and
    to PART[PART_DEST[s]], a partial row for a second pass, if PART_DEST[s] >= 0; a slot with
    neither does nothing (the launch is sized from shapes, so many slots are empty).
    """
    seg = tl.program_id(0)
    dest = tl.load(DEST + seg)  # int64
    part_dest = tl.load(PART_DEST + seg)
    if (dest >= 0) | (part_dest >= 0):
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        lo = tl.load(LO + seg)  # int64
        hi = tl.load(HI + seg)
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=ACC)
        for start in range(0, hi - lo, BLOCK_R):
            pos = lo + start + tl.arange(0, BLOCK_R)
            pos_mask = pos < hi
            if INDIRECT:
                rows = tl.load(ROWS + pos, mask=pos_mask, other=0)
            else:
                rows = pos
            mask = pos_mask[:, None] & col_mask[None, :]
            acc += tl.load(SRC + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(ACC)
        total = tl.sum(acc, axis=0)
        if part_dest >= 0:
            tl.store(PART + part_dest * N + cols, total, mask=col_mask)
        if dest >= 0:
            if SCALE_BY_FREQ:
                total = total / tl.load(COUNTS + seg).to(ACC)
            tl.store(OUT + dest * N + cols, total, mask=col_mask)


def _segment_sum_into(out: torch.Tensor, src: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor | None,
                      padding_idx: int, scale_grad_by_freq: bool) -> None:
    """out[k] = sum of src[r] over the pairs (keys[i], rows[i]) with keys[i] == k, deterministically.

    out: (V, N) zeroed, any float dtype; src: (R, N) contiguous; keys: (K,) int64; rows: (K,) int64
    row of src for each key, or None meaning rows[i] = i. Row ``padding_idx`` of out is left alone
    (-1: none), and so is every key outside [0, V) (never written out of bounds).

    Every buffer and grid is sized from K alone -- nothing is read back from the device. In sorted
    order, a *run* is a stretch of equal keys and a *piece* the ROWS_PER_PIECE rows of a run from
    each multiple of ROWS_PER_PIECE on. Pass 1 has one slot per sorted position: a slot that starts
    a piece sums it, into out directly when its run is a single piece, else into a partial row
    (runs of more than ROWS_PER_PIECE rows hold under 2K / ROWS_PER_PIECE pieces in all). Pass 2
    (only when K > ROWS_PER_PIECE) adds each long run's consecutive partial rows in order.
    """
    N, K = src.shape[1], keys.numel()
    V = out.shape[0]
    if K == 0 or N == 0:
        return
    R = ROWS_PER_PIECE
    device = keys.device
    sorted_keys, order = torch.sort(keys, stable=True)  # stable: equal keys keep token order
    src_rows = order if rows is None else rows[order]
    pos = torch.arange(K, device=device)
    is_start = torch.ones(K, dtype=torch.bool, device=device)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    is_end = torch.ones(K, dtype=torch.bool, device=device)
    is_end[:-1] = is_start[1:]
    run_start = torch.cummax(torch.where(is_start, pos, 0), 0).values
    run_end = torch.cummin(torch.where(is_end, pos + 1, K).flip(0), 0).values.flip(0)
    count = run_end - run_start
    piece_head = (pos - run_start) % R == 0
    long_run = count > R
    valid = (sorted_keys >= 0) & (sorted_keys < V) & (sorted_keys != padding_idx)
    table_dest = torch.where(valid, sorted_keys, -1)
    part_index = torch.cumsum(piece_head & long_run, 0) - 1
    none = torch.full_like(pos, -1)

    acc = acc_dtype(src.dtype)
    BLOCK_N = min(block_size(N), 256)
    BLOCK_R = 16
    common = dict(N=N, SCALE_BY_FREQ=scale_grad_by_freq, ACC=acc, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N,
                  num_warps=num_warps_for(BLOCK_R * BLOCK_N))
    long_pieces = 2 * K // R + 1 if K > R else 0
    partial = torch.empty((long_pieces, N), dtype=torch.float64 if acc == tl.float64 else torch.float32,
                          device=src.device)
    _segment_sum_kernel[check_grid((K, triton.cdiv(N, BLOCK_N)), "embedding")](
        src, src_rows, pos, torch.minimum(pos + R, run_end),
        torch.where(piece_head & ~long_run, table_dest, -1),
        torch.where(piece_head & long_run, part_index, -1), count, out, partial,
        INDIRECT=True, **common)
    if K <= R:  # no run can be longer than a piece
        return
    # Pass 2: one slot per long run, packed into the first slots of a K // (R + 1) grid.
    slots = K // (R + 1)
    first = is_start & long_run
    slot = torch.where(first, torch.cumsum(first, 0) - 1, slots)  # slot `slots`: a discard row
    lo, dest, counts = (torch.full((slots + 1,), -1, dtype=torch.int64, device=device) for _ in range(3))
    lo.scatter_(0, slot, part_index)
    dest.scatter_(0, slot, table_dest)
    counts.scatter_(0, slot, count)
    hi = lo + (counts + R - 1) // R
    _segment_sum_kernel[check_grid((slots, triton.cdiv(N, BLOCK_N)), "embedding")](
        partial, partial, lo, hi, dest, none, counts, out, partial, INDIRECT=False, **common)


@ensure_contiguous
def embedding_bwd(dout: torch.Tensor, idx: torch.Tensor, num_embeddings: int, padding_idx: int | None,
                  scale_grad_by_freq: bool, weight_dtype: torch.dtype) -> torch.Tensor:
    """Gradient of :func:`embedding_fwd` with respect to the weight, deterministically.

    dout: (M, N); idx: (M,) int32/int64. Returns (num_embeddings, N) in ``weight_dtype``: row v is
    the sum of the dout rows whose index is v (divided by their count when ``scale_grad_by_freq``);
    row ``padding_idx`` (if not None, already in [0, num_embeddings)) is zero.
    """
    dweight = torch.zeros((num_embeddings, dout.shape[1]), dtype=weight_dtype, device=dout.device)
    _segment_sum_into(dweight, dout, idx.to(torch.int64), None,
                      -1 if padding_idx is None else padding_idx, scale_grad_by_freq)
    return dweight


# ---------------------------------------------------------------------------------------------
# Fused BERT embeddings: three lookups, sum, LayerNorm, dropout
# ---------------------------------------------------------------------------------------------

@triton.jit
def _embedding_sum(WORD_IDS, POS_IDS, TYPE_IDS, WORD, POS, TYPE, row, cols, mask, N, V, P, T,
                   ACC: tl.constexpr):
    """word[wid] + position[pid] + token_type[tid] for token ``row``, in ACC; 0 outside ``mask``.
    Tables have V, P, T rows; an index outside its table reads nothing (the caller reports it)."""
    s = _table_row(WORD_IDS, WORD, row, cols, mask, N, V, ACC)
    s += _table_row(POS_IDS, POS, row, cols, mask, N, P, ACC)
    s += _table_row(TYPE_IDS, TYPE, row, cols, mask, N, T, ACC)
    return s


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _table_row(IDS, TABLE, row, cols, mask, N, rows, ACC: tl.constexpr):
    """TABLE[IDS[row], cols] in ACC, 0 outside ``mask`` -- and for an index outside [0, rows),
    whose row is replaced by row 0 so that nothing is read out of bounds, then zeroed."""
    idx = tl.load(IDS + row).to(tl.int64)
    ok = (idx >= 0) & (idx < rows)
    vals = tl.load(TABLE + tl.where(ok, idx, 0) * N + cols, mask=mask, other=0.0).to(ACC)
    return tl.where(ok, vals, 0.0)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _bert_embeddings_fwd_kernel(
    WORD_IDS, POS_IDS, TYPE_IDS, WORD, POS, TYPE, LN_W, LN_B, OUT, MEAN, RSTD,  # ids (M,); tables (*, N)
    # SEED: (1,) int64, read only with DROPOUT; V, P, T: rows of the tables
    SEED, N, V, P, T, eps: tl.float64, threshold, scale: tl.float64,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, DROPOUT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if ACC != tl.float64:  # float64 scalars: see kernels/utils.py
        eps = tl.cast(eps, ACC)
        scale = tl.cast(scale, ACC)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    s = _embedding_sum(WORD_IDS, POS_IDS, TYPE_IDS, WORD, POS, TYPE, row, cols, mask, N, V, P, T, ACC)
    mean = tl.sum(s, axis=0) / N
    xc = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
    y = scale_shift(xc * rstd, LN_W, LN_B, cols, mask, HAS_W, HAS_B, ACC)
    offsets = row * N + cols
    if DROPOUT:
        keep = dropout_keep(tl.load(SEED), dropout_counters(row, 0, N, BLOCK_N), threshold)
        y = tl.where(keep, y * scale, y * 0.0)
    tl.store(OUT + offsets, y, mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _bert_embeddings_bwd_kernel(
    WORD_IDS, POS_IDS, TYPE_IDS, WORD, POS, TYPE, LN_W, MEAN, RSTD, DOUT, DS, DW_PART, DB_PART,
    SEED, M, N, V, P, T, rows_per_program, threshold, scale: tl.float64,  # DS: (M, N) ACC; *_PART: (G, N)
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, DROPOUT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if ACC != tl.float64:  # float64 scalars: see kernels/utils.py
        scale = tl.cast(scale, ACC)
    pid = tl.program_id(0)
    seed = tl.load(SEED) if DROPOUT else 0
    row_start = pid.to(tl.int64) * rows_per_program
    num_rows = tl.minimum(rows_per_program, M - row_start)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_W:
        w = tl.load(LN_W + cols, mask=mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    for i in range(0, num_rows):
        row = row_start + i
        offsets = row * N + cols
        s = _embedding_sum(WORD_IDS, POS_IDS, TYPE_IDS, WORD, POS, TYPE, row, cols, mask, N, V, P, T, ACC)
        # The stored mean is rounded to float32; re-centre on it exactly (see kernels/layer_norm.py).
        xs = tl.where(mask, s - tl.load(MEAN + row), 0.0)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (xs - tl.sum(xs, axis=0) / N) * rstd, 0.0)
        dy = tl.load(DOUT + offsets, mask=mask, other=0.0).to(ACC)
        if DROPOUT:
            keep = dropout_keep(seed, dropout_counters(row, 0, N, BLOCK_N), threshold)
            dy = tl.where(keep, dy * scale, dy * 0.0)
        g = dy * w if HAS_W else dy
        ds = (g - xhat * (tl.sum(xhat * g, axis=0) / N) - tl.sum(g, axis=0) / N) * rstd
        tl.store(DS + offsets, ds, mask=mask)
        if HAS_W:
            dw += dy * xhat
        if HAS_B:
            db += dy
    if HAS_W:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB_PART + pid.to(tl.int64) * N + cols, db, mask=mask)


def _table_rows(*tables: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape[0] for t in tables)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@ensure_contiguous
def bert_embeddings_fwd(word_ids, pos_ids, type_ids, word, position, token_type, ln_weight, ln_bias,
                        eps: float, p: float, seed: torch.Tensor | None):
    """dropout(LayerNorm(word[word_ids] + position[pos_ids] + token_type[type_ids])).

    ids: (M,) int32/int64 (out of range: a zero row, never read); word (V, N), position (P, N),
    token_type (T, N) any float dtype;
    ln_weight, ln_bias: (N,) or None; N <= MAX_BERT_DIM. ``seed``: (1,) int64 on the tables' device,
    or None (with ``p`` = 0: no dropout, no random numbers). Returns out
    (M, N) in the tables' promoted dtype, and mean, rstd (M,) float32 (float64 for float64 tables).
    """
    M, N = word_ids.numel(), word.shape[1]
    dtype = torch.promote_types(torch.promote_types(word.dtype, position.dtype), token_type.dtype)
    out = torch.empty((M, N), dtype=dtype, device=word.device)
    mean = torch.empty(M, dtype=_stats_dtype(dtype), device=word.device)
    rstd = torch.empty(M, dtype=_stats_dtype(dtype), device=word.device)
    if M == 0 or N == 0:
        return out, mean, rstd
    BLOCK_N = block_size(N)
    _bert_embeddings_fwd_kernel[check_grid((M,), "bert_embeddings")](
        word_ids, pos_ids, type_ids, word, position, token_type,
        ln_weight if ln_weight is not None else word, ln_bias if ln_bias is not None else word,
        out, mean, rstd, seed if seed is not None else mean, N, *_table_rows(word, position, token_type),
        eps, dropout_threshold(p), keep_scale(p),
        HAS_W=ln_weight is not None, HAS_B=ln_bias is not None, DROPOUT=seed is not None and p > 0.0,
        ACC=acc_dtype(dtype), BLOCK_N=BLOCK_N, num_warps=num_warps_for(BLOCK_N),
    )
    return out, mean, rstd


@ensure_contiguous
def bert_embeddings_bwd(dout, word_ids, pos_ids, type_ids, word, position, token_type, ln_weight,
                        mean, rstd, p: float, seed: torch.Tensor | None, padding_idx: int | None,
                        needs_grad: tuple[bool, bool, bool], ln_bias_dtype: torch.dtype | None):
    """Gradients of :func:`bert_embeddings_fwd`.

    dout: (M, N); the rest as passed to / returned by the forward; ``padding_idx``: the word row
    that gets no gradient, or None; ``needs_grad``: which of word, position, token_type want one.
    Returns d_word, d_position, d_token_type (each in its table's dtype, or None where not
    needed), d_ln_weight (N,) in ln_weight's dtype or None, d_ln_bias (N,) in ``ln_bias_dtype`` or
    None.
    """
    M, N = word_ids.numel(), word.shape[1]
    has_w, has_b = ln_weight is not None, ln_bias_dtype is not None
    device = word.device
    ds = torch.empty((M, N), dtype=mean.dtype, device=device)
    programs = num_programs(device, M)
    rows_per_program = triton.cdiv(M, programs) if M else 0
    programs = triton.cdiv(M, rows_per_program) if M else 0
    # One block per row (N <= MAX_BERT_DIM): each program stores its partial rows whole.
    dw_part, db_part = (partial_rows(programs, N, wanted, mean.dtype, device, False)
                        for wanted in (has_w, has_b))
    if M > 0 and N > 0:
        BLOCK_N = block_size(N)
        _bert_embeddings_bwd_kernel[check_grid((programs,), "bert_embeddings")](
            word_ids, pos_ids, type_ids, word, position, token_type,
            ln_weight if has_w else word, mean, rstd, dout, ds, dw_part, db_part,
            seed if seed is not None else mean, M, N, *_table_rows(word, position, token_type),
            rows_per_program, dropout_threshold(p), keep_scale(p),
            HAS_W=has_w, HAS_B=has_b, DROPOUT=seed is not None and p > 0.0,
            ACC=acc_dtype(mean.dtype), BLOCK_N=BLOCK_N, num_warps=num_warps_for(BLOCK_N),
        )
    d_ln_w, d_ln_b = sum_partials((dw_part, ln_weight.dtype) if has_w else None,
                                  (db_part, ln_bias_dtype) if has_b else None)

    # One segment sum scatters ds into every table that wants a gradient, stacked row-wise: table
    # t's rows start at offset[t] of the stacked gradient, its keys are ids + offset[t].
    tables = [(word, word_ids), (position, pos_ids), (token_type, type_ids)]
    wanted = [t for t, need in zip(tables, needs_grad) if need]
    grads: list[torch.Tensor | None] = [None, None, None]
    if not wanted:
        return (*grads, d_ln_w, d_ln_b)
    dtypes = {t.dtype for t, _ in wanted}
    stack_dtype = dtypes.pop() if len(dtypes) == 1 else mean.dtype
    stacked = torch.zeros((sum(t.shape[0] for t, _ in wanted), N), dtype=stack_dtype, device=device)
    keys, offset = [], 0
    for table, ids in wanted:
        keys.append(ids.to(torch.int64) + offset)
        offset += table.shape[0]
    rows = torch.arange(M, device=device, dtype=torch.int64).repeat(len(wanted))
    pad = padding_idx if padding_idx is not None and needs_grad[0] else -1  # word table comes first
    _segment_sum_into(stacked, ds, torch.cat(keys), rows, pad, False)
    start = 0
    for i, need in enumerate(needs_grad):
        if need:
            table = tables[i][0]
            grads[i] = stacked[start:start + table.shape[0]].to(table.dtype)
            start += table.shape[0]
    return (*grads, d_ln_w, d_ln_b)
