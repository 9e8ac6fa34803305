"""Every example runs end to end (tiny sizes), so none of them rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# The examples pick CUDA when there is one (and so fastdl's compiled kernels), else the CPU.
BACKEND = "triton" if torch.cuda.is_available() else "torch"


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _run(script: str, *args: str, timeout: float = 120) -> str:
    # The PyTorch path: the examples are smoke-tested here, the kernels by their own tests.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDL_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest, and CI runs tests side by side
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_example_is_smoke_tested():
    tested = {"quickstart.py", "train_bert_mlm.py", "train_vit.py", "translate_toy.py",
              "bert_from_checkpoint.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_quickstart():
    out = _run("quickstart.py")
    assert f"LayerNorm ran on the '{BACKEND}' backend" in out
    for module in ("RMSNorm", "BatchNorm2d", "Embedding", "MultiheadAttention", "TransformerEncoderLayer",
                   "Dropout"):
        assert module in out
    assert "reproducible with torch.manual_seed: True" in out


def test_train_bert_mlm_checkpoint_and_resume(tmp_path):
    checkpoint = tmp_path / "bert.pt"
    common = ["--max-chars", "20000", "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32",
              "--hidden", "32", "--heads", "2", "--checkpoint", str(checkpoint), "--eval-every", "2"]
    out = _run("train_bert_mlm.py", "--steps", "2", *common)
    assert checkpoint.exists()
    assert "held-out masked-token loss" in out
    assert ("wordpiece" if _importable("tokenizers") else "char") + " vocabulary" in out
    out = _run("train_bert_mlm.py", "--steps", "3", "--no-progress", *common)
    assert "resumed from" in out and "at step 2" in out
    assert "over steps 2-3" in out


def test_train_bert_mlm_char_tokenizer():
    out = _run("train_bert_mlm.py", "--steps", "1", "--tokenizer", "char", "--max-chars", "5000",
               "--batch-size", "2", "--seq-len", "16", "--hidden", "32", "--heads", "2",
               "--label-smoothing", "0.1", "--schedule", "cosine", "--no-progress")
    assert "char vocabulary" in out


@pytest.mark.parametrize("extra", [[], ["--mixup", "0.2"]], ids=["plain", "mixup"])
def test_train_vit(tmp_path, extra):
    pytest.importorskip("sklearn", reason="the digits come with scikit-learn (pip install -e '.[examples]')")
    plot = tmp_path / "curves.png"
    out = _run("train_vit.py", "--steps", "2", "--epochs", "1", "--hidden", "32", "--layers", "1",
               "--plot", str(plot), *extra)
    assert "held-out accuracy after 1 epochs" in out
    if _importable("matplotlib"):
        assert plot.exists() and plot.stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in out


def test_translate_toy():
    out = _run("translate_toy.py", "--steps", "3", "--eval-size", "8", "--eval-every", "2", "--d-model", "32")
    assert "exact match on 8 held-out sequences" in out
    assert "->" in out  # decoded samples


def test_bert_from_checkpoint():
    _run("bert_from_checkpoint.py", "--steps", "1")
