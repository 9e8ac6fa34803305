"""Scaled dot-product attention with torch's signature and semantics, on a fused Triton kernel.

``scaled_dot_product_attention`` checks its arguments, asks :mod:`fastdl.backend` which path runs,
and either calls ``torch.nn.functional.scaled_dot_product_attention`` (``torch`` backend) or the
autograd Function around ``fastdl.kernels.attention`` (``triton`` / ``interpret``): a
FlashAttention-style forward that saves only the output and one logsumexp per row, and a backward
that recomputes the scores tile by tile.

Semantics that differ from a naive softmax: rows whose keys are all masked out return 0 and get
zero gradient (as torch 2.13's math path does), never NaN.

Calls the kernel cannot take run on the torch path under ``FASTDL_BACKEND=auto`` and raise
:class:`fastdl.backend.BackendError` under a forced kernel backend; :func:`_unsupported` lists
them (float64, head dims above 256, bf16 under Triton's interpreter, more than 4 dims, key/value
batch dims that broadcast against the query's). Invalid calls raise everywhere: TypeError for
dtypes, ValueError for shapes and values (including ``attn_mask`` together with ``is_causal``,
which torch's math and CUDA paths also reject).
"""

from __future__ import annotations

import math
import numbers
import os

import torch
import torch.nn.functional as F
from .. import backend
from ._double_backward import differentiable_grads, dropout_scale_mask
from ._library import (as_output, autocast_dtype, autocast_to, eager_torch_path, fake, fake_like, masks_from,
                       operator, or_empty, path, per_sample, recompute_grads, seeded, transform_reason)
from ._random import draw_seed
from ._validate import all_cpu, broadcast, check_bool, check_floating, check_same_device, eager_index_check

_OP = "scaled_dot_product_attention"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # kernels.attention.MAX_HEAD_DIM (kept here so the torch path needs no Triton)
BACKWARD_VAR = "FASTDL_ATTENTION_BACKWARD"
_BACKWARDS = ("deterministic", "atomic")


def atomic_dq() -> bool:
    """Whether the kernels' attention backward adds dQ with float32 atomics (5 matrix products per
    tile pair instead of 7, as FlashAttention-2; dq's last bits then vary between runs):
    ``FASTDL_ATTENTION_BACKWARD=atomic``. The default, ``deterministic``, gives bitwise
    reproducible gradients; so does ``torch.use_deterministic_algorithms(True)``, whatever the
    variable says. Read at each backward call."""
    value = os.environ.get(BACKWARD_VAR, "").strip().lower() or "deterministic"
    if value not in _BACKWARDS:
        raise ValueError(f"{BACKWARD_VAR} must be one of {', '.join(_BACKWARDS)}; got {value!r}")
    return value == "atomic" and not torch.are_deterministic_algorithms_enabled()


def _check_args(query, key, value, attn_mask, dropout_p, is_causal, scale) -> tuple[torch.Size, ...]:
    """TypeError / ValueError naming the bad argument; returns the shapes of query, key and value
    (read once: each ``.shape`` builds a new torch.Size)."""
    check_floating("query", query)
    check_floating("key", key)
    check_floating("value", value)
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    check_bool("is_causal", is_causal)
    if not all_cpu(query, key, value, attn_mask):
        check_same_device("query", {"query": query, "key": key, "value": value, "attn_mask": attn_mask})
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must have the same dtype, got {query.dtype}, {key.dtype} "
                        f"and {value.dtype}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise TypeError(f"attn_mask must be bool (True = attend), float32 or of query's dtype "
                            f"{query.dtype}, got {attn_mask.dtype}")
        if attn_mask.dim() < 2:
            raise ValueError(f"attn_mask must have at least 2 dims (..., L, S), got shape "
                             f"{tuple(attn_mask.shape)}")
        if is_causal:
            raise ValueError("attn_mask and is_causal=True cannot be combined; fold the causal mask "
                             "into attn_mask")
    # type(...) is float first: the fast path for the common value (isinstance of an ABC costs more)
    if type(dropout_p) is not float and (isinstance(dropout_p, bool)
                                         or not isinstance(dropout_p, numbers.Real)):
        raise TypeError(f"dropout_p must be a number, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be between 0 and 1, got {dropout_p}")
    if scale is not None and type(scale) is not float and (isinstance(scale, bool)
                                                           or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    q_shape, k_shape, v_shape = query.shape, key.shape, value.shape
    if len(q_shape) < 2 or len(k_shape) < 2 or len(v_shape) < 2:
        for name, shape in (("query", q_shape), ("key", k_shape), ("value", v_shape)):
            if len(shape) < 2:
                raise ValueError(f"{name} must have at least 2 dims (..., length, head dim), got shape "
                                 f"{tuple(shape)}")
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(f"query and key must share the head dim (last dim), got {q_shape[-1]} "
                         f"and {k_shape[-1]}")
    if k_shape[-2] != v_shape[-2]:
        raise ValueError(f"key and value must have the same length (dim -2), got {k_shape[-2]} "
                         f"and {v_shape[-2]}")
    return q_shape, k_shape, v_shape


def _check_broadcast(q_shape, k_shape, v_shape, enable_gqa) -> None:
    """ValueError unless the batch and head dims of query, key and value (of these shapes)
    broadcast together (with ``enable_gqa`` the heads are checked by :func:`_check_gqa` instead)."""
    drop = 3 if enable_gqa and len(q_shape) >= 3 else 2
    k_lead = k_shape[:-2]
    if k_lead == v_shape[:-2] and q_shape[:-drop] == (k_lead if drop == 2 else k_shape[:-drop]):
        return  # fast path: equal leading dims broadcast (value then equals key on :-drop too)
    if (broadcast(q_shape[:-drop], k_shape[:-drop], v_shape[:-drop]) is None
            or broadcast(k_shape[:-drop], v_shape[:-drop]) is None):
        raise ValueError(f"the batch and head dims of query {tuple(q_shape)}, key {tuple(k_shape)} "
                         f"and value {tuple(v_shape)} do not broadcast together")


def _check_gqa(query, key, value, enable_gqa) -> None:
    if not enable_gqa or query.dim() < 3:
        return
    H, H_k, H_v = query.shape[-3], key.shape[-3], value.shape[-3]
    if H_k == 0 or H_v == 0 or H % H_k or H % H_v:  # torch repeats key and value heads apart
        raise ValueError(f"enable_gqa=True needs query heads (dim -3, {H}) to be a multiple of key "
                         f"heads ({H_k}) and of value heads ({H_v})")


def _unsupported(query, key, value, attn_mask, enable_gqa, name: str) -> str | None:
    """Why the fused kernel cannot take this call (None when it can)."""
    reason = _varlen_unsupported(query, value, name)  # dtype and head-dim limits, shared
    if reason is not None:
        return reason
    if not query.dim() == key.dim() == value.dim() or query.dim() > 4:
        return "the kernel takes 2-, 3- or 4-dim query, key and value of the same rank"
    if query.dim() >= 3:
        if key.shape[-3] != value.shape[-3]:
            return "key and value with different head counts are left to torch"
        if query.shape[:-3] != key.shape[:-3] or key.shape[:-2] != value.shape[:-2]:
            return "key/value batch dims that broadcast against query's are left to torch"
        H, H_kv = query.shape[-3], key.shape[-3]
        if H != H_kv and not ((enable_gqa or H_kv == 1) and H_kv > 0 and H % H_kv == 0):
            return "key/value heads that broadcast against query's are left to torch"
    return None


def _check_mask_shape(query, key, value, attn_mask) -> None:
    """ValueError unless a mask broadcasts to (batch, heads, L, S) (for the layouts the kernel
    takes; torch checks the others)."""
    if attn_mask is None or not query.dim() == key.dim() == value.dim() or query.dim() > 4:
        return
    q4, k4, v4 = _shape_4d(query), _shape_4d(key), _shape_4d(value)
    # The output's batch broadcasts query, key and value (a batch-1 query against batch-B keys,
    # as torch); its heads are the query's under GQA, else broadcast too.
    batch = broadcast(q4[:1], k4[:1], v4[:1]) or q4[:1]
    heads = broadcast(q4[1:2], k4[1:2], v4[1:2]) or q4[1:2]
    target = batch + heads + (q4[2], k4[2])
    # More dims than the query would grow the output's rank: torch refuses that too.
    if attn_mask.dim() > query.dim() or broadcast(attn_mask.shape, target) != target:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(batch, heads, L, S) = {target}")


def _shape_4d(t: torch.Tensor) -> tuple[int, ...]:
    """(B, H, L, D) of a 2-, 3- or 4-dim tensor: a 3-dim one has heads but no batch (dim -3 is the
    head dim, as for enable_gqa)."""
    return (1,) * (4 - t.dim()) + tuple(t.shape)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.view(_shape_4d(t)) if t.dim() < 4 else t


def _stats_shape(out_shape) -> tuple[int, ...]:
    """The kernels' saved row statistics for an output of ``out_shape`` (..., L, Dv): (..., 2, L),
    the base-2 logsumexp and its rounding remainder."""
    return (*out_shape[:-2], 2, out_shape[-2])


def _path(query, key, value, attn_mask, enable_gqa, requested: str) -> str:
    return path(_OP, query, _unsupported(query, key, value, attn_mask, enable_gqa,
                                         backend.resolve(query, requested)), requested)


def _out_shape(query, key, value, enable_gqa) -> tuple[int, ...]:
    """torch's output shape: the broadcast batch (and head) dims, L, Dv."""
    k_lead = list(key.shape[:-2])
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3:
        k_lead[-1] = query.shape[-3]
    lead = torch.broadcast_shapes(tuple(query.shape[:-2]), tuple(k_lead))
    return (*lead, query.shape[-2], value.shape[-1])


def _torch_attention(query, key, value, attn_mask, dropout_p: float, is_causal: bool, scale, enable_gqa: bool,
                     seed):
    """torch's attention, its dropout drawn from the seed (what the torch path's backward recomputes)."""
    if dropout_p == 0.0:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    with seeded(seed):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _reference_attention(q, k, v, attn_mask, is_causal: bool, scale: float | None, keep):
    """The kernel's attention in differentiable torch ops, for a recorded (double) backward:
    (B, H, L, D) tensors, grouped key/value heads, fully masked rows 0, dropout ``keep`` (the
    kernel's mask times 1 / (1 - p), (B, H, L, S), or None)."""
    group = q.shape[1] // max(k.shape[1], 1)
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    D = q.shape[-1]
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else (D ** -0.5 if D else 1.0))
    L, S = s.shape[-2:]
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    empty = (s == float("-inf")).all(-1, keepdim=True)
    probs = torch.softmax(torch.where(empty, 0.0, s), -1) * ~empty
    if keep is not None:
        probs = probs * keep.to(probs.dtype)
    return probs @ v


@operator(_OP)
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                  dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
                  seed: torch.Tensor | None, requested: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (..., L, Dv), row statistics (..., 2, L) float32 -- the kernels' logsumexp and its
    remainder; zeros on the torch path, whose backward recomputes)."""
    if _path(query, key, value, attn_mask, enable_gqa, requested) == "torch":
        out = _torch_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed)
        out = out.contiguous()  # torch's CPU kernels may return another layout; the fake is contiguous
        return out, out.new_zeros(_stats_shape(out.shape), dtype=torch.float32)
    o, lse = backend.kernels("attention").attention_fwd(
        _as_4d(query), _as_4d(key), _as_4d(value), attn_mask, is_causal, scale, dropout_p,
        seed)
    shape = (*query.shape[:-1], value.shape[-1])
    return as_output(o, shape), as_output(lse, _stats_shape(shape))


@fake(_attention_op)
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed, requested):
    shape = _out_shape(query, key, value, enable_gqa)
    return query.new_empty(shape), query.new_empty(_stats_shape(shape), dtype=torch.float32)


@operator(_OP + "_backward")
def _attention_backward_op(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attn_mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                           dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
                           seed: torch.Tensor | None, mask_grad: bool, backend_name: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d attn_mask); the last is empty unless ``mask_grad``."""
    if backend_name == "torch":
        mask_in = attn_mask if mask_grad else None
        dq, dk, dv, dmask = recompute_grads(
            lambda q, k, v, m: _torch_attention(q, k, v, attn_mask if m is None else m, dropout_p, is_causal,
                                                scale, enable_gqa, seed),
            (query, key, value, mask_in), (grad,))
        dq, dk, dv = (g.contiguous() for g in (dq, dk, dv))  # the fake's layout, as the kernels'
    else:
        dq, dk, dv, dmask = backend.kernels("attention").attention_bwd(
            _as_4d(grad), _as_4d(query), _as_4d(key), _as_4d(value), _as_4d(out),
            lse.view(_stats_shape(_shape_4d(out))),
            attn_mask, is_causal, scale, dropout_p, seed, mask_grad=mask_grad, atomic_dq=atomic_dq())
        dq, dk, dv = dq.view(query.shape), dk.view(key.shape), dv.view(value.shape)
    return dq, dk, dv, or_empty(dmask if mask_grad else None, query)


@fake(_attention_backward_op)
def _(grad, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, enable_gqa, seed, mask_grad,
      backend_name):
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            fake_like(attn_mask if mask_grad else None, query))


def _attention_setup(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed, requested = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(query, key, value, attn_mask, *output, seed)
    ctx.args = (dropout_p, is_causal, scale, enable_gqa)
    ctx.backend_name = _path(query, key, value, attn_mask, enable_gqa, requested)


def _attention_grad(ctx, grad, _lse):
    query, key, value, attn_mask, out, lse, seed = ctx.saved_tensors
    dropout_p, is_causal, scale, enable_gqa = ctx.args
    mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
    if torch.is_grad_enabled():  # double backward: differentiable PyTorch
        if ctx.backend_name != "torch":  # the kernel's semantics and dropout mask, in torch ops
            q4, k4 = _as_4d(query), _as_4d(key)
            keep = dropout_scale_mask(q4.shape[:3] + (k4.shape[2],), dropout_p, seed, query.device)
            grads = differentiable_grads(
                lambda q, k, v, m: _reference_attention(_as_4d(q), _as_4d(k), _as_4d(v), m, is_causal, scale,
                                                        keep).view(*q.shape[:-1], v.shape[-1]),
                (query, key, value, attn_mask), ctx.needs_input_grad[:4], grad)
            return (*grads, None, None, None, None, None, None)
        grads = recompute_grads(lambda q, k, v, m: _torch_attention(q, k, v, m, *ctx.args, seed),
                                (query, key, value, attn_mask), (grad,), create_graph=True)
        return (*grads, None, None, None, None, None, None)
    dq, dk, dv, dmask = torch.ops.fastdl.scaled_dot_product_attention_backward(
        grad, query, key, value, attn_mask, out, lse, *ctx.args, seed, mask_grad, ctx.backend_name)
    return dq, dk, dv, dmask if mask_grad else None, None, None, None, None, None, None


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) V, as ``torch.nn.functional.scaled_dot_product_attention``.

    query (..., H, L, D), key (..., H_kv, S, D), value (..., H_kv, S, Dv); fp16/bf16/fp32 on the
    kernel path (float64 runs on torch). ``attn_mask``: bool (True = attend) or float (added to
    the scores), broadcastable to (..., H, L, S); a float mask that requires grad gets its
    gradient. ``is_causal``: row i attends keys j <= i (top-left aligned, also when L != S).
    ``scale`` defaults to 1 / sqrt(D). ``dropout_p`` drops attention probabilities (seeded from
    torch's generator, so ``torch.manual_seed`` reproduces a call). ``enable_gqa``: H a multiple
    of H_kv, query head h reads key/value head h // (H // H_kv). Fully masked rows return 0.
    The kernels' backward is deterministic unless ``FASTDL_ATTENTION_BACKWARD=atomic`` (see
    :func:`atomic_dq`).
    """
    cast = autocast_dtype(query) if isinstance(query, torch.Tensor) else None
    if cast is not None:  # attention is on autocast's lower-precision list (CPU, CUDA)
        query, key, value, attn_mask = (autocast_to(cast, t) if isinstance(t, torch.Tensor) else t
                                        for t in (query, key, value, attn_mask))
    q_shape, k_shape, v_shape = _check_args(query, key, value, attn_mask, dropout_p, is_causal, scale)
    _check_broadcast(q_shape, k_shape, v_shape, enable_gqa)
    if enable_gqa is not False:  # each of these two returns at once otherwise: the call is skipped
        check_bool("enable_gqa", enable_gqa)
        _check_gqa(query, key, value, enable_gqa)
    if attn_mask is not None:
        _check_mask_shape(query, key, value, attn_mask)
    dropout_p = float(dropout_p)
    seed = draw_seed(query.device) if dropout_p > 0.0 else None
    def unsupported():
        return _unsupported(query, key, value, attn_mask, enable_gqa, backend.resolve(query))

    if eager_torch_path(_OP, query, unsupported):
        if masks_from(query, seed, unsupported) != "torch":  # under torch.func: the kernel's mask
            q4, k4 = _as_4d(query), _as_4d(key)
            keep = dropout_scale_mask(q4.shape[:3] + (k4.shape[2],), dropout_p, seed, query.device)
            return _reference_attention(q4, k4, _as_4d(value), attn_mask, bool(is_causal), scale, keep).view(
                *query.shape[:-1], value.shape[-1])
        return _torch_attention(query, key, value, attn_mask, dropout_p, bool(is_causal), scale, enable_gqa,
                                seed)
    return torch.ops.fastdl.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, bool(is_causal), None if scale is None else float(scale),
        bool(enable_gqa), seed, backend.operator_requested())[0]


# ---------------------------------------------------------------------------------------------
# Variable-length (packed) attention
# ---------------------------------------------------------------------------------------------

_VARLEN_OP = "varlen_attention"


def _check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (total_tokens, heads, head_dim), got {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
            raise TypeError(f"{name} must be a 1-dim int32 or int64 tensor of sequence offsets")
        if t.numel() == 0:
            raise ValueError(f"{name} must hold at least one offset (sequences + 1 of them)")
    check_same_device("q", dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k))
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()} offsets")
    if q.shape[2] != k.shape[2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(q and k share the head dim, k and v the tokens and heads)")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[2] == 0:
        raise ValueError("q and k must have a head dim of at least 1, got 0")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a number between 0 and 1, got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")


def _varlen_unsupported(q: torch.Tensor, v: torch.Tensor, name: str) -> str | None:
    if q.dtype not in _KERNEL_DTYPES:
        return f"the kernel computes in fp16, bf16 or fp32, not {q.dtype}"
    if q.dtype == torch.bfloat16 and name == "interpret":
        return "Triton's interpreter cannot compute bf16 dot products"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM} are not supported (got {q.shape[-1]}, {v.shape[-1]})"
    return None


def _varlen_backend(q: torch.Tensor, v: torch.Tensor, requested: str) -> str:
    return backend.select(_VARLEN_OP, q, _varlen_unsupported(q, v, backend.resolve(q, requested)), requested)


def _varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, is_causal, scale, seed):
    """PyTorch path, one sequence at a time (reads the offsets on the host): (o (Tq, H, Dv),
    row statistics (H, 2, Tq): the base-2 logsumexp, as the kernels', and a remainder of 0);
    differentiable. Dropout masks come from a generator seeded with ``seed``."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    gen = torch.Generator(q.device).manual_seed(int(seed)) if dropout_p > 0 and not per_sample(seed) else None
    o = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.full((q.shape[1], 2, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    lse[:, 1] = 0.0
    bounds = zip(cu_seqlens_q.tolist()[:-1], cu_seqlens_q.tolist()[1:], cu_seqlens_k.tolist()[:-1],
                 cu_seqlens_k.tolist()[1:])
    for q0, q1, k0, k1 in bounds:
        qs = q[q0:q1].transpose(0, 1).to(acc)                                  # (H, L, D)
        ks = k[k0:k1].transpose(0, 1).to(acc).repeat_interleave(group, dim=0)  # (H, S, D)
        vs = v[k0:k1].transpose(0, 1).to(acc).repeat_interleave(group, dim=0)
        s = qs @ ks.transpose(1, 2) * scale
        if is_causal:  # bottom-right aligned: row i sees keys j <= i + S - L
            s = s.masked_fill(~torch.ones(s.shape[1:], dtype=torch.bool, device=s.device).tril(
                s.shape[2] - s.shape[1]), float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - row_lse.masked_fill(row_lse == float("-inf"), 0.0)[..., None])
        if dropout_p > 0:
            keep = torch.rand(p.shape, generator=gen, device=p.device) >= dropout_p
            p = p * keep / (1.0 - dropout_p) if dropout_p < 1 else p * 0
        o = o.index_copy(0, torch.arange(q0, q1, device=q.device), (p @ vs).transpose(0, 1).to(q.dtype))
        lse[:, 0, q0:q1] = row_lse.detach().float() * math.log2(math.e)
    return o, lse


def _check_offsets(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int,
                   total_k: int) -> None:
    """Offsets must start at 0, never decrease and end within the packed tokens: a ValueError at
    the call on CPU tensors (or with FASTDL_EAGER_INDEX_CHECK=1), else a device-side assertion
    raised at the next synchronisation (no host read). The kernels clamp them meanwhile, so bad
    offsets never read or write past the tokens. It reads values, so it runs inside the operator."""
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, total_q), ("cu_seqlens_k", cu_seqlens_k, total_k)):
        if cu.device.type == "meta":  # no values
            continue
        ok = (cu[0] == 0) & (cu[-1] <= total) & (cu[1:] >= cu[:-1]).all()
        why = f"{name} must start at 0, never decrease and end at most at the {total} packed tokens"
        if not eager_index_check(cu.device):
            torch._assert_async(ok, f"fastdl: {why}")
        elif not ok:
            raise ValueError(f"{why}; got {cu.tolist()}")


@operator("varlen_attention")
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
                         is_causal: bool, scale: float | None,
                         seed: torch.Tensor | None, requested: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(o (Tq, H, Dv), row statistics (H, 2, Tq) float32) of attention within each packed sequence."""
    _check_offsets(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    if _varlen_backend(q, v, requested) == "torch":
        return _varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, is_causal, scale, seed)
    return backend.kernels("attention").varlen_attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, dropout_p,
        seed)


@fake(_varlen_attention_op)
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale, seed,
      requested):
    return (q.new_empty(q.shape[0], q.shape[1], v.shape[-1]),
            q.new_empty(q.shape[1], 2, q.shape[0], dtype=torch.float32))


@operator("varlen_attention_backward")
def _varlen_attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                  cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                  dropout_p: float, is_causal: bool, scale: float | None,
                                  seed: torch.Tensor | None, backend_name: str
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): on the kernels, which recompute the scores from the saved statistics, or by
    differentiating the torch path's forward again (same seed, same dropout masks). Either runs
    inside this operator, so the torch path's host loop over the offsets never reaches a traced
    graph (torch.compile) and a meta call takes the fake implementation."""
    if backend_name == "torch":
        grads = recompute_grads(
            lambda q, k, v: _varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, is_causal, scale,
                                          seed)[0], (q, k, v), (grad,))
        return tuple(g.contiguous() for g in grads)  # the fake's layout
    return backend.kernels("attention").varlen_attention_bwd(
        grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
        dropout_p, seed, atomic_dq=atomic_dq())


@fake(_varlen_attention_backward_op)
def _(grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
      scale, seed, backend_name):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, seed, requested = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.args = (max_q, max_k, dropout_p, is_causal, scale, seed)
    ctx.backend_name = _varlen_backend(q, v, requested)


def _varlen_grad(ctx, grad, _lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    _, _, dropout_p, is_causal, scale, seed = ctx.args
    if torch.is_grad_enabled():  # double backward: the PyTorch forward differentiated, differentiably
        if ctx.backend_name != "torch" and dropout_p > 0:
            raise NotImplementedError(
                "varlen_attention with dropout on the kernels is not differentiable twice (its mask is "
                "the kernel's); use dropout_p=0 or the torch backend for create_graph=True")
        grads = differentiable_grads(
            lambda q, k, v: _varlen_torch(q, k, v, cu_q, cu_k, dropout_p, is_causal, scale, seed)[0],
            (q, k, v), ctx.needs_input_grad[:3], grad)
        return (*grads, None, None, None, None, None, None, None, None, None)
    dq, dk, dv = torch.ops.fastdl.varlen_attention_backward(grad.contiguous(), q, k, v, out, lse, cu_q, cu_k,
                                                            *ctx.args, ctx.backend_name)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_varlen_attention_op.register_autograd(_varlen_grad, setup_context=_varlen_setup)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention within each of several sequences packed without padding, as flash-attn's
    ``flash_attn_varlen_func``.

    q (Tq, H, D), k (Tk, H_kv, D), v (Tk, H_kv, Dv), H a multiple of H_kv (grouped-query
    attention: query head h reads key/value head h // (H // H_kv)). Sequence i owns query rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` and key rows ``cu_seqlens_k[i]:cu_seqlens_k[i + 1]``
    (int32/int64 offsets starting at 0, (sequences + 1,)), at most ``max_seqlen_q`` /
    ``max_seqlen_k`` long (not checked: it sizes the launch grid; a longer sequence is not
    fully computed). ``is_causal``: bottom-right aligned, as flash-attn >= 2.1 -- query row i of
    a sequence of L queries and S keys attends keys j <= i + S - L (top-left when L == S; rows
    with no key to attend, i < L - S, return 0). ``scale`` defaults to 1 / sqrt(D); dropout on
    the attention probabilities, seeded from torch's generator. Returns (Tq, H, Dv); rows outside
    every sequence are 0. The torch path (float64, or forced) loops over the sequences on the host.
    Under autocast q, k and v are cast to its dtype, as for ``scaled_dot_product_attention``.
    """
    cast = autocast_dtype(q) if isinstance(q, torch.Tensor) else None
    if cast is not None:  # as scaled_dot_product_attention: on autocast's lower-precision list
        q, k, v = (autocast_to(cast, t) if isinstance(t, torch.Tensor) else t for t in (q, k, v))
    _check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale)
    dropout_p = float(dropout_p)
    seed = draw_seed(q.device) if dropout_p > 0.0 else None
    # Under forward-mode AD or torch.func.grad no operator can run (see transform_reason): the
    # torch path's PyTorch ops, eagerly (a forced kernel backend raises).
    if (not torch.compiler.is_compiling() and transform_reason() is not None
            and eager_torch_path(_VARLEN_OP, q, lambda: _varlen_unsupported(q, v, backend.resolve(q)))):
        _check_offsets(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
        return _varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, bool(is_causal), scale, seed)[0]
    out, _ = torch.ops.fastdl.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                               int(max_seqlen_k), dropout_p, bool(is_causal),
                                               None if scale is None else float(scale), seed,
                                               backend.operator_requested())
    return out
