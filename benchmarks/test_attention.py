"""Scaled dot-product attention: PyTorch vs fastdl, forward and forward + backward.

    python -m pytest benchmarks/test_attention.py -q -s --benchmark-group-by=group

Each group holds one shape, dtype, causality and mode, timed for ``torch``
(``torch.nn.functional.scaled_dot_product_attention``: FlashAttention / memory-efficient kernels on
a GPU) and ``fastdl`` (the fused Triton kernels on CUDA, the PyTorch path on a CPU, where the
numbers show fastdl's per-call overhead). The group name carries the matmul FLOPs of one step
(forward 4 * B * H * L * S * D, backward 2.5x that, halved when causal), so ``FLOPs / mean time``
is the achieved throughput; it is also in each result's ``extra_info``.

``test_first_call`` times the first forward and the first backward of a fresh configuration:
autotuning over the config list plus compiling (or loading from Triton's cache) every candidate.
It prints a table and records the seconds in ``extra_info`` (``first fwd s``, ``first bwd s``).
The kernels' launchers take plain tensors, for a GPU runner that wants them without autograd::

    o, lse = fastdl.kernels.attention.attention_fwd(q, k, v, is_causal=True)
    dq, dk, dv, _ = fastdl.kernels.attention.attention_bwd(do, q, k, v, o, lse, is_causal=True)
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as TF

import fastdl
import fastdl.functional as F
from benchmarks.conftest import CUDA, DEVICE, DTYPE_NAMES, fastdl_backend_for, make_step, shape_id, sync

# (B, H, L, D), self-attention (S = L): training shapes on a GPU, small ones on a CPU.
SHAPES = ([(8, 16, 1024, 64), (4, 16, 4096, 64), (4, 16, 2048, 128), (2, 8, 2048, 256)] if CUDA
          else [(2, 4, 128, 64), (1, 8, 256, 32)])
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32]
MODES = ["fwd", "fwd+bwd"]

IMPLS = {
    "torch": lambda q, k, v, causal: TF.scaled_dot_product_attention(q, k, v, is_causal=causal),
    "fastdl": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
}


def _flops(shape, causal: bool, mode: str) -> float:
    B, H, L, D = shape
    fwd = 4.0 * B * H * L * L * D
    total = fwd if mode == "fwd" else 3.5 * fwd
    return total / 2 if causal else total


def _qkv(shape, dtype, requires_grad: bool):
    return [torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_first_call(benchmark, dtype):
    """Seconds of the first fused forward and backward per head dim: autotuning + compilation."""
    if fastdl.backend.resolve(torch.empty(0, device=DEVICE)) == "torch":
        pytest.skip("fastdl runs its PyTorch path here: nothing is compiled")
    attention = fastdl.backend.kernels("attention")
    rows = []
    for D in (64, 128, 256):
        q, k, v = _qkv((2, 4, 512 if CUDA else 32, D), dtype, requires_grad=False)
        attention._tuned.clear()  # forget earlier tuning: this call tunes (and compiles) again
        sync()
        start = time.perf_counter()
        o, lse = attention.attention_fwd(q, k, v, is_causal=True)
        sync()
        fwd = time.perf_counter() - start
        start = time.perf_counter()
        attention.attention_bwd(torch.randn_like(o), q, k, v, o, lse, is_causal=True)
        sync()
        bwd = time.perf_counter() - start
        rows.append((D, fwd, bwd))
        benchmark.extra_info[f"D={D} first fwd s"] = fwd
        benchmark.extra_info[f"D={D} first bwd s"] = bwd
    print(f"\nfirst call, autotuning + compilation ({DTYPE_NAMES[dtype]}, {fastdl_backend_for(q)}):")
    print(f"  {'head dim':>8}{'fwd s':>10}{'bwd s':>10}")
    for D, fwd, bwd in rows:
        print(f"  {D:>8}{fwd:>10.2f}{bwd:>10.2f}")
    benchmark.group = "attention first call"
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_attention(bench, shape, dtype, causal, mode, impl):
    q, k, v = _qkv(shape, dtype, requires_grad=mode == "fwd+bwd")
    fn = IMPLS[impl]
    step = make_step(lambda: fn(q, k, v, causal), mode, leaves=(q, k, v))
    flops = _flops(shape, causal, mode)
    group = (f"attention {shape_id(shape)} {DTYPE_NAMES[dtype]} {'causal' if causal else 'full'} {mode} "
             f"({flops / 1e9:.1f} GFLOP)")
    bench(step, group=group, impl=impl, backend="torch" if impl == "torch" else fastdl_backend_for(q),
          flops=flops)
