"""Drop-in ``torch.nn`` Transformer layers and stacks on fastdl's kernels.

Each class subclasses its ``torch.nn`` counterpart, so constructor arguments, initialisation
(seed for seed), parameter names and ``state_dict`` keys are torch's by construction. The layers
then swap their submodules for fastdl's -- ``self_attn``/``multihead_attn`` ->
:class:`fastdl.nn.MultiheadAttention`, ``norm*`` -> :class:`fastdl.nn.LayerNorm`, ``dropout*`` ->
:class:`fastdl.nn.Dropout` -- keeping the same parameter tensors, and ``forward`` runs:

* attention through the fused kernel (:func:`fastdl.functional.scaled_dot_product_attention`);
* every "add & norm" step through :func:`fastdl.functional.dropout_add_layer_norm`, one kernel
  for ``norm(x + dropout(sublayer(x)))`` (post-norm). Pre-norm layers use the same kernel for
  ``x + dropout(sublayer(norm_i(x)))`` followed by the next ``norm_{i+1}``: its ``pre_norm_sum``
  output is the new residual stream and its ``out`` the next sublayer's input.

Masks keep torch's meaning (bool True = *not* allowed; float = additive) and are passed on in the
dtype given: bool masks stay bool for the kernel instead of becoming float as in torch.

A norm or dropout that is not plain -- a subclass, parametrized, or with hooks (pruning, weight
norm, a user's) -- is called as a module instead of fused, so it behaves as in torch. ``forward``
calls the layer's own ``_sa``/``_mha``/``_ff`` (each sublayer's output before its dropout, which
the add & norm fuses), not torch's ``_sa_block``/``_mha_block``/``_ff_block``: overriding those
changes nothing here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import functional as FD
from .attention import MultiheadAttention
from .dropout import Dropout
from .normalization import LayerNorm

__all__ = ["Transformer", "TransformerEncoder", "TransformerDecoder", "TransformerEncoderLayer",
           "TransformerDecoderLayer"]


def _fastdl_attention(old: torch.nn.MultiheadAttention) -> MultiheadAttention:
    """``old``'s configuration and parameter tensors (shared, not copied) in fastdl's module."""
    new = torch.nn.utils.skip_init(  # built on the meta device: no init work, no random numbers
        MultiheadAttention, old.embed_dim, old.num_heads, dropout=old.dropout,
        bias=old.in_proj_bias is not None, add_bias_kv=old.bias_k is not None,
        add_zero_attn=old.add_zero_attn, kdim=old.kdim, vdim=old.vdim, batch_first=old.batch_first,
        device=old.out_proj.weight.device, dtype=old.out_proj.weight.dtype)
    new.load_state_dict(old.state_dict(), assign=True)
    return new


def _fastdl_norm(old: torch.nn.LayerNorm) -> LayerNorm:
    like = old.weight if old.weight is not None else torch.empty(0)
    new = torch.nn.utils.skip_init(LayerNorm, old.normalized_shape, eps=old.eps,
                                   elementwise_affine=old.elementwise_affine, bias=old.bias is not None,
                                   device=like.device, dtype=like.dtype)
    new.load_state_dict(old.state_dict(), assign=True)
    return new


def _use_fastdl_submodules(layer: torch.nn.Module) -> None:
    """Swap a freshly built torch layer's attention, norms and dropouts for fastdl's in place."""
    for name, child in list(layer.named_children()):
        if isinstance(child, torch.nn.MultiheadAttention):
            setattr(layer, name, _fastdl_attention(child))
        elif isinstance(child, torch.nn.LayerNorm):
            setattr(layer, name, _fastdl_norm(child))
        elif isinstance(child, torch.nn.Dropout):
            setattr(layer, name, Dropout(child.p, child.inplace))


def _plain(module: torch.nn.Module, *types: type) -> bool:
    """Whether calling ``module`` would run exactly ``types``' forward and nothing else: not a
    subclass with its own forward, not parametrized (that makes a subclass too), and no hooks of
    its own or global ones (pruning and weight norm are hooks). Only then may the layer read its
    parameters and fuse it away instead of calling it."""
    nn_module = torch.nn.modules.module
    return (type(module) in types
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or module._backward_pre_hooks)
            and not (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                     or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks))


def _add_norm(x: torch.Tensor, residual: torch.Tensor, dropout: torch.nn.Module,
              norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(residual + dropout(x)), residual + dropout(x))``, one fused kernel when ``dropout``
    and ``norm`` are a plain Dropout and LayerNorm over the last dimension (as torch builds them);
    otherwise the two modules are called, so their hooks and overrides run as in torch."""
    if (_plain(dropout, Dropout, torch.nn.Dropout) and _plain(norm, LayerNorm, torch.nn.LayerNorm)
            and len(norm.normalized_shape) == 1):
        return FD.dropout_add_layer_norm(x, residual, norm.weight, norm.bias, dropout.p, norm.eps,
                                         dropout.training)
    total = residual + dropout(x)
    return norm(total), total


def _square_subsequent_mask(size: int, device, dtype) -> torch.Tensor:
    """The causal mask in MHA's convention: -inf (float) or True (bool) above the diagonal."""
    if dtype == torch.bool:
        return torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
    return torch.full((size, size), float("-inf"), dtype=dtype, device=device).triu(1)


def _detect_is_causal(mask: torch.Tensor | None, is_causal: bool | None, size: int | None) -> bool:
    """torch's rule for the stacks' ``is_causal=None``: True when ``mask`` is exactly the causal
    mask of the sequence length; an explicit True/False is taken as given."""
    if is_causal is not None or mask is None:
        return is_causal is True
    if torch.compiler.is_compiling():
        # Comparing values would break the graph; the mask applied as given is the same function.
        return False
    size = size if size is not None else mask.shape[-2]
    reference = _square_subsequent_mask(size, mask.device, mask.dtype)
    return mask.shape == reference.shape and bool((mask == reference).all())


def _seq_len(x: torch.Tensor, batch_first: bool) -> int:
    return x.shape[0] if x.dim() == 2 else x.shape[1 if batch_first else 0]


def _overrides(layer: torch.nn.Module, base: type, names: tuple[str, ...]) -> bool:
    """Whether ``layer``'s class (or the instance itself) overrides any of torch's private blocks
    ``names`` of ``base`` (``_sa_block``...), which torch's forward calls and fastdl's fused forward
    would skip."""
    cls = type(layer)
    return any(getattr(cls, name) is not getattr(base, name) or name in layer.__dict__ for name in names)


class _FastdlSubmodules:
    """The layers' constructor: torch's signature (so ``inspect`` and ``skip_init`` see it), torch's
    construction, then fastdl's submodules in place of torch's."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[torch.Tensor], torch.Tensor] = torch.nn.functional.relu,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        _use_fastdl_submodules(self)


class TransformerEncoderLayer(_FastdlSubmodules, torch.nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` on fastdl's attention, fused dropout + residual +
    LayerNorm, and dropout kernels (see the module docstring).

    torch's inference fast path (``torch._transformer_encoder_layer_fwd``) is not taken: this
    layer computes the same function in every mode. The one exception is a nested tensor, which
    only ``torch.nn.TransformerEncoder``'s inference path produces (fastdl's encoder never does);
    it goes to torch's own forward.
    """

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """src (S, N, E), (N, S, E) with ``batch_first``, or (S, E); masks as
        ``torch.nn.MultiheadAttention``'s ``attn_mask`` and ``key_padding_mask``."""
        if src.is_nested:  # only torch.nn.TransformerEncoder's inference path makes these
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        x = src
        if _overrides(self, torch.nn.TransformerEncoderLayer, ("_sa_block", "_ff_block")):
            # torch's composition of its blocks, so a subclass's own block runs (nothing fused),
            # with the masks as torch's forward hands them over (float, in the input's dtype).
            src_key_padding_mask = torch.nn.functional._canonical_mask(
                mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                other_type=torch.nn.functional._none_or_dtype(src_mask), other_name="src_mask",
                target_type=src.dtype)
            src_mask = torch.nn.functional._canonical_mask(
                mask=src_mask, mask_name="src_mask", other_type=None, other_name="", target_type=src.dtype,
                check_other=False)
            if self.norm_first:
                x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
                return x + self._ff_block(self.norm2(x))
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            return self.norm2(x + self._ff_block(x))
        if self.norm_first:
            x_sa = self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            h, x = _add_norm(x_sa, x, self.dropout1, self.norm2)
            return x + self.dropout2(self._ff(h))
        x, _ = _add_norm(self._sa(x, src_mask, src_key_padding_mask, is_causal), x,
                         self.dropout1, self.norm1)
        x, _ = _add_norm(self._ff(x), x, self.dropout2, self.norm2)
        return x

    def _sa(self, x, attn_mask, key_padding_mask, is_causal=False):
        """Self-attention output, before its dropout (that is fused into the add & norm)."""
        return self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              need_weights=False, is_causal=is_causal)[0]

    def _ff(self, x):
        """Feed-forward output, before its dropout (fused into the add & norm)."""
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class TransformerDecoderLayer(_FastdlSubmodules, torch.nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` on fastdl's attention, fused dropout + residual +
    LayerNorm, and dropout kernels (see the module docstring)."""

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> torch.Tensor:
        """tgt (T, N, E), memory (S, N, E) ((N, T, E), (N, S, E) with ``batch_first``; (T, E), (S, E)
        unbatched); masks as ``torch.nn.MultiheadAttention``'s."""
        x = tgt
        if _overrides(self, torch.nn.TransformerDecoderLayer, ("_sa_block", "_mha_block", "_ff_block")):
            # torch's composition of its blocks, so a subclass's own block runs (nothing fused).
            if self.norm_first:
                x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
                x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask,
                                        memory_is_causal)
                return x + self._ff_block(self.norm3(x))
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                               memory_is_causal))
            return self.norm3(x + self._ff_block(x))
        if self.norm_first:
            x_sa = self._sa(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            h, x = _add_norm(x_sa, x, self.dropout1, self.norm2)
            x_ca = self._mha(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            h, x = _add_norm(x_ca, x, self.dropout2, self.norm3)
            return x + self.dropout3(self._ff(h))
        x, _ = _add_norm(self._sa(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), x,
                         self.dropout1, self.norm1)
        x, _ = _add_norm(self._mha(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal), x,
                         self.dropout2, self.norm2)
        x, _ = _add_norm(self._ff(x), x, self.dropout3, self.norm3)
        return x

    def _sa(self, x, attn_mask, key_padding_mask, is_causal=False):
        """Self-attention output, before its dropout (that is fused into the add & norm)."""
        return self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              is_causal=is_causal, need_weights=False)[0]

    def _mha(self, x, mem, attn_mask, key_padding_mask, is_causal=False):
        """Cross-attention output, before its dropout."""
        return self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                   is_causal=is_causal, need_weights=False)[0]

    def _ff(self, x):
        """Feed-forward output, before its dropout."""
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class TransformerEncoder(torch.nn.TransformerEncoder):
    """``torch.nn.TransformerEncoder``: ``num_layers`` deep copies of ``encoder_layer`` (pass a
    :class:`TransformerEncoderLayer` for fastdl's kernels), then ``norm`` if given.

    ``enable_nested_tensor`` is accepted and stored, but fastdl never converts a padded batch to a
    nested tensor (torch's inference fast path): padded positions are computed like any other, so
    the output there is not zero-filled as torch's fast path makes it, and nothing warns about it.
    """

    def __init__(self, encoder_layer: torch.nn.Module, num_layers: int, norm: torch.nn.Module | None = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor=False, mask_check=mask_check)
        self.enable_nested_tensor = enable_nested_tensor  # what the caller asked for, as torch keeps it
        self.use_nested_tensor = False

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None,
                is_causal: bool | None = None) -> torch.Tensor:
        """src (S, N, E), (N, S, E) with ``batch_first``, or (S, E). ``is_causal=None`` detects a
        causal ``mask`` as torch does."""
        batch_first = getattr(getattr(self.layers[0], "self_attn", None), "batch_first", False)
        is_causal = _detect_is_causal(mask, is_causal, _seq_len(src, batch_first))
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal,
                           src_key_padding_mask=src_key_padding_mask)
        return output if self.norm is None else self.norm(output)


class TransformerDecoder(torch.nn.TransformerDecoder):
    """``torch.nn.TransformerDecoder``: ``num_layers`` deep copies of ``decoder_layer`` (pass a
    :class:`TransformerDecoderLayer` for fastdl's kernels), then ``norm`` if given."""

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> torch.Tensor:
        """tgt (T, N, E), memory (S, N, E) (batch first or unbatched as the layers are).
        ``tgt_is_causal=None`` detects a causal ``tgt_mask`` as torch does."""
        batch_first = getattr(getattr(self.layers[0], "self_attn", None), "batch_first", False)
        tgt_is_causal = _detect_is_causal(tgt_mask, tgt_is_causal, _seq_len(tgt, batch_first))
        output = tgt
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask,
                           tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        return output if self.norm is None else self.norm(output)


class Transformer(torch.nn.Transformer):
    """``torch.nn.Transformer`` built from fastdl's layers, stacks and LayerNorms.

    Same arguments, initialisation (the same parameters as torch's for the same seed),
    ``state_dict`` and ``forward``. ``custom_encoder`` / ``custom_decoder`` replace the stacks as
    in torch (and are re-initialised with Xavier like torch does).
    ``generate_square_subsequent_mask`` is torch's.
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=torch.nn.functional.relu, custom_encoder: torch.nn.Module | None = None,
                 custom_decoder: torch.nn.Module | None = None, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True,
                 device=None, dtype=None) -> None:
        factory = dict(device=device, dtype=dtype)
        layer_args = (d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                      norm_first, bias)
        # Built in torch's order, so the random initialisation matches torch's for the same seed.
        if custom_encoder is None:
            custom_encoder = TransformerEncoder(
                TransformerEncoderLayer(*layer_args, **factory), num_encoder_layers,
                LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory))
        if custom_decoder is None:
            custom_decoder = TransformerDecoder(
                TransformerDecoderLayer(*layer_args, **factory), num_decoder_layers,
                LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory))
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
                         activation, custom_encoder, custom_decoder, layer_norm_eps, batch_first,
                         norm_first, bias, **factory)
