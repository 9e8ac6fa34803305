"""LayerNorm and RMSNorm: PyTorch vs fastdl, forward and forward + backward.

    python -m pytest benchmarks/test_layer_norm.py -q --benchmark-group-by=group

Each group holds one op, size, dtype and mode, timed for ``torch`` (``torch.nn.functional``) and
``fastdl`` (``fastdl.functional``: the Triton kernels on CUDA, the PyTorch path on a CPU). The
group name also carries the bytes one step moves (each tensor read or written once: forward reads
x and writes y; backward reads x and dy and writes dx; weights and per-row statistics are small
and left out), so ``bytes / mean time`` is the achieved bandwidth.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastdl.functional as F
from benchmarks.conftest import CUDA, DEVICE, DTYPE_NAMES, fastdl_backend_for, make_step, shape_id

# (rows, hidden): Transformer activations on a GPU; smaller on a CPU, where the point is overhead.
SHAPES = [(4096, 1024), (4096, 4096), (16384, 2048)] if CUDA else [(512, 1024), (2048, 768)]
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]
MODES = ["fwd", "fwd+bwd"]

OPS = {
    "layer_norm": {
        "torch": lambda x, w, b: TF.layer_norm(x, (x.shape[-1],), w, b),
        "fastdl": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b),
    },
    "rms_norm": {
        "torch": lambda x, w, b: TF.rms_norm(x, (x.shape[-1],), w),
        "fastdl": lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w),
    },
}


def _bytes(shape, dtype, mode) -> int:
    elements = shape[0] * shape[1] * (2 if mode == "fwd" else 5)
    return elements * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("impl", ["torch", "fastdl"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("op", list(OPS))
def test_norm(bench, op, shape, dtype, mode, impl):
    grad = mode == "fwd+bwd"
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=grad)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE, dtype=dtype)).requires_grad_(grad)
    b = (0.1 * torch.randn(shape[-1], device=DEVICE, dtype=dtype)).requires_grad_(grad)
    fn = OPS[op][impl]
    step = make_step(lambda: fn(x, w, b), mode, leaves=(x, w, b))
    moved = _bytes(shape, dtype, mode)
    bench(step, group=f"{op} {shape_id(shape)} {DTYPE_NAMES[dtype]} {mode} ({moved / 2**20:.0f} MiB moved)",
          impl=impl, backend="torch" if impl == "torch" else fastdl_backend_for(x), bytes=moved)
