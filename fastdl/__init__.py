"""fastdl: Triton kernels for Transformer building blocks, with a pure-PyTorch fallback.

    import fastdl
    norm = fastdl.nn.LayerNorm(768)            # drop-in for torch.nn.LayerNorm
    y = fastdl.functional.layer_norm(x, (768,))
    fastdl.backend.resolve(x)                  # "triton" | "interpret" | "torch"
    model = fastdl.models.BertModel.from_pretrained("checkpoint/dir")
    fastdl.patch(hf_model)                     # swap torch.nn modules for fastdl's, in place
"""

__version__ = "0.1.0"

from . import backend, functional, models, nn  # noqa: E402
from .patch import patch  # noqa: E402  (the function; the module stays importable as fastdl.patch)

__all__ = ["__version__", "backend", "functional", "nn", "models", "patch"]
