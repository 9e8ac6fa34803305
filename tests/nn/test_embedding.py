"""fastdl.nn.Embedding as a drop-in for torch.nn.Embedding: constructor, state_dict both ways,
from_pretrained, and the same outputs and gradients."""

import pytest
import torch
from helpers import assert_close, check_op

import fastdl

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pair(*args, dtype=torch.float32, device="cpu", **kwargs):
    """A torch.nn.Embedding and fastdl's copy of it via load_state_dict."""
    ref = torch.nn.Embedding(*args, **kwargs, device=device, dtype=dtype)
    ours = fastdl.nn.Embedding(*args, **kwargs, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _compare(ours, ref, idx):
    """Output and weight gradient of fastdl's module vs a float64 copy of torch's module (and
    torch's module in the same dtype as the low-precision baseline)."""
    ref64 = torch.nn.Embedding(ref.num_embeddings, ref.embedding_dim, padding_idx=ref.padding_idx,
                               scale_grad_by_freq=ref.scale_grad_by_freq, device=idx.device,
                               dtype=torch.float64)

    def call(module):
        return lambda w: torch.func.functional_call(module, {"weight": w}, (idx,))

    check_op(call(ours), call(ref64), [ours.weight.detach().clone().requires_grad_()], baseline_fn=call(ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", [{}, {"padding_idx": 3}, {"padding_idx": -2},
                                    {"scale_grad_by_freq": True}])
def test_module_matches_torch(backend, device, dtype, kwargs):
    ours, ref = _pair(1000, 33, dtype=dtype, device=device, **kwargs)
    assert ours.padding_idx == ref.padding_idx  # negative padding_idx normalised as torch does
    idx = torch.randint(0, 1000, (4, 9), device=device)
    idx[:, :3] = torch.randint(0, 5, (4, 3), device=device)  # repeats, the padding row among them
    _compare(ours, ref, idx)


def test_is_a_torch_embedding_with_torch_init_and_state_dict(backend, device):
    torch.manual_seed(0)
    ref = torch.nn.Embedding(50, 7, padding_idx=4, device=device)
    torch.manual_seed(0)
    ours = fastdl.nn.Embedding(50, 7, padding_idx=4, device=device)
    assert isinstance(ours, torch.nn.Embedding)
    assert torch.equal(ours.weight, ref.weight) and torch.all(ours.weight[4] == 0)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    assert repr(ours).endswith(repr(ref).split("(", 1)[1])
    # torch -> fastdl and fastdl -> torch
    back = torch.nn.Embedding(50, 7, padding_idx=4, device=device)
    with torch.no_grad():
        ours.weight.normal_()
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, ours.weight)
    idx = torch.randint(0, 50, (3, 4), device=device)
    assert torch.equal(ours(idx), back(idx))


@pytest.mark.parametrize("freeze", [True, False])
def test_from_pretrained(backend, device, freeze):
    table = torch.randn(12, 10, device=device)
    ours = fastdl.nn.Embedding.from_pretrained(table, freeze=freeze, padding_idx=-1)
    ref = torch.nn.Embedding.from_pretrained(table.clone(), freeze=freeze, padding_idx=-1)
    assert type(ours) is fastdl.nn.Embedding
    assert ours.weight.requires_grad == (not freeze)
    assert ours.padding_idx == ref.padding_idx == 11
    assert torch.equal(ours.weight, table)
    idx = torch.tensor([[0, 11, 3], [3, 3, 7]], device=device)
    out = ours(idx)
    assert torch.equal(out, ref(idx))
    if not freeze:
        dy = torch.randn_like(out)
        out.backward(dy)
        ref(idx).backward(dy)
        assert_close("weight grad", ours.weight.grad, ref.weight.grad, rtol=1e-6)
    else:
        assert not out.requires_grad


def test_from_pretrained_options_and_bad_table(backend, device):
    ours = fastdl.nn.Embedding.from_pretrained(torch.randn(6, 4, device=device), max_norm=1.0,
                                               norm_type=1.0, scale_grad_by_freq=True, sparse=True)
    assert (ours.max_norm, ours.norm_type, ours.scale_grad_by_freq, ours.sparse) == (1.0, 1.0, True, True)
    with pytest.raises(ValueError, match="2-D"):
        fastdl.nn.Embedding.from_pretrained(torch.randn(6, device=device))


def test_max_norm_module_renormalises_weight_like_torch(backend, device):
    ours, ref = _pair(30, 11, max_norm=1.0, device=device)
    with torch.no_grad():
        ref.weight.mul_(4)
        ours.weight.copy_(ref.weight)
    idx = torch.randint(0, 20, (5, 6), device=device)
    out, expected = ours(idx), ref(idx)
    assert_close("output", out, expected, rtol=1e-6)
    assert_close("weight after renorm", ours.weight.detach(), ref.weight.detach(), rtol=1e-6)
    dy = torch.randn_like(out)
    out.backward(dy)
    expected.backward(dy)
    assert_close("weight grad", ours.weight.grad, ref.weight.grad, rtol=1e-6)


def test_sparse_module_with_sparse_optimizer(backend, device):
    ours, ref = _pair(40, 6, sparse=True, padding_idx=0, device=device)
    idx = torch.randint(0, 40, (3, 7), device=device)
    idx[0, 0] = 0
    for module in (ours, ref):
        opt = torch.optim.SparseAdam(list(module.parameters()), lr=0.1)
        module(idx).square().sum().backward()
        assert module.weight.grad.is_sparse
        opt.step()
    assert_close("weight after a SparseAdam step", ours.weight.detach(), ref.weight.detach(), rtol=1e-6)


def test_module_bad_index(backend, device, monkeypatch):
    if device == "cuda":  # the opt-in eager check (CUDA's default is device-side)
        monkeypatch.setenv("FASTDL_EAGER_INDEX_CHECK", "1")
    module = fastdl.nn.Embedding(10, 3, device=device)
    with pytest.raises(IndexError, match="index 10"):
        module(torch.tensor([[1, 10]], device=device))
    with pytest.raises(TypeError, match="input"):
        module(torch.tensor([1.0], device=device))
