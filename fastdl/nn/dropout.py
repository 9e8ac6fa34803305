"""Drop-in dropout module: ``torch.nn.Dropout`` whose forward calls :func:`fastdl.functional.dropout`."""

from __future__ import annotations

import torch

from .. import functional as F


class Dropout(torch.nn.Dropout):
    """``torch.nn.Dropout`` computed by fastdl's kernel: the mask is regenerated in the backward
    from a seed instead of being stored."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)
