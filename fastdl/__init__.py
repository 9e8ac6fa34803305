"""fastdl: Triton kernels for Transformer building blocks, with a pure-PyTorch fallback.

    import fastdl
    norm = fastdl.nn.LayerNorm(768)            # drop-in for torch.nn.LayerNorm
    y = fastdl.functional.layer_norm(x, (768,))
    fastdl.backend.resolve(x)                  # "triton" | "interpret" | "torch"
    model = fastdl.models.BertModel.from_pretrained("checkpoint/dir")
    fastdl.patch(hf_model, verbose=True)       # swap modules for fastdl's in place, print a report
    fastdl.integrations.transformers.register()  # attn_implementation="fastdl" in transformers
"""

__version__ = "0.1.0"

from . import backend, functional, integrations, models, nn  # noqa: E402
from . import patch  # noqa: E402  (a callable module: fastdl.patch(model), fastdl.patch.register_norm)

__all__ = ["__version__", "backend", "functional", "nn", "models", "integrations", "patch"]
