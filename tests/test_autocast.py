"""Under ``torch.autocast`` every fastdl function and module returns the dtype its torch twin
returns under the same autocast (torch's autocast lists decide: attention runs in the lower
precision; LayerNorm runs in float32 on CUDA and is left alone on CPU; the rest keep their
input's dtype), with values close to the twin's.

CPU autocast (bfloat16) on the torch backend and on ``auto`` with Triton's interpreter on, where
the kernels run what the interpreter can compute (it has no bf16 dot product: attention in bf16
takes the torch path, as ``auto`` decides). A CUDA case checks the float16 rules on a GPU.
"""

import copy

import pytest
import torch
import torch.nn.functional as TF
from helpers import needs_torch_linear_cross_entropy_loss

import fastdl
import fastdl.functional as F
import fastdl.nn as fnn

D = 16


def _ids():
    return torch.randint(0, 11, (2, 6))


def _function_cases():
    """name -> (fastdl call, torch twin) on fresh inputs; both take no arguments."""
    x, r = torch.randn(2, 6, D), torch.randn(2, 6, D)
    w, b = torch.randn(D), torch.randn(D)
    q, k, v = torch.randn(2, 2, 6, D), torch.randn(2, 2, 5, D), torch.randn(2, 2, 5, D)
    mask = torch.randn(6, 5)
    bn_x, bn_stats = torch.randn(4, 3, 5), (torch.randn(3), torch.rand(3) + 0.5)
    ids, word, pos, typ = _ids(), torch.randn(11, D), torch.randn(8, D), torch.randn(2, D)
    return {
        "layer_norm": (lambda: F.layer_norm(x, (D,), w, b), lambda: TF.layer_norm(x, (D,), w, b)),
        "layer_norm_bf16_input": (lambda: F.layer_norm(x.bfloat16(), (D,), w, b),
                                  lambda: TF.layer_norm(x.bfloat16(), (D,), w, b)),
        "rms_norm": (lambda: F.rms_norm(x, (D,), w), lambda: TF.rms_norm(x, (D,), w)),
        "batch_norm": (lambda: F.batch_norm(bn_x, *(s.clone() for s in bn_stats), training=True),
                       lambda: TF.batch_norm(bn_x, *(s.clone() for s in bn_stats), training=True)),
        "dropout": (lambda: F.dropout(x, 0.0), lambda: TF.dropout(x, 0.0)),
        "dropout_add_layer_norm": (lambda: F.dropout_add_layer_norm(x, r, w, b, 0.0)[0],
                                   lambda: TF.layer_norm(r + TF.dropout(x, 0.0), (D,), w, b)),
        "embedding": (lambda: F.embedding(ids, word), lambda: TF.embedding(ids, word)),
        "bert_embeddings": (
            lambda: F.bert_embeddings(ids, None, None, word, pos, typ, w, b, 1e-12, 0.0, False),
            lambda: TF.layer_norm(TF.embedding(ids, word) + pos[:6] + typ[0], (D,), w, b, 1e-12)),
        "attention": (lambda: F.scaled_dot_product_attention(q, k, v),
                      lambda: TF.scaled_dot_product_attention(q, k, v)),
        "attention_float_mask": (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                 lambda: TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
        "attention_fp16_mask": (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask.half()),
                                lambda: TF.scaled_dot_product_attention(q, k, v, attn_mask=mask.half())),
    }


def _module_pair(name):
    torch_cls = {"MultiheadAttention": torch.nn.MultiheadAttention,
                 "TransformerEncoderLayer": torch.nn.TransformerEncoderLayer,
                 "LayerNorm": torch.nn.LayerNorm}[name]
    args = {"MultiheadAttention": (D, 2), "TransformerEncoderLayer": (D, 2, 24), "LayerNorm": (D,)}[name]
    kwargs = {} if name == "LayerNorm" else {"dropout": 0.0, "batch_first": True}
    reference = torch_cls(*args, **kwargs).train()
    ours = getattr(fnn, name)(*args, **kwargs).train()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 6, D)
    if name == "MultiheadAttention":
        return ((lambda: ours(x, x, x, need_weights=False)[0]),
                (lambda: reference(x, x, x, need_weights=False)[0]))
    return (lambda: ours(x)), (lambda: reference(x))


def _compare(ours, reference, device_type, dtype):
    with torch.autocast(device_type, dtype=dtype):
        want = reference()
        got = ours()
    assert got.dtype == want.dtype, f"fastdl gives {got.dtype}, torch {want.dtype}"
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend_name", ["torch", "auto"])
@pytest.mark.parametrize("case", sorted(_function_cases()))
def test_cpu_autocast_functions(backend_name, case):
    ours, reference = _function_cases()[case]
    with fastdl.backend.use(backend_name):
        _compare(ours, reference, "cpu", torch.bfloat16)


@pytest.mark.parametrize("backend_name", ["torch", "auto"])
@pytest.mark.parametrize("name", ["LayerNorm", "MultiheadAttention", "TransformerEncoderLayer"])
def test_cpu_autocast_modules(backend_name, name):
    ours, reference = _module_pair(name)
    with fastdl.backend.use(backend_name):
        _compare(ours, reference, "cpu", torch.bfloat16)


@pytest.mark.parametrize("backend_name", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_encoder_layer_in_inference_keeps_float32(backend_name, dtype):
    """README, "Autocast": in evaluation without grad, torch's encoder layer takes its fused fast
    path under CPU autocast (its check looks at CUDA autocast only) and returns the autocast dtype;
    fastdl's returns float32, as torch's layer does with grad, and is closer to float64 math."""
    torch.manual_seed(0)
    reference = torch.nn.TransformerEncoderLayer(D, 2, 24, dropout=0.0, batch_first=True).eval()
    ours = fnn.TransformerEncoderLayer(D, 2, 24, dropout=0.0, batch_first=True).eval()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        want = copy.deepcopy(reference).double()(x.double())
        with fastdl.backend.use(backend_name), torch.autocast("cpu", dtype=dtype):
            theirs, got = reference(x), ours(x)
    assert theirs.dtype == dtype and got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= (theirs.double() - want).abs().max()
    with fastdl.backend.use(backend_name), torch.autocast("cpu", dtype=dtype):
        assert reference(x).dtype == ours(x).dtype == torch.float32  # with grad: torch's own path


@needs_torch_linear_cross_entropy_loss
@pytest.mark.parametrize("backend_name", ["torch", "auto"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_cpu_autocast_linear_cross_entropy_with_mixed_dtypes(backend_name, dtypes):
    """Under autocast torch's LinearCrossEntropyLoss takes a hidden and a weight of different
    dtypes (autocast casts both); so does fastdl's, as does BERT's MLM head, whose LayerNorm
    returns bfloat16 on CPU."""
    reference = torch.nn.LinearCrossEntropyLoss(D, 11)
    ours = fnn.LinearCrossEntropyLoss(D, 11)
    ours.load_state_dict(reference.state_dict())
    hidden_dtype, weight_dtype = dtypes
    reference.to(weight_dtype), ours.to(weight_dtype)
    h, t = torch.randn(6, D, dtype=hidden_dtype), torch.randint(0, 11, (6,))
    with fastdl.backend.use(backend_name):
        _compare(lambda: ours(h, t), lambda: reference(h, t), "cpu", torch.bfloat16)


@pytest.mark.parametrize("backend_name", ["torch", "auto"])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masks", ["attn_mask", "key_padding_mask", "both"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_autocast_mha_mask_in_the_other_low_dtype(backend_name, need_weights, masks, dtype):
    """torch's MultiheadAttention under autocast takes a float mask in the other low dtype (a
    bf16 mask under fp16 autocast): autocast casts it with SDPA's or baddbmm's arguments."""
    reference = torch.nn.MultiheadAttention(D, 2, dropout=0.0, batch_first=True)
    ours = fnn.MultiheadAttention(D, 2, dropout=0.0, batch_first=True)
    ours.load_state_dict(reference.state_dict())
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    x = torch.randn(2, 6, D)
    kwargs = dict(need_weights=need_weights)
    if masks != "key_padding_mask":
        kwargs["attn_mask"] = torch.randn(6, 6).to(other)
    if masks != "attn_mask":
        kwargs["key_padding_mask"] = torch.randn(2, 6).to(other)
    with fastdl.backend.use(backend_name):
        _compare(lambda: ours(x, x, x, **kwargs)[0], lambda: reference(x, x, x, **kwargs)[0], "cpu", dtype)


def _varlen_reference(q, k, v, cu_q, cu_k):
    """Per-sequence torch SDPA, packed back: what varlen_attention computes."""
    outs = []
    for i in range(cu_q.numel() - 1):
        qi, ki, vi = (t[a:b].transpose(0, 1) for t, a, b in
                      ((q, cu_q[i], cu_q[i + 1]), (k, cu_k[i], cu_k[i + 1]), (v, cu_k[i], cu_k[i + 1])))
        outs.append(TF.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("backend_name", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k_dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_varlen_attention(backend_name, dtype, k_dtype):
    """varlen_attention runs in the autocast dtype, as torch's SDPA over each sequence does, also
    with q, k, v of different float dtypes (autocast casts them all). float16 autocast runs the
    interpreted kernel on ``auto``."""
    cu_q, cu_k = torch.tensor([0, 5, 7]), torch.tensor([0, 3, 9])
    q, k, v = torch.randn(7, 2, D), torch.randn(9, 2, D, dtype=k_dtype), torch.randn(9, 2, D)
    with fastdl.backend.use(backend_name):
        _compare(lambda: F.varlen_attention(q, k, v, cu_q, cu_k, 5, 6),
                 lambda: _varlen_reference(q, k, v, cu_q, cu_k), "cpu", dtype)


def test_float32_mask_with_low_precision_query_outside_autocast():
    """torch takes a float32 additive mask whatever the query's float dtype; so does fastdl."""
    q = torch.randn(2, 2, 6, D, dtype=torch.bfloat16)
    mask = torch.randn(6, 6)
    got = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    want = TF.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["layer_norm", "rms_norm", "dropout_add_layer_norm", "attention",
                                  "attention_float_mask", "bert_embeddings"])
def test_cuda_autocast_functions(case):
    torch.set_default_device("cuda")
    try:
        ours, reference = _function_cases()[case]
        _compare(ours, reference, "cuda", torch.float16)
    finally:
        torch.set_default_device("cpu")
