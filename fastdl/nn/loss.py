"""Fused linear + cross-entropy loss module (no torch.nn twin: the projection is part of the loss)."""

from __future__ import annotations

import torch

from .. import functional as F


class LinearCrossEntropyLoss(torch.nn.Module):
    """``CrossEntropyLoss()(hidden @ weight.T + bias, target)`` with the logits never materialised
    (:func:`fastdl.functional.linear_cross_entropy`).

    Constructor arguments as ``torch.nn.CrossEntropyLoss`` less the class weights:
    ``ignore_index``, ``reduction``, ``label_smoothing``. ``forward(hidden (..., H), weight (V, H),
    target, bias=None)``: target int64 class indices (...) or probabilities (..., V). The module
    holds no parameters: pass the output layer's weight (e.g. tied word embeddings).
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear_cross_entropy(hidden, weight, target, bias, self.ignore_index, self.label_smoothing,
                                      self.reduction)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}")
