"""The launches each kernel file can make, for the ahead-of-time compile gate (compile_report).

One function per file of ``kernels/`` calls that file's launchers on small CPU tensors with every
branch they can take: dtypes, row-width classes, masks, causality, dropout, grouped heads, mask
gradients. Nothing executes: ``compile_report`` records the compile request of each launch (and of
each config of an autotuned kernel) and compiles it for a GPU target. Shapes keep tensor strides
multiples of 16 elements ("aligned"), as real models have, unless a case says otherwise.

A new kernel file needs a function here: the gate fails on any ``@triton.jit`` kernel that no
function launches. A new branch in an existing launcher is picked up as soon as these calls reach
it; the gate also fails when a boolean constexpr is only ever seen with one value.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable

import torch

SPECS: dict[str, Callable[[], None]] = {}  # "<kernel file>[ <part>]" -> the launches
# The label of the launches being recorded (compile_report reads it).
CASE = {"name": ""}
# The dropout seed the kernels load: a (1,) int64 tensor.
_SEED = torch.tensor([7], dtype=torch.int64)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The kernels other than attention also compute float64 inputs (in float64) on a GPU.
WITH_FLOAT64 = FLOAT_DTYPES + (torch.float64,)


def spec(family: str):
    """Register the function that makes every launch of ``kernels/<family>.py``."""
    def register(fn):
        SPECS[family] = fn
        return fn
    return register


@contextlib.contextmanager
def case(name: str):
    CASE["name"], previous = name, CASE["name"]
    try:
        yield
    finally:
        CASE["name"] = previous


def kernels(family: str):
    return importlib.import_module(f"fastdl.kernels.{family}")


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# Row widths: one of each launch class of the norm-style kernels (warps 1, 2, 4, 8, 16 for a row
# in registers; a row longer than MAX_FUSED_ELEMENTS streamed). 1024 is the "aligned" case of the
# vectorised-load check; 61 and 20011 are awkward.
ROW_WIDTHS = (61, 300, 1024, 4096, 16384, 20011)


@spec("layer_norm")
def layer_norm_launches():
    ln = kernels("layer_norm")
    for dtype in WITH_FLOAT64:
        for N in ROW_WIDTHS:
            with case(f"{_dt(dtype)} N={N}" + (" aligned" if N % 16 == 0 else "")):
                x = torch.randn(3, N).to(dtype)
                w, b = torch.randn(N).to(dtype), torch.randn(N).to(dtype)
                for weight, bias in ((w, b), (None, None)):
                    y, mean, rstd = ln.layer_norm_fwd(x, weight, bias, 1e-5)
                    ln.layer_norm_bwd(x, x, weight, mean, rstd, bias is not None)
                    y, rstd = ln.rms_norm_fwd(x, weight, 1e-5)
                    ln.rms_norm_bwd(x, x, weight, rstd)
                # p = 0 launches the kernels with DROPOUT=False (no random numbers at all).
                for (residual, weight, bias), (p, seed) in zip(((x, w, b), (None, None, None)),
                                                               ((0.1, _SEED), (0.0, None))):
                    out, pre, mean, rstd = ln.dropout_add_layer_norm_fwd(x, residual, weight, bias, p,
                                                                         1e-5, seed)
                    for dpre in (x, None):
                        ln.dropout_add_layer_norm_bwd(x, dpre, pre, weight, mean, rstd, p, seed, dtype,
                                                      None if residual is None else dtype,
                                                      None if bias is None else dtype)


@spec("dropout")
def dropout_launches():
    dropout = kernels("dropout")
    for dtype in WITH_FLOAT64:
        with case(f"{_dt(dtype)} aligned"):
            dropout.dropout_fwd(torch.randn(4096).to(dtype), 0.1, _SEED)
    with case("mask"):
        dropout.keep_mask((4096,), 0.1, _SEED, "cpu")


@spec("batch_norm")
def batch_norm_launches():
    bn = kernels("batch_norm")
    for dtype in WITH_FLOAT64:
        # (N, C, S) contiguous (S a multiple of 4: r-vectors; S odd: none), channels_last (C a
        # multiple of 16: channel vectors), (N, C).
        for name, x in (("nchw aligned", torch.randn(4, 8, 6, 6)), ("nchw odd", torch.randn(2, 3, 7, 7)),
                        ("channels_last", torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)),
                        ("channels_last aligned", torch.randn(2, 64, 3, 3).to(memory_format=torch.channels_last)),
                        ("nc aligned", torch.randn(64, 256))):
            x = x.to(dtype)
            C = x.shape[1]
            w, b = torch.randn(C), torch.randn(C)
            with case(f"{_dt(dtype)} {name}"):
                for training in (True, False):
                    for weight, bias, running in ((w, b, True), (None, None, False)):
                        rm, rv = (torch.zeros(C), torch.ones(C)) if running or not training else (None, None)
                        y, mean, rstd = bn.batch_norm_fwd(x, weight, bias, rm, rv, training, 0.1, 1e-5)
                        bn.batch_norm_bwd(x, x, weight, mean, rstd, training, True)
                        if not training:
                            bn.batch_norm_bwd(x, x, weight, mean, rstd, training, False)


@spec("embedding")
def embedding_launches():
    emb = kernels("embedding")
    for dtype in WITH_FLOAT64:
        for N in (61, 768, 4096):
            label = f"{_dt(dtype)} N={N}" + (" aligned" if N % 16 == 0 else "")
            with case(label):
                weight = torch.randn(100, N).to(dtype)
                idx = torch.randint(0, 100, (64,))
                emb.embedding_fwd(idx, weight)
                emb.embedding_bwd(torch.randn(64, N).to(dtype), idx, 100, None, False, dtype)
                # A run of one index longer than a piece: the two-pass segment sum, by frequency.
                long_idx = torch.cat([idx, torch.full((600,), 5)])
                emb.embedding_bwd(torch.randn(664, N).to(dtype), long_idx, 100, 0, True, dtype)
        with case(f"{_dt(dtype)} bert aligned"):
            N = 768
            ids = [torch.randint(0, n, (64,)) for n in (100, 32, 2)]
            tables = [torch.randn(n, N).to(dtype) for n in (100, 32, 2)]
            w, b = torch.randn(N).to(dtype), torch.randn(N).to(dtype)
            for p, weight, bias in ((0.1, w, b), (0.0, None, None)):
                out, mean, rstd = emb.bert_embeddings_fwd(*ids, *tables, weight, bias, 1e-12, p, _SEED)
                emb.bert_embeddings_bwd(out, *ids, *tables, weight, mean, rstd, p, _SEED, 0,
                                        (True, True, True), None if bias is None else dtype)


# Attention variants: (label, causal, mask kind, dropout, GQA, mask gradient, atomic dQ). Full mode crosses
# them with every dtype, head-dim class and config; the CI cover picks launches that reach each.
# Mask kinds: "bool" / "float" vary along the query rows (whole tiles read); "bool keys" / "float
# keys" are padding masks, one row of keys per batch entry (one vector per key tile).
# The atomic-dQ variants launch the forward and the dK/dV kernel only (which then adds dQ).
ATTENTION_VARIANTS = [
    ("plain", False, None, 0.0, False, False, False),
    ("causal", True, None, 0.0, False, False, False),
    ("bool mask", False, "bool keys", 0.0, False, False, False),
    ("float mask+grad", False, "float", 0.0, False, True, False),
    ("causal dropout gqa", True, None, 0.1, True, False, False),
    ("causal float mask+grad dropout gqa", True, "float", 0.1, True, True, False),
    ("causal bool row mask gqa", True, "bool", 0.0, True, False, False),
    ("float padding mask+grad dropout", False, "float keys", 0.1, False, True, False),
    ("atomic dq", False, None, 0.0, False, False, True),
    ("causal atomic dq dropout gqa", True, None, 0.1, True, False, True),
    ("atomic dq bool padding mask dropout", False, "bool keys", 0.1, False, False, True),
    ("causal atomic dq float row mask", True, "float", 0.0, False, False, True),
]
HEAD_DIMS = (64, 128, 256)


@spec("attention")
def attention_launches():
    attention = kernels("attention")
    B, H, L, S = 1, 4, 128, 128
    for dtype in FLOAT_DTYPES:
        for D in HEAD_DIMS:
            for name, causal, mask_kind, p, gqa, mask_grad, atomic in ATTENTION_VARIANTS:
                with case(f"{_dt(dtype)} D={D} {name}"):
                    H_kv = H // 2 if gqa else H
                    q = torch.randn(B, H, L, D).to(dtype)
                    k, v = torch.randn(B, H_kv, S, D).to(dtype), torch.randn(B, H_kv, S, D).to(dtype)
                    mask = None
                    if mask_kind == "bool keys":  # a padding mask, read through stride-0 axes
                        mask = torch.rand(B, 1, 1, S) > 0.2
                    elif mask_kind == "bool":
                        mask = torch.rand(L, S) > 0.2
                    elif mask_kind == "float keys":
                        mask = torch.randn(B, 1, 1, S).to(dtype)
                    elif mask_kind == "float":
                        mask = torch.randn(B, H, L, S).to(dtype)
                    o, lse = attention.attention_fwd(q, k, v, mask, causal, None, p, _SEED)
                    attention.attention_bwd(o, q, k, v, o, lse, mask, causal, None, p, _SEED, mask_grad,
                                            atomic)
        # A value head dim wider than the query/key one: their blocks (and chunks) differ.
        with case(f"{_dt(dtype)} D=64 Dv=128 plain"):
            q, k, v = torch.randn(B, H, L, 64).to(dtype), torch.randn(B, H, S, 64).to(dtype), torch.randn(
                B, H, S, 128).to(dtype)
            o, lse = attention.attention_fwd(q, k, v, None, False, None, 0.0, None)
            attention.attention_bwd(o, q, k, v, o, lse, None, False, None, 0.0, None, False)


@spec("attention varlen")
def varlen_attention_launches():
    """Packed sequences (varlen mode): the same kernels with per-sequence bounds."""
    attention = kernels("attention")
    H, D = 4, 64
    cu = torch.tensor([0, 50, 128, 200], dtype=torch.int32)
    for dtype in FLOAT_DTYPES:
        for label, causal, p, atomic in (("", False, 0.0, False), (" causal dropout", True, 0.1, False),
                                         (" causal dropout atomic dq", True, 0.1, True)):
            with case(f"{_dt(dtype)} varlen{label}"):
                q, k, v = (torch.randn(200, H, D).to(dtype) for _ in range(3))
                o, lse = attention.varlen_attention_fwd(q, k, v, cu, cu, 78, 78, causal, None, p, _SEED)
                attention.varlen_attention_bwd(o, q, k, v, o, lse, cu, cu, 78, 78, causal, None, p, _SEED,
                                               atomic)


@spec("cross_entropy")
def cross_entropy_launches():
    ce = kernels("cross_entropy")
    for dtype in WITH_FLOAT64:
        for V in (1000, 30522):  # one block, and a vocabulary streamed in blocks
            with case(f"{_dt(dtype)} V={V}"):
                logits = torch.randn(8, V).to(dtype)
                hard, soft = torch.randint(0, V, (8,)), torch.softmax(torch.randn(8, V), -1).to(dtype)
                loss = torch.empty(8)
                for target in (hard, soft):
                    for grad_scale in (None, torch.ones(1), torch.ones(8)):
                        ce.cross_entropy_chunk(logits, target, -100, 0.1, grad_scale, loss)
