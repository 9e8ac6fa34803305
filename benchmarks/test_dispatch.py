"""Dispatch cost: a fastdl call on its PyTorch path against the PyTorch call it wraps.

    python -m pytest benchmarks/test_dispatch.py -q --benchmark-group-by=group
    python -m benchmarks.test_dispatch          # one table of ratios (one intra-op thread)

With ``fastdl.backend.use("torch")`` every fastdl function runs the very PyTorch ops it is compared
with, so the difference is fastdl's own per-call work: argument checks, the (cached) backend
choice and, where the functions are ``torch.library`` operators, the operator dispatch. Small
tensors (8, 64) make that overhead visible; medium ones show it vanish next to the work. Forward
only, no autograd recording (inputs do not require grad). ``custom_op floor`` times an identity
``torch.library.custom_op``: what any registered operator costs per call on this machine.
"""

from __future__ import annotations

import timeit

import pytest
import torch
import torch.nn.functional as TF

import fastdl
import fastdl.functional as F

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZES = {"small": (8, 64), "medium": (512, 1024)}


def _cases(rows: int, n: int):
    """op -> (fastdl call, torch call) on fresh inputs of ``rows`` x ``n``."""
    def randn(*shape):
        return torch.randn(*shape, device=DEVICE)

    x, r, w, b = randn(rows, n), randn(rows, n), randn(n), randn(n)
    mean, var = randn(n), randn(n).abs() + 0.5
    vocab = 1000
    ids = torch.randint(0, vocab, (rows,), device=DEVICE)
    table, positions, types = randn(vocab, n), randn(max(rows, 8), n), randn(2, n)
    pos_ids = torch.arange(rows, device=DEVICE)
    type_ids = torch.zeros(rows, dtype=torch.long, device=DEVICE)
    heads, head_dim = max(1, n // 64), 64
    seq = max(1, rows // 4)
    q = randn(1, heads, seq, head_dim)

    def torch_add_norm():
        pre = r + TF.dropout(x, 0.1)
        return TF.layer_norm(pre, (n,), w, b), pre

    def torch_bert():
        s = TF.embedding(ids, table) + TF.embedding(pos_ids, positions) + TF.embedding(type_ids, types)
        return TF.dropout(TF.layer_norm(s, (n,), w, b, 1e-12), 0.1)

    return {
        "layer_norm": (lambda: F.layer_norm(x, (n,), w, b), lambda: TF.layer_norm(x, (n,), w, b)),
        "rms_norm": (lambda: F.rms_norm(x, (n,), w), lambda: TF.rms_norm(x, (n,), w)),
        "batch_norm": (lambda: F.batch_norm(x, mean, var, w, b), lambda: TF.batch_norm(x, mean, var, w, b)),
        "dropout": (lambda: F.dropout(x, 0.1), lambda: TF.dropout(x, 0.1)),
        "dropout_add_layer_norm": (lambda: F.dropout_add_layer_norm(x, r, w, b, 0.1), torch_add_norm),
        "embedding": (lambda: F.embedding(ids, table), lambda: TF.embedding(ids, table)),
        "bert_embeddings": (lambda: F.bert_embeddings(ids, type_ids, pos_ids, table, positions, types, w, b,
                                                      1e-12, 0.1, True), torch_bert),
        "scaled_dot_product_attention": (lambda: F.scaled_dot_product_attention(q, q, q),
                                         lambda: TF.scaled_dot_product_attention(q, q, q)),
    }


OPS = list(_cases(8, 64))


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["torch", "fastdl"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op", OPS)
def test_dispatch(benchmark, op, size, impl):
    fastdl_call, torch_call = _cases(*SIZES[size])[op]
    call = fastdl_call if impl == "fastdl" else torch_call
    benchmark.group = f"dispatch {op} {size}"
    benchmark.extra_info.update(op=op, size=list(SIZES[size]), impl=impl, device=DEVICE)
    with fastdl.backend.use("torch"), torch.no_grad():
        call()  # first-call work (imports, caches) stays out of the timing

        def step():
            call()
            _sync()

        benchmark(step)


def _identity_op():
    @torch.library.custom_op("fastdl_bench::identity", mutates_args=())
    def identity(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    identity.register_fake(lambda x: torch.empty_like(x))
    return identity


def _best_us(fn, number: int) -> float:
    def step():
        fn()
        _sync()
    step()
    return min(timeit.repeat(step, number=number, repeat=9)) / number * 1e6


def main() -> None:
    torch.set_num_threads(1)
    identity = _identity_op()
    x = torch.randn(8, 64, device=DEVICE)
    floor, clone = _best_us(lambda: identity(x), 2000), _best_us(lambda: x.clone(), 2000)
    print(f"custom_op floor: {floor:.2f} us per call vs {clone:.2f} us for the clone it wraps "
          f"(+{floor - clone:.2f} us)")
    print(f"{'op':30s} {'size':7s} {'fastdl us':>10s} {'torch us':>9s} {'ratio':>6s} {'extra us':>9s}")
    with fastdl.backend.use("torch"), torch.no_grad():
        for size, shape in SIZES.items():
            for op, (ours, theirs) in _cases(*shape).items():
                number = 2000 if size == "small" else 100
                a, t = _best_us(ours, number), _best_us(theirs, number)
                print(f"{op:30s} {size:7s} {a:10.2f} {t:9.2f} {a / t:6.2f} {a - t:9.2f}")


if __name__ == "__main__":
    main()
