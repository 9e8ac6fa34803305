"""Shared pieces of the pytest-benchmark files: the device, synchronisation, running a callable
under a chosen fastdl backend, and one fixture that times a step with its group and metadata set.

    python -m pytest benchmarks -q --benchmark-group-by=group

Every benchmark puts its implementations of one op, size, dtype and mode in one *group*, so
pytest-benchmark prints them in one table, side by side. On a CUDA machine fastdl runs its
compiled kernels; on a CPU it runs its PyTorch path (Triton's interpreter is not switched on here:
it proves kernels, it does not time them), so CPU numbers mostly show fastdl's per-call overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import fastdl
from benchmarks import ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def sync() -> None:
    """Wait for queued GPU work, so a timing covers the kernels and not just their launch."""
    if CUDA:
        torch.cuda.synchronize()


def run_under(backend: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` with fastdl forced onto ``backend`` ("torch", "triton", "interpret"
    or "auto") for the duration of the call."""
    with fastdl.backend.use(backend):
        return fn(*args, **kwargs)


def make_step(forward: Callable[[], Any], mode: str,
              leaves: Sequence[torch.Tensor] = ()) -> Callable[[], None]:
    """One timed step: the forward (``mode="fwd"``, under no_grad) or forward and backward
    (``"fwd+bwd"``; output gradients drawn once, the leaves' ``.grad`` dropped before each step so
    accumulation stays out of the timing), then a device synchronisation."""
    step = ops.make_step(forward, mode, leaves)

    def synced_step() -> None:
        step()
        sync()

    return synced_step


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def bench(benchmark):
    """``bench(step, group=..., impl=..., backend=..., **extra)``: warm up once (compilation and
    autotuning stay out of the numbers), then time ``step`` with pytest-benchmark."""

    def run(step: Callable[[], None], *, group: str, impl: str, backend: str, **extra) -> None:
        benchmark.group = group
        benchmark.extra_info.update(impl=impl, backend=backend, device=DEVICE, **extra)
        step()
        benchmark(step)

    return run


def fastdl_backend_for(tensor: torch.Tensor) -> str:
    """The backend fastdl's call on ``tensor`` takes, for the benchmark's metadata."""
    return fastdl.backend.resolve(tensor)


def shape_id(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))
