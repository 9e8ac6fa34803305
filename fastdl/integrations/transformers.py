"""Hugging Face ``transformers``: run a model's attention on fastdl's fused kernel.

    import fastdl.integrations.transformers as fastdl_hf
    fastdl_hf.register()                                   # once per process
    model = AutoModel.from_pretrained(name, attn_implementation="fastdl")
    model.set_attn_implementation("fastdl")                # or switch a live model

:func:`register` adds two entries under the name ``"fastdl"``:

* the attention function, :func:`attention_forward`, to ``transformers.AttentionInterface``: it
  honours the contract of ``transformers``' own ``sdpa_attention_forward`` (the same arguments,
  the same masks, ``is_causal`` and position-bias rules) and computes with
  :func:`fastdl.functional.scaled_dot_product_attention`;
* the mask builder to ``transformers.masking_utils.AttentionMaskInterface``: ``sdpa``'s, so the
  model hands the function the same boolean (True = attend) padding / causal / sliding-window
  masks it would hand torch's SDPA. Registering the function alone is not enough: ``transformers``
  builds no mask for an implementation without a mask builder, and padded batches would be
  attended as if they had no padding.

Models whose attention does not go through ``AttentionInterface`` (custom code, very old
``transformers``) are not changed by the name; :func:`fastdl.patch` says which.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys

import torch

from .. import functional as F

__all__ = ["ATTENTION_NAME", "register", "is_registered", "attention_forward", "supports_attention"]

ATTENTION_NAME = "fastdl"

# Attention-function arguments that change what the scores mean, which fastdl's kernel (as
# ``sdpa``) cannot compute: raised on, never ignored.
_REFUSED = {"softcap": "softcap", "s_aux": "attention sinks", "sinks": "attention sinks",
            "indices": "a sparse key selection", "block_indices": "a sparse key selection"}


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """A ``transformers`` attention function computed by
    :func:`fastdl.functional.scaled_dot_product_attention`.

    query (B, H, L, D), key/value (B, H_kv, S, D); attention_mask bool (True = attend) or additive
    float, broadcastable to (B, H, L, S), or None -> (attn_output (B, L, H, D), None).
    Grouped-query attention uses ``enable_gqa``; ``position_bias`` (T5's relative positions) is
    added to the scores. ``sliding_window`` needs no handling here: the registered mask builder
    puts the window into ``attention_mask`` whenever it cuts anything off.

    Under autocast the queries are in the low-precision dtype while a float mask or position bias
    built by the model may be float32; it is cast to the queries' dtype, as autocast does for
    torch's SDPA. What the scores cannot express raises ``ValueError``: ``softcap``, attention
    sinks (``s_aux``, ``sinks``), a sparse key selection (``indices``, ``block_indices``) and
    paged caches. ``output_attentions=True`` computes the attention explicitly in torch ops and
    returns its (B, H, L, S) weights, as ``eager`` does.
    """
    for name, what in _REFUSED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"fastdl attention does not support {what} ({name}=); use "
                             "attn_implementation='eager'")
    if kwargs.get("cache") is not None:
        raise ValueError("fastdl attention does not support paged caches (continuous batching)")
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
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(query.dtype)
    enable_gqa = query.shape[1] != key.shape[1]
    if kwargs.get("output_attentions"):
        out, weights = _with_weights(query, key, value, attention_mask, dropout, scaling, is_causal)
        return out.transpose(1, 2).contiguous(), weights
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


def _with_weights(query, key, value, mask, dropout, scaling, is_causal):
    """softmax(Q K^T * scale + mask) V in torch ops, and the weights (B, H, L, S) in the query's
    dtype (softmax in float32, as ``eager``); dropout on the weights, fully masked rows 0."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-2, -1)).float() * scale
    if is_causal:
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0).to(query.dtype)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, value), weights


def _with_bias(bias: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, q_len: int,
               key: torch.Tensor) -> torch.Tensor:
    """One additive mask from a position bias and a bool/float mask (or causality), as
    ``transformers``' ``create_position_bias_mask``: masked-out scores get the dtype's minimum."""
    if mask is None:
        if not is_causal:
            return bias
        mask = torch.ones(q_len, key.shape[2], dtype=torch.bool, device=key.device).tril()
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.finfo(bias.dtype).min)
    return bias + mask


def _interfaces():
    """(AttentionInterface, AttentionMaskInterface or None, sdpa's mask builder or None)."""
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError("fastdl.integrations.transformers needs transformers >= 4.48 (with "
                          "AttentionInterface): pip install 'fastdl[hf]'") from e
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # releases (< 4.53) that build masks without a registry: nothing to add
        return AttentionInterface, None, None
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def register() -> str:
    """Register fastdl's attention function and its mask builder with ``transformers`` under
    ``"fastdl"`` (idempotent) and return that name, for ``attn_implementation=``.

    Raises ImportError when ``transformers`` is missing or has no attention registry."""
    attention, masks, mask_builder = _interfaces()
    attention.register(ATTENTION_NAME, attention_forward)
    if masks is not None:
        masks.register(ATTENTION_NAME, mask_builder)
    return ATTENTION_NAME


def is_registered() -> bool:
    """Whether :func:`register` has run (and ``transformers`` is importable)."""
    try:
        attention, masks, _ = _interfaces()
    except ImportError:
        return False
    return (ATTENTION_NAME in attention._global_mapping
            and (masks is None or ATTENTION_NAME in masks._global_mapping))


def supports_attention(model: torch.nn.Module) -> str | None:
    """Why ``model`` (a ``transformers`` ``PreTrainedModel``) cannot take
    ``attn_implementation="fastdl"``; None when it can."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return "it has no transformers config"
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return "its attention does not go through transformers' AttentionInterface"
    if not any("attention" in type(m).__name__.lower() for m in model.modules()):
        return "it has no attention layers"
    if getattr(model, "_supports_sdpa", None) is False:
        return "transformers marks it as not supporting sdpa, whose contract fastdl's attention follows"
    special = _special_cases_sdpa(model)
    if special:
        return (f"its code ({special}) computes differently when attn_implementation is 'sdpa', "
                "and would not under another name")
    return None


_SDPA_BRANCH = re.compile(r"_attn_implementation\s*(?:==|!=|in|not in)\s*[(\[]?[^:\n]*[\"']sdpa[\"']")


def _special_cases_sdpa(model: torch.nn.Module) -> str | None:
    """The file of a ``transformers`` module in ``model`` whose code branches on the name "sdpa"
    (it changes what it hands the attention function, or what it computes around it, for sdpa
    alone: such a model under "fastdl" would not compute what it computes under sdpa), or None."""
    for name in sorted({type(m).__module__ for m in model.modules()}):
        if name.startswith("transformers.models.") and _branches_on_sdpa(name):
            return name.rsplit(".", 1)[-1] + ".py"
    return None


@functools.cache
def _branches_on_sdpa(module_name: str) -> bool:
    module = sys.modules.get(module_name)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):  # no source file (a frozen or compiled module): nothing to read
        return False
    return _SDPA_BRANCH.search(source) is not None
