"""Dropout with a counter-based mask that is regenerated, never stored.

Forward, over the input viewed as a flat vector of ``numel`` elements::

    keep[i] = rand(seed, i) >= p          (Philox, ``dropout_keep`` in kernels/utils.py)
    y[i]    = x[i] * (keep[i] ? 1 / (1 - p) : 0)

A dropped element is multiplied by 0, not replaced by 0, so a dropped inf or NaN gives NaN, as
torch's ``input * mask * scale`` does.

The random number of element ``i`` depends only on ``(seed, i)``, so the backward rebuilds the
same mask from the seed: ``dx[i] = dy[i] * (keep[i] ? 1 / (1 - p) : 0)``, which is the forward applied
to ``dy``. Saved for the backward: the seed (a Python int) -- no mask, zero bytes per element
where PyTorch keeps a bool (CUDA) or a full-precision noise tensor (CPU).

``i`` is the element's index in the *logical* row-major order, so the mask does not depend on
how a tensor is laid out in memory; offsets are int64, so tensors beyond 2^31 elements work.
At ``p = 1`` nothing is kept and the scale is 0 (never 1/0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import INTERPRET, PER_CALL_ARGS, acc_dtype, dropout_keep, ensure_contiguous

# Elements per program. The interpreter runs programs one after another, each with a fixed
# overhead, so it gets fewer, larger blocks.
BLOCK = 4096 if INTERPRET else 1024


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _dropout_kernel(X, Y, numel, p, scale, seed, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Y[i] = X[i] * (keep(seed, i) ? scale : 0) for one block of the flat (numel,) tensors."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    keep = dropout_keep(seed, offsets, p)
    y = tl.where(keep, x * scale, x * 0.0)  # x * 0, not 0: a dropped inf or NaN is NaN, as torch
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _keep_mask_kernel(KEEP, numel, p, seed, BLOCK: tl.constexpr):
    """KEEP[i] = keep(seed, i), as int8, for one block of the flat (numel,) mask."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(KEEP + offsets, dropout_keep(seed, offsets, p).to(tl.int8), mask=offsets < numel)


def keep_scale(p: float) -> float:
    """The factor kept elements are multiplied by: 1 / (1 - p), and 0 at p = 1."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


@ensure_contiguous
def dropout_fwd(x: torch.Tensor, p: float, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dropout of ``x`` (any shape, fp16/bf16/fp32/fp64) with the mask of ``seed``.

    Returns a contiguous tensor shaped like ``x`` in its dtype; ``out`` (contiguous, same shape and
    dtype; may be ``x`` itself) receives the result instead of a new tensor.
    """
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    numel = x.numel()
    if numel == 0:
        return y
    _dropout_kernel[(triton.cdiv(numel, BLOCK),)](x, y, numel, float(p), keep_scale(p), int(seed),
                                                 ACC=acc_dtype(x.dtype), BLOCK=BLOCK, num_warps=4)
    return y


def dropout_bwd(dy: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Gradient of :func:`dropout_fwd`: the same mask and scale applied to ``dy``."""
    return dropout_fwd(dy, p, seed)


def keep_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    """The boolean keep-mask (``shape``) that :func:`dropout_fwd` and the fused add & LayerNorm
    kernel apply for ``(p, seed)`` -- for tests and debugging; the ops themselves never build it."""
    keep = torch.empty(shape, dtype=torch.int8, device=device)
    numel = keep.numel()
    if numel:
        _keep_mask_kernel[(triton.cdiv(numel, BLOCK),)](keep, numel, float(p), int(seed), BLOCK=BLOCK)
    return keep.bool()
