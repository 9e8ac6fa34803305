"""fastdl.backend: the choice of path, forced backends and their errors, life without Triton."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_top_level_kernels_is_not_this_repository(tmp_path):
    """Run from the repository root (``python -m pytest``, ``python -c``), Python sees kernels/ as
    a top-level ``kernels``: the name of Hugging Face's package, which transformers >= 5.25 imports.
    The folder hands that import to the installed package (here a stand-in on PYTHONPATH, behind
    the root), submodules included, and is still fastdl.kernels; with none installed the import
    fails as Python's would."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("WHO = 'hub'\n")
    (tmp_path / "kernels" / "layer.py").write_text("from kernels import WHO\n")
    code = (
        "import sys; assert sys.path[0] == '', sys.path[0]\n"  # the root is on the path, first
        "import kernels, kernels.layer, fastdl.kernels.utils as u\n"
        "print(kernels.WHO, kernels.layer.WHO, kernels.__file__, u.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDL_BACKEND")}
    run = lambda c, **e: subprocess.run([sys.executable, "-c", c], cwd=root, capture_output=True, text=True,
                                        env=dict(env, **e), timeout=300)
    result = run(code, PYTHONPATH=str(tmp_path))
    assert result.returncode == 0, result.stderr
    hub = str(tmp_path / "kernels" / "__init__.py")
    assert result.stdout.split() == ["hub", "hub", hub, "fastdl.kernels.utils"]

    # Without the stand-in: the installed package if there is one (transformers >= 5.25 brings it), else
    # the error of a missing module -- never this folder under the name.
    result = run("import kernels; print(kernels.__file__)")
    if result.returncode == 0:
        assert not Path(result.stdout.strip()).is_relative_to(root / "kernels"), result.stdout
    else:
        assert "ModuleNotFoundError: No module named 'kernels'" in result.stderr
        assert "is fastdl.kernels" in result.stderr


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
