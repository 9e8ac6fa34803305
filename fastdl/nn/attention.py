"""Drop-in ``torch.nn.MultiheadAttention`` on fastdl's fused attention.

The module subclasses ``torch.nn.MultiheadAttention``, so constructor, initialisation, parameters
(``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``bias_k``/``bias_v``,
``out_proj``) and ``state_dict`` keys are torch's by construction. Only ``forward`` changes:

* the projected queries, keys and values go to
  :func:`fastdl.functional.scaled_dot_product_attention` in its (N, H, L, D) layout, straight from
  the projections' memory (no transposed copies of the inputs);
* the key padding mask and the attention mask, each bool (True = *ignore*, MHA's convention) or
  float (additive), become ONE mask in SDPA's convention (bool True = *attend*, or additive),
  shaped to broadcast against (N, H, L, S) instead of being materialised at that size:
  key padding alone is (N, 1, 1, S), a 2-D ``attn_mask`` alone is (1, 1, L, S), both together
  (N, 1, L, S); a 3-D ``attn_mask`` is already per head, (N, H, L, S). Bool masks stay bool
  unless one of the two is float, in which case both become additive (-inf where ignored).
"""

from __future__ import annotations

import torch

from .. import functional as FD
from ..functional._library import autocast_dtype


def _check_mask_dtype(name: str, mask: torch.Tensor | None) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")


def _pad_columns(mask: torch.Tensor, extra: int) -> torch.Tensor:
    """Append ``extra`` key columns that every query may attend (False / 0.0)."""
    if extra == 0:
        return mask
    return torch.nn.functional.pad(mask, (0, extra))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An MHA-convention mask as an additive float mask (-inf where ignored)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _check_float_mask(name: str, mask: torch.Tensor | None, dtype: torch.dtype, fused: bool) -> None:
    """A float mask has the query's dtype, or is float32 on the fused path (the kernel adds it in
    float32 to an fp16/bf16 query's scores; a float64 query's takes it exactly): what torch's
    MultiheadAttention takes. Never cast down: a float32 mask's -1e5 or finfo.min would become
    -inf in fp16 and mask a row outright."""
    if mask is None or mask.dtype == torch.bool or mask.dtype == dtype:
        return
    if fused and mask.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16, torch.float64):
        return
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    allowed = "the query's dtype" + (" or float32" if fused else "")
    raise TypeError(f"a float {name} must have {allowed} ({dtype}), got {mask.dtype}"
                    + ("" if fused else " (need_weights=True computes the softmax in the query's dtype)"))


def _other_low_dtype_to(dtype: torch.dtype, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` cast to ``dtype`` when it is an fp16/bf16 mask of the other low dtype (what
    autocast's cast of the SDPA and baddbmm arguments does to it), else unchanged."""
    low = (torch.float16, torch.bfloat16)
    if mask is not None and mask.dtype in low and dtype in low and mask.dtype != dtype:
        return mask.to(dtype)
    return mask


def sdpa_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, *,
                batch: int, num_heads: int, tgt_len: int, src_len: int, extra_keys: int,
                dtype: torch.dtype, fused: bool = True) -> torch.Tensor | None:
    """MHA's two masks as one SDPA mask that broadcasts to (batch, num_heads, tgt_len, S').

    ``attn_mask``: (tgt_len, src_len) or (batch * num_heads, tgt_len, src_len);
    ``key_padding_mask``: (batch, src_len). Both in MHA's convention (bool True = ignore, float =
    additive). ``extra_keys`` columns (``bias_k`` and the zero key) are appended, attendable, so
    S' = src_len + extra_keys. Returns a bool mask (True = attend) when every given mask is bool,
    else an additive mask in ``dtype`` (float32 if a float32 mask is given for an fp16/bf16 query
    on the ``fused`` path); None when there is no mask.
    """
    _check_float_mask("attn_mask", attn_mask, dtype, fused)
    _check_float_mask("key_padding_mask", key_padding_mask, dtype, fused)
    parts = []
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (tgt_len, src_len):
                raise ValueError(f"a 2-D attn_mask must have shape {(tgt_len, src_len)} (L, S), "
                                 f"got {tuple(attn_mask.shape)}")
            parts.append(attn_mask.view(1, 1, tgt_len, src_len))
        elif attn_mask.dim() == 3:
            want = (batch * num_heads, tgt_len, src_len)
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"a 3-D attn_mask must have shape {want} (N * num_heads, L, S), "
                                 f"got {tuple(attn_mask.shape)}")
            parts.append(attn_mask.view(batch, num_heads, tgt_len, src_len))
        else:
            raise ValueError(f"attn_mask must be 2-D (L, S) or 3-D (N * num_heads, L, S), "
                             f"got {attn_mask.dim()}-D")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, src_len):
            raise ValueError(f"key_padding_mask must have shape {(batch, src_len)} (N, S), "
                             f"got {tuple(key_padding_mask.shape)}")
        parts.append(key_padding_mask.view(batch, 1, 1, src_len))
    if not parts:
        return None
    parts = [_pad_columns(m, extra_keys) for m in parts]
    if all(m.dtype == torch.bool for m in parts):
        ignore = parts[0] if len(parts) == 1 else parts[0] | parts[1]
        return ~ignore
    if dtype != torch.float64 and any(m.dtype == torch.float32 for m in parts):
        dtype = torch.float32  # (a float32 mask for a low-precision query: kept exact)
    merged = _additive(parts[0], dtype)
    return merged if len(parts) == 1 else merged + _additive(parts[1], dtype)


def _attention_with_weights(q, k, v, mask, dropout_p):
    """softmax(Q K^T / sqrt(D) + mask) V in plain torch, returning the (N, H, L, S) weights too.

    Rows whose keys are all masked get zero weights (and zero gradient), as the fused kernel does.
    """
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        weights = FD.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v), weights


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose attention runs fastdl's fused kernel.

    Same constructor, parameters, ``state_dict`` and ``forward`` signature and semantics as torch,
    including ``batch_first``, unbatched (L, E) inputs, ``kdim``/``vdim``, ``add_bias_kv``,
    ``add_zero_attn``, bool masks (True = position is *ignored*) and float (additive) masks, and
    ``is_causal`` as a hint that needs ``attn_mask`` (see :meth:`forward`).

    Which path runs:

    * ``need_weights=False``: :func:`fastdl.functional.scaled_dot_product_attention`, the fused
      kernel, never materialising the (N, H, L, S) scores; dropout on the attention probabilities
      is the kernel's ``dropout_p`` (``self.dropout`` in training mode).
    * ``need_weights=True`` (torch's default): the weights must be returned, so attention is
      computed explicitly in torch (scores, softmax, dropout, weights @ V). Pass
      ``need_weights=False`` for speed, as with torch.

    Differences from torch: a query row whose keys are all masked returns the output projection's
    bias (its attention output is 0, and its weights are 0) rather than NaN; torch's inference
    fast path and nested tensors are not used. Bad shapes and ``is_causal=True`` without
    ``attn_mask`` raise ``ValueError``, bad mask dtypes ``TypeError`` (torch raises
    ``AssertionError``/``RuntimeError``).
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` over ``key``/``value``; returns ``(attn_output, attn_weights)``.

        Shapes (E = ``embed_dim``, N batch, L target, S source length): query (L, N, E), key
        (S, N, kdim), value (S, N, vdim); (N, L, E) etc. with ``batch_first``; (L, E), (S, kdim),
        (S, vdim) unbatched. ``key_padding_mask`` (N, S) or (S,); ``attn_mask`` (L, S) or
        (N * num_heads, L, S). Output (L, N, E) / (N, L, E) / (L, E); weights (N, L, S) averaged
        over heads or (N, num_heads, L, S), unbatched without N, or None when not requested.

        ``is_causal`` is torch's hint that ``attn_mask`` is the causal mask; it requires
        ``attn_mask``. As in torch, when no key padding mask is given and weights are not
        requested, the mask is then not read and the kernel applies causality itself; otherwise
        ``attn_mask`` is used as given.
        """
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise ValueError(f"{name}: nested tensors are not supported; pad and pass "
                                 "key_padding_mask instead")
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_mask_dtype("attn_mask", attn_mask)

        is_batched = query.dim() == 3
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (L, E) unbatched or 3-D batched, got {query.dim()}-D")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key and value must be {query.dim()}-D like query, got {key.dim()}-D "
                             f"and {value.dim()}-D")
        batch_first = self.batch_first
        if not is_batched:  # a batch of one, batch first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            batch_first = True
            if key_padding_mask is not None:
                if key_padding_mask.dim() != 1:
                    raise ValueError("for unbatched query, key_padding_mask must be 1-D (S,), got "
                                     f"{key_padding_mask.dim()}-D")
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise ValueError(f"key_padding_mask must be 2-D (N, S), got {key_padding_mask.dim()}-D")

        seq_dim, batch_dim = (1, 0) if batch_first else (0, 1)
        batch, tgt_len, src_len = query.shape[batch_dim], query.shape[seq_dim], key.shape[seq_dim]
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim),
                               ("value", value, self.vdim)):
            if t.shape[-1] != width:
                raise ValueError(f"{name} must have {width} features in its last dimension, got "
                                 f"{t.shape[-1]}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must agree in batch and sequence dimensions, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if key.shape[batch_dim] != batch:
            raise ValueError(f"key has batch size {key.shape[batch_dim]} but query has {batch}")

        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint that attn_mask is the causal mask and needs "
                             "attn_mask; Transformer.generate_square_subsequent_mask builds it")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the kernel applies causality itself (torch's semantics)
        else:
            is_causal = False

        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # -> (N, H, len, D), a view
            x = x.unflatten(-1, (heads, head_dim))
            return x.transpose(1, 2) if batch_first else x.permute(1, 2, 0, 3)

        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1)], dim=2)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, heads, 1, head_dim)], dim=2)
            extra += 1

        # Under autocast torch's weights path adds the float masks in baddbmm, which autocast runs in
        # its dtype: merged as given, then cast, as here. Its SDPA casts a mask in the other low
        # dtype (bf16 under fp16 autocast) to the query's too, so both paths take one, cast first.
        cast_mask = need_weights and autocast_dtype(q) is not None
        if autocast_dtype(q) is not None:
            attn_mask = _other_low_dtype_to(q.dtype, attn_mask)
            key_padding_mask = _other_low_dtype_to(q.dtype, key_padding_mask)
        mask = sdpa_mask(attn_mask, key_padding_mask, batch=batch, num_heads=heads, tgt_len=tgt_len,
                         src_len=src_len, extra_keys=extra, dtype=q.dtype,
                         fused=not need_weights or cast_mask)
        if cast_mask and mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, mask, dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                weights = weights.squeeze(0)
        else:
            out = FD.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                  is_causal=is_causal)

        # (N, H, L, D) -> the input's layout, heads merged
        out = out.transpose(1, 2) if batch_first else out.permute(2, 0, 1, 3)
        out = out.reshape(*out.shape[:2], self.embed_dim)
        out = torch.nn.functional.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            out = out.squeeze(0)
        return out, weights

    def _project(self, query, key, value):
        """The q, k, v input projections, in the inputs' layout; one matmul for self-attention
        (and one for key and value when they are the same tensor)."""
        e = self.embed_dim
        linear = torch.nn.functional.linear
        bias = self.in_proj_bias
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        if not self._qkv_same_embed_dim:
            return (linear(query, self.q_proj_weight, b_q), linear(key, self.k_proj_weight, b_k),
                    linear(value, self.v_proj_weight, b_v))
        weight = self.in_proj_weight
        if query is key and key is value:
            return linear(query, weight, bias).chunk(3, dim=-1)
        q = linear(query, weight[:e], b_q)
        if key is value:
            k, v = linear(key, weight[e:], None if bias is None else bias[e:]).chunk(2, dim=-1)
            return q, k, v
        return q, linear(key, weight[e:2 * e], b_k), linear(value, weight[2 * e:], b_v)
