"""``python -m benchmarks.run --quick`` runs end to end on a CPU and writes a well-formed report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import ops, run  # noqa: E402


def _report(out: Path) -> dict:
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_quick_run_writes_json_markdown_and_plot(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDL_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu",
                           "--ops", "layer_norm", "attention", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _report(tmp_path)

    meta = report["meta"]
    for key in ("device", "gpu", "driver", "torch", "triton", "cuda", "date", "peers"):
        assert key in meta
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert report["ceilings"]["GB/s"] > 0 and report["ceilings"]["TFLOP/s"] > 0
    assert set(report["ops"]) == {"layer_norm", "attention"}

    for op, unit in (("layer_norm", "GB/s"), ("attention", "TFLOP/s")):
        entry = report["ops"][op]
        assert entry["status"] == "ok"
        assert entry["first_call_s"] > 0
        modes = {c["mode"] for c in entry["cases"]}
        assert modes == {"fwd", "fwd+bwd"}
        for case in entry["cases"]:
            assert case["unit"] == unit and case["work"] > 0
            assert "compile" not in case["results"]  # torch.compile is skipped on a CPU
            fast, eager = case["results"]["fastdl"], case["results"]["eager"]
            assert fast["status"] == eager["status"] == "ok", case
            assert fast["backend"] == "torch"
            for res in (fast, eager):
                assert res["ms"] > 0 and res["reps"] >= 3
                ceiling = report["ceilings"][unit]
                expected = case["work"] / res["ms"] / (1e6 if unit == "GB/s" else 1e9)
                assert res["throughput"] == pytest.approx(expected)
                assert res["fraction_of_ceiling"] == pytest.approx(expected / ceiling)
            assert case["fastdl_speedup"]["eager"] == pytest.approx(eager["ms"] / fast["ms"])

    attention = report["ops"]["attention"]["cases"]
    causal = [c for c in attention if c["params"]["causal"]]
    full = [c for c in attention if not c["params"]["causal"]]
    assert causal and full
    a, b = causal[0], next(c for c in full if c["params"]["seq"] == causal[0]["params"]["seq"]
                           and c["mode"] == causal[0]["mode"])
    assert a["work"] == pytest.approx(b["work"] / 2)

    md = next(tmp_path.glob("*.md")).read_text()
    assert "| mode | shape | impl |" in md and "#### attention" in md
    pngs = list(tmp_path.glob("*.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not pngs and "matplotlib is not importable" in proc.stdout
    else:
        assert len(pngs) == 1 and pngs[0].stat().st_size > 1000


def test_attention_flop_count():
    fwd = ops.attention_flops(2, 16, 1024, 1024, 128, causal=False, mode="fwd")
    assert fwd == 4 * 2 * 16 * 1024 * 1024 * 128
    assert ops.attention_flops(2, 16, 1024, 1024, 128, causal=False, mode="fwd+bwd") == 3.5 * fwd
    assert ops.attention_flops(2, 16, 1024, 1024, 128, causal=True, mode="fwd+bwd") == 1.75 * fwd


def test_missing_op_and_failing_implementation_are_reported(tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("kernel exploded")

    def missing_peer():
        raise ops.Unavailable("peer is not installed")

    def fine():
        x = torch.randn(64)
        return ops.Impl(lambda: x * 2)

    def flaky_cases(env):
        return [ops.Case("flaky", "fwd", "64 fp32", {}, "GB/s", 512.0, 64, "size", "flaky fwd",
                         {"fastdl": fine, "eager": broken, "peer": missing_peer})]

    monkeypatch.setitem(ops.OPS, "ghost", lambda env: [])
    monkeypatch.setitem(ops.REQUIRES, "ghost", ("functional", "ghost_op_that_does_not_exist"))
    monkeypatch.setitem(ops.OPS, "flaky", flaky_cases)
    monkeypatch.setitem(ops.REQUIRES, "flaky", ("functional", "layer_norm"))
    assert run.main(["--quick", "--device", "cpu", "--ops", "ghost", "flaky", "--out", str(tmp_path),
                     "--no-plot"]) == 0
    report = _report(tmp_path)
    ghost = report["ops"]["ghost"]
    assert ghost["status"] == "not available" and "ghost_op_that_does_not_exist" in ghost["reason"]
    (case,) = report["ops"]["flaky"]["cases"]
    assert case["results"]["fastdl"]["status"] == "ok"
    assert case["results"]["eager"] == {"status": "error", "reason": "RuntimeError: kernel exploded"}
    assert case["results"]["peer"] == {"status": "unavailable", "reason": "peer is not installed"}
    assert case["fastdl_speedup"] == {}
    assert "not available" in next(tmp_path.glob("*.md")).read_text()


def _one_case_op(monkeypatch, impls: dict) -> None:
    """An op "solo" of one case with the given implementations, and a second op after it."""
    monkeypatch.setitem(ops.OPS, "solo", lambda env: [
        ops.Case("solo", "fwd", "64 fp32", {}, "GB/s", 512.0, 64, "size", "solo fwd", dict(impls))])
    monkeypatch.setitem(ops.REQUIRES, "solo", ("functional", "layer_norm"))
    monkeypatch.setitem(ops.OPS, "after", lambda env: [
        ops.Case("after", "fwd", "64 fp32", {}, "GB/s", 512.0, 64, "size", "after fwd", {"fastdl": _fine})])
    monkeypatch.setitem(ops.REQUIRES, "after", ("functional", "layer_norm"))


def _fine():
    x = torch.randn(64)
    return ops.Impl(lambda: x * 2)


def test_a_stop_in_the_middle_of_a_case_keeps_what_it_measured(tmp_path, monkeypatch):
    def stopped():  # as SIGTERM (timeout) arrives while the third implementation runs
        raise run.Stopped("stopped by signal 15")

    _one_case_op(monkeypatch, {"fastdl": _fine, "eager": _fine, "peer": stopped, "never": _fine})
    assert run.main(["--quick", "--device", "cpu", "--ops", "solo", "after", "--out", str(tmp_path),
                     "--no-plot"]) == 3
    report = _report(tmp_path)
    (case,) = report["ops"]["solo"]["cases"]
    assert set(case["results"]) == {"fastdl", "eager"}
    assert case["results"]["fastdl"]["status"] == case["results"]["eager"]["status"] == "ok"
    assert case["fastdl_speedup"]["eager"] > 0
    assert report["stopped"] == "stopped by signal 15" and report["ops"]["after"]["cases"] == []
    assert not list(tmp_path.glob("*.partial"))


def test_a_sticky_cuda_error_stops_the_run_and_names_its_case(tmp_path, monkeypatch):
    def poisoned():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    _one_case_op(monkeypatch, {"fastdl": poisoned, "eager": _fine})
    assert run.main(["--quick", "--device", "cpu", "--ops", "solo", "after", "--out", str(tmp_path),
                     "--no-plot"]) == 4
    report = _report(tmp_path)
    (case,) = report["ops"]["solo"]["cases"]
    assert case["results"]["fastdl"]["fatal"] is True
    assert case["results"]["eager"] == {"status": "skipped", "reason": "not run after fastdl's CUDA error"}
    assert report["fatal"]["impl"] == "fastdl" and report["fatal"]["case"] == "64 fp32"
    assert "illegal memory access" in report["fatal"]["reason"]
    assert report["ops"]["after"]["cases"] == []


def test_headline_cases_first_with_each_op_s_modes_in_turn():
    def case(op, mode, label, priority=0):
        return ops.Case(op, mode, label, {}, "GB/s", 1.0, 1, "size", op, {}, priority=priority)

    queue = run.schedule({
        "attention": [case("attention", "fwd", "full"), case("attention", "fwd", "causal"),
                      case("attention", "fwd+bwd", "full"), case("attention", "fwd+bwd", "causal"),
                      case("attention", "fwd", "other", priority=1)],
        "norm": [case("norm", "fwd", "n"), case("norm", "fwd+bwd", "n")]})
    assert [(c.op, c.mode, c.label) for c in queue] == [
        ("attention", "fwd", "full"), ("norm", "fwd", "n"), ("attention", "fwd+bwd", "full"),
        ("norm", "fwd+bwd", "n"), ("attention", "fwd", "causal"), ("attention", "fwd+bwd", "causal"),
        ("attention", "fwd", "other")]


def test_peer_versions_come_from_their_distributions():
    assert run._version("pytest") == __import__("importlib.metadata").metadata.version("pytest")
    assert run._version("no_such_module_anywhere") is None
