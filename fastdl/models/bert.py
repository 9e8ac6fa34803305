"""BERT (Devlin et al., 2019) on fastdl's kernels, weight-compatible with Hugging Face.

Data flow of one forward, with the fastdl op each step runs on::

    input_ids, token_type_ids, positions
      -> word + position + token-type embeddings, LayerNorm, dropout   F.bert_embeddings (one pass)
      -> N x encoder layer:
           q, k, v = three Linear                                      (B, H, S, D) each
           a = attention(q, k, v, key-padding mask)                    F.scaled_dot_product_attention
           h = LayerNorm(x + dropout(dense(a)))                        F.dropout_add_layer_norm
           x = LayerNorm(h + dropout(dense(act(dense(h)))))            F.dropout_add_layer_norm
      -> pooler: tanh(dense(x[:, 0]))

``attention_mask`` (B, S) with 1 for tokens and 0 for padding becomes a (B, 1, 1, S) boolean
key-padding mask that the attention kernel broadcasts; no (S, S) mask is built. Padded query
rows are computed like the others (they attend to the real tokens) and are meaningless, as in
Hugging Face. Module and parameter names follow Hugging Face's checkpoints, so
``from_pretrained`` maps keys one to one.

Unpadded mode (``config.unpad``; by default on whenever a mask is given and the kernels run):
the padding tokens are dropped right after the embeddings, every layer runs on the packed
(tokens, hidden) rows -- its matmuls, norms and ``F.varlen_attention`` see no padding at all --
and the padded (B, S, hidden) layout is restored at the end, with zeros at the padded
positions. Real tokens get the same values and gradients as in the padded path. Only where no
padded position is read: a padded first position under the pooler or a label (not -100) at a
padded position keeps the automatic choice on the padded path and makes ``unpad=True`` raise.
Finding the tokens (``nonzero`` on the mask) and that test wait for the GPU once each per
forward, as flash-attn's ``unpad_input`` does; ``unpad=False`` keeps the padded path and its
asynchrony. Under
``torch.compile`` the default is the padded path (a graph cannot hold the data-dependent token
count); ``unpad=True`` there breaks the graph at ``nonzero``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as TF

from .. import backend as fastdl_backend
from .. import functional as F
from .. import nn as fnn
from ._common import (
    BaseModelOutputWithPooling,
    ClassifierOutput,
    MaskedLMOutput,
    PreTrainingOutput,
    activation,
    classification_loss,
    init_weights,
    key_padding_mask,
    merge_heads,
    split_heads,
)
from ._hf import PretrainedConfig, PretrainedModel, _positive, _probability, rename_legacy_layer_norm

__all__ = [
    "BertConfig",
    "BertModel",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
]


@dataclasses.dataclass
class BertConfig(PretrainedConfig):
    """BERT hyper-parameters under Hugging Face's names; defaults are bert-base-uncased."""

    model_type = "bert"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None
    num_labels: int = 2
    problem_type: str | None = None
    tie_word_embeddings: bool = True
    is_decoder: bool = False
    add_cross_attention: bool = False
    # Drop padding tokens inside the encoder: None = when a mask is given and the kernels run.
    unpad: bool | None = None

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels")
        _probability(self, "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")
        activation(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is not supported "
                             "(only 'absolute')")
        if self.is_decoder or self.add_cross_attention:
            raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

class BertEmbeddings(torch.nn.Module):
    """word + position + token-type embeddings, LayerNorm, dropout: one fused op."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = fnn.Embedding(config.vocab_size, config.hidden_size,
                                             padding_idx=config.pad_token_id)
        self.position_embeddings = fnn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = fnn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = fnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = fnn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        seq = input_ids.shape[1]
        if position_ids is None and seq > self.position_embeddings.num_embeddings:
            raise ValueError(f"input_ids has {seq} positions; the model has "
                             f"{self.position_embeddings.num_embeddings} (max_position_embeddings)")
        # None position / token-type ids mean arange(S) / zeros, as Hugging Face.
        return F.bert_embeddings(input_ids, token_type_ids, position_ids, self.word_embeddings.weight,
                                 self.position_embeddings.weight, self.token_type_embeddings.weight,
                                 self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
                                 self.dropout.p, self.training, padding_idx=self.word_embeddings.padding_idx)


class PackedSequences(NamedTuple):
    """Where each sequence's tokens lie in a packed (tokens, hidden) tensor: sequence i is rows
    cu_seqlens[i]:cu_seqlens[i + 1] (int32, (B + 1,)); max_seqlen bounds every length."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


def unpad_indices(attention_mask: torch.Tensor) -> tuple[torch.Tensor, PackedSequences]:
    """(indices of the real tokens in the flattened (B * S) positions, their PackedSequences)
    from a (B, S) mask of 1 (token) and 0 (padding), at any positions. ``nonzero`` makes this
    wait for the GPU (the number of tokens sizes its output); the padded length S bounds the
    sequence lengths, so no other value is read back."""
    mask = attention_mask.bool()
    indices = mask.reshape(-1).nonzero().squeeze(1)
    cu_seqlens = torch.nn.functional.pad(mask.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return indices, PackedSequences(cu_seqlens, mask.shape[1])


class BertSelfAttention(torch.nn.Module):
    """Multi-head self-attention projections and the fused attention kernel."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.key = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.value = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | PackedSequences | None) -> torch.Tensor:
        dropout_p = self.dropout_p if self.training else 0.0
        if isinstance(mask, PackedSequences):  # x: (tokens, hidden) of packed sequences
            q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1))  # (tokens, heads, head_dim); 0 tokens too
                       for proj in (self.query, self.key, self.value))
            out = F.varlen_attention(q, k, v, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen,
                                     mask.max_seqlen, dropout_p=dropout_p)
            return out.reshape(x.shape)
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return merge_heads(out)


class BertAddNorm(torch.nn.Module):
    """dense -> dropout -> add the residual -> LayerNorm (HF's BertSelfOutput / BertOutput)."""

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = torch.nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = fnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = fnn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out, _ = F.dropout_add_layer_norm(self.dense(x), residual, self.LayerNorm.weight, self.LayerNorm.bias,
                                          self.dropout.p, self.LayerNorm.eps, self.training)
        return out


class BertAttention(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertAddNorm(config.hidden_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = torch.nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(torch.nn.Module):
    """Post-norm Transformer encoder layer."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertAddNorm(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = torch.nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(torch.nn.Module):
    """tanh(dense(hidden state of the first token))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = torch.nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class BertPredictionHeadTransform(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.LayerNorm = fnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(torch.nn.Module):
    """transform, then logits against the word embeddings (tied, as BERT was trained) plus a
    per-token bias. With ``tie_word_embeddings=False`` the decoder is a Linear of its own, with
    its own bias, as in Hugging Face (``bias`` is then unused but kept for the checkpoint)."""

    def __init__(self, config: BertConfig, word_embeddings: torch.nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = torch.nn.Parameter(torch.zeros(config.vocab_size))
        if config.tie_word_embeddings:
            self.decoder = None
            # A plain attribute, not a submodule: the weight belongs to the embeddings.
            self.__dict__["_word_embeddings"] = word_embeddings
        else:
            self.decoder = torch.nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.linear(self.transform(x), *self.output_layer())

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (vocab, hidden), bias (vocab,)) of the projection onto the vocabulary."""
        if self.decoder is not None:
            return self.decoder.weight, self.decoder.bias
        return self._word_embeddings.weight, self.bias

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the positions whose label is not -100, from the encoder's
        (B, S, hidden) output, through the fused linear + cross-entropy: no (tokens, vocab) logits.

        Eager on a CPU, only the labelled positions go through the transform and the loss. On CUDA
        and under torch.compile every position does, the unlabelled ones skipped by
        ``ignore_index``: selecting the labelled rows (a boolean-mask gather) would wait for the
        GPU to count them, and a compiled graph cannot hold the data-dependent count.
        """
        x = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1)
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"labels must have one entry per token ({tuple(hidden.shape[:-1])}), got "
                             f"{labels.shape[0]} in all")
        if x.device.type == "cpu" and not torch.compiler.is_compiling():  # (meta tensors: no values)
            scored = labels != -100
            x, labels = x[scored], labels[scored]
        weight, bias = self.output_layer()
        return F.linear_cross_entropy(self.transform(x), weight, labels, bias)


class BertOnlyMLMHead(torch.nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: torch.nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


class BertPreTrainingHeads(torch.nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: torch.nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.seq_relationship = torch.nn.Linear(config.hidden_size, 2)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class BertPreTrainedModel(PretrainedModel):
    config_class = BertConfig
    base_model_prefix = "bert"

    def _init(self) -> None:
        init_weights(self, self.config.initializer_range)
        for m in self.modules():
            if isinstance(m, BertLMPredictionHead):
                torch.nn.init.zeros_(m.bias)

    def _hf_key(self, key: str) -> str | None:
        key = rename_legacy_layer_norm(key)
        if key.endswith("embeddings.position_ids") or key.endswith("embeddings.token_type_ids"):
            return None  # buffers derived from the config
        if self.config.tie_word_embeddings and ".predictions.decoder." in key:
            # The word embeddings, and predictions.bias (_prepare_hf_state moved its value there).
            return None
        return key

    def _prepare_hf_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With tied embeddings, Hugging Face's MLM decoder bias is predictions.bias under another
        name; a checkpoint may store either (older ones the decoder's). Hugging Face's logits add
        ``decoder.bias``: when both are stored with different values it does not tie them (and
        warns), so ``decoder.bias`` is the one taken here too, with a warning."""
        if not self.config.tie_word_embeddings:
            return state
        state = dict(state)
        for key in [k for k in state if k.endswith(".predictions.decoder.bias")]:
            alias = key.removesuffix(".decoder.bias") + ".bias"
            decoder_bias = state[key]
            other = state.get(alias)
            if other is not None and not (other.shape == decoder_bias.shape
                                          and torch.equal(other.to(decoder_bias.dtype), decoder_bias)):
                warnings.warn(f"the checkpoint holds {alias} and {key} with different values; the MLM logits "
                              f"use {key}, as in Hugging Face (which then does not tie them)", stacklevel=4)
            state[alias] = decoder_bias
        return state


def _check_input_ids(input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        raise TypeError("input_ids must be an int64 or int32 tensor")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq); got {tuple(input_ids.shape)}")


def _token_labels(labels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token ``labels`` of any shape holding one entry per token ((B, S), (B * S,), (B, S, 1):
    Hugging Face flattens them with ``labels.view(-1)``) as input_ids' (B, S)."""
    _check_input_ids(input_ids)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.numel() != input_ids.numel():
        raise ValueError(f"labels must have one entry per token of input_ids {tuple(input_ids.shape)} "
                         f"({input_ids.numel()} in all); got shape {tuple(labels.shape)}")
    return labels.reshape(input_ids.shape)


class BertModel(BertPreTrainedModel):
    """Embeddings, encoder and (optionally) the tanh pooler.

    forward(input_ids (B, S), attention_mask (B, S) 1/0, token_type_ids (B, S), position_ids (B, S))
    -> ``last_hidden_state`` (B, S, hidden), ``pooler_output`` (B, hidden) or None.
    """

    is_backbone = True

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self._init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                *, token_labels: torch.Tensor | None = None) -> BaseModelOutputWithPooling:
        """``token_labels`` (B, S), -100 where unscored: the heads' per-token labels, which the
        unpadded mode must not find at a padded position (see :meth:`_padding_unread`)."""
        _check_input_ids(input_ids)
        batch, seq = input_ids.shape
        mask = key_padding_mask(attention_mask, batch, seq, input_ids.device)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        if self._unpad(mask, x) and self._padding_unread(attention_mask, token_labels):
            indices, packed = unpad_indices(attention_mask)
            flat = x.reshape(batch * seq, -1)
            tokens = self.encoder(flat.index_select(0, indices), packed)
            x = flat.new_zeros(flat.shape).index_copy(0, indices, tokens).view(x.shape)
        else:
            x = self.encoder(x, mask)
        pooled = self.pooler(x) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)

    def _unpad(self, mask: torch.Tensor | None, x: torch.Tensor) -> bool:
        if mask is None or self.config.unpad is False:
            return False
        if self.config.unpad:
            if torch.compiler.is_exporting():
                raise ValueError("BertConfig(unpad=True) cannot be exported: the number of real tokens "
                                 "is data; export with unpad=None (the padded path) or unpad=False")
            return True
        # A compiled graph cannot hold the data-dependent token count without a break, nor can a
        # torch.func transform (vmap cannot read the mask on the host): the padded path then.
        return (not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is None
                and fastdl_backend.resolve(x) != "torch")

    def _padding_unread(self, attention_mask: torch.Tensor, token_labels: torch.Tensor | None) -> bool:
        """Whether the unpadded mode's zeros at padded positions go unread, so that every output
        that is used equals the padded path's: no padded first position under the pooler (it
        reads position 0) and no label at a padded position (the padded path scores it, as
        Hugging Face). One host read, beside the one unpadding costs anyway. If one is read, the
        automatic choice is the padded path and ``unpad=True`` raises."""
        padding = ~attention_mask.bool()
        read = []
        if self.pooler is not None:
            read.append(("the first position (the pooler reads it)", padding[:, 0].any()))
        if token_labels is not None:
            read.append(("a label other than -100", (padding & (token_labels != -100)).any()))
        if not read:
            return True
        flags = torch.stack([flag for _, flag in read]).tolist()
        if not any(flags):
            return True
        if self.config.unpad:
            what = " and ".join(name for (name, _), bad in zip(read, flags) if bad)
            raise ValueError(f"unpad=True drops padded positions, but a padded position carries {what}; "
                             "use BertConfig(unpad=None) (the padded path then) or unpad=False")
        return False


class BertForMaskedLM(BertPreTrainedModel):
    """BERT with the masked-language-model head. ``labels`` (B, S) (or any shape with B * S entries,
    as Hugging Face), -100 where not scored: the loss comes from the fused linear + cross-entropy
    (no logits behind it); ``return_logits=False`` also skips the (B, S, vocab) logits of the
    output (``logits`` is then None)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)
        self._init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                *, labels: torch.Tensor | None = None, return_logits: bool = True) -> MaskedLMOutput:
        if labels is not None:
            labels = _token_labels(labels, input_ids)
        hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                           token_labels=labels).last_hidden_state
        logits = self.cls(hidden) if return_logits or labels is None else None
        loss = self.cls.predictions.loss(hidden, labels) if labels is not None else None
        return MaskedLMOutput(loss=loss, logits=logits)


class BertForPreTraining(BertPreTrainedModel):
    """BERT with the masked-LM and next-sentence heads; ``loss`` = MLM + NSP cross-entropy when
    both ``labels`` (B, S) and ``next_sentence_label`` (B,) are given, as Hugging Face; the MLM
    part from the fused linear + cross-entropy. ``return_logits=False`` with labels skips the
    (B, S, vocab) ``prediction_logits`` (None then)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        self._init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                *, labels: torch.Tensor | None = None,
                next_sentence_label: torch.Tensor | None = None,
                return_logits: bool = True) -> PreTrainingOutput:
        with_loss = labels is not None and next_sentence_label is not None
        if with_loss:
            labels = _token_labels(labels, input_ids)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        token_labels=labels if with_loss else None)
        prediction_logits = (self.cls.predictions(out.last_hidden_state) if return_logits or not with_loss
                             else None)
        nsp_logits = self.cls.seq_relationship(out.pooler_output)
        loss = None
        if with_loss:
            loss = (self.cls.predictions.loss(out.last_hidden_state, labels)
                    + TF.cross_entropy(nsp_logits.view(-1, 2), next_sentence_label.view(-1)))
        return PreTrainingOutput(loss=loss, prediction_logits=prediction_logits,
                                 seq_relationship_logits=nsp_logits)


class BertForSequenceClassification(BertPreTrainedModel):
    """BERT with dropout + Linear on the pooled output. ``labels``: (B,) class ids, or floats for
    regression (num_labels == 1) and multi-label (B, num_labels), as Hugging Face."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = fnn.Dropout(p)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self._init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                *, labels: torch.Tensor | None = None) -> ClassifierOutput:
        pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return ClassifierOutput(loss=loss, logits=logits)

