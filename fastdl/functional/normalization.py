"""Normalisation layers: ``layer_norm``, ``rms_norm`` and ``batch_norm`` (torch.nn.functional
signatures).

Each public function checks its arguments and calls its operator, ``torch.ops.fastdl.layer_norm``
/ ``rms_norm`` / ``batch_norm`` (see :mod:`fastdl.functional._library`), whose implementation runs
PyTorch (``torch`` backend) or the launchers in ``fastdl.kernels.layer_norm`` /
``fastdl.kernels.batch_norm`` (``triton`` / ``interpret``). The autograd formulas save the input,
the weight and the per-row (per-channel for batch norm) statistics. Double backward works on every
path: a backward recorded with ``create_graph=True`` runs torch's differentiable ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backend
from ._library import (as_output, autocast_dtype, eager_torch_path, fake, fake_like, operator, or_empty,
                       or_none, path, recompute_grads, stats_dtype)
from ._validate import (all_cpu, as_shape, check_bool, check_floating, check_param_dtypes, check_same_device,
                        check_shape)


def _check_norm_args(input, normalized_shape, weight, bias) -> tuple[int, ...]:
    check_floating("input", input)
    check_floating("weight", weight)
    check_floating("bias", bias)
    if not all_cpu(input, weight, bias):
        check_same_device("input", {"input": input, "weight": weight, "bias": bias})
    shape = as_shape("normalized_shape", normalized_shape)
    if not shape:
        raise ValueError("normalized_shape must have at least one dimension, got ()")
    if input.dim() < len(shape) or input.shape[input.dim() - len(shape):] != shape:
        raise ValueError(f"normalized_shape={list(shape)} must match the trailing dimensions of "
                         f"input, whose shape is {list(input.shape)}")
    check_shape("weight", weight, shape)
    check_shape("bias", bias, shape)
    return shape


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1)


def _unflat(t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """A kernel's flat parameter gradient in the shape and dtype of the parameter ``like``."""
    return None if t is None else t.view(like.shape).to(like.dtype)


def _rows(input: torch.Tensor, ndim: int) -> int:
    """How many rows of ``prod(normalized_shape)`` values the input holds."""
    return math.prod(input.shape[:input.dim() - ndim])


def _as_rows(input: torch.Tensor, ndim: int) -> torch.Tensor:
    """The input as (M, N), N = prod(normalized_shape) (``-1`` would be ambiguous when M is 0)."""
    return input.reshape(_rows(input, ndim), math.prod(input.shape[input.dim() - ndim:]))


def _torch_layer_norm(input, weight, bias, ndim: int, eps: float):
    return F.layer_norm(input, input.shape[input.dim() - ndim:], weight, bias, eps)


def _torch_rms_norm(input, weight, ndim: int, eps: float | None):
    return F.rms_norm(input, input.shape[input.dim() - ndim:], weight, eps)


@operator("layer_norm")
def _layer_norm_op(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   ndim: int, eps: float, requested: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last ``ndim`` dims -> (out like input, mean (M,), rstd (M,))."""
    stats = stats_dtype(input.dtype)
    if path("layer_norm", input, None, requested) == "torch":
        out, mean, rstd = torch.native_layer_norm(input, input.shape[input.dim() - ndim:], weight, bias, eps)
        return out, mean.reshape(-1).to(stats), rstd.reshape(-1).to(stats)
    x = _as_rows(input, ndim)
    y, mean, rstd = backend.kernels("layer_norm").layer_norm_fwd(x, _flat(weight), _flat(bias), eps)
    return as_output(y, input.shape), mean, rstd


@fake(_layer_norm_op)
def _(input, weight, bias, ndim, eps, requested):
    rows, stats = _rows(input, ndim), stats_dtype(input.dtype)
    return (input.new_empty(input.shape), input.new_empty(rows, dtype=stats),
            input.new_empty(rows, dtype=stats))


@operator("layer_norm_backward")
def _layer_norm_backward_op(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, ndim: int,
                            eps: float, backend_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d input, d weight, d bias); an empty tensor for a missing weight or bias."""
    if backend_name == "torch":
        dx, dw, db = recompute_grads(_torch_layer_norm, (input, weight, bias, ndim, eps), (grad,))[:3]
    else:
        x = _as_rows(input, ndim)
        dx, dw, db = backend.kernels("layer_norm").layer_norm_bwd(
            grad.reshape(x.shape), x, _flat(weight), mean, rstd, bias is not None)
        dx, dw, db = dx.view(input.shape), _unflat(dw, weight), _unflat(db, bias)
    return dx, or_empty(dw, input), or_empty(db, input)


@fake(_layer_norm_backward_op)
def _(grad, input, weight, bias, mean, rstd, ndim, eps, backend_name):
    return input.new_empty(input.shape), fake_like(weight, input), fake_like(bias, input)


def _layer_norm_setup(ctx, inputs, output):
    input, weight, bias, ndim, eps, requested = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(input, weight, bias, *output[1:])
    ctx.args = (ndim, eps)
    ctx.backend_name = path("layer_norm", input, None, requested)


def _layer_norm_grad(ctx, grad, *_stats):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # double backward: differentiable PyTorch
        dx, dw, db = recompute_grads(_torch_layer_norm, (input, weight, bias, *ctx.args), (grad,),
                                     create_graph=True)[:3]
    else:
        dx, dw, db = torch.ops.fastdl.layer_norm_backward(grad, input, weight, bias, mean, rstd, *ctx.args,
                                                          ctx.backend_name)
        dw, db = or_none(dw, weight), or_none(db, bias)
    return dx, dw, db, None, None, None


_layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


@operator("rms_norm")
def _rms_norm_op(input: torch.Tensor, weight: torch.Tensor | None, ndim: int,
                 eps: float | None, requested: str) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last ``ndim`` dims -> (out like input, rstd (M,); zeros on the torch
    path, whose backward recomputes)."""
    if path("rms_norm", input, None, requested) == "torch":
        rstd = input.new_zeros(_rows(input, ndim), dtype=stats_dtype(input.dtype))
        return _torch_rms_norm(input, weight, ndim, eps), rstd
    if eps is None:  # what torch's implementation uses: the computation dtype's epsilon
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    x = _as_rows(input, ndim)
    y, rstd = backend.kernels("layer_norm").rms_norm_fwd(x, _flat(weight), eps)
    return as_output(y, input.shape), rstd


@fake(_rms_norm_op)
def _(input, weight, ndim, eps, requested):
    return input.new_empty(input.shape), input.new_empty(_rows(input, ndim), dtype=stats_dtype(input.dtype))


@operator("rms_norm_backward")
def _rms_norm_backward_op(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor | None,
                          rstd: torch.Tensor, ndim: int, eps: float | None,
                          backend_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d input, d weight); an empty tensor for a missing weight."""
    if backend_name == "torch":
        dx, dw = recompute_grads(_torch_rms_norm, (input, weight, ndim, eps), (grad,))[:2]
    else:
        x = _as_rows(input, ndim)
        dx, dw = backend.kernels("layer_norm").rms_norm_bwd(grad.reshape(x.shape), x, _flat(weight), rstd)
        dx, dw = dx.view(input.shape), _unflat(dw, weight)
    return dx, or_empty(dw, input)


@fake(_rms_norm_backward_op)
def _(grad, input, weight, rstd, ndim, eps, backend_name):
    return input.new_empty(input.shape), fake_like(weight, input)


def _rms_norm_setup(ctx, inputs, output):
    input, weight, ndim, eps, requested = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(input, weight, output[1])
    ctx.args = (ndim, eps)
    ctx.backend_name = path("rms_norm", input, None, requested)


def _rms_norm_grad(ctx, grad, _rstd):
    input, weight, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        dx, dw = recompute_grads(_torch_rms_norm, (input, weight, *ctx.args), (grad,), create_graph=True)[:2]
    else:
        dx, dw = torch.ops.fastdl.rms_norm_backward(grad, input, weight, rstd, *ctx.args, ctx.backend_name)
        dw = or_none(dw, weight)
    return dx, dw, None, None, None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


def layer_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dims, as
    ``torch.nn.functional.layer_norm``. fp16/bf16/fp32/fp64; statistics in float32 (fp64 for fp64).
    Under CUDA autocast it computes and returns float32, as torch's (layer_norm is on autocast's
    float32 list there; CPU autocast leaves it alone).
    """
    shape = _check_norm_args(input, normalized_shape, weight, bias)
    check_param_dtypes(input, {"weight": weight, "bias": bias})
    if input.is_cuda and autocast_dtype(input) is not None:
        input, weight, bias = (None if t is None else t.float() for t in (input, weight, bias))
    if eager_torch_path("layer_norm", input):
        return F.layer_norm(input, shape, weight, bias, eps)
    return torch.ops.fastdl.layer_norm(input, weight, bias, len(shape), float(eps),
                                       backend.operator_requested())[0]


def rms_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """Root-mean-square normalisation, as ``torch.nn.functional.rms_norm``. ``eps=None`` means what
    torch's implementation uses (not what its docstring says): the epsilon of the computation
    dtype, ``torch.finfo(torch.float32).eps`` for fp16/bf16/fp32 and float64's for float64."""
    shape = _check_norm_args(input, normalized_shape, weight, None)
    if eager_torch_path("rms_norm", input):
        return F.rms_norm(input, shape, weight, eps)
    return torch.ops.fastdl.rms_norm(input, weight, len(shape), None if eps is None else float(eps),
                                     backend.operator_requested())[0]


# ---------------------------------------------------------------------------------------------
# Batch normalisation
# ---------------------------------------------------------------------------------------------

# Input dtypes the batch-norm kernels load and store.
_BATCH_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _batch_norm_format(x: torch.Tensor) -> torch.memory_format:
    """The output's memory format (torch's rule): channels_last for a channels_last input that is
    not also contiguous, contiguous otherwise."""
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _gradient_in_layout(memory_format: torch.memory_format):
    """A gradient hook that hands PyTorch's batch norm backward its output gradient in the
    output's layout: its CPU backward (2.13) gets dx wrong for a gradient whose strides look
    channels-last through size-1 dims only (a permuted view)."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if grad is None or grad.is_contiguous(memory_format=memory_format):
            return grad
        return grad.contiguous(memory_format=memory_format)
    return hook


def _batch_norm_unsupported(input: torch.Tensor) -> str | None:
    return None if input.dtype in _BATCH_NORM_DTYPES else f"input dtype {input.dtype}"


def _batch_norm_path(input: torch.Tensor, requested: str) -> str:
    return path("batch_norm", input, _batch_norm_unsupported(input), requested)


def _torch_batch_norm_of(running_mean, running_var, training: bool, eps: float):
    """The torch path's forward of (input, weight, bias) as its backward recomputes it: the
    running buffers are read in evaluation only, never updated."""
    buffers = (None, None) if training else (running_mean, running_var)
    return lambda input, weight, bias: F.batch_norm(input, *buffers, weight, bias, training, 0.0, eps)


def _eval_batch_norm_of(mean: torch.Tensor, rstd: torch.Tensor):
    """The kernels' evaluation forward of (input, weight, bias) from its saved per-channel mean
    and rstd, differentiably (double backward)."""
    def forward(input, weight, bias):
        shape = (1, -1) + (1,) * (input.dim() - 2)
        y = (input - mean.view(shape)) * rstd.view(shape)
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        return y.to(input.dtype)
    return forward


@operator("batch_norm")
def _batch_norm_op(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                   momentum: float, eps: float, requested: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm of (N, C, *) -> (out, mean (C,), rstd (C,), new running mean, new running var).

    Functional (an operator with an autograd formula cannot mutate): the updated running buffers
    come back as new (C,) tensors in training -- empty otherwise -- and the front copies them in.
    The statistics are zeros on the torch path (its backward recomputes).
    """
    update = training and running_mean is not None
    if update:
        running_mean, running_var = running_mean.clone(), running_var.clone()
    if _batch_norm_path(input, requested) == "torch":
        out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        out = out.contiguous(memory_format=_batch_norm_format(input))
        mean = input.new_zeros(input.shape[1], dtype=stats_dtype(input.dtype))
        rstd = mean.clone()
    else:
        out, mean, rstd = backend.kernels("batch_norm").batch_norm_fwd(
            input, weight, bias, running_mean, running_var, training, momentum, eps)
    if not update:
        running_mean, running_var = input.new_empty(0), input.new_empty(0)
    return out, mean, rstd, running_mean, running_var


@fake(_batch_norm_op)
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, requested):
    stats = stats_dtype(input.dtype)
    update = training and running_mean is not None
    return (torch.empty_like(input, memory_format=_batch_norm_format(input)),
            input.new_empty(input.shape[1], dtype=stats), input.new_empty(input.shape[1], dtype=stats),
            fake_like(running_mean if update else None, input),
            fake_like(running_var if update else None, input))


@operator("batch_norm_backward")
def _batch_norm_backward_op(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, running_mean: torch.Tensor | None,
                            running_var: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                            training: bool, eps: float, backend_name: str
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d input, d weight, d bias); an empty tensor for a missing weight or bias."""
    if backend_name == "torch":
        grad = _gradient_in_layout(_batch_norm_format(input))(grad)
        dx, dw, db = recompute_grads(_torch_batch_norm_of(running_mean, running_var, training, eps),
                                     (input, weight, bias), (grad,))
        return dx, or_empty(dw, input), or_empty(db, input)
    need = weight is not None or bias is not None
    dx, dw, db = backend.kernels("batch_norm").batch_norm_bwd(grad, input, weight, mean, rstd, training, need)
    dw = None if weight is None else dw.to(weight.dtype)
    db = None if bias is None else db.to(bias.dtype)
    return dx, or_empty(dw, input), or_empty(db, input)


@fake(_batch_norm_backward_op)
def _(grad, input, weight, bias, running_mean, running_var, mean, rstd, training, eps, backend_name):
    dx = torch.empty_like(input, memory_format=_batch_norm_format(input))
    return dx, fake_like(weight, input), fake_like(bias, input)


def _batch_norm_setup(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, training, momentum, eps, requested = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.backend_name = _batch_norm_path(input, requested)
    # The torch path's backward reads the running buffers in evaluation; the kernels' reads the
    # forward's mean and rstd, which in evaluation are the buffers' values then. Not saving the
    # buffers lets the module train (updating them in place) before an evaluation output's backward
    # runs, as PyTorch allows.
    buffers = (running_mean, running_var) if not training and ctx.backend_name == "torch" else (None, None)
    ctx.save_for_backward(input, weight, bias, *buffers, *output[1:3])
    ctx.args = (training, eps)


def _batch_norm_grad(ctx, grad, *_non_differentiable):
    input, weight, bias, running_mean, running_var, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        training, eps = ctx.args
        forward = (_eval_batch_norm_of(mean, rstd) if not training and ctx.backend_name != "torch"
                   else _torch_batch_norm_of(running_mean, running_var, training, eps))
        dx, dw, db = recompute_grads(forward, (input, weight, bias), (grad,), create_graph=True)
    else:
        dx, dw, db = torch.ops.fastdl.batch_norm_backward(grad, input, weight, bias, running_mean,
                                                          running_var, mean, rstd, *ctx.args,
                                                          ctx.backend_name)
        dw, db = or_none(dw, weight), or_none(db, bias)
    return dx, dw, db, None, None, None, None, None, None


_batch_norm_op.register_autograd(_batch_norm_grad, setup_context=_batch_norm_setup)


def _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps):
    check_bool("training", training)
    check_floating("input", input)
    check_floating("running_mean", running_mean)
    check_floating("running_var", running_var)
    check_floating("weight", weight)
    check_floating("bias", bias)
    if not all_cpu(input, running_mean, running_var, weight, bias):
        check_same_device("input", {"input": input, "running_mean": running_mean,
                                    "running_var": running_var, "weight": weight, "bias": bias})
    shape = input.shape
    if len(shape) < 2:
        raise ValueError(f"input must have shape (N, C) or (N, C, *), got {list(shape)}")
    per_channel = (shape[1],)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.shape != per_channel:
            raise ValueError(f"{name} must have shape ({shape[1]},) to match the {shape[1]} channels "
                             f"(dim 1) of input of shape {list(shape)}, got {list(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both be None)")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given in evaluation mode "
                         "(training=False)")
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad) \
            and torch.is_grad_enabled():
        name = "running_mean" if running_mean.requires_grad else "running_var"
        raise ValueError(f"batch_norm is not differentiable with respect to {name}, which requires grad: "
                         "the running statistics are buffers (detach them or run under torch.no_grad())")
    if type(momentum) is not float and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))):
        raise TypeError(f"momentum must be a float, got {momentum!r}")
    if training:
        values = shape[0] * math.prod(shape[2:])
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
    if eager_torch_path("batch_norm", input, lambda: _batch_norm_unsupported(input)):
        out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if out.requires_grad:
            out.register_hook(_gradient_in_layout(_batch_norm_format(input)))
        return out
    out, _, _, new_mean, new_var = torch.ops.fastdl.batch_norm(
        input, weight, bias, running_mean, running_var, training, float(momentum), float(eps),
        backend.operator_requested())
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return out
