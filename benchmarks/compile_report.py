"""Compile every fastdl kernel ahead of time for GPU targets, without a GPU, and check the result.

    python -m benchmarks.compile_report                  # every launch x config, sm_90a and sm_80
    python -m benchmarks.compile_report --cover --check  # CI: a covering subset; exit 1 on a finding
    python -m benchmarks.compile_report --targets sm_90a --jobs 16 --out report.json
    python -m benchmarks.compile_report --families attention --out /tmp/attention.json  # one file
    python -m benchmarks.compile_report --merge /tmp/attention.json  # ...refreshed in the full report

Finding the launches. ``benchmarks/compile_specs.py`` calls each kernel file's launchers on CPU
tensors. A stand-in driver tells Triton's JIT that the current device is the target GPU, so the
JIT binds and specialises the arguments exactly as it would before a real launch (dtypes, 16-byte
divisibility, integers equal to 1) and hands the compile request to ``jit_cache_hook``, which
records it and skips the compile; nothing runs. Autotuned kernels (``kernels.utils.Tuned``) go
out once per config of their list.

Compiling. A process pool compiles each recorded request with ``triton.compile`` for the target
(Triton's cache, ``TRITON_CACHE_DIR``, makes a second run cheap) and reads ``ptxas -v`` for
registers and spills, the kernel's shared memory, and its PTX for ``wgmma`` and vector loads.

Checks (``--check``, the CI gate): every compile succeeds; shared memory within the target's
limit (227 KB sm_90a, 163 KB sm_80); no register spills in fp16/bf16 launches, nor in attention's
fp32 ones (3xTF32 on tensor cores, with head-dim chunks where registers are short); sm_90a attention
forward and backward use ``wgmma``; the memory-bound kernels issue vector global loads at aligned
widths; fp16/bf16/fp32 launches compute nothing in float64; the norm backwards' streamed rows end
in a barrier (the next row reads their partial sums back); every ``tl.dot`` block is at least 16
in every dimension; every ``@triton.jit`` kernel in
``kernels/`` is launched by some spec and every boolean constexpr is seen both ways. ``--cover``
compiles, per target, a subset of the launches chosen so that each config, each constexpr value
and each dtype of every kernel is compiled at least once.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fnmatch
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import platform
import re
import sys
import time
from collections import defaultdict

TARGETS = {"sm_90a": 90, "sm_80": 80}
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}
# Kernels whose speed is memory bandwidth: at aligned widths their loads must be vectorised.
MEMORY_BOUND = {"_norm_fwd_kernel", "_norm_bwd_kernel", "_dropout_kernel", "_dropout_add_norm_fwd_kernel",
                "_dropout_add_norm_bwd_kernel", "_gather_kernel", "_bert_embeddings_fwd_kernel",
                "_bn_stats_kernel", "_bn_apply_kernel", "_bn_bwd_reduce_kernel", "_bn_bwd_dx_kernel"}
# Attention kernels that must run on Hopper's warpgroup MMA (fp16/bf16 and tf32 dot products).
WGMMA = {"_attn_fwd_kernel", "_attn_bwd_kv_kernel", "_attn_bwd_q_kernel"}
# Kernels whose streamed rows (ONE_BLOCK off) add to partial sums in global memory that the next
# row reads back, possibly from other threads: a CTA barrier must order each row's stores.
ROW_READ_MODIFY_WRITE = {"_norm_bwd_kernel", "_dropout_add_norm_bwd_kernel"}


# ---------------------------------------------------------------------------------------------
# Recording launches
# ---------------------------------------------------------------------------------------------

class _TargetDriver:
    """Just enough of a Triton driver for the JIT to bind arguments for ``target``."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def _kernel_dtype(signature: dict) -> str:
    """The element type of a launch: its first floating-point pointer argument's."""
    for ty in signature.values():
        if isinstance(ty, str) and ty.startswith("*") and ty[1:] in ("fp16", "bf16", "fp32", "fp64"):
            return ty[1:]
    return "-"


def _plain(value):
    """A JSON-friendly form of a constexpr value (tl.dtype -> its name)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def record_launches(target_name: str, families: list[str] | None = None) -> list[dict]:
    """Every compile request the specs' launches make for ``target_name``, deduplicated.

    Must run in a process where ``TRITON_INTERPRET`` is off (the kernels must be JIT functions).
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("record_launches needs TRITON_INTERPRET unset (compiled kernels)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from benchmarks import compile_specs
    from fastdl.kernels import utils

    records: dict[tuple, dict] = {}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        jit = fn.jit_function
        constants = {k: v for k, v in compile["constants"].items()}
        names = [p.name for p in jit.params]
        entry = {
            "module": jit.fn.__module__, "kernel": jit.fn.__qualname__,
            "signature": dict(compile["signature"]), "constants": constants,
            "attrs": compile["configs"][0],
            "options": {"num_warps": compile["num_warps"], "num_stages": compile["num_stages"],
                        "num_ctas": compile["num_ctas"]},
            "case": compile_specs.CASE["name"],
            "constexprs": {names[k[0]]: _plain(v) for k, v in constants.items() if len(k) == 1
                           and compile["signature"].get(names[k[0]]) == "constexpr"},
        }
        entry["dtype"] = _kernel_dtype(entry["signature"])
        ident = (entry["module"], entry["kernel"], str(entry["signature"]),
                 str(sorted(map(str, constants.items()))), str(sorted(map(str, entry["attrs"].items()))),
                 str(entry["options"]))
        records.setdefault(ident, entry)
        return True  # handled: do not compile

    target = GPUTarget("cuda", TARGETS[target_name], 32)
    previous_hook, previous_driver = triton.knobs.runtime.jit_cache_hook, driver._active
    driver.set_active(_TargetDriver(target))
    triton.knobs.runtime.jit_cache_hook = hook
    utils._EACH_CONFIG = True
    try:
        for family, make_launches in compile_specs.SPECS.items():
            if families is None or family.split()[0] in families:
                make_launches()
    finally:
        utils._EACH_CONFIG = False
        triton.knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver  # reset_active() would look for a real GPU
    return list(records.values())


def jit_kernels() -> dict[str, list[str]]:
    """``{module: [kernel names]}`` for every ``@triton.jit`` function in fastdl.kernels that no
    other jit function calls (the launchable kernels, not the helpers)."""
    import triton

    import fastdl.kernels as package
    from fastdl.kernels import utils
    found: dict[str, dict] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"fastdl.kernels.{info.name}")
        for name, obj in vars(module).items():
            fn = obj.fn if isinstance(obj, utils.Tuned) else obj
            if isinstance(fn, triton.runtime.JITFunction) and fn.fn.__module__ == module.__name__:
                found.setdefault(module.__name__, {})[name] = fn
    sources = "\n".join(fn.src for fns in found.values() for fn in fns.values())
    return {module: sorted(n for n, fn in fns.items()
                           if not re.search(rf"\b{fn.fn.__name__}\(", sources.replace(fn.src, "")))
            for module, fns in found.items()}


def coverage_problems(records: list[dict]) -> list[str]:
    """Kernels no spec launches, and boolean constexprs only ever seen with one value."""
    problems = []
    launched = {(r["module"], r["kernel"]) for r in records}
    for module, names in jit_kernels().items():
        for name in names:
            if (module, name) not in launched:
                problems.append(f"{module}.{name}: no launch in benchmarks/compile_specs.py "
                                f"(add the kernel file's launches there)")
    seen = defaultdict(set)
    for r in records:
        for name, value in r["constexprs"].items():
            if isinstance(value, bool):
                seen[(r["kernel"], name)].add(value)
    for (kernel, name), values in sorted(seen.items()):
        if len(values) < 2:
            problems.append(f"{kernel}: constexpr {name} only launched as {values.pop()}")
    return problems


# ---------------------------------------------------------------------------------------------
# Covering subset
# ---------------------------------------------------------------------------------------------

def _features(r: dict) -> set[str]:
    """What a launch proves: its config (tile constexprs, warps, stages) for its element size, each
    non-tile constexpr value, its dtype."""
    k = r["kernel"]
    tiles = sorted((n, v) for n, v in r["constexprs"].items() if n.startswith("BLOCK"))
    size = "4" if r["dtype"] == "fp32" else ("8" if r["dtype"] == "fp64" else "2")
    feats = {f"{k} config {tiles} w{r['options']['num_warps']} s{r['options']['num_stages']} b{size}",
             f"{k} dtype {r['dtype']}"}
    feats |= {f"{k} {n}={v}" for n, v in r["constexprs"].items() if not n.startswith("BLOCK")}
    return feats


def covering_subset(records: list[dict]) -> list[dict]:
    """A small subset of ``records`` with every feature of the whole set (greedy set cover)."""
    features = [_features(r) for r in records]
    missing = set().union(*features) if features else set()
    chosen = []
    while missing:
        best = max(range(len(records)), key=lambda i: len(features[i] & missing))
        chosen.append(records[best])
        missing -= features[best]
    return chosen


# ---------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_VECTOR_LOAD = re.compile(r"ld\.global(\.[a-z0-9_]+)*\.v[248]\.")
_BARRIER = re.compile(r"\b(?:gpu|ttg)\.barrier\b")  # tl.debug_barrier() in TTGIR (Triton 3.6, 3.9)
# A dot product's operand and result shapes in TTGIR (tt.dot, or Hopper's warp_group_dot).
_DOT_LINE = re.compile(r" = (?:tt\.dot|ttng\.warp_group_dot) .*")
_DOT_SHAPE = re.compile(r"(?:tensor|memdesc)<(\d+)x(\d+)x")
# float64 arithmetic, or a widening to float64: a float64 scalar argument that leaked into the
# element math of an fp16/bf16/fp32 launch (its kernels convert such scalars to ACC first).
_F64_MATH = re.compile(r"\b(?:add|sub|mul|fma|div|sqrt|rcp|rsqrt|min|max|neg|abs)(?:\.[a-z0-9]+)*\.f64\b"
                       r"|\bcvt(?:\.[a-z0-9]+)*\.f64\.(?:f32|f16|bf16)\b")


def _ptxas_stats(log: str) -> tuple[int, int]:
    regs = max((int(m) for m in _PTXAS_USED.findall(log)), default=-1)
    spills = max((int(a) + int(b) for a, b in _PTXAS_SPILL.findall(log)), default=0)
    return regs, spills


def _config_name(r: dict) -> str:
    parts = [f"{n}={v}" for n, v in r["constexprs"].items() if n not in ("ACC",)]
    return (" ".join(parts) + f" w{r['options']['num_warps']} s{r['options']['num_stages']} "
            f"{r['dtype']}").strip()


def compile_one(args) -> dict:
    """Compile one recorded launch for one target (in a pool worker). Returns a report row."""
    r, target_name = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastdl.kernels import utils
    fn = getattr(importlib.import_module(r["module"]), r["kernel"])
    fn = fn.fn if isinstance(fn, utils.Tuned) else fn
    row = {"kernel": r["kernel"], "module": r["module"], "config": _config_name(r), "target": target_name,
           "dtype": r["dtype"], "case": r["case"], "num_warps": r["options"]["num_warps"],
           "num_stages": r["options"]["num_stages"], "constexprs": r["constexprs"]}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True
        src = ASTSource(fn, r["signature"], r["constants"], r["attrs"])
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", TARGETS[target_name], 32),
                                    options=dict(r["options"]))
    except Exception as err:  # a compile error is a finding, not a crash of the report
        row.update(error=f"{type(err).__name__}: {str(err)[-2000:]}", compile_s=time.perf_counter() - start)
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    stats_file = os.path.join(triton.knobs.cache.dir, "fastdl-ptxas", f"{kernel.hash}.txt")
    text = log.getvalue()
    if "registers" in text:  # a fresh compile: keep ptxas' report for cached runs
        os.makedirs(os.path.dirname(stats_file), exist_ok=True)
        with open(stats_file, "w") as f:
            f.write(text)
    elif os.path.exists(stats_file):
        with open(stats_file) as f:
            text = f.read()
    else:  # compiled by someone else's run: ask ptxas again
        text = _run_ptxas(kernel.asm["ptx"], TARGETS[target_name])
    ptx = kernel.asm["ptx"]
    row["registers"], row["spill_bytes"] = _ptxas_stats(text)
    row["shared_bytes"] = int(kernel.metadata.shared)
    row["wgmma"] = "wgmma" in ptx
    row["vector_loads"] = bool(_VECTOR_LOAD.search(ptx))
    row["f64_math"] = len(_F64_MATH.findall(ptx))
    row["barriers"] = len(_BARRIER.findall(kernel.asm["ttgir"]))
    dims = [int(d) for line in _DOT_LINE.findall(kernel.asm["ttgir"]) for shape in _DOT_SHAPE.findall(line)
            for d in shape]
    row["min_dot_dim"] = min(dims, default=None)
    return row


def _run_ptxas(ptx: str, capability: int) -> str:
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        try:  # the argument differs between Triton releases
            ptxas = get_ptxas(capability).path
        except TypeError:
            ptxas = get_ptxas().path
        out = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch_from_capability(capability)}", path,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
        return out.stderr + out.stdout


def findings(rows: list[dict]) -> list[str]:
    """What the gate fails on (see the module docstring)."""
    out = []
    for r in rows:
        where = f"{r['kernel']} [{r['config']}] {r['target']} ({r['case']})"
        if r.get("error"):
            out.append(f"{where}: compile error: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        if r["shared_bytes"] > SMEM_LIMIT[r["target"]]:
            out.append(f"{where}: {r['shared_bytes']} bytes of shared memory > {SMEM_LIMIT[r['target']]}")
        if r["spill_bytes"] > 0 and (r["dtype"] in ("fp16", "bf16") or r["kernel"].startswith("_attn_")):
            out.append(f"{where}: spills {r['spill_bytes']} bytes")
        if (r["target"] == "sm_90a" and r["kernel"] in WGMMA and r["constexprs"].get("PRECISION") != "ieee"
                and not r["wgmma"]):
            out.append(f"{where}: no wgmma")
        if r["kernel"] in MEMORY_BOUND and "aligned" in r["case"] and not r["vector_loads"]:
            out.append(f"{where}: no vectorised global loads")
        # (Rows merged from a report older than the barrier count have none: not judged.)
        if (r["kernel"] in ROW_READ_MODIFY_WRITE and r["constexprs"].get("ONE_BLOCK") is False
                and r.get("barriers", -1) == 0):
            out.append(f"{where}: no barrier between rows adding to the partial sums")
        if r.get("min_dot_dim") is not None and r["min_dot_dim"] < 16:
            out.append(f"{where}: a tl.dot block of {r['min_dot_dim']} (GPUs need at least 16)")
        computes_f64 = r["dtype"] == "fp64" or r["constexprs"].get("ACC") == "fp64"
        if not computes_f64 and r.get("f64_math", 0):
            out.append(f"{where}: {r['f64_math']} float64 instructions in a {r['dtype']} launch")
    return out


def table(rows: list[dict]) -> str:
    """One line per compile: kernel, config, target, registers, shared memory, spills, seconds."""
    head = f"{'kernel':30} {'config':70} {'target':7} {'regs':>4} {'smem':>7} {'spill':>6} {'s':>6}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["target"], r["config"])):
        if r.get("error"):
            lines.append(f"{r['kernel']:30} {r['config'][:70]:70} {r['target']:7} COMPILE ERROR")
            continue
        lines.append(f"{r['kernel']:30} {r['config'][:70]:70} {r['target']:7} {r['registers']:4d} "
                     f"{r['shared_bytes']:7d} {r['spill_bytes']:6d} {r['compile_s']:6.1f}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r.get("error")]
    return {
        "kernels": len({r["kernel"] for r in rows}),
        "compiles": len(rows),
        "configs": len({(r["kernel"], r["config"]) for r in rows}),
        "compile_errors": len(rows) - len(ok),
        "spilling": len([r for r in ok if r["spill_bytes"] > 0]),
        "spilling_fp16_bf16": len([r for r in ok if r["spill_bytes"] > 0 and r["dtype"] in ("fp16", "bf16")]),
        "over_shared_memory": len([r for r in ok if r["shared_bytes"] > SMEM_LIMIT[r["target"]]]),
        "compile_seconds": round(sum(r["compile_s"] for r in rows), 1),
    }


def _record_in_subprocess(target: str, families) -> list[dict]:
    """Launches are recorded in a fresh process: the caller may have the interpreter on."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(record_launches, target, families).result()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="sm_90a,sm_80")
    parser.add_argument("--cover", action="store_true", help="a covering subset, not every launch")
    parser.add_argument("--check", action="store_true", help="exit 1 on any finding")
    parser.add_argument("--families", nargs="*", help="kernel files to include (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--out", help="JSON report (default: benchmarks/results/compile-triton<ver>.json)")
    parser.add_argument("--quiet", action="store_true", help="no table, only the summary and findings")
    parser.add_argument("--merge", metavar="PARTIAL",
                        help="compile nothing: put PARTIAL's rows (a --families run) into the --out report "
                             "in place of the rows of the same kernel files, then summarise and check it")
    parser.add_argument("--known", help="a file of findings (one per line, shell-style patterns allowed) "
                                        "that are reported but do not fail --check: measured, not yet fixed")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    if args.merge:
        return _merge(args.merge, args.out or _default_out(triton.__version__, False), args.check, args.known)
    targets = args.targets.split(",")
    jobs, problems = [], []
    for target in targets:
        records = _record_in_subprocess(target, args.families)
        if target == targets[0]:
            problems += coverage_problems(records) if args.families is None else []
        chosen = covering_subset(records) if args.cover else records
        print(f"{target}: {len(records)} launches recorded, compiling {len(chosen)}", flush=True)
        jobs += [(r, target) for r in chosen]
    # Attention first (the longest compiles: the pool's tail stays short), fp16/bf16 before fp32.
    jobs.sort(key=lambda j: (not j[0]["kernel"].startswith("_attn"), j[0]["dtype"] == "fp32"))
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    rows = []
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx) as pool:
        for row in pool.map(compile_one, jobs, chunksize=1):
            rows.append(row)
            print(f"[{len(rows)}/{len(jobs)}] {row['kernel']} {row['target']} {row['compile_s']:.1f}s"
                  + (" ERROR" if row.get("error") else f" regs {row['registers']} spill {row['spill_bytes']}"
                     f" smem {row['shared_bytes']}"), file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    if not args.quiet:
        print(table(rows))
    stats = summary(rows) | {"wall_seconds": round(wall, 1), "jobs": args.jobs}
    problems += findings(rows)
    report = {"triton": triton.__version__, "python": platform.python_version(), "targets": targets,
              "mode": "cover" if args.cover else "full", "summary": stats, "findings": problems,
              "rows": rows}
    out = args.out or _default_out(triton.__version__, args.cover)
    _write(report, out)
    return _report_findings(problems, out, args.check, args.known)


def _default_out(version: str, cover: bool) -> str:
    name = f"compile-triton{version}{'-cover' if cover else ''}.json"
    return os.path.join(os.path.dirname(__file__), "results", name)


def _write(report: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps(report["summary"]))


def _report_findings(problems: list[str], out: str, check: bool, known_file: str | None) -> int:
    """Print the findings (known ones marked); 1 if ``check`` and any is not known."""
    known = set()
    if known_file and os.path.exists(known_file):
        with open(known_file) as f:
            known = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    literal = lambda text: text.replace("[", "\x00").replace("]", "\x01")  # brackets are not wildcards
    patterns = [re.compile(fnmatch.translate(literal(k))) for k in known]
    new = [p for p in problems if not any(pat.match(literal(_finding_key(p))) for pat in patterns)]
    for p in problems:
        print("KNOWN FINDING:" if p not in new else "FINDING:", p)
    print(f"report: {out}")
    return 1 if (check and new) else 0


def _merge(partial_path: str, out: str, check: bool, known_file: str | None) -> int:
    """Refresh a full report with a run over some kernel files (after a change to those files
    only): the partial run's rows replace the rows of the same modules, the others are kept."""
    with open(partial_path) as f:
        partial = json.load(f)
    with open(out) as f:
        full = json.load(f)
    if (partial["triton"], partial["targets"]) != (full["triton"], full["targets"]):
        raise SystemExit(f"{partial_path} (Triton {partial['triton']}, {partial['targets']}) does not fit "
                         f"{out} (Triton {full['triton']}, {full['targets']})")
    modules = {r["module"] for r in partial["rows"]}
    kept = [r for r in full["rows"] if r["module"] not in modules]
    rows = partial["rows"] + kept
    problems = findings(rows)
    full.update(summary=summary(rows) | {"wall_seconds": partial["summary"]["wall_seconds"],
                                         "jobs": partial["summary"]["jobs"]},
                findings=problems, rows=rows,
                refreshed={"modules": sorted(modules), "compiles": len(partial["rows"]),
                           "wall_seconds": partial["summary"]["wall_seconds"],
                           "kept_from_earlier_run": len(kept)})
    _write(full, out)
    return _report_findings(problems, out, check, known_file)


def _finding_key(finding: str) -> str:
    """A finding without the spec's case label (which only says which call reached it)."""
    return re.sub(r" \([^()]*\):", ":", finding, count=1)


if __name__ == "__main__":
    sys.exit(main())
