"""fastdl.functional.dropout on every backend: mask statistics, scaling, the backward's mask,
seeding, and torch's edge-case semantics.

The torch path is PyTorch's own dropout, whose random stream differs from the kernel's, so the
tests judge the mask by its statistics and check every output against the mask that produced it.
On the kernel paths that mask is also rebuilt independently from the seed
(``fastdl.kernels.dropout.keep_mask``), which pins the counter-based offsets down.
"""

import math

import pytest
import torch
import torch.nn.functional as TF
from helpers import RTOL, assert_close, saved_bytes

import fastdl
import fastdl.functional as F
from fastdl.functional._random import draw_seed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd sizes: shorter than a block, not a multiple of it, several dims.
SHAPES = [(7,), (33, 5), (1000,), (3, 1, 17), (2, 1031)]


def _nonzero_randn(shape, dtype, device):
    """Random values bounded away from 0, so a zero in the output can only mean 'dropped'."""
    x = torch.randn(shape, device=device)
    return (x + torch.sign(x) * 0.1).to(dtype)


def _seeded_keep(backend, device, shape, p, seed):
    """The kernel's keep-mask for the call that follows ``torch.manual_seed(seed)``, rebuilt from
    the seed alone; None on the torch path (PyTorch's stream cannot be rebuilt)."""
    if backend == "torch":
        return None
    torch.manual_seed(seed)
    kernel_seed = draw_seed(device)
    # dropout counts elements in flat order: the mask of the flat (numel,) view.
    keep = fastdl.backend.kernels("dropout").keep_mask((math.prod(shape),), p, kernel_seed, device)
    return keep.view(shape)


def _check_against_mask(x, y, dy, dx, p):
    """y is x / (1 - p) where kept and 0 where dropped; dx the same mask times the scale on dy."""
    keep = y != 0
    scale = 1.0 / (1.0 - p)
    rtol = RTOL[x.dtype] if x.dtype != torch.float32 else 1e-6
    assert_close("output", y, torch.where(keep, x.double() * scale, 0.0), rtol=rtol)
    assert_close("grad", dx, torch.where(keep, dy.double() * scale, 0.0), rtol=rtol)
    return keep


@pytest.mark.parametrize("p", [0.1, 0.5, 0.875])
def test_mask_statistics_and_backward(backend, device, p):
    """Over 10^5 elements the zeroed fraction is within 5 standard deviations of p; survivors are
    input / (1 - p); the backward applies the forward's mask and scale."""
    shape = (317, 331)  # 104,927 elements
    x = _nonzero_randn(shape, torch.float32, device).requires_grad_()
    torch.manual_seed(1234)
    y = F.dropout(x, p)
    dy = torch.randn(shape, device=device)
    y.backward(dy)
    keep = _check_against_mask(x.detach(), y.detach(), dy, x.grad, p)
    n = keep.numel()
    dropped = 1.0 - keep.double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n), f"dropped fraction {dropped} for p={p}"
    # Rows and columns get the same rate: no stripes from the per-element offsets.
    for dim in (0, 1):
        rate = 1.0 - keep.double().mean(dim)
        sigma = math.sqrt(p * (1 - p) / shape[dim])
        assert (rate - p).abs().max().item() < 6 * sigma
    expected = _seeded_keep(backend, device, shape, p, 1234)
    if expected is not None:
        assert torch.equal(keep, expected), "the output's mask is not the one the seed defines"


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_dtypes_and_odd_sizes(backend, device, dtype, shape):
    x = _nonzero_randn(shape, dtype, device).requires_grad_()
    torch.manual_seed(99)
    y = F.dropout(x, 0.3)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(shape, device=device).to(dtype)
    y.backward(dy)
    keep = _check_against_mask(x.detach(), y.detach(), dy, x.grad, 0.3)
    expected = _seeded_keep(backend, device, shape, 0.3, 99)
    if expected is not None:
        assert torch.equal(keep, expected)


def test_seed_reproducibility(backend, device):
    x = _nonzero_randn((50, 41), torch.float32, device)
    torch.manual_seed(7)
    a = F.dropout(x, 0.5)
    b = F.dropout(x, 0.5)
    torch.manual_seed(7)
    c = F.dropout(x, 0.5)
    torch.manual_seed(8)
    d = F.dropout(x, 0.5)
    assert torch.equal(a, c), "torch.manual_seed must reproduce a call"
    assert not torch.equal(a, b), "successive calls must draw different masks"
    assert not torch.equal(a, d), "different seeds must draw different masks"


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_identity_in_eval_and_at_p_zero(backend, device, p):
    x = torch.randn(9, 13, device=device, requires_grad=True)
    y = F.dropout(x, p, training=False) if p else F.dropout(x, 0.0)
    assert torch.equal(y, x)
    dy = torch.randn_like(x)
    y.backward(dy)
    assert torch.equal(x.grad, dy)


def test_p_one_gives_zeros(backend, device):
    x = torch.randn(5, 77, device=device, requires_grad=True)
    y = F.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(x))
    y.backward(torch.randn_like(x))
    assert torch.equal(x.grad, torch.zeros_like(x)), "no 1 / (1 - p) = inf may leak into the gradient"


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 4)])
def test_empty(backend, device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = F.dropout(x, 0.5)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_non_contiguous(backend, device):
    """A transposed slice: the mask is defined on the logical (row-major) order."""
    base = _nonzero_randn((64, 40), torch.float32, device)
    x = base.t()[:, :57].requires_grad_()
    assert not x.is_contiguous()
    torch.manual_seed(3)
    y = F.dropout(x, 0.25)
    dy = torch.randn(60, 40, device=device).t()[:, :57]  # non-contiguous too
    y.backward(dy)
    keep = _check_against_mask(x.detach(), y.detach(), dy, x.grad, 0.25)
    expected = _seeded_keep(backend, device, x.shape, 0.25, 3)
    if expected is not None:
        assert torch.equal(keep, expected)


@pytest.mark.parametrize("contiguous", [True, False])
def test_inplace(backend, device, contiguous):
    a = _nonzero_randn((37, 23), torch.float32, device).requires_grad_()
    h = a * 2.0 if contiguous else (a * 2.0).t()
    before = h.detach().clone()
    version = h._version
    torch.manual_seed(5)
    y = F.dropout(h, 0.5, inplace=True)
    assert y is h, "inplace returns the input tensor itself"
    assert h._version > version, "inplace must bump the version counter (autograd sees the write)"
    keep = h != 0
    assert_close("output", h, torch.where(keep, before.double() * 2.0, 0.0), rtol=1e-6)
    dy = torch.randn_like(h)
    y.backward(dy)
    assert_close("grad", a.grad, (torch.where(keep, dy.double() * 2.0, 0.0) * 2.0).reshape(a.shape)
                 if contiguous else (torch.where(keep, dy.double() * 2.0, 0.0) * 2.0).t(), rtol=1e-6)


def test_inplace_on_leaf_requiring_grad_raises(backend, device):
    x = torch.randn(4, 8, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        F.dropout(x, 0.5, inplace=True)


def test_gradcheck_and_double_backward_float64(backend, device):
    x = torch.randn(4, 9, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x):
        torch.manual_seed(11)  # the same mask for every evaluation gradcheck makes
        return F.dropout(x, 0.4)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))



def test_nothing_but_the_seed_is_saved(backend, device):
    """The kernel path regenerates the mask in the backward: no bytes saved per element, where
    PyTorch's own dropout saves a mask (bool on CUDA, a scaled noise tensor on CPU)."""
    x = torch.randn(128, 96, device=device, requires_grad=True)
    torch_bytes = saved_bytes(torch.nn.functional.dropout, x, 0.5)
    assert torch_bytes >= x.numel(), "the hook must see torch's mask (else this test proves nothing)"
    if backend == "torch":
        pytest.skip("the torch path is PyTorch's dropout, which saves its mask")
    assert saved_bytes(F.dropout, x, 0.5) == 8, "only the int64 seed"


def test_bad_arguments():
    x = torch.randn(4, 8)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p .*between 0 and 1"):
            F.dropout(x, p)
    with pytest.raises(TypeError, match="p "):
        F.dropout(x, "0.5")
    with pytest.raises(TypeError, match="input"):
        F.dropout(torch.randint(0, 5, (4, 8)), 0.5)
    with pytest.raises(TypeError, match="input"):
        F.dropout([1.0, 2.0], 0.5)
    ints = torch.arange(6)
    assert F.dropout(ints, 0.5, False) is ints and F.dropout(ints, 0.0) is ints  # identity, any dtype
    assert TF.dropout(ints, 0.5, False) is ints
    for training in (None, 1, torch.tensor(True)):  # PyTorch's dropout takes a bool only, too
        with pytest.raises(TypeError, match="training must be a bool"):
            F.dropout(x, 0.5, training)
        with pytest.raises(TypeError):
            TF.dropout(x, 0.5, training)


def test_forced_triton_on_cpu_tensor_raises():
    with fastdl.backend.use("triton"):
        with pytest.raises(fastdl.backend.BackendError, match="triton"):
            F.dropout(torch.randn(2, 8), 0.5)


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_dropped_inf_and_nan_become_nan_as_in_torch(backend, device, p):
    """torch multiplies by the mask (inf * 0 = NaN): a dropped inf or NaN is NaN, never 0; a kept
    inf stays inf; NaN stays NaN. The gradient of a dropped element is dy * 0, so an inf in dy
    gives NaN too."""
    x = _nonzero_randn((40, 31), torch.float32, device)
    special = torch.rand(x.shape, device=device) < 0.3
    values = torch.tensor([float("inf"), float("-inf"), float("nan")], device=device)
    x = torch.where(special, values[torch.randint(0, 3, x.shape, device=device)], x).requires_grad_()
    torch.manual_seed(21)
    y = F.dropout(x, p)
    dy = torch.where(special, float("inf"), torch.randn_like(x))
    y.backward(dy)
    ref = torch.nn.functional.dropout(x.detach(), p)  # torch's own op, for the rule it follows
    for out, inp in ((ref, x.detach()), (y.detach(), x.detach()), (x.grad, dy)):
        finite = torch.isfinite(inp)
        kept = finite & (out != 0) if p < 1 else torch.zeros_like(finite)
        assert not (out[~finite] == 0).any(), "a dropped inf/NaN became 0"
        assert torch.isnan(out[~finite & ~torch.isinf(out)]).all()
        assert torch.isnan(out[torch.isnan(inp)]).all()
        if p == 1:
            assert torch.isnan(out[~finite]).all() and torch.equal(out[finite], torch.zeros_like(out[finite]))
        assert not (torch.isinf(out) & ~torch.isinf(inp)).any(), "inf only where inf came in"
        assert kept.any() or p == 1
