"""fastdl.functional.scaled_dot_product_attention on every backend against float64 softmax math.

The reference (``ref_attention``) is written out explicitly: scores, causal and explicit masks,
a softmax whose fully masked rows are 0, an optional dropout mask, grouped key/value heads. fp32
must be within 2e-4 (relative norm) of it, forward and backward; fp16/bf16 within 3x the error of
PyTorch's own scaled_dot_product_attention in that dtype. bf16 is skipped under Triton's
interpreter, which cannot compute bf16 dot products (fastdl sends such calls to the torch path).

Dropout: after the same ``torch.manual_seed``, an "identity problem" -- q = k = 0, so every
probability is 1/S, and v = the identity -- returns the keep-mask itself (times the scale). It is
the same (B, H, L, S) call with the same seed, so on the kernel paths it draws the same counters
(and on the torch path the same Bernoulli draws). The real call is then checked against the
reference with that mask, forward and backward; a kernel whose forward and backward masks
disagreed, or whose offsets depended on the data or the tiling, fails.
"""

import math

import pytest
import torch
import torch.nn.functional as TF
import triton
import triton.language as tl
from helpers import assert_close, check_op, ref_attention

import fastdl
import fastdl.functional as F
from fastdl.kernels import attention as kernel_attention

RTOL = 2e-4  # fp32 attention against float64 (DESIGN.md)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def torch_sdpa(*args, **kwargs):
    """PyTorch's own op: the baseline whose fp16/bf16 error sets the bound."""
    return TF.scaled_dot_product_attention(*args, **kwargs)


def _skip_bf16_interpret(backend, dtype):
    if backend == "interpret" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter cannot compute bf16 dot products")


def _qkv(B, H, L, S, D, dtype, device, H_kv=None, Dv=None, spread=1.0):
    H_kv = H if H_kv is None else H_kv
    q = (torch.randn(B, H, L, D, device=device) * spread).to(dtype).requires_grad_()
    k = torch.randn(B, H_kv, S, D, device=device).to(dtype).requires_grad_()
    v = torch.randn(B, H_kv, S, D if Dv is None else Dv, device=device).to(dtype).requires_grad_()
    return q, k, v


def _check(inputs, dtype, **kwargs):
    """check_op of fastdl vs ref_attention (and torch's op as the low-precision baseline)."""
    rtol = RTOL if dtype == torch.float32 else None
    check_op(lambda *t: F.scaled_dot_product_attention(*t, **kwargs),
             lambda *t: ref_attention(*t, **{k: v for k, v in kwargs.items() if k != "enable_gqa"}),
             inputs, baseline_fn=lambda *t: torch_sdpa(*t, **kwargs), rtol=rtol, grad_rtol=rtol)


# (B, H, H_kv, L, S, D): L != S both ways, lengths that are not multiples of any tile (1, 7, 33,
# 70, 80 against 16..128-wide tiles), several tiles in both directions, grouped heads.
SHAPES = [(1, 2, 2, 33, 70, 32), (2, 1, 1, 80, 17, 64), (1, 4, 2, 7, 3, 16), (1, 2, 1, 66, 66, 16)]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(backend, device, shape, dtype, is_causal):
    _skip_bf16_interpret(backend, dtype)
    B, H, H_kv, L, S, D = shape
    _check(_qkv(B, H, L, S, D, dtype, device, H_kv), dtype, is_causal=is_causal, enable_gqa=H != H_kv)


@pytest.mark.parametrize("D", [80, 96, 128, 256])
def test_head_dims(backend, device, D):
    """Head dims padded to a power-of-two block (80, 96) and the largest ones, fp32 and fp16."""
    _check(_qkv(1, 1, 37, 29, D, torch.float32, device), torch.float32, is_causal=D == 96)
    _check(_qkv(1, 1, 19, 40, D, torch.float16, device), torch.float16)


def test_value_head_dim_differs(backend, device):
    _check(_qkv(2, 2, 21, 35, 32, torch.float32, device, Dv=48), torch.float32)


def test_scale(backend, device):
    _check(_qkv(1, 2, 30, 41, 16, torch.float32, device), torch.float32, scale=0.37)
    _check(_qkv(1, 1, 9, 12, 16, torch.float32, device), torch.float32, scale=0.0)


def test_gqa_single_kv_head_without_flag(backend, device):
    """One key/value head broadcasts over the query heads (torch allows it without enable_gqa)."""
    _check(_qkv(2, 3, 25, 31, 32, torch.float32, device, H_kv=1), torch.float32)


# Masks broadcastable to (B=2, H=3, L=35, S=47): full, per-head, rectangular, key padding
# (B, 1, 1, S: S values per batch), per-query-row (B, 1, L, 1), per-head key mask.
MASK_SHAPES = [(2, 3, 35, 47), (3, 35, 47), (35, 47), (2, 1, 1, 47), (2, 1, 35, 1), (1, 3, 1, 47)]


def _bool_mask(shape, device, empty_rows=True):
    mask = torch.rand(shape, device=device) > 0.3
    if empty_rows and len(shape) >= 2 and shape[-2] > 1 and shape[-1] > 1:
        mask[..., 3, :] = False  # a fully masked query row
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bool_mask(backend, device, mask_shape, dtype):
    mask = _bool_mask(mask_shape, device)
    _check([*_qkv(2, 3, 35, 47, 32, dtype, device), mask], dtype)


def test_masks_are_read_through_strides(backend, device):
    """A (B, 1, 1, S) padding mask reaches the kernel as itself, stride 0 on the head and row
    axes (S values per batch, nothing expanded); a transposed float mask with a gradient works."""
    q, k, v = _qkv(2, 3, 35, 47, 32, torch.float32, device)
    if backend != "torch":
        attention = fastdl.backend.kernels("attention")
        padding = _bool_mask((2, 1, 1, 47), device)
        ptr, strides, kind = attention._mask_arg(padding, q, 47)
        assert ptr.data_ptr() == padding.data_ptr() and strides == (47, 0, 0, 1)
        assert kind == attention.MASK_BOOL + attention.MASK_KEYS  # one vector of keys per tile
        # The kind says whether the mask varies along the query rows: per-key masks are read as
        # one vector per key tile, others as whole tiles.
        kinds = {(2, 3, 35, 47): attention.MASK_BOOL, (35, 47): attention.MASK_BOOL,
                 (1, 3, 1, 47): attention.MASK_BOOL + attention.MASK_KEYS,
                 (2, 1, 35, 1): attention.MASK_BOOL}
        for shape, expected in kinds.items():
            assert attention._mask_arg(_bool_mask(shape, device), q, 47)[2] == expected, shape
            float_kind = attention._mask_arg(torch.randn(shape, device=device), q, 47)[2]
            assert float_kind == expected - attention.MASK_BOOL + attention.MASK_FLOAT, shape
        one_query = q[:, :, :1]  # L = 1: any mask is one row of keys
        one_query_kind = attention._mask_arg(_bool_mask((2, 3, 1, 47), device), one_query, 47)[2]
        assert one_query_kind == attention.MASK_BOOL + attention.MASK_KEYS
    bias = torch.randn(3, 47, 35, device=device).transpose(1, 2).requires_grad_()
    _check([q, k, v, bias], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mask_shape", MASK_SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_float_mask(backend, device, mask_shape, dtype):
    """Additive masks: random biases with -inf holes and a row of -inf."""
    mask = torch.randn(mask_shape, device=device) * 2
    mask = mask.masked_fill(torch.rand(mask_shape, device=device) < 0.2, float("-inf"))
    if mask_shape[-2] > 1:
        mask[..., 5, :] = float("-inf")
    _check([*_qkv(2, 3, 35, 47, 32, dtype, device), mask.to(dtype)], dtype)


@pytest.mark.parametrize("mask_shape", [(3, 35, 47), (2, 1, 1, 47), (2, 3, 35, 47), (1, 3, 1, 47)],
                         ids=lambda s: "x".join(map(str, s)))
def test_float_mask_gradient(backend, device, mask_shape):
    """A learned bias (relative positions: one per head, shared over the batch; key padding
    scores) gets dS summed over the dims it was broadcast along."""
    mask = torch.randn(mask_shape, device=device, requires_grad=True)
    _check([*_qkv(2, 3, 35, 47, 32, torch.float32, device), mask], torch.float32)


def test_float_mask_gradient_gqa_fp16(backend, device):
    mask = torch.randn(4, 20, 33, device=device).half().requires_grad_()
    _check([*_qkv(1, 4, 20, 33, 16, torch.float16, device, H_kv=2), mask], torch.float16, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_float_mask_of_dtype_minimum(backend, device, dtype):
    """Masks built from finfo(dtype).min (as Hugging Face builds them) stay finite: masked keys get
    no weight, and a row masked that way throughout averages V, as torch's arithmetic does
    (instead of returning 0 like a -inf or bool row)."""
    mask = torch.zeros(1, 2, 23, 31, device=device)
    mask[..., :, 7:12] = torch.finfo(dtype).min
    q, k, v = _qkv(1, 2, 23, 31, 32, dtype, device)
    _check([q, k, v, mask.to(dtype)], dtype)
    mask[..., 4, :] = torch.finfo(dtype).min
    if dtype == torch.float16:  # -65504 does not swamp the scores: an ordinary softmax row
        _check([t.detach().requires_grad_() for t in (q, k, v)] + [mask.to(dtype)], dtype)
        return
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close("row masked by min", out[..., 4, :], v.double().mean(-2), rtol=1e-5)


@pytest.mark.parametrize("layout", ["rows", "padding"])
def test_gradients_of_rows_masked_throughout_by_huge_finite_values(backend, device, layout):
    """A row whose every key carries finfo.min (Hugging Face's padding) or -1e30 averages V, in
    float32 and in float64 arithmetic alike (the scores vanish next to the mask), and its
    gradients are that average's: dV gets dO / S per key. The backward recomputes P from the
    saved logsumexp, which at m ~ -1.4e38 cannot hold log2(S); without the saved remainder P came
    back 1 instead of 1 / S, gradients S times too large (as from torch's own fused CPU kernel).
    Rows of ordinary scores in the same call are unaffected. "padding": a (B, 1, 1, S) mask whose
    second sequence is all padding. (The torch path is torch's op, whose fused CPU kernel keeps
    that error: the README says so.)"""
    if backend == "torch":
        pytest.skip("the torch path is PyTorch's fused kernel, S times too large here (documented)")
    q, k, v = _qkv(2, 2, 33, 70, 32, torch.float32, device)
    if layout == "rows":
        mask = torch.randn(33, 70, device=device)
        mask[3], mask[17] = torch.finfo(torch.float32).min, -1e30
        mask[20, :40] = torch.finfo(torch.float32).min  # part of a row: its other keys win
    else:
        mask = torch.zeros(2, 1, 1, 70, device=device)
        mask[0, ..., 50:] = mask[1] = torch.finfo(torch.float32).min
    _check([q, k, v, mask], torch.float32)


def test_float_mask_below_minus_1e38_keeps_its_order(backend, device):
    """Mask values far below any score but of different sizes: torch's softmax weighs only the
    largest of them (the others are e^-1e38 times smaller). The kernel's floor sits below -2.3e38,
    so a row of -1e38 and -3e38 averages the values of the -1e38 keys (the scores vanish next to
    the mask in float32, as in torch's arithmetic), as float64 math does. (Only the forward: the
    scores' gradient through values that swamp them is rounding, not math.)"""
    q, k, v = (t.detach() for t in _qkv(1, 2, 6, 9, 16, torch.float32, device))
    mask = torch.randn(6, 9, device=device)
    mask[1, :4], mask[1, 4:] = -1e38, -3e38
    mask[2, :2], mask[2, 2:] = -2e38, -3.4e38
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expected = ref_attention(q.double(), k.double(), v.double(), mask.double())
    assert_close("output", out, expected, rtol=RTOL)
    assert_close("row of -1e38 and -3e38", out[..., 1, :], v[..., :4, :].double().mean(-2), rtol=1e-5)
    assert_close("row of -2e38 and -3.4e38", out[..., 2, :], v[..., :2, :].double().mean(-2), rtol=1e-5)


def test_nan_in_a_float_mask_gives_nan_as_torch(backend, device):
    """A NaN mask entry makes its row NaN (output and gradients), as torch's softmax does: never
    a finite row that silently treats the NaN as masked out. Other rows are untouched."""
    q, k, v = _qkv(1, 1, 4, 6, 16, torch.float32, device)
    mask = torch.randn(4, 6, device=device, requires_grad=True)
    with torch.no_grad():
        mask[0, 2] = float("nan")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.backward(torch.randn_like(out))
    expected = TF.scaled_dot_product_attention(*(t.detach().double() for t in (q, k, v, mask)))
    assert out[0, 0, 0].isnan().all() and expected[0, 0, 0].isnan().all()
    assert_close("other rows", out[0, 0, 1:].detach(), expected[0, 0, 1:], rtol=RTOL)
    assert mask.grad[0].isnan().all() and not mask.grad[1:].isnan().any()


def test_gqa_with_different_key_and_value_heads(backend, device):
    """enable_gqa repeats key and value heads each to the query's, as torch: 4 query heads over
    2 key heads and 1 value head. The kernel takes one key/value head count, so such a call runs
    on torch under auto and a forced kernel backend says why."""
    q, k, _ = _qkv(1, 4, 5, 7, 16, torch.float32, device, H_kv=2)
    v = torch.randn(1, 1, 7, 16, device=device, requires_grad=True)
    expected = ref_attention(q.double(), k.double().repeat_interleave(2, 1), v.double().expand(1, 4, 7, 16))
    if backend != "torch":
        with pytest.raises(fastdl.backend.BackendError, match="different head counts"):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        with fastdl.backend.use("auto"):
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert_close("output", out, expected, rtol=RTOL)
    with pytest.raises(ValueError, match=r"multiple of key heads \(3\)"):
        F.scaled_dot_product_attention(q, torch.randn(1, 3, 7, 16, device=device), v, enable_gqa=True)


def test_fully_masked_rows_match_torch(backend, device):
    """torch (2.13) returns 0 for a fully masked row, bool or -inf float, and gives it zero gradient;
    so does fastdl, on every path, with no NaN anywhere."""
    q, k, v = _qkv(1, 2, 6, 9, 16, torch.float64, device)
    mask = torch.rand(1, 2, 6, 9, device=device) > 0.4
    mask[0, 0, 2] = False
    mask[0, 1, :, 4] = False
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        expected = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(expected[0, 0, 2], torch.zeros(16, dtype=torch.float64, device=device))
    assert_close("reference", ref_attention(q, k, v, mask), expected, rtol=1e-12)
    for dtype in (torch.float32, torch.float16):
        for m in (mask, torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf")).to(dtype)):
            qc, kc, vc = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
            out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=m)
            assert torch.equal(out[0, 0, 2], torch.zeros(16, dtype=dtype, device=device))
            out.backward(torch.randn_like(out))
            assert torch.equal(qc.grad[0, 0, 2], torch.zeros(16, dtype=dtype, device=device))
            for t in (out, qc.grad, kc.grad, vc.grad):
                assert not t.isnan().any()


def test_fp16_large_logits(backend, device):
    """Scores near fp16's limits (|q.k| * scale ~ 1e3): exponentials stay in range, no NaN/inf,
    fully masked rows included."""
    q, k, v = _qkv(1, 2, 40, 53, 64, torch.float16, device, spread=30.0)
    mask = _bool_mask((40, 53), device)
    _check([q, k, v, mask], torch.float16)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()


def test_every_output_element_is_written(backend, device, monkeypatch):
    """Kernel outputs come from NaN-filled buffers: an element a kernel forgot to write shows."""
    if backend == "torch":
        pytest.skip("the torch path allocates nothing of fastdl's")
    attention = fastdl.backend.kernels("attention")
    monkeypatch.setattr(attention, "_alloc", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    mask = torch.randn(3, 30, 41, device=device)
    mask[:, 4, :] = float("-inf")
    _check([*_qkv(2, 3, 30, 41, 80, torch.float32, device), mask.requires_grad_()], torch.float32)
    _check(_qkv(2, 3, 30, 41, 80, torch.float32, device), torch.float32, is_causal=True)


def test_causal_skips_tiles_right_of_the_diagonal(backend, device):
    """Keys past a query tile's last row are never loaded: NaN there cannot reach that tile.
    (Masking alone would not do: 0 * NaN is NaN in the P @ V product.)"""
    if backend != "interpret":
        pytest.skip("the tile size is known only under the interpreter (one config, no autotuning)")
    attention = fastdl.backend.kernels("attention")
    block_m = attention._FWD_CONFIGS[(90, 64, 4)][0][0]
    L = block_m + 17
    q, k, v = (t.detach() for t in _qkv(1, 1, L, L, 32, torch.float32, device))
    v[0, 0, block_m:] = float("nan")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not out[0, 0, :block_m].isnan().any()
    expected = ref_attention(q.double(), k.double(), v.double().nan_to_num(), is_causal=True)
    assert_close("first tile", out[0, 0, :block_m], expected[0, 0, :block_m], rtol=RTOL)


@triton.jit
def _tile_of_each_program(OUT, rows, H, BLOCK: tl.constexpr, HEAVIEST_FIRST: tl.constexpr):
    """(tile, head, batch entry) of every program of an attention grid, as rows of OUT (int32)."""
    tile, _, h, b = kernel_attention._tile_head_batch(rows, BLOCK, H, 1, HEAVIEST_FIRST)
    col = tl.arange(0, 4)
    values = tl.where(col == 0, tile, tl.where(col == 1, h, b))
    tl.store(OUT + tl.program_id(0) * 3 + col, values, mask=col < 3)


def test_causal_query_tiles_run_heaviest_first(backend, device):
    """Causal attention's query tiles (forward and dQ) go out last tile first: the grid's first
    programs are the ones with the most keys to visit. Dense attention keeps the grid's order."""
    if backend == "torch":
        pytest.skip("the kernels' grid order")
    for rows, block, H, B in ((512, 128, 2, 2), (130, 64, 3, 1), (64, 64, 1, 2)):
        tiles = -(-rows // block)
        for heaviest_first in (True, False):
            out = torch.full((tiles * H * B, 3), -1, dtype=torch.int32, device=device)
            _tile_of_each_program[(tiles * H * B,)](out, rows, H, BLOCK=block, HEAVIEST_FIRST=heaviest_first)
            order = list(range(tiles))[::-1] if heaviest_first else list(range(tiles))
            expected = [(t, h, b) for b in range(B) for h in range(H) for t in order]
            assert [tuple(r) for r in out.tolist()] == expected, (rows, block, heaviest_first)


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16), (16, 16)])
def test_other_tile_shapes(backend, device, monkeypatch, block_m, block_n):
    """The kernels with tiles other than the interpreter's default, as the GPU autotuner may pick
    them (query tiles taller or shorter than key tiles): causal tile skipping, the split between
    unchecked and checked tiles, masks with a gradient and dropout at every boundary."""
    if backend != "interpret":
        pytest.skip("the tile shape is forced under the interpreter only (no autotuning)")
    attention = fastdl.backend.kernels("attention")
    for name in ("_FWD_CONFIGS", "_BWD_KV_CONFIGS", "_BWD_Q_CONFIGS"):
        monkeypatch.setattr(attention, name, {key: [(block_m, block_n, 4, 1)]
                                              for key in getattr(attention, name)})
    monkeypatch.setattr(attention, "_tuned", {})
    for L, S in ((45, 37), (37, 45)):
        _check(_qkv(1, 2, L, S, 16, torch.float32, device), torch.float32, is_causal=True)
    mask = torch.randn(2, 37, 45, device=device)
    mask[:, 20, :] = float("-inf")
    _check([*_qkv(1, 2, 37, 45, 16, torch.float32, device), mask.requires_grad_()], torch.float32)
    keep = _keep_mask(1, 2, 37, 45, 0.2, 3, torch.float32, device)
    q, k, v = _qkv(1, 2, 37, 45, 16, torch.float32, device)

    def fastdl_fn(q, k, v):
        torch.manual_seed(3)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True)

    check_op(fastdl_fn, lambda q, k, v: ref_attention(q, k, v, is_causal=True, keep=keep, p=0.2),
             [q, k, v], rtol=RTOL, grad_rtol=RTOL)


def _keep_mask(B, H, L, S, p, seed, dtype, device):
    """The dropout mask of the (B, H, L, S) call made right after ``torch.manual_seed(seed)``,
    read off an identity problem: q = k = 0 gives P = 1/S, v = I (S <= D) returns P's mask."""
    D = max(16, S)
    z = torch.zeros(B, H, L, D, dtype=dtype, device=device)
    eye = torch.eye(S, D, dtype=dtype, device=device).expand(B, H, S, D)
    torch.manual_seed(seed)
    out = F.scaled_dot_product_attention(z, torch.zeros(B, H, S, D, dtype=dtype, device=device), eye,
                                         dropout_p=p)
    scaled = out[..., :S].double() * S * (1.0 - p)
    keep = scaled > 0.5
    assert_close("identity problem", scaled, keep.double(), rtol=1e-3 if dtype == torch.float16 else 1e-6)
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("is_causal,p", [(False, 0.3), (True, 0.1), (False, 0.85)])
def test_dropout_forward_backward(backend, device, dtype, is_causal, p):
    """Output and gradients equal the reference under the mask the seed defines (rebuilt on an
    identity problem); the backward regenerates the same mask."""
    B, H, L, S, D = 2, 2, 33, 45, 64
    keep = _keep_mask(B, H, L, S, p, 7, dtype, device)
    q, k, v = _qkv(B, H, L, S, D, dtype, device)

    def fastdl_fn(q, k, v):
        torch.manual_seed(7)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=is_causal)

    def baseline(q, k, v):  # torch's op in fp16, same mask (its dropout stream is not ours)
        return ref_attention(q.float(), k.float(), v.float(), None, is_causal, keep=keep, p=p).to(q.dtype)

    rtol = RTOL if dtype == torch.float32 else None
    check_op(fastdl_fn, lambda q, k, v: ref_attention(q, k, v, None, is_causal, keep=keep, p=p),
             [q, k, v], baseline_fn=baseline if dtype != torch.float32 else None, rtol=rtol, grad_rtol=rtol)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(backend, device, p):
    """Over ~3*10^4 probabilities the dropped fraction is within 5 sigma of p, per row and per
    column within 6 sigma (no stripes from the (head, row, col) counters); a new seed gives a new
    mask and the same seed the same one; p = 0 and p = 1 are exact."""
    B, H, L, S = 2, 3, 70, 75
    keep = _keep_mask(B, H, L, S, p, 11, torch.float32, device)
    n = keep.numel()
    dropped = 1.0 - keep.double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n), f"dropped {dropped} for p={p}"
    for dims, count in (((0, 1, 3), B * H * S), ((0, 1, 2), B * H * L)):
        rate = 1.0 - keep.double().mean(dims)
        assert (rate - p).abs().max().item() < 6 * math.sqrt(p * (1 - p) / count)
    # Heads and batches draw different masks.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, _keep_mask(B, H, L, S, p, 11, torch.float32, device))
    assert not torch.equal(keep, _keep_mask(B, H, L, S, p, 12, torch.float32, device))
    assert _keep_mask(1, 1, 5, 7, 0.0, 3, torch.float32, device).all()
    assert not _keep_mask(1, 1, 5, 7, 1.0 - 1e-7, 3, torch.float32, device).any()
    q, k, v = _qkv(1, 1, 5, 7, 16, torch.float32, device)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q.grad, torch.zeros_like(q))


def test_dropout_gqa_and_mask(backend, device):
    """Dropout counters use the query head (b * H + h): grouped heads and masks keep the mask."""
    B, H, L, S = 1, 4, 20, 30
    keep = _keep_mask(B, H, L, S, 0.25, 5, torch.float32, device)
    q, k, v = _qkv(B, H, L, S, 32, torch.float32, device, H_kv=2)
    mask = _bool_mask((L, S), device)

    def fastdl_fn(q, k, v):
        torch.manual_seed(5)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.25, enable_gqa=True)

    check_op(fastdl_fn, lambda q, k, v: ref_attention(q, k, v, mask, keep=keep, p=0.25), [q, k, v],
             rtol=RTOL, grad_rtol=RTOL)


def test_packed_qkv_views(backend, device):
    """q, k, v as views of one (B, L, 3, H, D) projection: strided, last dim contiguous, read in
    place (no copy on the kernel path)."""
    B, L, H, D = 2, 29, 3, 32
    qkv = torch.randn(B, L, 3, H, D, device=device, requires_grad=True)
    if backend != "torch":
        attention = fastdl.backend.kernels("attention")
        view = qkv[:, :, 0].transpose(1, 2)
        assert not view.is_contiguous() and attention._last_dim_contiguous(view) is view
    def split(t):
        return [x.transpose(1, 2) for x in t.unbind(2)]  # three (B, H, L, D) views

    check_op(lambda t: F.scaled_dot_product_attention(*split(t), is_causal=True),
             lambda t: ref_attention(*split(t), is_causal=True), [qkv], rtol=RTOL, grad_rtol=RTOL)


def test_non_contiguous_last_dim(backend, device):
    """A transposed head dim (last-dim stride != 1) is copied once and still right."""
    q = torch.randn(1, 2, 16, 19, device=device).transpose(-1, -2).requires_grad_()
    k = torch.randn(1, 2, 16, 23, device=device).transpose(-1, -2).requires_grad_()
    v = torch.randn(1, 2, 23, 16, device=device)[:, :, :, :12].requires_grad_()
    _check([q, k, v], torch.float32)


@pytest.mark.parametrize("dims", [2, 3])
def test_fewer_dims(backend, device, dims):
    """(L, D) and (N, L, D) inputs, as torch accepts them."""
    shape_q, shape_kv = ((1, 1, 13, 16), (1, 1, 21, 16)) if dims == 2 else ((1, 4, 13, 16), (1, 4, 21, 16))
    q = torch.randn(shape_q[4 - dims:], device=device, requires_grad=True)
    k = torch.randn(shape_kv[4 - dims:], device=device, requires_grad=True)
    v = torch.randn(shape_kv[4 - dims:], device=device, requires_grad=True)
    mask = _bool_mask((13, 21), device)
    _check([q, k, v, mask], torch.float32)


@pytest.mark.parametrize("B,H,L,S", [(2, 3, 0, 5), (2, 3, 6, 0), (0, 3, 6, 5)])
def test_empty(backend, device, B, H, L, S):
    q, k, v = _qkv(B, H, L, S, 16, torch.float32, device)
    out = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == (B, H, L, 16) and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))


def test_single_key(backend, device):
    """S = 1: every row attends its one key, so o = v and dq = 0."""
    q, k, v = _qkv(2, 3, 9, 1, 16, torch.float32, device)
    out = F.scaled_dot_product_attention(q, k, v)
    assert_close("output", out, v.detach().expand(2, 3, 9, 16), rtol=1e-6)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert q.grad.abs().max().item() < 1e-6
    assert_close("grad of v", v.grad, dout.double().sum(2, keepdim=True), rtol=1e-6)


def test_backward_is_deterministic(backend, device):
    """No atomics: two backward passes agree bit for bit (grouped heads and a mask gradient)."""
    q, k, v = _qkv(2, 4, 45, 70, 32, torch.float32, device, H_kv=1)
    mask = torch.randn(4, 45, 70, device=device, requires_grad=True)
    dy = torch.randn(2, 4, 45, 32, device=device)
    grads = []
    for _ in range(2):
        for t in (q, k, v, mask):
            t.grad = None
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).backward(dy)
        grads.append([t.grad.clone() for t in (q, k, v, mask)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.fixture
def atomic_dq(backend, monkeypatch):
    """FASTDL_ATTENTION_BACKWARD=atomic for the test; yields the kinds of attention kernels
    launched (which must leave the dQ kernel out on the kernel paths)."""
    monkeypatch.setenv("FASTDL_ATTENTION_BACKWARD", "atomic")
    kinds = []
    if backend != "torch":
        attention = fastdl.backend.kernels("attention")
        real = attention._tuned_kernel
        monkeypatch.setattr(attention, "_tuned_kernel", lambda kind, *a, **kw: kinds.append(kind) or real(
            kind, *a, **kw))
    yield kinds
    if backend != "torch":
        assert "bwd_kv_atomic" in kinds and "bwd_q" not in kinds, kinds


# (B, H, H_kv, L, S, D, call keywords): grouped heads, causal with L > S, a head dim whose
# configs cut it into chunks (fp32, 136 -> 256 block), a padding mask; lengths end mid-tile.
ATOMIC_CASES = {
    "gqa": ((2, 4, 2, 33, 70, 32), {"enable_gqa": True}),
    "causal": ((1, 2, 2, 80, 47, 64), {"is_causal": True}),
    "head dim 136": ((1, 2, 1, 21, 37, 136), {"enable_gqa": True}),
    "padding mask": ((2, 2, 2, 35, 47, 16), {"attn_mask": "padding"}),
    "value head dim 80": ((1, 2, 2, 30, 41, 48), {"Dv": 80}),  # dK/dV chunks past dQ's columns
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(ATOMIC_CASES))
def test_atomic_dq_backward(backend, device, atomic_dq, case, dtype):
    """FASTDL_ATTENTION_BACKWARD=atomic: dQ added by the dK/dV kernel with float32 atomics (the
    dQ kernel is not launched); every gradient still matches float64."""
    (B, H, H_kv, L, S, D), kwargs = ATOMIC_CASES[case]
    if kwargs.get("attn_mask") == "padding":
        kwargs = {"attn_mask": _bool_mask((B, 1, 1, S), device, empty_rows=False)}
    kwargs = dict(kwargs)
    Dv = kwargs.pop("Dv", None)
    _check(_qkv(B, H, L, S, D, dtype, device, H_kv, Dv), dtype, **kwargs)


def test_atomic_dq_with_dropout(backend, device, atomic_dq):
    """The atomic dQ regenerates the forward's dropout mask too (causal, grouped heads)."""
    B, H, L, S, D = 1, 4, 40, 70, 32
    keep = _keep_mask(B, H, L, S, 0.2, 9, torch.float32, device)

    def fastdl_fn(q, k, v):
        torch.manual_seed(9)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True, enable_gqa=True)

    check_op(fastdl_fn, lambda q, k, v: ref_attention(q, k, v, None, True, keep=keep, p=0.2),
             _qkv(B, H, L, S, D, torch.float32, device, H_kv=2), rtol=RTOL, grad_rtol=RTOL)


def test_atomic_dq_leaves_mask_gradients_to_the_deterministic_kernels(backend, device, monkeypatch):
    """A float mask that requires grad needs the dQ kernel (it stores dS): the atomic setting
    takes the deterministic kernels there, and every gradient is right."""
    monkeypatch.setenv("FASTDL_ATTENTION_BACKWARD", "atomic")
    mask = torch.randn(2, 33, 40, device=device, requires_grad=True)
    _check([*_qkv(1, 2, 33, 40, 32, torch.float32, device), mask], torch.float32)


def test_attention_backward_setting(monkeypatch):
    """FASTDL_ATTENTION_BACKWARD: deterministic by default, atomic on request, never atomic under
    torch.use_deterministic_algorithms(True); anything else is refused naming the variable."""
    from fastdl.functional.attention import atomic_dq
    monkeypatch.delenv("FASTDL_ATTENTION_BACKWARD", raising=False)
    assert not atomic_dq()
    monkeypatch.setenv("FASTDL_ATTENTION_BACKWARD", " Atomic ")
    assert atomic_dq()
    enabled, warn_only = (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        assert not atomic_dq()
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    monkeypatch.setenv("FASTDL_ATTENTION_BACKWARD", "deterministic")
    assert not atomic_dq()
    monkeypatch.setenv("FASTDL_ATTENTION_BACKWARD", "fast")
    with pytest.raises(ValueError, match="FASTDL_ATTENTION_BACKWARD"):
        atomic_dq()


def test_bad_arguments(backend, device):
    q, k, v = (t.detach() for t in _qkv(1, 2, 5, 6, 16, torch.float32, device))
    sdpa = F.scaled_dot_product_attention
    with pytest.raises(TypeError, match="same dtype"):
        sdpa(q, k.half(), v.half())
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(q, k, v, attn_mask=torch.zeros(5, 6, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(q, k, v, attn_mask=torch.zeros(5, 6, dtype=torch.float16, device=device))
    with pytest.raises(TypeError, match="query"):
        sdpa(q.long(), k, v)
    with pytest.raises(ValueError, match="is_causal"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool, device=device), is_causal=True)
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="head dim"):
        sdpa(q, k[..., :8], v)
    with pytest.raises(ValueError, match="length"):
        sdpa(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="enable_gqa"):
        sdpa(torch.randn(1, 3, 5, 16, device=device), k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="attn_mask"):
        sdpa(q, k, v, attn_mask=torch.ones(4, 6, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor"):
        sdpa(q, k, v, attn_mask=[[True] * 6] * 5)
    for flag in ("is_causal", "enable_gqa"):  # torch's op takes bools only, too
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            sdpa(q, k, v, **{flag: 1})
        with pytest.raises(TypeError, match=flag):
            TF.scaled_dot_product_attention(q, k, v, **{flag: 1})
    # A mask of more dims than the query would grow the output's rank: torch refuses it as well.
    for q3, mask in ((q[0], torch.ones(1, 2, 5, 6, dtype=torch.bool, device=device)),
                     (q[0, 0], torch.ones(1, 5, 6, dtype=torch.bool, device=device))):
        kv = (k[0], v[0]) if q3.dim() == 3 else (k[0, 0], v[0, 0])
        with pytest.raises(ValueError, match="attn_mask"):
            sdpa(q3, *kv, attn_mask=mask)
        with pytest.raises(RuntimeError):
            TF.scaled_dot_product_attention(q3, *kv, attn_mask=mask)


@pytest.mark.parametrize("case", ["float64", "head_dim_300", "bf16_interpret"])
def test_unsupported_calls_take_the_torch_path(backend, device, case):
    """What the kernel cannot take runs on torch under auto, and a forced kernel backend says why."""
    dtype = {"float64": torch.float64, "bf16_interpret": torch.bfloat16}.get(case, torch.float32)
    if case == "bf16_interpret" and backend != "interpret":
        pytest.skip("only the interpreter lacks bf16 dot products")
    D = 300 if case == "head_dim_300" else 16
    q, k, v = (t.detach() for t in _qkv(1, 2, 5, 6, D, dtype, device))
    expected = ref_attention(q.double(), k.double(), v.double())
    with fastdl.backend.use("auto"):
        out = F.scaled_dot_product_attention(q, k, v)
    assert_close("output", out.double(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    if backend != "torch":
        with pytest.raises(fastdl.backend.BackendError, match="scaled_dot_product_attention"):
            F.scaled_dot_product_attention(q, k, v)


def test_launcher_returns_logsumexp(backend, device):
    """attention_fwd(q, k, v) -> (o, stats): stats[:, :, 0] is the base-2 logsumexp of each score
    row (the natural one times log2(e)), -inf for a fully masked row; stats[:, :, 1] its float32
    rounding error (two-sum: lse + lo rounds back to lse, |lo| <= half an ulp of lse; 0 where
    nothing is attended)."""
    if backend == "torch":
        pytest.skip("the launcher is the kernel path")
    attention = fastdl.backend.kernels("attention")
    q, k, v = (t.detach() for t in _qkv(2, 2, 19, 27, 32, torch.float32, device))
    mask = _bool_mask((19, 27), device)
    o, stats = attention.attention_fwd(q, k, v, mask)
    assert stats.shape == (2, 2, 2, 19)
    lse, lo = stats[:, :, 0], stats[:, :, 1]
    s = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(32)).masked_fill(~mask, float("-inf"))
    assert_close("o", o, ref_attention(q.double(), k.double(), v.double(), mask), rtol=RTOL)
    expected = torch.logsumexp(s, -1) * math.log2(math.e)
    assert torch.equal(lse[:, :, 3], expected[:, :, 3])  # -inf
    assert torch.equal(lo[:, :, 3], torch.zeros_like(lo[:, :, 3]))
    finite = expected.isfinite()
    assert_close("lse", lse[finite], expected[finite], rtol=1e-6)
    assert torch.equal((lse[finite].double() + lo[finite].double()).float(), lse[finite])
    assert (lo[finite].abs() <= torch.finfo(torch.float32).eps * lse[finite].abs()).all()
    assert (lo[finite] != 0).any()  # the remainder is really computed


def test_launcher_backward_reads_any_output_layout(backend, device):
    """attention_bwd takes o (the forward's output) in any layout, as it takes q, k, v and do:
    a caller's copy of o with a strided last dim gives the gradients of a contiguous one."""
    if backend == "torch":
        pytest.skip("the launcher is the kernel path")
    attention = fastdl.backend.kernels("attention")
    q, k, v = (t.detach() for t in _qkv(1, 2, 19, 27, 32, torch.float32, device))
    o, lse = attention.attention_fwd(q, k, v)
    do = torch.randn_like(o)
    want = attention.attention_bwd(do, q, k, v, o, lse)
    strided = torch.empty(*o.shape[:-1], 2 * o.shape[-1], device=device)[..., ::2]
    strided.copy_(o)
    got = attention.attention_bwd(do, q, k, v, strided, lse)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, msg=name)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_batch_one_query_against_batched_keys_and_mask(backend, device, mask_kind):
    """A batch-1 query (learned queries) against batch-B keys and a batch-B mask broadcasts to
    batch B, as torch's SDPA (Hugging Face's sdpa attention relies on it)."""
    q = torch.randn(1, 4, 3, 8, device=device, dtype=torch.float64)
    k, v = (torch.randn(2, 4, 5, 8, device=device, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(2, 1, 3, 5, device=device) > 0.3
    if mask_kind == "float":
        mask = torch.randn(2, 1, 3, 5, device=device, dtype=torch.float64)
    with fastdl.backend.use("auto"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.shape == (2, 4, 3, 8)
    assert_close("output", out, torch_sdpa(q, k, v, attn_mask=mask), rtol=1e-12)
    with pytest.raises(ValueError, match="does not broadcast"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.rand(3, 1, 3, 5, device=device) > 0.3)


def test_gradients_when_one_score_dominates_its_row(backend, device):
    """A score 1e4 above the rest of its row makes P one-hot: the backward recomputes P = 1 from
    the saved logsumexp, which must not lose an ulp of the row max on the way (a natural-log
    round trip gave P = 1 +- 7e-4 and dV 5e-4 off). fp32 against float64, within 3x torch's own
    fp32 error plus a floor."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 32, generator=g).to(device) for _ in range(3))
    mask = torch.randn(1, 2, 16, 16, generator=g).to(device)
    mask[..., 3] += 1e4

    def grads(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, attn_mask=mask.to(dtype))
        return [g.double() for g in torch.autograd.grad(out, inputs, torch.ones_like(out) + out.detach())]

    ref = grads(torch_sdpa, torch.float64)
    base = grads(lambda *a, **kw: ref_attention(*a, **kw), torch.float32)
    got = grads(F.scaled_dot_product_attention, torch.float32)
    scale = ref[2].norm()  # dq and dk are ~0 (one-hot rows): errors relative to dv's size
    for name, gg, bb, rr in zip(("dq", "dk", "dv"), got, base, ref):
        error = ((gg - rr).norm() / scale).item()
        bound = 3 * ((bb - rr).norm() / scale).item() + 1e-6
        assert error <= bound, f"{name}: error {error:.2e} (relative to |dv|) > {bound:.2e}"
