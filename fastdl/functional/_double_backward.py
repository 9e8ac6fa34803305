"""Backward passes that autograd can differentiate again (double backward) on the kernel path.

The kernels compute first derivatives only. When autograd records a backward pass itself
(``create_graph=True``: Hessian-vector products, gradient penalties, ``gradgradcheck``), grad mode
is on inside an operator's autograd formula; the kernel-path formulas then take their gradients
from :func:`differentiable_grads` -- the same op written in differentiable torch ops, recomputed
from the saved inputs, with the kernels' own dropout mask -- so second derivatives are exact
instead of silently zero. A plain ``backward()`` never comes here: it runs with grad mode off and
takes the kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def differentiable_grads(reference: Callable, inputs: Sequence[torch.Tensor | None],
                         needs: Sequence[bool], grads) -> list[torch.Tensor | None]:
    """Gradients of ``reference(*inputs)`` under the output gradients ``grads`` (a tensor or a
    tuple; None entries are skipped), for the inputs whose ``needs`` flag is set (None for the
    others), as differentiable functions of the inputs and of ``grads``.

    ``inputs`` are the tensors the forward received (as saved for the backward), so the result
    stays connected to the graph that produced them.
    """
    grads = (grads,) if isinstance(grads, torch.Tensor) or grads is None else tuple(grads)
    wrt = [x for x, need in zip(inputs, needs) if need]
    if not wrt:
        return [None] * len(inputs)
    with torch.enable_grad():
        outs = reference(*inputs)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                       create_graph=True, allow_unused=True))
    return [next(got) if need else None for need in needs]


def dropout_scale_mask(shape, p: float, seed: torch.Tensor, device) -> torch.Tensor | None:
    """The fused kernels' keep-mask for ``(p, seed)`` over a contiguous tensor of ``shape`` viewed
    as (rows, last dim) -- that of the add & norm, the BERT embeddings and attention's (B, H, L, S)
    scores (``kernels.dropout.keep_mask``) -- times 1 / (1 - p): 0 where dropped. None without
    dropout. The plain dropout kernel counts over the flat index: its mask is that of shape
    (1, numel). Built by a kernel launch outside any ``torch.func`` transform (a constant)."""
    if p == 0.0:
        return None
    from .. import backend

    while torch._C._functorch.is_functorch_wrapped_tensor(seed):  # the launcher reads plain tensors
        seed = torch._C._functorch.get_unwrapped(seed)
    with torch._C._DisableFuncTorch():
        keep = backend.kernels("dropout").keep_mask(shape, p, seed, device)
        return keep * (1.0 / (1.0 - p)) if p < 1.0 else torch.zeros(shape, device=device)
