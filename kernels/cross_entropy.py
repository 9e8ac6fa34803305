"""Cross-entropy over one chunk of logits, loss and gradient in one kernel (logits overwritten).

The fused linear + cross-entropy (``fastdl.functional.linear_cross_entropy``) walks the tokens in
chunks: ``logits = hidden_chunk @ weight^T + bias`` (a matmul), then this kernel, then the matmuls
of the gradients. Only one chunk of logits ever exists, and this kernel turns it into its own
gradient in place, so no second (tokens x vocab) buffer is needed either.

One program per row x of V logits streams the row in BLOCK_V tiles twice. First pass, an online
logsumexp (running maximum m and rescaled sum d) plus the sums the loss needs::

    m' = max(m, max(x_tile)),   d = d * exp(m - m') + sum(exp(x_tile - m')),   lse = m + log(d)

Hard targets t (int64 class index; ``ignore_index`` rows give loss 0 and gradient 0), label
smoothing eps, q = (1 - eps) * onehot(t) + eps / V::

    loss = (1 - eps) * (lse - x_t) + eps * (lse - sum(x) / V)     (eps = 0: lse - x_t alone)

Soft targets Q (V probabilities per row, as torch: not renormalised), q = (1 - eps) * Q + eps / V::

    loss = sum(q) * lse - sum(q * x)

Non-finite logits give what torch's formulas give: with eps = 0 a logit of -inf costs nothing
unless it is the target (loss +inf); a soft target of 0 at a logit of -inf is 0 * -inf = NaN.

Second pass (when a gradient is wanted), with g the loss's gradient for the row (1 / count for a
mean, 1 for a sum, the incoming gradient for ``reduction="none"``)::

    dx = g * (sum(q) * softmax(x) - q)          written over x, in the logits' dtype

Arithmetic in float32 (float64 for float64 logits). A hard target outside [0, V) that is not
``ignore_index`` gives a NaN loss for its row (the front checks values on the CPU and raises; on
CUDA a check would cost a device-to-host sync). Saved: nothing -- the caller keeps the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import INTERPRET, acc_dtype, check_grid

# Vocab tile per step. The interpreter gets smaller tiles so that tests with vocabularies of a
# few hundred words cross several tiles and their ragged ends. 4096 spills on sm_80 (8-12 bytes,
# in 8 and 16 warps alike); 2048 in 8 warps does not.
MAX_BLOCK_V = 256 if INTERPRET else 2048


@triton.jit
def _times_shift(total, shift):
    """total * shift, 0 where shift is 0 (a lane's maximum that did not move), also for an
    infinite total."""
    return tl.where(shift == 0.0, 0.0, total * shift)


@triton.jit
def _cross_entropy_kernel(
    LOGITS, TARGET, LOSS, GRAD_SCALE, SMOOTHING,  # LOGITS (N, V) row stride sl; TARGET (N,) int64 or (N, V)
    sl, st, sg, V, ignore_index,  # sg: stride of GRAD_SCALE (0: one scalar for all rows)
    SOFT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Read from memory, not passed as a scalar argument: those are float32, too coarse for float64.
    smoothing = tl.load(SMOOTHING).to(ACC)
    x_row = LOGITS + row * sl
    cols = tl.arange(0, BLOCK_V)

    # Everything is kept relative to the running maxima (log-softmax = (x - max) - log d, as
    # torch): forming lse = max + log d first would round losses and gradients to the ulp of the
    # largest logit (a 9% error on the loss of a confident row with logits near 50).
    m = tl.full([BLOCK_V], float("-inf"), dtype=ACC)  # per-lane running maxima, merged at the end
    d = tl.zeros([BLOCK_V], dtype=ACC)
    # Hard targets: the sum of x - m over the lane (label smoothing's mean) and its count.
    # Soft targets: the sum of q * (x - m) and of q, with q torch's mixed target (1 - eps) Q + eps / V.
    sum_xm = tl.zeros([BLOCK_V], dtype=ACC)
    count = tl.zeros([BLOCK_V], dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        ok = v0 + cols < V
        x = tl.load(x_row + v0 + cols, mask=ok, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, x)
        # Lanes that have seen only padding keep m = -inf: shift by 0 there, not -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe)  # the lane's max moved by this
        if SOFT:
            q = tl.load(TARGET + row * st + v0 + cols, mask=ok, other=0.0).to(ACC)
            q = tl.where(ok, (1.0 - smoothing) * q + smoothing / V, 0.0)
            # One product per logit, as torch's sum of q * log_softmax: a q of 0 at a logit of
            # -inf is NaN, a positive q there is an infinite loss (not two terms' 0 * inf).
            sum_xm += _times_shift(count, shift) + tl.where(ok, q * (x - m_safe), 0.0)
            count += q
        else:
            sum_xm += count * shift + tl.where(ok, x - m_safe, 0.0)
            count += tl.where(ok, 1.0, 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    lane_shift = tl.where(m == float("-inf"), 0.0, m - m_row)
    d_row = tl.sum(d * tl.exp(m - m_row), axis=0)
    log_d = tl.log(d_row)
    sum_row = tl.sum(sum_xm + _times_shift(count, lane_shift), axis=0)  # relative to m_row

    if SOFT:
        q_total = tl.sum(count, axis=0)
        loss = q_total * log_d - sum_row
    else:
        target = tl.load(TARGET + row)
        ignored = target == ignore_index
        in_range = (target >= 0) & (target < V)
        x_t = tl.load(x_row + tl.where(in_range, target, 0)).to(ACC)
        loss = (m_row - x_t) + log_d
        # As torch, no smoothing term at all without smoothing: it is infinite when a logit is -inf.
        smooth = (log_d - sum_row / V) * smoothing  # -mean(log_softmax) * eps
        loss = tl.where(smoothing == 0.0, loss, (1.0 - smoothing) * loss + smooth)
        loss = tl.where(in_range, loss, float("nan"))
        loss = tl.where(ignored, 0.0, loss)
        q_total = 1.0
    tl.store(LOSS + row, loss)

    if COMPUTE_GRAD:
        g = tl.load(GRAD_SCALE + row * sg).to(ACC)
        if not SOFT:
            g = tl.where(ignored, 0.0, g)
        for v0 in range(0, V, BLOCK_V):
            ok = v0 + cols < V
            x = tl.load(x_row + v0 + cols, mask=ok, other=0.0).to(ACC)
            if SOFT:
                q = tl.load(TARGET + row * st + v0 + cols, mask=ok, other=0.0).to(ACC)
                q = (1.0 - smoothing) * q + smoothing / V
            else:
                q = tl.where(v0 + cols == target, 1.0 - smoothing, 0.0) + smoothing / V
            dx = g * (q_total * (tl.exp(x - m_row) / d_row) - q)
            tl.store(x_row + v0 + cols, dx.to(LOGITS.dtype.element_ty), mask=ok)


def cross_entropy_chunk(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, smoothing: float,
                        grad_scale: torch.Tensor | None, loss: torch.Tensor) -> None:
    """Per-row cross-entropy of ``logits`` into ``loss``; with ``grad_scale``, also overwrite the
    logits with their gradient.

    logits (N, V) fp16/bf16/fp32/fp64, last dim contiguous (a row-slice of a bigger buffer is
    fine); target (N,) int64 class indices or (N, V) probabilities; grad_scale: None, a 1-element
    tensor (the same gradient for every row) or (N,) per-row gradients; loss (N,) float32
    (float64 for float64 logits), written.
    """
    N, V = logits.shape
    if N == 0:
        return
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_chunk needs logits with a contiguous last dim")
    soft = target.dim() == 2
    if (soft and target.stride(1) != 1) or (not soft and target.stride(0) != 1):
        target = target.contiguous()  # the kernel reads class indices at TARGET + row
    if grad_scale is None:
        scale_arg, sg = loss, 0
    else:
        scale_arg, sg = grad_scale, (0 if grad_scale.numel() == 1 else grad_scale.stride(0))
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    smoothing_t = torch.full((1,), smoothing, dtype=acc, device=logits.device)  # a fill, no host copy
    block_v = max(16, min(triton.next_power_of_2(V), MAX_BLOCK_V))
    _cross_entropy_kernel[check_grid((N,), "cross_entropy")](
        logits, target, loss, scale_arg, smoothing_t, logits.stride(0), target.stride(0), sg, V,
        int(ignore_index), SOFT=soft, COMPUTE_GRAD=grad_scale is not None,
        ACC=acc_dtype(logits.dtype), BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
