"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

    src (B, S) -> embed * sqrt(d_model) + sinusoid -> dropout -> encoder        -> memory (B, S, d)
    tgt (B, T) -> embed * sqrt(d_model) + sinusoid -> dropout -> causal decoder  (attends to memory)
               -> logits = decoder_out @ tgt_embedding.weight^T                  (B, T, tgt_vocab)

The output projection is the target embedding matrix itself (tied, section 3.4 of the paper), so
the model has no separate (d_model x vocab) output weight. ``fastdl.nn.Transformer`` runs the
encoder and decoder (batch_first), its attention and norms on fastdl's kernels.

``generate`` decodes with a key/value cache: the encoder runs once, each decoder layer's
cross-attention keys and values are projected once from its output, and every step feeds only
the newest token: its self-attention keys and values are appended to the layer's cache and its
one-row query attends to the cache with :func:`fastdl.functional.scaled_dot_product_attention`.
A step costs the same matrix products whatever the prefix length (attention reads t keys, which
is the only part that grows); without a cache (``use_cache=False``) step t re-runs the decoder
over all t positions. Both give the same tokens; greedy and beam search share one loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF

from .. import functional as F
from .. import nn as fnn
from ..nn.transformer import _add_norm
from ._common import merge_heads, sinusoidal_positions, split_heads

__all__ = ["Seq2SeqTransformer"]


class Seq2SeqTransformer(torch.nn.Module):
    """Encoder-decoder Transformer with tied target embeddings and greedy decoding.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
        activation, norm_first, layer_norm_eps: as ``torch.nn.Transformer``.
        max_len: longest source or target sequence (size of the sinusoid table).
        pad_id: padding token id (its embedding is zero and gets no gradient), or None. When
            given, ``forward`` and ``generate`` derive the key-padding masks from it if none are
            passed; target position 0 (the start token, which may be ``pad_id``) is never padding.

    Initialisation: embeddings ~ N(0, d_model^-0.5), so that after the sqrt(d_model) scale the
    token vectors have unit variance; the Transformer's matrices Xavier-uniform (torch's own).
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, d_model: int = 512, nhead: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, max_len: int = 512, pad_id: int | None = 0,
                 activation: str = "relu", norm_first: bool = False, layer_norm_eps: float = 1e-5):
        super().__init__()
        for name, value in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size),
                            ("d_model", d_model), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % 2:
            raise ValueError(f"d_model must be even (sin/cos channel pairs), got {d_model}")
        if pad_id is not None and not (0 <= pad_id < min(src_vocab_size, tgt_vocab_size)):
            raise ValueError(f"pad_id must be a valid id in both vocabularies, got {pad_id}")
        self.d_model = d_model
        self.pad_id = pad_id
        self.max_len = max_len
        self.src_embedding = fnn.Embedding(src_vocab_size, d_model, padding_idx=pad_id)
        self.tgt_embedding = fnn.Embedding(tgt_vocab_size, d_model, padding_idx=pad_id)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.dropout = fnn.Dropout(dropout)
        self.transformer = fnn.Transformer(
            d_model=d_model, nhead=nhead, num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward, dropout=dropout,
            activation=activation, layer_norm_eps=layer_norm_eps, batch_first=True, norm_first=norm_first)
        with torch.no_grad():
            for emb in (self.src_embedding, self.tgt_embedding):
                torch.nn.init.normal_(emb.weight, 0.0, d_model ** -0.5)
                if pad_id is not None:
                    emb.weight[pad_id].zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The sinusoid table is computed, not saved (a non-persistent buffer): refill it, so that a
        # model built on the meta device, then to_empty() and load_state_dict(), is whole -- or,
        # with load_state_dict(assign=True), still on the meta device: it then takes the device
        # of the loaded weights.
        table = sinusoidal_positions(self.max_len, self.d_model)
        if self.positions.is_meta:
            device = next((t.device for k, t in state_dict.items()
                           if k.startswith(prefix) and isinstance(t, torch.Tensor) and not t.is_meta), None)
            if device is not None:
                self.positions = table.to(device, self.positions.dtype)
        else:
            with torch.no_grad():
                self.positions.copy_(table)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- pieces -----------------------------------------------------------------------------------

    def _embed(self, tokens: torch.Tensor, table: torch.nn.Embedding, name: str,
               start: int = 0) -> torch.Tensor:
        """Scaled token embeddings plus the sinusoids of positions start, start + 1, ..."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int):
            raise TypeError(f"{name} must be an int64 or int32 tensor of token ids")
        if tokens.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, length); got {tuple(tokens.shape)}")
        end = start + tokens.shape[1]
        if end > self.max_len:
            raise ValueError(f"{name} has length {end} > max_len {self.max_len}")
        x = table(tokens) * math.sqrt(self.d_model)
        return self.dropout(x + self.positions[start:end].to(x.dtype))

    def _padding(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Key-padding mask, True at padding (torch.nn.Transformer's convention)."""
        if mask is not None:
            if mask.shape != tokens.shape:
                raise ValueError(f"a key-padding mask must have the tokens' shape {tuple(tokens.shape)}; "
                                 f"got {tuple(mask.shape)}")
            return mask.bool()
        return tokens == self.pad_id if self.pad_id is not None else None

    def _target_padding(self, tgt: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The target's key-padding mask: as :meth:`_padding`, except that a derived mask never
        hides position 0, the start token, which may be ``pad_id`` itself (T5 starts its decoder
        from the pad token): ``generate`` attends to it, so teacher forcing must too."""
        if mask is not None or self.pad_id is None:
            return self._padding(tgt, mask)
        padding = tgt == self.pad_id
        padding[:, :1] = False
        return padding

    def encode(self, src: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """memory (B, S, d_model)."""
        return self.transformer.encoder(self._embed(src, self.src_embedding, "src"),
                                        src_key_padding_mask=self._padding(src, src_key_padding_mask))

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor,
               memory_key_padding_mask: torch.Tensor | None = None,
               tgt_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B, T, tgt_vocab) of the next token at every target position (causal)."""
        length = tgt.shape[-1]
        causal = torch.ones(length, length, dtype=torch.bool, device=tgt.device).triu(1)  # True = hidden
        out = self.transformer.decoder(self._embed(tgt, self.tgt_embedding, "tgt"), memory, tgt_mask=causal,
                                       tgt_key_padding_mask=self._target_padding(tgt, tgt_key_padding_mask),
                                       memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=True)
        return TF.linear(out, self.tgt_embedding.weight)

    # -- API --------------------------------------------------------------------------------------

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None,
                tgt_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, T, tgt_vocab): position t predicts tgt[:, t + 1].

        Masks are (B, S) / (B, T) with True at padding; None derives them from ``pad_id``. tgt starts
        with the start token at position 0 (right padding), which a derived mask never hides, even
        when it is ``pad_id`` (``bos_id == pad_id``, T5's convention): ``generate`` feeds the same
        prefix, so both compute the same function of it.
        """
        memory_mask = self._padding(src, src_key_padding_mask)
        memory = self.encode(src, memory_mask)
        return self.decode(tgt, memory, memory_mask, tgt_key_padding_mask)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_new_tokens: int, bos_id: int, eos_id: int | None = None,
                 src_key_padding_mask: torch.Tensor | None = None, *, num_beams: int = 1,
                 use_cache: bool = True, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy (``num_beams=1``) or beam-search decoding: (B, 1 + n) token ids starting with
        ``bos_id``, n <= max_new_tokens.

        The encoder runs once. With ``use_cache`` (default) each step runs the decoder on the
        newest token only, against cached keys and values (see the module docstring); with
        ``use_cache=False`` each step re-runs it over the whole prefix. The tokens are the same.

        Greedy appends the arg-max token. Beam search keeps the ``num_beams`` prefixes with the
        highest sum of token log-probabilities (no length normalisation) and returns the best one
        per source. A sequence (or beam) that produced ``eos_id`` (``eos_token_id`` is the same
        argument under Hugging Face's name) is padded afterwards with ``pad_id`` (or ``eos_id`` if
        there is none) and keeps its score; decoding stops when all have finished.
        Call ``model.eval()`` first to switch dropout off.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if max_new_tokens + 1 > self.max_len:
            raise ValueError(f"max_new_tokens + 1 = {max_new_tokens + 1} exceeds max_len {self.max_len}")
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
        if eos_token_id is not None:
            if eos_id is not None and eos_id != eos_token_id:
                raise ValueError(f"eos_id={eos_id} and eos_token_id={eos_token_id} disagree; pass one")
            eos_id = eos_token_id
        batch = src.shape[0]
        memory_mask = self._padding(src, src_key_padding_mask)
        memory = self.encode(src, memory_mask)
        if num_beams > 1:  # beam b of source i is row i * num_beams + b
            memory = memory.repeat_interleave(num_beams, dim=0)
            memory_mask = None if memory_mask is None else memory_mask.repeat_interleave(num_beams, dim=0)
        rows = batch * num_beams
        if use_cache:
            step = _CachedDecoder(self, memory, memory_mask, max_new_tokens)
        else:
            step = _UncachedDecoder(self, memory, memory_mask)
        ys = torch.full((rows, 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(rows, dtype=torch.bool, device=src.device)
        filler = self.pad_id if self.pad_id is not None else eos_id
        # Log-probability of each beam; at the start only beam 0 of each source is live.
        scores = torch.zeros(batch, num_beams, device=src.device)
        scores[:, 1:] = float("-inf")
        for _ in range(max_new_tokens):
            logits = step(ys).float()                                   # (rows, vocab)
            if num_beams == 1:
                next_token = logits.argmax(-1)
                if eos_id is not None:
                    next_token = torch.where(done, torch.full_like(next_token, filler), next_token)
            else:
                logp = torch.log_softmax(logits, dim=-1)
                # A finished beam continues with the filler only, at no cost.
                finished = torch.full_like(logp, float("-inf"))
                finished[:, filler if filler is not None else 0] = 0.0
                logp = torch.where(done[:, None], finished, logp)
                vocab = logp.shape[-1]
                total = (scores.view(-1, 1) + logp).view(batch, num_beams * vocab)
                scores, flat = total.topk(num_beams, dim=-1)            # (batch, num_beams)
                first_beam = torch.arange(batch, device=src.device)[:, None] * num_beams
                parent = (first_beam + flat // vocab).view(-1)
                next_token = (flat % vocab).view(-1)
                ys, done = ys[parent], done[parent]
                step.reorder(parent)
            if eos_id is not None:
                done |= next_token == eos_id
            ys = torch.cat((ys, next_token[:, None]), dim=1)
            if eos_id is not None and bool(done.all()):
                break
        if num_beams > 1:
            best = scores.argmax(-1) + torch.arange(batch, device=src.device) * num_beams
            ys = ys[best]
        return ys


class _UncachedDecoder:
    """Next-token logits (rows, vocab) from the whole prefix (rows, t), re-running the decoder."""

    def __init__(self, model: Seq2SeqTransformer, memory: torch.Tensor, memory_mask: torch.Tensor | None):
        self.model, self.memory, self.memory_mask = model, memory, memory_mask

    def __call__(self, ys: torch.Tensor) -> torch.Tensor:
        # The prefix holds no padding before eos, so no target padding mask is needed.
        no_padding = torch.zeros_like(ys, dtype=torch.bool)
        return self.model.decode(ys, self.memory, self.memory_mask, no_padding)[:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: nothing is kept per prefix (all beams of a source share its memory)."""


class _CachedDecoder:
    """Next-token logits (rows, vocab) from the newest token of the prefix, with per-layer caches.

    Cross-attention keys/values: projected once from ``memory``, (rows, H, S, D) per layer.
    Self-attention keys/values: (rows, H, 1 + max_new_tokens, D) buffers per layer, filled one
    position per step; attention reads the filled part (a strided view, no copy).
    """

    def __init__(self, model: Seq2SeqTransformer, memory: torch.Tensor, memory_mask: torch.Tensor | None,
                 max_new_tokens: int):
        self.model = model
        self.layers = list(model.transformer.decoder.layers)
        for layer in self.layers:
            if not isinstance(layer, fnn.TransformerDecoderLayer):
                raise TypeError("the key/value cache needs fastdl.nn.TransformerDecoderLayer decoder layers; "
                                "use generate(..., use_cache=False)")
        attn = self.layers[0].self_attn
        self.heads = attn.num_heads
        rows, capacity = memory.shape[0], max_new_tokens  # positions 0 .. max_new_tokens - 1 are fed
        shape = (rows, self.heads, capacity, attn.head_dim)
        self.self_kv = [(memory.new_empty(shape), memory.new_empty(shape)) for _ in self.layers]
        self.cross_kv = []
        for layer in self.layers:
            k, v = _projection(layer.multihead_attn, memory, 1, 3).chunk(2, dim=-1)
            self.cross_kv.append((split_heads(k, self.heads), split_heads(v, self.heads)))
        # MHA's convention (True = ignore) -> SDPA's (True = attend), broadcast over heads and rows.
        self.cross_mask = None if memory_mask is None else ~memory_mask[:, None, None, :]
        self.length = 0  # positions already in the self-attention caches

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row r now continues the prefix of row ``rows[r]`` (a beam of the same
        source, so the cross-attention keys and values stay)."""
        self.self_kv = [(k[rows], v[rows]) for k, v in self.self_kv]

    def __call__(self, ys: torch.Tensor) -> torch.Tensor:
        t = self.length
        if ys.shape[1] != t + 1:
            raise RuntimeError(f"the cache holds {t} positions; the prefix has {ys.shape[1]}")
        model = self.model
        x = model._embed(ys[:, t:], model.tgt_embedding, "tgt", start=t)    # (rows, 1, d_model)
        for layer, (k_cache, v_cache), (k_mem, v_mem) in zip(self.layers, self.self_kv, self.cross_kv):

            def self_attention(h, layer=layer, k_cache=k_cache, v_cache=v_cache):
                qkv = _projection(layer.self_attn, h, 0, 3).chunk(3, dim=-1)
                q, k, v = (split_heads(p, self.heads) for p in qkv)
                k_cache[:, :, t:t + 1] = k
                v_cache[:, :, t:t + 1] = v
                out = F.scaled_dot_product_attention(q, k_cache[:, :, :t + 1], v_cache[:, :, :t + 1])
                return layer.self_attn.out_proj(merge_heads(out))

            def cross_attention(h, layer=layer, k_mem=k_mem, v_mem=v_mem):
                q = split_heads(_projection(layer.multihead_attn, h, 0, 1), self.heads)
                out = F.scaled_dot_product_attention(q, k_mem, v_mem, attn_mask=self.cross_mask)
                return layer.multihead_attn.out_proj(merge_heads(out))

            x = _decoder_layer_step(layer, x, self_attention, cross_attention)
        self.length = t + 1
        decoder = model.transformer.decoder
        if decoder.norm is not None:
            x = decoder.norm(x)
        return TF.linear(x[:, -1], model.tgt_embedding.weight)


def _projection(attn: torch.nn.MultiheadAttention, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """``x`` through blocks first .. last - 1 of the packed q/k/v input projection (0 = q, 1 = k,
    2 = v), concatenated on the last dim: one matmul, as MultiheadAttention's own forward."""
    e = attn.embed_dim
    weight = attn.in_proj_weight[first * e:last * e]
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[first * e:last * e]
    return TF.linear(x, weight, bias)


def _decoder_layer_step(layer: fnn.TransformerDecoderLayer, x: torch.Tensor, self_attention, cross_attention):
    """``TransformerDecoderLayer.forward`` with its two attention blocks given as functions."""
    if layer.norm_first:
        h, x = _add_norm(self_attention(layer.norm1(x)), x, layer.dropout1, layer.norm2)
        h, x = _add_norm(cross_attention(h), x, layer.dropout2, layer.norm3)
        return x + layer.dropout3(layer._ff(h))
    x, _ = _add_norm(self_attention(x), x, layer.dropout1, layer.norm1)
    x, _ = _add_norm(cross_attention(x), x, layer.dropout2, layer.norm2)
    x, _ = _add_norm(layer._ff(x), x, layer.dropout3, layer.norm3)
    return x
