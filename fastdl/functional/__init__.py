"""fastdl's functional API: torch.nn.functional signatures, Triton kernels underneath.

Every function picks its backend per call (see :mod:`fastdl.backend`).
"""

from .attention import scaled_dot_product_attention, varlen_attention
from .cross_entropy import linear_cross_entropy
from .dropout import dropout, dropout_add_layer_norm
from .embedding import bert_embeddings, embedding
from .normalization import batch_norm, layer_norm, rms_norm

__all__ = [
    "scaled_dot_product_attention",
    "layer_norm",
    "rms_norm",
    "batch_norm",
    "dropout",
    "dropout_add_layer_norm",
    "embedding",
    "bert_embeddings",
    "linear_cross_entropy",
    "varlen_attention",
]
