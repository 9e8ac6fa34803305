"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

    src (B, S) -> embed * sqrt(d_model) + sinusoid -> dropout -> encoder        -> memory (B, S, d)
    tgt (B, T) -> embed * sqrt(d_model) + sinusoid -> dropout -> causal decoder  (attends to memory)
               -> logits = decoder_out @ tgt_embedding.weight^T                  (B, T, tgt_vocab)

The output projection is the target embedding matrix itself (tied, section 3.4 of the paper), so
the model has no separate (d_model x vocab) output weight. ``fastdl.nn.Transformer`` runs the
encoder and decoder (batch_first), its attention and norms on fastdl's kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF

from .. import nn as fnn
from ._common import sinusoidal_positions

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
            passed.

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

    # -- pieces -----------------------------------------------------------------------------------

    def _embed(self, tokens: torch.Tensor, table: torch.nn.Embedding, name: str) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int):
            raise TypeError(f"{name} must be an int64 or int32 tensor of token ids")
        if tokens.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, length); got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"{name} has length {tokens.shape[1]} > max_len {self.max_len}")
        x = table(tokens) * math.sqrt(self.d_model)
        return self.dropout(x + self.positions[: tokens.shape[1]].to(x.dtype))

    def _padding(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Key-padding mask, True at padding (torch.nn.Transformer's convention)."""
        if mask is not None:
            if mask.shape != tokens.shape:
                raise ValueError(f"a key-padding mask must have the tokens' shape {tuple(tokens.shape)}; "
                                 f"got {tuple(mask.shape)}")
            return mask.bool()
        return tokens == self.pad_id if self.pad_id is not None else None

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
                                       tgt_key_padding_mask=self._padding(tgt, tgt_key_padding_mask),
                                       memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=True)
        return TF.linear(out, self.tgt_embedding.weight)

    # -- API --------------------------------------------------------------------------------------

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None,
                tgt_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, T, tgt_vocab): position t predicts tgt[:, t + 1].

        Masks are (B, S) / (B, T) with True at padding; None derives them from ``pad_id``.
        """
        memory_mask = self._padding(src, src_key_padding_mask)
        memory = self.encode(src, memory_mask)
        return self.decode(tgt, memory, memory_mask, tgt_key_padding_mask)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_new_tokens: int, bos_id: int, eos_id: int | None = None,
                 src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding: (B, 1 + n) token ids starting with ``bos_id``, n <= max_new_tokens.

        The encoder runs once; each step re-runs the decoder over the prefix (no key/value cache)
        and appends the arg-max token. A sequence that produced ``eos_id`` is padded afterwards
        (with ``pad_id``, or ``eos_id`` if there is none); decoding stops when all have.
        Call ``model.eval()`` first to switch dropout off.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if max_new_tokens + 1 > self.max_len:
            raise ValueError(f"max_new_tokens + 1 = {max_new_tokens + 1} exceeds max_len {self.max_len}")
        memory_mask = self._padding(src, src_key_padding_mask)
        memory = self.encode(src, memory_mask)
        ys = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        filler = self.pad_id if self.pad_id is not None else eos_id
        for _ in range(max_new_tokens):
            # The prefix holds no padding before eos, so no target padding mask is needed.
            logits = self.decode(ys, memory, memory_mask, torch.zeros_like(ys, dtype=torch.bool))
            next_token = logits[:, -1].argmax(-1)
            if eos_id is not None:
                next_token = torch.where(done, torch.full_like(next_token, filler), next_token)
                done |= next_token == eos_id
            ys = torch.cat((ys, next_token[:, None]), dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return ys
