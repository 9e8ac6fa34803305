"""fastdl.functional.layer_norm / rms_norm on every backend against float64 math."""

import numpy
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, check_op

import fastdl
import fastdl.functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd row lengths (not multiples of any block), a batch of one row, and a multi-dim shape.
SHAPES = [((3, 7), (7,)), ((5, 1000), (1000,)), ((2, 3, 65), (65,)), ((4, 3, 5), (3, 5)),
          ((1, 9), (9,)), ((2, 1500), (1500,))]


def ref_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(shape), 0))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def ref_rms_norm(x, shape, weight=None, eps=1e-5):
    dims = tuple(range(-len(shape), 0))
    y = x / torch.sqrt((x * x).mean(dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


def _inputs(shape, norm_shape, dtype, device, affine=(True, True), offset=0.0):
    x = (torch.randn(shape, device=device) * 2 + offset).to(dtype).requires_grad_()
    w = (torch.randn(norm_shape, device=device).to(dtype).requires_grad_() if affine[0] else None)
    b = (torch.randn(norm_shape, device=device).to(dtype).requires_grad_() if affine[1] else None)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,norm_shape", SHAPES)
def test_layer_norm(backend, device, dtype, shape, norm_shape):
    x, w, b = _inputs(shape, norm_shape, dtype, device)
    check_op(lambda x, w, b: F.layer_norm(x, norm_shape, w, b),
             lambda x, w, b: ref_layer_norm(x, norm_shape, w, b),
             [x, w, b], baseline_fn=lambda x, w, b: TF.layer_norm(x, norm_shape, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,norm_shape", SHAPES)
def test_rms_norm(backend, device, dtype, shape, norm_shape):
    x, w, _ = _inputs(shape, norm_shape, dtype, device, affine=(True, False))
    check_op(lambda x, w: F.rms_norm(x, norm_shape, w, 1e-5),
             lambda x, w: ref_rms_norm(x, norm_shape, w, 1e-5),
             [x, w], baseline_fn=lambda x, w: TF.rms_norm(x, norm_shape, w, 1e-5))


@pytest.mark.parametrize("affine", [(True, False), (False, True), (False, False)])
def test_layer_norm_optional_affine(backend, device, affine):
    x, w, b = _inputs((6, 33), (33,), torch.float32, device, affine=affine)
    check_op(lambda x, w, b: F.layer_norm(x, (33,), w, b, eps=1e-3),
             lambda x, w, b: ref_layer_norm(x, (33,), w, b, eps=1e-3), [x, w, b])


def test_rms_norm_without_weight_default_eps(backend, device):
    x = torch.randn(4, 50, device=device, requires_grad=True)
    eps = torch.finfo(torch.float32).eps
    check_op(lambda x: F.rms_norm(x, (50,)), lambda x: ref_rms_norm(x, (50,), eps=eps), [x])


@pytest.mark.parametrize("n", [20000, 65536])
@pytest.mark.parametrize("rms", [False, True])
def test_long_rows_are_looped(backend, device, n, rms):
    """Rows longer than one block take the streamed path (up to 64K elements)."""
    x, w, b = _inputs((3, n), (n,), torch.float32, device)
    if rms:
        check_op(lambda x, w: F.rms_norm(x, (n,), w, 1e-5),
                 lambda x, w: ref_rms_norm(x, (n,), w, 1e-5), [x, w])
    else:
        check_op(lambda x, w, b: F.layer_norm(x, (n,), w, b),
                 lambda x, w, b: ref_layer_norm(x, (n,), w, b), [x, w, b])


@pytest.mark.parametrize("n", [300, 20000])
def test_large_mean_small_spread(backend, device, n):
    """|mean| >> std: a one-pass E[x^2] - E[x]^2 variance would lose every significant digit."""
    if backend == "torch":
        pytest.skip("the torch path is PyTorch's own kernel, whose fp32 CPU variance loses digits here")
    x = (1000.0 + 0.01 * torch.randn(4, n, device=device)).requires_grad_()
    w = torch.randn(n, device=device, requires_grad=True)
    check_op(lambda x, w: F.layer_norm(x, (n,), w), lambda x, w: ref_layer_norm(x, (n,), w),
             [x, w], rtol=1e-4, grad_rtol=1e-4)


def test_non_contiguous_input(backend, device):
    x = torch.randn(64, 40, device=device).t()[:, :57].requires_grad_()  # a transposed slice
    assert not x.is_contiguous()
    w = torch.randn(57, device=device, requires_grad=True)
    check_op(lambda x, w: F.layer_norm(x, (57,), w), lambda x, w: ref_layer_norm(x, (57,), w), [x, w])


@pytest.mark.parametrize("rms", [False, True])
def test_empty_batch(backend, device, rms):
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    y = F.rms_norm(x, (16,), w) if rms else F.layer_norm(x, (16,), w)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_weight_gradient_is_deterministic(backend, device):
    x = torch.randn(37, 129, device=device, requires_grad=True)
    w = torch.randn(129, device=device, requires_grad=True)
    b = torch.randn(129, device=device, requires_grad=True)
    dy = torch.randn(37, 129, device=device)
    grads = []
    for _ in range(2):
        x.grad = w.grad = b.grad = None
        F.layer_norm(x, (129,), w, b).backward(dy)
        grads.append((w.grad.clone(), b.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("rms", [False, True])
def test_gradcheck_float64(backend, device, rms):
    """float64 runs the kernels with float64 statistics, so gradcheck proves the backward."""
    x = torch.randn(3, 2, 11, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(2, 11, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(2, 11, dtype=torch.float64, device=device, requires_grad=True)
    if rms:
        fn, args = (lambda x, w: F.rms_norm(x, (2, 11), w, 1e-5)), (x, w)
    else:
        fn, args = (lambda x, w, b: F.layer_norm(x, (2, 11), w, b)), (x, w, b)
    assert torch.autograd.gradcheck(fn, args)


def test_mixed_weight_dtype_on_kernel_path(backend, device):
    """Half input with float32 parameters (as under autocast): output stays half."""
    if backend == "torch":
        pytest.skip("PyTorch's CPU layer_norm needs matching dtypes")
    x = torch.randn(8, 96, device=device).half().requires_grad_()
    w = torch.randn(96, device=device, requires_grad=True)
    b = torch.randn(96, device=device, requires_grad=True)
    y = F.layer_norm(x, (96,), w, b)
    assert y.dtype == torch.float16
    assert_close("output", y, ref_layer_norm(x.double(), (96,), w.double(), b.double()), rtol=1e-3)


def test_half_input_with_float32_bias_and_no_weight(backend, device):
    """The bias gradient of a half input without weight is summed and returned in float32, the
    bias's dtype (not rounded through half). PyTorch's CPU backward refuses the mix."""
    if backend == "torch":
        pytest.skip("PyTorch's CPU layer_norm backward needs matching dtypes")
    x = torch.randn(256, 8, device=device).half().requires_grad_()
    b = torch.randn(8, device=device, requires_grad=True)
    y = F.layer_norm(x, (8,), None, b)
    dy = (torch.randn(256, 8, device=device) * 10).half()
    y.backward(dy)
    assert b.grad.dtype == torch.float32
    assert_close("bias grad", b.grad, dy.double().sum(0), rtol=1e-5)


@pytest.mark.parametrize("fn", [F.layer_norm, F.rms_norm])
def test_bad_arguments(fn):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="normalized_shape"):
        fn(x, (7,))
    with pytest.raises(ValueError, match="normalized_shape"):
        fn(torch.randn(8), (2, 8))
    with pytest.raises(TypeError, match="input"):
        fn(torch.randint(0, 5, (4, 8)), (8,))
    with pytest.raises(TypeError, match="weight"):
        fn(x, (8,), torch.ones(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight"):
        fn(x, (8,), torch.randn(7))
    with pytest.raises(ValueError, match="weight.*device|device.*weight"):
        fn(x, (8,), torch.randn(8, device="meta"))
    with pytest.raises(TypeError, match="normalized_shape"):
        fn(x, "eight")
    for bad in ((True,), (8.0,)):  # as torch: a bool or a float is no size
        with pytest.raises(TypeError, match="normalized_shape"):
            fn(x, bad)
    # numpy integers and 0-d integer tensors are sizes, as for torch
    for size in (numpy.int64(8), torch.tensor(8)):
        assert_close("output", fn(x, (size,)), fn(x.double(), (8,)))


def test_forced_triton_on_cpu_tensor_raises():
    with fastdl.backend.use("triton"):
        with pytest.raises(fastdl.backend.BackendError, match="triton"):
            F.layer_norm(torch.randn(2, 8), (8,))
