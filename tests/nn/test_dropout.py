"""fastdl.nn.Dropout as a drop-in for torch.nn.Dropout: constructor, modes, state_dict, outputs."""

import math

import pytest
import torch
from helpers import assert_close

import fastdl


def test_is_a_torch_dropout():
    ours, ref = fastdl.nn.Dropout(0.3, inplace=True), torch.nn.Dropout(0.3, inplace=True)
    assert isinstance(ours, torch.nn.Dropout)
    assert (ours.p, ours.inplace) == (ref.p, ref.inplace)
    assert repr(ours) == repr(ref)
    assert ours.state_dict().keys() == ref.state_dict().keys() == set()
    assert fastdl.nn.Dropout().p == 0.5


@pytest.mark.parametrize("p", [-0.5, 1.01])
def test_bad_p_raises(p):
    with pytest.raises(ValueError, match="probability"):
        fastdl.nn.Dropout(p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_train_mode(backend, device, dtype):
    module = fastdl.nn.Dropout(0.25)
    x = torch.randn(201, 99, device=device)
    x = (x + torch.sign(x) * 0.1).to(dtype).requires_grad_()  # no zeros except dropped ones
    y = module(x)
    keep = y != 0
    scale = 1 / 0.75
    assert_close("output", y, torch.where(keep, x.detach().double() * scale, 0.0),
                 rtol=1e-6 if dtype == torch.float32 else None)
    dropped = 1 - keep.double().mean().item()
    assert abs(dropped - 0.25) < 5 * math.sqrt(0.25 * 0.75 / x.numel())
    dy = torch.randn_like(x)
    y.backward(dy)
    assert_close("grad", x.grad, torch.where(keep, dy.double() * scale, 0.0),
                 rtol=1e-6 if dtype == torch.float32 else None)


def test_eval_mode_is_identity(backend, device):
    module = fastdl.nn.Dropout(0.9).eval()
    x = torch.randn(17, 5, device=device)
    assert torch.equal(module(x), x)
    module.train()
    assert not torch.equal(module(x), x)


def test_inplace_module(backend, device):
    module = fastdl.nn.Dropout(0.5, inplace=True)
    a = torch.randn(33, 7, device=device, requires_grad=True)
    h = a + 1.0
    y = module(h)
    assert y is h
    keep = y != 0
    y.backward(torch.ones_like(y))
    assert torch.equal(a.grad, keep.to(a.dtype) * 2.0)


def test_reproducible_under_manual_seed(backend, device):
    module = fastdl.nn.Dropout(0.5)
    x = torch.randn(40, 40, device=device)
    torch.manual_seed(0)
    a = module(x)
    torch.manual_seed(0)
    assert torch.equal(module(x), a)


def test_swap_into_a_model(backend, device):
    """Replacing torch's Dropout keeps eval outputs identical and train outputs on the same scale."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.2), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4)).to(device)
    x = torch.randn(5, 16, device=device)
    model.eval()
    expected = model(x)
    model[1] = fastdl.nn.Dropout(0.2)
    model.eval()
    assert torch.equal(model(x), expected)
    model.train()
    out = model(x)
    out.sum().backward()
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()
