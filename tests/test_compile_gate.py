"""The compiled path, checked on a CPU.

- The ahead-of-time compile gate (``-m aot``; minutes, so CI runs it by name): every kernel, every
  config and every constexpr branch compiled for sm_90a and sm_80 by ``benchmarks.compile_report
  --cover --check`` (compile errors, shared memory, fp16/bf16 spills, wgmma, vector loads).
- Per-call integers (seeds, sequence lengths, row counts) do not trigger recompiles: the launches
  of calls that differ only in them make the same compile requests as one call.
- Two processes with configs pinned give bitwise-equal gradients.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiled_env(**extra):
    """The environment of a child process that runs Triton compiled (no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDL_BACKEND")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env | extra


def _run(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.aot
def test_compile_gate(tmp_path):
    """Every config and constexpr branch of every kernel compiles for sm_90a and sm_80 within the
    targets' limits, fp16/bf16 without spills, attention on wgmma, memory-bound loads vectorised.
    Findings measured but not fixed yet are listed in benchmarks/results/compile-known-findings.txt:
    they are printed, and only a new one fails."""
    cache = os.environ.get("TRITON_CACHE_DIR", os.path.join(ROOT, ".triton-cache"))
    env = _compiled_env(TRITON_CACHE_DIR=cache)
    report = tmp_path / "compile.json"
    jobs = os.environ.get("FASTDL_COMPILE_JOBS", str(os.cpu_count()))
    targets = os.environ.get("FASTDL_COMPILE_TARGETS", "sm_90a,sm_80")
    families = os.environ.get("FASTDL_COMPILE_FAMILIES", "").split()  # default: every kernel file
    known = os.path.join(ROOT, "benchmarks", "results", "compile-known-findings.txt")
    out = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--cover", "--check",
                          "--targets", targets, "--jobs", jobs, "--known", known, "--out", str(report)]
                         + (["--families", *families] if families else []),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    print(out.stdout[-20000:])
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    summary = json.loads(report.read_text())["summary"]
    # Every kernel file: all 20-odd kernels; a subset of files (FASTDL_COMPILE_FAMILIES): some.
    assert summary["compile_errors"] == 0 and summary["kernels"] >= (1 if families else 20), summary


def test_per_call_integers_do_not_recompile():
    """Attention, dropout, norms and embeddings called with other seeds and other sequence lengths
    and row counts (1, multiples of 16, odd; within one tile class) make exactly the compile
    requests of one call: no value-dependent specialisation, no recompiles."""
    code = """
        import torch
        from benchmarks import compile_report
        from fastdl.kernels import attention, dropout, layer_norm, embedding

        def calls(n, seed):
            seed = torch.tensor([seed], dtype=torch.int64)  # the kernels load the seed from memory
            q = torch.randn(1, 2, n, 64, dtype=torch.float16)
            o, lse = attention.attention_fwd(q, q, q, None, True, None, 0.1, seed)
            attention.attention_bwd(o, q, q, q, o, lse, None, True, None, 0.1, seed)
            dropout.dropout_fwd(torch.randn(n, 64), 0.2, seed)
            x = torch.randn(n, 768)
            y, mean, rstd = layer_norm.layer_norm_fwd(x, None, None, 1e-5)
            layer_norm.layer_norm_bwd(x, x, None, mean, rstd, False)
            out, pre, mean, rstd = layer_norm.dropout_add_layer_norm_fwd(x, x, None, None, 0.1, 1e-5, seed)
            idx = torch.randint(0, 10, (n,))
            embedding.embedding_fwd(idx, torch.randn(10, 768))

        def requests(*cases):
            from benchmarks import compile_specs
            compile_specs.SPECS.clear()
            compile_specs.SPECS["probe"] = lambda: [calls(n, seed) for n, seed in cases]
            return compile_report.record_launches("sm_90a")

        one = requests((77, 5))
        many = requests((77, 5), (16, 1), (64, 16), (129, 2**31 - 1), (300, 48))
        print(len(one), len(many))
        assert len(one) == len(many), [r["kernel"] for r in many]
    """
    _run(code, _compiled_env())


def test_float_scalars_reach_float64_kernels_as_float64():
    """Every float scalar argument (eps, momentum, the dropout scale) of every launch the compile
    specs make is typed float64 in the compiled signature: an untyped Python float is float32,
    which rounds eps and 1 / (1 - p) in float64 kernels (relative error ~5e-8). The gate checks
    that fp16/bf16/fp32 launches still compute nothing in float64. Attention, which has no float64
    kernel, is left out."""
    code = """
        from benchmarks import compile_report
        families = ["layer_norm", "dropout", "batch_norm", "embedding", "cross_entropy"]
        records = compile_report.record_launches("sm_90a", families)
        assert any(r["dtype"] == "fp64" for r in records)
        scalars = {(r["kernel"], name, ty) for r in records for name, ty in r["signature"].items()
                   if ty in ("fp16", "bf16", "fp32", "fp64")}
        assert scalars, "no float scalar argument recorded"
        bad = sorted(s for s in scalars if s[2] != "fp64")
        assert not bad, bad
        print(sorted(scalars))
    """
    _run(code, _compiled_env())


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_gradients_bitwise_equal_across_processes(dev):
    """Attention, LayerNorm, BatchNorm and embedding gradients from two processes, configs pinned,
    are bitwise equal (no atomics, fixed summation orders): compiled kernels on a GPU, the
    interpreter on a CPU."""
    code = """
        import sys, torch
        import fastdl, fastdl.functional as F
        dev = sys.argv[2]
        cuda = dev == "cuda"
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 70, 40, device=dev, requires_grad=True) for _ in range(3))
        x = torch.randn(300, 96, device=dev, requires_grad=True)
        img = torch.randn(6, 5, 7, 7, device=dev, requires_grad=True)
        w = torch.randn(50, 32, device=dev, requires_grad=True)
        with fastdl.backend.use("triton" if cuda else "interpret"):
            loss = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True).square().sum()
            loss = loss + F.layer_norm(x, (96,)).pow(3).sum()
            loss = loss + F.batch_norm(img, None, None, training=True).pow(3).sum()
            loss = loss + F.embedding(torch.randint(0, 50, (400,), device=dev), w).pow(3).sum()
            loss.backward()
        torch.save([t.grad for t in (q, k, v, x, img, w)], sys.argv[1])
    """
    env = dict(os.environ, FASTDL_AUTOTUNE="1", PYTHONPATH=ROOT)
    if dev == "cpu":
        env["TRITON_INTERPRET"] = "1"
    grads = []
    for i in range(2):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastdl-grads-{os.getpid()}-{i}.pt")
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), path, dev], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        grads.append(torch.load(path))
        os.remove(path)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
