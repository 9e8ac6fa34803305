"""Drop-in replacements for ``torch.nn`` modules: same constructors, parameters and state_dict."""

from .dropout import Dropout
from .embedding import Embedding
from .normalization import LayerNorm, RMSNorm

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "Dropout",
    "Embedding",
]
