"""Normalisation layers: ``layer_norm`` and ``rms_norm`` (torch.nn.functional signatures).

Each public function checks its arguments, asks :mod:`fastdl.backend` which path runs, and either
calls PyTorch (``torch`` backend) or an autograd Function around the launchers in
``fastdl.kernels.layer_norm`` (``triton`` / ``interpret``). The Functions save the input, the
weight and the per-row statistics; double backward is not supported on the kernel path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import backend
from ._validate import as_shape, check_floating, check_same_device, check_shape


def _check_norm_args(input, normalized_shape, weight, bias) -> tuple[int, ...]:
    check_floating("input", input)
    check_floating("weight", weight)
    check_floating("bias", bias)
    check_same_device("input", {"input": input, "weight": weight, "bias": bias})
    shape = as_shape("normalized_shape", normalized_shape)
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(f"normalized_shape={list(shape)} must match the trailing dimensions of "
                         f"input, whose shape is {list(input.shape)}")
    check_shape("weight", weight, shape)
    check_shape("bias", bias, shape)
    return shape


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1)


def _unflat(t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.view(like.shape)


class LayerNormFunction(torch.autograd.Function):
    """y = LayerNorm(x) on the kernel path; x is viewed as (M, N), N = prod(normalized_shape)."""

    @staticmethod
    def forward(ctx, input, weight, bias, n: int, eps: float):
        x = input.reshape(-1, n)
        y, mean, rstd = backend.kernels("layer_norm").layer_norm_fwd(x, _flat(weight), _flat(bias), eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.input_shape = input.shape
        return y.view(input.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = backend.kernels("layer_norm").layer_norm_bwd(
            dy.reshape(x.shape), x, _flat(weight), mean, rstd, ctx.bias_shape is not None)
        db = None if db is None else db.view(ctx.bias_shape)
        return dx.view(ctx.input_shape), _unflat(dw, weight), db, None, None


class RMSNormFunction(torch.autograd.Function):
    """y = RMSNorm(x) on the kernel path; x is viewed as (M, N), N = prod(normalized_shape)."""

    @staticmethod
    def forward(ctx, input, weight, n: int, eps: float):
        x = input.reshape(-1, n)
        y, rstd = backend.kernels("layer_norm").rms_norm_fwd(x, _flat(weight), eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.input_shape = input.shape
        return y.view(input.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = backend.kernels("layer_norm").rms_norm_bwd(dy.reshape(x.shape), x, _flat(weight), rstd)
        return dx.view(ctx.input_shape), _unflat(dw, weight), None, None


def layer_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dims, as
    ``torch.nn.functional.layer_norm``. fp16/bf16/fp32/fp64; statistics in float32 (fp64 for fp64).
    """
    shape = _check_norm_args(input, normalized_shape, weight, bias)
    if backend.select("layer_norm", input) == "torch":
        return F.layer_norm(input, shape, weight, bias, eps)
    return LayerNormFunction.apply(input, weight, bias, math.prod(shape), float(eps))


def rms_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """Root-mean-square normalisation, as ``torch.nn.functional.rms_norm``; ``eps=None`` means
    ``torch.finfo(input.dtype).eps``."""
    shape = _check_norm_args(input, normalized_shape, weight, None)
    if backend.select("rms_norm", input) == "torch":
        return F.rms_norm(input, shape, weight, eps)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return RMSNormFunction.apply(input, weight, math.prod(shape), float(eps))
