"""fastdl.backend: the choice of path, forced backends and their errors, life without Triton."""

import os
import subprocess
import sys

import pytest
import torch

import fastdl
from fastdl import backend


def test_auto_resolves_cpu_tensor_to_interpreter_or_torch(monkeypatch):
    monkeypatch.delenv("FASTDL_BACKEND", raising=False)
    expected = "interpret" if backend.triton_available() and backend.interpreter_active() else "torch"
    assert backend.resolve(torch.zeros(2)) == expected


def test_env_var_and_use_override(monkeypatch):
    monkeypatch.setenv("FASTDL_BACKEND", "torch")
    assert backend.requested() == "torch"
    assert backend.resolve(torch.zeros(2)) == "torch"
    with backend.use("auto"):
        assert backend.requested() == "auto"
        with backend.use("torch"):
            assert backend.requested() == "torch"
        assert backend.requested() == "auto"
    assert backend.requested() == "torch"


def test_invalid_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="use"):
        with backend.use("cuda"):
            pass
    monkeypatch.setenv("FASTDL_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTDL_BACKEND"):
        backend.resolve(torch.zeros(1))


def test_forced_triton_needs_cuda_tensor():
    with backend.use("triton"), pytest.raises(backend.BackendError, match="CUDA|interpret|Triton"):
        backend.resolve(torch.zeros(1))


def test_select_explains_unsupported_calls():
    x = torch.zeros(1)
    with backend.use("torch"):
        assert backend.select("op", x, unsupported="head dim 512") == "torch"
    if backend.interpreter_active() and backend.triton_available():
        with backend.use("auto"):
            assert backend.select("op", x, unsupported="head dim 512") == "torch"
        with backend.use("interpret"), pytest.raises(backend.BackendError, match="head dim 512"):
            backend.select("op", x, unsupported="head dim 512")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDL_BACKEND")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=300)


def test_import_and_run_without_triton():
    """Triton absent (macOS, Windows): fastdl imports and serves on the torch path; forcing a
    kernel backend says why it cannot."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastdl\n"
        "x = torch.randn(3, 8, requires_grad=True)\n"
        "fastdl.nn.LayerNorm(8)(x).sum().backward()\n"
        "print(fastdl.backend.resolve(x))\n"
        "with fastdl.backend.use('interpret'):\n"
        "    try:\n"
        "        fastdl.functional.layer_norm(x, (8,))\n"
        "    except fastdl.backend.BackendError as e:\n"
        "        print('error:', e)\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "torch"
    assert "Triton is not installed" in lines[1]


@pytest.mark.skipif(not backend.triton_available(), reason="Triton is not installed")
def test_env_interpret_turns_the_interpreter_on():
    code = ("import torch, fastdl, os\n"
            "x = torch.randn(2, 8)\n"
            "print(fastdl.backend.resolve(x), os.environ.get('TRITON_INTERPRET'))\n"
            "y = fastdl.functional.layer_norm(x, (8,))\n"
            "print(torch.allclose(y, torch.nn.functional.layer_norm(x, (8,)), atol=1e-5))\n")
    result = _run(code, FASTDL_BACKEND="interpret")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["interpret", "1", "True"]


@pytest.mark.skipif(not backend.triton_available(), reason="Triton is not installed")
def test_interpret_after_triton_compiled_mode_raises():
    code = ("import triton, torch, fastdl\n"
            "with fastdl.backend.use('interpret'):\n"
            "    fastdl.functional.layer_norm(torch.randn(2, 8), (8,))\n")
    result = _run(code)
    assert result.returncode != 0
    assert "BackendError" in result.stderr and "TRITON_INTERPRET" in result.stderr


def test_version():
    assert isinstance(fastdl.__version__, str) and fastdl.__version__.count(".") == 2
