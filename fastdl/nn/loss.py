"""Fused linear + cross-entropy loss module, ``torch.nn.LinearCrossEntropyLoss``'s twin."""

from __future__ import annotations

import torch

from .. import functional as F
from ..functional.cross_entropy import check_options


class LinearCrossEntropyLoss(torch.nn.Module):
    """``torch.nn.LinearCrossEntropyLoss`` (PyTorch 2.13): a ``Linear(in_features, num_classes)``,
    ``self.linear``, and the cross-entropy of its output, computed by
    :func:`fastdl.functional.linear_cross_entropy` without the (N, num_classes) logits ever
    existing. The same keyword-only options, parameters and state_dict as PyTorch's, seed for
    seed. ``forward(input (N, in_features) or (in_features,), target)``: int64 class indices (N,)
    or probabilities (N, num_classes). ``ignore_index=None`` is cross-entropy's default, -100, as
    in PyTorch's module. Not supported, refused with ``ValueError``: ``out_features``
    other than ``()`` (K-dimensional losses) and class ``weight``. ``options`` (PyTorch's
    chunking knobs) is kept but not used: the kernels choose their own chunks.

    To score against another module's weight (tied word embeddings), call
    :func:`fastdl.functional.linear_cross_entropy` with it.
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: torch.Tensor | None = None, ignore_index: int | None = None,
                 label_smoothing: float = 0.0, options=None) -> None:
        if tuple(out_features) != ():
            raise ValueError(f"out_features={tuple(out_features)}: fastdl computes the (N, num_classes) loss "
                             "only (out_features=())")
        if weight is not None:
            raise ValueError("class weights (weight=) are not supported by fastdl's linear cross-entropy")
        check_options(-100 if ignore_index is None else ignore_index, label_smoothing, reduction)
        super().__init__()
        self.register_buffer("weight", None)  # PyTorch's class-weight buffer slot (always None here)
        self.num_classes = num_classes
        self.out_features = ()
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.options = options

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor) and input.dim() not in (1, 2):
            raise ValueError(f"input must have shape (N, in_features) or (in_features,), got "
                             f"{tuple(input.shape)}")
        ignore = -100 if self.ignore_index is None else self.ignore_index  # (PyTorch's None, measured)
        return F.linear_cross_entropy(input, self.linear.weight, target, self.linear.bias, ignore,
                                      self.label_smoothing, self.reduction)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}")
