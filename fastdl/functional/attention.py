"""Scaled dot-product attention (torch's signature and semantics)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend
from ._validate import check_floating, check_same_device


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) V over (B, H, L, D) query and (B, H_kv, S, D) key/value,
    as ``torch.nn.functional.scaled_dot_product_attention``."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_floating(name, t)
    check_same_device("query", {"query": query, "key": key, "value": value, "attn_mask": attn_mask})
    backend.select("scaled_dot_product_attention", query, unsupported="the fused kernel is not built yet")
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
