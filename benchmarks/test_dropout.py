"""Dropout and the fused dropout + residual + LayerNorm: PyTorch vs fastdl, forward + backward.

Run with ``python -m pytest benchmarks/test_dropout.py`` (pytest-benchmark). On a CUDA machine
fastdl runs its compiled kernels; on a CPU it runs whatever backend resolves there (PyTorch, or the
Triton interpreter when ``TRITON_INTERPRET=1``), so CPU timings mostly show fastdl's overhead.
Each group puts the two implementations of one op and size side by side.

``test_saved_bytes_per_element`` measures what autograd keeps for the backward, per input element:
PyTorch's dropout saves its mask (1 byte on CUDA, a full noise tensor on CPU); fastdl saves nothing
but the seed. It prints a table and records the numbers in the benchmark's ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from helpers import saved_bytes

import fastdl
import fastdl.functional as F

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETED = not CUDA and fastdl.backend.resolve(torch.empty(0)) == "interpret"
# Rows x hidden size: a Transformer activation on a GPU, smaller on a CPU (tiny under the
# interpreter, which runs kernels one program at a time).
SHAPES = [(8192, 1024), (2048, 4096)] if CUDA else ([(64, 256)] if INTERPRETED else [(1024, 1024)])
DTYPES = [torch.float16, torch.float32] if CUDA else [torch.float32]
P = 0.1


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _torch_add_norm(x, residual, weight, bias, p):
    pre = residual + TF.dropout(x, p)
    return TF.layer_norm(pre, (x.shape[-1],), weight, bias), pre


def _fastdl_add_norm(x, residual, weight, bias, p):
    return F.dropout_add_layer_norm(x, residual, weight, bias, p)


OPS = {
    "dropout": {"torch": lambda x, r, w, b, p: (TF.dropout(x, p),),
                "fastdl": lambda x, r, w, b, p: (F.dropout(x, p),)},
    "dropout_add_layer_norm": {"torch": _torch_add_norm, "fastdl": _fastdl_add_norm},
}


def _inputs(shape, dtype):
    n = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    r = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=True)
    b = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=True)
    return x, r, w, b


@pytest.mark.parametrize("impl", ["torch", "fastdl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(OPS))
def test_forward_backward(benchmark, op, shape, dtype, impl):
    fn = OPS[op][impl]
    x, r, w, b = _inputs(shape, dtype)
    grads = [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(2)]

    def step():
        outs = fn(x, r, w, b, P)
        torch.autograd.backward(outs, grads[:len(outs)])
        _sync()

    benchmark.group = f"{op} {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} fwd+bwd"
    benchmark.extra_info["backend"] = "torch" if impl == "torch" else fastdl.backend.resolve(x)
    step()  # warm-up: compilation / first-call costs stay out of the timing
    benchmark(step)



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saved_bytes_per_element(benchmark, dtype):
    """Bytes autograd saves for the backward of dropout, per element: PyTorch vs fastdl.

    The fused op is measured too: it saves pre_norm_sum (an output the caller keeps anyway as the
    next residual) and two float32 statistics per row, where the unfused composition adds the mask.
    """
    shape = SHAPES[0]
    x, r, w, b = _inputs(shape, dtype)
    numel = x.numel()
    rows = []
    for op, impls in OPS.items():
        per_element = {impl: saved_bytes(fn, x, r, w, b, P) / numel for impl, fn in impls.items()}
        rows.append((op, per_element["torch"], per_element["fastdl"]))
        benchmark.extra_info[f"{op} saved bytes/element torch"] = per_element["torch"]
        benchmark.extra_info[f"{op} saved bytes/element fastdl"] = per_element["fastdl"]
    if CUDA:  # memory still allocated after the forward: outputs + what the backward needs
        for op, impls in OPS.items():
            for impl, fn in impls.items():
                _sync()
                before = torch.cuda.memory_allocated()
                outs = fn(x, r, w, b, P)
                _sync()
                benchmark.extra_info[f"{op} retained bytes/element {impl}"] = (
                    (torch.cuda.memory_allocated() - before) / numel)
                del outs
    backend = fastdl.backend.resolve(x)
    print(f"\nsaved for backward, bytes per element ({str(dtype).removeprefix('torch.')}, {DEVICE}):")
    print(f"  {'op':<24}{'torch':>8}{'fastdl (' + backend + ')':>20}")
    for op, t, f in rows:
        print(f"  {op:<24}{t:>8.3f}{f:>20.3f}")
    if backend != "torch":
        assert rows[0][2] == 0.0, "fastdl's dropout must save nothing but its seed"
    benchmark.group = "saved bytes per element"
    benchmark.pedantic(lambda: saved_bytes(OPS["dropout"]["fastdl"], x, r, w, b, P), rounds=1)
