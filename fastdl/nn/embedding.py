"""Drop-in embedding module.

It subclasses ``torch.nn.Embedding``, so the constructor, initialisation, the ``weight`` parameter
and ``state_dict`` are torch's by construction; only ``forward`` changes, to call
:func:`fastdl.functional.embedding`.
"""

from __future__ import annotations

import torch

from .. import functional as F


class Embedding(torch.nn.Embedding):
    """``torch.nn.Embedding`` computed by fastdl's gather / deterministic scatter kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    @classmethod
    def from_pretrained(cls, embeddings: torch.Tensor, freeze: bool = True, padding_idx: int | None = None,
                        max_norm: float | None = None, norm_type: float = 2.0,
                        scale_grad_by_freq: bool = False, sparse: bool = False) -> Embedding:
        """An :class:`Embedding` holding ``embeddings`` (V, D) as its weight (not copied), as
        ``torch.nn.Embedding.from_pretrained``; ``freeze=True`` stops its gradient."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a 2-D (num_embeddings, embedding_dim) tensor")
        rows, cols = embeddings.shape
        return cls(num_embeddings=rows, embedding_dim=cols, _weight=embeddings, _freeze=freeze,
                   padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)
