"""fastdl.nn.MultiheadAttention as a drop-in for torch.nn.MultiheadAttention.

A torch module's state_dict is loaded into fastdl's; outputs, attention weights and the gradients
of the inputs and of every parameter are compared with the torch module run in float64 (fp32
within 2e-4 relative, the attention tolerance; fp16 within 3x torch's own fp16 error). Masks:
bool (True = ignore) and float, key padding, 2-D and 3-D attention masks, their merge, the causal
hint. Rows are never fully masked in these comparisons (torch's need_weights path returns NaN
there); fully masked rows have their own test. Sizes are small and odd: the interpreter runs the
real kernels.
"""

import contextlib
import math

import pytest
import torch
from helpers import assert_close, check_module

import fastdl

RTOL = 2e-4
# torch's reference warns when a bool and a float mask are combined; fastdl accepts the mix.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched")
E, N, L, S = 32, 2, 7, 11


def _pair(device, dtype=torch.float32, **kwargs):
    """torch.nn.MultiheadAttention with random (nonzero) parameters and fastdl's copy of it."""
    ref = torch.nn.MultiheadAttention(E, kwargs.pop("num_heads", 4), device=device, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 1.0 / math.sqrt(p.shape[-1])))
    ours = fastdl.nn.MultiheadAttention(E, ref.num_heads, device=device, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _layout(x_lne, batch_first):
    return x_lne.transpose(0, 1).contiguous() if batch_first else x_lne


def _kpm(batch, length, device):
    """Bool key padding (True = padding) with a different number of padded keys per row, never all."""
    lengths = torch.tensor([length - 3 * i for i in range(batch)], device=device).clamp(min=1)
    return torch.arange(length, device=device)[None, :] >= lengths[:, None]


def _random_ignore(*shape, device):
    """A random bool "ignore" mask whose first key is always allowed (key padding pads the end)."""
    m = torch.rand(*shape, device=device) < 0.4
    m[..., 0] = False
    return m


def _as_float(ignore):
    """An additive float mask equivalent to a bool 'ignore' mask, plus finite noise elsewhere."""
    noise = torch.randn(ignore.shape, device=ignore.device) * 0.5
    return noise.masked_fill(ignore, float("-inf"))


# -- self-attention, masks ------------------------------------------------------------------------

def _self_call(mha, x, *masks, kind=None, need_weights=False, average=True):
    kw = dict(need_weights=need_weights, average_attn_weights=average)
    if kind == "kpm":
        kw["key_padding_mask"] = masks[0]
    elif kind == "attn":
        kw["attn_mask"] = masks[0]
    elif kind == "both":
        kw["attn_mask"], kw["key_padding_mask"] = masks
    elif kind == "causal":
        kw["attn_mask"], kw["is_causal"] = masks[0], True
    elif kind == "causal+kpm":
        kw["attn_mask"], kw["key_padding_mask"], kw["is_causal"] = masks[0], masks[1], True
    return mha(x, x, x, **kw)


MASK_CASES = ["none", "kpm-bool", "kpm-float", "attn2d-bool", "attn2d-float", "attn3d-bool", "attn3d-float",
              "both-bool", "both-mixed", "causal", "causal+kpm"]


def _masks(case, heads, device):
    causal = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
    kpm = _kpm(N, L, device)
    return {
        "none": (None, ()),
        "kpm-bool": ("kpm", (kpm,)),
        "kpm-float": ("kpm", (_as_float(kpm),)),
        "attn2d-bool": ("attn", (_random_ignore(L, L, device=device),)),
        "attn2d-float": ("attn", (_as_float(_random_ignore(L, L, device=device)),)),
        "attn3d-bool": ("attn", (_random_ignore(N * heads, L, L, device=device),)),
        "attn3d-float": ("attn", (_as_float(_random_ignore(N * heads, L, L, device=device)),)),
        "both-bool": ("both", (_random_ignore(L, L, device=device), kpm)),
        "both-mixed": ("both", (_as_float(_random_ignore(L, L, device=device)), kpm)),
        "causal": ("causal", (causal,)),
        "causal+kpm": ("causal+kpm", (causal, kpm)),
    }[case]


@pytest.mark.parametrize("case", MASK_CASES)
def test_self_attention_masks(backend, device, case):
    heads = 2 if "3d" in case else 4
    ours, ref = _pair(device, num_heads=heads, batch_first=case in ("kpm-bool", "both-mixed", "causal"))
    kind, masks = _masks(case, heads, device)
    x = _layout(torch.randn(L, N, E, device=device), ours.batch_first)
    check_module(ours, ref, lambda m, x, *ms: _self_call(m, x, *ms, kind=kind), [x], masks)


@pytest.mark.parametrize("case", ["kpm-bool", "attn3d-float", "both-mixed", "causal+kpm"])
@pytest.mark.parametrize("average", [True, False])
def test_need_weights(backend, device, case, average):
    heads = 2
    ours, ref = _pair(device, num_heads=heads, batch_first=average)
    kind, masks = _masks(case, heads, device)
    x = _layout(torch.randn(L, N, E, device=device), ours.batch_first)
    check_module(ours, ref, lambda m, x, *ms: _self_call(m, x, *ms, kind=kind, need_weights=True,
                                                     average=average), [x], masks)


# -- cross-attention, projections, extra keys -----------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(kdim=24, vdim=40),
    dict(kdim=24, vdim=40, batch_first=True, bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, kdim=20, vdim=20),
    dict(bias=False, num_heads=2),
])
@pytest.mark.parametrize("need_weights", [False, True])
def test_cross_attention_options(backend, device, kwargs, need_weights):
    ours, ref = _pair(device, **kwargs)
    kdim, vdim = kwargs.get("kdim", E), kwargs.get("vdim", E)
    q = _layout(torch.randn(L, N, E, device=device), ours.batch_first)
    k = _layout(torch.randn(S, N, kdim, device=device), ours.batch_first)
    v = _layout(torch.randn(S, N, vdim, device=device), ours.batch_first)
    attn = _random_ignore(L, S, device=device)
    kpm = _kpm(N, S, device)
    check_module(ours, ref, lambda m, q, k, v, a, p: m(q, k, v, key_padding_mask=p, attn_mask=a,
                                                   need_weights=need_weights), [q, k, v], [attn, kpm])


def test_key_is_value(backend, device):
    """One packed key/value projection when key and value are the same tensor."""
    ours, ref = _pair(device)
    q, kv = torch.randn(L, N, E, device=device), torch.randn(S, N, E, device=device)
    check_module(ours, ref, lambda m, q, kv, p: m(q, kv, kv, key_padding_mask=p, need_weights=False),
             [q, kv], [_kpm(N, S, device)])


@pytest.mark.parametrize("need_weights", [False, True])
def test_unbatched(backend, device, need_weights):
    ours, ref = _pair(device, batch_first=True, add_bias_kv=True)
    q, kv = torch.randn(L, E, device=device), torch.randn(S, E, device=device)
    kpm = torch.zeros(S, dtype=torch.bool, device=device)
    kpm[2:5] = True
    attn3d = _as_float(_random_ignore(ours.num_heads, L, S, device=device))
    check_module(ours, ref, lambda m, q, kv, p, a: m(q, kv, kv, key_padding_mask=p, attn_mask=a,
                                                 need_weights=need_weights), [q, kv], [kpm, attn3d])


def test_fp16(backend, device):
    ours, ref = _pair(device, dtype=torch.float16, batch_first=True)
    x = torch.randn(N, L, E, device=device, dtype=torch.float16)
    kpm = _kpm(N, L, device)
    check_module(ours, ref, lambda m, x, p: m(x, x, x, key_padding_mask=p, need_weights=False), [x], [kpm],
             rtol=None)


def test_fp16_with_float32_masks_beyond_fp16_range(backend, device):
    """A float32 mask for an fp16 module is added in float32, as torch's: -1e5 (a uniform row
    offset: ordinary attention) and finfo(float32).min keys (masked) do not become -inf rows."""
    ours, ref = _pair(device, dtype=torch.float16, batch_first=True)
    x = torch.randn(N, L, E, device=device, dtype=torch.float16)
    mask = torch.randn(L, L, device=device)
    mask[0] = -1e5
    mask[2, :3] = torch.finfo(torch.float32).min
    kpm = torch.zeros(N, L, device=device)
    kpm[1, -2:] = -3e38
    out = ours(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False)[0]
    # torch's baseline: on CUDA its memory-efficient kernel refuses a float32 bias for fp16
    # queries, so the math one, which takes it (as torch's CPU kernels do)
    math_only = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
    with math_only if device == "cuda" else contextlib.nullcontext():
        expected = ref(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False)[0]
    assert not out.isnan().any()
    assert_close("output", out, ref.double()(*(x.double(),) * 3, attn_mask=mask.double(),
                                              key_padding_mask=kpm.double(), need_weights=False)[0],
                 baseline=expected.double())


def test_float_mask_dtypes_as_torch(backend, device):
    """Float masks of another dtype than the query's are refused, as by torch (which raises a
    RuntimeError), except float32 for an fp16/bf16 query on the fused path; never cast."""
    mha = fastdl.nn.MultiheadAttention(E, 4, batch_first=True, device=device)
    x = torch.randn(N, L, E, device=device)
    with pytest.raises(TypeError, match="attn_mask must have the query's dtype"):
        mha(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="key_padding_mask must have the query's dtype"):
        mha(x, x, x, key_padding_mask=torch.zeros(N, L, dtype=torch.float16, device=device))
    mha16, x16 = mha.half(), x.half()
    with pytest.raises(TypeError, match="need_weights=True"):
        mha16(x16, x16, x16, attn_mask=torch.zeros(L, L, device=device))
    ref = torch.nn.MultiheadAttention(E, 4, batch_first=True, device=device).half()
    with pytest.raises(RuntimeError):
        ref(x16, x16, x16, attn_mask=torch.zeros(L, L, device=device))


def test_float32_masks_for_a_float64_module(backend, device):
    """A float64 module takes float32 masks on the fused path, as torch's does; fastdl adds them
    exactly (torch's sums the two masks in float32 first: 2e-8 apart). need_weights=True refuses
    them, as torch's raises. (float64 runs on the torch path.)"""
    ours, ref = _pair(device, dtype=torch.float64, batch_first=True)
    x = torch.randn(N, L, E, device=device, dtype=torch.float64, requires_grad=True)
    mask, kpm = torch.randn(L, L, device=device), torch.randn(N, L, device=device)
    with fastdl.backend.use("auto"):
        out = ours(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False)[0]
    want = ref(x, x, x, attn_mask=mask.double(), key_padding_mask=kpm.double(), need_weights=False)[0]
    assert_close("torch's float32 masks", out, ref(x, x, x, attn_mask=mask, key_padding_mask=kpm,
                                                   need_weights=False)[0], rtol=1e-6)
    assert_close("output", out, want, rtol=1e-10)
    g = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, [x, *ours.parameters()], g),
                             torch.autograd.grad(want, [x, *ref.parameters()], g)):
        assert_close("gradient", got, expected, rtol=1e-10)
    with pytest.raises(TypeError, match="need_weights=True"):
        ours(x, x, x, attn_mask=mask)
    with pytest.raises(RuntimeError):
        ref(x, x, x, attn_mask=mask)


@pytest.mark.parametrize("need_weights", [True, False])
def test_float32_masks_under_autocast_as_torch(backend, device, need_weights):
    """Under autocast the projections run in bfloat16 and torch's weights path adds the float32
    masks in an autocast baddbmm (cast): the same outputs and weights, up to bfloat16 rounding."""
    if backend == "interpret" and not need_weights:
        pytest.skip("the fused path's bf16 attention: Triton's interpreter cannot compute bf16 dot products")
    ours, ref = _pair(device, batch_first=True)
    x = torch.randn(N, L, E, device=device)
    attn_mask, padding = torch.randn(L, L, device=device), torch.randn(N, L, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, weights = ours(x, x, x, attn_mask=attn_mask, key_padding_mask=padding, need_weights=need_weights)
        ref_out, ref_weights = ref(x, x, x, attn_mask=attn_mask, key_padding_mask=padding,
                                   need_weights=need_weights)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    expected, _ = ref.double()(*(x.double(),) * 3, attn_mask=attn_mask.double(),
                               key_padding_mask=padding.double())
    assert_close("output", out, expected.to(out.dtype), baseline=ref_out, factor=3.0)
    if need_weights:
        assert weights.dtype == ref_weights.dtype
        torch.testing.assert_close(weights.float(), ref_weights.float(), atol=2e-2, rtol=0)


def test_non_contiguous_inputs(backend, device):
    ours, ref = _pair(device, batch_first=True)
    q = torch.randn(L, N, E, device=device).transpose(0, 1)  # (N, L, E) view
    kv = torch.randn(N, S, 2 * E, device=device)[..., ::2]
    assert not q.is_contiguous() and not kv.is_contiguous()
    expected = ref.double()(q.double(), kv.double(), kv.double(), need_weights=False)[0]
    assert_close("output", ours(q, kv, kv, need_weights=False)[0], expected, rtol=RTOL)


@pytest.mark.parametrize("lengths", [(0, N, S), (L, 0, S), (L, N, 0)])
@pytest.mark.parametrize("need_weights", [False, True])
def test_empty(backend, device, lengths, need_weights):
    ours, ref = _pair(device)
    tgt, batch, src = lengths
    q = torch.randn(tgt, batch, E, device=device, requires_grad=True)
    kv = torch.randn(src, batch, E, device=device)
    out, weights = ours(q, kv, kv, need_weights=need_weights)
    expected, expected_weights = ref.double()(q.double(), kv.double(), kv.double(), need_weights=need_weights)
    assert_close("output", out, expected, rtol=RTOL)  # no keys: the output is out_proj's bias
    if need_weights:
        assert weights.shape == expected_weights.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


# -- mask plumbing ----------------------------------------------------------------------------------

class _SpySDPA:
    def __init__(self, monkeypatch):
        self.calls = []
        real = fastdl.functional.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
            self.calls.append(dict(q=q.shape, mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal))
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
        monkeypatch.setattr(fastdl.functional, "scaled_dot_product_attention", spy)


def test_masks_stay_broadcast(monkeypatch):
    """Key padding alone reaches SDPA as (N, 1, 1, S), merged with a 2-D mask as (N, 1, L, S), in
    SDPA's convention (True = attend); never a dense (N, H, L, S) tensor."""
    spy = _SpySDPA(monkeypatch)
    mha = fastdl.nn.MultiheadAttention(E, 4)
    q, kv = torch.randn(L, N, E), torch.randn(S, N, E)
    kpm, attn = _kpm(N, S, "cpu"), _random_ignore(L, S, device="cpu")
    mha(q, kv, kv, key_padding_mask=kpm, need_weights=False)
    mha(q, kv, kv, attn_mask=attn, need_weights=False)
    mha(q, kv, kv, attn_mask=attn, key_padding_mask=kpm, need_weights=False)
    mha(q, kv, kv, attn_mask=_as_float(attn), key_padding_mask=kpm, need_weights=False)
    masks = [c["mask"] for c in spy.calls]
    assert [tuple(m.shape) for m in masks] == [(N, 1, 1, S), (1, 1, L, S), (N, 1, L, S), (N, 1, L, S)]
    assert [m.dtype for m in masks] == [torch.bool, torch.bool, torch.bool, torch.float32]
    assert torch.equal(masks[0], ~kpm.view(N, 1, 1, S))
    assert torch.equal(masks[2], ~(attn | kpm.view(N, 1, 1, S)))
    assert torch.equal(masks[3] == float("-inf"), attn | kpm.view(N, 1, 1, S))


def test_causal_hint_semantics(monkeypatch):
    """torch's rule: is_causal needs attn_mask; without key padding and weights, the kernel does
    causality itself and the mask is not read; otherwise the mask is used as given."""
    spy = _SpySDPA(monkeypatch)
    mha = fastdl.nn.MultiheadAttention(E, 4)
    x = torch.randn(L, N, E)
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, is_causal=True, need_weights=False)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    mha(x, x, x, attn_mask=causal, key_padding_mask=_kpm(N, L, "cpu"), is_causal=True, need_weights=False)
    assert spy.calls[0]["mask"] is None and spy.calls[0]["is_causal"] is True
    assert spy.calls[1]["mask"] is not None and spy.calls[1]["is_causal"] is False
    _, weights = mha(x, x, x, attn_mask=causal, is_causal=True)
    assert len(spy.calls) == 2  # need_weights: explicit softmax, not the kernel
    assert torch.all(weights.triu(1) == 0)


def test_fully_masked_rows_are_zero(backend, device):
    """A query whose keys are all masked gets zero attention (output = out_proj.bias) and zero
    weights, never NaN; gradients stay finite."""
    ours, _ = _pair(device)
    q, kv = torch.randn(L, N, E, device=device, requires_grad=True), torch.randn(S, N, E, device=device)
    attn = _random_ignore(L, S, device=device)
    attn[3] = True
    for need_weights in (False, True):
        out, w = ours(q, kv, kv, attn_mask=attn, need_weights=need_weights)
        assert torch.isfinite(out).all()
        assert_close("masked row", out[3], ours.out_proj.bias.detach().expand(N, E).double(), rtol=1e-6)
        if need_weights:
            assert torch.all(w[:, 3] == 0)
        out.sum().backward()
        assert torch.isfinite(q.grad).all() and torch.all(q.grad[3] == 0)
        q.grad = None


# -- dropout ---------------------------------------------------------------------------------------

def test_dropout_weights_consistent(backend, device):
    """Training with need_weights: each returned weight is 0 or the eval weight / (1 - p), about p
    of them dropped, and the output is exactly out_proj(weights @ V) of those weights."""
    p = 0.3
    mha = fastdl.nn.MultiheadAttention(E, 2, dropout=p, device=device)
    x = torch.randn(L, N, E, device=device)
    clean = mha.eval()(x, x, x, average_attn_weights=False)[1]
    out, w = mha.train()(x, x, x, average_attn_weights=False)
    kept = w != 0
    assert_close("kept weights", w[kept], clean[kept].double() / (1 - p), rtol=1e-5)
    dropped = 1 - kept.double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / w.numel())
    v = torch.nn.functional.linear(x, mha.in_proj_weight[2 * E:], mha.in_proj_bias[2 * E:])
    v = v.view(L, N, 2, E // 2).permute(1, 2, 0, 3)
    expected = (w.double() @ v.double()).permute(2, 0, 1, 3).reshape(L, N, E)
    expected = torch.nn.functional.linear(expected, mha.out_proj.weight.double(), mha.out_proj.bias.double())
    assert_close("output", out, expected, rtol=1e-5)


def test_dropout_kernel_path(backend, device):
    """need_weights=False in training: dropout_p reaches the kernel; a seed reproduces the
    output, another seed changes it, eval mode and dropout=0 are deterministic and equal."""
    mha = fastdl.nn.MultiheadAttention(E, 4, dropout=0.5, batch_first=True, device=device)
    x = torch.randn(N, L, E, device=device)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(mha(x, x, x, need_weights=False)[0])
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    mha.eval()
    clean = mha(x, x, x, need_weights=False)[0]
    assert not torch.allclose(outs[0], clean)
    mha.dropout = 0.0
    assert torch.equal(mha.train()(x, x, x, need_weights=False)[0], clean)


# -- drop-in surface -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, dict(kdim=24, vdim=16, add_bias_kv=True), dict(bias=False)])
def test_state_dict_both_ways(kwargs):
    ours, ref = _pair("cpu", **kwargs)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(ref.state_dict())
    back = torch.nn.MultiheadAttention(E, 4, **kwargs)
    back.load_state_dict(ours.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k])
    torch.manual_seed(0)
    a = torch.nn.MultiheadAttention(E, 4, **kwargs)
    torch.manual_seed(0)
    b = fastdl.nn.MultiheadAttention(E, 4, **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_arguments():
    mha = fastdl.nn.MultiheadAttention(E, 4)
    x = torch.randn(L, N, E)
    with pytest.raises(ValueError, match="query"):
        mha(torch.randn(L, N, E + 1), x, x)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(N, L, L, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        mha(torch.randn(2, L, N, E), x, x)
