"""Drop-in replacements for ``torch.nn`` modules: same constructors, parameters and state_dict."""

from .dropout import Dropout
from .embedding import Embedding
from .normalization import BatchNorm1d, BatchNorm2d, LayerNorm, RMSNorm

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "Dropout",
    "Embedding",
]
