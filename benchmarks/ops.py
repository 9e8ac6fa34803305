"""The cases ``python -m benchmarks.run`` times: per op, the shapes, the work one step does (bytes
or FLOPs) and the implementations to compare.

A *case* is one op at one shape and mode (``fwd``, ``fwd+bwd``, or ``train`` for a model step).
Each implementation is a *builder*: a function that allocates its inputs and returns an
:class:`Impl` whose ``step()`` runs the op once. Builders run only when the runner reaches them,
so nothing is allocated or imported before it is needed, and fastdl's functions are looked up
lazily: an op whose fastdl function has not landed yet is reported "not available".

How work is counted (the runner divides it by the median time):

* Attention FLOPs: ``4·B·H·L·S·D`` for the forward (two matmuls, QKᵀ and PV, of ``2·L·S·D`` each
  per head); forward + backward is 3.5× that (the backward's five matmuls, one of them the
  recomputed QKᵀ, add 2.5×); halved when causal. Softmax and masking are not counted.
* Bytes of elementwise and normalisation ops: each tensor the op must touch is counted once,
  read or written — inputs read, outputs written, plus per-row statistics and per-column
  parameters; what the backward reads (x or a saved output, dy) and writes (dx, weight
  gradients) is added for ``fwd+bwd``. Extra passes an implementation makes (e.g. a second read
  of x for the statistics, or PyTorch's dropout mask) are not counted, so a faster kernel shows as
  a higher fraction of the copy bandwidth.
* Model training steps (``train``): model FLOPs, 3× the forward's matmul FLOPs
  (``2·tokens·matmul parameters`` + attention's ``4·B·L²·hidden`` per layer), as for MFU; no
  recomputation is counted. BERT's batch has a realistic mix of lengths (padded): its FLOPs are
  counted on the real tokens only (``4·Σ L_b²·hidden`` for attention), so a padded step shows the
  padding it wastes as a lower throughput.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as TF

# ---------------------------------------------------------------------------------------------
# Cases and implementations
# ---------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """An implementation (or a whole op) cannot run here; the message says why."""


@dataclasses.dataclass
class Impl:
    """One ready-to-time implementation: ``step()`` runs the op once (and its backward and
    optimizer step where the mode says so); ``leaves`` get ``.grad = None`` before a memory
    measurement; ``backend`` names fastdl's backend when it is fastdl."""

    step: Callable[[], Any]
    leaves: Sequence[torch.Tensor] = ()
    backend: str | None = None


Builder = Callable[[], Impl]


@dataclasses.dataclass
class Case:
    op: str
    mode: str                    # "fwd", "fwd+bwd" or "train"
    label: str                   # shape and dtype, e.g. "16384x2048 bf16"
    params: dict[str, Any]
    unit: str                    # "GB/s" or "TFLOP/s"
    work: float                  # bytes or FLOPs of one step
    x: float                     # the size plotted on the x axis
    x_name: str
    panel: str                   # plot panel (cases of one panel share axes)
    impls: dict[str, Builder]
    priority: int = 1            # 0: a headline case, run first when time is short
    index: int = 0               # position in its op's list (set by cases())


@dataclasses.dataclass
class Env:
    device: str
    quick: bool
    compile: bool                # time torch.compile of the eager code (off on CPU)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def fastdl_function(name: str) -> Callable:
    """``fastdl.functional.<name>``, or Unavailable if that op has not landed."""
    functional = importlib.import_module("fastdl.functional")
    fn = getattr(functional, name, None)
    if fn is None:
        raise Unavailable(f"fastdl.functional.{name} does not exist in this version")
    return fn


def fastdl_attr(module: str, name: str) -> Any:
    """``fastdl.<module>.<name>`` (e.g. ``models``, ``BertForMaskedLM``), or Unavailable."""
    try:
        mod = importlib.import_module(f"fastdl.{module}")
    except ImportError as err:
        raise Unavailable(f"fastdl.{module} cannot be imported: {err}") from err
    value = getattr(mod, name, None)
    if value is None:
        raise Unavailable(f"fastdl.{module}.{name} does not exist in this version")
    return value


def peer(module: str) -> Any:
    """Import an optional peer library (flash_attn, liger_kernel, apex, transformers)."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # a broken install raises more than ImportError
        raise Unavailable(f"{module} is not installed ({type(err).__name__})") from err


def make_step(forward: Callable[[], Any], mode: str,
              leaves: Sequence[torch.Tensor] = ()) -> Callable[[], None]:
    """One step of ``forward`` (``mode="fwd"``, under no_grad) or of forward and backward
    (``"fwd+bwd"``, with output gradients drawn once; the leaves' ``.grad`` is dropped first so
    gradient accumulation stays out of the timing). Does not synchronise."""
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    grads: list[torch.Tensor] = []

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                forward()
            return
        for leaf in leaves:
            leaf.grad = None
        outs = forward()
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, grads)

    return step


def _fastdl_impl(forward: Callable[[], Any], mode: str, leaves, probe: torch.Tensor) -> Impl:
    backend = importlib.import_module("fastdl.backend").resolve(probe)
    return Impl(make_step(forward, mode, leaves), leaves, backend)


def _compiled(fn: Callable) -> Callable:
    """torch.compile with a clean cache, so every case compiles its own static-shape graph."""
    torch._dynamo.reset()
    return torch.compile(fn)


def _randn(shape, env: Env, dtype, grad: bool, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    t = torch.randn(shape, device=env.device, dtype=dtype) * scale + shift
    return t.requires_grad_(grad)


def _elementwise_impls(env: Env, make_inputs: Callable[[], tuple], eager: Callable, fastdl_name: str,
                       fastdl_call: Callable, mode: str, peers: dict[str, Callable] | None = None
                       ) -> dict[str, Builder]:
    """fastdl / eager / compile (/ peers) builders for an op written as ``f(*inputs)``.

    ``make_inputs()`` returns ``(inputs, leaves)``; ``fastdl_call(fn, *inputs)`` calls fastdl's
    function ``fn``; ``peers`` maps a name to a builder-maker taking the same ``make_inputs``.
    """

    def build_fastdl() -> Impl:
        fn = fastdl_function(fastdl_name)
        inputs, leaves = make_inputs()
        return _fastdl_impl(lambda: fastdl_call(fn, *inputs), mode, leaves, inputs[0])

    def build_eager() -> Impl:
        inputs, leaves = make_inputs()
        return Impl(make_step(lambda: eager(*inputs), mode, leaves), leaves)

    def build_compile() -> Impl:
        compiled = _compiled(eager)
        inputs, leaves = make_inputs()
        return Impl(make_step(lambda: compiled(*inputs), mode, leaves), leaves)

    impls: dict[str, Builder] = {"fastdl": build_fastdl, "eager": build_eager}
    if env.compile:
        impls["compile"] = build_compile
    for name, maker in (peers or {}).items():
        impls[name] = maker
    return impls


# ---------------------------------------------------------------------------------------------
# Normalisation: LayerNorm, RMSNorm
# ---------------------------------------------------------------------------------------------

def _norm_sizes(env: Env) -> tuple[int, list[int], torch.dtype]:
    if not env.cuda:
        return 256, [256, 1024], torch.float32
    return 16384, ([1024, 4096] if env.quick else [768, 1024, 2048, 4096, 8192]), torch.bfloat16


def _norm_cases(env: Env, op: str) -> list[Case]:
    rows, hiddens, dtype = _norm_sizes(env)
    e = torch.empty((), dtype=dtype).element_size()
    rms = op == "rms_norm"
    eps = 1e-6 if rms else 1e-5
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for d in hiddens:
            grad = mode == "fwd+bwd"

            def make_inputs(d=d, grad=grad):
                x = _randn((rows, d), env, dtype, grad)
                w = _randn(d, env, dtype, grad, 0.1, 1.0)
                b = None if rms else _randn(d, env, dtype, grad, 0.1)
                leaves = [t for t in (x, w, b) if t is not None]
                return (x, w, b), leaves

            if rms:
                eager = lambda x, w, b, d=d: TF.rms_norm(x, (d,), w, eps)
                call = lambda fn, x, w, b, d=d: fn(x, (d,), w, eps)
            else:
                eager = lambda x, w, b, d=d: TF.layer_norm(x, (d,), w, b, eps)
                call = lambda fn, x, w, b, d=d: fn(x, (d,), w, b, eps)
            peers = _norm_peers(env, op, make_inputs, mode, d, eps)
            params = 1 if rms else 2  # weight (and bias)
            stats = 1 if rms else 2   # rstd (and mean), float32 per row
            fwd = e * (2 * rows * d + params * d) + 4 * stats * rows
            bwd = e * (3 * rows * d + 2 * params * d) + 4 * stats * rows
            cases.append(Case(
                op, mode, f"{rows}x{d} {dtype_name(dtype)}",
                {"rows": rows, "hidden": d, "dtype": dtype_name(dtype)},
                "GB/s", fwd + (bwd if grad else 0), d, "hidden size", f"{op} {mode}",
                _elementwise_impls(env, make_inputs, eager, op, call, mode, peers),
                priority=0 if d == hiddens[len(hiddens) // 2] else 1))
    return cases


def _norm_peers(env: Env, op: str, make_inputs, mode: str, d: int, eps: float) -> dict[str, Builder]:
    if not env.cuda:
        return {}

    def liger() -> Impl:
        transformers_api = peer("liger_kernel.transformers")
        (x, w, b), _ = make_inputs()
        if op == "rms_norm":
            # in_place=False: by default its backward writes dx into the output gradient, which the
            # timed steps reuse, and its peak memory then leaves out the dx every other one allocates
            module = transformers_api.LigerRMSNorm(d, eps=eps, in_place=False)
        else:
            module = transformers_api.LigerLayerNorm(d, eps=eps, bias=b is not None)  # its default: none
        module = module.to(device=x.device, dtype=x.dtype)
        leaves = [x, *module.parameters()] if x.requires_grad else [x]
        if not x.requires_grad:
            module.requires_grad_(False)
        return Impl(make_step(lambda: module(x), mode, leaves), leaves)

    def apex() -> Impl:
        normalization = peer("apex.normalization")
        (x, w, b), _ = make_inputs()
        cls = normalization.FusedRMSNorm if op == "rms_norm" else normalization.FusedLayerNorm
        module = cls(d, eps=eps).to(device=x.device, dtype=x.dtype)
        if not x.requires_grad:
            module.requires_grad_(False)
        leaves = [x, *module.parameters()] if x.requires_grad else [x]
        return Impl(make_step(lambda: module(x), mode, leaves), leaves)

    return {"liger_kernel": liger, "apex": apex}


# ---------------------------------------------------------------------------------------------
# BatchNorm (training mode: batch statistics and running-buffer update)
# ---------------------------------------------------------------------------------------------

def _batch_norm_cases(env: Env) -> list[Case]:
    dtype = torch.float32  # running statistics and parameters in the input's dtype, as a model keeps them
    if not env.cuda:
        shapes = [(8, 16, 16, 16), (8, 64, 16, 16)]
    elif env.quick:
        shapes = [(64, 64, 56, 56), (64, 512, 14, 14)]
    else:
        shapes = [(64, 64, 56, 56), (64, 128, 28, 28), (64, 256, 28, 28), (64, 512, 14, 14), (64, 2048, 7, 7)]
    e = torch.empty((), dtype=dtype).element_size()
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for shape in shapes:
            grad = mode == "fwd+bwd"
            c = shape[1]

            def make_inputs(shape=shape, grad=grad, c=c):
                x = _randn(shape, env, dtype, grad)
                w = _randn(c, env, dtype, grad, 0.1, 1.0)
                b = _randn(c, env, dtype, grad, 0.1)
                mean = torch.zeros(c, device=env.device, dtype=dtype)
                var = torch.ones(c, device=env.device, dtype=dtype)
                return (x, mean, var, w, b), [x, w, b]

            eager = lambda x, m, v, w, b: TF.batch_norm(x, m, v, w, b, training=True)
            call = lambda fn, x, m, v, w, b: fn(x, m, v, w, b, training=True)
            n = math.prod(shape)
            # fwd: x read, y written, weight/bias read, running mean/var read and written
            fwd = e * (2 * n + 6 * c)
            # bwd: x and dy read, dx written, weight read, dweight/dbias written, saved mean/rstd read
            bwd = e * (3 * n + 3 * c) + 8 * c
            cases.append(Case(
                "batch_norm", mode, f"{'x'.join(map(str, shape))} {dtype_name(dtype)}",
                {"shape": list(shape), "dtype": dtype_name(dtype)}, "GB/s", fwd + (bwd if grad else 0),
                n, "elements", f"batch_norm {mode}",
                _elementwise_impls(env, make_inputs, eager, "batch_norm", call, mode),
                priority=0 if shape == shapes[len(shapes) // 2] else 1))
    return cases


# ---------------------------------------------------------------------------------------------
# Dropout, and the fused dropout + residual add + LayerNorm
# ---------------------------------------------------------------------------------------------

def _token_sizes(env: Env) -> tuple[int, list[int], torch.dtype]:
    if not env.cuda:
        return 256, [256, 1024], torch.float32
    return 16384, ([1024, 4096] if env.quick else [768, 1024, 2048, 4096, 8192]), torch.bfloat16


def _dropout_cases(env: Env) -> list[Case]:
    rows, hiddens, dtype = _token_sizes(env)
    e = torch.empty((), dtype=dtype).element_size()
    p = 0.1
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for d in hiddens:
            grad = mode == "fwd+bwd"

            def make_inputs(d=d, grad=grad):
                x = _randn((rows, d), env, dtype, grad)
                return (x,), [x]

            n = rows * d
            # fwd: x read, y written; bwd: dy read, dx written (the mask is regenerated or read:
            # not counted, whatever the implementation keeps)
            work = e * 2 * n * (2 if grad else 1)
            cases.append(Case(
                "dropout", mode, f"{rows}x{d} {dtype_name(dtype)} p={p}",
                {"rows": rows, "hidden": d, "dtype": dtype_name(dtype), "p": p}, "GB/s", work, d,
                "hidden size", f"dropout {mode}",
                _elementwise_impls(env, make_inputs, lambda x: TF.dropout(x, p, True), "dropout",
                                   lambda fn, x: fn(x, p, True), mode),
                priority=0 if d == hiddens[len(hiddens) // 2] else 1))
    return cases


def _dropout_add_layer_norm_cases(env: Env) -> list[Case]:
    rows, hiddens, dtype = _token_sizes(env)
    e = torch.empty((), dtype=dtype).element_size()
    p, eps = 0.1, 1e-5
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for d in hiddens:
            grad = mode == "fwd+bwd"

            def make_inputs(d=d, grad=grad):
                x = _randn((rows, d), env, dtype, grad)
                r = _randn((rows, d), env, dtype, grad)
                w = _randn(d, env, dtype, grad, 0.1, 1.0)
                b = _randn(d, env, dtype, grad, 0.1)
                return (x, r, w, b), [x, r, w, b]

            def eager(x, r, w, b, d=d):
                pre = r + TF.dropout(x, p, True)
                return TF.layer_norm(pre, (d,), w, b, eps), pre

            call = lambda fn, x, r, w, b: fn(x, r, w, b, p, eps, True)
            n = rows * d
            # fwd: x, residual read; out, pre_norm_sum written; weight, bias; mean, rstd per row
            fwd = e * (4 * n + 2 * d) + 8 * rows
            # bwd: dout, d(pre_norm_sum), saved pre_norm_sum read; dx, dresidual written; weight
            # read, dweight, dbias written; mean, rstd read
            bwd = e * (5 * n + 3 * d) + 8 * rows
            cases.append(Case(
                "dropout_add_layer_norm", mode, f"{rows}x{d} {dtype_name(dtype)} p={p}",
                {"rows": rows, "hidden": d, "dtype": dtype_name(dtype), "p": p}, "GB/s",
                fwd + (bwd if grad else 0), d, "hidden size", f"dropout_add_layer_norm {mode}",
                _elementwise_impls(env, make_inputs, eager, "dropout_add_layer_norm", call, mode),
                priority=0 if d == hiddens[len(hiddens) // 2] else 1))
    return cases


# ---------------------------------------------------------------------------------------------
# Embedding lookup, and BERT's fused embedding block
# ---------------------------------------------------------------------------------------------

def _embedding_sizes(env: Env) -> tuple[int, int, list[int], torch.dtype]:
    if not env.cuda:
        return 512, 1000, [64, 256], torch.float32
    return 16384, 30522, ([768, 4096] if env.quick else [768, 1024, 2048, 4096]), torch.bfloat16


def _embedding_cases(env: Env) -> list[Case]:
    tokens, vocab, dims, dtype = _embedding_sizes(env)
    e = torch.empty((), dtype=dtype).element_size()
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for d in dims:
            grad = mode == "fwd+bwd"

            def make_inputs(d=d, grad=grad):
                ids = torch.randint(0, vocab, (tokens,), device=env.device)
                w = _randn((vocab, d), env, dtype, grad)
                return (ids, w), [w]

            # fwd: ids read, one row per token read, output written
            fwd = 8 * tokens + e * 2 * tokens * d
            # bwd: dout and ids read, the dense weight gradient written (every row, zeros included)
            bwd = 8 * tokens + e * (tokens * d + vocab * d)
            impls = _elementwise_impls(env, make_inputs, lambda ids, w: TF.embedding(ids, w), "embedding",
                                       lambda fn, ids, w: fn(ids, w), mode)
            cases.append(Case(
                "embedding", mode, f"{tokens} tokens, {vocab}x{d} {dtype_name(dtype)}",
                {"tokens": tokens, "vocab": vocab, "dim": d, "dtype": dtype_name(dtype)}, "GB/s",
                fwd + (bwd if grad else 0), d, "embedding dim", f"embedding {mode}", impls,
                priority=0 if d == dims[0] else 1))
    return cases


def _bert_embeddings_cases(env: Env) -> list[Case]:
    if env.cuda:
        batch, seq, vocab, dims, dtype = 32, 512, 30522, ([768] if env.quick else [768, 1024]), torch.bfloat16
    else:
        batch, seq, vocab, dims, dtype = 4, 32, 1000, [64], torch.float32
    positions, types, p, eps = 512, 2, 0.1, 1e-12
    e = torch.empty((), dtype=dtype).element_size()
    tokens = batch * seq
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for d in dims:
            grad = mode == "fwd+bwd"

            def make_inputs(d=d, grad=grad):
                ids = torch.randint(1, vocab, (batch, seq), device=env.device)
                tt = torch.randint(0, types, (batch, seq), device=env.device)
                tables = [_randn((n, d), env, dtype, grad, 0.02) for n in (vocab, positions, types)]
                w = _randn(d, env, dtype, grad, 0.1, 1.0)
                b = _randn(d, env, dtype, grad, 0.1)
                return (ids, tt, *tables, w, b), [*tables, w, b]

            def eager(ids, tt, word, pos, typ, w, b, d=d):
                x = TF.embedding(ids, word, padding_idx=0) + pos[:seq] + TF.embedding(tt, typ)
                return TF.dropout(TF.layer_norm(x, (d,), w, b, eps), p, True)

            call = lambda fn, ids, tt, word, pos, typ, w, b: fn(
                ids, tt, None, word, pos, typ, w, b, eps, p, True, padding_idx=0)
            # fwd: word/type ids read, a word row per token read, the position rows (seq of them)
            # and the type table once (each tensor counted once: they stay in cache), output
            # written, LayerNorm parameters
            fwd = 16 * tokens + e * (2 * tokens * d + (seq + types) * d + 2 * d)
            # bwd: dout read, the saved normalised output (or the sum) read, the three dense table
            # gradients and dweight/dbias written
            bwd = 16 * tokens + e * (2 * tokens * d + (vocab + positions + types) * d + 3 * d)
            cases.append(Case(
                "bert_embeddings", mode, f"{batch}x{seq} tokens, hidden {d} {dtype_name(dtype)}",
                {"batch": batch, "seq": seq, "vocab": vocab, "hidden": d, "dtype": dtype_name(dtype), "p": p},
                "GB/s", fwd + (bwd if grad else 0), d, "hidden size", f"bert_embeddings {mode}",
                _elementwise_impls(env, make_inputs, eager, "bert_embeddings", call, mode),
                priority=0 if d == dims[0] else 1))
    return cases


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, causal: bool,
                    mode: str) -> float:
    """4·B·H·L·S·D for the forward, ×3.5 for forward + backward, halved when causal."""
    flops = 4.0 * batch * heads * q_len * k_len * head_dim
    if mode == "fwd+bwd":
        flops *= 3.5
    return flops / 2 if causal else flops


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(QKᵀ/√D [+ causal mask]) V, written out as a user would (the (L, S) scores
    materialised; softmax in float32)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if causal:
        q_len, k_len = scores.shape[-2:]
        hidden = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).triu(k_len - q_len + 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def _attention_sizes(env: Env) -> tuple[int, int, list[int], list[int], torch.dtype]:
    """(tokens = batch·L, hidden = heads·D, head dims, sequence lengths, dtype)."""
    if not env.cuda:
        return 256, 128, [64], [64, 128], torch.float32
    lengths = [1024, 4096, 16384] if env.quick else [512, 1024, 2048, 4096, 8192, 16384]
    return 16384, 2048, ([128] if env.quick else [64, 128]), lengths, torch.bfloat16


def _attention_cases(env: Env) -> list[Case]:
    tokens, hidden, head_dims, lengths, dtype = _attention_sizes(env)
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for causal in (False, True):
            for d in head_dims:
                heads = hidden // d
                for length in lengths:
                    batch = max(1, tokens // length)
                    shape = (batch, heads, length, d)
                    grad = mode == "fwd+bwd"
                    cases.append(Case(
                        "attention", mode,
                        f"B={batch} H={heads} L={length} D={d}{' causal' if causal else ''} "
                        f"{dtype_name(dtype)}",
                        {"batch": batch, "heads": heads, "seq": length, "head_dim": d, "causal": causal,
                         "dtype": dtype_name(dtype), "tokens": batch * length},
                        "TFLOP/s", attention_flops(batch, heads, length, length, d, causal, mode), length,
                        "sequence length (batch·L fixed)",
                        f"attention {mode} D={d}{' causal' if causal else ''}",
                        _attention_impls(env, shape, causal, mode, grad, dtype),
                        priority=0 if (d == head_dims[-1] and length == lengths[len(lengths) // 2]) else 1))
    cases.append(_bert_attention_case(env))
    return cases


def _bert_attention_case(env: Env) -> Case:
    """BERT-base's attention in training: 12 heads of 64, L = 512 (16 sequences on a GPU), a
    (B, 1, 1, S) bool padding mask of a realistic length mix, dropout 0.1, forward + backward.
    FLOPs are counted over the whole padded (L, S) square, as every implementation computes it."""
    batch, heads, length, d, dtype = (16, 12, 512, 64, torch.bfloat16) if env.cuda else (2, 2, 64, 64,
                                                                                          torch.float32)
    # Sequence lengths spread over [L/8, L] (real batches: most sentences far shorter than L).
    lengths = torch.linspace(length // 8, length, batch).round().long()
    mask = (torch.arange(length)[None, :] < lengths[:, None]).view(batch, 1, 1, length).to(env.device)
    shape, p = (batch, heads, length, d), 0.1

    def qkv():
        return [_randn(shape, env, dtype, True) for _ in range(3)]

    def build_fastdl(backward: str | None = None) -> Builder:
        def build() -> Impl:
            fn = fastdl_function("scaled_dot_product_attention")
            q, k, v = qkv()
            impl = _fastdl_impl(lambda: fn(q, k, v, attn_mask=mask, dropout_p=p), "fwd+bwd", [q, k, v], q)
            if backward is not None:
                impl = Impl(_with_attention_backward(impl.step, backward), impl.leaves, impl.backend)
            return impl
        return build

    def torch_call(forward: Callable, compiled: bool = False) -> Builder:
        def build() -> Impl:
            fn = _compiled(forward) if compiled else forward
            q, k, v = qkv()
            return Impl(make_step(lambda: fn(q, k, v), "fwd+bwd", [q, k, v]), [q, k, v])
        return build

    def eager(q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) * d ** -0.5
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)
        return torch.matmul(TF.dropout(probs, p), v)

    impls: dict[str, Builder] = {"fastdl": build_fastdl(), "eager": torch_call(eager)}
    if env.cuda:
        impls["fastdl_atomic_dq"] = build_fastdl("atomic")
    if env.compile:
        impls["compile"] = torch_call(eager, compiled=True)
    # SDPA with whichever backend PyTorch picks for a bool mask with dropout (not flash: it takes
    # no mask), and its memory-efficient one by name.
    impls["sdpa"] = torch_call(lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                               dropout_p=p))
    return Case("attention", "fwd+bwd", f"BERT B={batch} H={heads} L={length} D={d} padding mask dropout {p} "
                f"{dtype_name(dtype)}",
                {"batch": batch, "heads": heads, "seq": length, "head_dim": d, "causal": False, "bert": True,
                 "dropout": p, "dtype": dtype_name(dtype), "tokens": batch * length,
                 "real_tokens": int(lengths.sum())},
                "TFLOP/s", attention_flops(batch, heads, length, length, d, False, "fwd+bwd"), length,
                "sequence length", "attention BERT fwd+bwd (padding mask, dropout)",
                impls, priority=0)


def _with_attention_backward(step: Callable[[], None], value: str) -> Callable[[], None]:
    """``step`` with FASTDL_ATTENTION_BACKWARD set to ``value`` while it runs (fastdl reads it at
    each backward call)."""
    def run() -> None:
        previous = os.environ.get("FASTDL_ATTENTION_BACKWARD")
        os.environ["FASTDL_ATTENTION_BACKWARD"] = value
        try:
            step()
        finally:
            if previous is None:
                del os.environ["FASTDL_ATTENTION_BACKWARD"]
            else:
                os.environ["FASTDL_ATTENTION_BACKWARD"] = previous
    return run


def _attention_impls(env: Env, shape, causal: bool, mode: str, grad: bool, dtype) -> dict[str, Builder]:
    def qkv(layout_bhld: bool = True):
        b, h, length, d = shape
        dims = (b, h, length, d) if layout_bhld else (b, length, h, d)
        tensors = [_randn(dims, env, dtype, grad) for _ in range(3)]
        return tensors

    def build_fastdl() -> Impl:
        fn = fastdl_function("scaled_dot_product_attention")
        q, k, v = qkv()
        return _fastdl_impl(lambda: fn(q, k, v, is_causal=causal), mode, [q, k, v], q)

    def build_eager() -> Impl:
        q, k, v = qkv()
        return Impl(make_step(lambda: eager_attention(q, k, v, causal), mode, [q, k, v]), [q, k, v])

    def build_compile() -> Impl:
        compiled = _compiled(eager_attention)
        q, k, v = qkv()
        return Impl(make_step(lambda: compiled(q, k, v, causal), mode, [q, k, v]), [q, k, v])

    def sdpa(backend_name: str) -> Builder:
        def build() -> Impl:
            attention = peer("torch.nn.attention")
            backend = getattr(attention.SDPBackend, backend_name, None)
            if backend is None:
                raise Unavailable(f"this PyTorch has no SDPBackend.{backend_name}")
            q, k, v = qkv()

            def forward():
                with attention.sdpa_kernel(backend):
                    return TF.scaled_dot_product_attention(q, k, v, is_causal=causal)

            return Impl(make_step(forward, mode, [q, k, v]), [q, k, v])
        return build

    def build_flash_attn() -> Impl:
        flash_attn = peer("flash_attn")
        if dtype not in (torch.float16, torch.bfloat16):
            raise Unavailable("flash_attn takes fp16/bf16 only")
        q, k, v = qkv(layout_bhld=False)  # flash_attn's own (B, L, H, D) layout
        return Impl(make_step(lambda: flash_attn.flash_attn_func(q, k, v, causal=causal), mode, [q, k, v]),
                    [q, k, v])

    def build_fastdl_atomic() -> Impl:
        impl = build_fastdl()
        return Impl(_with_attention_backward(impl.step, "atomic"), impl.leaves, impl.backend)

    impls: dict[str, Builder] = {"fastdl": build_fastdl, "eager": build_eager}
    if env.compile:
        impls["compile"] = build_compile
    if env.cuda and grad:
        impls["fastdl_atomic_dq"] = build_fastdl_atomic
    if env.cuda:
        impls["sdpa_flash"] = sdpa("FLASH_ATTENTION")
        impls["sdpa_cudnn"] = sdpa("CUDNN_ATTENTION")
        impls["sdpa_efficient"] = sdpa("EFFICIENT_ATTENTION")
        impls["flash_attn"] = build_flash_attn
    return impls


# ---------------------------------------------------------------------------------------------
# Training steps: BERT-base masked LM, ViT-B/16
# ---------------------------------------------------------------------------------------------

def _train_step(model: torch.nn.Module, batch: Callable[[], dict], loss_of: Callable,
                extra: dict | None = None) -> Callable[[], None]:
    """forward, backward, AdamW step (fused on CUDA), gradients dropped. ``extra``: further
    keyword arguments of the model's forward (fastdl's own options)."""
    fused = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                                  **({"fused": True} if fused else {}))
    inputs = {**batch(), **(extra or {})}

    def step() -> None:
        loss = loss_of(model(**inputs))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _model_flops(tokens: int, batch: int, seq: int, layers: int, hidden: int, intermediate: int,
                 extra_matmul_params: int) -> float:
    """3 × forward: 2·tokens·(matmul parameters) + 4·B·L²·hidden per layer (QKᵀ and PV)."""
    matmul_params = layers * (4 * hidden * hidden + 2 * hidden * intermediate) + extra_matmul_params
    forward = 2.0 * tokens * matmul_params + 4.0 * batch * seq * seq * hidden * layers
    return 3 * forward


def _hf_model(cls_name: str, config_name: str, fields: dict) -> torch.nn.Module:
    transformers = peer("transformers")
    config = getattr(transformers, config_name)(**fields)
    cls = getattr(transformers, cls_name)
    try:
        return cls._from_config(config, attn_implementation="sdpa")
    except (AttributeError, TypeError, ValueError):
        return cls(config)


def _model_impls(env: Env, dtype: torch.dtype, make_batch: Callable[[], dict], fastdl_model: Callable,
                 hf_names: tuple[str, str], fields: dict,
                 fastdl_variants: dict[str, tuple[dict, dict]] | None = None) -> dict[str, Builder]:
    """Training-step builders for one model: fastdl's, the Hugging Face model in eager mode and,
    where enabled, that model and fastdl's under torch.compile. ``fastdl_variants`` maps an
    implementation name to (config overrides, forward keyword arguments) of a fastdl model
    (default: one "fastdl" with neither)."""

    def build(make_model, extra=None) -> Builder:
        def builder() -> Impl:
            model = make_model().to(device=env.device, dtype=dtype).train()
            return Impl(_train_step(model, make_batch, lambda out: out.loss, extra), [], None)
        return builder

    def fastdl_builder(overrides: dict, extra: dict, compiled: bool = False) -> Builder:
        def builder() -> Impl:
            if compiled:
                torch._dynamo.reset()
            impl = build(lambda: torch.compile(fastdl_model(**overrides)) if compiled
                         else fastdl_model(**overrides), extra)()
            probe = torch.empty(0, device=env.device)
            impl.backend = importlib.import_module("fastdl.backend").resolve(probe)
            return impl
        return builder

    def eager_model():
        return _hf_model(*hf_names, fields)

    def compile_builder() -> Impl:
        torch._dynamo.reset()
        return build(lambda: torch.compile(eager_model()))()

    variants = fastdl_variants or {"fastdl": ({}, {})}
    impls: dict[str, Builder] = {name: fastdl_builder(*v) for name, v in variants.items()}
    impls["eager"] = build(eager_model)
    if env.compile:
        impls["compile"] = compile_builder
        # fastdl's operators are opaque to Inductor: it compiles the rest of the step around them.
        impls["fastdl + torch.compile"] = fastdl_builder({}, {}, compiled=True)
    return impls


def _bert_cases(env: Env) -> list[Case]:
    if env.cuda:
        fields = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072)
        batch, seq, dtype, label = 32, 512, torch.bfloat16, "BERT-base"
    else:
        fields = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=256)
        batch, seq, dtype, label = 2, 32, torch.float32, "BERT-tiny"

    lengths = padded_lengths(batch, seq)

    def make_batch():
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(5, fields["vocab_size"], (batch, seq), generator=gen)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask
        scored = (torch.rand(batch, seq, generator=gen) < 0.15) & mask.bool()
        labels = torch.where(scored, ids, torch.full_like(ids, -100))
        return {"input_ids": ids.to(env.device), "attention_mask": mask.to(env.device),
                "labels": labels.to(env.device)}

    def fastdl_model(**overrides):
        config = fastdl_attr("models", "BertConfig")(**fields, **overrides)
        return fastdl_attr("models", "BertForMaskedLM")(config)

    # fastdl unpadded (the default on the kernel path) and padded, side by side; both skip the
    # (tokens, vocab) logits output the loss does not need.
    variants = {"fastdl": ({"unpad": True}, {"return_logits": False}),
                "fastdl padded": ({"unpad": False}, {"return_logits": False})}
    impls = _model_impls(env, dtype, make_batch, fastdl_model, ("BertForMaskedLM", "BertConfig"), fields,
                         variants)
    h, i, v = fields["hidden_size"], fields["intermediate_size"], fields["vocab_size"]
    flops = bert_flops(lengths.tolist(), fields["num_hidden_layers"], h, i, v, padded_to=None)
    tokens = int(lengths.sum())
    share = f"{tokens} real tokens, {tokens / (batch * seq):.0%}"
    return [Case("bert_train", "train", f"{label} {batch}x{seq} ({share}) {dtype_name(dtype)}",
                 {"batch": batch, "seq": seq, "tokens": tokens, "dtype": dtype_name(dtype), **fields},
                 "TFLOP/s", flops, tokens, "tokens", "bert_train", impls, priority=0)]


def padded_lengths(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """A realistic mix of sentence-pair lengths for a batch padded to ``seq``: log-normal, median
    about 40% of ``seq`` (as English pre-training and GLUE-style data packed to 128 or 512),
    clipped to [8, seq]; one row is full length, so the padded shape is really needed."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(batch, generator=gen) * 0.5) * 0.4 * seq
    lengths = lengths.round().clamp(min(8, seq), seq).long()
    lengths[0] = seq
    return lengths


def bert_flops(lengths: Sequence[int], layers: int, hidden: int, intermediate: int, vocab: int,
               padded_to: int | None) -> float:
    """Training FLOPs (3 x forward) of a BERT encoder + MLM transform over sequences of ``lengths``
    tokens, every one of them through the vocabulary projection as an unfused head would;
    ``padded_to``: as computed on the padded batch (every sequence that long)."""
    lengths = [padded_to] * len(lengths) if padded_to is not None else list(lengths)
    tokens = sum(lengths)
    matmul = layers * (4 * hidden * hidden + 2 * hidden * intermediate) + hidden * hidden + vocab * hidden
    attention = 4.0 * hidden * layers * sum(n * n for n in lengths)
    return 3 * (2.0 * tokens * matmul + attention)


def _vit_cases(env: Env) -> list[Case]:
    if env.cuda:
        fields = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      image_size=224, patch_size=16, num_labels=1000)
        batch, dtype, label = 64, torch.bfloat16, "ViT-B/16"
    else:
        fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                      image_size=32, patch_size=8, num_labels=10)
        batch, dtype, label = 4, torch.float32, "ViT-tiny"
    size, patch = fields["image_size"], fields["patch_size"]
    seq = (size // patch) ** 2 + 1

    def make_batch():
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(batch, 3, size, size, generator=gen)
        labels = torch.randint(0, fields["num_labels"], (batch,), generator=gen)
        return {"pixel_values": pixels.to(env.device, dtype), "labels": labels.to(env.device)}

    def fastdl_model():
        config = fastdl_attr("models", "ViTConfig")(**fields)
        return fastdl_attr("models", "ViTForImageClassification")(config)

    impls = _model_impls(env, dtype, make_batch, fastdl_model,
                         ("ViTForImageClassification", "ViTConfig"), fields)
    h, i = fields["hidden_size"], fields["intermediate_size"]
    patch_params = 3 * patch * patch * h
    # the patch projection runs on seq - 1 tokens, the classifier on one per image: both small
    flops = _model_flops(batch * seq, batch, seq, fields["num_hidden_layers"], h, i, patch_params)
    return [Case("vit_train", "train", f"{label} {batch}x{size}² ({seq} tokens) {dtype_name(dtype)}",
                 {"batch": batch, "seq": seq, "dtype": dtype_name(dtype), **fields}, "TFLOP/s", flops,
                 batch * seq, "tokens", "vit_train", impls, priority=0)]


# ---------------------------------------------------------------------------------------------
# Fused linear + cross-entropy (an MLM / LM head)
# ---------------------------------------------------------------------------------------------

def _linear_cross_entropy_cases(env: Env) -> list[Case]:
    """BERT's MLM head at 16 x 512 tokens, 768 hidden, a 30,522-word vocabulary (smaller on a CPU).
    Work: the three matmuls of the logits and their gradients, 2·N·H·V each (one in ``fwd``)."""
    if env.cuda:
        n, h, v, dtype = 16 * 512, 768, 30522, torch.bfloat16
    else:
        n, h, v, dtype = 512, 64, 1000, torch.float32
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"

        def make_inputs(grad=grad):
            hidden = _randn((n, h), env, dtype, grad)
            weight = _randn((v, h), env, dtype, grad, h ** -0.5)
            bias = _randn(v, env, dtype, grad, 0.1)
            target = torch.randint(0, v, (n,), device=env.device)
            return (hidden, weight, bias, target), (hidden, weight, bias)

        def liger(make_inputs=make_inputs, mode=mode) -> Impl:
            loss_fn = peer("liger_kernel.transformers").LigerFusedLinearCrossEntropyLoss()
            (hidden, weight, bias, target), leaves = make_inputs()
            return Impl(make_step(lambda: loss_fn(weight, hidden, target, bias), mode, leaves), leaves)

        eager = lambda hidden, weight, bias, target: TF.cross_entropy(TF.linear(hidden, weight, bias), target)
        call = lambda fn, hidden, weight, bias, target: fn(hidden, weight, target, bias)
        cases.append(Case(
            "linear_cross_entropy", mode, f"{n}x{h} -> {v} {dtype_name(dtype)}",
            {"tokens": n, "hidden": h, "vocab": v, "dtype": dtype_name(dtype)}, "TFLOP/s",
            2.0 * n * h * v * (3 if grad else 1), n, "tokens", f"linear_cross_entropy {mode}",
            _elementwise_impls(env, make_inputs, eager, "linear_cross_entropy", call, mode,
                               {"liger_kernel": liger}),
            priority=0))
    return cases


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

OPS: dict[str, Callable[[Env], list[Case]]] = {
    "layer_norm": lambda env: _norm_cases(env, "layer_norm"),
    "rms_norm": lambda env: _norm_cases(env, "rms_norm"),
    "batch_norm": _batch_norm_cases,
    "dropout": _dropout_cases,
    "embedding": _embedding_cases,
    "dropout_add_layer_norm": _dropout_add_layer_norm_cases,
    "bert_embeddings": _bert_embeddings_cases,
    "attention": _attention_cases,
    "linear_cross_entropy": _linear_cross_entropy_cases,
    "bert_train": _bert_cases,
    "vit_train": _vit_cases,
}

# What must exist in fastdl for an op to be timed at all.
REQUIRES: dict[str, tuple[str, str]] = {
    "layer_norm": ("functional", "layer_norm"),
    "rms_norm": ("functional", "rms_norm"),
    "batch_norm": ("functional", "batch_norm"),
    "dropout": ("functional", "dropout"),
    "embedding": ("functional", "embedding"),
    "dropout_add_layer_norm": ("functional", "dropout_add_layer_norm"),
    "bert_embeddings": ("functional", "bert_embeddings"),
    "attention": ("functional", "scaled_dot_product_attention"),
    "linear_cross_entropy": ("functional", "linear_cross_entropy"),
    "bert_train": ("models", "BertForMaskedLM"),
    "vit_train": ("models", "ViTForImageClassification"),
}


def availability(op: str) -> str | None:
    """None when fastdl has what ``op`` needs, else the reason it is not available."""
    module, name = REQUIRES[op]
    try:
        fastdl_attr(module, name)
    except Unavailable as err:
        return str(err)
    except Exception as err:  # an op whose import itself fails is reported, not fatal
        return f"importing fastdl.{module} failed: {type(err).__name__}: {err}"
    return None


def cases(op: str, env: Env) -> list[Case]:
    """The cases of ``op`` for this machine, numbered in order."""
    out = OPS[op](env)
    for i, case in enumerate(out):
        case.index = i
    return out
