"""Time fastdl against PyTorch eager, torch.compile and peer libraries, op by op, in one process.

    python -m benchmarks.run                      # every op, full shapes (a GPU machine)
    python -m benchmarks.run --ops attention layer_norm --out /tmp/bench
    python -m benchmarks.run --quick              # fewer shapes; on a CPU: tiny shapes
    python -m benchmarks.run --list               # the op names

What it does:

1. Measures the machine's own ceilings: a large device-to-device ``copy_`` (GB/s, counting the
   read and the write) and an 8192³ bf16 matmul (TFLOP/s). On a CPU: a float32 copy and a float32
   matmul of a size that takes well under a second.
2. For each op in :mod:`benchmarks.ops`, each shape and mode (forward, forward + backward, or a
   model's training step): builds every implementation — fastdl, PyTorch eager, ``torch.compile``
   of the eager code (CUDA only), and peers where importable (SDPA's flash and cuDNN backends,
   flash_attn, liger_kernel, apex, transformers) — times its first call (compilation and
   autotuning included), warms it up, and takes the median of timed repetitions: CUDA events
   with the L2 cache flushed before each one on a GPU, ``time.perf_counter`` on a CPU.
3. Reports per case: time, achieved GB/s or TFLOP/s, the fraction of the measured ceiling,
   fastdl's speed-up over each other implementation, and peak memory (the
   ``torch.cuda.max_memory_allocated`` rise during one step; CUDA only).
4. Writes ``<out>/<gpu>-<date>.json`` (machine, versions, ceilings, every number),
   ``<out>/<gpu>-<date>.md`` (the tables in markdown, to paste into benchmarks/README.md) and
   ``<out>/<gpu>-<date>.png`` (throughput against size, one panel per op and mode; skipped with
   a message when matplotlib is not importable). The JSON and markdown are rewritten after every
   implementation, so an interrupted run keeps what it measured; on SIGTERM (``timeout``) the
   runner stops timing, writes all three files and exits with status 3. A CUDA error that
   poisons the process (an illegal address, a device-side assert) stops the run too: the report
   names the case and implementation under ``"fatal"`` and the runner exits with status 4.

An op whose fastdl function has not landed is reported "not available"; an implementation that
fails (out of memory, unsupported shape, a missing peer) is recorded with its reason and the run
goes on. ``--budget SECONDS`` stops starting new cases after that long; headline cases (one
representative shape per op and mode) run first, so a short budget still covers every op.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import ops as ops_module
from benchmarks.ops import Case, Env, Impl, Unavailable

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PEERS = ("flash_attn", "liger_kernel", "apex", "transformers")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

class Timer:
    """Median time of a step, after warm-up. CUDA: events around each repetition, with a 256 MiB
    buffer zeroed before each so every repetition starts from a cold L2 cache (as
    ``triton.testing.do_bench``). CPU: ``time.perf_counter``."""

    def __init__(self, device: str, quick: bool):
        self.cuda = device == "cuda"
        self.target_s = 0.05 if quick else 0.3      # time spent in timed repetitions
        self.warmup_s = 0.02 if quick else 0.1
        self.min_reps, self.max_reps = (3, 50) if quick else (5, 500)
        self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def first_call(self, step) -> float:
        """Seconds for the first call (compilation, autotuning, allocator warm-up included)."""
        self.sync()
        start = time.perf_counter()
        step()
        self.sync()
        return time.perf_counter() - start

    def median_ms(self, step) -> tuple[float, int]:
        """(median milliseconds, repetitions)."""
        # warm-up, which also estimates one step's time
        self.sync()
        start, runs = time.perf_counter(), 0
        while runs < 2 or (time.perf_counter() - start < self.warmup_s and runs < 50):
            step()
            self.sync()
            runs += 1
        estimate = (time.perf_counter() - start) / runs
        reps = int(min(self.max_reps, max(self.min_reps, math.ceil(self.target_s / max(estimate, 1e-6)))))
        if not self.cuda:
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                step()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times), reps
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for begin, end in events:
            self._flush.zero_()
            begin.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(b.elapsed_time(e) for b, e in events), reps

    def peak_memory(self, impl: Impl) -> float | None:
        """MiB that one step allocates at its peak above what was allocated before it (CUDA)."""
        if not self.cuda:
            return None
        for leaf in impl.leaves:
            leaf.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        impl.step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------------------------------------
# Ceilings and machine description
# ---------------------------------------------------------------------------------------------

def measure_ceilings(timer: Timer, device: str, quick: bool) -> dict[str, Any]:
    """Copy bandwidth (read + write) and matmul throughput of this device."""
    if device == "cuda":
        copy_elems, copy_dtype = 2**29, torch.bfloat16             # 1 GiB each way
        mm_n, mm_dtype = (4096 if quick else 8192), torch.bfloat16
    else:
        copy_elems, copy_dtype = (2**24 if quick else 2**26), torch.float32
        mm_n, mm_dtype = (512 if quick else 2048), torch.float32

    def time_copy() -> float:
        src = torch.randn(copy_elems, device=device).to(copy_dtype)
        dst = torch.empty_like(src)
        return timer.median_ms(lambda: dst.copy_(src))[0]

    def time_matmul() -> float:
        a, b = (torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype) for _ in range(2))
        return timer.median_ms(lambda: torch.matmul(a, b))[0]

    copy_ms = time_copy()
    copy_bytes = 2 * copy_elems * torch.empty((), dtype=copy_dtype).element_size()
    mm_ms = time_matmul()
    _free(device)
    return {
        "GB/s": copy_bytes / copy_ms / 1e6,
        "TFLOP/s": 2 * mm_n**3 / mm_ms / 1e9,
        "copy": {"bytes": copy_bytes, "dtype": str(copy_dtype).removeprefix("torch."), "ms": copy_ms,
                 "counts": "read + write"},
        "matmul": {"n": mm_n, "dtype": str(mm_dtype).removeprefix("torch."), "ms": mm_ms},
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True, cwd=Path(__file__).resolve().parent).stdout
        return out.strip() or None
    except Exception:
        return None


def _version(name: str) -> str | None:
    """An importable package's installed version (its distribution's: ``liger_kernel.__version__``
    is None), else None."""
    try:
        module = __import__(name)
    except Exception:
        return None
    try:
        return importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return getattr(module, "__version__", None) or "installed"


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except Exception:
        return None


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "environment": {k: v for k, v in os.environ.items() if k.startswith("FASTDL_")},
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        import fastdl
        info["fastdl"] = fastdl.__version__
    except Exception as err:
        info["fastdl"] = f"import failed: {err}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    driver=_driver_version(), cudnn=torch.backends.cudnn.version())
    else:
        info.update(gpu=None, driver=None, cpu=platform.processor() or platform.machine(),
                    threads=torch.get_num_threads())
    info["peers"] = {name: _version(name) for name in PEERS}
    return info


def file_stem(info: dict[str, Any]) -> str:
    name = info["gpu"] or "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "device"
    return f"{slug}-{info['date'][:10]}"


# ---------------------------------------------------------------------------------------------
# Running cases
# ---------------------------------------------------------------------------------------------

def _error(err: BaseException) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:300]


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# Errors after which every later CUDA call of the process fails too.
_STICKY = ("illegal memory access", "illegal address", "device-side assert", "unspecified launch failure",
           "misaligned address", "illegal instruction")


def run_impl(timer: Timer, case: Case, builder, device: str, ceiling: float) -> dict[str, Any]:
    """Build, first-call, time and measure one implementation of one case. ``"fatal": True`` in
    the result when the error left the CUDA context unusable."""
    result = _measure(timer, case, builder, ceiling)
    try:
        _free(device)
    except Exception as err:  # the error surfaced at the synchronisation, or it is sticky
        if result["status"] == "ok":
            result = {"status": "error", "reason": _error(err)}
        result["fatal"] = True
    if result["status"] == "error" and any(s in result["reason"] for s in _STICKY):
        result["fatal"] = True
    return result


def _measure(timer: Timer, case: Case, builder, ceiling: float) -> dict[str, Any]:
    impl = None
    try:
        build_start = time.perf_counter()
        impl = builder()
        setup = time.perf_counter() - build_start
        first = timer.first_call(impl.step)
        ms, reps = timer.median_ms(impl.step)
        peak = timer.peak_memory(impl)
        throughput = case.work / ms / (1e6 if case.unit == "GB/s" else 1e9)
        result = {"status": "ok", "ms": ms, "reps": reps, "throughput": throughput,
                  "fraction_of_ceiling": throughput / ceiling if ceiling else None,
                  "first_call_s": first, "setup_s": setup, "peak_memory_MiB": peak}
        if impl.backend is not None:
            result["backend"] = impl.backend
        return result
    except Unavailable as err:
        return {"status": "unavailable", "reason": str(err)}
    except Exception as err:
        return {"status": "error", "reason": _error(err)}
    finally:
        del impl


def case_record(case: Case) -> dict[str, Any]:
    """A case's entry in the report, before any implementation ran."""
    return {"index": case.index, "mode": case.mode, "label": case.label, "params": case.params,
            "unit": case.unit, "work": case.work, "x": case.x, "x_name": case.x_name, "panel": case.panel,
            "results": {}, "fastdl_speedup": {}}


def add_result(record: dict[str, Any], name: str, result: dict[str, Any]) -> None:
    """One implementation's result into its case's entry, and fastdl's speed-ups updated."""
    record["results"][name] = result
    results, speedup = record["results"], {}
    fast = results.get("fastdl", {})
    if fast.get("status") == "ok":
        for other, res in results.items():
            if other != "fastdl" and res.get("status") == "ok":
                speedup[other] = res["ms"] / fast["ms"]
    record["fastdl_speedup"] = speedup


def run_case(timer: Timer, case: Case, ceilings: dict, device: str, record: dict[str, Any] | None = None,
             over_budget=lambda: False, after_each=lambda: None) -> dict[str, Any]:
    """Every implementation of ``case`` into ``record`` (a new one by default), ``after_each``
    called after each (the runner writes its files). Once ``over_budget()`` is true, the
    implementations left are recorded as skipped; after a fatal error, so are they."""
    record = case_record(case) if record is None else record
    poisoned = None
    for name, builder in case.impls.items():
        if poisoned is not None:
            reason = f"not run after {poisoned}'s CUDA error"
            add_result(record, name, {"status": "skipped", "reason": reason})
        elif over_budget():
            add_result(record, name, {"status": "skipped", "reason": "time budget reached"})
        else:
            result = run_impl(timer, case, builder, device, ceilings[case.unit])
            add_result(record, name, result)
            after_each()
            if result.get("fatal"):
                poisoned = name  # nothing more can run in this process
    return record


def schedule(all_cases: dict[str, list[Case]]) -> list[Case]:
    """Headline cases of every op first, then the rest, ops taking turns; within an op, its modes
    take turns too (attention's forward + backward does not wait for its causal forward)."""
    ordered = []
    for priority in (0, 1):
        queues = [_modes_in_turn([c for c in cs if c.priority == priority]) for cs in all_cases.values()]
        while any(queues):
            for queue in queues:
                if queue:
                    ordered.append(queue.pop(0))
    return ordered


def _modes_in_turn(cases: list[Case]) -> list[Case]:
    by_mode: dict[str, list[Case]] = {}
    for case in cases:
        by_mode.setdefault(case.mode, []).append(case)
    turns = itertools.zip_longest(*by_mode.values())
    return [case for turn in turns for case in turn if case is not None]


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    return f"{value:.{max(0, digits - 1 - magnitude)}f}"


def case_line(op: str, case: dict[str, Any]) -> str:
    lines = [f"{op} {case['mode']} {case['label']}"]
    for name, res in case["results"].items():
        if res["status"] != "ok":
            lines.append(f"    {name:<13} {res['status']}: {res['reason']}")
            continue
        frac = res["fraction_of_ceiling"]
        mem = res["peak_memory_MiB"]
        extra = f" [{res['backend']}]" if "backend" in res else ""
        speed = f"  fastdl {case['fastdl_speedup'][name]:.2f}x" if name in case["fastdl_speedup"] else ""
        lines.append(f"    {name:<13} {_fmt(res['ms']):>9} ms  {_fmt(res['throughput']):>8} {case['unit']:<7}"
                     f" {100 * frac:5.1f}% of ceiling  first call {res['first_call_s']:.2f} s"
                     f"{'' if mem is None else f'  peak {mem:.0f} MiB'}{speed}{extra}")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    meta, ceil = report["meta"], report["ceilings"]
    out = [f"### {meta['gpu'] or 'CPU (' + str(meta.get('cpu')) + ')'} — {meta['date'][:10]}", "",
           f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
           f"driver {meta.get('driver')}, fastdl {meta['fastdl']}"
           f"{' (quick shapes)' if report['quick'] else ''}.", ""]
    if ceil:
        mm = ceil["matmul"]
        out += [f"Measured ceilings: copy {_fmt(ceil['GB/s'])} GB/s (read + write, {ceil['copy']['dtype']}), "
                f"matmul {_fmt(ceil['TFLOP/s'])} TFLOP/s ({mm['n']}³ {mm['dtype']}).", ""]
    out += ["Time is the median; *x* = fastdl's speed-up over that implementation (>1: fastdl faster); "
            "% = fraction of the measured ceiling; memory = peak allocation during one step.", ""]
    for op, entry in report["ops"].items():
        out.append(f"#### {op}")
        out.append("")
        if entry["status"] != "ok":
            out += [f"{entry['status']}: {entry.get('reason', '')}", ""]
            continue
        if entry.get("first_call_s") is not None:
            out += [f"First fastdl call (compilation and autotuning included): "
                    f"{entry['first_call_s']:.2f} s.", ""]
        out.append("| mode | shape | impl | ms | throughput | % ceiling | fastdl x | peak MiB |")
        out.append("|---|---|---|---:|---:|---:|---:|---:|")
        for case in sorted(entry["cases"], key=lambda c: c["index"]):
            for name, res in case["results"].items():
                if res["status"] != "ok":
                    out.append(f"| {case['mode']} | {case['label']} | {name} | {res['status']} | | | | |")
                    continue
                speed = case["fastdl_speedup"].get(name)
                mem = res["peak_memory_MiB"]
                speed = "" if speed is None else f"{speed:.2f}"
                mem = "" if mem is None else f"{mem:.0f}"
                out.append(f"| {case['mode']} | {case['label']} | {name} | {_fmt(res['ms'])} | "
                           f"{_fmt(res['throughput'])} {case['unit']} | "
                           f"{100 * res['fraction_of_ceiling']:.1f} | {speed} | {mem} |")
        out.append("")
    memory = attention_memory_table(report)
    if memory:
        out += memory
    return "\n".join(out) + "\n"


def attention_memory_table(report: dict[str, Any]) -> list[str]:
    """Peak memory of attention forward + backward at a fixed token count (batch·L), by L."""
    entry = report["ops"].get("attention")
    if not entry or entry["status"] != "ok":
        return []
    rows = [c for c in entry["cases"] if c["mode"] == "fwd+bwd" and not c["params"]["causal"]
            and not c["params"].get("bert")]
    rows = [c for c in rows if any(r.get("peak_memory_MiB") is not None for r in c["results"].values())]
    if not rows:
        return []
    names = sorted({n for c in rows for n in c["results"]}, key=lambda n: (n != "fastdl", n))
    tokens = rows[0]["params"]["tokens"]
    out = [f"#### attention memory at {tokens} tokens (forward + backward, not causal)", "",
           "Peak MiB by sequence length at a fixed batch·L: flat where memory is linear in L.", "",
           "| D | L | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for c in sorted(rows, key=lambda c: (c["params"]["head_dim"], c["params"]["seq"])):
        cells = []
        for n in names:
            res = c["results"].get(n, {})
            mem = res.get("peak_memory_MiB")
            cells.append(res.get("status", "-") if mem is None else f"{mem:.0f}")
        out.append(f"| {c['params']['head_dim']} | {c['params']['seq']} | " + " | ".join(cells) + " |")
    return out + [""]


def plot(report: dict[str, Any], path: Path) -> str:
    """One PNG: a panel per op and mode, throughput against size, a line per implementation."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "matplotlib is not importable: no plots (pip install matplotlib)"
    panels: dict[str, list[dict]] = {}
    for entry in report["ops"].values():
        for case in entry.get("cases", []):
            panels.setdefault(case["panel"], []).append(case)
    if not panels:
        return "nothing to plot"
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, cases) in zip(axes.flat, panels.items()):
        cases = sorted(cases, key=lambda c: c["x"])
        names = sorted({n for c in cases for n in c["results"]}, key=lambda n: (n != "fastdl", n))
        for name in names:
            points = [(c["x"], c["results"][name]["throughput"]) for c in cases
                      if c["results"].get(name, {}).get("status") == "ok"]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=name, linewidth=2.5 if name == "fastdl" else 1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(cases[0]["x_name"], fontsize=8)
        ax.set_ylabel(cases[0]["unit"], fontsize=8)
        xs = [c["x"] for c in cases]
        if max(xs) / max(min(xs), 1) > 8:
            ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    meta = report["meta"]
    fig.suptitle(f"fastdl on {meta['gpu'] or 'CPU'} ({meta['date'][:10]}, torch {meta['torch']})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"wrote {path}"


def write(report: dict[str, Any], out: Path, stem: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    # Written aside and renamed: a kill mid-write leaves the previous file whole.
    texts = {json_path: json.dumps(report, indent=1, default=str) + "\n", md_path: markdown(report)}
    for path, text in texts.items():
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        os.replace(partial, path)
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

class Stopped(BaseException):
    """SIGTERM (e.g. from ``timeout``): stop timing and write what was measured. A BaseException,
    so the per-implementation error handling does not swallow it."""


def _stop(signum, frame):
    raise Stopped(f"stopped by signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="+", metavar="OP", choices=list(ops_module.OPS),
                        help="ops to time (default: all): " + ", ".join(ops_module.OPS))
    parser.add_argument("--quick", action="store_true", help="fewer shapes (on a CPU: tiny shapes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds (headline cases run first)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--list", action="store_true", help="list the ops and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name in ops_module.OPS:
            print(name)
        return 0
    start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    env = Env(device=device, quick=args.quick, compile=device == "cuda" and not args.no_compile)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    timer = Timer(device, args.quick)
    info = machine_info(device)
    stem = file_stem(info)
    print(f"fastdl benchmarks on {info['gpu'] or 'CPU'}: torch {info['torch']}, triton {info['triton']}, "
          f"CUDA {info['cuda']}, driver {info.get('driver')}")
    print("peers: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in info["peers"].items()))
    if not env.compile:
        print("torch.compile baseline: skipped" + (" (CPU run)" if device == "cpu" else ""))

    ceilings = measure_ceilings(timer, device, args.quick)
    mm = ceilings["matmul"]
    print(f"ceilings: copy {_fmt(ceilings['GB/s'])} GB/s (read + write), "
          f"matmul {_fmt(ceilings['TFLOP/s'])} TFLOP/s ({mm['n']}³ {mm['dtype']})")

    report: dict[str, Any] = {
        "meta": info, "quick": args.quick, "ceilings": ceilings,
        "counting": {"flops": "attention: 4·B·H·L·S·D forward, ×3.5 forward+backward, halved when causal; "
                              "training steps: 3 × forward matmul FLOPs (model FLOPs)",
                     "bytes": "each tensor the op must touch counted once, read or written "
                              "(see benchmarks/ops.py)"},
        "ops": {},
    }
    selected = args.ops or list(ops_module.OPS)
    all_cases: dict[str, list[Case]] = {}
    for op in selected:
        reason = ops_module.availability(op)
        if reason is not None:
            report["ops"][op] = {"status": "not available", "reason": reason, "cases": []}
            print(f"{op}: not available ({reason})")
            continue
        all_cases[op] = ops_module.cases(op, env)
        report["ops"][op] = {"status": "ok", "first_call_s": None, "cases": []}

    json_path, md_path = write(report, args.out, stem)
    queue = schedule(all_cases)
    skipped = 0
    over_budget = lambda: args.budget is not None and time.perf_counter() - start > args.budget  # noqa: E731
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for done, case in enumerate(queue):
            if over_budget():
                skipped = len(queue) - done
                break
            entry = report["ops"][case.op]
            record = case_record(case)
            entry["cases"].append(record)  # before it runs: a stop mid-case keeps what it measured
            run_case(timer, case, ceilings, device, record, over_budget,
                     after_each=lambda: write(report, args.out, stem))
            fast = record["results"].get("fastdl", {})
            if entry["first_call_s"] is None and fast.get("status") == "ok":
                entry["first_call_s"] = fast["first_call_s"]
            print(case_line(case.op, record), flush=True)
            fatal = next((name for name, res in record["results"].items() if res.get("fatal")), None)
            if fatal is not None:
                report["fatal"] = {"op": case.op, "mode": case.mode, "case": case.label, "impl": fatal,
                                   "reason": record["results"][fatal]["reason"]}
                print(f"fatal CUDA error in {case.op} {case.mode} {case.label} ({fatal}): "
                      "nothing more can run in this process", flush=True)
                break
            write(report, args.out, stem)
    except (Stopped, KeyboardInterrupt) as err:
        report["stopped"] = str(err) or "interrupted"
        print(f"{report['stopped']}: writing what was measured", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for entry in report["ops"].values():
        entry["cases"].sort(key=lambda c: c["index"])
    if skipped:
        report["skipped_cases"] = skipped
        print(f"time budget of {args.budget:.0f} s reached: {skipped} cases not run")
    report["wall_s"] = time.perf_counter() - start
    json_path, md_path = write(report, args.out, stem)
    print(f"wrote {json_path}\nwrote {md_path}")
    if not args.no_plot:
        print(plot(report, args.out / f"{stem}.png"))
    print(f"done in {report['wall_s']:.0f} s")
    return 4 if "fatal" in report else 3 if "stopped" in report else 0


if __name__ == "__main__":
    sys.exit(main())
