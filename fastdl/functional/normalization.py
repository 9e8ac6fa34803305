"""Normalisation layers: ``layer_norm``, ``rms_norm`` and ``batch_norm`` (torch.nn.functional
signatures).

Each public function checks its arguments, asks :mod:`fastdl.backend` which path runs, and either
calls PyTorch (``torch`` backend) or an autograd Function around the launchers in
``fastdl.kernels.layer_norm`` / ``fastdl.kernels.batch_norm`` (``triton`` / ``interpret``). The
Functions save the input, the weight and the per-row (per-channel for batch norm) statistics.
Double backward works on every path: a backward recorded with ``create_graph=True`` takes its
gradients from torch's differentiable ops (see ``_double_backward``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from .. import backend
from ._double_backward import differentiable_grads, recording_backward
from ._validate import as_shape, check_floating, check_param_dtypes, check_same_device, check_shape


def _check_norm_args(input, normalized_shape, weight, bias) -> tuple[int, ...]:
    check_floating("input", input)
    check_floating("weight", weight)
    check_floating("bias", bias)
    check_same_device("input", {"input": input, "weight": weight, "bias": bias})
    shape = as_shape("normalized_shape", normalized_shape)
    if not shape:
        raise ValueError("normalized_shape must have at least one dimension, got ()")
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(f"normalized_shape={list(shape)} must match the trailing dimensions of "
                         f"input, whose shape is {list(input.shape)}")
    check_shape("weight", weight, shape)
    check_shape("bias", bias, shape)
    return shape


def _rows(input: torch.Tensor, n_dims: int) -> torch.Tensor:
    """``input`` as (M, N) rows over its last ``n_dims`` dims; not reshape(-1, N), as N may be 0."""
    lead = input.dim() - n_dims
    return input.reshape(math.prod(input.shape[:lead]), math.prod(input.shape[lead:]))


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1)


def _unflat(t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.view(like.shape)


class LayerNormFunction(torch.autograd.Function):
    """y = LayerNorm(x) on the kernel path; x is viewed as (M, N), N = prod(normalized_shape)."""

    @staticmethod
    def forward(ctx, input, weight, bias, n_dims: int, eps: float):
        x = _rows(input, n_dims)
        y, mean, rstd = backend.kernels("layer_norm").layer_norm_fwd(x, _flat(weight), _flat(bias), eps)
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.n_dims, ctx.eps = n_dims, eps
        return y.view(input.shape)

    @staticmethod
    def backward(ctx, dy):
        input, weight, bias, mean, rstd = ctx.saved_tensors
        if recording_backward():
            shape = input.shape[input.dim() - ctx.n_dims:]
            grads = differentiable_grads(lambda x, w, b: F.layer_norm(x, shape, w, b, ctx.eps),
                                         (input, weight, bias), ctx.needs_input_grad[:3], dy)
            return (*grads, None, None)
        x = _rows(input, ctx.n_dims)
        dx, dw, db = backend.kernels("layer_norm").layer_norm_bwd(
            dy.reshape(x.shape), x, _flat(weight), mean, rstd, bias is not None)
        return dx.view(input.shape), _unflat(dw, weight), _unflat(db, bias), None, None


class RMSNormFunction(torch.autograd.Function):
    """y = RMSNorm(x) on the kernel path; x is viewed as (M, N), N = prod(normalized_shape)."""

    @staticmethod
    def forward(ctx, input, weight, n_dims: int, eps: float):
        x = _rows(input, n_dims)
        y, rstd = backend.kernels("layer_norm").rms_norm_fwd(x, _flat(weight), eps)
        ctx.save_for_backward(input, weight, rstd)
        ctx.n_dims, ctx.eps = n_dims, eps
        return y.view(input.shape)

    @staticmethod
    def backward(ctx, dy):
        input, weight, rstd = ctx.saved_tensors
        if recording_backward():
            shape = input.shape[input.dim() - ctx.n_dims:]
            grads = differentiable_grads(lambda x, w: F.rms_norm(x, shape, w, ctx.eps),
                                         (input, weight), ctx.needs_input_grad[:2], dy)
            return (*grads, None, None)
        x = _rows(input, ctx.n_dims)
        dx, dw = backend.kernels("layer_norm").rms_norm_bwd(dy.reshape(x.shape), x, _flat(weight), rstd)
        return dx.view(input.shape), _unflat(dw, weight), None, None


def layer_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dims, as
    ``torch.nn.functional.layer_norm``. fp16/bf16/fp32/fp64; statistics in float32 (fp64 for fp64).
    """
    shape = _check_norm_args(input, normalized_shape, weight, bias)
    check_param_dtypes(input, {"weight": weight, "bias": bias})
    if backend.select("layer_norm", input) == "torch":
        return F.layer_norm(input, shape, weight, bias, eps)
    return LayerNormFunction.apply(input, weight, bias, len(shape), float(eps))


def rms_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """Root-mean-square normalisation, as ``torch.nn.functional.rms_norm``. ``eps=None`` means what
    torch's implementation uses (not what its docstring says): the epsilon of the computation
    dtype, ``torch.finfo(torch.float32).eps`` for fp16/bf16/fp32 and float64's for float64."""
    shape = _check_norm_args(input, normalized_shape, weight, None)
    if backend.select("rms_norm", input) == "torch":
        return F.rms_norm(input, shape, weight, eps)
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    return RMSNormFunction.apply(input, weight, len(shape), float(eps))


# ---------------------------------------------------------------------------------------------
# Batch normalisation
# ---------------------------------------------------------------------------------------------

# Input dtypes the batch-norm kernels load and store.
_BATCH_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BatchNormFunction(torch.autograd.Function):
    """y = BatchNorm(x) on the kernel path, x: (N, C, *) in any memory format. Updates the running
    buffers in place in training (they are not differentiable inputs)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training: bool, momentum: float,
                eps: float):
        y, mean, rstd = backend.kernels("batch_norm").batch_norm_fwd(
            input, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.training, ctx.eps = training, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def _reference(ctx, mean, rstd):
        """The forward in torch ops: batch statistics in training, the saved running ones in eval."""
        if ctx.training:
            return lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, ctx.eps)

        def eval_norm(x, w, b):
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = (x - mean.view(shape)) * rstd.view(shape)
            y = y if w is None else y * w.view(shape)
            return (y if b is None else y + b.view(shape)).to(x.dtype)
        return eval_norm

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if recording_backward():
            grads = differentiable_grads(BatchNormFunction._reference(ctx, mean, rstd), (x, weight, bias),
                                         ctx.needs_input_grad[:3], dy)
            return (*grads, None, None, None, None, None)
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dx, dw, db = backend.kernels("batch_norm").batch_norm_bwd(
            dy, x, weight, mean, rstd, ctx.training, need_w or need_b)
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(ctx.bias_dtype) if need_b else None
        return dx, dw, db, None, None, None, None, None


def _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps):
    for name, t in (("input", input), ("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_floating(name, t)
    check_same_device("input", {"input": input, "running_mean": running_mean,
                                "running_var": running_var, "weight": weight, "bias": bias})
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C) or (N, C, *), got {list(input.shape)}")
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) to match the {channels} channels "
                             f"(dim 1) of input of shape {list(input.shape)}, got {list(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both be None)")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given in evaluation mode "
                         "(training=False)")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float, got {momentum!r}")
    if training:
        values = input.shape[0] * math.prod(input.shape[2:])
        if values == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {input.size()}")
        if eps <= 0.0:
            raise ValueError(f"eps must be positive during training, got {eps}")
    elif eps < 0.0:
        raise ValueError(f"eps must be non-negative, got {eps}")


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """Batch normalisation over every dim but the channels (dim 1) of an (N, C, *) input, as
    ``torch.nn.functional.batch_norm``.

    ``training=True`` normalises with the batch's mean and biased variance and, when the running
    buffers are given, updates them in place: ``running = (1 - momentum) * running + momentum *
    batch`` with the *unbiased* batch variance. ``training=False`` normalises with the running
    buffers. fp16/bf16/fp32/fp64; statistics in float32 (fp64 for fp64); the output has the
    input's dtype and memory format (channels_last stays channels_last).
    """
    _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_param_dtypes(input, {"running_mean": running_mean, "running_var": running_var,
                               "weight": weight, "bias": bias})
    unsupported = None if input.dtype in _BATCH_NORM_DTYPES else f"input dtype {input.dtype}"
    if backend.select("batch_norm", input, unsupported=unsupported) == "torch":
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, bool(training),
                                   float(momentum), float(eps))
