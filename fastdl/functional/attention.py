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

import numbers

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import backend
from ._random import draw_seed
from ._validate import check_floating, check_same_device

_OP = "scaled_dot_product_attention"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # kernels.attention.MAX_HEAD_DIM (kept here so the torch path needs no Triton)


def _check_args(query, key, value, attn_mask, dropout_p, is_causal, scale) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_floating(name, t)
    check_same_device("query", {"query": query, "key": key, "value": value, "attn_mask": attn_mask})
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must have the same dtype, got {query.dtype}, {key.dtype} "
                        f"and {value.dtype}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, query.dtype):
            raise TypeError(f"attn_mask must be bool (True = attend) or of query's dtype {query.dtype}, "
                            f"got {attn_mask.dtype}")
        if attn_mask.dim() < 2:
            raise ValueError(f"attn_mask must have at least 2 dims (..., L, S), got shape "
                             f"{tuple(attn_mask.shape)}")
        if is_causal:
            raise ValueError("attn_mask and is_causal=True cannot be combined; fold the causal mask "
                             "into attn_mask")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a number, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be between 0 and 1, got {dropout_p}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., length, head dim), got shape "
                             f"{tuple(t.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must share the head dim (last dim), got {query.shape[-1]} "
                         f"and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same length (dim -2), got {key.shape[-2]} "
                         f"and {value.shape[-2]}")


def _check_gqa(query, key, value, enable_gqa) -> None:
    if not enable_gqa or query.dim() < 3:
        return
    H, H_kv = query.shape[-3], key.shape[-3]
    if value.shape[-3] != H_kv or H_kv == 0 or H % H_kv:
        raise ValueError(f"enable_gqa=True needs query heads (dim -3, {H}) to be a multiple of key and "
                         f"value heads ({H_kv}, {value.shape[-3]})")


def _unsupported(query, key, value, attn_mask, enable_gqa, name: str) -> str | None:
    """Why the fused kernel cannot take this call (None when it can)."""
    if query.dtype not in _KERNEL_DTYPES:
        return f"the kernel computes in fp16, bf16 or fp32, not {query.dtype}"
    if query.dtype == torch.bfloat16 and name == "interpret":
        return "Triton's interpreter cannot compute bf16 dot products"
    if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM} are not supported (got {query.shape[-1]}, {value.shape[-1]})"
    if not query.dim() == key.dim() == value.dim() or query.dim() > 4:
        return "the kernel takes 2-, 3- or 4-dim query, key and value of the same rank"
    if query.dim() >= 3:
        if query.shape[:-3] != key.shape[:-3] or key.shape[:-2] != value.shape[:-2]:
            return "key/value batch dims that broadcast against query's are left to torch"
        H, H_kv = query.shape[-3], key.shape[-3]
        if H != H_kv and not ((enable_gqa or H_kv == 1) and H_kv > 0 and H % H_kv == 0):
            return "key/value heads that broadcast against query's are left to torch"
    if attn_mask is not None:
        target = _shape_4d(query)[:3] + (key.shape[-2],)
        try:
            fits = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(batch, heads, L, S) = {target}")
    return None


def _shape_4d(t: torch.Tensor) -> tuple[int, ...]:
    """(B, H, L, D) of a 2-, 3- or 4-dim tensor: a 3-dim one has heads but no batch (dim -3 is the
    head dim, as for enable_gqa)."""
    return (1,) * (4 - t.dim()) + tuple(t.shape)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.view(_shape_4d(t)) if t.dim() < 4 else t


class ScaledDotProductAttentionFunction(torch.autograd.Function):
    """o = softmax(q k^T * scale + mask) v on the kernel path, (B, H, L, D) tensors.

    Saves q, k, v, the mask, o and the per-row logsumexp; the dropout mask is regenerated from
    ``seed`` in the backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal: bool, scale: float | None, dropout_p: float, seed: int):
        o, lse = backend.kernels("attention").attention_fwd(q, k, v, attn_mask, is_causal, scale,
                                                            dropout_p, seed)
        ctx.save_for_backward(q, k, v, attn_mask, o, lse)
        ctx.args = (is_causal, scale, dropout_p, seed)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, attn_mask, o, lse = ctx.saved_tensors
        is_causal, scale, dropout_p, seed = ctx.args
        mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dmask = backend.kernels("attention").attention_bwd(
            do, q, k, v, o, lse, attn_mask, is_causal, scale, dropout_p, seed, mask_grad=mask_grad)
        return dq, dk, dv, dmask, None, None, None, None


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
    """
    _check_args(query, key, value, attn_mask, dropout_p, is_causal, scale)
    _check_gqa(query, key, value, enable_gqa)
    reason = _unsupported(query, key, value, attn_mask, enable_gqa, backend.resolve(query))
    if backend.select(_OP, query, unsupported=reason) == "torch":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    dropout_p = float(dropout_p)
    seed = draw_seed(query.device) if dropout_p > 0.0 else 0
    out = ScaledDotProductAttentionFunction.apply(
        _as_4d(query), _as_4d(key), _as_4d(value), attn_mask, bool(is_causal),
        None if scale is None else float(scale), dropout_p, seed)
    return out.view(*query.shape[:-1], value.shape[-1])
