"""fastdl.functional.batch_norm on every backend against float64 math: outputs, gradients of
input/weight/bias, and the in-place update of the running buffers."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, check_op

import fastdl
import fastdl.functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C), (N, C, L), (N, C, H, W) with odd channel counts and spatial sizes.
SHAPES = [(6, 3), (4, 7, 9), (2, 3, 5, 7), (3, 7, 5, 7)]


def ref_batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5):
    """Batch norm in the inputs' dtype (float64 in the tests), written from the definition;
    updates the running buffers in place with the unbiased variance."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        mean = x.mean(dims)
        var = ((x - mean.view(shape)) ** 2).mean(dims)
        if running_mean is not None:
            count = x.numel() // x.shape[1]
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_(momentum * (var * count / (count - 1))
                                                    .to(running_var.dtype))
    else:
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    return y + bias.view(shape) if bias is not None else y


def _inputs(shape, dtype, device, offset=0.0, scale=2.0, affine=(True, True)):
    C = shape[1]
    x = (torch.randn(shape, device=device) * scale + offset).to(dtype).requires_grad_()
    w = torch.randn(C, device=device).to(dtype).requires_grad_() if affine[0] else None
    b = torch.randn(C, device=device).to(dtype).requires_grad_() if affine[1] else None
    return x, w, b


def _buffers(C, device, dtype=torch.float32):
    return torch.randn(C, device=device).to(dtype), (torch.rand(C, device=device) + 0.5).to(dtype)


def _check(x, w, b, running, training, momentum=0.1, eps=1e-5, **tol):
    """check_op on fresh copies of the running buffers for each of the three implementations."""
    rm, rv = running if running is not None else (None, None)

    def call(fn):
        def run(x, w, b):
            # Buffers in the input's dtype, as in a module converted with .half() / .double().
            m = None if rm is None else rm.clone().to(x.dtype)
            v = None if rv is None else rv.clone().to(x.dtype)
            return fn(x, m, v, w, b, training, momentum, eps)
        return run

    check_op(call(F.batch_norm), call(ref_batch_norm), [x, w, b], baseline_fn=call(TF.batch_norm), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(backend, device, dtype, shape, training):
    x, w, b = _inputs(shape, dtype, device)
    _check(x, w, b, _buffers(shape[1], device), training)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_many_programs_and_tiles(backend, device, training, channels_last):
    """Enough elements per channel for several programs, each reducing several tiles."""
    x, w, b = _inputs((8, 3, 23, 23), torch.float32, device, offset=3.0)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    _check(x, w, b, _buffers(3, device), training)


@pytest.mark.parametrize("training", [True, False])
def test_channels_last(backend, device, training):
    x, w, b = _inputs((3, 7, 5, 7), torch.float32, device)
    x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    _check(x, w, b, _buffers(7, device), training)
    y = F.batch_norm(x, *_buffers(7, device), w, b, training=training)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["transposed", "h_w_swapped", "sliced"])
def test_non_contiguous_input(backend, device, layout):
    if layout == "transposed":  # (N, L, C) activations transposed to (N, C, L): strides honoured
        x = torch.randn(4, 9, 5, device=device).transpose(1, 2)
    elif layout == "h_w_swapped":  # spatial dims that cannot be merged: copied
        x = torch.randn(2, 3, 7, 5, device=device).transpose(2, 3)
    else:
        x = torch.randn(4, 10, 11, device=device)[:, ::2, 1:]
    x = x.requires_grad_()
    assert not x.is_contiguous()
    _, w, b = _inputs(x.shape, torch.float32, device)
    _check(x, w, b, _buffers(x.shape[1], device), True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
def test_optional_affine(backend, device, affine, training):
    x, w, b = _inputs((4, 7, 5), torch.float32, device, affine=affine)
    _check(x, w, b, _buffers(7, device), training)


def test_batch_statistics_without_buffers(backend, device):
    """track_running_stats=False: training=True with no running buffers."""
    x, w, b = _inputs((5, 3, 7), torch.float32, device)
    _check(x, w, b, None, True, eps=1e-3)


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0])
def test_running_buffers_update(backend, device, momentum):
    """Several training steps: the buffers follow torch's exponential average (unbiased var)."""
    rm, rv = _buffers(7, device)
    rm64, rv64 = rm.double(), rv.double()
    for step in range(3):
        x = torch.randn(4, 7, 5, 3, device=device) * (step + 1) + step
        F.batch_norm(x, rm, rv, training=True, momentum=momentum)
        ref_batch_norm(x.double(), rm64, rv64, training=True, momentum=momentum)
        assert_close(f"running_mean after step {step}", rm, rm64, rtol=2e-6)
        assert_close(f"running_var after step {step}", rv, rv64, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_buffers(backend, device, dtype):
    """A module converted to half precision keeps its buffers in that dtype."""
    rm, rv = _buffers(7, device, dtype)
    rm64, rv64 = rm.double(), rv.double()
    x = torch.randn(4, 7, 5, device=device).to(dtype)
    F.batch_norm(x, rm, rv, training=True)
    ref_batch_norm(x.double(), rm64, rv64, training=True)
    assert rm.dtype == rv.dtype == dtype
    assert_close("running_mean", rm, rm64, rtol=1e-2)
    assert_close("running_var", rv, rv64, rtol=1e-2)


def test_running_buffer_views(backend, device):
    """Buffers that are strided views are updated through the view."""
    storage = torch.zeros(2, 7, device=device)
    rm, rv = storage[0, :], torch.ones(7, 2, device=device)[:, 1]
    assert not rv.is_contiguous()
    rm64, rv64 = rm.double(), rv.double()
    x = torch.randn(6, 7, device=device)
    F.batch_norm(x, rm, rv, training=True)
    ref_batch_norm(x.double(), rm64, rv64, training=True)
    assert_close("running_mean", storage[0], rm64, rtol=1e-6)
    assert_close("running_var", rv, rv64, rtol=1e-6)


@pytest.mark.parametrize("shape", [(6, 3), (3, 7, 5, 7)])
def test_large_mean_small_spread(backend, device, shape):
    """|mean| >> std: statistics of x - x[0, c] (exact) keep every digit of the spread."""
    if backend == "torch":
        pytest.skip("the torch path is PyTorch's own kernel, whose fp32 CPU statistics lose digits here")
    x = (1000.0 + 0.01 * torch.randn(shape, device=device)).requires_grad_()
    w = torch.randn(shape[1], device=device, requires_grad=True)
    rm, rv = _buffers(shape[1], device)
    rm64, rv64 = rm.double(), rv.double()
    _check(x, w, None, (rm, rv), True, rtol=1e-5, grad_rtol=1e-5)
    F.batch_norm(x.detach(), rm, rv, training=True)
    ref_batch_norm(x.detach().double(), rm64, rv64, training=True)
    assert_close("running_var", rv, rv64, rtol=1e-5)
    assert_close("running_mean", rm, rm64, rtol=1e-6)


def test_mixed_dtypes(backend, device):
    """Half input with float32 parameters and buffers (as under autocast): output stays half."""
    x, _, _ = _inputs((4, 7, 6), torch.float16, device)
    w, b = torch.randn(7, device=device), torch.randn(7, device=device)
    rm, rv = _buffers(7, device)
    rm64, rv64 = rm.double(), rv.double()
    y = F.batch_norm(x, rm, rv, w, b, training=True)
    assert y.dtype == torch.float16 and rm.dtype == torch.float32
    assert_close("output", y, ref_batch_norm(x.double(), rm64, rv64, w.double(), b.double(), True),
                 rtol=2e-3)
    assert_close("running_var", rv, rv64, rtol=1e-5)


def test_empty_batch(backend, device):
    x = torch.randn(0, 3, 4, device=device, requires_grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    rm, rv = _buffers(3, device)
    before = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm, rv, w, training=True)
    assert y.shape == x.shape
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])  # as torch: untouched
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_gradient_is_deterministic(backend, device):
    x, w, b = _inputs((9, 5, 13, 11), torch.float32, device)
    dy = torch.randn(x.shape, device=device)
    grads = []
    for _ in range(2):
        x.grad = w.grad = b.grad = None
        F.batch_norm(x, None, None, w, b, training=True).backward(dy)
        grads.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
    assert all(torch.equal(a, c) for a, c in zip(*grads))


def test_broadcast_output_gradient(backend, device):
    """y.sum().backward() hands the backward a stride-0 gradient; dx = 0 in training."""
    x, w, b = _inputs((4, 3, 5), torch.float32, device)
    F.batch_norm(x, None, None, w, b, training=True).sum().backward()
    assert x.grad.abs().max().item() < 1e-5
    assert_close("bias grad", b.grad, torch.full((3,), 20.0, dtype=torch.float64, device=device))


def test_output_gradient_in_an_ambiguous_layout(backend, device):
    """An output gradient whose strides look channels-last only through size-1 dims: PyTorch's
    CPU batch norm backward (2.13) gets dx wrong by O(1) for it; every path must give what the
    same gradient made contiguous gives (and float64 math)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 7, 2, 1, generator=g, dtype=torch.float64).to(device).requires_grad_()
    dy = torch.randn(1, 7, 2, 7, generator=g, dtype=torch.float64).to(device).permute(1, 3, 2, 0)
    assert dy.stride() == (14, 1, 7, 98)
    F.batch_norm(x, None, None, training=True).backward(dy)
    ref = x.detach().clone().requires_grad_()
    TF.batch_norm(ref, None, None, training=True).backward(dy.contiguous())
    assert_close("dx", x.grad, ref.grad.double(), rtol=1e-9)

@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(backend, device, training):
    """float64 runs the kernels with float64 statistics, so gradcheck proves the backward."""
    x = torch.randn(3, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    rm = torch.randn(2, dtype=torch.float64, device=device)
    rv = torch.rand(2, dtype=torch.float64, device=device) + 0.5
    buffers = (None, None) if training else (rm, rv)
    assert torch.autograd.gradcheck(lambda x, w, b: F.batch_norm(x, *buffers, w, b, training), (x, w, b))


def test_bad_arguments():
    x = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="input"):
        F.batch_norm(torch.randn(3), rm, rv)
    with pytest.raises(ValueError, match="running_mean.*4 channels"):
        F.batch_norm(torch.randn(4, 4, 5), rm, torch.ones(4))
    with pytest.raises(ValueError, match="weight"):
        F.batch_norm(x, rm, rv, torch.ones(4))
    with pytest.raises(ValueError, match="bias"):
        F.batch_norm(x, rm, rv, None, torch.ones(2))
    with pytest.raises(TypeError, match="input"):
        F.batch_norm(torch.randint(0, 5, (4, 3)), rm, rv)
    with pytest.raises(TypeError, match="running_var"):
        F.batch_norm(x, rm, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="running_mean.*device|device.*running_mean"):
        F.batch_norm(x, torch.zeros(3, device="meta"), rv)
    with pytest.raises(ValueError, match="evaluation"):
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="together"):
        F.batch_norm(x, rm, None, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.randn(1, 3), rm, rv, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.randn(1, 3, 1, 1), rm, rv, training=True)
    with pytest.raises(ValueError, match="eps"):
        F.batch_norm(x, rm, rv, training=True, eps=0.0)
    with pytest.raises(TypeError, match="momentum"):
        F.batch_norm(x, rm, rv, training=True, momentum=None)
    F.batch_norm(torch.randn(1, 3), rm, rv, training=False)  # one value is fine in evaluation
    for training in (None, 1):  # PyTorch's batch_norm takes a bool only, too
        with pytest.raises(TypeError, match="training must be a bool"):
            F.batch_norm(x, rm, rv, training=training)
        with pytest.raises(TypeError):
            TF.batch_norm(x, rm, rv, training=training)


@pytest.mark.parametrize("training", [False, True])
def test_running_buffers_requiring_grad_raise_as_torch(backend, device, training):
    """PyTorch's batch_norm is not differentiable with respect to its running statistics and
    refuses buffers that require grad while autograd records; so does every fastdl path."""
    x = torch.randn(4, 3, device=device, requires_grad=True)
    for which in ("running_mean", "running_var"):
        buffers = {"running_mean": torch.zeros(3, device=device), "running_var": torch.ones(3, device=device)}
        buffers[which].requires_grad_(True)
        with pytest.raises(ValueError, match=f"not differentiable with respect to {which}"):
            F.batch_norm(x, buffers["running_mean"], buffers["running_var"], training=training)
        with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{which}'"):
            TF.batch_norm(x, buffers["running_mean"], buffers["running_var"], training=training)
        with torch.no_grad():
            out = F.batch_norm(x, buffers["running_mean"], buffers["running_var"], training=training)
            ref = TF.batch_norm(x.double(), *(b.double() for b in buffers.values()), training=training)
        assert_close("output under no_grad", out, ref)


def test_forced_triton_on_cpu_tensor_raises():
    with fastdl.backend.use("triton"):
        with pytest.raises(fastdl.backend.BackendError, match="triton"):
            F.batch_norm(torch.randn(2, 8), None, None, training=True)


@pytest.mark.parametrize("training", [True, False])
def test_strided_and_expanded_parameters(backend, device, training):
    """weight and bias read through views (a step slice, an expanded scalar), as torch."""
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    w_base = torch.randn(6, device=device, requires_grad=True)
    b = torch.randn(6, device=device)[::2]
    mean, var = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    for w in (w_base[::2], w_base[:1].expand(3)):
        y = F.batch_norm(x, mean.clone(), var.clone(), w, b, training)
        ref = TF.batch_norm(x.double(), mean.double(), var.double(), w.double(), b.double(), training)
        g = torch.randn_like(y)
        assert_close("output", y, ref)
        for name, got, want in zip(("x", "weight"), torch.autograd.grad(y, (x, w_base), g),
                                   torch.autograd.grad(ref, (x, w_base), g.double())):
            assert_close(f"grad {name}", got, want)


def _nchw(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


# (tensors of one launch, expected FLAT, expected VEC): the r-vector width is a promise to the
# compiler (the interpreter ignores it), so it is checked here element by element.
LAYOUTS = [
    ((_nchw(2, 3, 6, 6),), False, 4),                                  # S = 36: 16-byte fp32 vectors
    ((_nchw(2, 3, 8, 8, dtype=torch.float16),), False, 8),             # fp16: 8 per vector
    ((_nchw(2, 3, 14, 14, dtype=torch.bfloat16),), False, 4),          # S = 196: 4 divides it, 8 not
    ((_nchw(2, 3, 7, 7),), False, 1),                                  # S odd
    ((_nchw(1, 3, 8, 8),), True, 4),                                   # one sample: r is s
    ((_nchw(2, 16, 4, 4).to(memory_format=torch.channels_last),), True, 1),   # channels fastest
    ((_nchw(8, 16),), True, 1),                                        # (N, C)
    ((torch.randn(4, 9, 5).transpose(1, 2),), True, 1),                # (N, L, C) as (N, C, L)
    ((_nchw(2, 6, 8, 8)[:, ::2],), False, 4),                          # every other channel
    ((_nchw(2, 3, 8, 8)[:, 1:],), False, 4),                           # a storage offset
    ((_nchw(2, 3, 8, 8)[:, :, 1:],), False, 4),                        # H sliced: S = 56, merged
    ((_nchw(2, 3, 10, 10)[:, :, 1:],), False, 2),                      # S = 90
    ((_nchw(2, 3, 6, 6), _nchw(2, 3, 6, 6).to(memory_format=torch.channels_last)), False, 1),
    ((_nchw(2, 3, 6, 6), _nchw(2, 3, 6, 6).transpose(0, 1).contiguous().transpose(0, 1)), False, 4),
    ((_nchw(2, 3, 6, 6), torch.randn(1, 3, 1, 1).expand(2, 3, 6, 6)), False, 1),  # a broadcast dy
    ((torch.randn(1, 3, 1, 1).expand(2, 3, 6, 6),), True, 1),
]


@pytest.mark.parametrize("tensors, flat, vec", LAYOUTS, ids=range(len(LAYOUTS)))
def test_rows_layout(tensors, flat, vec):
    """batch_norm's r indexing (kernels/batch_norm.py ``_rows_layout``): the strides it passes give
    every element's true offset, with or without the division by S, and where it promises VEC-wide
    r vectors, every aligned group of VEC rows is VEC contiguous elements starting at a multiple
    of VEC (the alignment the kernels' hints tell the compiler)."""
    bn = pytest.importorskip("fastdl.kernels.batch_norm")
    t3s = [bn._as_3d(t) for t in tensors]
    assert (bn._rows_layout(*t3s)[:2]) == (flat, vec)
    N, C, S = t3s[0].shape
    n, c, s = torch.meshgrid(torch.arange(N), torch.arange(C), torch.arange(S), indexing="ij")
    r = n * S + s
    for t3, (stride_n, stride_c, stride_r) in zip(t3s, bn._rows_layout(*t3s)[2]):
        true = n * t3.stride(0) + c * t3.stride(1) + s * t3.stride(2)
        offs = r * stride_r + c * stride_c if flat else n * stride_n + s * stride_r + c * stride_c
        assert torch.equal(offs, true)
        if vec > 1:
            assert (N * S) % vec == 0
            by_r = offs.permute(1, 0, 2).reshape(C, N * S // vec, vec)  # [c, group, lane]
            assert torch.equal(by_r - by_r[..., :1], torch.arange(vec).expand_as(by_r))
            assert (by_r[..., 0] % vec == 0).all()
