"""fastdl: Triton kernels for Transformer building blocks, with a pure-PyTorch fallback.

    import fastdl
    norm = fastdl.nn.LayerNorm(768)            # drop-in for torch.nn.LayerNorm
    y = fastdl.functional.layer_norm(x, (768,))
    fastdl.backend.resolve(x)                  # "triton" | "interpret" | "torch"
"""

__version__ = "0.1.0"

from . import backend, functional, nn  # noqa: E402

__all__ = ["__version__", "backend", "functional", "nn"]
