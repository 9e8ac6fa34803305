"""fastdl.functional.dropout_add_layer_norm against the unfused composition in float64.

The reference needs the mask the op drew. It is recovered without looking at the op's output:
after the same ``torch.manual_seed``, on the torch path ``fastdl.functional.dropout`` of a tensor
of ones draws the same mask (both call PyTorch's dropout first); on the kernel paths the mask
launcher rebuilds it from the same seed (``kernels.dropout.keep_mask``, counters per row). A fused
kernel that used other counters, another seed or another scale fails these comparisons.
"""

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, check_op, saved_bytes

import fastdl
import fastdl.functional as F
from fastdl.functional._random import draw_seed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 7), (5, 1000), (2, 3, 65), (1, 9)]
SEED = 2025  # (1, 9) in bf16 sits at the edge of the bound for some masks: one ulp of 9 values


def _keep(x, p, training=True):
    """The mask a call made right after ``torch.manual_seed(SEED)`` on ``x`` applies."""
    torch.manual_seed(SEED)
    if fastdl.backend.resolve(x) == "torch" or not training:
        return F.dropout(torch.ones_like(x), p, training) != 0
    return fastdl.backend.kernels("dropout").keep_mask(x.shape, p, draw_seed(x.device), x.device)


def _fused(p, eps=1e-5, training=True):
    def fn(x, r, w, b):
        torch.manual_seed(SEED)
        return F.dropout_add_layer_norm(x, r, w, b, p, eps, training)
    return fn


def _unfused(keep, p, eps=1e-5):
    """residual + dropout(x) with the given mask, then LayerNorm, in the inputs' dtype."""
    def fn(x, r, w, b):
        pre = torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))
        if r is not None:
            pre = r + pre
        return TF.layer_norm(pre, (x.shape[-1],), w, b, eps), pre
    return fn


def _inputs(shape, dtype, device, residual=True, weight=True, bias=True, offset=0.0):
    n = shape[-1]
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    r = ((torch.randn(shape, device=device) + offset).to(dtype).requires_grad_() if residual else None)
    w = torch.randn(n, device=device).to(dtype).requires_grad_() if weight else None
    b = torch.randn(n, device=device).to(dtype).requires_grad_() if bias else None
    return [x, r, w, b]


def _check(inputs, p, eps=1e-5, training=True, **kwargs):
    """Both outputs and all four gradients (out and pre_norm_sum each get a random gradient)."""
    keep = _keep(inputs[0], p, training) if training else torch.ones_like(inputs[0], dtype=torch.bool)
    q = p if training else 0.0
    check_op(_fused(p, eps, training), _unfused(keep, q, eps), inputs,
             baseline_fn=_unfused(keep, q, eps), **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_unfused(backend, device, dtype, shape):
    _check(_inputs(shape, dtype, device), p=0.2)


@pytest.mark.parametrize("present", [(False, True, True), (True, False, False), (True, True, False),
                                     (False, False, False)])
def test_optional_residual_weight_bias(backend, device, present):
    _check(_inputs((6, 33), torch.float32, device, *present), p=0.3, eps=1e-3)


def test_eval_and_p_zero_are_add_and_norm(backend, device):
    inputs = _inputs((4, 50), torch.float32, device)
    _check(inputs, p=0.6, training=False)
    for t in inputs:
        t.grad = None
    _check(inputs, p=0.0)


def test_p_one_drops_everything(backend, device):
    x, r, w, b = _inputs((4, 24), torch.float32, device)
    out, pre = F.dropout_add_layer_norm(x, r, w, b, 1.0)
    assert torch.equal(pre, r)
    (out.sum() + pre.sum()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.isfinite(r.grad).all()


@pytest.mark.parametrize("used", ["out", "pre"])
def test_one_output_unused(backend, device, used):
    """Only one output feeds the loss (post-norm uses out; a last pre-norm block may use only
    pre_norm_sum): the other's gradient is absent, not zeros to be read."""
    inputs = _inputs((5, 40), torch.float32, device)
    keep = _keep(inputs[0], 0.25)
    idx = 0 if used == "out" else 1
    check_op(lambda *a: _fused(0.25)(*a)[idx], lambda *a: _unfused(keep, 0.25)(*a)[idx], inputs)


def test_mixed_residual_dtype(backend, device):
    """A float32 residual stream with a half sublayer output (autocast): float32 outputs."""
    x = torch.randn(6, 48, device=device).half().requires_grad_()
    r = torch.randn(6, 48, device=device, requires_grad=True)
    w = torch.randn(48, device=device, requires_grad=True)
    b = torch.randn(48, device=device, requires_grad=True)
    keep = _keep(x, 0.1)
    out, pre = _fused(0.1)(x, r, w, b)
    assert out.dtype == pre.dtype == torch.float32
    ref_out, ref_pre = _unfused(keep, 0.1)(x.detach().double(), r.double(), w.double(), b.double())
    assert_close("pre_norm_sum", pre, ref_pre, rtol=1e-3)
    assert_close("out", out, ref_out, rtol=1e-3)
    (out.sum() + (pre * 0.5).sum()).backward()
    assert x.grad.dtype == torch.float16 and r.grad.dtype == torch.float32


def test_long_rows_are_looped(backend, device):
    """Rows longer than one block take the streamed forward and backward."""
    _check(_inputs((2, 20000), torch.float32, device), p=0.1)


@pytest.mark.parametrize("n", [300, 20000])
def test_large_mean_small_spread(backend, device, n):
    """|mean| >> std in the pre-norm sum: the kernel centres on the first element first.

    out is LayerNorm of pre_norm_sum as stored (float32, whose rounding near 1000 is a sizeable
    part of the spread), so the reference rounds its sum to float32 too; p = 0.5 keeps the scale
    exact, so that rounding happens once on both sides.
    """
    if backend == "torch":
        pytest.skip("the torch path is PyTorch's own layer_norm, whose fp32 CPU variance loses digits")
    x = (0.01 * torch.randn(3, n, device=device)).requires_grad_()
    r = (1000.0 + 0.01 * torch.randn(3, n, device=device)).requires_grad_()
    w = torch.randn(n, device=device, requires_grad=True)
    keep = _keep(x, 0.5)

    def ref(x, r, w, b):
        pre = (r + torch.where(keep, 2.0 * x, 0.0)).float().double()
        return TF.layer_norm(pre, (n,), w, b), pre

    check_op(_fused(0.5), ref, [x, r, w, None], rtol=1e-4, grad_rtol=1e-4)


def test_non_contiguous(backend, device):
    x = torch.randn(64, 40, device=device).t()[:, :57].requires_grad_()
    r = torch.randn(114, 40, device=device)[::2].t().requires_grad_()  # strided rows, transposed
    assert not x.is_contiguous() and not r.is_contiguous()
    w = torch.randn(57, device=device, requires_grad=True)
    _check([x, r, w, None], p=0.3)


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (3, 0)])
def test_empty(backend, device, shape):
    x, r, w, b = _inputs(shape, torch.float32, device)
    out, pre = F.dropout_add_layer_norm(x, r, w, b, 0.5)
    assert out.shape == pre.shape == x.shape
    (out.sum() + pre.sum()).backward()
    assert x.grad.shape == r.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_pre_norm_sum_is_dropout_bit_for_bit(backend, device):
    """Without residual, pre_norm_sum is exactly fastdl.functional.dropout(x) under the same seed
    (on the kernel paths when the last dim is a multiple of 4: then per-row and flat counters agree)."""
    x = torch.randn(7, 332, device=device)
    torch.manual_seed(SEED)
    _, pre = F.dropout_add_layer_norm(x, None, None, None, 0.4)
    torch.manual_seed(SEED)
    assert torch.equal(pre, F.dropout(x, 0.4))


def test_kernel_mask_is_the_seeds(backend, device):
    """On the kernel paths the mask is rebuilt from the seed alone by the mask launcher."""
    if backend == "torch":
        pytest.skip("the torch path uses PyTorch's random stream")
    x = torch.randn(9, 101, device=device) + 3.0  # no x is 0, so pre == residual iff dropped
    r = torch.zeros_like(x)
    torch.manual_seed(SEED)
    _, pre = F.dropout_add_layer_norm(x, r, None, None, 0.5)
    torch.manual_seed(SEED)
    keep = fastdl.backend.kernels("dropout").keep_mask(x.shape, 0.5, draw_seed(device), device)
    assert torch.equal(pre != 0, keep)


def test_seed_reproducibility(backend, device):
    x, r, w, b = [t.detach() if t is not None else None for t in _inputs((8, 64), torch.float32, device)]
    torch.manual_seed(1)
    first = F.dropout_add_layer_norm(x, r, w, b, 0.5)
    second = F.dropout_add_layer_norm(x, r, w, b, 0.5)
    torch.manual_seed(1)
    again = F.dropout_add_layer_norm(x, r, w, b, 0.5)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], second[1])


def test_weight_gradient_is_deterministic(backend, device):
    x, r, w, b = _inputs((37, 129), torch.float32, device)
    dy = torch.randn(37, 129, device=device)
    grads = []
    for _ in range(2):
        w.grad = b.grad = None
        out, pre = _fused(0.2)(x, r, w, b)
        out.backward(dy)
        grads.append((w.grad.clone(), b.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_gradcheck_float64(backend, device):
    x, r, w, b = [torch.randn(s, dtype=torch.float64, device=device, requires_grad=True)
                  for s in ((2, 1, 6), (2, 1, 6), (6,), (6,))]
    assert torch.autograd.gradcheck(_fused(0.3), (x, r, w, b), fast_mode=True)


def test_mixed_weight_dtype_on_kernel_path(backend, device):
    """Half input with float32 parameters (as under autocast): outputs stay half."""
    if backend == "torch":
        pytest.skip("PyTorch's CPU layer_norm needs matching dtypes")
    x = torch.randn(8, 96, device=device).half()
    r = torch.randn(8, 96, device=device).half()
    w = torch.randn(96, device=device)
    b = torch.randn(96, device=device)
    keep = _keep(x, 0.2)
    out, pre = _fused(0.2)(x, r, w, b)
    assert out.dtype == pre.dtype == torch.float16
    ref_out, _ = _unfused(keep, 0.2)(x.double(), r.double(), w.double(), b.double())
    assert_close("out", out, ref_out, rtol=2e-3)



def test_saves_no_mask(backend, device):
    """Saved for the backward: pre_norm_sum (an output the caller holds anyway), the weight and bias
    (parameters, held anyway), two float32 statistics per row and the int64 seed -- no mask, no x,
    no residual."""
    if backend == "torch":
        pytest.skip("the torch path is PyTorch's unfused composition")
    M, N = 32, 96
    x, r, w, b = _inputs((M, N), torch.float16, device)
    saved = saved_bytes(lambda *a: F.dropout_add_layer_norm(*a, 0.1), x, r, w, b)
    assert saved == M * N * 2 + 2 * N * 2 + 2 * M * 4 + 8
    torch_saved = saved_bytes(lambda *a: _unfused(_keep(x, 0.1), 0.1)(*a), x, r, w, b)
    assert torch_saved > saved


def test_bad_arguments():
    x, r, w = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8)
    fn = F.dropout_add_layer_norm
    with pytest.raises(ValueError, match="p .*between 0 and 1"):
        fn(x, r, w, None, 1.5)
    with pytest.raises(ValueError, match="residual"):
        fn(x, torch.randn(4, 7), w)
    with pytest.raises(ValueError, match="residual"):
        fn(x, torch.randn(8), w)
    with pytest.raises(ValueError, match="weight"):
        fn(x, r, torch.randn(7))
    with pytest.raises(ValueError, match="bias"):
        fn(x, r, w, torch.randn(4, 8))
    with pytest.raises(TypeError, match="x"):
        fn(torch.randint(0, 5, (4, 8)), r, w)
    with pytest.raises(TypeError, match="residual"):
        fn(x, torch.ones(4, 8, dtype=torch.int64), w)
    with pytest.raises(TypeError, match="weight"):
        fn(x, r, torch.ones(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="residual.*device|device.*residual"):
        fn(x, torch.randn(4, 8, device="meta"), w)
    with pytest.raises(ValueError, match="x"):
        fn(torch.tensor(1.0), None)
    with pytest.raises(TypeError, match="training must be a bool"):
        fn(x, r, w, None, 0.1, training=None)
    # Parameters in a dtype LayerNorm rejects for the normalised sum: refused on every backend
    # (the kernels would otherwise run them, PyTorch's LayerNorm raises).
    with pytest.raises(TypeError, match="x is torch.float32 but weight torch.float64"):
        fn(x, r, w.double())
    with pytest.raises(TypeError, match="weight torch.float32, bias torch.float16"):
        fn(x, r, w, w.half())
    with pytest.raises(TypeError, match=r"residual \+ x is torch.float32 but weight torch.float64"):
        fn(x.half(), r.bfloat16(), w.double())
    fn(x.half(), r.half(), w, w)  # float32 parameters for a half sum, as PyTorch accepts


def test_dropped_inf_gives_nan_as_torch(backend, device):
    """residual + dropout(x) follows torch's dropout: a dropped inf or NaN is NaN (inf * 0), a kept
    inf stays inf, never the residual alone; a row holding one normalises to NaN."""
    x, r, w, b = _inputs((6, 40), torch.float32, device)
    bad = torch.rand(x.shape, device=device) < 0.2
    x = torch.where(bad, torch.tensor([float("inf"), float("nan")], device=device)[
        torch.randint(0, 2, x.shape, device=device)], x.detach())
    keep = _keep(x, 0.5)
    torch.manual_seed(SEED)
    out, pre = F.dropout_add_layer_norm(x, r, w, b, 0.5)
    assert torch.isnan(pre[bad & ~keep]).all(), "a dropped inf/NaN must give NaN, as torch"
    assert torch.isinf(pre[bad & keep & torch.isinf(x)]).all()
    assert torch.equal(torch.isfinite(pre), ~bad)
    assert torch.isnan(out[bad.any(-1)]).all()
