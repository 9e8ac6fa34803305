"""The fast paths of the eager torch path compute what the slow paths they short-cut compute.

``python -m benchmarks.test_dispatch`` measures what fastdl adds to the PyTorch call it wraps; to
keep that small the fronts skip work the common case does not need (a cheap test first, the full
check only when it fails) and the torch path's dropout draws PyTorch's CPU dropout noise from a
private generator instead of reseeding torch's own. These tests pin that nothing observable moved:
masks bit for bit, torch's generator state, the errors and the backend choice.
"""

import pytest
import torch
import torch.nn.functional as TF

import fastdl
import fastdl.functional as F
from fastdl.functional import _validate
from fastdl.functional._library import seeded
from fastdl.functional._random import draw_seed
from fastdl.functional.dropout import _torch_dropout

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _reference_dropout(x, p, seed, inplace=False):
    """The torch path's dropout as it was first written: PyTorch's dropout under seeded()."""
    x = x if inplace else x.contiguous()
    with seeded(seed):
        return TF.dropout(x, p, True, inplace)


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(a.signbit(), b.signbit())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 64), (3, 5, 7), (1000, 33), (1,), (2, 1, 3)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.999])
def test_cpu_dropout_mask_is_pytorchs_bit_for_bit(dtype, shape, p):
    x = torch.randn(shape).to(dtype)
    x.view(-1)[0] = float("inf")  # a dropped inf gives NaN, as in PyTorch
    x.view(-1)[-1] = float("nan")
    seed = draw_seed("cpu")
    state = torch.get_rng_state()
    got = _torch_dropout(x, p, seed)
    assert torch.equal(torch.get_rng_state(), state)  # torch's generator untouched
    _same_bits(got, _reference_dropout(x, p, seed))
    if x.dim() == 2:  # a strided input is made contiguous first, as before
        _same_bits(_torch_dropout(x.t(), p, seed), _reference_dropout(x.t(), p, seed))
    inplace, reference = x.clone(), x.clone()
    assert _torch_dropout(inplace, p, seed, inplace=True) is inplace
    _reference_dropout(reference, p, seed, inplace=True)
    _same_bits(inplace, reference)


def test_cpu_dropout_gradient_is_pytorchs():
    seed = draw_seed("cpu")
    x = torch.randn(6, 9, requires_grad=True)
    g = torch.randn(6, 9)
    (ours,) = torch.autograd.grad(_torch_dropout(x, 0.3, seed), x, g)
    (theirs,) = torch.autograd.grad(_reference_dropout(x, 0.3, seed), x, g)
    _same_bits(ours, theirs)


def test_cpu_dropout_meta_and_p_one_take_pytorchs_own_dropout():
    meta = torch.empty(4, 5, device="meta")
    assert _torch_dropout(meta, 0.3, draw_seed("meta")).device.type == "meta"
    x = torch.tensor([float("inf"), 1.0])
    _same_bits(_torch_dropout(x, 1.0, draw_seed("cpu")), TF.dropout(x, 1.0))


def test_eager_and_operator_paths_draw_one_mask():
    x = torch.randn(5, 17)
    with fastdl.backend.use("torch"):
        torch.manual_seed(3)
        eager = F.dropout(x, 0.4)
        torch.manual_seed(3)
        operator = torch.ops.fastdl.dropout(x, 0.4, draw_seed("cpu"), "torch")
    _same_bits(eager, operator)


def test_seeded_restores_torchs_generator():
    seed = draw_seed("cpu")
    state = torch.get_rng_state()
    with seeded(seed):
        inside = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(int(seed))
    assert torch.equal(inside, torch.rand(5))
    torch.set_rng_state(state)
    with pytest.raises(KeyError), seeded(seed):
        torch.rand(3)
        raise KeyError("the state comes back when the enclosed code raises too")
    assert torch.equal(torch.get_rng_state(), state)


def test_all_cpu_defers_anything_else_to_check_same_device():
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    assert _validate.all_cpu(cpu, None, cpu)
    assert not _validate.all_cpu(cpu, meta)
    assert not _validate.all_cpu(cpu, [1.0])  # check_same_device then raises as it always has
    with pytest.raises(AttributeError, match="'list' object has no attribute 'device'"):
        _validate.check_same_device("a", {"a": cpu, "b": [1.0]})


def test_use_torch_decides_before_the_environment(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("FASTDL_BACKEND", "not-a-backend")
    with fastdl.backend.use("torch"):
        assert fastdl.backend.resolve(x) == "torch"
    with pytest.raises(ValueError, match="FASTDL_BACKEND must be one of"):
        fastdl.backend.resolve(x)
    monkeypatch.setenv("FASTDL_BACKEND", "torch")  # takes effect at the next call
    assert fastdl.backend.resolve(x) == "torch"
