"""Seeds for counter-based random numbers, drawn from torch's generators."""

from __future__ import annotations

import torch


def draw_seed(device: torch.device | str) -> int:
    """A fresh 31-bit seed from torch's default generator for ``device``.

    Drawing it from torch's generator (rather than Python's) makes ``torch.manual_seed(s)``
    reproduce a fastdl call exactly, and successive calls differ. On CUDA this reads the CUDA
    generator, as torch's own dropout does.
    """
    device = torch.device(device)
    if device.type == "meta":
        return 0
    return int(torch.randint(0, 2**31 - 1, (1,), device=device).item())
