"""Fused linear + cross-entropy: PyTorch (eager, compiled), Liger and fastdl -- time and peak memory.

    python -m pytest benchmarks/test_cross_entropy.py -q --benchmark-group-by=group

The loss of ``cross_entropy(linear(hidden, weight, bias), target)`` at an MLM head's shape (on a
GPU: 16 x 512 tokens, 768 hidden, BERT's 30,522-word vocabulary, bf16; on a CPU a smaller one).
Each implementation's ``extra_info`` carries ``peak_MiB``, the memory one forward + backward
allocates above what existed before it (gradients included): ``torch.cuda.max_memory_allocated``
on a GPU, the running total of the allocations that ``torch.profiler`` records on a CPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as TF

import fastdl.functional as F
from benchmarks.conftest import CUDA, DEVICE, DTYPE_NAMES, fastdl_backend_for, make_step

TOKENS, HIDDEN, VOCAB = (16 * 512, 768, 30522) if CUDA else (2048, 64, 8000)
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _liger(hidden, weight, bias, target):
    try:
        module = importlib.import_module("liger_kernel.transformers")
    except ImportError:
        pytest.skip("liger_kernel is not installed")
    return module.LigerFusedLinearCrossEntropyLoss()(weight, hidden, target, bias)


IMPLS: dict[str, Callable] = {
    "torch": lambda h, w, b, t: TF.cross_entropy(TF.linear(h, w, b), t),
    "fastdl": lambda h, w, b, t: F.linear_cross_entropy(h, w, t, b),
    "liger_kernel": _liger,
}
if CUDA:
    IMPLS["torch.compile"] = torch.compile(IMPLS["torch"])


def peak_mib(step: Callable[[], None]) -> float:
    """MiB allocated at the peak of ``step()`` above the memory in use before it."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


@pytest.mark.parametrize("impl", list(IMPLS))
def test_linear_cross_entropy(bench, impl):
    hidden = torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN, device=DEVICE) * HIDDEN ** -0.5).to(DTYPE).requires_grad_()
    bias = torch.zeros(VOCAB, device=DEVICE, dtype=DTYPE, requires_grad=True)
    target = torch.randint(0, VOCAB, (TOKENS,), device=DEVICE)
    fn = IMPLS[impl]
    step = make_step(lambda: fn(hidden, weight, bias, target), "fwd+bwd", leaves=(hidden, weight, bias))
    step()  # warm-up: compilation and autotuning stay out of the memory figure
    for leaf in (hidden, weight, bias):
        leaf.grad = None
    peak = peak_mib(step)
    flops = 6.0 * TOKENS * HIDDEN * VOCAB
    bench(step, group=f"linear_cross_entropy {TOKENS}x{HIDDEN} -> {VOCAB} {DTYPE_NAMES[DTYPE]} fwd+bwd "
                      f"({flops / 1e9:.0f} GFLOP)",
          impl=impl, backend=fastdl_backend_for(hidden) if impl == "fastdl" else "torch",
          peak_MiB=round(peak, 1), flops=flops)
