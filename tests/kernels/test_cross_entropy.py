"""fastdl.functional.linear_cross_entropy on every backend against float64 F.cross_entropy of the
materialised logits: hard and soft targets, ignore_index, label smoothing, all reductions."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, check_op, needs_torch_linear_cross_entropy_loss, saved_bytes

import fastdl
import fastdl.functional as F

# (tokens, hidden, vocab): several chunks of 16 rows, vocabularies that are not multiples of any
# tile (and, under the interpreter, span several 256-wide tiles).
SHAPES = [(37, 24, 300), (5, 16, 17), (20, 8, 1000)]
# (reduction, label_smoothing)
SETTINGS = [("mean", 0.0), ("sum", 0.1), ("none", 0.2), ("mean", 0.3)]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Chunks of 16 rows, so that every test walks several chunks."""
    monkeypatch.setattr(fastdl.functional.cross_entropy, "MIN_CHUNK_ELEMENTS", 0)


def _dtypes(backend):
    if backend == "triton":
        return [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    return [torch.float64, torch.float32, torch.float16]  # no bf16 arithmetic in the interpreter


def ref_loss(hidden, weight, target, bias=None, **kwargs):
    vocab = weight.shape[0]
    logits = (hidden @ weight.t() if bias is None else hidden @ weight.t() + bias).reshape(-1, vocab)
    soft = target.is_floating_point()
    rows = target.shape[:-1] if soft else target.shape
    loss = TF.cross_entropy(logits, target.reshape(-1, vocab) if soft else target.reshape(-1), **kwargs)
    return loss.reshape(rows if kwargs.get("reduction") == "none" else ())


def _inputs(n, h, v, dtype, device, soft=False, ignore_index=-100, bias=True):
    hidden = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) / h ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(v, device=device).to(dtype).requires_grad_() if bias else None
    if soft:
        target = torch.softmax(2 * torch.randn(n, v, device=device), dim=-1).to(dtype)
    else:
        target = torch.randint(0, v, (n,), device=device)
        target[torch.rand(n, device=device) < 0.3] = ignore_index
    return hidden, weight, b, target


def _check(hidden, weight, bias, target, **kwargs):
    def ours(h, w, b):
        return F.linear_cross_entropy(h, w, target, b, **kwargs)

    def ref(h, w, b):
        return ref_loss(h, w, target.double() if target.is_floating_point() else target, b, **kwargs)

    def baseline(h, w, b):
        return ref_loss(h, w, target, b, **kwargs)

    check_op(ours, ref, [hidden, weight, bias], baseline_fn=baseline)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("reduction,smoothing", SETTINGS)
@pytest.mark.parametrize("dtype_index", [0, 1, 2, 3])
def test_matches_torch(backend, device, dtype_index, reduction, smoothing, soft):
    dtypes = _dtypes(backend)
    if dtype_index >= len(dtypes):
        pytest.skip("bf16 needs a GPU")
    dtype = dtypes[dtype_index]
    n, h, v = SHAPES[dtype_index % len(SHAPES)]
    _check(*_inputs(n, h, v, dtype, device, soft=soft), reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("n,h,v", SHAPES)
def test_shapes_without_bias(backend, device, n, h, v):
    hidden, weight, _, target = _inputs(n, h, v, torch.float32, device, bias=False)
    check_op(lambda x, w: F.linear_cross_entropy(x, w, target, label_smoothing=0.05),
             lambda x, w: ref_loss(x, w, target, label_smoothing=0.05), [hidden, weight])


def test_custom_ignore_index_and_batched_hidden(backend, device):
    """(B, S, H) hidden with (B, S) targets; ignore_index a real class id (7), which is skipped."""
    hidden = torch.randn(3, 11, 20, device=device, requires_grad=True)
    weight = torch.randn(50, 20, device=device, requires_grad=True)
    target = torch.randint(0, 50, (3, 11), device=device)
    target[:, ::3] = 7
    for reduction in ("mean", "none"):
        hidden.grad = weight.grad = None
        kwargs = dict(ignore_index=7, reduction=reduction)
        check_op(lambda x, w, kw=kwargs: F.linear_cross_entropy(x, w, target, **kw),
                 lambda x, w, kw=kwargs: ref_loss(x, w, target, **kw), [hidden, weight])


def test_all_targets_ignored(backend, device):
    """As torch: a NaN mean (0 / 0) and zero gradients."""
    hidden = torch.randn(6, 16, device=device, requires_grad=True)
    weight = torch.randn(40, 16, device=device, requires_grad=True)
    target = torch.full((6,), -100, device=device)
    loss = F.linear_cross_entropy(hidden, weight, target)
    ref = TF.cross_entropy(hidden @ weight.t(), target)
    assert torch.isnan(loss) and torch.isnan(ref)
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_frozen_weight_and_empty_batch(backend, device):
    hidden = torch.randn(9, 16, device=device, requires_grad=True)
    weight = torch.randn(33, 16, device=device)
    target = torch.randint(0, 33, (9,), device=device)
    check_op(lambda x: F.linear_cross_entropy(x, weight, target, reduction="sum"),
             lambda x: ref_loss(x, weight.double(), target, reduction="sum"), [hidden])
    empty = torch.randn(0, 16, device=device, requires_grad=True)
    weight.requires_grad_()
    loss = F.linear_cross_entropy(empty, weight, target[:0], reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(weight.grad, torch.zeros_like(weight))


@needs_torch_linear_cross_entropy_loss
@pytest.mark.parametrize("kwargs", [dict(bias=True, label_smoothing=0.1, reduction="sum"),
                                    dict(ignore_index=3), dict(reduction="none"), dict(soft=True)],
                         ids=["bias_smoothing_sum", "ignore_index", "none", "soft"])
def test_module_is_torch_linear_cross_entropy_loss(backend, device, kwargs):
    """torch.nn.LinearCrossEntropyLoss's twin: the same constructor, seed-for-seed Linear, state_dict
    and values; loss and gradients against CrossEntropyLoss of that Linear in float64."""
    kwargs = dict(kwargs)
    soft = kwargs.pop("soft", False)
    torch.manual_seed(1)
    ours = fastdl.nn.LinearCrossEntropyLoss(16, 70, **kwargs, device=device)
    torch.manual_seed(1)
    theirs = torch.nn.LinearCrossEntropyLoss(16, 70, **kwargs, device=device)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    assert repr(ours) == repr(theirs)
    x = torch.randn(21, 16, device=device, requires_grad=True)
    target = torch.randint(0, 70, (21,), device=device)
    if soft:
        target = torch.softmax(torch.randn(21, 70, device=device), -1)
    if "ignore_index" in kwargs:
        target[::4] = kwargs["ignore_index"]
    ce = torch.nn.CrossEntropyLoss(**{k: v for k, v in kwargs.items() if k != "bias"})
    ref_target = target.double() if soft else target
    check_op(lambda x, w, *b: ours(x, target), lambda x, w, *b: ce(TF.linear(x, w, *b), ref_target),
             [x, ours.linear.weight] + ([ours.linear.bias] if ours.linear.bias is not None else []))
    with torch.no_grad():
        assert_close("against torch's module", ours(x, target), theirs(x, target).double(), rtol=1e-5)


def test_module_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="out_features"):
        fastdl.nn.LinearCrossEntropyLoss(8, 5, out_features=(3,))
    with pytest.raises(ValueError, match="class weights"):
        fastdl.nn.LinearCrossEntropyLoss(8, 5, weight=torch.ones(5))
    with pytest.raises(TypeError):  # positional options (a CrossEntropyLoss-style call) are refused
        fastdl.nn.LinearCrossEntropyLoss(8, 5, -100)
    with pytest.raises(ValueError, match="reduction"):
        fastdl.nn.LinearCrossEntropyLoss(8, 5, reduction="avg")
    loss = fastdl.nn.LinearCrossEntropyLoss(8, 5)
    with pytest.raises(ValueError, match="input must have shape"):
        loss(torch.randn(2, 3, 8), torch.randint(0, 5, (2, 3)))
    x, target = torch.randn(3, 8), torch.tensor([1, -100, 2])  # ignore_index=None ignores -100, as torch
    assert_close("ignore_index=None", loss(x, target), TF.cross_entropy(loss.linear(x).double(), target))
    with pytest.raises(IndexError):
        loss(x, torch.tensor([1, -3, 2]))


def test_logits_are_never_saved(backend, device):
    """Saved for the backward: the gradients (tokens x hidden, vocab x hidden, vocab), nothing of
    tokens x vocab size, where torch's linear + cross_entropy saves the logits' log-softmax."""
    n, h, v = 64, 16, 500
    hidden, weight, bias, target = _inputs(n, h, v, torch.float32, device)
    ours = saved_bytes(lambda: F.linear_cross_entropy(hidden, weight, target, bias))
    theirs = saved_bytes(lambda: TF.cross_entropy(TF.linear(hidden, weight, bias), target))
    assert ours == 4 * (n * h + v * h + v)
    assert theirs >= 4 * n * v


def test_opcheck(backend, device):
    hidden, weight, bias, target = _inputs(19, 16, 40, torch.float32, device)
    for reduction in ("mean", "none"):
        args = (hidden, weight, bias, target, -100, 0.1, reduction, True, True, True, torch.float32, backend)
        torch.library.opcheck(torch.ops.fastdl.linear_cross_entropy, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_double_backward_raises(backend, device):
    """Second derivatives are not computed: a create_graph backward raises rather than returning
    gradients that are silently constants (a gradient penalty would lose its term)."""
    h = torch.randn(4, 8, device=device, requires_grad=True)
    w = torch.randn(30, 8, device=device, requires_grad=True)
    t = torch.randint(0, 30, (4,), device=device)
    for reduction in ("mean", "none"):
        loss = F.linear_cross_entropy(h, w, t, reduction=reduction).sum()
        with pytest.raises(NotImplementedError, match="not differentiable twice"):
            torch.autograd.grad(loss, h, create_graph=True)
    soft = torch.rand(4, 30, device=device, requires_grad=True)
    with torch.no_grad():  # nothing is recorded: a target that requires grad is fine
        F.linear_cross_entropy(h, w, soft)


@pytest.mark.parametrize("call,error,match", [
    (lambda h, w, t: F.linear_cross_entropy(h, w, t.int()), TypeError, "int64 class indices"),
    (lambda h, w, t: F.linear_cross_entropy(h, w, t[:-1]), ValueError, "target of class indices"),
    (lambda h, w, t: F.linear_cross_entropy(h, w, torch.rand(h.shape[0], 3, device=h.device)), ValueError,
     "soft"),
    (lambda h, w, t: F.linear_cross_entropy(h, w[:, :-1], t), ValueError, "weight must have shape"),
    (lambda h, w, t: F.linear_cross_entropy(h, w.double(), t), TypeError, "share a dtype"),
    (lambda h, w, t: F.linear_cross_entropy(h, w, t, bias=h.new_zeros(3)), ValueError, "bias"),
    (lambda h, w, t: F.linear_cross_entropy(h, w, t, reduction="avg"), ValueError, "reduction"),
    (lambda h, w, t: F.linear_cross_entropy(h, w, t, label_smoothing=1.5), ValueError, "label_smoothing"),
    # torch silently computes the unsmoothed loss for a negative value (README: refused here)
    (lambda h, w, t: F.linear_cross_entropy(h, w, t, label_smoothing=-0.1), ValueError, "label_smoothing"),
    (lambda h, w, t: F.linear_cross_entropy(h, w, t.clone().fill_(30)), IndexError, "class 30"),
    (lambda h, w, t: F.linear_cross_entropy(h, w, t.clone().fill_(-3)), IndexError, "class -3"),
    # torch: "ignore_index is not supported for floating point target"
    (lambda h, w, t: F.linear_cross_entropy(h, w, torch.rand(4, 30, device=h.device), ignore_index=0),
     ValueError, "ignore_index=0 is not supported with soft"),
    # a soft target that requires grad would get none: refused rather than silently left out
    (lambda h, w, t: F.linear_cross_entropy(h, w, torch.rand(4, 30, device=h.device, requires_grad=True)),
     ValueError, "target requires grad"),
])
def test_errors(backend, device, call, error, match):
    if backend == "triton" and error is IndexError:
        pytest.skip("CUDA targets are not range-checked (a device-to-host sync); such rows give NaN")
    h = torch.randn(4, 8, device=device)
    w = torch.randn(30, 8, device=device)
    t = torch.randint(0, 30, (4,), device=device)
    with pytest.raises(error, match=match):
        call(h, w, t)


def test_strided_targets_and_zero_width_hidden(backend, device):
    """Class indices read through a view (``labels[..., 0]``) and a hidden size of 0, as torch."""
    h = torch.randn(2, 3, 8, device=device, dtype=torch.float64 if backend == "torch" else torch.float32)
    h.requires_grad_()
    w = torch.randn(10, 8, device=device, dtype=h.dtype, requires_grad=True)
    t = torch.randint(0, 10, (2, 3, 2), device=device)[..., 0]  # stride 2
    assert not t.is_contiguous()
    loss = F.linear_cross_entropy(h, w, t, label_smoothing=0.1)
    ref = TF.cross_entropy(h.double().reshape(6, 8) @ w.double().T, t.reshape(6), label_smoothing=0.1)
    assert_close("loss", loss, ref)
    for name, g, r in zip(("hidden", "weight"), torch.autograd.grad(loss, (h, w)),
                          torch.autograd.grad(ref, (h, w))):
        assert_close(f"grad {name}", g, r.to(g.dtype))
    empty = F.linear_cross_entropy(torch.randn(3, 0, device=device), torch.randn(10, 0, device=device), t[0])
    assert_close("H = 0", empty, TF.cross_entropy(torch.zeros(3, 10, device=device), t[0]))


@pytest.mark.parametrize("big", [50.0, 1e4])
@pytest.mark.parametrize("soft,smoothing", [(False, 0.0), (False, 0.1), (True, 0.0)])
def test_large_logits_keep_torchs_precision(backend, device, big, soft, smoothing):
    """Losses and gradients relative to the largest logit, as torch's log-softmax: at logits near
    50 a confident row's loss (1.7e-5) was 9% off when lse = max + log d was formed first, and at
    1e4 it was 0. Logits are exact here (identity weight), so fastdl's fp32 error must stay
    within 3x torch's own fp32 error against float64 (plus a float32 floor)."""
    V = 300
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, V, generator=g) * 3 + big
    x[1, 0] += 11.0  # confident rows
    x[4, 7] += 15.0
    x = x.to(device)
    t = torch.tensor([0, 0, 5, 9, 7, 299], device=device)
    if soft:
        t = torch.softmax(torch.randn(6, V, generator=g).to(device) * 4, dim=-1)
    w = torch.eye(V, device=device)

    def run(fn, dtype):
        h = x.to(dtype).requires_grad_()
        loss = fn(h, w.to(dtype), t.to(dtype) if soft else t)
        return loss.detach().double(), torch.autograd.grad(loss.sum(), h)[0].double()

    def torch_ce(h, w, t):
        return TF.cross_entropy(h @ w.T, t, reduction="none", label_smoothing=smoothing)

    ref, base = run(torch_ce, torch.float64), run(torch_ce, torch.float32)
    got = run(lambda h, w, t: F.linear_cross_entropy(h, w, t, reduction="none", label_smoothing=smoothing),
              torch.float32)
    for name, i in (("loss", 0), ("gradient", 1)):
        error = ((got[i] - ref[i]) / ref[i].abs().clamp_min(1e-30)).abs().max().item()
        bound = 3 * ((base[i] - ref[i]) / ref[i].abs().clamp_min(1e-30)).abs().max().item() + 1e-5
        assert error <= bound, f"{name}: relative error {error:.2e} > {bound:.2e}"


@pytest.mark.parametrize("soft,smoothing", [(False, 0.0), (False, 0.1), (True, 0.0), (True, 0.1)])
def test_logits_of_minus_infinity_as_torch(backend, device, soft, smoothing):
    """A bias of -inf masking classes out of the vocabulary, as torch's formulas treat it: without
    smoothing a masked class costs nothing unless it is the target (loss +inf); smoothing makes
    every row infinite; a soft target of 0 at a masked class is NaN (0 * -inf) unless smoothing
    mixes in eps / V. The kernel used to add a smoothing term of 0 * inf = NaN to every row, and
    both paths to split a soft row into two sums, one NaN where torch's single sum is infinite."""
    g = torch.Generator().manual_seed(1)
    n, h, v = 7, 12, 300
    hidden = torch.randn(n, h, generator=g).to(device).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(device).requires_grad_()
    bias = torch.randn(v, generator=g)
    bias[[3, 150, 299]] = float("-inf")
    bias = bias.to(device)
    if soft:
        target = torch.softmax(torch.randn(n, v, generator=g), dim=-1)
        target[:4, [3, 150, 299]] = 0.0  # rows 0-3: nothing on the masked classes; 4-6: some
        target = target.to(device)
    else:
        target = torch.randint(0, v, (n,), generator=g)
        target[target == 3] = 4
        target[1], target[5] = 150, -100  # one row's target is masked out, one row ignored
        target = target.to(device)

    def run(dtype):
        x, w = hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
        t = target.to(dtype) if soft else target
        fn = TF.cross_entropy if dtype == torch.float64 else None
        kwargs = dict(label_smoothing=smoothing, reduction="none")
        loss = (fn(x @ w.T + bias.to(dtype), t, **kwargs) if fn
                else F.linear_cross_entropy(x, w, t, bias.to(dtype), **kwargs))
        grads = torch.autograd.grad(loss.sum() if not soft else loss[4:].sum(), (x, w))
        return loss.detach().double(), [gr.double() for gr in grads]

    (ref, ref_grads), (got, got_grads) = run(torch.float64), run(torch.float32)
    assert torch.isnan(ref).any() == (soft and not smoothing)  # the cases this test is about
    assert torch.isinf(ref).any()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, equal_nan=True)
    for name, a, b in zip(("hidden", "weight"), got_grads, ref_grads):
        if torch.isfinite(b).all():
            assert_close(f"grad {name}", a, b, rtol=1e-4)
