"""fastdl.functional.embedding on every backend against float64 gather / index_add math."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, check_op

import fastdl
import fastdl.functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (num_embeddings, embedding_dim, index shape): odd dims, a (B, L) batch, a flat vector with many
# repeats of few rows, a 0-d index, BERT-like width, a single row.
CASES = [(1000, 33, (4, 7)), (7, 96, (50,)), (1000, 33, ()), (50, 768, (3, 5)), (1, 9, (6,))]


def ref_embedding(idx, weight, padding_idx=None, scale_grad_by_freq=False):
    """weight[idx] in float64 by index_select, whose backward is index_add. The padding row is
    detached (no gradient); with scale_grad_by_freq each row's gradient is divided by its count."""
    num = weight.shape[0]
    if scale_grad_by_freq:
        counts = torch.bincount(idx.reshape(-1), minlength=num).clamp(min=1).to(weight.dtype)
        weight = weight.detach() + (weight - weight.detach()) / counts[:, None]
    if padding_idx is not None:
        pad = padding_idx % num
        is_pad = (torch.arange(num, device=weight.device) == pad)[:, None]
        weight = torch.where(is_pad, weight.detach(), weight)
    return weight.index_select(0, idx.reshape(-1)).view(*idx.shape, weight.shape[1])


def _weight(num, dim, dtype, device):
    return torch.randn(num, dim, device=device).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num,dim,shape", CASES)
def test_embedding(backend, device, dtype, num, dim, shape):
    idx = torch.randint(0, num, shape, device=device)
    w = _weight(num, dim, dtype, device)
    check_op(lambda w: F.embedding(idx, w), lambda w: ref_embedding(idx, w), [w],
             baseline_fn=lambda w: TF.embedding(idx, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_heavily_repeated_indices_are_deterministic(backend, device, dtype):
    """200 tokens over 3 rows: every row's run is longer than one program's piece, so the sum is
    split over programs and recombined. The gradient must match float64 index_add and be
    bitwise identical run to run."""
    idx = torch.randint(0, 3, (8, 25), device=device)
    idx[0, :] = 1  # one row far more often than the others
    w = _weight(3, 40, dtype, device)
    check_op(lambda w: F.embedding(idx, w), lambda w: ref_embedding(idx, w), [w],
             baseline_fn=lambda w: TF.embedding(idx, w))
    dy = torch.randn(8, 25, 40, device=device).to(dtype)
    grads = []
    for _ in range(2):
        w.grad = None
        F.embedding(idx, w).backward(dy)
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_empty_and_int32_and_noncontiguous_indices(backend, device):
    w = _weight(30, 17, torch.float32, device)
    for idx in (torch.empty(0, 4, dtype=torch.int64, device=device),
                torch.randint(0, 30, (6, 5), device=device, dtype=torch.int32),
                torch.randint(0, 30, (5, 6), device=device).t()):
        check_op(lambda w, idx=idx: F.embedding(idx, w), lambda w, idx=idx: ref_embedding(idx.long(), w), [w])
        w.grad = None


@pytest.mark.parametrize("sparse", [False, True])
def test_zero_width_table(backend, device, sparse):
    """An embedding dim of 0: an empty output and a (V, 0) gradient, as torch."""
    w = torch.randn(5, 0, device=device, requires_grad=True)
    idx = torch.randint(0, 5, (3, 4), device=device)
    out = F.embedding(idx, w, sparse=sparse)
    assert out.shape == (3, 4, 0)
    out.sum().backward()
    assert w.grad.shape == (5, 0)


def test_noncontiguous_weight(backend, device):
    base = torch.randn(40, 2 * 21, device=device)
    w = base[:, ::2].requires_grad_()  # a strided leaf
    idx = torch.randint(0, 40, (9,), device=device)
    check_op(lambda w: F.embedding(idx, w), lambda w: ref_embedding(idx, w), [w])


@pytest.mark.parametrize("padding_idx", [0, 4, -1, -3])
def test_padding_idx(backend, device, padding_idx):
    num = 9
    idx = torch.randint(0, num, (5, 8), device=device)
    idx[0, :3] = padding_idx % num  # the padding row is certainly looked up
    w = _weight(num, 21, torch.float32, device)
    check_op(lambda w: F.embedding(idx, w, padding_idx=padding_idx),
             lambda w: ref_embedding(idx, w, padding_idx=padding_idx), [w])
    assert torch.all(w.grad[padding_idx % num] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_scale_grad_by_freq(backend, device, dtype, padding_idx):
    idx = torch.randint(0, 6, (70,), device=device)  # counts around 12, some pieces split
    idx[:40] = 5  # one run longer than a program's piece
    w = _weight(6, 19, dtype, device)
    check_op(lambda w: F.embedding(idx, w, padding_idx=padding_idx, scale_grad_by_freq=True),
             lambda w: ref_embedding(idx, w, padding_idx=padding_idx, scale_grad_by_freq=True), [w],
             baseline_fn=lambda w: TF.embedding(idx, w, padding_idx, scale_grad_by_freq=True))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5])
def test_max_norm_renormalises_in_place_like_torch(backend, device, norm_type):
    """The rows looked up are scaled in place to norm <= max_norm before the lookup; the rest are
    untouched. fastdl and torch.nn.functional.embedding must leave the same weight behind."""
    w0 = torch.randn(20, 13, device=device) * 3
    idx = torch.randint(0, 12, (4, 6), device=device)  # rows 12.. are never looked up
    ours = w0.clone().requires_grad_()
    theirs = w0.clone().requires_grad_()
    out = F.embedding(idx, ours, max_norm=1.5, norm_type=norm_type)
    ref = TF.embedding(idx, theirs, max_norm=1.5, norm_type=norm_type)
    assert_close("renormalised weight", ours.detach(), theirs.detach(), rtol=1e-6)
    assert torch.equal(ours.detach()[12:], w0[12:])
    looked_up = ours.detach()[idx.unique()].norm(p=norm_type, dim=1)
    assert torch.all(looked_up <= 1.5 * (1 + 1e-5))
    assert_close("output", out, ref, rtol=1e-6)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    assert_close("weight grad", ours.grad, theirs.grad, rtol=1e-6)


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_sparse_gradient(backend, device, padding_idx):
    idx = torch.randint(0, 10, (4, 5), device=device)
    idx[0, 0] = 3
    w = _weight(10, 7, torch.float32, device)
    out = F.embedding(idx, w, padding_idx=padding_idx, sparse=True)
    dy = torch.randn_like(out)
    out.backward(dy)
    assert w.grad.is_sparse
    ref_w = w.detach().double().requires_grad_()
    ref_embedding(idx, ref_w, padding_idx=padding_idx).backward(dy.double())
    assert_close("sparse grad", w.grad.to_dense(), ref_w.grad)


def test_sparse_padding_row_stays_zero_with_inf_gradients(backend, device):
    """The padding row's sparse gradient is 0 even where the incoming gradient is inf (as torch's,
    which drops those rows), never inf * 0 = NaN."""
    w = _weight(4, 2, torch.float32, device)
    out = F.embedding(torch.tensor([0, 2, 1], device=device), w, padding_idx=2, sparse=True)
    grad = torch.ones(3, 2, device=device)
    grad[1, 0] = float("inf")
    out.backward(grad)
    dense = w.grad.to_dense()
    assert torch.equal(dense[2], torch.zeros(2, device=device)) and torch.isfinite(dense).all()


def test_sparse_with_scale_grad_by_freq_fails_in_backward_as_torch(backend, device):
    w = _weight(10, 7, torch.float32, device)
    out = F.embedding(torch.tensor([1, 1, 2], device=device), w, scale_grad_by_freq=True, sparse=True)
    with pytest.raises(RuntimeError, match="scale_grad_by_freq"):
        out.sum().backward()


def test_float64_gradcheck(backend, device):
    idx = torch.randint(0, 5, (3, 4), device=device)
    w = torch.randn(5, 6, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: F.embedding(idx, w, padding_idx=None), (w,), fast_mode=True)


@pytest.mark.parametrize("bad", [10, -1, 1000])
def test_out_of_range_index_raises_index_error_naming_it(backend, device, bad, monkeypatch):
    """CPU tensors: at the call. CUDA tensors check on the device unless the eager check is on
    (a failed device-side assertion would end the CUDA context: tests/test_hot_paths.py)."""
    if device == "cuda":
        monkeypatch.setenv("FASTDL_EAGER_INDEX_CHECK", "1")
    w = _weight(10, 4, torch.float32, device)
    idx = torch.tensor([[0, 3], [bad, 2]], device=device)
    with pytest.raises(IndexError, match=f"index {bad}"):
        F.embedding(idx, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool, torch.int16])
def test_non_integer_indices_raise_type_error(backend, device, dtype):
    w = _weight(10, 4, torch.float32, device)
    with pytest.raises(TypeError, match="input"):
        F.embedding(torch.tensor([1, 2], device=device).to(dtype), w)


def test_bad_arguments(backend, device):
    w = _weight(10, 4, torch.float32, device)
    idx = torch.tensor([1, 2], device=device)
    with pytest.raises(ValueError, match="padding_idx"):
        F.embedding(idx, w, padding_idx=10)
    with pytest.raises(ValueError, match="padding_idx"):
        F.embedding(idx, w, padding_idx=-11)
    with pytest.raises(ValueError, match="weight"):
        F.embedding(idx, torch.randn(10, device=device))
    with pytest.raises(TypeError, match="weight"):
        F.embedding(idx, torch.ones(10, 4, dtype=torch.complex64, device=device))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_tables_are_looked_up_as_by_torch(backend, device, dtype):
    """PyTorch looks rows up in integer and bool tables (no gradient): so does fastdl, padding row
    and negative padding index included, and a bad index still raises naming it."""
    w = torch.randint(0, 2 if dtype == torch.bool else 100, (10, 5), device=device).to(dtype)
    idx = torch.randint(0, 10, (3, 4), device=device)
    for pad in (None, 2, -1):
        out = F.embedding(idx, w, padding_idx=pad)
        assert out.dtype == dtype and torch.equal(out, torch.nn.functional.embedding(idx, w, padding_idx=pad))
    if device == "cpu":
        with pytest.raises(IndexError, match="input"):
            F.embedding(torch.tensor([3, 10]), w)


def test_torch_and_kernel_paths_agree_bitwise_forward(device):
    """A gather is a copy: every backend returns exactly the weight's rows."""
    w = torch.randn(100, 37, device=device)
    idx = torch.randint(0, 100, (3, 11), device=device)
    with fastdl.backend.use("torch"):
        expected = F.embedding(idx, w)
    assert torch.equal(F.embedding(idx, w), expected)
