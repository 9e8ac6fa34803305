"""fastdl.nn.LayerNorm / RMSNorm as drop-ins for torch.nn: state_dict both ways, same outputs
and gradients."""

import pytest
import torch
from helpers import assert_close, check_op

import fastdl

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pair(cls_name, *args, dtype, device, **kwargs):
    """A torch.nn module with random affine parameters, and fastdl's copy via load_state_dict."""
    ref = getattr(torch.nn, cls_name)(*args, **kwargs, device=device, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
    ours = getattr(fastdl.nn, cls_name)(*args, **kwargs, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _compare_modules(ours, ref, x):
    """Outputs, input gradient and parameter gradients of fastdl's module vs a float64 copy of the
    torch module (and torch's module in the same dtype as the low-precision baseline)."""
    ref64 = type(ref)(**_ctor_args(ref)).double().to(x.device)
    ref64.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    params = list(ours.parameters())

    # Parameters enter check_op as inputs so their gradients are compared too; the modules read
    # them through torch.func.functional_call to keep autograd connected.
    names = [n for n, _ in ours.named_parameters()]

    def call(module):
        return lambda x, *ps: torch.func.functional_call(module, dict(zip(names, ps)), (x,))

    check_op(call(ours), call(ref64), [x] + [p.detach().clone().requires_grad_() for p in params],
             baseline_fn=call(ref))


def _ctor_args(module):
    if isinstance(module, torch.nn.LayerNorm):
        return dict(normalized_shape=module.normalized_shape, eps=module.eps,
                    elementwise_affine=module.elementwise_affine, bias=module.bias is not None)
    return dict(normalized_shape=module.normalized_shape, eps=module.eps,
                elementwise_affine=module.elementwise_affine)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,norm_shape", [((2, 5, 96), 96), ((3, 4, 6), (4, 6)), ((1, 513), 513)])
def test_layer_norm_module(backend, device, dtype, shape, norm_shape):
    ours, ref = _pair("LayerNorm", norm_shape, dtype=dtype, device=device)
    _compare_modules(ours, ref, torch.randn(shape, device=device, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,norm_shape", [((2, 5, 96), 96), ((3, 4, 6), (4, 6)), ((1, 513), 513)])
def test_rms_norm_module(backend, device, dtype, shape, norm_shape):
    ours, ref = _pair("RMSNorm", norm_shape, eps=1e-6, dtype=dtype, device=device)
    _compare_modules(ours, ref, torch.randn(shape, device=device, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("kwargs", [dict(elementwise_affine=False), dict(bias=False), dict(eps=1e-3)])
def test_layer_norm_options(backend, device, kwargs):
    ours, ref = _pair("LayerNorm", 40, dtype=torch.float32, device=device, **kwargs)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(7, 40, device=device, requires_grad=True)
    if ours.weight is None:
        assert_close("output", ours(x), ref.double()(x.double()))
    else:
        _compare_modules(ours, ref, x)


def test_rms_norm_without_affine(backend, device):
    ours, ref = _pair("RMSNorm", 40, elementwise_affine=False, dtype=torch.float32, device=device)
    assert list(ours.state_dict()) == []
    x = torch.randn(7, 40, device=device)
    assert_close("output", ours(x), ref.double()(x.double()))


@pytest.mark.parametrize("cls_name", ["LayerNorm", "RMSNorm"])
def test_state_dict_round_trip_and_repr(cls_name):
    ours, ref = _pair(cls_name, (3, 8), dtype=torch.float32, device="cpu")
    assert isinstance(ours, getattr(torch.nn, cls_name))
    assert ours.state_dict().keys() == ref.state_dict().keys()
    back = getattr(torch.nn, cls_name)((3, 8))
    back.load_state_dict(ours.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k])
    assert repr(ours).startswith(cls_name + "(")


@pytest.mark.parametrize("cls_name", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("batch", [0, 1])
def test_tiny_batches(backend, device, cls_name, batch):
    ours, ref = _pair(cls_name, 24, dtype=torch.float32, device=device)
    x = torch.randn(batch, 24, device=device, requires_grad=True)
    y = ours(x)
    assert y.shape == (batch, 24)
    assert_close("output", y, ref.double()(x.double()))
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_swap_into_a_model(backend, device):
    """The quickstart's story: replace nn.LayerNorm in a small model, same outputs."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                torch.nn.Linear(32, 4)).to(device)
    fused = fastdl.nn.LayerNorm(32).to(device)
    fused.load_state_dict(model[1].state_dict())
    x = torch.randn(5, 16, device=device)
    expected = model(x)
    model[1] = fused
    assert_close("output", model(x), expected.double(), rtol=1e-5)
