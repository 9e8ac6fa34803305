"""Shared fixtures: every op test runs once per backend.

Without a GPU, Triton's interpreter is switched on *before* anything imports Triton, so the
``interpret`` tests execute the real kernels on CPU tensors. With a GPU the kernels are compiled
instead, the ``triton`` tests run on CUDA tensors and the ``interpret`` ones skip (Triton fixes
one mode per process).
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastdl  # noqa: E402  (after TRITON_INTERPRET)

HAS_CUDA = torch.cuda.is_available()

# Under pytest-xdist every worker is its own process; one intra-op thread each keeps the
# workers from oversubscribing the cores (many tiny ops then stall on thread hand-offs).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# The tests compare float32 results with float64 references at float32 tolerances: no TF32 in
# cuDNN's convolutions (on by default in PyTorch; its matmuls' is off by default).
if HAS_CUDA:
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def _unavailable(name: str) -> str | None:
    if name == "torch":
        return None
    if not fastdl.backend.triton_available():
        return "Triton is not installed"
    if name == "interpret" and not fastdl.backend.interpreter_active():
        return "Triton runs compiled in this process (a GPU is present), not interpreted"
    if name == "triton" and (not HAS_CUDA or fastdl.backend.interpreter_active()):
        return "needs a CUDA GPU with compiled Triton kernels"
    return None


@pytest.fixture(params=["torch", "interpret", pytest.param("triton", marks=pytest.mark.cuda)])
def backend(request):
    """The backend name, active for the duration of the test (``fastdl.backend.use``)."""
    reason = _unavailable(request.param)
    if reason:
        pytest.skip(reason)
    with fastdl.backend.use(request.param):
        yield request.param


@pytest.fixture
def device(backend):
    """Where the test's tensors live for its backend."""
    return "cuda" if backend == "triton" else "cpu"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh but reproducible random inputs per test (seeded by the test's id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _attention_argument(monkeypatch, name: str) -> list:
    """The keyword argument ``name`` of every fastdl.functional.scaled_dot_product_attention call
    from now on (None where not given), appended as the calls come."""
    seen = []
    real = fastdl.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get(name))
        return real(*args, **kwargs)

    monkeypatch.setattr(fastdl.functional, "scaled_dot_product_attention", spy)
    return seen


@pytest.fixture
def attention_masks(monkeypatch):
    """The attn_mask of every fastdl.functional.scaled_dot_product_attention call."""
    return _attention_argument(monkeypatch, "attn_mask")


@pytest.fixture
def attention_dropout(monkeypatch):
    """The dropout_p of every fastdl.functional.scaled_dot_product_attention call."""
    return _attention_argument(monkeypatch, "dropout_p")
