"""Dropout, and dropout fused with the residual add and LayerNorm of a Transformer block.

``dropout`` has ``torch.nn.functional.dropout``'s signature and semantics. On the kernel path its
mask comes from a counter-based generator keyed by a seed drawn from torch's generator for the
input's device (so ``torch.manual_seed`` reproduces it) and kept there as a one-element tensor the
kernels read (no host synchronisation); the backward regenerates the mask from that seed and
nothing else is saved. The torch path is PyTorch's own dropout: same distribution,
different random stream.

``dropout_add_layer_norm`` computes, in one kernel, the "add & norm" step::

    pre_norm_sum = residual + dropout(x)
    out          = LayerNorm(pre_norm_sum)   over the last dimension

and returns both: post-norm blocks use ``out``, pre-norm blocks carry ``pre_norm_sum`` on as the
next residual (its gradient flows back through the same backward kernel).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from .. import backend
from ._double_backward import differentiable_grads, dropout_scale_mask, recording_backward
from ._random import draw_seed
from ._validate import check_floating, check_same_device, check_shape


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p (dropout probability) must be a number, got {type(p).__name__}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (dropout probability) must be between 0 and 1, got {p}")
    return float(p)


class DropoutFunction(torch.autograd.Function):
    """y = dropout(x) on the kernel path; only the seed is kept for the backward."""

    @staticmethod
    def forward(ctx, input, p: float, seed: torch.Tensor, inplace: bool):
        kernels = backend.kernels("dropout")
        ctx.p, ctx.seed = p, seed
        if not inplace:
            return kernels.dropout_fwd(input, p, seed).view(input.shape)
        ctx.mark_dirty(input)
        if input.is_contiguous():
            kernels.dropout_fwd(input, p, seed, out=input)
        else:
            input.copy_(kernels.dropout_fwd(input, p, seed).view(input.shape))
        return input

    @staticmethod
    def backward(ctx, dy):
        # The backward is dropout of dy with the same mask: run as the Function itself, it is
        # differentiable again (double backward) for free.
        return DropoutFunction.apply(dy, ctx.p, ctx.seed, False), None, None, None


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True,
            inplace: bool = False) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``, as
    ``torch.nn.functional.dropout``. Identity when ``training`` is False or ``p == 0``; all zeros
    at ``p == 1``. fp16/bf16/fp32/fp64, any shape; ``inplace`` overwrites ``input``."""
    p = _check_p(p)
    check_floating("input", input)
    if backend.select("dropout", input) == "torch":
        return F.dropout(input, p, training, inplace)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    return DropoutFunction.apply(input, p, draw_seed(input.device), bool(inplace))


def _check_add_norm_args(x, residual, weight, bias) -> None:
    check_floating("x", x)
    check_floating("residual", residual)
    check_floating("weight", weight)
    check_floating("bias", bias)
    check_same_device("x", {"x": x, "residual": residual, "weight": weight, "bias": bias})
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (LayerNorm runs over the last one)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x, {tuple(x.shape)}; got {tuple(residual.shape)}")
    check_shape("weight", weight, (x.shape[-1],))
    check_shape("bias", bias, (x.shape[-1],))


class DropoutAddLayerNormFunction(torch.autograd.Function):
    """(LayerNorm(residual + dropout(x)), residual + dropout(x)) on the kernel path.

    Saved: pre_norm_sum (an output, so no extra memory while the caller holds it), the weight, bias and
    the per-row mean and rstd; the dropout mask is regenerated from the seed.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, p: float, eps: float, seed: torch.Tensor | None):
        rows = (math.prod(x.shape[:-1]), x.shape[-1])  # not (-1, n): n may be 0
        out, pre, mean, rstd = backend.kernels("layer_norm").dropout_add_layer_norm_fwd(
            x.reshape(rows), None if residual is None else residual.reshape(rows), weight, bias,
            p, eps, seed)
        pre = pre.view(x.shape)  # saved as the output itself, so a recorded backward reaches x
        ctx.save_for_backward(pre, weight, bias, mean, rstd)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read
        ctx.p, ctx.seed, ctx.eps = p, seed, eps
        ctx.shape, ctx.x_dtype = x.shape, x.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(x.shape), pre

    @staticmethod
    def _recorded_backward(ctx, dout, dpre, pre, weight, bias):
        """The backward in differentiable torch ops (double backward). ``pre`` is the saved output,
        so second-order terms flow back into x and residual through this Function again."""
        shape, n = pre.shape, pre.shape[-1]  # x's shape
        need_x, need_res, need_w, need_b = ctx.needs_input_grad[:4]
        ds = dpre
        dw = db = None
        if dout is not None:
            pre_leaf = pre if pre.requires_grad else pre.detach().requires_grad_()
            dpre_out, dw, db = differentiable_grads(
                lambda s, w, b: F.layer_norm(s, (n,), w, b, ctx.eps), (pre_leaf, weight, bias),
                (True, need_w, need_b), dout.reshape(shape))
            ds = dpre_out if ds is None else ds + dpre_out
        keep = dropout_scale_mask(shape, ctx.p, ctx.seed, pre.device)
        dx = (ds if keep is None else ds * keep).to(ctx.x_dtype) if need_x else None
        dres = ds.to(ctx.residual_dtype) if need_res else None
        return dx, dres, dw, db, None, None, None

    @staticmethod
    def backward(ctx, dout, dpre):
        pre, weight, bias, mean, rstd = ctx.saved_tensors
        if recording_backward():
            return DropoutAddLayerNormFunction._recorded_backward(ctx, dout, dpre, pre, weight, bias)
        out_unused = dout is None  # only pre_norm_sum fed the loss: weight and bias get no gradient
        if out_unused:
            dout = torch.zeros_like(pre)
        rows = (math.prod(pre.shape[:-1]), pre.shape[-1])
        pre = pre.reshape(rows)
        dx, dres, dw, db = backend.kernels("layer_norm").dropout_add_layer_norm_bwd(
            dout.reshape(rows), None if dpre is None else dpre.reshape(rows), pre, weight,
            mean, rstd, ctx.p, ctx.seed, ctx.x_dtype, ctx.residual_dtype, ctx.bias_dtype)
        if out_unused:
            dw = db = None
        shape = ctx.shape
        return (dx.view(shape), None if dres is None else dres.view(shape), dw, db, None, None, None)


def dropout_add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None = None,
                           weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                           p: float = 0.5, eps: float = 1e-5, training: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused "add & norm": returns ``(out, pre_norm_sum)`` with
    ``pre_norm_sum = residual + dropout(x, p, training)`` and
    ``out = layer_norm(pre_norm_sum, (N,), weight, bias, eps)`` over the last dim N.

    x: (..., N) fp16/bf16/fp32/fp64; residual: x's shape or None (meaning 0), its dtype may differ
    (e.g. a float32 residual stream under autocast: both outputs then take the promoted dtype);
    weight, bias: (N,) or None. Gradients reach x, residual, weight and bias, including the
    gradient flowing into ``pre_norm_sum`` when it is used downstream.
    """
    p = _check_p(p)
    _check_add_norm_args(x, residual, weight, bias)
    if backend.select("dropout_add_layer_norm", x) == "torch":
        pre = F.dropout(x, p, training)
        if residual is not None:
            pre = residual + pre
        return F.layer_norm(pre, (x.shape[-1],), weight, bias, eps), pre
    if not training:
        p = 0.0
    seed = draw_seed(x.device) if p > 0.0 and x.numel() else None
    return DropoutAddLayerNormFunction.apply(x, residual, weight, bias, p, float(eps), seed)
