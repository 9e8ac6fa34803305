"""fastdl's functional API: torch.nn.functional signatures, Triton kernels underneath.

Every function picks its backend per call (see :mod:`fastdl.backend`).
"""

from .attention import scaled_dot_product_attention
from .normalization import layer_norm, rms_norm

__all__ = [
    "scaled_dot_product_attention",
    "layer_norm",
    "rms_norm",
]
