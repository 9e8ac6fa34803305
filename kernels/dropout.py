"""Dropout with a counter-based mask that is regenerated, never stored.

Forward, over the input viewed as a flat vector of ``numel`` elements::

    keep[i] = lane i % 4 of Philox(seed, i // 4) >= p * 2^32     (``dropout_keep``, kernels/utils.py)
    y[i]    = x[i] * (keep[i] ? 1 / (1 - p) : 0)

A dropped element is multiplied by 0, not replaced by 0, so a dropped inf or NaN gives NaN, as
torch's ``input * mask * scale`` does.

One Philox call decides four elements. The decision of element ``i`` depends only on
``(seed, i)``, so the backward rebuilds the same mask from the seed: ``dx[i] = dy[i] * (keep[i] ?
1 / (1 - p) : 0)``, which is the forward applied to ``dy``. The seed is a one-element int64 tensor
on the input's device that the kernel loads itself -- never read back by the host, so a call
neither waits for the GPU nor breaks a CUDA graph. Saved for the backward: that seed -- no mask,
zero bytes per element where PyTorch keeps a bool (CUDA) or a full-precision noise tensor (CPU).

``i`` is the element's index in the *logical* row-major order, so the mask does not depend on
how a tensor is laid out in memory; counters are int64, so tensors beyond 2^31 elements work.
At ``p = 1`` nothing is kept and the scale is 0 (never 1/0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (INTERPRET, PER_CALL_ARGS, acc_dtype, check_grid, dropout_counters, dropout_keep,
                    dropout_threshold, ensure_contiguous)

# Elements per program. The interpreter runs programs one after another, each with a fixed
# overhead, so it gets fewer, larger blocks.
BLOCK = 4096 if INTERPRET else 1024


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _dropout_kernel(X, Y, SEED, numel, threshold, scale: tl.float64, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Y[i] = X[i] * (keep(seed, i) ? scale : 0) for one block of the flat (numel,) tensors."""
    if ACC != tl.float64:  # float64 scalars: see kernels/utils.py
        scale = tl.cast(scale, ACC)
    block = tl.program_id(0).to(tl.int64)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    keep = dropout_keep(tl.load(SEED), dropout_counters(block, 0, BLOCK, BLOCK), threshold)
    y = tl.where(keep, x * scale, x * 0.0)  # x * 0, not 0: a dropped inf or NaN is NaN, as torch
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _keep_mask_kernel(KEEP, SEED, N, threshold, BLOCK: tl.constexpr):
    """KEEP[r, c] = keep(seed, r, c) as int8 for one block of row r of the (M, N) mask."""
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    keep = dropout_keep(tl.load(SEED), dropout_counters(row, start, N, BLOCK), threshold)
    tl.store(KEEP + row * N + cols, keep.to(tl.int8), mask=cols < N)


def keep_scale(p: float) -> float:
    """The factor kept elements are multiplied by: 1 / (1 - p), and 0 at p = 1."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


@ensure_contiguous
def dropout_fwd(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Dropout of ``x`` (any shape, fp16/bf16/fp32/fp64) with the mask of ``seed``.

    seed: one-element int64 tensor on x's device (read by the kernel only). Returns a new
    contiguous tensor shaped like ``x`` in its dtype.
    """
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    numel = x.numel()
    if numel == 0:
        return y
    # BLOCK is a multiple of 4, so block b's counters are those of row b of a (blocks, BLOCK)
    # matrix: element i = b * BLOCK + c gets counter i // 4, lane i % 4.
    _dropout_kernel[check_grid((triton.cdiv(numel, BLOCK),), "dropout")](
        x, y, seed, numel, dropout_threshold(p), keep_scale(p), ACC=acc_dtype(x.dtype), BLOCK=BLOCK,
        num_warps=4)
    return y


def dropout_bwd(dy: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`dropout_fwd`: the same mask and scale applied to ``dy``."""
    return dropout_fwd(dy, p, seed)


def keep_mask(shape, p: float, seed: torch.Tensor, device) -> torch.Tensor:
    """The boolean keep-mask (``shape``) that the kernels apply for ``(p, seed)`` to a tensor of that
    shape viewed as (rows, last dim): element (r, c) uses lane c % 4 of Philox counter
    r * ceil(N / 4) + c // 4 (``kernels.utils.dropout_counters``). This is :func:`dropout_fwd`'s
    mask whenever the last dim N is a multiple of 4 (then the counter is flat index // 4), and
    always that of the fused add & norm, BERT embeddings and (for (B, H, L, S) scores) attention.
    For tests and debugging; the ops themselves never build it."""
    keep = torch.empty(shape, dtype=torch.int8, device=device)
    numel = keep.numel()
    if numel:
        N = keep.shape[-1] if keep.dim() else 1
        block = max(16, min(1024, triton.next_power_of_2(N)))
        _keep_mask_kernel[check_grid((numel // N, triton.cdiv(N, block)), "dropout")](
            keep, seed, N, dropout_threshold(p), BLOCK=block)
    return keep.bool()
