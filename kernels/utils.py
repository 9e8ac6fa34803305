"""Helpers shared by every kernel family: launch sizing, autotuning, contiguity, dtypes.

``INTERPRET`` records whether Triton's CPU interpreter was on when the kernels were defined (Triton
fixes that per kernel at decoration time), so :mod:`fastdl.backend` can tell which mode runs.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

# Integer kernel arguments that change from call to call -- random seeds, and sequence lengths or
# row counts used only as bounds -- are not specialised: Triton would otherwise compile a new
# variant whenever one of them happens to be 1 or a multiple of 16. (Row widths N and element
# counts that bound a masked load, like numel, stay specialised: their divisibility by 16 is what
# lets masked loads be vectorised.) Names a kernel lacks are ignored; attention adds L and S.
PER_CALL_ARGS = ["seed", "M", "R", "G", "rows_per_program", "tiles_per_program", "last_count"]

# Float scalar arguments (eps, momentum, the dropout scale) are annotated ``tl.float64``: Triton
# passes an unannotated Python float as float32, which would round them in a float64 kernel. Each
# kernel casts them to its ACC type first unless ACC is float64, so fp16/bf16/fp32 launches compute
# nothing in float64 (the compile gate reads their PTX for it). The cast is written in each kernel,
# not in a helper: the interpreter passes the Python float as is, and a call would round it to
# float32.

# Largest row a norm-style kernel keeps in registers in one block; longer rows are looped over.
MAX_FUSED_ELEMENTS = 16384


def _autotune_setting(value: str) -> str | int:
    """Parse a ``FASTDL_AUTOTUNE`` value: "all", "first" or a config index."""
    value = value.strip().lower()
    if value in ("all", "first"):
        return value
    if value.isdigit():
        return int(value)
    raise ValueError(f"FASTDL_AUTOTUNE must be 'all', 'first' or a config index, got {value!r}")


# Which config of each autotuned list runs (FASTDL_AUTOTUNE, read once at import):
#   all   -- triton.autotune times every config once per key and keeps the fastest (GPU default);
#   first -- always the list's first config, its default (the interpreter's default: it cannot
#            time configs, and triton.autotune with more than one config fails there);
#   <i>   -- always config i of every list (the last one for a shorter list).
# Pinned configs make a GPU run reproducible across processes and skip the tuning launches.
AUTOTUNE: str | int = _autotune_setting(os.environ.get("FASTDL_AUTOTUNE", "first" if INTERPRET else "all"))
# Set by kernels' compile-coverage tools only: every launch of a tuned kernel goes out once per
# config of its list (they record launches, they never execute them).
_EACH_CONFIG = False


@contextlib.contextmanager
def autotune_setting(value: str | int):
    """Temporarily set :data:`AUTOTUNE` ("all", "first" or a config index), e.g. in a test that
    runs a kernel once per config: ``for i in range(len(kernel.configs)): with autotune_setting(i):``."""
    global AUTOTUNE
    previous, AUTOTUNE = AUTOTUNE, _autotune_setting(str(value))
    try:
        yield
    finally:
        AUTOTUNE = previous


class Tuned:
    """A kernel with a list of configs, launched as ``kernel[grid](*args, **kwargs)`` like a
    ``triton.autotune`` kernel; :data:`AUTOTUNE` decides at each launch which config runs."""

    def __init__(self, fn, configs: list[triton.Config], key: list[str], **kwargs):
        if not configs:
            raise ValueError("an autotuned kernel needs at least one config")
        self.fn = fn
        self.configs = list(configs)
        self._tune_args = dict(key=key, **kwargs)
        self._autotuner = None

    def config(self, index: int) -> triton.Config:
        """The config a pinned index selects: index i, or the last one for a shorter list."""
        return self.configs[min(index, len(self.configs) - 1)]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, **kwargs)

    def run(self, *args, grid, **kwargs):
        if _EACH_CONFIG:
            for config in self.configs:
                self._launch(config, args, grid, kwargs)
            return None
        if AUTOTUNE == "all":
            if INTERPRET and len(self.configs) > 1:
                raise RuntimeError("FASTDL_AUTOTUNE=all needs a GPU: the interpreter cannot time "
                                   "configs; pin one with FASTDL_AUTOTUNE=first or an index")
            if self._autotuner is None:
                self._autotuner = triton.autotune(self.configs, **self._tune_args)(self.fn)
            return self._autotuner[grid](*args, **kwargs)
        return self._launch(self.config(0 if AUTOTUNE == "first" else AUTOTUNE), args, grid, kwargs)

    def _launch(self, config: triton.Config, args, grid, kwargs):
        return self.fn[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                             num_stages=config.num_stages)


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """Decorator like ``triton.autotune``; which config runs follows ``FASTDL_AUTOTUNE``
    (:data:`AUTOTUNE`). The first config of each list must be a sensible default."""
    return lambda fn: Tuned(fn, configs, key, **kwargs)


def acc_dtype(dtype: torch.dtype):
    """Accumulation type: float64 for float64 inputs (so gradcheck can prove a kernel), else
    float32 whatever the input (fp16/bf16 statistics in their own precision are useless)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def block_size(n: int, max_block: int = MAX_FUSED_ELEMENTS) -> int:
    """The power-of-two block that covers ``n`` elements, capped at ``max_block`` (min 16)."""
    return max(16, min(triton.next_power_of_2(max(n, 1)), max_block))


def num_warps_for(block: int) -> int:
    """Warps for a 1-D block: enough threads that each holds a handful of elements."""
    if block >= 16384:
        return 16
    if block >= 4096:
        return 8
    if block >= 1024:
        return 4
    return 2 if block >= 256 else 1


# CUDA's launch-grid limits: 2^31 - 1 programs on axis 0, 65,535 on axes 1 and 2. Launchers fold
# whatever can grow with the input (batch x heads, channel blocks) into axis 0.
MAX_GRID = (2**31 - 1, 65535, 65535)


def check_grid(grid: tuple[int, ...], op: str) -> tuple[int, ...]:
    """``grid``, after checking it against :data:`MAX_GRID` (every launcher passes its grid through
    here, on every backend, so an oversized launch is a clear error and not a CUDA launch failure)."""
    for axis, (programs, limit) in enumerate(zip(grid, MAX_GRID)):
        if programs > limit:
            raise ValueError(f"{op}: the input needs {programs:,} programs on launch-grid axis {axis} "
                             f"(grid {tuple(grid)}), more than CUDA's limit of {limit:,}")
    return grid


@triton.jit
def grid_2d(n0):
    """(i, j) of a program of an (n0, n1) grid launched folded as (n0 * n1,): i fastest, as on a
    2-D grid, and no 65,535 cap on n1 (see :data:`MAX_GRID`)."""
    pid = tl.program_id(0)
    j = pid // n0
    return pid - j * n0, j


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


# The GPU the interpreter stands in for, when a launcher picks configs by GPU generation.
INTERPRETER_CAPABILITY = 90


def gpu_capability(device: torch.device) -> int:
    """Compute capability (10 * major + minor, e.g. 90 for an H100) of the GPU that runs a launch
    on ``device``: the device's own for CUDA tensors; INTERPRETER_CAPABILITY under the interpreter;
    otherwise the target of Triton's active driver (the ahead-of-time compile tools set one for
    launches on CPU tensors that are recorded, never run)."""
    if device.type == "cuda":
        return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
    if INTERPRET:
        return INTERPRETER_CAPABILITY
    return int(triton.runtime.driver.active.get_current_target().arch)


# Persistent programs under the interpreter, which runs programs one after another: a handful keeps
# multi-program reductions exercised. Tests raise it to a GPU's count (132 SMs x 4 on an H100) to
# run the many-programs path on the CPU too.
INTERPRETER_PROGRAMS = 4


def num_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """How many persistent programs to launch for ``work_items`` independent items.

    On a GPU: a few per streaming multiprocessor; under the interpreter INTERPRETER_PROGRAMS.
    """
    if device.type == "cuda" and not INTERPRET:
        limit = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        limit *= per_sm
    else:
        limit = INTERPRETER_PROGRAMS
    return max(1, min(work_items, limit))


def ensure_contiguous(fn):
    """Decorator for launchers: make every tensor argument contiguous before the launch."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return wrapper


@triton.jit
def _column_sums(PART, OUT, block, G, N, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[n] = sum_g PART[g, n] for column block ``block``, rows added in a fixed order."""
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=PART.dtype.element_ty)
    for g in range(0, G, BLOCK_G):
        rows = g + tl.arange(0, BLOCK_G)
        mask = (rows[:, None] < G) & col_mask[None, :]
        acc += tl.load(PART + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0), mask=col_mask)


@triton.jit(do_not_specialize=PER_CALL_ARGS)
def _sum_partials_kernel(PART_A, OUT_A, PART_B, OUT_B, G, N, TWO: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """Column sums of PART_A (G, N) into OUT_A and, with TWO, of PART_B into OUT_B: the programs
    past the first buffer's column blocks take the second's. PART_*: float32/64, contiguous."""
    block = tl.program_id(0)
    blocks = tl.cdiv(N, BLOCK_N)
    if TWO and block >= blocks:
        _column_sums(PART_B, OUT_B, block - blocks, G, N, BLOCK_G, BLOCK_N)
    else:
        _column_sums(PART_A, OUT_A, block, G, N, BLOCK_G, BLOCK_N)


# Columns per program of sum_partials: narrow, so that a (programs, 768) buffer is summed by 24
# programs per buffer rather than 6 (each reading G rows of its columns in turn).
SUM_BLOCK_N = 32


def sum_partials(*parts: tuple[torch.Tensor, torch.dtype] | None) -> tuple[torch.Tensor | None, ...]:
    """Deterministic column sums of per-program partial results, one or two buffers in one launch.

    Kernels that reduce over many rows (weight gradients, batch statistics) write one partial
    row per program instead of using float atomics, whose summation order -- and so result --
    changes from run to run; this second small kernel adds the partial rows in a fixed order.

    parts: (partials, out_dtype) pairs or None; partials (G, N) float32 or float64, contiguous,
    the same (G, N) for both. Returns, per pair, the (N,) sums in ``out_dtype`` (None for None;
    nothing is launched when every pair is None).
    """
    given = [p for p in parts if p is not None]
    if not given:
        return tuple(None for _ in parts)
    if len(given) > 2:
        raise ValueError(f"sum_partials takes one or two buffers, got {len(given)}")
    if len(given) == 2 and given[0][0].shape != given[1][0].shape:
        raise ValueError(f"sum_partials: buffers of shapes {tuple(given[0][0].shape)} and "
                         f"{tuple(given[1][0].shape)}")
    G, N = given[0][0].shape
    outs = [torch.empty(N, dtype=dtype, device=part.device) for part, dtype in given]
    if N > 0:
        (part_a, _), (part_b, _) = given[0], given[-1]
        blocks = triton.cdiv(N, SUM_BLOCK_N)
        _sum_partials_kernel[check_grid((blocks * len(given),), "sum_partials")](
            part_a, outs[0], part_b, outs[-1], G, N, TWO=len(given) == 2,
            BLOCK_G=min(64, triton.next_power_of_2(max(G, 1))), BLOCK_N=SUM_BLOCK_N)
    it = iter(outs)
    return tuple(None if p is None else next(it) for p in parts)


def partial_rows(programs: int, N: int, wanted: bool, dtype: torch.dtype, device, accumulated: bool):
    """The (programs, N) buffer of per-program partial sums for :func:`sum_partials` ((0,) when
    not ``wanted``). Zeroed only when the kernel adds to it (``accumulated``, a streamed row):
    a kernel that stores each program's row whole needs no zero pass."""
    shape = (programs, N) if wanted else (0,)
    return (torch.zeros if accumulated else _uninitialised)(shape, dtype=dtype, device=device)


def _uninitialised(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, by a name that a test can replace with a NaN-filled allocation."""
    return torch.empty(shape, dtype=dtype, device=device)


def dropout_threshold(p: float) -> int:
    """The integer a 32-bit random word must reach for its element to be kept: ``p * 2**32``.

    Exact at the ends: 0 keeps everything, 2**32 (p = 1) nothing. A Python int, so the comparison
    in :func:`dropout_keep` is exact integer arithmetic on every backend.
    """
    return min(int(p * 4294967296.0), 4294967296)


@triton.jit
def dropout_counters(rows, start, N, BLOCK: tl.constexpr):
    """Philox counters for columns ``start .. start + BLOCK - 1`` of ``rows`` of an (M, N) matrix.

    Element (r, c) uses lane ``c % 4`` of counter ``r * ceil(N / 4) + c // 4``: four consecutive
    columns share one Philox call. ``rows``: an int64 scalar (returns a (BLOCK // 4,) block) or an
    int64 (R, 1) block (returns (R, BLOCK // 4)); ``start`` a multiple of 4.
    """
    return rows * ((N + 3) // 4) + (start // 4 + tl.arange(0, BLOCK // 4))


@triton.jit
def dropout_keep(seed, counters, threshold):
    """Keep-decisions of dropout for four elements per counter, from one Philox call each.

    ``counters``: int64 block (C,) or (R, C) from :func:`dropout_counters`; ``seed``: an integer
    scalar (loaded from the seed tensor); ``threshold``: :func:`dropout_threshold` of p. Returns a
    boolean block (4C,) or (R, 4C): element 4k + l is kept when lane l of Philox(seed, counter k)
    reaches the threshold, i.e. with probability 1 - p. Counter-based, so the backward regenerates
    the forward's mask from the seed instead of storing it; 64-bit counters (split into two 32-bit
    Philox words) keep tensors beyond 2^33 elements distinct.
    """
    lo = counters.to(tl.uint32)
    hi = (counters >> 32).to(tl.uint32)
    zero = tl.zeros_like(lo)
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero, zero)
    # Interleave the four lanes so that lane l lands on element 4k + l.
    r = tl.join(tl.join(r0, r1), tl.join(r2, r3))
    if len(counters.shape) == 1:
        r = tl.reshape(r, [4 * counters.shape[0]])
    else:
        r = tl.reshape(r, [counters.shape[0], 4 * counters.shape[1]])
    return r.to(tl.int64) >= threshold
