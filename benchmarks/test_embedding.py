"""Embedding lookup and the fused BERT embedding block: PyTorch vs fastdl, forward and forward +
backward.

    python -m pytest benchmarks/test_embedding.py -q --benchmark-group-by=group

Each group holds one op, size, dtype and mode, timed for ``torch`` (``torch.nn.functional``
composed as a model would) and ``fastdl`` (``fastdl.functional``: the Triton kernels on CUDA, the
PyTorch path on a CPU). The group name carries the bytes one step must move (each tensor read or
written once; the backward writes the dense weight gradient, every row of it), so
``bytes / mean time`` is the achieved bandwidth.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastdl.functional as F
from benchmarks.conftest import CUDA, DEVICE, DTYPE_NAMES, fastdl_backend_for, make_step

DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]
MODES = ["fwd", "fwd+bwd"]
# (tokens, vocab, dim): a BERT-base batch on a GPU, smaller on a CPU where the point is overhead.
EMBEDDING_SIZES = [(16384, 30522, 768), (16384, 30522, 4096)] if CUDA else [(2048, 1000, 256)]
# (batch, seq, vocab, hidden)
BERT_SIZES = [(32, 512, 30522, 768), (32, 512, 30522, 1024)] if CUDA else [(8, 128, 1000, 256)]
POSITIONS, TYPES, P, EPS = 512, 2, 0.1, 1e-12


def _size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _param(*shape, dtype, grad, scale=1.0, shift=0.0):
    return (torch.randn(shape, device=DEVICE) * scale + shift).to(dtype).requires_grad_(grad)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB moved"


@pytest.mark.parametrize("impl", ["torch", "fastdl"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("tokens,vocab,dim", EMBEDDING_SIZES)
def test_embedding(bench, tokens, vocab, dim, dtype, mode, impl):
    grad = mode == "fwd+bwd"
    ids = torch.randint(0, vocab, (tokens,), device=DEVICE)
    w = _param(vocab, dim, dtype=dtype, grad=grad)
    fn = TF.embedding if impl == "torch" else F.embedding
    step = make_step(lambda: fn(ids, w), mode, leaves=(w,))
    e = _size(dtype)
    moved = 8 * tokens + 2 * e * tokens * dim  # ids, the rows read, the output written
    if grad:
        moved += 8 * tokens + e * (tokens * dim + vocab * dim)  # ids, dout, the dense gradient
    bench(step, group=f"embedding {tokens} tokens {vocab}x{dim} {DTYPE_NAMES[dtype]} {mode} ({_mib(moved)})",
          impl=impl, backend="torch" if impl == "torch" else fastdl_backend_for(w), bytes=moved)


def _torch_bert_embeddings(ids, type_ids, word, position, token_type, ln_w, ln_b):
    """Hugging Face BERT's embedding block as separate PyTorch ops."""
    seq = ids.shape[1]
    x = TF.embedding(ids, word, padding_idx=0) + TF.embedding(type_ids, token_type) + position[:seq]
    return TF.dropout(TF.layer_norm(x, (word.shape[1],), ln_w, ln_b, EPS), P, True)


def _fastdl_bert_embeddings(ids, type_ids, word, position, token_type, ln_w, ln_b):
    return F.bert_embeddings(ids, type_ids, None, word, position, token_type, ln_w, ln_b, EPS, P, True,
                             padding_idx=0)


@pytest.mark.parametrize("impl", ["torch", "fastdl"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("batch,seq,vocab,hidden", BERT_SIZES)
def test_bert_embeddings(bench, batch, seq, vocab, hidden, dtype, mode, impl):
    grad = mode == "fwd+bwd"
    ids = torch.randint(1, vocab, (batch, seq), device=DEVICE)
    type_ids = torch.randint(0, TYPES, (batch, seq), device=DEVICE)
    tables = [_param(n, hidden, dtype=dtype, grad=grad, scale=0.02) for n in (vocab, POSITIONS, TYPES)]
    ln = [_param(hidden, dtype=dtype, grad=grad, scale=0.1, shift=1.0),
          _param(hidden, dtype=dtype, grad=grad, scale=0.1)]
    fn = _torch_bert_embeddings if impl == "torch" else _fastdl_bert_embeddings
    step = make_step(lambda: fn(ids, type_ids, *tables, *ln), mode, leaves=(*tables, *ln))
    e, tokens = _size(dtype), batch * seq
    moved = 16 * tokens + 4 * e * tokens * hidden  # ids, three rows per token, the output
    if grad:  # dout, ids, the three dense table gradients
        moved += 16 * tokens + e * (tokens * hidden + (vocab + POSITIONS + TYPES) * hidden)
    bench(step, group=f"bert_embeddings {batch}x{seq} vocab {vocab} hidden {hidden} {DTYPE_NAMES[dtype]} "
                      f"{mode} ({_mib(moved)})",
          impl=impl, backend="torch" if impl == "torch" else fastdl_backend_for(ids), bytes=moved)
