"""fastdl.functional.bert_embeddings (three lookups + sum + LayerNorm + dropout, fused) on every
backend, against an unfused float64 composition and Hugging Face's BertEmbeddings."""

import math

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, check_op

import fastdl
import fastdl.functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-12


def ref_bert_embeddings(ids, type_ids, pos_ids, word, position, token_type, ln_w, ln_b, eps=EPS,
                        keep=None, p=0.0, padding_idx=None):
    """The unfused block in float64. ``keep``: the dropout keep-mask to apply (scaled by 1/(1-p))."""
    if padding_idx is not None:
        is_pad = (torch.arange(word.shape[0], device=word.device) == padding_idx)[:, None]
        word = torch.where(is_pad, word.detach(), word)  # the padding row gets no gradient
    s = word[ids] + position[pos_ids] + token_type[type_ids]
    mean = s.mean(-1, keepdim=True)
    y = (s - mean) / torch.sqrt(((s - mean) ** 2).mean(-1, keepdim=True) + eps)
    if ln_w is not None:
        y = y * ln_w
    if ln_b is not None:
        y = y + ln_b
    return y if keep is None else y * keep / (1 - p)


def torch_bert_embeddings(ids, type_ids, pos_ids, word, position, token_type, ln_w, ln_b, eps=EPS):
    """The same block composed of PyTorch ops in the inputs' dtype: the fp16/bf16 baseline."""
    s = TF.embedding(ids, word) + TF.embedding(pos_ids, position) + TF.embedding(type_ids, token_type)
    return TF.layer_norm(s, (word.shape[1],), ln_w, ln_b, eps)


def _tables(vocab, max_pos, types, dim, dtype, device):
    def param(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=device) * scale + shift).to(dtype).requires_grad_()
    return [param(vocab, dim), param(max_pos, dim, scale=0.3), param(types, dim, scale=0.3),
            param(dim, scale=0.2, shift=1.0), param(dim, scale=0.2)]


def _ids(batch, seq, vocab, types, device):
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    type_ids = torch.randint(0, types, (batch, seq), device=device)
    pos_ids = torch.arange(seq, device=device).expand(batch, seq)
    return ids, type_ids, pos_ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,vocab,dim", [(2, 7, 1000, 33), (3, 5, 40, 96), (1, 9, 13, 100)])
def test_bert_embeddings(backend, device, dtype, batch, seq, vocab, dim):
    ids, type_ids, pos_ids = _ids(batch, seq, vocab, 2, device)
    args = _tables(vocab, 16, 2, dim, dtype, device)
    check_op(lambda *t: F.bert_embeddings(ids, type_ids, pos_ids, *t, EPS, 0.0, True),
             lambda *t: ref_bert_embeddings(ids, type_ids, pos_ids, *t),
             args, baseline_fn=lambda *t: torch_bert_embeddings(ids, type_ids, pos_ids, *t))


def test_repeated_ids_padding_and_defaults(backend, device):
    """Padding tokens and one word repeated across the batch (their gradients are summed by the
    deterministic scatter), default position / token-type ids, and a padding row with no gradient."""
    batch, seq, vocab, dim = 6, 12, 30, 24
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    ids[:, seq // 2:] = 0  # padding
    ids[:, 0] = 7
    args = _tables(vocab, seq, 2, dim, torch.float32, device)
    pos_ids = torch.arange(seq, device=device).expand(batch, seq)
    type_ids = torch.zeros(batch, seq, dtype=torch.int64, device=device)
    check_op(lambda *t: F.bert_embeddings(ids, None, None, *t, EPS, 0.0, True, padding_idx=0),
             lambda *t: ref_bert_embeddings(ids, type_ids, pos_ids, *t, padding_idx=0), args)
    assert torch.all(args[0].grad[0] == 0)


def test_broadcast_position_ids_int32_and_optional_affine(backend, device):
    ids, type_ids, pos_ids = _ids(3, 6, 50, 3, device)
    word, position, token_type, _, ln_b = _tables(50, 20, 3, 33, torch.float32, device)
    offset_pos = (torch.arange(6, device=device) + 4)[None]  # (1, L), as Hugging Face's buffer slice
    check_op(lambda *t: F.bert_embeddings(ids.int(), type_ids.int(), offset_pos.int(), *t, None, 1e-5,
                                          0.0, False),
             lambda *t: ref_bert_embeddings(ids, type_ids, pos_ids + 4, *t, None, eps=1e-5),
             [word, position, token_type, ln_b])


def test_mixed_table_dtypes(backend, device):
    """fp16 position / token-type tables beside an fp32 word table: the sum and output are fp32,
    each table's gradient comes back in its own dtype."""
    ids, type_ids, pos_ids = _ids(2, 7, 30, 2, device)
    word, position, token_type, ln_w, ln_b = _tables(30, 7, 2, 33, torch.float32, device)
    position, token_type = (t.detach().half().requires_grad_() for t in (position, token_type))
    check_op(lambda *t: F.bert_embeddings(ids, type_ids, pos_ids, *t, EPS, 0.0, True),
             lambda *t: ref_bert_embeddings(ids, type_ids, pos_ids, *t),
             [word, position, token_type, ln_w, ln_b])
    assert position.grad.dtype == torch.float16 and word.grad.dtype == torch.float32


def test_frozen_tables_get_no_gradient(backend, device):
    ids, type_ids, pos_ids = _ids(2, 5, 20, 2, device)
    word, position, token_type, ln_w, ln_b = _tables(20, 8, 2, 16, torch.float32, device)
    word.requires_grad_(False)
    position.requires_grad_(False)
    out = F.bert_embeddings(ids, type_ids, pos_ids, word, position, token_type, ln_w, ln_b, EPS, 0.0, True)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref_t = token_type.detach().double().requires_grad_()
    ref_bert_embeddings(ids, type_ids, pos_ids, word.double(), position.double(), ref_t,
                        ln_w.detach().double(), ln_b.detach().double()).backward(dy.double())
    assert word.grad is None and position.grad is None
    assert_close("token_type grad", token_type.grad, ref_t.grad)


def test_float64_gradcheck(backend, device):
    ids, type_ids, pos_ids = _ids(2, 3, 6, 2, device)
    args = [t.detach().double().requires_grad_() for t in _tables(6, 4, 2, 5, torch.float32, device)]
    assert torch.autograd.gradcheck(
        lambda *t: F.bert_embeddings(ids, type_ids, pos_ids, *t, 1e-5, 0.0, True), args, fast_mode=True)


def test_dropout_mask_statistics_and_backward_consistency(backend, device):
    """With p > 0 the zeros in the output are the dropped elements: about p of them, the rest
    equal to the reference divided by (1 - p). The backward must apply that same mask: the
    gradients equal the float64 reference run with the mask read off the output."""
    p = 0.3
    batch, seq, vocab, dim = 4, 16, 64, 48
    ids, type_ids, pos_ids = _ids(batch, seq, vocab, 2, device)
    args = _tables(vocab, seq, 2, dim, torch.float32, device)
    out = F.bert_embeddings(ids, type_ids, pos_ids, *args, EPS, p, True)
    keep = out != 0
    n = keep.numel()
    dropped = 1 - keep.double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n), f"dropped fraction {dropped:.3f}, p={p}"
    ref_args = [t.detach().double().requires_grad_() for t in args]
    ref = ref_bert_embeddings(ids, type_ids, pos_ids, *ref_args, keep=keep.double(), p=p)
    assert_close("output", out, ref)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy.double())
    for name, t, r in zip(["word", "position", "token_type", "ln_weight", "ln_bias"], args, ref_args):
        assert_close(f"{name} grad", t.grad, r.grad)


def test_dropout_reproducible_with_manual_seed_and_off_in_eval(backend, device):
    ids, type_ids, pos_ids = _ids(2, 8, 30, 2, device)
    args = [t.detach() for t in _tables(30, 8, 2, 20, torch.float32, device)]
    torch.manual_seed(5)
    a = F.bert_embeddings(ids, type_ids, pos_ids, *args, EPS, 0.5, True)
    torch.manual_seed(5)
    b = F.bert_embeddings(ids, type_ids, pos_ids, *args, EPS, 0.5, True)
    c = F.bert_embeddings(ids, type_ids, pos_ids, *args, EPS, 0.5, True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    no_dropout = F.bert_embeddings(ids, type_ids, pos_ids, *args, EPS, 0.0, True)
    assert torch.equal(F.bert_embeddings(ids, type_ids, pos_ids, *args, EPS, 0.5, False), no_dropout)


def test_empty_batch(backend, device):
    args = _tables(10, 4, 2, 8, torch.float32, device)
    ids = torch.empty(0, 4, dtype=torch.int64, device=device)
    out = F.bert_embeddings(ids, None, None, *args, EPS, 0.1, True)
    assert out.shape == (0, 4, 8)
    out.sum().backward()
    assert torch.all(args[0].grad == 0) and torch.all(args[3].grad == 0)


def test_matches_hugging_face_bert_embeddings(backend, device):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=24, max_position_embeddings=16,
                                     type_vocab_size=2, pad_token_id=0, hidden_dropout_prob=0.0)
    hf = transformers.models.bert.modeling_bert.BertEmbeddings(config).to(device).double()
    with torch.no_grad():
        for t in (hf.word_embeddings.weight, hf.LayerNorm.weight, hf.LayerNorm.bias):
            t.add_(torch.randn_like(t) * 0.1)
    ids, type_ids, _ = _ids(3, 10, 40, 2, device)
    ids[:, -3:] = 0
    hf_tables = [hf.word_embeddings.weight, hf.position_embeddings.weight,
                 hf.token_type_embeddings.weight, hf.LayerNorm.weight, hf.LayerNorm.bias]
    ours = [t.detach().float().requires_grad_() for t in hf_tables]
    out = F.bert_embeddings(ids, type_ids, None, *ours, config.layer_norm_eps, 0.0, True, padding_idx=0)
    ref = hf(input_ids=ids, token_type_ids=type_ids)
    assert_close("output", out, ref)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy.double())
    for name, t, r in zip(["word", "position", "token_type", "ln_weight", "ln_bias"], ours, hf_tables):
        assert_close(f"{name} grad", t.grad, r.grad)


def test_out_of_range_ids_raise_index_error(backend, device, monkeypatch):
    if device == "cuda":  # the opt-in eager check (CUDA's default is device-side)
        monkeypatch.setenv("FASTDL_EAGER_INDEX_CHECK", "1")
    ids, type_ids, pos_ids = _ids(2, 5, 20, 2, device)
    args = _tables(20, 5, 2, 8, torch.float32, device)
    bad_ids, bad_types = ids.clone(), type_ids.clone()
    bad_ids[1, 2] = 20
    bad_types[0, 0] = 2
    with pytest.raises(IndexError, match="input_ids contains index 20"):
        F.bert_embeddings(bad_ids, type_ids, pos_ids, *args, EPS, 0.0, True)
    with pytest.raises(IndexError, match="token_type_ids contains index 2"):
        F.bert_embeddings(ids, bad_types, pos_ids, *args, EPS, 0.0, True)
    with pytest.raises(IndexError, match="position_ids contains index 5"):
        F.bert_embeddings(ids, type_ids, pos_ids + 1, *args, EPS, 0.0, True)
    with pytest.raises(IndexError, match="position_ids contains index 5"):  # default arange(L), L > P
        F.bert_embeddings(torch.zeros(1, 6, dtype=torch.int64, device=device), None, None, *args, EPS,
                          0.0, True)


def test_bad_arguments(backend, device):
    ids, type_ids, pos_ids = _ids(2, 5, 20, 2, device)
    word, position, token_type, ln_w, ln_b = _tables(20, 5, 2, 8, torch.float32, device)
    with pytest.raises(TypeError, match="input_ids"):
        F.bert_embeddings(ids.float(), type_ids, pos_ids, word, position, token_type, ln_w, ln_b, EPS,
                          0.0, True)
    with pytest.raises(ValueError, match="token_type_ids"):
        F.bert_embeddings(ids, type_ids[:, :3], pos_ids, word, position, token_type, ln_w, ln_b, EPS,
                          0.0, True)
    with pytest.raises(ValueError, match="position"):
        F.bert_embeddings(ids, type_ids, pos_ids, word, position[:, :4], token_type, ln_w, ln_b, EPS,
                          0.0, True)
    with pytest.raises(ValueError, match="dropout probability"):
        F.bert_embeddings(ids, type_ids, pos_ids, word, position, token_type, ln_w, ln_b, EPS, 1.5, True)
    with pytest.raises(TypeError, match="training must be a bool"):
        F.bert_embeddings(ids, type_ids, pos_ids, word, position, token_type, ln_w, ln_b, EPS, 0.1, None)
    for bad in (ln_w.detach().expand(2, 8), ln_w.detach()[:4]):  # as torch's layer_norm: (D,) only
        with pytest.raises(ValueError, match=r"ln_weight must have shape \(8,\)"):
            F.bert_embeddings(ids, type_ids, pos_ids, word, position, token_type, bad, ln_b, EPS, 0.0, True)
        with pytest.raises(ValueError, match=r"ln_bias must have shape \(8,\)"):
            F.bert_embeddings(ids, type_ids, pos_ids, word, position, token_type, ln_w, bad, EPS, 0.0, True)


@pytest.mark.parametrize("name", ["interpret", pytest.param("triton", marks=pytest.mark.cuda)])
def test_forced_kernel_backend_refuses_rows_wider_than_a_block(name):
    """Embedding dims beyond 16384 take the torch path under auto and raise when a kernel is forced."""
    if name == "triton" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = "cuda" if name == "triton" else "cpu"
    tables = [torch.randn(n, 16385, device=device) for n in (3, 2, 2)]
    ids = torch.tensor([[0, 2]], device=device)
    with fastdl.backend.use(name):
        with pytest.raises(fastdl.backend.BackendError, match="16385"):
            F.bert_embeddings(ids, None, None, *tables, None, None, EPS, 0.0, True)


def test_dropout_of_nan_rows_is_nan_as_torch(backend, device):
    """An inf in a word row makes that token's LayerNorm row NaN; torch's dropout keeps NaN where it
    drops (NaN * 0), so the whole row stays NaN, never zeros."""
    ids, type_ids, pos_ids = _ids(3, 11, 20, 2, device)
    tables = [t.detach() for t in _tables(20, 16, 2, 48, torch.float32, device)]
    tables[0][ids[0, 0], 5] = float("inf")
    out = F.bert_embeddings(ids, type_ids, pos_ids, *tables, EPS, 0.5, True)
    hit = ids == ids[0, 0]
    assert torch.isnan(out[hit]).all()
    assert torch.isfinite(out[~hit]).all()
