"""fastdl.nn.BatchNorm1d / BatchNorm2d / BatchNorm3d as drop-ins for torch.nn: several training steps then
evaluation, comparing outputs, gradients of input/weight/bias and the buffers after every step."""

import copy
import inspect

import pytest
import torch
from helpers import assert_close

import fastdl

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# BatchNorm's ``bias`` argument is new in PyTorch 2.13; fastdl's modules take torch's signature.
HAS_BIAS_ARG = "bias" in inspect.signature(torch.nn.BatchNorm1d.__init__).parameters
# (module, input shape, channels_last)
CASES = [("BatchNorm1d", (6, 3), False), ("BatchNorm1d", (4, 7, 9), False),
         ("BatchNorm2d", (2, 3, 5, 7), False), ("BatchNorm2d", (3, 7, 5, 7), True),
         ("BatchNorm3d", (2, 3, 4, 5, 3), False), ("BatchNorm3d", (2, 5, 3, 4, 3), True)]


def _pair(cls_name, num_features, *, dtype, device, **kwargs):
    """A torch.nn module with random parameters and running statistics, and fastdl's copy."""
    ref = getattr(torch.nn, cls_name)(num_features, **kwargs, device=device, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
        if ref.running_mean is not None:
            ref.running_mean.copy_(torch.randn_like(ref.running_mean))
            ref.running_var.copy_(torch.rand_like(ref.running_var) + 0.5)
    ours = getattr(fastdl.nn, cls_name)(num_features, **kwargs, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _buffer_rtol(dtype):
    """Running buffers stored in fp16/bf16 are rounded to that dtype at every step (torch's are too,
    differently), so allow two roundings; fp32 buffers must match to 1e-5."""
    return 2 * torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 1e-5


def _run(module, x, dy):
    """Output and gradients of input and parameters for one step (gradients reset first)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy.to(y.dtype))
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return y, grads


def _compare_steps(ours, ref, make_input, steps=3):
    """``steps`` training steps, then two in evaluation; fastdl's module in its dtype against a
    float64 copy of the torch module, with torch's module in the same dtype as the baseline for
    fp16/bf16. The running buffers are compared after every training step; evaluation then starts
    all three modules from fastdl's buffers, so that it measures the evaluation op and not how each
    module's fp16/bf16 buffers happened to round over the steps (Triton's interpreter truncates to
    bf16 where torch rounds to nearest)."""
    ref64 = copy.deepcopy(ref).double()
    for step in range(steps + 2):
        training = step < steps
        if step == steps:
            for m in (ref, ref64):
                for name, buf in m.named_buffers():
                    buf.copy_(getattr(ours, name))
        for m in (ours, ref, ref64):
            m.train(training)
        x = make_input()
        dy = torch.randn(x.shape, device=x.device, dtype=torch.float64)
        where = f"{'training' if training else 'eval'} step {step}"
        y, grads = _run(ours, x, dy)
        y_ref, grads_ref = _run(ref64, x.double(), dy)
        y_base, grads_base = _run(ref, x, dy)
        assert y.dtype == x.dtype and y.stride() == y_base.stride(), where
        assert_close(f"output ({where})", y, y_ref, baseline=y_base)
        for name in grads_ref:
            assert_close(f"grad of {name} ({where})", grads[name], grads_ref[name], baseline=grads_base[name])
        for name, buf in ref64.named_buffers():
            if name == "num_batches_tracked":
                assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked), where
            else:
                ours_buf = getattr(ours, name)
                assert_close(f"{name} ({where})", ours_buf, buf, rtol=_buffer_rtol(ours_buf.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls_name,shape,channels_last", CASES)
def test_training_then_eval(backend, device, dtype, cls_name, shape, channels_last):
    ours, ref = _pair(cls_name, shape[1], dtype=dtype, device=device)
    fmt = ((torch.channels_last if len(shape) == 4 else torch.channels_last_3d) if channels_last
           else torch.contiguous_format)

    def make_input():
        x = torch.randn(shape, device=device) * 3 + torch.randn(shape[1:2] + (1,) * (len(shape) - 2),
                                                                device=device)
        return x.to(dtype).contiguous(memory_format=fmt)

    _compare_steps(ours, ref, make_input)


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(affine=False),
                                    pytest.param(dict(bias=False), marks=pytest.mark.skipif(
                                        not HAS_BIAS_ARG, reason="BatchNorm's bias= is new in PyTorch 2.13")),
                                    dict(track_running_stats=False), dict(eps=1e-3, momentum=0.5)])
@pytest.mark.parametrize("cls_name,shape", [("BatchNorm1d", (5, 7, 6)), ("BatchNorm2d", (3, 7, 5, 5)),
                                            ("BatchNorm3d", (2, 3, 3, 4, 2))])
def test_options(backend, device, kwargs, cls_name, shape):
    ours, ref = _pair(cls_name, shape[1], dtype=torch.float32, device=device, **kwargs)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    _compare_steps(ours, ref, lambda: torch.randn(shape, device=device) * 2 + 1)


def test_channels_last_in_a_conv_net_trains_like_torch(backend, device):
    """Conv -> BatchNorm2d -> ReLU in channels_last, a few SGD steps: same weights and buffers."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.BatchNorm2d(5),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(5 * 6 * 7, 4))
    ref = ref.to(device).to(memory_format=torch.channels_last)
    ours = copy.deepcopy(ref)
    ours[1] = fastdl.nn.BatchNorm2d(5).to(device)
    ours[1].load_state_dict(ref[1].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, ref)]
    for _ in range(3):
        x = torch.randn(4, 3, 6, 7, device=device).to(memory_format=torch.channels_last)
        target = torch.randn(4, 4, device=device)
        for model, opt in zip((ours, ref), opts):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), target).backward()
            opt.step()
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        if a.is_floating_point():
            assert_close(name, a, b.double(), rtol=1e-5)
        else:
            assert torch.equal(a, b), name
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, 6, 7, device=device).to(memory_format=torch.channels_last)
    assert_close("eval output", ours(x), ref(x).double(), rtol=1e-5)


@pytest.mark.parametrize("cls_name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_state_dict_round_trip_and_repr(cls_name):
    ours, ref = _pair(cls_name, 7, dtype=torch.float32, device="cpu", momentum=0.3)
    assert isinstance(ours, getattr(torch.nn, cls_name))
    assert ours.state_dict().keys() == ref.state_dict().keys()
    back = getattr(torch.nn, cls_name)(7)
    back.load_state_dict(ours.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k])
    assert repr(ours) == repr(ref)


def test_evaluation_output_backward_after_a_training_step(backend, device):
    """An evaluation output whose backward runs after the module trained (updating its running
    buffers in place) does not raise. Its gradient: on the kernels, that of the statistics the
    forward used; on the torch path PyTorch's, which reads the buffers as they are when the
    backward runs (the difference the README states)."""
    ours, ref = _pair("BatchNorm1d", 3, dtype=torch.float32, device=device)
    x = torch.randn(5, 3, device=device, requires_grad=True)
    var = ours.running_var.detach().double().clone()
    ours.eval()
    y = ours(x)
    batch = torch.randn(5, 3, device=device) * 3
    ours.train()
    ours(batch)
    dy = torch.randn_like(y)
    y.backward(dy)
    if backend == "torch":
        ref.eval()
        x_ref = x.detach().clone().requires_grad_(True)
        y_ref = ref(x_ref)
        ref.train()
        ref(batch)
        y_ref.backward(dy)
        expected = x_ref.grad.double()
    else:
        expected = dy.double() * ours.weight.detach().double() / torch.sqrt(var + ours.eps)
    assert_close("input grad", x.grad, expected)


def test_bad_input(backend, device):
    bn1, _ = _pair("BatchNorm1d", 3, dtype=torch.float32, device=device)
    bn2, _ = _pair("BatchNorm2d", 3, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        bn1(torch.randn(2, 3, 4, 5, device=device))
    with pytest.raises(ValueError, match="expected 4D input"):
        bn2(torch.randn(2, 3, 4, device=device))
    with pytest.raises(ValueError, match="3 channels|running_mean"):
        bn2(torch.randn(2, 4, 3, 3, device=device))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn1(torch.randn(1, 3, device=device))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn2(torch.randn(1, 3, 1, 1, device=device))
    bn1.eval()
    assert bn1(torch.randn(1, 3, device=device)).shape == (1, 3)  # one value is fine in evaluation
