"""fastdl's functional API: torch.nn.functional signatures, Triton kernels underneath.

Every function picks its backend per call (see :mod:`fastdl.backend`).
"""

from .normalization import layer_norm, rms_norm

__all__ = [
    "layer_norm",
    "rms_norm",
]
