"""Drop-in normalisation modules.

Each subclasses its ``torch.nn`` counterpart, so the constructor, initialisation, parameter names
and ``state_dict`` keys are torch's by construction; only ``forward`` changes, to call
:mod:`fastdl.functional`.
"""

from __future__ import annotations

import torch

from .. import functional as F


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by fastdl's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by fastdl's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
