"""Fused scaled dot-product attention (FlashAttention-2 style), forward and backward.

Shapes: q (B, H, L, D), k (B, H_kv, S, D), v (B, H_kv, S, Dv) with H a multiple of H_kv (grouped
query attention: query head h reads key/value head h // (H // H_kv), no copies); fp16, bf16 or
fp32; D, Dv <= 256. Any strides, as long as the last dimension is contiguous (views of a packed
QKV projection run without a copy).

Forward. One program owns BLOCK_M query rows of one (batch, head) and keeps them on chip while it
streams BLOCK_N key/value rows at a time. Scores are taken in base 2 -- scale * log2(e) is folded
into one multiply, so the exponentials are ``exp2`` -- with a running row maximum m and row sum l
(online softmax)::

    s     = (q k^T) * scale * log2(e)  [+ mask * log2(e)]     masked / out-of-range entries: -inf
    m'    = max(m, rowmax(s))
    p     = exp2(s - m')
    l     = l * exp2(m - m') + rowsum(p)
    acc   = acc * exp2(m - m') + dropout(p) v
    o     = acc / l,     lse = m + log2(l)                 (base-2 logsumexp of log2(e) * scores)
                         lse_lo = (m + log2(l)) - lse      (its rounding error, exactly: two-sum)

Everything accumulates in float32; o is written once; the L x S score matrix never reaches memory.
Key tiles wholly inside S (and, when causal, wholly left of the query tile's first row) skip the
column and causal tests: only the boundary tiles pay for them.
Saved for the backward: o and the row statistics (lse, lse_lo), (B, H, 2, L) float32, kept in base
2 (a conversion to natural log and back would move lse by an ulp of m: at a row max of 1e4 a
recomputed P of 1 came back 1 +- 7e-4). lse_lo carries what lse cannot hold: in a row masked
throughout by finfo.min, m is about -1.4e38 and log2(l) is far below its ulp; P = exp2(s - lse)
alone would come back 1 instead of 1 / l, gradients l times too large.
Rows whose keys are all masked have l = 0: their output is 0 and their lse is -inf (the backward
treats it as "nothing attended").
With ``is_causal`` (top-left aligned, as torch: row i attends columns j <= i, also when L != S)
key tiles entirely right of a query tile are never loaded, and the query tiles (forward, dQ) are
handed out last first, the ones with the most keys to visit.

Masks are read through their strides, broadcast to (B, H, L, S): a (B, 1, 1, S) padding mask has
stride 0 on the head and row axes and costs S values per batch. A mask that does not vary along
the query rows (stride 0 there, or L = 1) is read as one vector per key tile and broadcast over
the tile's rows (MASK_KEYS), others tile by tile. Boolean masks keep True entries;
float masks are added to the scores. Float-mask values below -1e38 (finfo(float32).min, as
Hugging Face builds masks) are clamped to -1e38 so that they stay finite after the scaling by
log2(e): a row masked throughout by such values averages V, as torch's arithmetic does, and its
gradient is that average's (through lse_lo).

Dropout drops entries of the normalised probabilities P with a counter-based generator
(``dropout_keep``): element (i, j) of head b * H + h uses lane j % 4 of Philox counter
``((b * H + h) * L + i) * ceil(S / 4) + j // 4`` -- four keys per Philox call -- keyed by a seed the
kernels load from a (1,) int64 tensor, so the backward regenerates exactly the forward's mask;
nothing is stored, and the host never reads the seed. (Varlen: counter ``... + k_lo // 4 + (j - k_lo)
// 4``, lane ``(j - k_lo) % 4``, with k_lo the sequence's first key, where every kernel's key tiles
start.)

Backward, with P = exp2((s - lse) - lse_lo) recomputed tile by tile from q, k and the saved lse,
Z = the dropout mask scaled by 1 / (1 - p) (all ones without dropout)::

    delta = rowsum(dO * O)                      preprocessing pass, (B, H, L) float32
    dV    = (P * Z)^T dO
    dP    = (dO V^T) * Z
    dS    = P * (dP - delta)                    (also the gradient of an additive float mask)
    dQ    = scale * dS K,    dK = scale * dS^T Q

Two kernels, neither with atomics: one program per key/value tile (of one kv head) walks every
query tile of every query head sharing that kv head and accumulates dK, dV in registers; a second
program per query tile walks the key/value tiles and accumulates dQ. Both are deterministic.
That costs seven matrix products per (query tile, key tile) pair: the dQ kernel recomputes
q k^T and dO v^T. Opt-in (``atomic_dq``, FASTDL_ATTENTION_BACKWARD=atomic), the dK/dV kernel
also computes its tile's share of dQ, as FlashAttention-2 does -- dQ^T += K^T dS^T, oriented so
that the product's M dimension is the head dim (Hopper's warpgroup MMA needs 64 rows, which the
dK/dV kernel's few query rows are not) -- and adds it to a float32 (B, H, L, D) buffer with
atomics; the dQ kernel is not run: five products per pair, at the price of dq's last bits varying
from run to run (the order of the float32 additions). Its configs are lists of their own
(``_ATOMIC_KV_CONFIGS``); where there is none (Ampere-style GPUs, whose mma.sync accumulators
spill with the extra tiles) and for a mask gradient (stored by the dQ kernel) the deterministic
kernels run.
The dQ kernel can also write dS per (b, h) for a float mask that requires grad, in the mask's
row-major order (the dK/dV kernel, holding its tiles transposed, has neither the registers nor the
store pattern for it); the caller sums it over the mask's broadcast dimensions.

Varlen mode (``VARLEN``, :func:`varlen_attention_fwd` / :func:`varlen_attention_bwd`): sequences
packed without padding, q (Tq, H, D) and k, v (Tk, H_kv, D), viewed as one (1, H, T, D) batch
entry; a program's batch index b (``_tile_head_batch``) is the sequence, whose query rows
[cu_q[b], cu_q[b + 1]) and keys [cu_k[b], cu_k[b + 1]) each program loads first
(``_sequence_bounds``) and works within, in the packed tensors' row numbers, so the same tile
code, statistics layout (H, Tq) and dropout counters (unique over the packed rows) serve both
modes. The grid covers the longest sequence; programs past their sequence's end return at once.
Causal is bottom-right aligned there, as flash-attn's varlen functions: row i of a sequence with L
queries and S keys sees keys j <= i + S - L.

Head-dim chunks. A program that keeps a whole query (or key/value) tile and its fp32
accumulators in registers runs out of them at large head dims: ptxas then spills to local memory.
A config can cut the head dim in two ways (see the config tables): the q.k and dO.v products summed
over column chunks loaded one at a time (``BLOCK_DK``), and each program computing only a chunk of
its output columns (``BLOCK_DO``), ceil(head dim / BLOCK_DO) programs sharing a tile and each
recomputing its scores (the grid holds a program per chunk of the power-of-two block; those whose
columns all lie past the head dim return at once, and the q.k chunk loop stops at the head dim).
Whole-width configs (the common fp16/bf16 case) keep their tiles loaded once, outside the key loop.

Block sizes, warps, pipeline stages and chunk widths come from ``kernels.utils.autotune`` over a
short list per (GPU generation, head-dim class, dtype size, kernel) keyed by the head-dim blocks,
causality and sequence-length buckets; the first config of each list is a safe default and the
only one under the interpreter (which takes the Hopper lists unless told otherwise).
fp32 inputs use 3xTF32 dot products ("tf32x3": each operand split into a TF32 head and a TF32 tail,
a*b ~ ah*bh + ah*bl + al*bh on tensor cores): float32-level error (~4e-7 relative against float64,
like full-precision FMA dot products, where plain TF32 gives ~4e-4). The split doubles the
registers of every operand, so fp32 configs cut the head dim from 128 on; with that they compile in
seconds without spilling, where FMA dot products took minutes and spilled tens of KB per thread.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (PER_CALL_ARGS, autotune, check_grid, dropout_counters, dropout_keep, dropout_threshold,
                    gpu_capability, grid_2d)

LOG2E = tl.constexpr(1.4426950408889634)
# Float-mask values are clamped to this before the log2(e) scaling, so finfo(float32).min stays
# finite (it would overflow to -inf): an all-"min" row then averages V as torch's math does. It is
# the lowest float32 whose log2(e) multiple is finite: values above it keep their differences
# (a row of -1e38 and -3e38 attends the -1e38 keys only, as torch's), only values below collapse.
MASK_FLOOR = tl.constexpr(-2.3e38)

# MASK_KIND: no mask, a bool one (True = attend) or a float one (added); plus MASK_KEYS when the
# mask does not vary along the query rows (stride 0 along L, or L = 1: a padding mask).
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
MASK_KEYS = 2
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Configurations, per GPU generation (90: Hopper's warpgroup MMA and 227 KB of shared memory; 80:
# Ampere-style mma.sync and 163 KB), head-dim class (64, 128, 256) and element size (2: fp16/bf16,
# 4: fp32). Tuple: (BLOCK_M, BLOCK_N, num_warps, num_stages[, BLOCK_DK, BLOCK_DO]); the first
# entry of every list is the default (and the interpreter's only choice).
#
# BLOCK_DK and BLOCK_DO cut the head dim into chunks, to bound what a program keeps in registers
# (0 or absent: the whole head dim). BLOCK_DK: the q.k and dO.v products are summed over chunks
# of that many columns, each loaded from memory when it is needed, instead of one whole-width
# tile held for the program's life; BLOCK_DO: a program computes that many columns of its outputs
# (o, dq, dk, dv), and ceil(head dim / BLOCK_DO) programs share a tile, each recomputing the
# scores. fp32 needs both from head dim 128 on (3xTF32 operands are twice the registers of an
# fp32 tile, four times an fp16 one), the fp16/bf16 dK/dV kernel at head dim 256 (two full-width
# fp32 accumulators).
#
# A key ending in "dropout" holds the list for launches with dropout (where the table has one):
# the keep-mask's Philox rounds take registers that the larger tiles of the plain list lack.
#
# Every list is what the ahead-of-time compile gate (benchmarks/compile_report.py) passes for its
# target, in every variant (masks, causal, dropout, grouped heads, mask gradient): no register
# spills, shared memory within the target's limit, and on Hopper 64+ rows in the M dimension of
# every dot product (the smallest warpgroup MMA tile). The lists were chosen by compiling a few
# hundred candidates per target that way, biggest tiles first.
# ---------------------------------------------------------------------------------------------

_FWD_CONFIGS = {
    (90, 64, 2): [(64, 128, 8, 2), (128, 64, 8, 2), (64, 128, 8, 1), (128, 64, 8, 1)],
    (90, 64, 2, "dropout"): [(128, 64, 8, 2), (128, 64, 8, 1), (128, 64, 8, 4)],
    (90, 128, 2): [(128, 64, 8, 2), (128, 64, 8, 1), (128, 32, 8, 3)],
    (90, 128, 2, "dropout"): [(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 8, 2)],
    (90, 256, 2): [(128, 32, 8, 2), (128, 32, 8, 2, 0, 128), (64, 32, 8, 2), (64, 64, 8, 2, 0, 128)],
    (90, 256, 2, "dropout"): [(128, 32, 8, 2, 0, 128), (128, 32, 8, 2, 64, 128), (128, 32, 8, 2, 128, 128)],
    (90, 64, 4): [(128, 32, 8, 2), (128, 32, 8, 2, 32, 0), (128, 32, 8, 2, 16, 0), (64, 32, 8, 2)],
    (90, 64, 4, "dropout"): [(64, 32, 4, 1)],
    (90, 128, 4): [(128, 32, 8, 2, 16, 64), (64, 32, 4, 2, 32, 64)],
    (90, 128, 4, "dropout"): [(64, 16, 4, 2, 32, 64)],
    (90, 256, 4): [(128, 32, 8, 2, 16, 64), (128, 32, 8, 2, 32, 32),
                   (64, 32, 4, 2, 32, 64), (64, 32, 4, 2, 32, 32)],
    (90, 256, 4, "dropout"): [(128, 32, 8, 2, 32, 32), (64, 32, 4, 2, 32, 32)],
    (80, 64, 2): [(128, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 1)],
    (80, 64, 2, "dropout"): [(128, 64, 8, 4), (128, 64, 8, 1)],
    (80, 128, 2): [(64, 128, 8, 2), (128, 32, 8, 3), (32, 128, 8, 2), (64, 64, 8, 2)],
    (80, 128, 2, "dropout"): [(32, 128, 8, 2), (64, 64, 8, 2)],
    (80, 256, 2): [(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)],
    (80, 256, 2, "dropout"): [(32, 128, 8, 2), (64, 32, 8, 2)],
    (80, 64, 4): [(64, 32, 4, 2, 32, 0), (64, 32, 4, 2, 16, 0), (32, 64, 4, 2, 32, 0), (32, 64, 4, 2, 16, 0)],
    (80, 64, 4, "dropout"): [(64, 32, 4, 2, 16, 0)],
    (80, 128, 4): [(32, 32, 4, 2, 32, 64), (64, 16, 4, 2, 32, 64)],
    (80, 256, 4): [(32, 32, 4, 2, 32, 64), (64, 32, 4, 2, 32, 32),
                   (64, 16, 4, 2, 32, 64), (32, 32, 4, 2, 32, 32)],
    (80, 256, 4, "dropout"): [(32, 32, 4, 2, 32, 64), (64, 16, 4, 2, 32, 64), (32, 32, 4, 2, 32, 32)],
}
# dK/dV kernel: BLOCK_N key rows stay (with their fp32 dK, dV accumulators), BLOCK_M query rows
# stream. BLOCK_N is the M dimension of its dot products: 64 at least on Hopper.
_BWD_KV_CONFIGS = {
    (90, 64, 2): [(32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 1), (16, 64, 8, 2)],
    (90, 64, 2, "dropout"): [(16, 64, 8, 1)],
    (90, 128, 2): [(32, 64, 8, 1, 64, 0), (32, 64, 8, 1, 32, 0), (16, 64, 8, 2), (16, 64, 8, 1, 64, 0)],
    (90, 128, 2, "dropout"): [(16, 64, 8, 1, 64, 0)],
    (90, 256, 2): [(32, 64, 8, 1, 64, 0), (16, 64, 8, 1, 64, 0),
                   (32, 64, 8, 1, 64, 128), (32, 64, 8, 1, 128, 128)],
    (90, 256, 2, "dropout"): [(16, 64, 8, 1, 64, 128)],
    (90, 64, 4): [(16, 64, 8, 1, 32, 0), (16, 64, 8, 1, 16, 0),
                  (32, 64, 8, 1, 16, 32), (32, 64, 4, 1, 32, 32)],
    (90, 64, 4, "dropout"): [(16, 64, 8, 1, 16, 0), (16, 64, 8, 1, 32, 32)],
    (90, 128, 4): [(16, 64, 8, 1, 32, 64), (16, 64, 8, 1, 16, 32),
                   (16, 64, 4, 1, 32, 32), (16, 64, 4, 1, 16, 32)],
    (90, 128, 4, "dropout"): [(16, 64, 8, 1, 16, 32), (16, 64, 4, 1, 32, 32), (16, 64, 4, 1, 16, 32)],
    (90, 256, 4): [(16, 64, 8, 1, 32, 64), (32, 64, 4, 1, 32, 32),
                   (16, 64, 8, 1, 32, 32), (16, 64, 8, 1, 16, 32)],
    (90, 256, 4, "dropout"): [(16, 64, 8, 1, 16, 32), (16, 64, 4, 1, 32, 32), (16, 64, 4, 1, 16, 32)],
    (80, 64, 2): [(64, 32, 8, 1), (32, 32, 8, 1), (16, 32, 8, 1), (16, 32, 4, 1)],
    (80, 64, 2, "dropout"): [(32, 32, 8, 1), (16, 32, 8, 1), (16, 32, 4, 1)],
    (80, 128, 2): [(16, 64, 8, 1, 64, 0), (16, 32, 8, 1), (32, 32, 8, 1, 0, 64)],
    (80, 128, 2, "dropout"): [(16, 32, 8, 1)],
    (80, 256, 2): [(32, 32, 8, 1, 64, 0), (16, 64, 8, 1, 64, 0),
                   (16, 64, 8, 1, 0, 128), (16, 32, 8, 1, 64, 0)],
    (80, 256, 2, "dropout"): [(16, 32, 8, 1, 64, 0)],
    (80, 64, 4): [(32, 32, 8, 1, 32, 0), (32, 32, 8, 1, 16, 0), (16, 64, 8, 1, 32, 0), (16, 64, 8, 1, 16, 0)],
    (80, 64, 4, "dropout"): [(16, 32, 8, 1, 32, 0), (16, 32, 8, 1, 16, 0)],
    (80, 128, 4): [(16, 32, 8, 1, 32, 0), (16, 32, 8, 1, 64, 0),
                   (32, 32, 8, 1, 32, 64), (16, 64, 8, 1, 32, 64)],
    (80, 128, 4, "dropout"): [(16, 32, 8, 1, 32, 0), (16, 32, 8, 1, 32, 64), (16, 32, 8, 1, 64, 64)],
    (80, 256, 4): [(16, 32, 8, 1, 64, 128), (32, 32, 8, 1, 32, 64),
                   (16, 64, 8, 1, 32, 64), (16, 32, 8, 1, 32, 64)],
    (80, 256, 4, "dropout"): [(16, 32, 8, 1, 32, 64), (16, 64, 8, 1, 32, 32)],
}
# dQ kernel: BLOCK_M query rows stay, BLOCK_N key rows stream; BLOCK_M >= 64 on Hopper.
_BWD_Q_CONFIGS = {
    (90, 64, 2): [(128, 64, 8, 2), (128, 64, 8, 1), (64, 64, 4, 3), (64, 32, 4, 2)],
    (90, 64, 2, "dropout"): [(64, 32, 4, 2), (128, 32, 8, 3), (64, 32, 8, 1)],
    (90, 128, 2): [(128, 32, 8, 2), (64, 32, 4, 3), (64, 16, 8, 1), (64, 16, 4, 1)],
    (90, 128, 2, "dropout"): [(64, 16, 8, 1), (64, 16, 4, 1)],
    (90, 256, 2): [(128, 16, 8, 2), (128, 32, 8, 2, 0, 128), (128, 16, 8, 1, 64, 0), (128, 16, 8, 1, 0, 128)],
    (90, 256, 2, "dropout"): [(64, 16, 8, 1, 64, 0), (128, 16, 8, 1, 64, 128)],
    (90, 64, 4): [(128, 16, 8, 1), (128, 16, 8, 1, 32, 0), (128, 16, 8, 1, 16, 0), (64, 32, 4, 1, 32, 0)],
    (90, 64, 4, "dropout"): [(128, 16, 8, 1, 32, 0), (128, 16, 8, 1, 16, 0), (64, 32, 4, 1, 32, 0)],
    (90, 128, 4): [(128, 16, 8, 1, 32, 0), (64, 16, 8, 1, 32, 0), (128, 16, 8, 1, 32, 64)],
    (90, 128, 4, "dropout"): [(128, 16, 8, 1, 32, 0), (64, 16, 8, 1, 32, 0), (128, 16, 8, 1, 32, 64)],
    (90, 256, 4): [(128, 16, 8, 1, 32, 64), (64, 32, 4, 1, 32, 64), (64, 16, 8, 1, 32, 64)],
    (90, 256, 4, "dropout"): [(128, 16, 8, 1, 32, 64), (64, 16, 8, 1, 32, 64), (128, 16, 8, 1, 32, 32)],
    (80, 64, 2): [(32, 128, 8, 2), (128, 32, 8, 2), (32, 128, 8, 1), (128, 32, 8, 1)],
    (80, 64, 2, "dropout"): [(32, 128, 8, 2), (32, 128, 8, 1)],
    (80, 128, 2): [(32, 128, 8, 2), (32, 128, 8, 1), (32, 32, 4, 1)],
    (80, 128, 2, "dropout"): [(32, 128, 8, 2), (32, 32, 4, 1)],
    (80, 256, 2): [(32, 32, 8, 2), (64, 32, 8, 2, 0, 128), (32, 32, 4, 2)],
    (80, 256, 2, "dropout"): [(32, 32, 8, 2), (64, 32, 8, 2, 0, 128)],
    (80, 64, 4): [(32, 32, 8, 1, 32, 0), (64, 16, 8, 1, 32, 0), (64, 16, 8, 1, 16, 0)],
    (80, 128, 4): [(32, 32, 8, 1, 32, 0), (64, 16, 8, 1, 32, 0), (64, 16, 8, 1, 64, 0)],
    (80, 256, 4): [(64, 16, 8, 1, 64, 128), (32, 32, 8, 1, 32, 64),
                   (64, 16, 8, 1, 32, 64), (64, 16, 8, 1, 64, 64)],
    (80, 256, 4, "dropout"): [(64, 16, 8, 1, 64, 128), (32, 32, 8, 1, 32, 64), (64, 16, 8, 1, 32, 64)],
}

# dK/dV kernel adding dQ with atomics (FASTDL_ATTENTION_BACKWARD=atomic): its own lists, since
# the transposed K chunk and the dQ^T tile take registers that some of the lists above lack. A
# launch whose (generation, class, size) has no list here takes the deterministic kernels.
_ATOMIC_KV_CONFIGS = {
    (90, 64, 2): [(32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 1), (16, 64, 8, 2)],
    (90, 64, 2, "dropout"): [(16, 64, 8, 1)],
    (90, 128, 2): [(32, 64, 8, 1, 64, 0), (32, 64, 8, 1, 32, 0), (16, 64, 8, 2), (16, 64, 8, 1, 64, 0)],
    (90, 128, 2, "dropout"): [(16, 64, 8, 1, 64, 0)],
    (90, 256, 2): [(32, 64, 8, 1, 64, 128), (32, 64, 8, 1, 128, 128)],
    (90, 256, 2, "dropout"): [(16, 64, 8, 1, 64, 128)],
    (90, 64, 4): [(16, 64, 8, 1, 16, 32), (16, 64, 4, 1, 32, 32), (16, 64, 4, 1, 16, 32)],
    (90, 64, 4, "dropout"): [(16, 64, 8, 1, 16, 32), (16, 64, 4, 1, 16, 32)],
    (90, 128, 4): [(16, 64, 8, 1, 16, 32), (16, 64, 4, 1, 32, 32), (16, 64, 4, 1, 16, 32)],
    (90, 128, 4, "dropout"): [(16, 64, 8, 1, 16, 32), (16, 64, 4, 1, 16, 32)],
    (90, 256, 4): [(16, 64, 8, 1, 32, 32), (16, 64, 8, 1, 16, 32), (16, 64, 4, 1, 16, 32)],
    (90, 256, 4, "dropout"): [(16, 64, 8, 1, 16, 32), (16, 64, 4, 1, 16, 32)],
}

_TUNE_KEY = ["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND", "HAS_DROPOUT", "L_BUCKET", "S_BUCKET"]
# The dK/dV kernel also adds dQ with atomics when asked: timed apart, its accumulator zeroed
# before each timed run and before the real one.
_KV_TUNE = dict(key=_TUNE_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ"])


def _generation(device: torch.device) -> int:
    """Which lists a launch on ``device`` takes: 90 for Hopper and later, 80 before."""
    return 90 if gpu_capability(device) >= 90 else 80


def _triton_configs(kind: str, entries, block_d: int, block_dv: int):
    """triton.Configs of a list for this call's head-dim blocks. Chunk widths of 0 (whole) or
    wider than a block become that block; CHUNKS is the number of programs that share a tile,
    one per chunk of the kernel's outputs (o: Dv; dq: D; dk and dv: the larger count)."""
    def width(chunk: int, block: int) -> int:
        return block if chunk <= 0 else min(chunk, block)

    configs = []
    for m, n, w, s, *chunks in entries:
        dk, do = chunks if chunks else (0, 0)
        widths = {"BLOCK_DK": width(dk, block_d), "BLOCK_DVK": width(dk, block_dv),
                  "BLOCK_DO": width(do, block_d), "BLOCK_DVO": width(do, block_dv)}
        per_d, per_dv = block_d // widths["BLOCK_DO"], block_dv // widths["BLOCK_DVO"]
        chunk_count = {"fwd": per_dv, "bwd_q": per_d}.get(kind, max(per_d, per_dv))  # bwd_kv[_atomic]
        configs.append(triton.Config({"BLOCK_M": m, "BLOCK_N": n, **widths, "CHUNKS": chunk_count},
                                     num_warps=w, num_stages=s))
    return configs


def _head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def _seq_bucket(n: int) -> int:
    """Sequence-length bucket for the autotuning key: powers of two from 64 to 16K."""
    return min(max(64, triton.next_power_of_2(max(n, 1))), 16384)

# ---------------------------------------------------------------------------------------------
# Shared pieces of the kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scores(qk, rows, cols, b, h, L, S, causal_shift, MASK, smb, smh, sml, sms,
            CHECK_COLS: tl.constexpr, CHECK_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
            KEYS_INSIDE: tl.constexpr = False):
    """Scores in base-2 units for one tile: ``qk`` (q k^T already times scale * log2(e)) plus the
    mask; -inf where masked out and, when checked, where a column is past S or causally hidden.

    ``rows`` and ``cols`` are int64 index blocks that broadcast to the tile's shape: (M, 1) and
    (1, N) for a (queries, keys) tile, (1, M) and (N, 1) for its transpose -- the same code
    serves the forward, the dQ kernel and the transposed tiles of the dK/dV kernel. The column
    and causal tests are compile-time switches: tiles wholly inside S and below the diagonal (the
    bulk of the work) skip them; ``KEYS_INSIDE`` says that every column is below S (not so in the
    dK/dV kernel, which never tests its keys). Rows past L are never tested: no kernel stores them, and the
    backward gives them P = 0 through an lse of +inf. Causal: column j is visible from row i when
    j <= i + causal_shift (0 for dense attention; per sequence in varlen mode).
    """
    if MASK_KIND != 0:
        mask_base = MASK + b.to(tl.int64) * smb + h.to(tl.int64) * smh
        if MASK_KIND > 2:  # MASK_BOOL or MASK_FLOAT, + MASK_KEYS
            # One row of keys for every query row (a padding mask, stride 0 along L): one vector
            # per key tile, broadcast over the rows, instead of a gather of the whole tile; tiles
            # wholly inside S load it without a predicate (vectors, where the strides allow).
            if KEYS_INSIDE:
                values = tl.load(mask_base + cols * sms)
            else:
                values = tl.load(mask_base + cols * sms, mask=cols < S, other=0)
        else:
            # Reads past L or S are predicated off (what they would give is never used). Plain
            # indices, not clamped ones: with a unit column stride the compiler can then prove the
            # addresses contiguous and load vectors, where clamped ones cost a 64-bit address per
            # element -- enough registers to spill the kernels.
            values = tl.load(mask_base + rows * sml + cols * sms, mask=(rows < L) & (cols < S), other=0)
        if MASK_KIND % 2 == 1:  # MASK_BOOL, with or without MASK_KEYS
            qk = tl.where(values != 0, qk, float("-inf"))
        else:
            bias = values.to(tl.float32)
            # A NaN in the mask stays NaN (the row's output and gradients are NaN, as torch's).
            bias = tl.where(bias == float("-inf"), bias,
                            tl.maximum(bias, MASK_FLOOR, propagate_nan=tl.PropagateNan.ALL))
            qk = qk + bias * LOG2E
    if CHECK_COLS:
        qk = tl.where(cols < S, qk, float("-inf"))
    if CHECK_CAUSAL:  # dense: top-left aligned, row i attends columns j <= i, whatever L and S are
        qk = tl.where(cols <= rows + causal_shift, qk, float("-inf"))
    return qk


@triton.jit
def _dropout_keep_tile(seed, threshold, bh, rows_m, start_n, L, S, BLOCK_N: tl.constexpr):
    """Keep mask of the (query rows_m, keys start_n .. start_n + BLOCK_N - 1) tile of head
    bh = b * H + h, shaped (len(rows_m), BLOCK_N): row bh * L + i of the (B * H * L, S) matrix."""
    rows = (bh.to(tl.int64) * L + rows_m)[:, None]
    return dropout_keep(seed, dropout_counters(rows, start_n, S, BLOCK_N), threshold)


@triton.jit
def _query_tile_ranges(m0, k_lo, k_hi, shift, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Key tiles a query tile starting at row m0 visits, of the keys [k_lo, k_hi): [k_lo, full)
    need no column or causal test, [full, hi) need them. Causal: keys past the tile's last row
    (+ shift) are never visited at all."""
    if IS_CAUSAL:
        hi = tl.minimum(k_hi, m0 + BLOCK_M + shift)
        # every key <= the tile's first row (+ shift)
        full = k_lo + (tl.maximum(tl.minimum(m0 + 1 + shift, k_hi) - k_lo, 0) // BLOCK_N) * BLOCK_N
    else:
        hi = k_hi
        full = k_lo + ((k_hi - k_lo) // BLOCK_N) * BLOCK_N
    return full, hi


@triton.jit
def _tile_head_batch(rows, BLOCK: tl.constexpr, H, CHUNKS: tl.constexpr = 1,
                     HEAVIEST_FIRST: tl.constexpr = False):
    """(tile, head-dim chunk, head, batch entry) of this program. The launch grid is one axis of
    cdiv(rows, BLOCK) * CHUNKS * H * batch programs, tiles fastest (the programs of one head run
    side by side, as on a (tiles, chunks, H, batch) grid): CUDA caps grid axes 1 and 2 at 65,535
    programs, which a batch of short sequences (or a varlen call's sequence count) can pass.

    HEAVIEST_FIRST (causal query tiles) hands out each head's tiles last first: a causal query
    tile's work grows with its index, and started first, the longest programs no longer trail
    behind the grid's last wave."""
    tiles = tl.cdiv(rows, BLOCK)
    tile, rest = grid_2d(tiles)
    if HEAVIEST_FIRST:
        tile = tiles - 1 - tile
    if CHUNKS == 1:
        chunk = rest * 0
        bh = rest
    else:
        chunk = rest % CHUNKS
        bh = rest // CHUNKS
    return tile, chunk, bh % H, bh // H


@triton.jit
def _load_rows(P, rows, ok, stride, cols, ncols):
    """P[rows, cols] as a (rows, cols) tile: int64 row indices with ``ok`` marking real rows, a
    unit column stride, columns from ``ncols`` on read as 0."""
    return tl.load(P + rows[:, None] * stride + cols[None, :], mask=ok[:, None] & (cols[None, :] < ncols),
                   other=0.0)


@triton.jit
def _load_rows_t(P, rows, ok, stride, cols, ncols):
    """The transpose of :func:`_load_rows`: a (cols, rows) tile."""
    return tl.load(P + rows[None, :] * stride + cols[:, None], mask=ok[None, :] & (cols[:, None] < ncols),
                   other=0.0)


@triton.jit
def _dot_rows(acc, A, sa, rows_a, ok_a, B, sb, rows_b, ok_b, ncols, PRECISION: tl.constexpr,
              BLOCK_DK: tl.constexpr):
    """acc + A[rows_a, :ncols] @ B[rows_b, :ncols]^T, summed over column chunks of BLOCK_DK, each
    loaded right before its product: registers hold one chunk of either operand, not a whole row.
    A loop, not unrolled: unrolled, the compiler hoists every chunk's loads and keeps a shared-memory
    buffer per chunk (260 KB at fp32, head dim 128), which defeats the purpose. It stops at the
    head dim, not at its power-of-two block: no product of padding columns (head dim 80 in a
    128-wide block takes 3 chunks of 32, not 4)."""
    for d0 in range(0, ncols, BLOCK_DK):
        cols = d0 + tl.arange(0, BLOCK_DK)
        acc = tl.dot(_load_rows(A, rows_a, ok_a, sa, cols, ncols),
                     _load_rows_t(B, rows_b, ok_b, sb, cols, ncols), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _first_chunk(mask, like, chunk, CHUNKS: tl.constexpr):
    """``mask``, and only in the program of head-dim chunk 0: what every chunk computes alike
    (lse, dS) is stored once. (``like`` makes the chunk test a tensor: Triton's interpreter
    cannot combine a mask with a scalar.)"""
    if CHUNKS == 1:
        return mask
    return mask & ((like * 0 + chunk) == 0)


@triton.jit
def _sequence_bounds(CU_Q, CU_K, b, L, S, VARLEN: tl.constexpr):
    """(q_lo, q_hi, k_lo, k_hi, causal shift) of the rows and keys of batch index b: in
    varlen mode, sequence b of the packed tokens, [cu_q[b], cu_q[b + 1]) and [cu_k[b], cu_k[b + 1]),
    causal bottom-right aligned (shift = k_hi - q_hi, as flash-attn's varlen functions); else the
    whole [0, L) and [0, S) of batch entry b, causal top-left aligned (shift 0).

    Offsets are clamped into [0, L] / [0, S], a sequence's end to no less than its start, so bad
    ones (the front reports them: at the call on CPU, by a device-side assertion on CUDA) never
    reach past the tokens."""
    if VARLEN:
        q_lo = tl.minimum(tl.maximum(tl.load(CU_Q + b).to(tl.int32), 0), L)
        q_hi = tl.minimum(tl.maximum(tl.load(CU_Q + b + 1).to(tl.int32), q_lo), L)
        k_lo = tl.minimum(tl.maximum(tl.load(CU_K + b).to(tl.int32), 0), S)
        k_hi = tl.minimum(tl.maximum(tl.load(CU_K + b + 1).to(tl.int32), k_lo), S)
        shift = k_hi - q_hi
    else:
        q_lo = b * 0
        q_hi = q_lo + L
        k_lo = q_lo
        k_hi = q_lo + S
        shift = q_lo
    return q_lo, q_hi, k_lo, k_hi, shift


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, Qm, sql, row_ok, K, V, lo, hi, rows_m, offs_o, b, h, bh, L, S, q_hi, k_hi,
               shift, sks, svs, MASK, smb, smh, sml, sms, qk_scale, threshold, seed, HEAD_DIM, HEAD_DIM_V,
               CHECK_COLS: tl.constexpr, CHECK_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr):
    """Online softmax over the key tiles [lo, hi) of one query tile; returns (acc, l, m). Rows
    and keys end at q_hi and k_hi; L and S size the dropout counters. ``q`` is the whole query
    tile when BLOCK_DK == BLOCK_D; otherwise its chunks are read from Qm (row stride sql)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < k_hi
        rows_n = offs_n.to(tl.int64)
        if BLOCK_DK == BLOCK_D:
            kt = _load_rows_t(K, rows_n, col_ok, sks, tl.arange(0, BLOCK_D), HEAD_DIM)
            qk = tl.dot(q, kt, input_precision=PRECISION)
        else:
            qk = _dot_rows(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), Qm, sql, rows_m, row_ok, K, sks,
                           rows_n, col_ok, HEAD_DIM, PRECISION, BLOCK_DK)
        s = _scores(qk * qk_scale, rows_m[:, None], rows_n[None, :], b, h, q_hi, k_hi, shift, MASK, smb, smh,
                    sml, sms, CHECK_COLS, CHECK_CAUSAL, MASK_KIND, not CHECK_COLS)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing attended so far keeps m = -inf; shift by 0 there (exp2(-inf) = 0)
        # instead of computing -inf - (-inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            keep = _dropout_keep_tile(seed, threshold, bh, rows_m, start_n, L, S, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v = _load_rows(V, rows_n, col_ok, svs, offs_o, HEAD_DIM_V)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=PER_CALL_ARGS + ["L", "S", "GRID_ROWS"])
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, MASK,  # Q (B,H,L,D), K (B,Hkv,S,D), V (B,Hkv,S,Dv), OUT (B,H,L,Dv), LSE (B,H,L)
    CU_Q, CU_K,  # varlen: (sequences + 1,) offsets into the packed L query and S key rows
    sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sob, soh, sol,
    smb, smh, sml, sms,  # mask strides broadcast to (B, H, L, S); 0 on broadcast dims
    H, GROUP, L, S, HEAD_DIM, HEAD_DIM_V, qk_scale, threshold, keep_scale, SEED,  # SEED: (1,) int64
    L_BUCKET, S_BUCKET,  # autotuning key only
    GRID_ROWS,  # query rows the grid tiles per (batch, head): L, or the longest sequence (varlen)
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DVK: tl.constexpr,
    BLOCK_DO: tl.constexpr, BLOCK_DVO: tl.constexpr, CHUNKS: tl.constexpr,
    VARLEN: tl.constexpr = False,
):
    """Output columns [c * BLOCK_DVO, (c + 1) * BLOCK_DVO) of BLOCK_M query rows of one (batch,
    head), for the program's head-dim chunk c; chunk 0 also writes the rows' lse."""
    pid_m, chunk, h, b = _tile_head_batch(GRID_ROWS, BLOCK_M, H, CHUNKS, IS_CAUSAL)
    if CHUNKS > 1:
        if chunk * BLOCK_DVO >= HEAD_DIM_V:  # a chunk wholly in the block's padding columns
            return
    q_lo, q_hi, k_lo, k_hi, shift = _sequence_bounds(CU_Q, CU_K, b, L, S, VARLEN)
    m0 = q_lo + pid_m * BLOCK_M
    if VARLEN:
        if m0 >= q_hi:  # the grid covers the longest sequence
            return
        b = b * 0  # one packed batch entry: the sequence index only chose the bounds
    bh = b * H + h
    h_kv = h // GROUP
    b64 = b.to(tl.int64)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_o = chunk * BLOCK_DVO + tl.arange(0, BLOCK_DVO)
    row_ok = offs_m < q_hi
    rows_m = offs_m.to(tl.int64)

    Qm = Q + b64 * sqb + h.to(tl.int64) * sqh
    q = Qm  # not loaded when chunked (see _fwd_tiles)
    if BLOCK_DK == BLOCK_D:
        q = _load_rows(Qm, rows_m, row_ok, sql, tl.arange(0, BLOCK_D), HEAD_DIM)
    K += b64 * skb + h_kv.to(tl.int64) * skh
    V += b64 * svb + h_kv.to(tl.int64) * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DVO], dtype=tl.float32)
    full, hi = _query_tile_ranges(m0, k_lo, k_hi, shift, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, Qm, sql, row_ok, K, V, k_lo, full, rows_m, offs_o, b, h, bh,
                               L, S, q_hi, k_hi, shift, sks, svs, MASK, smb, smh, sml, sms, qk_scale,
                               threshold, seed, HEAD_DIM, HEAD_DIM_V, False, False, MASK_KIND, HAS_DROPOUT,
                               PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, Qm, sql, row_ok, K, V, full, hi, rows_m, offs_o, b, h, bh, L,
                               S, q_hi, k_hi, shift, sks, svs, MASK, smb, smh, sml, sms, qk_scale, threshold,
                               seed, HEAD_DIM, HEAD_DIM_V, True, IS_CAUSAL, MASK_KIND, HAS_DROPOUT, PRECISION,
                               BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK)

    # Fully masked rows (l = 0) return 0, not 0/0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (keep_scale / l_safe)[:, None]
    o_ptrs = OUT + b64 * sob + h.to(tl.int64) * soh + rows_m[:, None] * sol + offs_o[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_o[None, :] < HEAD_DIM_V))
    # lse = m + log2(l) and its rounding error, exactly (Knuth's two-sum): where |m| is large -- a
    # row masked throughout by finfo.min -- log2(l) is below the resolution of m and lives on in
    # ``lse_lo`` alone, so the backward's P = exp2(s - lse - lse_lo) still sums to 1.
    log_l = tl.math.log2(l_safe)
    lse = m_i + log_l
    part = lse - m_i
    lse_lo = (m_i - (lse - part)) + (log_l - part)
    empty = l_i == 0.0
    stats = LSE + bh.to(tl.int64) * (2 * L) + offs_m
    store_ok = _first_chunk(row_ok, offs_m, chunk, CHUNKS)
    tl.store(stats, tl.where(empty, float("-inf"), lse), mask=store_ok)
    tl.store(stats + L, tl.where(empty, 0.0, lse_lo), mask=store_ok)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=PER_CALL_ARGS + ["L", "S"])
def _attn_bwd_delta_kernel(OUT, DO, DELTA, sob, soh, sol, sdob, sdoh, sdol, H, L, HEAD_DIM_V,
                           BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """DELTA[b, h, i] = sum_d dO[b, h, i, d] * OUT[b, h, i, d], float32. DELTA: (B, H, L)."""
    pid_m, _, h, b = _tile_head_batch(L, BLOCK_M, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(OUT + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None] * sol + offs_dv[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + rows[:, None] * sdol
                 + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    bh = (b * H + h).to(tl.int64)
    tl.store(DELTA + bh * L + offs_m, tl.sum(o * do, axis=1), mask=offs_m < L)


@triton.jit
def _load_row_stats(LSE, DELTA, bh, offs_m, L, q_hi):
    """lse (base 2), its remainder lse_lo and delta for query rows offs_m of (.., 2, L) statistics
    and (.., L) deltas. Rows past q_hi, and fully masked rows (lse = -inf), get lse = +inf, which
    makes every P of the row exp2(s - inf) = 0."""
    row_ok = offs_m < q_hi
    stats = LSE + bh.to(tl.int64) * (2 * L) + offs_m
    lse = tl.load(stats, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    lse_lo = tl.load(stats + L, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    return lse, lse_lo, delta


@triton.jit
def _bwd_kv_tiles(dk, dv, k, v, Kn, Vn, Qh, DOh, DQh, LSE, DELTA, lo, hi, n0, rows_n, col_ok, offs_o, offs_vo,
                  b, h, bh, L, S, q_hi, k_hi, shift, sks, svs, sql, sdol, sdql, MASK, smb, smh, sml, sms,
                  qk_scale, threshold, keep_scale, seed, HEAD_DIM, HEAD_DIM_V, CHECK_CAUSAL: tl.constexpr,
                  MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DK: tl.constexpr,
                  BLOCK_DVK: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_DVO: tl.constexpr):
    """Accumulate columns offs_o of dK and offs_vo of dV of one key tile over the query tiles
    [lo, hi) of one query head; with ATOMIC_DQ also add this key tile's share of the same columns
    of dQ (unscaled) to the float32 accumulator DQh, with atomics.

    Tiles are held transposed, (keys, queries), so that dV += P^T dO and dK += dS^T Q need no
    transposition of P or dS. Columns past S are not masked: their dK, dV rows are never stored
    (and their K rows, loaded as 0, add nothing to dQ). ``k`` / ``v`` are the whole key / value
    tiles when BLOCK_DK == BLOCK_D / BLOCK_DVK == BLOCK_DV; otherwise their chunks are read from
    Kn / Vn.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_hi
        rows_m = offs_m.to(tl.int64)
        lse, lse_lo, delta = _load_row_stats(LSE, DELTA, bh, offs_m, L, q_hi)

        if BLOCK_DK == BLOCK_D:
            qt = _load_rows_t(Qh, rows_m, row_ok, sql, tl.arange(0, BLOCK_D), HEAD_DIM)
            st = tl.dot(k, qt, input_precision=PRECISION)
        else:
            st = _dot_rows(tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), Kn, sks, rows_n, col_ok, Qh, sql,
                           rows_m, row_ok, HEAD_DIM, PRECISION, BLOCK_DK)
        st = _scores(st * qk_scale, rows_m[None, :], rows_n[:, None], b, h, q_hi, k_hi, shift, MASK, smb, smh,
                     sml, sms, False, CHECK_CAUSAL, MASK_KIND)
        pt = tl.math.exp2((st - lse[None, :]) - lse_lo[None, :])
        if BLOCK_DVK == BLOCK_DV:
            do = _load_rows(DOh, rows_m, row_ok, sdol, tl.arange(0, BLOCK_DV), HEAD_DIM_V)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        else:
            dpt = _dot_rows(tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), Vn, svs, rows_n, col_ok, DOh,
                            sdol, rows_m, row_ok, HEAD_DIM_V, PRECISION, BLOCK_DVK)
        # The dO and Q columns of this program's outputs: the tiles above when they are whole.
        if BLOCK_DVK == BLOCK_DV and BLOCK_DVO == BLOCK_DV:
            do_o = do
        else:
            do_o = _load_rows(DOh, rows_m, row_ok, sdol, offs_vo, HEAD_DIM_V)
        if HAS_DROPOUT:
            # The tile is held transposed (keys, queries); the mask is drawn (queries, keys).
            keep = _dropout_keep_tile(seed, threshold, bh, rows_m, n0, L, S, BLOCK_N)
            keep = tl.trans(keep.to(tl.int8)) != 0
            dv += tl.dot(tl.where(keep, pt * keep_scale, 0.0).to(do_o.dtype), do_o, input_precision=PRECISION)
            dpt = tl.where(keep, dpt * keep_scale, 0.0)
        else:
            dv += tl.dot(pt.to(do_o.dtype), do_o, input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        if BLOCK_DK == BLOCK_D and BLOCK_DO == BLOCK_D:
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
        else:
            q_o = _load_rows(Qh, rows_m, row_ok, sql, offs_o, HEAD_DIM)
            dk += tl.dot(dst.to(q_o.dtype), q_o, input_precision=PRECISION)
        if ATOMIC_DQ:
            # dQ^T += K^T dS^T, (head-dim columns, queries): the product's M dimension is the head
            # dim (64+ rows, what Hopper's warpgroup MMA needs), not the few query rows of the tile.
            if BLOCK_DK == BLOCK_D and BLOCK_DO == BLOCK_D:
                kt_o = tl.trans(k)
            else:
                kt_o = _load_rows_t(Kn, rows_n, col_ok, sks, offs_o, HEAD_DIM)
            dqt = tl.dot(kt_o, dst.to(kt_o.dtype), input_precision=PRECISION)
            tl.atomic_add(DQh + rows_m[None, :] * sdql + offs_o[:, None], dqt,
                          mask=row_ok[None, :] & (offs_o[:, None] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=PER_CALL_ARGS + ["L", "S", "GRID_KEYS"])
def _attn_bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, MASK, DK, DV, DQ,  # DK like K, DV like V; DQ (B,H,L,D) float32 (ATOMIC_DQ)
    CU_Q, CU_K,
    sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdol,
    sdkb, sdkh, sdks, sdvb, sdvh, sdvs, sdqb, sdqh, sdql, smb, smh, sml, sms,
    H, GROUP, L, S, HEAD_DIM, HEAD_DIM_V, qk_scale, scale, threshold, keep_scale, SEED,
    L_BUCKET, S_BUCKET,  # autotuning key only
    GRID_KEYS,  # keys the grid tiles per (batch, kv head): S, or the longest sequence (varlen)
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DVK: tl.constexpr,
    BLOCK_DO: tl.constexpr, BLOCK_DVO: tl.constexpr, CHUNKS: tl.constexpr,
    VARLEN: tl.constexpr = False, ATOMIC_DQ: tl.constexpr = False,
):
    """Head-dim chunk c of dK, dV (columns [c * BLOCK_DO, ...) and [c * BLOCK_DVO, ...)) for
    BLOCK_N keys of one kv head, summed over the GROUP query heads that read it (in a fixed order,
    in registers: deterministic, no atomics). With ATOMIC_DQ, also every query row's dQ share of
    these keys, added to DQ (unscaled) with float32 atomics: the dQ kernel is then not run, and
    the sum's order -- so its last bits -- varies from run to run."""
    pid_n, chunk, h_kv, b = _tile_head_batch(GRID_KEYS, BLOCK_N, H // GROUP, CHUNKS)
    if CHUNKS > 1:
        if (chunk * BLOCK_DO >= HEAD_DIM) & (chunk * BLOCK_DVO >= HEAD_DIM_V):  # padding columns only
            return
    q_lo, q_hi, k_lo, k_hi, shift = _sequence_bounds(CU_Q, CU_K, b, L, S, VARLEN)
    n0 = k_lo + pid_n * BLOCK_N
    if VARLEN:
        if n0 >= k_hi:
            return
        b = b * 0
    b64 = b.to(tl.int64)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    offs_n = n0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < k_hi
    rows_n = offs_n.to(tl.int64)
    offs_o = chunk * BLOCK_DO + tl.arange(0, BLOCK_DO)
    offs_vo = chunk * BLOCK_DVO + tl.arange(0, BLOCK_DVO)
    Kn = K + b64 * skb + h_kv.to(tl.int64) * skh
    Vn = V + b64 * svb + h_kv.to(tl.int64) * svh
    k = Kn  # not loaded when chunked (see _bwd_kv_tiles)
    v = Vn
    if BLOCK_DK == BLOCK_D:
        k = _load_rows(Kn, rows_n, col_ok, sks, tl.arange(0, BLOCK_D), HEAD_DIM)
    if BLOCK_DVK == BLOCK_DV:
        v = _load_rows(Vn, rows_n, col_ok, svs, tl.arange(0, BLOCK_DV), HEAD_DIM_V)
    dk = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DVO], dtype=tl.float32)

    if IS_CAUSAL:
        # Query tiles wholly above the diagonal see none of these keys and are skipped; tiles
        # from `full` on (first row + shift >= last key) see all of them and skip the causal test.
        lo = q_lo + (tl.maximum(n0 - shift - q_lo, 0) // BLOCK_M) * BLOCK_M
        last = tl.maximum(n0 + BLOCK_N - 1 - shift - q_lo, 0)
        full = tl.minimum(q_lo + ((last + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, q_hi)
    else:
        lo = q_lo
        full = q_lo
    for g in range(0, GROUP):
        h = h_kv * GROUP + g
        bh = b * H + h
        Qh = Q + b64 * sqb + h.to(tl.int64) * sqh
        DOh = DO + b64 * sdob + h.to(tl.int64) * sdoh
        DQh = DQ + b64 * sdqb + h.to(tl.int64) * sdqh
        dk, dv = _bwd_kv_tiles(dk, dv, k, v, Kn, Vn, Qh, DOh, DQh, LSE, DELTA, lo, full, n0, rows_n, col_ok,
                               offs_o, offs_vo, b, h, bh, L, S, q_hi, k_hi, shift, sks, svs, sql, sdol, sdql,
                               MASK, smb, smh, sml, sms, qk_scale, threshold, keep_scale, seed, HEAD_DIM,
                               HEAD_DIM_V, True, MASK_KIND, HAS_DROPOUT, ATOMIC_DQ, PRECISION, BLOCK_M,
                               BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_DK, BLOCK_DVK, BLOCK_DO, BLOCK_DVO)
        dk, dv = _bwd_kv_tiles(dk, dv, k, v, Kn, Vn, Qh, DOh, DQh, LSE, DELTA, full, q_hi, n0, rows_n, col_ok,
                               offs_o, offs_vo, b, h, bh, L, S, q_hi, k_hi, shift, sks, svs, sql, sdol, sdql,
                               MASK, smb, smh, sml, sms, qk_scale, threshold, keep_scale, seed, HEAD_DIM,
                               HEAD_DIM_V, False, MASK_KIND, HAS_DROPOUT, ATOMIC_DQ, PRECISION, BLOCK_M,
                               BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_DK, BLOCK_DVK, BLOCK_DO, BLOCK_DVO)

    dk_ptrs = DK + b64 * sdkb + h_kv.to(tl.int64) * sdkh + rows_n[:, None] * sdks + offs_o[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None] & (offs_o[None, :] < HEAD_DIM))
    dv_ptrs = DV + b64 * sdvb + h_kv.to(tl.int64) * sdvh + rows_n[:, None] * sdvs + offs_vo[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & (offs_vo[None, :] < HEAD_DIM_V))


@triton.jit
def _bwd_q_tiles(dq, q, do, Qm, DOm, DSm, row_ok, lse, lse_lo, delta, K, V, lo, hi, rows_m, offs_o, chunk,
                 b, h, bh, L, S, q_hi, k_hi, shift, sql, sdol, sdsl, sks, svs, MASK, smb, smh, sml, sms,
                 qk_scale, threshold, keep_scale, seed, HEAD_DIM, HEAD_DIM_V, CHECK_COLS: tl.constexpr,
                 CHECK_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 MASK_GRAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DK: tl.constexpr,
                 BLOCK_DVK: tl.constexpr, BLOCK_DO: tl.constexpr, CHUNKS: tl.constexpr):
    """Accumulate columns offs_o of dQ of one query tile over the key tiles [lo, hi), and with
    MASK_GRAD store its dS rows (the float mask's gradient, row-major like the mask: coalesced).
    ``q`` / ``do`` are the whole tiles when BLOCK_DK == BLOCK_D / BLOCK_DVK == BLOCK_DV; otherwise
    their chunks are read from Qm / DOm."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < k_hi
        rows_n = offs_n.to(tl.int64)
        if BLOCK_DK == BLOCK_D:
            kt = _load_rows_t(K, rows_n, col_ok, sks, tl.arange(0, BLOCK_D), HEAD_DIM)
            s = tl.dot(q, kt, input_precision=PRECISION)
        else:
            s = _dot_rows(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), Qm, sql, rows_m, row_ok, K, sks,
                          rows_n, col_ok, HEAD_DIM, PRECISION, BLOCK_DK)
        s = _scores(s * qk_scale, rows_m[:, None], rows_n[None, :], b, h, q_hi, k_hi, shift, MASK, smb, smh,
                    sml, sms, CHECK_COLS, CHECK_CAUSAL, MASK_KIND, not CHECK_COLS)
        p = tl.math.exp2((s - lse[:, None]) - lse_lo[:, None])
        if BLOCK_DVK == BLOCK_DV:
            vt = _load_rows_t(V, rows_n, col_ok, svs, tl.arange(0, BLOCK_DV), HEAD_DIM_V)
            dp = tl.dot(do, vt, input_precision=PRECISION)
        else:
            dp = _dot_rows(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOm, sdol, rows_m, row_ok, V, svs,
                           rows_n, col_ok, HEAD_DIM_V, PRECISION, BLOCK_DVK)
        if HAS_DROPOUT:
            keep = _dropout_keep_tile(seed, threshold, bh, rows_m, start_n, L, S, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:  # dS does not depend on the chunk: the first one stores it
            tl.store(DSm + rows_m[:, None] * sdsl + rows_n[None, :], ds,
                     mask=_first_chunk(row_ok[:, None] & col_ok[None, :], rows_n[None, :], chunk, CHUNKS))
        if BLOCK_DK == BLOCK_D and BLOCK_DO == BLOCK_D:
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
        else:
            k_o = _load_rows(K, rows_n, col_ok, sks, offs_o, HEAD_DIM)
            dq += tl.dot(ds.to(k_o.dtype), k_o, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=PER_CALL_ARGS + ["L", "S", "GRID_ROWS"])
def _attn_bwd_q_kernel(
    Q, K, V, DO, LSE, DELTA, MASK, DQ, DS,  # DQ like Q; DS (B, H, L, S) float32
    CU_Q, CU_K,
    sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdol, sdqb, sdqh, sdql,
    smb, smh, sml, sms, sdsb, sdsh, sdsl,
    H, GROUP, L, S, HEAD_DIM, HEAD_DIM_V, qk_scale, scale, threshold, keep_scale, SEED,
    L_BUCKET, S_BUCKET,  # autotuning key only
    GRID_ROWS,  # query rows the grid tiles per (batch, head): L, or the longest sequence (varlen)
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MASK_GRAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DVK: tl.constexpr,
    BLOCK_DO: tl.constexpr, BLOCK_DVO: tl.constexpr, CHUNKS: tl.constexpr,
    VARLEN: tl.constexpr = False,
):
    """dQ columns [c * BLOCK_DO, ...) for BLOCK_M query rows of one (batch, head), for the
    program's head-dim chunk c: each element written once, no atomics."""
    pid_m, chunk, h, b = _tile_head_batch(GRID_ROWS, BLOCK_M, H, CHUNKS, IS_CAUSAL)
    if CHUNKS > 1:
        if chunk * BLOCK_DO >= HEAD_DIM:  # padding columns only (never chunk 0, which stores dS)
            return
    q_lo, q_hi, k_lo, k_hi, shift = _sequence_bounds(CU_Q, CU_K, b, L, S, VARLEN)
    m0 = q_lo + pid_m * BLOCK_M
    if VARLEN:
        if m0 >= q_hi:
            return
        b = b * 0
    bh = b * H + h
    h_kv = h // GROUP
    b64 = b.to(tl.int64)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_hi
    rows_m = offs_m.to(tl.int64)
    offs_o = chunk * BLOCK_DO + tl.arange(0, BLOCK_DO)
    Qm = Q + b64 * sqb + h.to(tl.int64) * sqh
    DOm = DO + b64 * sdob + h.to(tl.int64) * sdoh
    DSm = DS + b64 * sdsb + h.to(tl.int64) * sdsh
    q = Qm  # not loaded when chunked (see _bwd_q_tiles)
    do = DOm
    if BLOCK_DK == BLOCK_D:
        q = _load_rows(Qm, rows_m, row_ok, sql, tl.arange(0, BLOCK_D), HEAD_DIM)
    if BLOCK_DVK == BLOCK_DV:
        do = _load_rows(DOm, rows_m, row_ok, sdol, tl.arange(0, BLOCK_DV), HEAD_DIM_V)
    lse, lse_lo, delta = _load_row_stats(LSE, DELTA, bh, offs_m, L, q_hi)
    K += b64 * skb + h_kv.to(tl.int64) * skh
    V += b64 * svb + h_kv.to(tl.int64) * svh
    dq = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)

    full, hi = _query_tile_ranges(m0, k_lo, k_hi, shift, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_q_tiles(dq, q, do, Qm, DOm, DSm, row_ok, lse, lse_lo, delta, K, V, k_lo, full, rows_m,
                      offs_o, chunk, b, h, bh, L, S, q_hi, k_hi, shift, sql, sdol, sdsl, sks, svs, MASK, smb,
                      smh, sml, sms, qk_scale, threshold, keep_scale, seed, HEAD_DIM, HEAD_DIM_V,
                      False, False, MASK_KIND, HAS_DROPOUT, MASK_GRAD, PRECISION, BLOCK_M, BLOCK_N,
                      BLOCK_D, BLOCK_DV, BLOCK_DK, BLOCK_DVK, BLOCK_DO, CHUNKS)
    dq = _bwd_q_tiles(dq, q, do, Qm, DOm, DSm, row_ok, lse, lse_lo, delta, K, V, full, hi, rows_m,
                      offs_o, chunk, b, h, bh, L, S, q_hi, k_hi, shift, sql, sdol, sdsl, sks, svs, MASK, smb,
                      smh, sml, sms, qk_scale, threshold, keep_scale, seed, HEAD_DIM, HEAD_DIM_V,
                      True, IS_CAUSAL, MASK_KIND, HAS_DROPOUT, MASK_GRAD, PRECISION, BLOCK_M, BLOCK_N,
                      BLOCK_D, BLOCK_DV, BLOCK_DK, BLOCK_DVK, BLOCK_DO, CHUNKS)

    dq_ptrs = DQ + b64 * sdqb + h.to(tl.int64) * sdqh + rows_m[:, None] * sdql + offs_o[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_o[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_tuned: dict = {}


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer. Every launcher output comes from here, so a test can hand out
    NaN-filled buffers and prove that the kernels write every element."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tuned_kernel(kind: str, kernel, table, block_d: int, block_dv: int, dtype: torch.dtype,
                  device: torch.device, dropout: bool):
    """The autotuned wrapper of ``kernel`` for one config list, for these head-dim blocks: the
    list of (generation, head-dim class, element size), or with dropout its "dropout" list where
    the table has one (the keep-mask's Philox rounds take registers that larger tiles lack)."""
    list_key = _list_key(table, block_d, block_dv, dtype, device, dropout)
    key = (kind, block_d, block_dv, list_key)
    if key not in _tuned:
        configs = _triton_configs(kind, table[list_key], block_d, block_dv)
        tune = _KV_TUNE if kind.startswith("bwd_kv") else {"key": _TUNE_KEY}
        _tuned[key] = autotune(configs, **tune)(kernel)
    return _tuned[key]


def _list_key(table, block_d: int, block_dv: int, dtype: torch.dtype, device: torch.device, dropout: bool):
    """The key of ``table``'s list for a launch (see :func:`_tuned_kernel`), None if it has none."""
    generation, size = _generation(device), 4 if dtype == torch.float32 else 2
    base = (generation, _head_dim_class(max(block_d, block_dv)), size)
    if dropout and base + ("dropout",) in table:
        return base + ("dropout",)
    return base if base in table else None


def _grid(rows: int, block: str, heads: int, batch: int):
    """The launch grid of a kernel that tiles ``rows`` by the config's ``block`` for each (batch
    entry, head) and head-dim chunk: one axis, see ``_tile_head_batch``."""
    return lambda meta: check_grid((triton.cdiv(rows, meta[block]) * meta["CHUNKS"] * heads * batch,),
                                   "attention")


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    """Dot-product precision: 3xTF32 for fp32 (see the module docstring); fp16/bf16 ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Strided tensors are read as they are; only a non-unit last-dim stride forces a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _mask_arg(attn_mask, q, S):
    """(pointer tensor, 4 strides, MASK_KIND) for a mask broadcast to (B, H, L, S)."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), MASK_NONE
    B, H, L, _ = q.shape
    mask = attn_mask.expand(B, H, L, S)  # a view: broadcast dims get stride 0
    per_key = MASK_KEYS if mask.stride(2) == 0 or L == 1 else 0
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), MASK_BOOL + per_key
    return mask, mask.stride(), MASK_FLOAT + per_key


def _check_shapes(q, k, v):
    B, H, L, D = q.shape
    Bk, H_kv, S, Dk = k.shape
    if (Bk, Dk) != (B, D) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if (H_kv == 0) != (H == 0) or (H_kv and H % H_kv):
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({H_kv})")
    if max(D, v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims above {MAX_HEAD_DIM} are not supported (got {D}, {v.shape[-1]})")
    return B, H, L, D, H_kv, S, v.shape[-1]


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  is_causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                  seed: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """Fused attention forward.

    q (B, H, L, D), k (B, H_kv, S, D), v (B, H_kv, S, Dv): fp16 / bf16 / fp32, same dtype, last dim
    contiguous (other strides are honoured). attn_mask: None, bool (True = attend) or float
    (added to the scores), broadcastable to (B, H, L, S). ``scale`` defaults to 1 / sqrt(D).
    ``out`` (B, H, L, Dv), if given, receives the output.

    Returns o (B, H, L, Dv) in q's dtype and lse (B, H, 2, L) float32: [:, :, 0] the rows'
    logsumexp in base 2 (log2 of sum_j 2^(log2(e) * score_ij): the natural one times log2(e); -inf
    for fully masked rows, whose output is 0), [:, :, 1] its float32 rounding error (the exact
    logsumexp is their sum; the backward needs both where the row max is huge).
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, L, D, H_kv, S, DV = _check_shapes(q, k, v)
    scale = default_scale(D) if scale is None else float(scale)
    o = _alloc((B, H, L, DV), q.dtype, q.device) if out is None else out
    lse = _alloc((B, H, 2, L), torch.float32, q.device)
    if o.numel() == 0:
        return o, _nothing_attended(lse)
    if S == 0:  # nothing to attend: every row is fully masked
        return o.zero_(), _nothing_attended(lse)
    _launch_fwd(q, k, v, o, lse, attn_mask, is_causal, scale, dropout_p, seed, None)
    return o, lse


def _nothing_attended(stats: torch.Tensor) -> torch.Tensor:
    """(.., 2, L) row statistics of rows that attend nothing: lse -inf, remainder 0."""
    stats[..., 0, :] = float("-inf")
    stats[..., 1, :] = 0.0
    return stats


def _launch_fwd(q, k, v, o, lse, attn_mask, is_causal, scale, dropout_p, seed, varlen):
    """The forward kernel over (B, H, L, D)-shaped views; ``varlen`` = (cu_q, cu_k, max_q, max_k)
    runs one program row per packed sequence instead (B = 1, L and S the token totals)."""
    B, H, L, D, H_kv, S, DV = _check_shapes(q, k, v)
    mask, mask_strides, mask_kind = _mask_arg(attn_mask, q, S)
    cu_q, cu_k, rows, keys, batch = (q, q, L, S, B) if varlen is None else (*varlen, varlen[0].numel() - 1)
    BLOCK_D, BLOCK_DV = _block_d(D), _block_d(DV)
    kernel = _tuned_kernel("fwd", _attn_fwd_kernel, _FWD_CONFIGS, BLOCK_D, BLOCK_DV, q.dtype, q.device,
                           _has_dropout(dropout_p, seed))
    kernel[_grid(rows, "BLOCK_M", H, batch)](
        q, k, v, o, lse, mask, cu_q, cu_k,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *mask_strides,
        H, H // H_kv, L, S, D, DV, scale * 1.4426950408889634, dropout_threshold(dropout_p),
        _keep_scale(dropout_p), _seed_arg(seed, lse), _seq_bucket(rows), _seq_bucket(keys), rows,
        IS_CAUSAL=bool(is_causal), MASK_KIND=mask_kind, HAS_DROPOUT=_has_dropout(dropout_p, seed),
        PRECISION=_precision(q.dtype), BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, VARLEN=varlen is not None,
    )


def _sum_to_shape(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a (B, H, L, S) gradient over the dims a mask of ``shape`` was broadcast along."""
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1]
    return (grad.sum(dims, keepdim=True) if dims else grad).reshape(shape)


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                  scale: float | None = None, dropout_p: float = 0.0, seed: torch.Tensor | None = None,
                  mask_grad: bool = False, atomic_dq: bool = False):
    """Gradients of :func:`attention_fwd`, recomputing the scores from q, k and the saved lse.

    do, o (B, H, L, Dv); q, k, v, attn_mask, is_causal, scale, dropout_p, seed as in the forward;
    lse (B, H, 2, L) float32 from the forward. Returns dq, dk, dv shaped and typed like q, k, v
    (contiguous), and the gradient of a float ``attn_mask`` (its shape and dtype, summed over its
    broadcast dims) when ``mask_grad`` is True, else None. Deterministic (no atomics) unless
    ``atomic_dq``: then the dK/dV kernel also adds dQ with float32 atomics, and the dQ kernel (two
    of the seven matrix products) is not run; dq's last bits vary from run to run. A mask
    gradient, which the dQ kernel stores, takes the deterministic kernels whatever ``atomic_dq``.
    """
    q, k, v, do, o = (_last_dim_contiguous(t) for t in (q, k, v, do, o))
    B, H, L, D, H_kv, S, DV = _check_shapes(q, k, v)
    scale = default_scale(D) if scale is None else float(scale)
    dq, dk, dv = (_alloc(t.shape, t.dtype, t.device) for t in (q, k, v))
    mask_grad = mask_grad and attn_mask is not None
    ds = _alloc((B, H, L, S) if mask_grad else (0,), torch.float32, q.device)
    if mask_grad and is_causal:  # the dQ kernel skips key tiles a query tile cannot see: their dS is 0
        ds.zero_()
    if dq.numel() == 0 and dk.numel() == 0 and dv.numel() == 0 and ds.numel() == 0:
        return dq, dk, dv, (_sum_to_shape(ds, attn_mask.shape).to(attn_mask.dtype) if mask_grad else None)
    if S == 0 or L == 0 or B * H == 0:  # nothing attended: every gradient is 0
        dmask = _sum_to_shape(ds.zero_(), attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, ds, attn_mask, mask_grad, is_causal, scale, dropout_p, seed,
                None, atomic_dq)
    dmask = _sum_to_shape(ds, attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    return dq, dk, dv, dmask


def _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, ds, attn_mask, mask_grad, is_causal, scale, dropout_p, seed,
                varlen, atomic_dq=False):
    """The three backward kernels over (B, H, L, D)-shaped views (``varlen`` as in _launch_fwd);
    with ``atomic_dq`` (and no mask gradient) two: dQ comes from the dK/dV kernel's atomics."""
    B, H, L, D, H_kv, S, DV = _check_shapes(q, k, v)
    mask, mask_strides, mask_kind = _mask_arg(attn_mask, q, S)
    cu_q, cu_k, rows, keys, batch = (q, q, L, S, B) if varlen is None else (*varlen, varlen[0].numel() - 1)
    BLOCK_D, BLOCK_DV = _block_d(D), _block_d(DV)
    common = dict(IS_CAUSAL=bool(is_causal), MASK_KIND=mask_kind, HAS_DROPOUT=_has_dropout(dropout_p, seed),
                  PRECISION=_precision(q.dtype), BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                  VARLEN=varlen is not None)
    scalars = (H, H // H_kv, L, S, D, DV, scale * 1.4426950408889634, scale, dropout_threshold(dropout_p),
               _keep_scale(dropout_p), _seed_arg(seed, lse), _seq_bucket(rows), _seq_bucket(keys))

    delta = _alloc((B, H, L), torch.float32, q.device)
    # Rows per program of the row-sum: 16 from head dim 128 on (32 rows of fp32 o and do at head
    # dim 128 spill on sm_90a).
    DELTA_BLOCK_M = 16 if BLOCK_DV >= 128 else 32
    _attn_bwd_delta_kernel[check_grid((triton.cdiv(L, DELTA_BLOCK_M) * H * B,), "attention")](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, L, DV,
        BLOCK_M=DELTA_BLOCK_M, BLOCK_DV=BLOCK_DV)

    has_list = _list_key(_ATOMIC_KV_CONFIGS, BLOCK_D, BLOCK_DV, q.dtype, q.device, common["HAS_DROPOUT"])
    atomic = atomic_dq and not mask_grad and has_list is not None
    # The atomics' float32 accumulator (unscaled): dq itself when it is float32 and contiguous.
    dq_acc = dq
    if atomic:
        dq_acc = dq.zero_() if dq.dtype == torch.float32 and dq.is_contiguous() else \
            torch.zeros(dq.shape, dtype=torch.float32, device=dq.device)
    kv_kernel = _tuned_kernel(*(("bwd_kv_atomic", _attn_bwd_kv_kernel, _ATOMIC_KV_CONFIGS) if atomic else
                                ("bwd_kv", _attn_bwd_kv_kernel, _BWD_KV_CONFIGS)),
                              BLOCK_D, BLOCK_DV, q.dtype, q.device, common["HAS_DROPOUT"])
    kv_kernel[_grid(keys, "BLOCK_N", H_kv, batch)](
        q, k, v, do, lse, delta, mask, dk, dv, dq_acc, cu_q, cu_k,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *dk.stride()[:3], *dv.stride()[:3], *dq_acc.stride()[:3], *mask_strides,
        *scalars, keys, ATOMIC_DQ=atomic, **common)
    if atomic:
        dq_acc.mul_(scale)
        if dq_acc is not dq:
            dq.copy_(dq_acc)
        return

    q_kernel = _tuned_kernel("bwd_q", _attn_bwd_q_kernel, _BWD_Q_CONFIGS, BLOCK_D, BLOCK_DV, q.dtype,
                             q.device, common["HAS_DROPOUT"])
    q_kernel[_grid(rows, "BLOCK_M", H, batch)](
        q, k, v, do, lse, delta, mask, dq, ds if mask_grad else dq, cu_q, cu_k,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        *mask_strides, *(ds.stride()[:3] if mask_grad else (0, 0, 0)), *scalars, rows, MASK_GRAD=mask_grad,
        **common)


def _has_dropout(p: float, seed: torch.Tensor | None) -> bool:
    if p > 0.0 and seed is None:
        raise ValueError("attention: dropout_p > 0 needs a seed tensor")
    return p > 0.0


def _seed_arg(seed: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """The SEED pointer: the (1,) int64 seed, or any tensor when there is no dropout (never read)."""
    return placeholder if seed is None else seed


def default_scale(head_dim: int) -> float:
    """1 / sqrt(D); for D = 0 every score is 0 whatever the scale (torch's result), so 1."""
    return head_dim ** -0.5 if head_dim else 1.0


def _keep_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


# ---------------------------------------------------------------------------------------------
# Variable-length (packed) sequences
# ---------------------------------------------------------------------------------------------


def _packed_view(t: torch.Tensor) -> torch.Tensor:
    """(tokens, heads, dim) as a (1, heads, tokens, dim) view: one batch entry whose rows are
    every sequence's tokens; the kernels' varlen mode picks each sequence's rows out of it."""
    return _last_dim_contiguous(t).permute(1, 0, 2).unsqueeze(0)


def varlen_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                         is_causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                         seed: torch.Tensor | None = None):
    """Attention within each of several packed sequences (flash-attn's varlen layout).

    q (Tq, H, D), k (Tk, H_kv, D), v (Tk, H_kv, Dv); sequence i has query rows
    [cu_seqlens_q[i], cu_seqlens_q[i + 1]) and keys [cu_seqlens_k[i], cu_seqlens_k[i + 1])
    (int32 or int64 offsets, (sequences + 1,), on q's device), no longer than max_seqlen_q /
    max_seqlen_k. ``is_causal``: bottom-right aligned per sequence (query row i of a sequence of
    L queries and S keys attends keys j <= i + S - L). Rows outside every sequence get 0.

    Returns o (Tq, H, Dv) in q's dtype and lse (H, 2, Tq) float32, base 2 as :func:`attention_fwd`'s
    (-inf where nothing is attended).
    """
    qp, kp, vp = (_packed_view(t) for t in (q, k, v))
    _, H, L, D, H_kv, S, DV = _check_shapes(qp, kp, vp)
    # The kernels read offset i at CU + i: strided offsets are copied.
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    scale = D ** -0.5 if scale is None else float(scale)
    o = torch.zeros((L, H, DV), dtype=q.dtype, device=q.device)
    lse = _nothing_attended(torch.empty((1, H, 2, L), dtype=torch.float32, device=q.device))
    if o.numel() and S and max_seqlen_q > 0 and cu_seqlens_q.numel() > 1:
        _launch_fwd(qp, kp, vp, o.permute(1, 0, 2).unsqueeze(0), lse, None, is_causal, scale, dropout_p, seed,
                    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return o, lse[0]


def varlen_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, is_causal: bool = False,
                         scale: float | None = None, dropout_p: float = 0.0,
                         seed: torch.Tensor | None = None, atomic_dq: bool = False):
    """Gradients of :func:`varlen_attention_fwd`: dq, dk, dv shaped like q, k, v (keys outside
    every sequence get 0). do, o (Tq, H, Dv); lse (H, 2, Tq) from the forward; ``atomic_dq`` as in
    :func:`attention_bwd`."""
    qp, kp, vp, dop, op = (_packed_view(t) for t in (q, k, v, do, o))
    _, H, L, D, H_kv, S, DV = _check_shapes(qp, kp, vp)
    # The kernels read offset i at CU + i: strided offsets are copied.
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    scale = D ** -0.5 if scale is None else float(scale)
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if L and S and max_seqlen_q > 0 and max_seqlen_k > 0 and cu_seqlens_q.numel() > 1:
        dqp, dkp, dvp = (t.permute(1, 0, 2).unsqueeze(0) for t in (dq, dk, dv))
        _launch_bwd(dop, qp, kp, vp, op, lse.unsqueeze(0), dqp, dkp, dvp, dq, None, False, is_causal, scale,
                    dropout_p, seed, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), atomic_dq)
    return dq, dk, dv
