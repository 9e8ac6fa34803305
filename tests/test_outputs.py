"""Outputs behave as the outputs of the PyTorch ops they stand for: they are tensors of their own
(not views of a kernel's buffer), so they can be changed in place while autograd records --
``y = layer_norm(x); y.relu_()``, ``h = embedding(ids); h += pos`` -- and the gradients are those
of the same in-place code run on PyTorch's ops in float64. They never alias an input either.
"""

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close

import fastdl.functional as F


def _norms(device):
    x = torch.randn(6, 40, device=device)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    return x, w, b


def _bert_inputs(device):
    ids = torch.randint(0, 50, (2, 7), device=device)
    types = torch.randint(0, 2, (2, 7), device=device)
    pos = torch.arange(7, device=device).expand(2, 7)
    tables = [torch.randn(n, 24, device=device) for n in (50, 7, 2)]
    return (ids, types, pos, *tables, torch.randn(24, device=device), torch.randn(24, device=device))


def _torch_bert(ids, types, pos, word, position, token_type, w, b):
    s = TF.embedding(ids, word) + TF.embedding(pos, position) + TF.embedding(types, token_type)
    return TF.layer_norm(s, (word.shape[1],), w, b, 1e-12)


def _varlen_ref(q, k, v, cu):
    bounds = cu.tolist()
    pieces = [TF.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
              for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(pieces)


def _varlen_inputs(device):
    cu = torch.tensor([0, 5, 19, 24], dtype=torch.int32, device=device)
    return [torch.randn(24, 2, 16, device=device) for _ in range(3)] + [cu]


def _bn_inputs(device):
    return (torch.randn(4, 3, 5, device=device), torch.randn(3, device=device), torch.randn(3, device=device))


# name -> (inputs on a device: differentiable tensors first, then the others; count of the first;
#          fastdl call; PyTorch call)
CASES = {
    "layer_norm": (_norms, 3, lambda x, w, b: F.layer_norm(x, (40,), w, b),
                   lambda x, w, b: TF.layer_norm(x, (40,), w, b)),
    "rms_norm": (_norms, 2, lambda x, w, b: F.rms_norm(x, (40,), w),
                 lambda x, w, b: TF.rms_norm(x, (40,), w)),
    "batch_norm": (_bn_inputs, 3, lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                   lambda x, w, b: TF.batch_norm(x, None, None, w, b, True)),
    "dropout_add_layer_norm": (
        lambda d: (*_norms(d), torch.randn(6, 40, device=d)), 4,
        lambda x, w, b, r: F.dropout_add_layer_norm(x, r, w, b, 0.0),
        lambda x, w, b, r: (TF.layer_norm(r + x, (40,), w, b), r + x)),
    "embedding": (lambda d: (torch.randn(30, 8, device=d), torch.randint(0, 30, (3, 4), device=d)), 1,
                  lambda w, i: F.embedding(i, w), lambda w, i: TF.embedding(i, w)),
    "bert_embeddings": (lambda d: _bert_inputs(d)[3:] + _bert_inputs(d)[:3], 5,
                        lambda word, pos_t, type_t, w, b, ids, types, pos: F.bert_embeddings(
                            ids, types, pos, word, pos_t, type_t, w, b, 1e-12, 0.0, True),
                        lambda word, pos_t, type_t, w, b, ids, types, pos: _torch_bert(
                            ids, types, pos, word, pos_t, type_t, w, b)),
    "linear_cross_entropy": (
        lambda d: (torch.randn(10, 16, device=d), torch.randn(37, 16, device=d),
                   torch.randint(0, 37, (10,), device=d)), 2,
        lambda h, w, t: F.linear_cross_entropy(h, w, t, reduction="none"),
        lambda h, w, t: TF.cross_entropy(h @ w.T, t, reduction="none")),
}


# Attention saves its output for the backward, as PyTorch's flash and memory-efficient kernels do:
# an in-place change is then caught by autograd's version check, on both.
ATTENTION = {
    "scaled_dot_product_attention": (
        lambda d: [torch.randn(2, 2, 9, 16, device=d) for _ in range(3)], 3,
        F.scaled_dot_product_attention, TF.scaled_dot_product_attention),
    "varlen_attention": (_varlen_inputs, 3, lambda q, k, v, cu: F.varlen_attention(q, k, v, cu, cu, 14, 14),
                         _varlen_ref),
}


def _as_list(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _run(call, inputs, grads_out=None):
    """Outputs of ``call``, each changed in place (times 2 plus 1), then the gradients of the
    inputs that require grad under ``grads_out`` (random when None). The add & norm's second
    output, the normalised sum, stays: its backward reads it, so an in-place change makes it raise
    (as PyTorch's LayerNorm does when its input is changed)."""
    outs = _as_list(call(*inputs))
    for o in outs[:1] if len(outs) == 2 else outs:
        o.mul_(2).add_(1)
    if grads_out is None:
        grads_out = [torch.randn_like(o, dtype=torch.float64) for o in outs]
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads_out)])
    return outs, grads_out


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_change_in_place_under_autograd(backend, device, name):
    make, n_diff, ours, theirs = CASES[name]
    inputs = list(make(device))
    for t in inputs[:n_diff]:
        t.requires_grad_(True)
    for o in _as_list(ours(*inputs)):
        for t in inputs:
            shared = o.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            assert not shared, f"{name}: an output aliases an input"
    outs, grads_out = _run(ours, inputs)
    refs = [t.detach().double().requires_grad_(i < n_diff) if t.is_floating_point() else t
            for i, t in enumerate(inputs)]
    ref_outs, _ = _run(theirs, refs, grads_out)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert_close(f"{name} output {i}", o, r.detach())
    for i in range(n_diff):
        assert_close(f"{name} grad of input {i}", inputs[i].grad, refs[i].grad)


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_outputs_are_tensors_of_their_own(backend, device, name):
    """The in-place change is caught by the version check of the saved output when the backward
    runs, as with PyTorch's flash kernel -- not at once by autograd's check of views made inside a
    custom function, which would mean the output is a view of a kernel's buffer."""
    make, n_diff, ours, theirs = ATTENTION[name]
    inputs = list(make(device))
    for t in inputs[:n_diff]:
        t.requires_grad_(True)
    out = ours(*inputs)
    ref = theirs(*(t.detach().double() if t.is_floating_point() else t for t in inputs))
    assert_close(name, out.detach(), ref)
    qkv = [torch.randn(1, 2, 9, 16, device=device, requires_grad=True) for _ in range(3)]
    # (CUDA's flash kernel takes no float32: the memory-efficient one, which also saves its output)
    sdpa = torch.nn.attention.SDPBackend
    with torch.nn.attention.sdpa_kernel([sdpa.FLASH_ATTENTION, sdpa.EFFICIENT_ATTENTION]):
        expected = TF.scaled_dot_product_attention(*qkv)
    for o in (out, expected):
        o.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            o.sum().backward()


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_dropout_output_changes_in_place(backend, device, p):
    """The dropout output changed in place: the gradient is 2 x the mask / (1 - p), the mask read
    back from the output (the inputs have no zeros). (At p = 0 or in evaluation dropout returns
    its input itself, as PyTorch's.)"""
    x = (torch.rand(64, 33, device=device) + 0.5).requires_grad_(True)
    y = F.dropout(x, p)
    kept = (y != 0).double()
    y.mul_(2).sum().backward()
    assert_close("grad", x.grad, 2 * kept / (1 - p))


def test_add_norm_pre_sum_is_new_without_residual(backend, device):
    """``pre_norm_sum`` of a call without residual and without dropout is a new tensor on every
    backend, never the input itself (the operator's outputs cannot alias it)."""
    x = torch.randn(3, 8, device=device)
    for kwargs in ({"p": 0.0}, {"p": 0.5, "training": False}):
        out, pre = F.dropout_add_layer_norm(x, None, None, None, **kwargs)
        assert pre is not x and pre.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        assert torch.equal(pre, x)
