"""Pieces the models share: output containers, activations, weight init, loss heads, masks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as TF
import torch.utils._pytree as pytree

# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


class ModelOutput:
    """Base of the output dataclasses: fields by attribute (``out.logits``), by name
    (``out["logits"]``) or by position over the fields that are not None (``out[0]``), as
    Hugging Face's ``ModelOutput`` does, so code written against ``transformers`` reads the same.
    Each subclass is a pytree node, so ``torch.export`` and compiled training steps can return it.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls, _flatten_output, lambda values, names: cls(**dict(zip(names, values))),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")

    def to_tuple(self) -> tuple:
        """The fields that are not None, in declaration order."""
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())


def _flatten_output(output: ModelOutput) -> tuple[list, list[str]]:
    names = [f.name for f in dataclasses.fields(output)]
    return [getattr(output, name) for name in names], names


@dataclasses.dataclass
class BaseModelOutputWithPooling(ModelOutput):
    """last_hidden_state: (B, S, hidden); pooler_output: (B, hidden) or None."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None


@dataclasses.dataclass
class MaskedLMOutput(ModelOutput):
    """loss: scalar when labels are given; logits: (B, S, vocab)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@dataclasses.dataclass
class PreTrainingOutput(ModelOutput):
    """loss: MLM + next-sentence loss when both labels are given; prediction_logits: (B, S, vocab);
    seq_relationship_logits: (B, 2)."""

    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None


@dataclasses.dataclass
class ClassifierOutput(ModelOutput):
    """loss: scalar when labels are given; logits: (B, num_labels)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Activations (Hugging Face's ``hidden_act`` names)
# ---------------------------------------------------------------------------------------------

def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return TF.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": TF.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": TF.relu,
    "silu": TF.silu,
    "swish": TF.silu,
    "tanh": torch.tanh,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function for a Hugging Face ``hidden_act`` name."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}; got {name!r}")
    return ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------
# Weight init
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def init_weights(module: torch.nn.Module, std: float, truncated: bool = False) -> None:
    """BERT/ViT practice: Linear/Conv/Embedding weights ~ N(0, std) (truncated at 2 std for
    ViT), biases 0, LayerNorm weight 1 and bias 0, the padding row of an embedding 0."""
    normal = (lambda t: torch.nn.init.trunc_normal_(t, 0.0, std, -2 * std, 2 * std)) if truncated \
        else (lambda t: torch.nn.init.normal_(t, 0.0, std))
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            normal(m.weight)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, torch.nn.Embedding):
            normal(m.weight)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, torch.nn.LayerNorm):
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()


# ---------------------------------------------------------------------------------------------
# Masks and losses
# ---------------------------------------------------------------------------------------------

def key_padding_mask(attention_mask: torch.Tensor | None, batch: int, seq: int,
                     device: torch.device) -> torch.Tensor | None:
    """(B, S) attention_mask (1 = token, 0 = padding) -> (B, 1, 1, S) bool mask (True = attend)
    that broadcasts over heads and query rows, so no (S, S) mask is ever materialised."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch, seq):
        raise ValueError(f"attention_mask must have shape (batch, seq) = ({batch}, {seq}); "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, the inputs on {device}")
    return attention_mask.bool()[:, None, None, :]


def classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rule: regression (MSE) when num_labels == 1, cross-entropy for integer
    labels, BCE-with-logits otherwise; ``config.problem_type`` overrides the guess. As in
    Hugging Face, the first guess is written into ``config.problem_type``: later calls (and a
    saved config) keep it, whatever their labels' dtype."""
    num_labels = logits.shape[-1]
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
        config.problem_type = problem
    if problem == "regression":
        if num_labels == 1:
            return TF.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return TF.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return TF.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if problem == "multi_label_classification":
        return TF.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"problem_type must be regression, single_label_classification or "
                     f"multi_label_classification; got {problem!r}")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, H * D) -> (B, H, S, D), the layout of scaled_dot_product_attention."""
    b, s, _ = x.shape
    return x.view(b, s, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H * D)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def sinusoidal_positions(max_len: int, dim: int) -> torch.Tensor:
    """(max_len, dim) table of "Attention Is All You Need": sin on even, cos on odd channels,
    wavelengths from 2 pi to 10000 * 2 pi."""
    position = torch.arange(max_len, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table.float()
