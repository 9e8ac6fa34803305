"""Forward-mode AD and torch.func transforms through every public function.

PyTorch runs a custom operator without its tangents under forward-mode AD (silent zeros) and
refuses its autograd formula under ``torch.func.grad``. So under ``auto`` these calls take the
torch path (PyTorch ops), and a forced kernel backend raises. Each case is compared with its
PyTorch twin run in float64 on the same inputs and tangents.
"""

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF

import fastdl
import fastdl.functional as F
from fastdl.backend import BackendError
from tests.helpers import assert_close

D = 16


def _case_layer_norm():
    x, w, b = torch.randn(3, 5, D), torch.randn(D), torch.randn(D)
    return ((x, w, b), lambda x, w, b: F.layer_norm(x, (D,), w, b),
            lambda x, w, b: TF.layer_norm(x, (D,), w, b))


def _case_rms_norm():
    x, w = torch.randn(3, 5, D), torch.randn(D)
    return (x, w), lambda x, w: F.rms_norm(x, (D,), w), lambda x, w: TF.rms_norm(x, (D,), w)


def _case_batch_norm():
    x, w, b = torch.randn(6, 4, 5), torch.randn(4), torch.randn(4)
    return ((x, w, b), lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
            lambda x, w, b: TF.batch_norm(x, None, None, w, b, training=True))


def _case_add_norm():
    x, r, w, b = torch.randn(4, D), torch.randn(4, D), torch.randn(D), torch.randn(D)
    return ((x, r, w, b), lambda x, r, w, b: F.dropout_add_layer_norm(x, r, w, b, p=0.0)[0],
            lambda x, r, w, b: TF.layer_norm(x + r, (D,), w, b))


def _case_embedding():
    w, idx = torch.randn(11, D), torch.randint(0, 11, (3, 7))
    return (w,), lambda w: F.embedding(idx, w), lambda w: TF.embedding(idx, w)


def _case_bert_embeddings():
    ids, types = torch.randint(0, 13, (2, 6)), torch.randint(0, 2, (2, 6))
    word, pos, typ = torch.randn(13, D), torch.randn(8, D), torch.randn(2, D)
    g, b = torch.randn(D), torch.randn(D)

    def ours(word, pos, typ, g, b):
        return F.bert_embeddings(ids, types, None, word, pos, typ, g, b, 1e-12, 0.1, False)

    def ref(word, pos, typ, g, b):
        return TF.layer_norm(word[ids] + pos[:6] + typ[types], (D,), g, b, 1e-12)

    return (word, pos, typ, g, b), ours, ref


def _case_sdpa():
    q, k, v = torch.randn(2, 3, 5, D), torch.randn(2, 3, 7, D), torch.randn(2, 3, 7, D)
    mask = torch.randn(2, 1, 5, 7)
    return ((q, k, v), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype)))


def _case_causal_sdpa():
    q, k, v = torch.randn(2, 3, 6, D), torch.randn(2, 3, 6, D), torch.randn(2, 3, 6, D)
    return ((q, k, v), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True))


def _case_varlen():
    lengths = [3, 5]
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = torch.randn(8, 2, D), torch.randn(8, 2, D), torch.randn(8, 2, D)

    def ref(q, k, v):
        outs = [TF.scaled_dot_product_attention(*(t[a:a + n].transpose(0, 1) for t in (q, k, v)),
                                                is_causal=True).transpose(0, 1)
                for a, n in zip(cu[:-1].tolist(), lengths)]
        return torch.cat(outs)

    return ((q, k, v), lambda q, k, v: F.varlen_attention(q, k, v, cu, cu, 5, 5, is_causal=True), ref)


def _case_linear_cross_entropy():
    h, w, b = torch.randn(6, D), torch.randn(37, D), torch.randn(37)
    t = torch.randint(0, 37, (6,))
    t[2] = -100
    return ((h, w, b), lambda h, w, b: F.linear_cross_entropy(h, w, t, b, label_smoothing=0.1),
            lambda h, w, b: TF.cross_entropy(TF.linear(h, w, b), t, label_smoothing=0.1))


CASES = {name[len("_case_"):]: fn for name, fn in globals().items() if name.startswith("_case_")}


def _interpreting() -> bool:
    return fastdl.backend.triton_available() and fastdl.backend.interpreter_active()


def _reference(ref, inputs, tangents):
    """(output, jvp tangent) of the PyTorch twin in float64."""
    return torch.func.jvp(ref, tuple(t.double() for t in inputs), tuple(t.double() for t in tangents))


def _torch_refuses(ref, inputs, tangents) -> type | None:
    """The exception type PyTorch's twin raises in the inputs' own dtype -- under forward-mode AD
    with ``tangents``, else called as is (CPU flash attention has no forward formula), or None."""
    try:
        ref(*inputs) if tangents is None else torch.func.jvp(ref, inputs, tangents)
    except (NotImplementedError, RuntimeError) as error:
        return type(error)
    return None


def _build(case: str, device: str):
    """The case's inputs, closed-over tensors included, made on ``device``."""
    with torch.device(device):
        return CASES[case]()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def place(request):
    """Where the tensors live: under ``auto`` CUDA tensors would run the compiled kernels."""
    return request.param


@pytest.fixture(params=["auto", "torch"])
def chosen(request):
    with fastdl.backend.use(request.param):
        yield request.param


@pytest.mark.parametrize("case", sorted(CASES))
def test_jvp_carries_tangents(case, chosen, place):
    inputs, ours, ref = _build(case, place)
    tangents = tuple(torch.randn_like(t) for t in inputs)
    refused = _torch_refuses(ref, inputs, tangents)
    if refused is not None:  # fastdl raises as PyTorch does, never silent zeros
        with pytest.raises(refused):
            torch.func.jvp(ours, inputs, tangents)
        return
    out, tangent = torch.func.jvp(ours, inputs, tangents)
    ref_out, ref_tangent = _reference(ref, inputs, tangents)
    assert_close(f"{case} output", out, ref_out.float(), rtol=1e-5)
    assert_close(f"{case} jvp", tangent, ref_tangent.float(), rtol=1e-5)
    assert tangent.abs().max() > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_ad_dual_tensors(case, chosen, place):
    inputs, ours, ref = _build(case, place)
    tangents = tuple(torch.randn_like(t) for t in inputs)
    refused = _torch_refuses(ref, inputs, tangents)
    with fwAD.dual_level(), (pytest.raises(refused) if refused else contextlib.nullcontext()):
        out = ours(*(fwAD.make_dual(x, t) for x, t in zip(inputs, tangents)))
        tangent = fwAD.unpack_dual(out).tangent
    if refused:
        return
    assert tangent is not None, f"{case}: the tangent was dropped"
    _, ref_tangent = _reference(ref, inputs, tangents)
    assert_close(f"{case} forward AD", tangent, ref_tangent.float(), rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_func_grad_and_jacfwd(case, chosen, place):
    inputs, ours, ref = _build(case, place)
    out = ours(*inputs)
    cotangent = torch.randn_like(out)
    argnums = tuple(range(len(inputs)))
    grads = torch.func.grad(lambda *a: (ours(*a) * cotangent).sum(), argnums=argnums)(*inputs)
    ref_grads = torch.func.grad(lambda *a: (ref(*a) * cotangent.double()).sum(), argnums=argnums)(
        *(t.double() for t in inputs))
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(f"{case} grad {i}", g, r.float(), rtol=1e-5)
    # Forward over reverse: a Hessian-vector product through the op (jvp of grad).
    tangent = torch.randn_like(inputs[0])

    def hvp(fn, dtype):
        rest = tuple(t.to(dtype) for t in inputs[1:])
        cot = cotangent.to(dtype)

        def first_grad(x):
            return torch.func.grad(lambda x: (fn(x, *rest) * cot).sum())(x)

        return torch.func.jvp(first_grad, (inputs[0].to(dtype),), (tangent.to(dtype),))[1]

    refused = _torch_refuses(lambda x: hvp(ref, x.dtype), inputs[:1], tangents=None)
    if refused is not None:
        with pytest.raises(refused):
            hvp(ours, inputs[0].dtype)
        return
    assert_close(f"{case} hvp", hvp(ours, inputs[0].dtype), hvp(ref, torch.float64).float(), rtol=1e-4)


def test_dropout_tangent_follows_the_mask(chosen, place):
    x, t, p = torch.randn(64, 64, device=place), torch.randn(64, 64, device=place), 0.3
    out, tangent = torch.func.jvp(lambda x: F.dropout(x, p), (x,), (t,))
    kept = out != 0
    assert 0.6 < kept.float().mean() < 0.8
    torch.testing.assert_close(tangent, torch.where(kept, t / (1 - p), 0.0))
    torch.testing.assert_close(out, torch.where(kept, x / (1 - p), 0.0))


@pytest.mark.parametrize("case", sorted(CASES))
def test_forced_kernel_backend_refuses_transforms(case):
    if not _interpreting():
        pytest.skip("the interpreter is not active in this process")
    inputs, ours, _ = CASES[case]()
    tangents = tuple(torch.randn_like(t) for t in inputs)
    with fastdl.backend.use("interpret"):
        ours(*inputs)  # without a transform the kernel takes the call
        with pytest.raises(BackendError, match="forward-mode AD"):
            torch.func.jvp(ours, inputs, tangents)
        with pytest.raises(BackendError, match="torch.func transform"):
            torch.func.grad(lambda *a: ours(*a).sum())(*inputs)


def test_operators_refuse_forward_ad():
    """Called directly (or traced by torch.compile, which runs the fake implementation), an
    operator under forward-mode AD raises instead of returning zero tangents."""
    x, w, b, t = torch.randn(4, D), torch.randn(D), torch.randn(D), torch.randn(4, D)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="fastdl::layer_norm"):
        torch.ops.fastdl.layer_norm(fwAD.make_dual(x, t), w, b, 1, 1e-5, "auto")
    with pytest.raises(Exception, match="no forward-mode AD formula"):
        torch.compile(lambda x, t: torch.func.jvp(lambda x: F.layer_norm(x, (D,), w, b), (x,), (t,)),
                      backend="aot_eager", fullgraph=True)(x, t)
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("case,batched", [("layer_norm", 1), ("rms_norm", 1), ("causal_sdpa", 3),
                                          ("add_norm", 2)])
def test_vmap_over_the_data(case, batched, backend, device):
    """vmap alone keeps the backend (PyTorch loops over the batch for a custom operator); the
    first ``batched`` inputs are mapped over, the parameters are shared."""
    inputs, ours, ref = _build(case, device)
    dims = (0,) * batched + (None,) * (len(inputs) - batched)
    out = torch.func.vmap(ours, in_dims=dims)(*inputs)
    expected = torch.func.vmap(ref, in_dims=dims)(*(t.double() for t in inputs))
    assert_close(f"{case} under vmap", out, expected.float(), rtol=1e-5)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("randomness", ["same", "different"])
def test_vmap_dropout_randomness(backend, device, randomness):
    """vmap's randomness flag as for torch's dropout: one mask for every sample, or one each."""
    x, p = torch.rand(6, 256, device=device) + 0.5, 0.3
    y = torch.func.vmap(lambda r: F.dropout(r, p), randomness=randomness)(x)
    kept = y != 0
    assert 0.6 < kept.float().mean() < 0.8
    torch.testing.assert_close(y, torch.where(kept, x / (1 - p), 0.0))
    assert bool((kept == kept[0]).all()) == (randomness == "same")
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(lambda r: F.dropout(r, p))(x)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_per_sample_gradients_through_dropout(chosen, place):
    """vmap(grad(f), randomness="different"), the per-sample-gradient idiom, through dropout: each
    sample's gradient of sum(dropout(x_i @ W)) keeps or zeroes whole columns x_i / (1 - p), with a
    mask of its own."""
    W, x, p = torch.randn(6, 64, device=place), torch.randn(5, 6, device=place), 0.5
    per_sample = torch.func.vmap(torch.func.grad(lambda W, xi: F.dropout(xi @ W, p).sum()),
                                 in_dims=(None, 0), randomness="different")(W, x)
    kept = per_sample.abs().sum(1) != 0                                   # (5, 64): the masks
    expected = x[:, :, None] / (1 - p) * kept[:, None, :]
    torch.testing.assert_close(per_sample, expected)
    assert 0.3 < kept.float().mean() < 0.7 and not bool((kept == kept[0]).all())


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vmap_over_bert_with_a_padding_mask():
    """vmap over single sequences and their padding masks: the automatic unpadded mode would read
    the mask on the host, which vmap cannot; the padded path runs and gives the batch's rows."""
    from fastdl.models import BertConfig, BertModel
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=16)
    model = BertModel(config).eval()
    ids = torch.randint(0, 40, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 6:] = 0
    rows = torch.func.vmap(lambda i, m: model(i[None], attention_mask=m[None]).last_hidden_state[0])(
        ids, mask)
    expected = model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close("real tokens", rows[real], expected[real], rtol=1e-5)


def _dropout_cases(device):
    x, r = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    q = torch.randn(2, 2, 5, 16, device=device)
    ids = torch.randint(0, 6, (2, 3), device=device)
    word, pos, typ = (torch.randn(n, 6, device=device) for n in (6, 3, 2))
    return x, {
        "dropout": lambda x: F.dropout(x, 0.5),
        "add_norm": lambda x: F.dropout_add_layer_norm(x, r, None, None, 0.5)[0],
        "sdpa": lambda x: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5) * x.sum(),
        "bert": lambda x: F.bert_embeddings(ids, None, None, word, pos, typ, None, None, 1e-12, 0.5, True)
        * x.sum()}


@pytest.mark.parametrize("case", ["dropout", "add_norm", "sdpa", "bert"])
def test_transforms_draw_the_eager_masks(case, chosen, place):
    """Under jvp and grad a call draws the dropout mask an eager call draws for the same seed (the
    kernel's, computed in torch ops), so forward-mode and reverse-mode checks of one function agree."""
    x, cases = _dropout_cases(place)
    f = cases[case]
    torch.manual_seed(1)
    eager = f(x)
    torch.manual_seed(1)
    primal, _ = torch.func.jvp(f, (x,), (torch.ones_like(x),))
    torch.testing.assert_close(primal, eager)
    if case == "dropout":
        torch.manual_seed(1)
        grad = torch.func.grad(lambda x: (f(x) * x).sum())(x)
        torch.testing.assert_close(grad, 2 * eager)  # d/dx of x * mask * x

        def seeded(x):
            torch.manual_seed(1)
            return F.dropout(x, 0.5)

        assert torch.autograd.gradcheck(seeded, (x.double().requires_grad_(),), check_forward_ad=True)
