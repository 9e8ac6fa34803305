"""BatchNorm: PyTorch vs fastdl, training forward, forward + backward, and evaluation forward.

    python -m pytest benchmarks/test_batch_norm.py -q --benchmark-group-by=group

Each group holds one size, memory format, dtype and mode, timed for ``torch``
(``torch.nn.functional.batch_norm``) and ``fastdl`` (``fastdl.functional.batch_norm``: the Triton
kernels on CUDA, the PyTorch path on a CPU). Training steps update the running buffers in place,
as a module's forward does. The group name carries the bytes one step moves (each activation
tensor read or written once: forward reads x and writes y; backward reads x and dy and writes
dx; per-channel vectors are small and left out), so ``bytes / mean time`` is the achieved
bandwidth -- the kernels read x twice in training (statistics, then normalisation), so they top
out below it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastdl.functional as F
from benchmarks.conftest import CUDA, DEVICE, DTYPE_NAMES, fastdl_backend_for, make_step, shape_id

# (N, C, H, W) conv activations and (N, C) MLP activations; smaller on a CPU (overhead only).
SHAPES = ([(64, 64, 56, 56), (128, 256, 14, 14), (8192, 1024)] if CUDA
          else [(16, 32, 28, 28), (512, 256)])
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]
MODES = ["train fwd", "train fwd+bwd", "eval fwd"]
IMPLS = {"torch": TF.batch_norm, "fastdl": F.batch_norm}


def _bytes(shape, dtype, mode) -> int:
    elements = 1
    for s in shape:
        elements *= s
    return elements * (5 if mode.endswith("bwd") else 2) * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_batch_norm(bench, shape, dtype, channels_last, mode, impl):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a 4-D memory format")
    C = shape[1]
    grad = mode.endswith("bwd")
    training = mode.startswith("train")
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(grad)
    w = (1 + 0.1 * torch.randn(C, device=DEVICE, dtype=dtype)).requires_grad_(grad)
    b = (0.1 * torch.randn(C, device=DEVICE, dtype=dtype)).requires_grad_(grad)
    running_mean = torch.zeros(C, device=DEVICE, dtype=dtype)
    running_var = torch.ones(C, device=DEVICE, dtype=dtype)
    fn = IMPLS[impl]
    step = make_step(lambda: fn(x, running_mean, running_var, w, b, training, 0.1, 1e-5),
                     "fwd+bwd" if grad else "fwd", leaves=(x, w, b))
    moved = _bytes(shape, dtype, mode)
    layout = "channels_last" if channels_last else "contiguous"
    bench(step, group=f"batch_norm {shape_id(shape)} {layout} {DTYPE_NAMES[dtype]} {mode} "
                      f"({moved / 2**20:.0f} MiB moved)",
          impl=impl, backend="torch" if impl == "torch" else fastdl_backend_for(x), bytes=moved)
