"""Fused linear + cross-entropy: the loss of ``F.cross_entropy(hidden @ weight.T + bias, target)``
without ever holding the (tokens x vocab) logits.

The tokens are walked in chunks of C rows. For each chunk::

    logits = hidden[c] @ weight^T + bias                       (C, V), one matmul
    loss[c], logits <- cross-entropy, gradient written over the logits   (one kernel, in place)
    d hidden[c] = dlogits @ weight,  d weight += dlogits^T hidden[c],  d bias += colsum(dlogits)

so the peak extra memory is one (C, V) chunk plus the gradients themselves. C is chosen so that
a chunk of logits is at most about as large as ``hidden`` (at least 16 rows, and not much smaller
than MIN_CHUNK_ELEMENTS).

For ``reduction="mean"`` / ``"sum"`` the loss's gradient per row is known in the forward (1 / count
or 1), so the forward computes the parameter gradients along the way -- three matmuls in all, as
an unfused linear + cross-entropy -- and the backward only scales them by the incoming scalar.
For ``reduction="none"`` the forward computes the losses alone and the backward walks the chunks
again with the per-row incoming gradient (one extra matmul).

The cross-entropy of a chunk runs in ``fastdl.kernels.cross_entropy`` (``triton`` / ``interpret``)
or in PyTorch (``torch`` backend); the matmuls are PyTorch's on every backend. The whole is one
operator, ``torch.ops.fastdl.linear_cross_entropy`` (and ``..._backward`` for ``"none"``), with a
fake implementation, so ``torch.compile`` sees one opaque node.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch

from .. import backend
from ._library import autocast_to, fake, operator, transform_reason
from ._validate import check_floating, check_same_device, eager_index_check

_OP = "linear_cross_entropy"
_REDUCTIONS = ("none", "mean", "sum")


# ---------------------------------------------------------------------------------------------
# Cross-entropy of one chunk of logits, PyTorch version of kernels.cross_entropy.cross_entropy_chunk
# ---------------------------------------------------------------------------------------------

def _cross_entropy_chunk_torch(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                               smoothing: float, grad_scale: torch.Tensor | None, loss: torch.Tensor) -> None:
    """Same contract as the kernel: per-row loss into ``loss``; with ``grad_scale`` the gradient
    overwrites ``logits``."""
    n, vocab = logits.shape
    x = logits.to(loss.dtype)  # the logits themselves when already in the accumulation dtype
    # log-softmax as (x - max) - log(sum exp(x - max)), as torch's: lse = max + log(...) first
    # would round the loss to the ulp of the largest logit.
    m = x.amax(dim=1, keepdim=True)
    log_d = torch.exp(x - m).sum(dim=1).log()
    m = m[:, 0]
    if target.dim() == 2:
        # torch's mixed target, one product per logit: a q of 0 at a logit of -inf is NaN.
        q = target.to(loss.dtype)
        q = (1.0 - smoothing) * q + smoothing / vocab if smoothing else q
        q_total = q.sum(dim=1)
        loss.copy_(q_total * log_d - (q * (x - m[:, None])).sum(dim=1))
    else:
        # No smoothing term without smoothing (as torch): it is infinite when a logit is -inf.
        smooth_term = smoothing * (log_d - (x - m[:, None]).mean(dim=1)) if smoothing else 0.0
        ignored = target == ignore_index
        t = torch.where(ignored, 0, target)[:, None]
        x_t = x.gather(1, t)[:, 0]
        loss.copy_(torch.where(ignored, 0.0, (1.0 - smoothing) * ((m - x_t) + log_d) + smooth_term))
    if grad_scale is None:
        return
    g = grad_scale.to(loss.dtype).expand(n)
    inv_d = torch.exp(-log_d)[:, None]
    # the softmax, in place when x is the logits
    dx = x.sub_(m[:, None]).exp_().mul_(inv_d) if x is logits else torch.exp(x - m[:, None]) * inv_d
    if target.dim() == 2:
        dx.mul_(q_total[:, None]).sub_(q)
    else:
        g = torch.where(ignored, 0.0, g)
        dx.sub_(smoothing / vocab).scatter_add_(1, t, dx.new_full((n, 1), smoothing - 1.0))
    dx.mul_(g[:, None])
    if dx is not logits:
        logits.copy_(dx)


# A chunk of logits may hold this many elements even when ``hidden`` is smaller: tiny chunks
# would spend their time on per-call overheads.
MIN_CHUNK_ELEMENTS = 1 << 20


def _chunk_rows(n: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: a chunk of logits about the size of the whole hidden input (or of
    MIN_CHUNK_ELEMENTS), a power of two of at least 16 rows."""
    budget = max(n * hidden, MIN_CHUNK_ELEMENTS)
    rows = -(-budget // max(vocab, 1))
    return max(16, (1 << (rows - 1).bit_length()) // 2)


def _fused_pass(hidden, weight, bias, target, ignore_index: int, smoothing: float,
                grad_scale: torch.Tensor | None, grads: tuple[bool, bool, bool], cross_entropy_chunk):
    """Walk the chunks: per-row losses (N,) and, with ``grad_scale``, the gradients of hidden,
    weight and bias wanted by ``grads`` (None for the others).

    hidden (N, H), weight (V, H), bias (V,) or None, target (N,) int64 or (N, V); grad_scale a
    1-element or (N,) tensor, the loss's gradient per row.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=acc, device=hidden.device)
    want_dh, want_dw, want_db = grads if grad_scale is not None else (False, False, False)
    dh = hidden.new_empty(hidden.shape) if want_dh else None
    # Weight and bias gradients add up over chunks: accumulated in float32 whatever the dtype.
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_dw else None
    db = torch.zeros(vocab, dtype=acc, device=weight.device) if want_db else None
    rows = _chunk_rows(n, vocab, hidden.shape[1])
    for start in range(0, n, rows):
        h = hidden[start:start + rows]
        logits = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
        per_row = grad_scale is not None and grad_scale.numel() > 1
        scale = grad_scale[start:start + rows] if per_row else grad_scale
        cross_entropy_chunk(logits, target[start:start + rows], ignore_index, smoothing, scale,
                            loss[start:start + rows])
        if dh is not None:
            torch.mm(logits, weight, out=dh[start:start + rows])
        if dw is not None:
            if dw.dtype == logits.dtype:
                dw.addmm_(logits.t(), h)
            else:  # fp16/bf16 product (float32 accumulation inside), summed over chunks in float32
                dw += logits.t() @ h
        if db is not None:
            db += logits.sum(dim=0, dtype=acc)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return loss, dh, dw, db


def _chunk_function(backend_name: str):
    if backend_name == "torch":
        return _cross_entropy_chunk_torch
    return backend.kernels("cross_entropy").cross_entropy_chunk


def _check_target_values(target: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """IndexError naming the first class index outside [0, vocab) (CPU tensors, or any device with
    ``FASTDL_EAGER_INDEX_CHECK=1``: on CUDA the check is a device-to-host sync; the kernel gives
    such a row a NaN loss instead)."""
    if target.dim() != 1 or not eager_index_check(target.device) or target.numel() == 0:
        return
    bad = target[(target != ignore_index) & ((target < 0) | (target >= vocab))]
    if bad.numel():
        raise IndexError(f"target contains class {int(bad[0])}, outside [0, {vocab}) for a weight with "
                         f"{vocab} rows (and not ignore_index={ignore_index})")


def _unsupported(hidden: torch.Tensor, name: str) -> str | None:
    if hidden.dtype == torch.bfloat16 and name == "interpret":
        return "Triton's interpreter cannot compute in bf16"
    return None


def _backend(hidden: torch.Tensor, requested: str) -> str:
    return backend.select(_OP, hidden, _unsupported(hidden, backend.resolve(hidden, requested)), requested)


@contextlib.contextmanager
def _autocast_off():
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _empty(like: torch.Tensor) -> torch.Tensor:
    """Stands for "no tensor" among an operator's outputs (a schema cannot return None)."""
    return like.new_empty(0)


def _reduce(loss_rows: torch.Tensor, count: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / count if reduction == "mean" else total


def _mean_count(target: torch.Tensor, n: int, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """torch's mean divides by the rows whose class is not ignore_index (hard targets) or by the
    row count (soft targets). A tensor: counting stays on the device."""
    if target.dim() == 2:
        return torch.full((), n, dtype=dtype, device=target.device)
    return (target != ignore_index).sum().to(dtype)


@operator("linear_cross_entropy")
def _linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             target: torch.Tensor, ignore_index: int, label_smoothing: float, reduction: str,
                             grad_hidden: bool, grad_weight: bool, grad_bias: bool,
                             out_dtype: torch.dtype, requested: str
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d hidden, d weight, d bias) for hidden (N, H); the gradients are those of the loss
    itself (incoming gradient 1), computed only for ``mean`` / ``sum`` and where asked, else empty."""
    name = _backend(hidden, requested)
    _check_target_values(target, ignore_index, weight.shape[0])
    grads = (grad_hidden, grad_weight, grad_bias)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    count = _mean_count(target, hidden.shape[0], ignore_index, acc) if reduction == "mean" else None
    grad_scale = None
    if reduction != "none" and any(grads):
        one = torch.ones(1, dtype=acc, device=hidden.device)
        grad_scale = one / count if count is not None else one
    with _autocast_off():
        loss, dh, dw, db = _fused_pass(hidden, weight, bias, target, ignore_index, label_smoothing,
                                       grad_scale, grads, _chunk_function(name))
    loss = _reduce(loss, count, reduction).to(out_dtype)
    return loss, *(t if t is not None else _empty(hidden) for t in (dh, dw, db))


@fake(_linear_cross_entropy_op)
def _(hidden, weight, bias, target, ignore_index, label_smoothing, reduction, grad_hidden, grad_weight,
      grad_bias, out_dtype, requested):
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=out_dtype)
    compute = reduction != "none"
    dh = hidden.new_empty(hidden.shape) if compute and grad_hidden else _empty(hidden)
    dw = weight.new_empty(weight.shape) if compute and grad_weight else _empty(hidden)
    db = bias.new_empty(bias.shape) if compute and grad_bias and bias is not None else _empty(hidden)
    return loss, dh, dw, db


@operator("linear_cross_entropy_backward")
def _linear_cross_entropy_backward_op(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                      bias: torch.Tensor | None, target: torch.Tensor, ignore_index: int,
                                      label_smoothing: float, grad_hidden: bool, grad_weight: bool,
                                      grad_bias: bool, backend_name: str
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for ``reduction="none"``: the chunks again, with ``grad`` (N,) as each row's
    incoming gradient. Empty tensors where a gradient is not asked for."""
    with _autocast_off():
        _, dh, dw, db = _fused_pass(hidden, weight, bias, target, ignore_index, label_smoothing, grad,
                                    (grad_hidden, grad_weight, grad_bias), _chunk_function(backend_name))
    return tuple(t if t is not None else _empty(hidden) for t in (dh, dw, db))


@fake(_linear_cross_entropy_backward_op)
def _(grad, hidden, weight, bias, target, ignore_index, label_smoothing, grad_hidden, grad_weight, grad_bias,
      backend_name):
    return (hidden.new_empty(hidden.shape) if grad_hidden else _empty(hidden),
            weight.new_empty(weight.shape) if grad_weight else _empty(hidden),
            bias.new_empty(bias.shape) if grad_bias and bias is not None else _empty(hidden))


def _setup(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, label_smoothing, reduction, gh, gw, gb, _, requested = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.backend_name = _backend(hidden, requested)
    ctx.reduction = reduction
    ctx.flags = (gh, gw, gb and bias is not None)
    ctx.args = (ignore_index, label_smoothing)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target)
    else:
        ctx.save_for_backward(*output[1:])


def _grad(ctx, grad, *_grads):
    if torch.is_grad_enabled():  # create_graph=True: these gradients would be constants, silently
        raise NotImplementedError("linear_cross_entropy is not differentiable twice (its backward "
                                  "runs outside autograd); compute the loss with F.cross_entropy for "
                                  "double backward")
    if ctx.reduction == "none":
        hidden, weight, bias, target = ctx.saved_tensors
        grads = torch.ops.fastdl.linear_cross_entropy_backward(grad, hidden, weight, bias, target, *ctx.args,
                                                                *ctx.flags, ctx.backend_name)
    else:  # the forward computed the gradients for an incoming gradient of 1
        grads = tuple(g * grad.to(g.dtype) for g in ctx.saved_tensors)
    dh, dw, db = (g if wanted else None for g, wanted in zip(grads, ctx.flags))
    return dh, dw, db, None, None, None, None, None, None, None, None, None


_linear_cross_entropy_op.register_autograd(_grad, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def _check_args(hidden, weight, target, bias, ignore_index, label_smoothing, reduction) -> bool:
    """Checks of types and shapes (never values); returns True for soft (probability) targets."""
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        check_floating(name, t)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    check_same_device("hidden", {"hidden": hidden, "weight": weight, "bias": bias, "target": target})
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
                        f"{'' if bias is None else ' and ' + str(bias.dtype)}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (vocab, hidden) with hidden = hidden.shape[-1]; got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
    rows = tuple(hidden.shape[:-1])
    if target.is_floating_point():
        if tuple(target.shape) != rows + (vocab,):
            raise ValueError(f"soft (probability) target must have shape {rows + (vocab,)}, got "
                             f"{tuple(target.shape)}")
        if ignore_index != -100:  # torch refuses it too: no row of probabilities is "ignored"
            raise ValueError(f"ignore_index={ignore_index} is not supported with soft (probability) "
                             "targets")
        if target.requires_grad and torch.is_grad_enabled():
            raise ValueError("target requires grad: linear_cross_entropy gives no gradient to a soft "
                             "target; detach it, or use F.cross_entropy on the logits")
        soft = True
    elif target.dtype == torch.int64:
        if tuple(target.shape) != rows:
            raise ValueError(f"target of class indices must have shape {rows} (hidden's without the last "
                             f"dim), got {tuple(target.shape)}")
        soft = False
    else:
        raise TypeError(f"target must hold int64 class indices or floating-point probabilities, got dtype "
                        f"{target.dtype}")
    if vocab == 0:
        raise ValueError("weight has 0 rows: cross-entropy needs at least one class")
    check_options(ignore_index, label_smoothing, reduction)
    return soft


def check_options(ignore_index, label_smoothing, reduction) -> None:
    """TypeError / ValueError unless the loss options are those cross-entropy takes (shared with
    :class:`fastdl.nn.LinearCrossEntropyLoss`, which checks them when it is built)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    kind = t.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind) and t.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, target, ...)`` without materialising the logits.

    hidden (..., H) and weight (V, H) (and bias (V,)) of one floating dtype; target either int64
    class indices shaped like hidden without its last dim (rows whose class is ``ignore_index``
    count for nothing) or floating-point probabilities (..., V) (soft targets, e.g. mixup; not
    renormalised, as torch). ``label_smoothing`` and ``reduction`` ("mean", "sum" or "none",
    which returns hidden.shape[:-1]) as torch. Returns the loss in hidden's dtype (float32 under
    autocast, which runs the matmuls in its lower precision, as ``linear`` + ``cross_entropy``).

    Class indices outside [0, V) raise IndexError on CPU tensors; on CUDA they give a NaN loss
    (checking would need a device-to-host sync). Not differentiable twice.
    """
    low = _autocast_dtype(hidden) if isinstance(hidden, torch.Tensor) else None
    if low is not None:  # autocast's cast of linear's floating inputs, before the dtype check (as torch)
        hidden, weight, bias = (autocast_to(low, t) if isinstance(t, torch.Tensor) else t
                                for t in (hidden, weight, bias))
    soft = _check_args(hidden, weight, target, bias, ignore_index, label_smoothing, reduction)
    out_dtype = torch.float32 if low is not None else hidden.dtype
    h = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])  # not (-1, H): H may be 0
    t = target.reshape(h.shape[0], weight.shape[0]) if soft else target.reshape(h.shape[0])
    reason = None if torch.compiler.is_compiling() else transform_reason()
    if reason is not None:  # no operator can run: PyTorch's unfused ops (a forced kernel backend raises)
        backend.select(_OP, hidden, reason)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        loss = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(h, weight, bias).to(acc), t.to(acc) if soft else t,
            ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction).to(out_dtype)
        return loss.view(hidden.shape[:-1]) if reduction == "none" else loss
    grad = torch.is_grad_enabled()
    loss, _, _, _ = torch.ops.fastdl.linear_cross_entropy(
        h, weight, bias, t, int(ignore_index), float(label_smoothing), reduction,
        grad and hidden.requires_grad, grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad, out_dtype, backend.operator_requested())
    return loss.view(hidden.shape[:-1]) if reduction == "none" else loss
