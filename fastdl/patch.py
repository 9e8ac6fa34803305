"""``fastdl.patch(model)``: put fastdl's kernels into an existing model, in place.

Two things happen:

1. Every submodule whose type is exactly one of ``torch.nn.LayerNorm``, ``RMSNorm``,
   ``BatchNorm1d``, ``BatchNorm2d``, ``Dropout``, ``Embedding``, ``MultiheadAttention`` is replaced
   by the fastdl module of the same name, built with the same constructor arguments and holding
   *the same* parameter and buffer objects (not copies): tied weights stay tied, an optimizer made
   before patching keeps updating the live weights, and device, dtype, training flag and hooks
   carry over. Subclasses of those torch types (which may change ``forward``) and modules that
   already are fastdl's are left alone.
2. A Hugging Face ``transformers`` model whose attention goes through ``transformers``'
   attention-function registry (``AttentionInterface``) is switched to :func:`hf_attention`,
   registered under the name ``"fastdl"``, so its attention runs on
   ``fastdl.functional.scaled_dot_product_attention``. Models without the registry keep their own
   attention code (their norms, dropout and embeddings are still swapped).

``patch`` returns the model (or, if the model itself is one of the swapped types, its
replacement) and prints nothing.
"""

from __future__ import annotations

import sys

import torch

from . import functional as F
from . import nn as fnn

__all__ = ["patch", "hf_attention", "ATTENTION_NAME"]

ATTENTION_NAME = "fastdl"

# torch.nn class -> (fastdl.nn class name, constructor arguments read off an instance).
_SWAPS = {
    torch.nn.LayerNorm: ("LayerNorm", lambda m: dict(
        normalized_shape=m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
        bias=m.bias is not None if m.elementwise_affine else True)),
    torch.nn.RMSNorm: ("RMSNorm", lambda m: dict(
        normalized_shape=m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine)),
    torch.nn.BatchNorm1d: ("BatchNorm1d", lambda m: dict(
        num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats)),
    torch.nn.BatchNorm2d: ("BatchNorm2d", lambda m: dict(
        num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats)),
    torch.nn.Dropout: ("Dropout", lambda m: dict(p=m.p, inplace=m.inplace)),
    torch.nn.Embedding: ("Embedding", lambda m: dict(
        num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim, padding_idx=m.padding_idx,
        max_norm=m.max_norm, norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq,
        sparse=m.sparse)),
    torch.nn.MultiheadAttention: ("MultiheadAttention", lambda m: dict(
        embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=m.dropout,
        bias=m.out_proj.bias is not None, add_bias_kv=m.bias_k is not None,
        add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first)),
}


def _fastdl_class(torch_cls: type) -> type | None:
    entry = _SWAPS.get(torch_cls)
    return getattr(fnn, entry[0], None) if entry else None


def _replacement(old: torch.nn.Module) -> torch.nn.Module | None:
    """The fastdl module for ``old``, sharing its tensors; None if ``old`` is not swapped."""
    cls = _fastdl_class(type(old))
    if cls is None:
        return None
    kwargs = _SWAPS[type(old)][1](old)
    tensors = list(old.parameters(recurse=False)) + list(old.buffers(recurse=False))
    floating = [t for t in tensors if t.is_floating_point()]
    if "p" not in kwargs:  # every swapped type but Dropout takes factory kwargs
        # Build on the meta device: no memory, no init cost; the real tensors are moved in below.
        kwargs.update(device="meta", dtype=floating[0].dtype if floating else None)
    new = cls(**kwargs)
    same = (set(new._parameters) == set(old._parameters) and set(new._buffers) == set(old._buffers)
            and set(new._modules) == set(old._modules))
    if not same:
        raise RuntimeError(f"fastdl.nn.{cls.__name__} does not have the structure of {type(old).__name__} "
                           f"(parameters {sorted(new._parameters)} vs {sorted(old._parameters)})")
    # Everything the torch module holds (parameters, buffers, children, hooks, training flag,
    # cached flags such as MultiheadAttention._qkv_same_embed_dim) moves over as is; attributes
    # only the fastdl class has keep their constructor values.
    new.__dict__.update(old.__dict__)
    return new


def _swap_modules(model: torch.nn.Module) -> torch.nn.Module:
    swapped: dict[int, torch.nn.Module] = {}  # a module used in several places is swapped once

    def visit(module: torch.nn.Module, seen: set[int]) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if id(child) not in swapped:
                new = _replacement(child)
                if new is not None:
                    swapped[id(child)] = new
            if id(child) in swapped:
                module._modules[name] = swapped[id(child)]
                child = swapped[id(child)]
            visit(child, seen)

    root = _replacement(model) or model
    visit(root, set())
    return root


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------

def hf_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """A ``transformers`` attention function (the contract of its ``sdpa_attention_forward``)
    computed by :func:`fastdl.functional.scaled_dot_product_attention`.

    query (B, H, L, D), key/value (B, H_kv, S, D), attention_mask bool (True = attend) or
    additive float, broadcastable to (B, H, L, S), or None -> (attn_output (B, L, H, D), None).
    Grouped-query attention uses ``enable_gqa``; ``position_bias`` is added to the scores.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("fastdl attention does not support softcap; use attn_implementation='eager'")
    if kwargs.get("cache") is not None:
        raise ValueError("fastdl attention does not support paged caches (continuous batching)")
    if kwargs.get("sliding_window") is not None and attention_mask is None:
        raise ValueError("fastdl attention needs an explicit mask for sliding-window attention")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len > q_len:
        # Prefill of an empty static cache: the keys past the prompt are unused (as transformers).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = _with_bias(position_bias, attention_mask, is_causal, q_len, key)
        is_causal = False
    enable_gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


def _with_bias(bias: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, q_len: int,
               key: torch.Tensor) -> torch.Tensor:
    """One additive mask from a position bias and a bool/float mask (or causality)."""
    if mask is None:
        if not is_causal:
            return bias
        kv_len = key.shape[2]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=key.device).tril()
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.finfo(bias.dtype).min)
    return bias + mask


def _register_hf_attention():
    """Register :func:`hf_attention` (and the bool mask builder of ``sdpa``) under "fastdl";
    returns False where the installed ``transformers`` has no attention registry."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION_NAME, hf_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:  # releases whose masks do not go through a registry
        return True
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return True


def _route_hf_attention(model: torch.nn.Module) -> None:
    if "transformers" not in sys.modules:  # no transformers model can exist without it
        return
    from transformers import PreTrainedModel

    roots = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    if not roots or not _register_hf_attention():
        return
    for hf_model in roots:
        can_set = getattr(hf_model, "_can_set_attn_implementation", None)
        if can_set is not None and not can_set():
            continue  # its attention does not go through the registry
        if hasattr(hf_model, "set_attn_implementation"):
            hf_model.set_attn_implementation(ATTENTION_NAME)
        else:
            hf_model.config._attn_implementation = ATTENTION_NAME


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Swap ``model``'s torch.nn norms, dropout, embeddings and multi-head attention for fastdl's
    (same weights, shared), and route a ``transformers`` model's attention through fastdl's
    fused kernel. See :mod:`fastdl.patch`. Returns the model."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _swap_modules(model)
    _route_hf_attention(model)
    return model
