"""fastdl.functional.varlen_attention (flash-attn's varlen semantics) on every backend against
per-sequence float64 scaled_dot_product_attention, forward and backward."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, check_op

import fastdl.functional as F

# (query lengths, key lengths): ragged, with an empty sequence, lengths that are not multiples of
# any tile (the interpreter's tiles are 64 rows: 70 crosses one), L != S in both directions.
LENGTHS = {
    "self": ([5, 70, 0, 17], None),
    "cross": ([9, 33, 1], [20, 3, 40]),
}


def _cu(lengths, device):
    return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)


def ref_varlen(q, k, v, cu_q, cu_k, is_causal=False, scale=None):
    """Per-sequence SDPA (explicit bottom-right causal mask when L != S); float64 inputs."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    pieces = []
    bounds = zip(cu_q.tolist()[:-1], cu_q.tolist()[1:], cu_k.tolist()[:-1], cu_k.tolist()[1:])
    for q0, q1, k0, k1 in bounds:
        qs, ks, vs = q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)
        mask = None
        if is_causal:
            mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).tril(k1 - k0 - (q1 - q0))
        if q1 > q0 and k1 > k0:
            o = TF.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                                enable_gqa=qs.shape[0] != ks.shape[0])
            # rows with no key to attend: 0, as flash-attn (SDPA's math path gives NaN or 0)
            o = torch.nan_to_num(o, nan=0.0)
            if mask is not None:
                o = o * mask.any(-1)[None, :, None]
            pieces.append((q0, q1, o.transpose(0, 1)))
    for q0, q1, o in pieces:
        out = torch.cat([out[:q0], o, out[q1:]])
    return out


def _inputs(lengths_q, lengths_k, heads, kv_heads, d, dtype, device):
    lengths_k = lengths_q if lengths_k is None else lengths_k
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = torch.randn(tq, heads, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(tk, kv_heads, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(tk, kv_heads, d, device=device, dtype=dtype, requires_grad=True)
    return q, k, v, _cu(lengths_q, device), _cu(lengths_k, device), max(lengths_q), max(lengths_k)


def _dtype(backend, name):
    if name == "float64" and backend != "torch":
        pytest.skip("the kernels compute in fp16/bf16/fp32; float64 runs on the torch path")
    return getattr(torch, name)


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", list(LENGTHS))
def test_matches_per_sequence_sdpa(backend, device, kind, is_causal, dtype_name):
    dtype = _dtype(backend, dtype_name)
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs(*LENGTHS[kind], 2, 2, 16, dtype, device)
    check_op(lambda q, k, v: F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=is_causal),
             lambda q, k, v: ref_varlen(q, k, v, cu_q, cu_k, is_causal), [q, k, v], rtol=2e-4, grad_rtol=2e-4)


def test_gqa_scale_and_head_dims(backend, device):
    """4 query heads over 2 key/value heads, head dim 24 (not a power of two), explicit scale."""
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs([13, 40, 6], None, 4, 2, 24, torch.float32, device)
    check_op(lambda q, k, v: F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True, scale=0.3),
             lambda q, k, v: ref_varlen(q, k, v, cu_q, cu_k, True, scale=0.3), [q, k, v],
             rtol=2e-4, grad_rtol=2e-4)


@pytest.mark.parametrize("kind", list(LENGTHS))
def test_atomic_dq(backend, device, monkeypatch, kind):
    """FASTDL_ATTENTION_BACKWARD=atomic: packed sequences' dQ added by the dK/dV kernel (rows of
    the empty sequence and keys outside every sequence stay 0), causal, grouped heads."""
    monkeypatch.setenv("FASTDL_ATTENTION_BACKWARD", "atomic")
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs(*LENGTHS[kind], 4, 2, 40, torch.float32, device)
    check_op(lambda q, k, v: F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True),
             lambda q, k, v: ref_varlen(q, k, v, cu_q, cu_k, True), [q, k, v], rtol=2e-4, grad_rtol=2e-4)


def test_half_precision(backend, device):
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs([21, 50], None, 2, 2, 32, torch.float16, device)
    check_op(lambda q, k, v: F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k),
             lambda q, k, v: ref_varlen(q, k, v, cu_q, cu_k),
             [q, k, v], baseline_fn=lambda q, k, v: ref_varlen(q, k, v, cu_q, cu_k))


def test_equals_padded_attention(backend, device):
    """Packing then attending equals masked attention on the padded batch, row for row."""
    lengths, pad_to = [7, 30, 19], 30
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs(lengths, None, 2, 2, 16, torch.float32, device)
    out = F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k)
    mask = torch.arange(pad_to, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]

    def pad(t):
        padded = t.new_zeros(len(lengths), pad_to, *t.shape[1:])
        padded[mask] = t
        return padded.transpose(1, 2)

    dense = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask[:, None, None, :])
    assert_close("packed vs padded", out, dense.transpose(1, 2)[mask], rtol=2e-4)


def test_dropout_is_reproducible(backend, device):
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs([12, 33], None, 2, 2, 16, torch.float32, device)
    torch.manual_seed(3)
    a = F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.3)
    torch.manual_seed(3)
    b = F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.3)
    full = F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k)
    assert torch.equal(a, b) and not torch.allclose(a, full)
    a.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("change,error,match", [
    (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].float()}, TypeError, "cu_seqlens_q"),
    (lambda a: {**a, "cu_seqlens_k": a["cu_seqlens_k"][:-1]}, ValueError, "as many sequences"),
    (lambda a: {**a, "k": a["k"][:, :, :-1]}, ValueError, "shapes do not fit"),
    (lambda a: {**a, "q": a["q"][None]}, ValueError, "total_tokens, heads, head_dim"),
    (lambda a: {**a, "v": a["v"].double()}, TypeError, "same dtype"),
    (lambda a: {**a, "max_seqlen_q": -1}, ValueError, "max_seqlen_q"),
    (lambda a: {**a, "dropout_p": 1.5}, ValueError, "dropout_p"),
])
def test_errors(backend, device, change, error, match):
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs([3, 4], None, 2, 2, 16, torch.float32, device)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
    with pytest.raises(error, match=match):
        F.varlen_attention(**change(args))


@pytest.mark.parametrize("offsets", [[0, 6, 14], [0, 6, 4, 10], [2, 6, 10], [0, -1, 10]],
                         ids=["past_the_end", "decreasing", "not_from_0", "negative"])
@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
def test_bad_offsets_raise_at_the_call_on_cpu(backend, device, offsets, which):
    """Offsets are values: checked inside the operator, a ValueError naming them on CPU tensors
    (on CUDA a device-side assertion, no host read), never an out-of-bounds access."""
    if device != "cpu":
        pytest.skip("CPU tensors raise at the call")
    q = torch.randn(10, 2, 16)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu = {"cu_seqlens_q": good, "cu_seqlens_k": good, which: torch.tensor(offsets, dtype=torch.int32)}
    if len(offsets) != 3:
        cu = {name: (t if name == which else torch.tensor([0, 3, 5, 10], dtype=torch.int32))
              for name, t in cu.items()}
    with pytest.raises(ValueError, match=f"{which} must start at 0, never decrease and end at most"):
        F.varlen_attention(q, q, q, cu["cu_seqlens_q"], cu["cu_seqlens_k"], 8, 8)


def test_kernels_clamp_bad_offsets(backend, device):
    """The kernels never read or write past the packed tokens, whatever the offsets say (on
    CUDA the check is asynchronous, so the kernels run on bad offsets): offsets past the end or
    negative are clamped into the tokens, sequences beyond them are empty, and a sequence whose
    end lies before its start is empty."""
    if backend == "torch":
        pytest.skip("the kernels' own guard")
    import fastdl.kernels.attention as K
    q = torch.randn(10, 2, 16, device=device)
    for bad, clamped in (([0, 6, 14, 20], [0, 6, 10, 10]), ([-3, 4, 10, 10], [0, 4, 10, 10]),
                         ([0, 6, 4, 4], [0, 6, 6, 6])):
        cu = torch.tensor(bad, dtype=torch.int32, device=device)
        out, _ = K.varlen_attention_fwd(q, q, q, cu, cu, 8, 8, False, None, 0.0, None)
        good = torch.tensor(clamped, dtype=torch.int32, device=device)
        expected = ref_varlen(q.double(), q.double(), q.double(), good, good)
        assert_close(f"offsets {bad}", out, expected, rtol=2e-4)


def test_head_dim_zero_is_refused(backend, device):
    q = torch.randn(5, 2, 0, device=device)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="head dim of at least 1"):
        F.varlen_attention(q, q, q, cu, cu, 5, 5)


def test_strided_offsets(backend, device):
    """Offsets read through a view (every other entry of a longer tensor), as contiguous ones."""
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs([9, 3, 7], [5, 11, 2], 2, 2, 16, torch.float32, device)
    spread_q, spread_k = (torch.stack([c, torch.full_like(c, 99)], 1).reshape(-1)[::2] for c in (cu_q, cu_k))
    assert not spread_q.is_contiguous() and torch.equal(spread_q, cu_q)
    check_op(lambda q, k, v: F.varlen_attention(q, k, v, spread_q, spread_k, max_q, max_k, is_causal=True),
             lambda q, k, v: ref_varlen(q, k, v, cu_q, cu_k, True), [q, k, v], rtol=2e-4, grad_rtol=2e-4)


def test_double_backward(backend, device):
    """A gradient penalty through varlen attention (create_graph=True): second derivatives as
    per-sequence SDPA's in float64, never a constant first gradient."""
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs([3, 5], None, 2, 2, 16, torch.float32, device)

    def penalized(attention, q, k, v):
        out = attention(q, k, v)
        dq, = torch.autograd.grad(out.sin().sum(), q, create_graph=True)
        return out.sum() + (dq ** 2).sum()

    ours = penalized(lambda q, k, v: F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True),
                     q, k, v)
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = penalized(lambda q, k, v: ref_varlen(q, k, v, cu_q, cu_k, True), *refs)
    for name, got, want in zip("qkv", torch.autograd.grad(ours, (q, k, v)), torch.autograd.grad(ref, refs)):
        assert_close(f"d{name}", got, want, rtol=2e-4)
    if backend != "torch":
        out = F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.1)
        with pytest.raises(NotImplementedError, match="not differentiable twice"):
            torch.autograd.grad(out.sum(), q, create_graph=True)


def test_compiles_in_one_graph_forward_and_backward(backend, device):
    """torch.compile(fullgraph=True) traces forward and backward through the operators on every
    backend: the torch path's backward (a host loop over the offsets) runs inside its operator,
    not in the traced graph (it raised GuardOnDataDependentSymNode there), and matches eager."""
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs([3, 9, 5], [4, 2, 11], 2, 2, 16, torch.float32, device)

    def step(q, k, v):
        return F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True)

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        out = fn(q, k, v)
        grads.append((out, *torch.autograd.grad(out, (q, k, v), torch.cos(out))))
    torch._dynamo.reset()
    for name, got, want in zip(("out", "dq", "dk", "dv"), grads[1], grads[0]):
        assert_close(name, got, want, rtol=1e-6)
    ref = ref_varlen(*(t.detach().double().requires_grad_() for t in (q, k, v)), cu_q, cu_k, True)
    assert_close("out vs float64", grads[1][0], ref, rtol=2e-4)


def test_meta_tensors_forward_and_backward(backend):
    """Meta tensors (shape inference) take the fake implementations, backward included: the
    torch path read the offsets on the host there ("Cannot copy out of meta tensor")."""
    q, k, v = (torch.randn(8, 2, 8, device="meta", requires_grad=True) for _ in range(3))
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device="meta") for c in ([0, 3, 8], [0, 4, 8]))
    out = F.varlen_attention(q, k, v, cu_q, cu_k, 5, 4)
    assert out.shape == (8, 2, 8) and out.device.type == "meta"
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v)]


def test_no_sequences_gives_zero_output_and_gradients(backend, device):
    """Offsets (0,): no sequence, every token outside one -- output 0 and gradients 0 on every
    backend, as flash-attn (the torch path's backward raised "does not require grad"). Tokens
    past a real sequence's end in the same call get the same, next to gradients that are not."""
    q, k, v, *_ = _inputs([4], None, 2, 2, 16, torch.float32, device)
    none = torch.zeros(1, dtype=torch.int32, device=device)
    out = F.varlen_attention(q, k, v, none, none, 0, 0)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(out, torch.zeros_like(out))
    for g, t in zip(grads, (q, k, v)):
        assert torch.equal(g, torch.zeros_like(t))
    first = torch.tensor([0, 3], dtype=torch.int32, device=device)  # token 3 is outside
    out = F.varlen_attention(q, k, v, first, first, 3, 3)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    ref = ref_varlen(*(t.detach().double().requires_grad_() for t in (q, k, v)), first, first)
    assert_close("out", out, ref, rtol=2e-4)
    assert torch.equal(dq[3], torch.zeros_like(dq[3])) and (dq[:3] != 0).all()
