"""Seeds for counter-based random numbers, drawn from torch's generators."""

from __future__ import annotations

import torch


def draw_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh seed from torch's default generator for ``device``: a (1,) int64 tensor on it.

    Drawing it from torch's generator (rather than Python's) makes ``torch.manual_seed(s)``
    reproduce a fastdl call exactly, and successive calls differ. The seed stays on the device --
    the kernels load it themselves -- so drawing it never waits for the GPU, and inside a CUDA
    graph each replay draws a new one (torch's generators are graph-safe). A tensor, not an int,
    also lets ``torch.compile`` trace the draw: the operators take the seed as an input.
    """
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
