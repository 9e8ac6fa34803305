"""Parity with PyTorch's implementation on PyTorch's own test inputs, on every backend.

Every public fastdl function with a torch twin runs over the sample inputs and error inputs of the
matching OpInfo in ``torch.testing._internal.common_methods_invocations.op_db``; outputs,
gradients, mutated arguments (running statistics, ``max_norm`` renormalisation) and exception
types are compared with torch's op on the same inputs. Dropout is random: its output is judged by
structure (every element is 0 or a scaled copy; NaN and inf propagate as torch's do). The rest
of the module pins down the divergences this guard was written for: rms_norm's default eps at
small magnitudes, double backward, meta tensors, degenerate shapes and mixed dtypes.

Where fastdl differs on purpose, :data:`DOCUMENTED_DIFFERENCES` names the README sentence that
says so, and a test checks the sentence is there.
"""

from __future__ import annotations

import copy
import pathlib
import re

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close

# PyTorch's OpInfo database imports its test utilities, which need expecttest (the dev extra;
# on a machine without it, e.g. a GPU machine, carry its wheel: benchmarks/README.md)
pytest.importorskip("expecttest", reason="torch's OpInfo database needs expecttest (pip install expecttest)")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

import fastdl
import fastdl.functional as F
from fastdl.backend import BackendError
from fastdl.functional._library import seeded
from fastdl.functional._random import draw_seed

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()

DOCUMENTED_DIFFERENCES = {
    "argument errors": "fastdl's own argument checks raise `TypeError` (dtypes), `ValueError` "
                       "(shapes and values) or `IndexError` (indices) where PyTorch raises "
                       "`RuntimeError`.",
    "1-d batch norm": "`batch_norm` takes (N, C, *) inputs of at least two dims; PyTorch also "
                      "accepts a 1-D input of zero elements.",
    "forced kernel backend": "a forced `triton`/`interpret` backend raises `BackendError` saying why",
    "dropout stream": "The kernel path's dropout masks come from its own counter-based generator: "
                      "the same distribution as PyTorch's, another random stream.",
    "torch-path dropout stream": "On the torch backend, fastdl's dropout draws a seed from torch's "
                                 "generator and runs PyTorch's dropout with a generator seeded from "
                                 "it: the same distribution, another stream than calling PyTorch "
                                 "directly.",
}

# OpInfo name -> (fastdl function, how an OpInfo sample maps onto its arguments).
# The embedding OpInfo's op is ``lambda weight, idx, **kw: F.embedding(idx, weight, **kw)``.
OPS = {
    "nn.functional.layer_norm": lambda s: F.layer_norm(s.input, *s.args, **s.kwargs),
    "native_layer_norm": lambda s: F.layer_norm(s.input, *s.args),
    "nn.functional.rms_norm": lambda s: F.rms_norm(s.input, *s.args, **s.kwargs),
    "nn.functional.batch_norm": lambda s: F.batch_norm(s.input, *s.args, **s.kwargs),
    "nn.functional.dropout": lambda s: F.dropout(s.input, *s.args, **s.kwargs),
    "nn.functional.embedding": lambda s: F.embedding(s.args[0], s.input, *s.args[1:], **s.kwargs),
    "nn.functional.scaled_dot_product_attention":
        lambda s: F.scaled_dot_product_attention(s.input, *s.args, **s.kwargs),
}
SEED = 1234
OPINFOS = {name: [op for op in op_db if op.name == name and op.variant_test_name == ""][0] for name in OPS}


def _samples(name: str, device: str):
    samples = list(OPINFOS[name].sample_inputs(device, torch.float32, requires_grad=False))
    assert samples, f"the {name} OpInfo yields no samples"
    return samples


def _torch_result(name: str, sample):
    """torch's op on the sample (called directly: the OpInfos of random ops reseed inside)."""
    if name == "nn.functional.dropout":
        return TF.dropout(sample.input, *sample.args, **sample.kwargs)
    if name == "nn.functional.scaled_dot_product_attention":
        return TF.scaled_dot_product_attention(sample.input, *sample.args, **sample.kwargs)
    out = OPINFOS[name].op(sample.input, *sample.args, **sample.kwargs)
    return out[0] if name == "native_layer_norm" else out


def _differentiable(name: str, sample) -> list[torch.Tensor]:
    """The sample's floating tensors that get gradients (never batch norm's running buffers)."""
    tensors = [sample.input] + [a for a in sample.args if isinstance(a, torch.Tensor)]
    if name == "nn.functional.batch_norm":
        tensors = [sample.input] + [a for a in sample.args[2:4] if isinstance(a, torch.Tensor)]
    tensors += [v for k, v in sample.kwargs.items() if isinstance(v, torch.Tensor) and k == "attn_mask"]
    return [t for t in tensors if t.is_floating_point()]


def _mutable(name: str, sample) -> list[torch.Tensor]:
    """Arguments the op writes: running statistics; the table under max_norm."""
    if name == "nn.functional.batch_norm":
        return [a for a in sample.args[:2] if isinstance(a, torch.Tensor)]
    if name == "nn.functional.embedding":
        return [sample.input]
    return []


def _run(fn, name, sample):
    """(output, gradients, mutated args) or the exception raised."""
    sample = copy.deepcopy(sample)
    leaves = _differentiable(name, sample)
    for t in leaves:
        t.requires_grad_()
    try:
        torch.manual_seed(SEED)  # the same random stream for torch and fastdl's torch path
        out = fn(sample)
    except Exception as e:  # noqa: BLE001 -- the exception *is* the result compared
        return e
    grads = None
    if out.requires_grad and out.numel():
        torch.manual_seed(0)
        g = torch.randn_like(out)
        try:
            grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
        except Exception as e:  # noqa: BLE001 -- a backward that raises must raise on both sides
            return out.detach(), e, []
        grads = [None if x is None else (x.to_dense() if x.is_sparse else x) for x in grads]
    return out.detach(), grads, [t.detach() for t in _mutable(name, sample)]


def _check_dropout(sample, ours, theirs):
    x = sample.input
    p = sample.kwargs.get("p", 0.5)
    training = sample.kwargs.get("training", True)
    out, grads, _ = ours
    assert out.shape == theirs[0].shape and out.dtype == theirs[0].dtype
    if not training or p == 0.0 or p == 1.0:  # deterministic cases: exactly torch's
        torch.testing.assert_close(out, theirs[0], equal_nan=True)
        return
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))
    if grads is not None:  # the gradient applies the forward's mask and scale
        torch.manual_seed(0)
        g = torch.randn_like(out)
        torch.testing.assert_close(grads[0], torch.where(kept, g / (1 - p), 0.0))


def _attention_with_kernel_mask(sample):
    """torch's attention arithmetic with the kernel's dropout mask for the call after
    ``torch.manual_seed(SEED)`` (the counter of element (b, h, i, j) is its flat index)."""
    q, k, v = sample.input, *sample.args[:2]
    p, is_causal = sample.kwargs["dropout_p"], sample.kwargs.get("is_causal", False)
    torch.manual_seed(SEED)
    seed = draw_seed(q.device)
    L, S = q.shape[-2], k.shape[-2]
    keep = fastdl.backend.kernels("dropout").keep_mask(q.shape[:-1] + (S,), p, seed, q.device)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s, -1) * keep / (1 - p) @ v


def _attention_with_torch_path_stream(sample):
    """torch's attention with its generator seeded as fastdl's torch path seeds it, for the call
    after ``torch.manual_seed(SEED)``."""
    torch.manual_seed(SEED)
    with seeded(draw_seed(sample.input.device)):
        return TF.scaled_dot_product_attention(sample.input, *sample.args, **sample.kwargs)


def _tolerances(name):
    # atol 2e-4: torch's float32 LayerNorm of a one-element row gives x - mean a rounding error that
    # 1 / sqrt(eps) ~ 316 magnifies (fastdl's is exactly 0 there); OpInfo values reach |x| ~ 9
    return dict(rtol=2e-4, atol=2e-4)


def _compare(name, sample, ours, theirs):
    if isinstance(theirs, Exception):
        assert isinstance(ours, Exception), f"torch raises {type(theirs).__name__}: {theirs}; fastdl does not"
        _check_error_type(ours, theirs)
        return
    if isinstance(ours, BackendError):  # a call the kernel leaves to torch, under a forced backend
        assert "kernel cannot run this call" in str(ours), DOCUMENTED_DIFFERENCES["forced kernel backend"]
        return
    if isinstance(ours, Exception):
        if name == "nn.functional.batch_norm" and sample.input.dim() == 1:
            assert isinstance(ours, ValueError), DOCUMENTED_DIFFERENCES["1-d batch norm"]
            return
        raise AssertionError(f"fastdl raises where torch does not: {ours!r}") from ours
    if name == "nn.functional.dropout":
        return _check_dropout(sample, ours, theirs)
    out, grads, mutated = ours
    t_out, t_grads, t_mutated = theirs
    tol = _tolerances(name)
    assert out.dtype == t_out.dtype
    torch.testing.assert_close(out, t_out, equal_nan=True, **tol)
    if isinstance(t_grads, Exception) or isinstance(grads, Exception):
        assert isinstance(grads, Exception), f"torch's backward raises {t_grads!r}, fastdl's does not"
        return _check_error_type(grads, t_grads)
    assert (grads is None) == (t_grads is None)
    for a, b in zip(grads or (), t_grads or ()):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, equal_nan=True, **tol)
    for a, b in zip(mutated, t_mutated):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


def _check_error_type(ours: Exception, theirs: Exception) -> None:
    if type(ours) is type(theirs) or isinstance(ours, type(theirs)):
        return
    assert isinstance(theirs, RuntimeError) and isinstance(ours, (TypeError, ValueError, IndexError)), (
        f"torch raises {type(theirs).__name__} ({theirs}), fastdl {type(ours).__name__} ({ours})")
    # DOCUMENTED_DIFFERENCES["argument errors"]


@pytest.mark.parametrize("name", list(OPS))
def test_opinfo_samples(name, backend, device):
    """Every OpInfo sample input: output, gradients and mutated arguments equal torch's."""
    for i, sample in enumerate(_samples(name, device)):
        reference = lambda s: _torch_result(name, s)  # noqa: E731
        if name.endswith("attention") and sample.kwargs.get("dropout_p", 0.0) > 0:
            # torch's own stream differs (documented) on every path
            reference = (_attention_with_kernel_mask if backend != "torch"
                         else _attention_with_torch_path_stream)
        with fastdl.backend.use("torch"):
            theirs = _run(reference, name, sample)
        ours = _run(OPS[name], name, sample)
        try:
            _compare(name, sample, ours, theirs)
        except AssertionError as e:
            raise AssertionError(f"{name} sample {i} {sample}: {e}") from e


@pytest.mark.parametrize("name", list(OPS))
def test_opinfo_error_inputs(name, backend, device):
    """Every OpInfo error input raises on fastdl too, with torch's exception type or the documented
    argument-error type."""
    op = OPINFOS[name]
    errors = list(op.error_inputs(device)) if op.error_inputs_func is not None else []
    for error in errors:
        with pytest.raises(Exception) as info:
            OPS[name](error.sample_input)
        _check_error_type(info.value, error.error_type("x"))


def test_every_documented_difference_is_in_the_readme():
    flat = re.sub(r"\s+", " ", README)
    for key, sentence in DOCUMENTED_DIFFERENCES.items():
        assert sentence in flat, f"README.md lacks the sentence on {key!r}: {sentence}"


# ---------------------------------------------------------------------------------------------
# The divergences this guard was written for
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_rms_norm_default_eps_is_torchs_at_small_magnitude(backend, device, dtype):
    """eps=None: torch uses the computation dtype's epsilon (float32's for fp16/bf16/fp32), not the
    input dtype's; at |x| ~ 0.05 in bf16 the input dtype's eps (7.8e-3) changed results by ~25%."""
    x = (torch.randn(7, 64, device=device) * 0.05).to(dtype)
    w = torch.randn(64, device=device).to(dtype)
    ours, theirs = F.rms_norm(x, (64,), w), TF.rms_norm(x, (64,), w)
    assert ours.dtype == theirs.dtype
    ulp = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=ulp, atol=ulp)


def _f64(*shape, device):
    return torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)


def test_double_backward_norms_and_embedding(backend, device):
    """gradgradcheck in float64: second derivatives are exact, not zeros (kernel backward with
    create_graph=True takes torch's differentiable ops)."""
    if backend == "triton":
        pytest.skip("float64 gradgradcheck runs on the CPU backends")
    x, w, b = _f64(3, 5, device=device), _f64(5, device=device), _f64(5, device=device)
    assert torch.autograd.gradgradcheck(lambda x, w, b: F.layer_norm(x, (5,), w, b), (x, w, b),
                                        fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda x, w: F.rms_norm(x, (5,), w), (x, w), fast_mode=True)
    xb, wb, bb = _f64(4, 3, 2, device=device), _f64(3, device=device), _f64(3, device=device)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradgradcheck(lambda x, w, b: F.batch_norm(x, None, None, w, b, True), (xb, wb, bb),
                                        fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False), (xb, wb, bb),
                                        fast_mode=True)
    table, idx = _f64(7, 4, device=device), torch.tensor([[1, 3, 3], [6, 0, 1]])
    assert torch.autograd.gradgradcheck(lambda t: F.embedding(idx, t, padding_idx=0), (table,),
                                        fast_mode=True)


def test_double_backward_fused_ops(backend, device):
    if backend == "triton":
        pytest.skip("float64 gradgradcheck runs on the CPU backends")
    x, r = _f64(4, 6, device=device), _f64(4, 6, device=device)
    w, b = _f64(6, device=device), _f64(6, device=device)

    def add_norm(x, r, w, b):
        torch.manual_seed(5)
        out, pre = F.dropout_add_layer_norm(x, r, w, b, 0.3)
        return out, pre * pre  # a nonlinear use of pre_norm_sum too

    assert torch.autograd.gradgradcheck(add_norm, (x, r, w, b), fast_mode=True)
    ids = torch.tensor([[1, 2, 3], [4, 4, 0]])
    tables = [_f64(6, 4, device=device), _f64(5, 4, device=device), _f64(2, 4, device=device),
              _f64(4, device=device), _f64(4, device=device)]

    def bert(*t):
        torch.manual_seed(9)
        return F.bert_embeddings(ids, None, None, *t, 1e-12, 0.2, True)

    assert torch.autograd.gradgradcheck(bert, tables, fast_mode=True)

    def dropout(x):
        torch.manual_seed(2)
        return F.dropout(x, 0.4) ** 2

    assert torch.autograd.gradgradcheck(dropout, (x,), fast_mode=True)


@pytest.mark.parametrize("width", [6, 8])
def test_double_backward_fused_dropout_uses_the_forwards_mask(backend, device, width):
    """Gradients recorded with create_graph=True (and their derivatives) through the fused add & norm
    and the BERT embeddings with dropout, against float64 torch ops applying the mask the forward
    drew (read off its outputs); widths that are and are not multiples of 4 (the fused kernels
    count random numbers per row)."""
    p = 0.5
    x = torch.randn(3, width, device=device, requires_grad=True)
    r, w, b = (torch.randn(*s, device=device) for s in ((3, width), (width,), (width,)))
    out, pre = F.dropout_add_layer_norm(x, r, w, b, p)
    keep = ((pre - r).detach() != 0).double() / (1 - p)
    xr = x.detach().double().requires_grad_()
    ref = TF.layer_norm(r.double() + xr * keep, (width,), w.double(), b.double())
    g, h = torch.randn_like(out), torch.randn_like(x)
    dx, = torch.autograd.grad(out, x, g, create_graph=True)
    dxr, = torch.autograd.grad(ref, xr, g.double(), create_graph=True)
    assert_close("add & norm d x", dx, dxr, rtol=1e-5)
    assert_close("add & norm d(d x . h) / d x", torch.autograd.grad(dx, x, h)[0],
                 torch.autograd.grad(dxr, xr, h.double())[0], rtol=1e-4)

    ids = torch.tensor([[1, 2, 3, 0], [4, 4, 0, 2]], device=device)
    word, pos, typ = (torch.randn(n, width, device=device, requires_grad=True) for n in (6, 4, 2))
    emb = F.bert_embeddings(ids, None, None, word, pos, typ, None, None, 1e-12, p, True)
    refs = [t.detach().double().requires_grad_() for t in (word, pos, typ)]
    plain = TF.layer_norm(refs[0][ids] + refs[1][:4] + refs[2][0], (width,), eps=1e-12)
    keep = (emb.detach() != 0).double() / (1 - p)
    g = torch.randn_like(emb)
    dword, = torch.autograd.grad((emb * emb).sum() + (emb * g).sum(), word, create_graph=True)
    dword_ref, = torch.autograd.grad(((plain * keep) ** 2).sum() + (plain * keep * g.double()).sum(), refs[0],
                                     create_graph=True)
    assert_close("bert d word", dword, dword_ref, rtol=1e-5)
    h = torch.randn_like(dword)
    assert_close("bert d(d word . h) / d word", torch.autograd.grad(dword, word, h)[0],
                 torch.autograd.grad(dword_ref, refs[0], h.double())[0], rtol=1e-4)


def test_double_backward_attention(backend, device):
    """A gradient penalty through attention (causal, dropout, float mask): its gradient equals a
    float64 reference that applies the same dropout mask. (fp32: the kernel has no float64.)"""
    q = torch.randn(2, 2, 5, 16, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 16, device=device, requires_grad=True) for _ in range(2))
    mask = torch.randn(5, 7, device=device, requires_grad=True)
    sample = type("S", (), {})()
    sample.input, sample.args, sample.kwargs = q, (k, v), {"dropout_p": 0.3, "is_causal": False}

    def penalty(q, k, v, m, fn):
        out = fn(q, k, v, m)
        grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v, m), create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), (q, k, v, m))

    def ours(q, k, v, m):
        torch.manual_seed(SEED)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.3)

    def reference(q, k, v, m):
        if backend == "torch":
            torch.manual_seed(SEED)
            with seeded(draw_seed(device)):
                return TF.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.3)
        torch.manual_seed(SEED)
        keep = fastdl.backend.kernels("dropout").keep_mask((2, 2, 5, 7), 0.3, draw_seed(device), device)
        s = q @ k.transpose(-1, -2) / 4.0 + m
        return torch.softmax(s, -1) * keep / 0.7 @ v

    got = penalty(q, k, v, mask, ours)
    args64 = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    expected = penalty(*args64, reference) if backend != "torch" else penalty(q, k, v, mask, reference)
    for a, e in zip(got, expected):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-3, atol=1e-4)


def test_empty_normalized_shape_raises(backend, device):
    x = torch.randn(3, 4, device=device)
    for fn in (F.layer_norm, F.rms_norm):
        with pytest.raises(RuntimeError):
            TF.layer_norm(x, ()) if fn is F.layer_norm else TF.rms_norm(x, ())
        with pytest.raises(ValueError, match="normalized_shape"):  # DOCUMENTED_DIFFERENCES["argument errors"]
            fn(x, ())


def test_degenerate_shapes_match_torch(backend, device):
    """Size-0 normalised dims, attention with head dim 0 (uniform weights) and with zero heads."""
    x = torch.randn(3, 0, device=device)
    for ours, theirs in ((F.layer_norm(x, (0,)), TF.layer_norm(x, (0,))),
                         (F.rms_norm(x, (0,)), TF.rms_norm(x, (0,)))):
        assert ours.shape == theirs.shape == (3, 0)
    for q, k, v in (((2, 3, 5, 0), (2, 3, 4, 0), (2, 3, 4, 6)), ((2, 0, 5, 8), (2, 0, 4, 8), (2, 0, 4, 6))):
        q, k, v = (torch.randn(s, device=device, requires_grad=True) for s in (q, k, v))
        for causal in (False, True):
            ours = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            theirs = TF.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.testing.assert_close(ours, theirs)
            g = torch.randn_like(theirs)
            torch.testing.assert_close(torch.autograd.grad(ours, v, g), torch.autograd.grad(theirs, v, g))


def test_attention_shapes_that_do_not_broadcast_raise_value_error(backend, device):
    q = torch.randn(2, 3, 5, 8, device=device)
    for k in (torch.randn(3, 3, 4, 8, device=device), torch.randn(2, 2, 4, 8, device=device)):
        with pytest.raises(RuntimeError):
            TF.scaled_dot_product_attention(q, k, k)
        with pytest.raises(ValueError, match="broadcast"):
            F.scaled_dot_product_attention(q, k, k)


def test_mixed_parameter_dtypes_torch_rejects(backend, device):
    """fp32 input with fp64 (or mismatched) parameters: torch raises, so does every fastdl path;
    fp16/bf16 input with fp32 parameters (autocast's mix) is accepted as by torch."""
    x = torch.randn(4, 6, device=device)
    bad = [dict(weight=torch.randn(6, dtype=torch.float64, device=device)),
           dict(weight=torch.randn(6, device=device), bias=torch.randn(6, device=device).half())]
    for params in bad:
        with pytest.raises(RuntimeError):
            TF.layer_norm(x, (6,), **params)
        with pytest.raises(TypeError, match="dtype"):
            F.layer_norm(x, (6,), **params)
    xb = torch.randn(4, 6, 3, device=device)
    rm = torch.zeros(6, dtype=torch.float64, device=device)
    rv = torch.ones(6, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError):
        TF.batch_norm(xb, rm, rv, training=True)
    with pytest.raises(TypeError, match="running_mean"):
        F.batch_norm(xb, rm, rv, training=True)
    half = x.half()
    assert F.layer_norm(half, (6,), torch.randn(6, device=device)).dtype == torch.float16


def _meta_calls():
    m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    ids = torch.empty(2, 5, dtype=torch.long, device="meta")
    return {
        "layer_norm": lambda: F.layer_norm(m(2, 5, 8), (8,), m(8), m(8)),
        "rms_norm": lambda: F.rms_norm(m(2, 5, 8), (8,), m(8)),
        "batch_norm": lambda: F.batch_norm(m(4, 3, 5), m(3), m(3), m(3), m(3), True),
        "dropout": lambda: F.dropout(m(2, 5, 8), 0.3),
        "dropout_add_layer_norm": lambda: F.dropout_add_layer_norm(m(2, 5, 8), m(2, 5, 8), m(8), m(8),
                                                                   0.1)[0],
        "embedding": lambda: F.embedding(ids, m(11, 8)),
        "bert_embeddings": lambda: F.bert_embeddings(ids, None, None, m(11, 8), m(6, 8), m(2, 8), m(8), m(8),
                                                     1e-12, 0.1, True),
        "scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(
            m(2, 4, 5, 16), m(2, 4, 7, 16), m(2, 4, 7, 16), dropout_p=0.1, is_causal=True),
    }


@pytest.mark.parametrize("name", list(_meta_calls()))
@pytest.mark.parametrize("choice", ["auto", "torch", "interpret", "triton"])
def test_meta_tensors_on_every_backend_choice(name, choice):
    """Shapes only: every op returns a meta tensor of torch's shape and dtype, whatever backend is
    asked for (no kernel can run on meta tensors and none is needed)."""
    with fastdl.backend.use(choice):
        out = _meta_calls()[name]()
    assert out.device.type == "meta"
    assert out.dtype == torch.float32 and out.dim() >= 2


def test_models_build_and_run_on_meta():
    """As accelerate's init_empty_weights: build on the meta device, run shapes, then materialise."""
    from fastdl.models import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16)
    with torch.device("meta"):
        model = BertModel(config)
        nn_modules = torch.nn.Sequential(fastdl.nn.Embedding(10, 8), fastdl.nn.LayerNorm(8),
                                         fastdl.nn.RMSNorm(8), fastdl.nn.Dropout(0.1))
    ids = torch.randint(0, 50, (2, 7)).to("meta")
    out = model(ids, attention_mask=torch.ones(2, 7, dtype=torch.long, device="meta"))
    assert out.last_hidden_state.shape == (2, 7, 32) and out.last_hidden_state.device.type == "meta"
    assert nn_modules(torch.randint(0, 10, (3, 4)).to("meta")).shape == (3, 4, 8)
    real = BertModel(config)
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(model.eval()(ids).last_hidden_state, real.eval()(ids).last_hidden_state)


def test_fp16_attention_dropout_gradient_within_twice_plain_fp16_arithmetic(backend, device):
    """dQ, dK, dV of fp16 attention with dropout: error against float64 at most 2x that of the same
    computation in plain fp16 torch arithmetic (FlashAttention's acceptance rule), same mask."""
    if backend == "torch":
        pytest.skip("the torch path is PyTorch's own fp16 arithmetic")
    for (q_shape, k_shape, p) in [((4, 3, 8), (4, 3, 8), 0.5), ((2, 4, 17, 16), (2, 4, 23, 16), 0.5),
                                  ((1, 2, 33, 64), (1, 2, 45, 64), 0.3)]:
        for _ in range(3):
            q, k, v = (torch.randn(shape, device=device) for shape in (q_shape, k_shape, k_shape))
            do = torch.randn(q_shape, device=device)
            torch.manual_seed(SEED)
            L4 = (1,) * (4 - q.dim()) + tuple(q.shape[:-1]) + (k.shape[-2],)
            keep = fastdl.backend.kernels("dropout").keep_mask(L4, p, draw_seed(device), device)
            keep = keep.view(q.shape[:-1] + (k.shape[-2],))
            errors = {}
            for kind, dtype in (("ref", torch.float64), ("ours", torch.float16), ("fp16", torch.float16)):
                t = [x.to(dtype).requires_grad_() for x in (q, k, v)]
                if kind == "ours":
                    torch.manual_seed(SEED)
                    out = F.scaled_dot_product_attention(*t, dropout_p=p)
                else:
                    s = t[0] @ t[1].transpose(-1, -2) * q.shape[-1] ** -0.5
                    out = torch.softmax(s, -1) * keep.to(dtype) * (1 / (1 - p)) @ t[2]
                errors[kind] = torch.autograd.grad(out, t, do.to(dtype))
            for i, name in enumerate("qkv"):
                ref = errors["ref"][i]
                ours = (errors["ours"][i].double() - ref).norm() / ref.norm()
                plain = (errors["fp16"][i].double() - ref).norm() / ref.norm()
                assert ours <= 2 * plain + 1e-4, f"d{name} {q_shape} p={p}: {ours:.2e} vs fp16 {plain:.2e}"
