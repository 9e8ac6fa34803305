"""Comparing a fastdl op against an independent float64 reference, forward and backward.

fp32/fp64 results must be within a relative tolerance of the float64 reference, measured as
||out - ref|| / ||ref||. For fp16/bf16 there is no tolerance to guess: the error must be at most
``factor`` times the error PyTorch's own op makes in that dtype (the *baseline*), plus a small
floor. A failure names the tensor and prints the first mismatching indices.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytest
import torch

# Relative-norm tolerances against float64 (DESIGN.md, "Numerics").
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Floor added to factor * baseline error for fp16/bf16 (absorbs a baseline that happens to be exact).
LOW_PRECISION_FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}

# Tests whose reference is torch.nn.LinearCrossEntropyLoss, new in PyTorch 2.13 (the GPU machines
# run 2.11; fastdl's module is the same there).
needs_torch_linear_cross_entropy_loss = pytest.mark.skipif(
    not hasattr(torch.nn, "LinearCrossEntropyLoss"),
    reason="torch.nn.LinearCrossEntropyLoss is new in PyTorch 2.13")


def _on(actual: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``actual`` in float64 on the reference's device (a CUDA result against a CPU reference)."""
    return actual.detach().to(device=ref.device, dtype=torch.float64)


def rel_error(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """||actual - ref|| / ||ref|| in float64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    diff = (_on(actual, ref) - ref.detach().double()).norm().item()
    return diff / max(ref.detach().double().norm().item(), 1e-30)


def _mismatch_report(actual: torch.Tensor, ref: torch.Tensor, bound: float, limit: int = 5) -> str:
    a, r = _on(actual, ref), ref.detach().double()
    diff = (a - r).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    threshold = bound * r.abs().max().item()
    idx = (diff > threshold).nonzero()[:limit]
    if len(idx) == 0:
        idx = diff.flatten().argmax().unsqueeze(0)
        idx = torch.stack(torch.unravel_index(idx, diff.shape), dim=1)
    lines = [f"    at {tuple(i.tolist())}: got {a[tuple(i)].item():.6g}, expected {r[tuple(i)].item():.6g}"
             for i in idx]
    return "\n".join(lines)


def assert_close(name: str, actual: torch.Tensor | None, ref: torch.Tensor | None, *,
                 baseline: torch.Tensor | None = None, rtol: float | None = None,
                 factor: float = 3.0) -> None:
    """Assert ``actual`` matches the float64 ``ref`` (see the module docstring for the rule)."""
    if ref is None or actual is None:
        assert actual is None and ref is None, f"{name}: got {actual is None=} but {ref is None=}"
        return
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    dtype = actual.dtype
    if dtype in LOW_PRECISION_FLOOR and baseline is not None and rtol is None:
        bound = factor * rel_error(baseline, ref) + LOW_PRECISION_FLOOR[dtype]
        rule = f"{factor} x torch's own {dtype} error + {LOW_PRECISION_FLOOR[dtype]}"
    else:
        bound = rtol if rtol is not None else RTOL.get(dtype, 1e-5)
        rule = "rtol"
    nan_ok = torch.isnan(ref).any().item()
    has_nan = torch.isnan(actual.detach().float()).any().item() if actual.numel() else False
    err = rel_error(actual, ref)
    if (has_nan and not nan_ok) or not err <= bound:
        raise AssertionError(
            f"{name} ({dtype}): relative error {err:.3e} > bound {bound:.3e} ({rule})\n"
            f"  first mismatches:\n{_mismatch_report(actual, ref, bound)}")


def _flatten(out) -> list[torch.Tensor | None]:
    if isinstance(out, torch.Tensor) or out is None:
        return [out]
    return list(out)


def _copies(inputs: Sequence, dtype: torch.dtype | None) -> list:
    """Detached copies of the tensor inputs (cast to ``dtype`` if floating), keeping requires_grad."""
    copies = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            y = x.detach().clone()
            if dtype is not None and y.is_floating_point():
                y = y.to(dtype)
            copies.append(y.requires_grad_(x.requires_grad))
        else:
            copies.append(x)
    return copies


def check_op(fn: Callable, ref_fn: Callable, inputs: Sequence, *,
             baseline_fn: Callable | None = None, rtol: float | None = None,
             grad_rtol: float | None = None, factor: float = 3.0, grad: bool = True) -> None:
    """Run ``fn(*inputs)`` (fastdl) and ``ref_fn`` on float64 copies; compare outputs and the
    gradients of every input that requires grad, under one random output gradient.

    ``baseline_fn`` is PyTorch's own op, run on copies in the inputs' dtype; it sets the bound
    for fp16/bf16. Outputs may be a tensor or a tuple of tensors (None entries are skipped).
    """
    inputs = list(inputs)
    outs = _flatten(fn(*inputs))
    ref_inputs = _copies(inputs, torch.float64)
    refs = _flatten(ref_fn(*ref_inputs))
    base_inputs = _copies(inputs, None)
    bases = _flatten(baseline_fn(*base_inputs)) if baseline_fn is not None else [None] * len(refs)
    assert len(outs) == len(refs), f"{len(outs)} outputs, reference has {len(refs)}"
    for i, (o, r, b) in enumerate(zip(outs, refs, bases)):
        assert_close(f"output {i}", o, r, baseline=b, rtol=rtol, factor=factor)

    if not grad or not any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        return
    pairs = [(o, r, b) for o, r, b in zip(outs, refs, bases)
             if o is not None and o.requires_grad and o.is_floating_point()]
    grads_out = [torch.randn_like(r) for _, r, _ in pairs]
    torch.autograd.backward([o for o, _, _ in pairs],
                            [g.to(o.dtype) for (o, _, _), g in zip(pairs, grads_out)])
    torch.autograd.backward([r for _, r, _ in pairs], grads_out)
    if baseline_fn is not None:
        torch.autograd.backward([b for _, _, b in pairs],
                                [g.to(b.dtype) for (_, _, b), g in zip(pairs, grads_out)])
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            base_grad = base_inputs[i].grad if baseline_fn is not None else None
            assert_close(f"grad of input {i}", x.grad, ref_inputs[i].grad, baseline=base_grad,
                         rtol=grad_rtol, factor=factor)


def saved_bytes(fn: Callable, *args) -> int:
    """Bytes of the tensors autograd saves for the backward while running ``fn(*args)``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def check_module(ours, ref, call: Callable, inputs: Sequence, masks: Sequence = (), rtol: float = 2e-4):
    """check_op for a module: ``call(forward, *inputs, *masks)`` where ``forward`` runs the module.

    The module's parameters enter as extra inputs so their gradients are compared too; the
    reference is a float64 copy of the torch module ``ref`` (``ours`` holds the same weights), and
    ``ref`` itself in its dtype is the low-precision baseline. ``inputs`` get gradients; float
    masks reach the float64 reference in float64, bool ones unchanged.
    """
    names = [n for n, _ in ours.named_parameters()]
    ref64 = copy.deepcopy(ref).double()
    count = len(inputs) + len(masks)

    def run(module):
        def fn(*args):
            params = dict(zip(names, args[count:]))
            return call(lambda *a, **k: torch.func.functional_call(module, params, a, k), *args[:count])
        return fn

    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    low_precision = params[0].dtype != torch.float32
    check_op(run(ours), run(ref64), [x.requires_grad_() for x in inputs] + list(masks) + params,
             baseline_fn=run(ref) if low_precision else None, rtol=rtol, grad_rtol=rtol)


def ref_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, keep=None, p=0.0):
    """Attention in the inputs' dtype (float64 in tests), written out; GQA by repeating heads.
    Fully masked rows give 0 and pass no gradient; ``keep`` is a dropout mask of shape (..., L, S)."""
    group = q.shape[-3] // k.shape[-3] if q.dim() >= 3 else 1
    if group > 1:
        k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    L, S = s.shape[-2:]
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    empty = (s == float("-inf")).all(-1, keepdim=True)
    probs = torch.softmax(torch.where(empty, 0.0, s), -1) * ~empty
    if keep is not None:
        probs = probs * keep / (1.0 - p)
    return probs @ v
