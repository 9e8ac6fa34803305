"""Drop-in replacements for ``torch.nn`` modules: same constructors, parameters and state_dict."""

from .attention import MultiheadAttention
from .dropout import Dropout
from .embedding import Embedding
from .loss import LinearCrossEntropyLoss
from .normalization import BatchNorm1d, BatchNorm2d, BatchNorm3d, LayerNorm, RMSNorm
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Dropout",
    "Embedding",
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
    "Transformer",
    "LinearCrossEntropyLoss",
]
