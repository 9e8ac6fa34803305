"""Dropout, and dropout fused with the residual add and LayerNorm of a Transformer block.

``dropout`` has ``torch.nn.functional.dropout``'s signature and semantics. On the kernel path its
mask comes from a counter-based generator keyed by a seed drawn from torch's generator for the
input's device (so ``torch.manual_seed`` reproduces it) and kept there as a one-element tensor the
kernels read (no host synchronisation); the backward regenerates the mask from that seed and
nothing else is saved. The torch path is PyTorch's own dropout with its generator seeded from that
seed (read on the host): same distribution, different random stream. (On CPU tensors the same noise
is drawn from a private generator in that state, so torch's own is neither reseeded nor restored.)

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
from torch.overrides import has_torch_function_unary

from .. import backend
from ._double_backward import differentiable_grads, dropout_scale_mask
from ._library import (as_output, autocast_dtype, eager_torch_path, fake, fake_like, masks_from, operator,
                       or_empty, path, per_sample, recompute_grads, seeded, seeded_cpu_generator, stats_dtype)
from ._random import draw_seed
from ._validate import all_cpu, check_bool, check_floating, check_param_dtypes, check_same_device, check_shape


def _check_p(p) -> float:
    # fast path: a float needs only the range check (isinstance of an ABC costs more)
    if type(p) is not float and (isinstance(p, bool) or not isinstance(p, numbers.Real)):
        raise TypeError(f"p (dropout probability) must be a number, got {type(p).__name__}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (dropout probability) must be between 0 and 1, got {p}")
    return float(p)


def _torch_dropout(input: torch.Tensor, p: float, seed: torch.Tensor | None,
                   inplace: bool = False) -> torch.Tensor:
    """torch's dropout with its generator seeded from ``seed``: the torch path's mask (eager and
    operator alike). ``inplace`` needs a contiguous input."""
    x = input if inplace else input.contiguous()  # torch draws in memory order: one mask per seed
    if (seed is not None and x.is_cpu and seed.is_cpu and 0.0 < p < 1.0 and x.numel()
            and not has_torch_function_unary(x) and not per_sample(seed)):
        # Fast path: what F.dropout computes for a CPU tensor (ATen's _dropout_impl: a Bernoulli
        # noise tensor divided by 1 - p, times the input), its noise drawn from a private generator
        # in the state seeded() would give torch's -- the same mask, bit for bit
        # (tests/test_fast_paths.py), without saving and restoring torch's generator.
        noise = torch.empty_like(x).bernoulli_(1 - p, generator=seeded_cpu_generator(seed))
        noise.div_(1 - p)
        return x.mul_(noise) if inplace else x * noise
    with seeded(seed):
        return F.dropout(x, p, True, inplace)


def _apply_mask(input: torch.Tensor, p: float, seed: torch.Tensor, backend_name: str) -> torch.Tensor:
    """Dropout of ``input`` with the mask of ``seed`` on ``backend_name`` (a new tensor)."""
    if backend_name == "torch":
        out = _torch_dropout(input, p, seed)
        return out.clone() if out is input else out
    return as_output(backend.kernels("dropout").dropout_fwd(input, p, seed), input.shape)


@operator("dropout")
def _dropout_op(input: torch.Tensor, p: float, seed: torch.Tensor, requested: str) -> torch.Tensor:
    """Dropout with the mask of ``seed`` (a (1,) int64 tensor) on the backend of this call."""
    return _apply_mask(input, p, seed, path("dropout", input, None, requested))


@operator("dropout_backward")
def _dropout_backward_op(grad: torch.Tensor, p: float, seed: torch.Tensor, backend_name: str) -> torch.Tensor:
    """The forward's mask applied to ``grad`` (dropout is linear: its backward is itself)."""
    return _apply_mask(grad, p, seed, backend_name)


def _dropout_fake(input, p, seed, backend_name):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


fake(_dropout_op)(_dropout_fake)
fake(_dropout_backward_op)(_dropout_fake)


def _dropout_setup(ctx, inputs, output):
    input, p, seed, requested = inputs  # the backward's: a resolved backend, which resolves to itself
    ctx.save_for_backward(seed)
    ctx.p = p
    ctx.backend_name = path("dropout", input, None, requested)


def _dropout_grad(ctx, grad):
    (seed,) = ctx.saved_tensors
    # Differentiable again (it is the same linear map): double backward for free.
    return torch.ops.fastdl.dropout_backward(grad, ctx.p, seed, ctx.backend_name), None, None, None


_dropout_op.register_autograd(_dropout_grad, setup_context=_dropout_setup)
_dropout_backward_op.register_autograd(_dropout_grad, setup_context=_dropout_setup)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True,
            inplace: bool = False) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``, as
    ``torch.nn.functional.dropout``. Identity when ``training`` is False or ``p == 0``; all zeros
    at ``p == 1``. fp16/bf16/fp32/fp64, any shape; ``inplace`` overwrites ``input``."""
    p = _check_p(p)
    check_bool("training", training)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not training or p == 0.0 or input.numel() == 0:
        return input  # any dtype, as torch's identity
    check_floating("input", input)
    seed = draw_seed(input.device)
    if eager_torch_path("dropout", input):  # the operator's mask, recorded by PyTorch's autograd
        if masks_from(input, seed) != "torch":  # under torch.func: the kernel's (flat) mask, in torch ops
            mask = dropout_scale_mask((1, input.numel()), p, seed, input.device).view(input.shape)
            out = (input * mask).to(input.dtype)
            return input.copy_(out) if inplace else out
        if not inplace:
            return _torch_dropout(input, p, seed)
        if input.is_contiguous():  # the layout the operator draws in
            return _torch_dropout(input, p, seed, inplace=True)
    out = torch.ops.fastdl.dropout(input, p, seed, backend.operator_requested())
    return input.copy_(out) if inplace else out


def _check_add_norm_args(x, residual, weight, bias) -> None:
    check_floating("x", x)
    check_floating("residual", residual)
    check_floating("weight", weight)
    check_floating("bias", bias)
    if not all_cpu(x, residual, weight, bias):
        check_same_device("x", {"x": x, "residual": residual, "weight": weight, "bias": bias})
    shape = x.shape  # read once: each .shape builds a new torch.Size
    if not shape:
        raise ValueError("x must have at least one dimension (LayerNorm runs over the last one)")
    if residual is not None and residual.shape != shape:
        raise ValueError(f"residual must have the shape of x, {tuple(shape)}; got {tuple(residual.shape)}")
    normalized = (shape[-1],)
    check_shape("weight", weight, normalized)
    check_shape("bias", bias, normalized)
    dtype = x.dtype
    if residual is None or residual.dtype == dtype:
        if (weight is not None and weight.dtype != dtype) or (bias is not None and bias.dtype != dtype):
            check_param_dtypes(x, {"weight": weight, "bias": bias}, "x")  # (the common case skips it)
    else:  # the sum is normalised, in the promoted dtype
        check_param_dtypes(torch.promote_types(x.dtype, residual.dtype), {"weight": weight, "bias": bias},
                           "residual + x")


def _torch_dropout_add_layer_norm(x, residual, weight, bias, p: float, eps: float, seed, backend_name: str):
    """(out, pre_norm_sum) in PyTorch, the dropout mask being ``backend_name``'s for ``seed``: the
    torch path's forward, and the differentiable recomputation for double backward."""
    if p == 0.0:
        pre = x
    elif backend_name == "torch":
        pre = _torch_dropout(x, p, seed)
    else:  # the fused kernel's (rows, N) mask, differentiably (double backward)
        pre = (x * dropout_scale_mask(x.shape, p, seed, x.device)).to(x.dtype)
    if residual is not None:
        pre = residual + pre
    return F.layer_norm(pre, (x.shape[-1],), weight, bias, eps), pre


@operator("dropout_add_layer_norm")
def _dropout_add_layer_norm_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                               bias: torch.Tensor | None, p: float, eps: float, seed: torch.Tensor | None,
                               requested: str
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, pre_norm_sum, mean (M,), rstd (M,)); the statistics are zeros on the torch path."""
    rows = (math.prod(x.shape[:-1]), x.shape[-1])  # not (-1, n): n may be 0
    if path("dropout_add_layer_norm", x, None, requested) == "torch":
        out, pre = _torch_dropout_add_layer_norm(x, residual, weight, bias, p, eps, seed, "torch")
        zeros = x.new_zeros(rows[0], dtype=stats_dtype(pre.dtype))
        return out, pre.clone() if pre is x else pre, zeros, zeros.clone()
    out, pre, mean, rstd = backend.kernels("layer_norm").dropout_add_layer_norm_fwd(
        x.reshape(rows), None if residual is None else residual.reshape(rows), weight, bias,
        p, eps, seed)
    return as_output(out, x.shape), as_output(pre, x.shape), mean, rstd


@fake(_dropout_add_layer_norm_op)
def _(x, residual, weight, bias, p, eps, seed, requested):
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    rows = math.prod(x.shape[:-1])
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype),
            x.new_empty(rows, dtype=stats_dtype(dtype)), x.new_empty(rows, dtype=stats_dtype(dtype)))


@operator("dropout_add_layer_norm_backward")
def _dropout_add_layer_norm_backward_op(
        dout: torch.Tensor, dpre: torch.Tensor, x: torch.Tensor | None, residual: torch.Tensor | None,
        pre: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
        rstd: torch.Tensor, p: float, eps: float, seed: torch.Tensor | None, x_dtype: torch.dtype,
        residual_dtype: torch.dtype | None, bias_dtype: torch.dtype | None, backend_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual, dweight, dbias); empty tensors for an absent residual, weight or bias
    (``*_dtype`` None). The torch path recomputes from ``x``, ``residual`` and ``bias``; the
    kernel path needs only ``pre`` and the weight."""
    if backend_name == "torch":
        grads = recompute_grads(
            lambda x, residual, weight, bias: _torch_dropout_add_layer_norm(
                x, residual, weight, bias, p, eps, seed, "torch"),
            (x, residual, weight, bias), (dout, dpre))
        return tuple(or_empty(g, pre) for g in grads)
    shape = pre.shape
    rows = (math.prod(shape[:-1]), shape[-1])
    dx, dres, dw, db = backend.kernels("layer_norm").dropout_add_layer_norm_bwd(
        dout.reshape(rows), dpre.reshape(rows), pre.reshape(rows), weight, mean, rstd, p,
        seed, x_dtype, residual_dtype, bias_dtype)
    dres = None if dres is None else dres.view(shape)
    return dx.view(shape), or_empty(dres, pre), or_empty(dw, pre), or_empty(db, pre)


@fake(_dropout_add_layer_norm_backward_op)
def _(dout, dpre, x, residual, pre, weight, bias, mean, rstd, p, eps, seed, x_dtype, residual_dtype,
      bias_dtype, backend_name):
    dres = None if residual_dtype is None else pre.new_empty(pre.shape, dtype=residual_dtype)
    db = None if bias_dtype is None else pre.new_empty(pre.shape[-1], dtype=bias_dtype)
    return (pre.new_empty(pre.shape, dtype=x_dtype), or_empty(dres, pre), fake_like(weight, pre),
            or_empty(db, pre))


def _dropout_add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, p, eps, seed, requested = inputs
    out, pre, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None
    ctx.backend_name = path("dropout_add_layer_norm", x, None, requested)
    # The kernel path's backward needs pre_norm_sum (an output the caller usually holds anyway);
    # the torch path's recomputes from x and residual.
    kept = (x, residual) if ctx.backend_name == "torch" else (None, None)
    ctx.save_for_backward(*kept, bias, pre, weight, mean, rstd, seed)
    ctx.args = (p, eps)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, residual, bias))
    ctx.present = (residual is not None, weight is not None, bias is not None)


def _dropout_add_layer_norm_recorded_grad(ctx, dout, dpre, pre, weight, bias, seed):
    """The kernel path's backward in differentiable ops (double backward). ``pre`` is the saved
    output, so second-order terms flow back into x and residual through this operator again."""
    p, eps = ctx.args
    need_x, need_res, need_w, need_b = ctx.needs_input_grad[:4]
    ds, dw, db = dpre, None, None
    if dout is not None:
        pre_leaf = pre if pre.requires_grad else pre.detach().requires_grad_()
        dpre_out, dw, db = differentiable_grads(
            lambda s, w, b: F.layer_norm(s, (s.shape[-1],), w, b, eps), (pre_leaf, weight, bias),
            (True, need_w, need_b), dout)
        ds = dpre_out if ds is None else ds + dpre_out
    if ds is None:
        return None, None, dw, db, None, None, None, None
    x_dtype, residual_dtype, _ = ctx.dtypes
    dx = None
    if need_x:
        dx = ds if p == 0.0 else (ds * dropout_scale_mask(ds.shape, p, seed, ds.device)).to(ds.dtype)
        dx = dx.to(x_dtype)
    dres = ds.to(residual_dtype) if need_res else None
    return dx, dres, dw, db, None, None, None, None


def _dropout_add_layer_norm_grad(ctx, dout, dpre, *_stats):
    x, residual, bias, pre, weight, mean, rstd, seed = ctx.saved_tensors
    p, eps = ctx.args
    if torch.is_grad_enabled():  # double backward: differentiable PyTorch with the forward's mask
        if x is None:  # kernel path: x and residual were not kept, pre_norm_sum was
            return _dropout_add_layer_norm_recorded_grad(ctx, dout, dpre, pre, weight, bias, seed)
        grads = recompute_grads(
            lambda x, residual, weight, bias: _torch_dropout_add_layer_norm(
                x, residual, weight, bias, p, eps, seed, ctx.backend_name),
            (x, residual, weight, bias), (dout, dpre), create_graph=True)
        return (*grads, None, None, None, None)
    out_unused = dout is None  # only pre_norm_sum fed the loss: weight and bias get no gradient
    dout = torch.zeros_like(pre) if dout is None else dout
    dpre = torch.zeros_like(pre) if dpre is None else dpre
    dx, dres, dw, db = torch.ops.fastdl.dropout_add_layer_norm_backward(
        dout, dpre, x, residual, pre, weight, bias, mean, rstd, p, eps, seed, *ctx.dtypes, ctx.backend_name)
    has_res, has_w, has_b = ctx.present
    has_w, has_b = has_w and not out_unused, has_b and not out_unused
    return (dx, dres if has_res else None, dw if has_w else None, db if has_b else None,
            None, None, None, None)


_dropout_add_layer_norm_op.register_autograd(_dropout_add_layer_norm_grad,
                                             setup_context=_dropout_add_layer_norm_setup)


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
    check_bool("training", training)
    _check_add_norm_args(x, residual, weight, bias)
    if not training:
        p = 0.0
    seed = draw_seed(x.device) if p > 0.0 and x.numel() else None
    if eager_torch_path("dropout_add_layer_norm", x):
        out, pre = _torch_dropout_add_layer_norm(x, residual, weight, bias, p, float(eps), seed,
                                                 masks_from(x, seed))
        if pre is x:  # no residual, no dropout: a new tensor, as the operator returns
            pre = x.clone()
    else:
        out, pre = torch.ops.fastdl.dropout_add_layer_norm(x, residual, weight, bias, p, float(eps), seed,
                                                           backend.operator_requested())[:2]
    if x.is_cuda and autocast_dtype(x) is not None:
        out = out.float()  # torch's LayerNorm runs in float32 under CUDA autocast
    return out, pre
