"""fastdl.patch: swaps torch.nn modules for fastdl's in place (sharing the weights) and routes a
Hugging Face model's attention through fastdl's kernel; outputs and parameter gradients stay
those of the unpatched model (compared in float64)."""

import copy

import pytest
import torch
from helpers import assert_close

import fastdl
from fastdl.patch import hf_attention

SWAPPED = {torch.nn.LayerNorm: "LayerNorm", torch.nn.RMSNorm: "RMSNorm", torch.nn.BatchNorm1d: "BatchNorm1d",
           torch.nn.BatchNorm2d: "BatchNorm2d", torch.nn.BatchNorm3d: "BatchNorm3d",
           torch.nn.Dropout: "Dropout", torch.nn.Embedding: "Embedding",
           torch.nn.MultiheadAttention: "MultiheadAttention"}
RTOL = 1e-4


def torch_modules(model):
    """Modules patch must swap: exactly one of the torch.nn types."""
    return [m for m in model.modules() if type(m) in SWAPPED]


def fastdl_modules(model):
    classes = tuple(getattr(fastdl.nn, name) for name in SWAPPED.values())
    return [m for m in model.modules() if isinstance(m, classes)]


def noisy(model):
    """Non-trivial LayerNorm/BatchNorm affine parameters and biases (fresh init hides swaps)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias") or p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def compare(patched, reference, run, device):
    """Run ``run(model, device)`` -> (outputs, loss) on both; compare outputs and the gradient
    of every parameter, the reference in float64 on the CPU."""
    out, loss = run(patched, device)
    ref_out, ref_loss = run(reference, "cpu")
    for i, (a, r) in enumerate(zip(out, ref_out)):
        assert_close(f"output {i}", a.cpu(), r, rtol=RTOL)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, p in patched.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None:
            assert p.grad is None or not p.grad.any(), name
        elif ref_grad.abs().max() < 1e-9:
            # Mathematically zero (a key bias under softmax, a bias before BatchNorm): rounding only.
            assert p.grad.abs().max() < 1e-5, name
        else:
            assert_close(f"grad {name}", p.grad.cpu(), ref_params[name].grad, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# A plain torch model
# ---------------------------------------------------------------------------------------------

class TokenNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(50, 16, padding_idx=0)
        self.attention = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = torch.nn.LayerNorm(16)
        self.rms = torch.nn.RMSNorm(16, eps=1e-6)
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(3)
        self.bn3 = torch.nn.BatchNorm3d(3)
        self.bn1 = torch.nn.BatchNorm1d(16, momentum=0.3)
        self.dropout = torch.nn.Dropout(0.25)
        self.head = torch.nn.Sequential(torch.nn.Linear(16, 5), self.dropout)  # one Dropout, two places

    def forward(self, tokens):
        x = self.embedding(tokens)
        a, _ = self.attention(x, x, x, key_padding_mask=tokens == 0, need_weights=False)
        x = self.rms(self.norm(x + self.dropout(a)))
        x = self.conv(x.unsqueeze(1))                                # (B, 3, S, 16)
        x = (self.bn2(x) + self.bn3(x.unsqueeze(2)).squeeze(2)).mean(1)  # (B, S, 16)
        x = self.bn1(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x).mean(1)


def run_token_net(model, device):
    tokens = torch.tensor([[3, 7, 9, 11, 2, 0, 0], [5, 1, 8, 4, 6, 12, 13], [9, 9, 2, 0, 0, 0, 0]])
    out = model(tokens.to(device))
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
    return (out,), (out * weights).sum()


def test_torch_model_eval(backend, device):
    model = noisy(TokenNet()).to(device).eval()
    reference = copy.deepcopy(model).double().cpu()
    before = torch_modules(model)
    assert fastdl.patch(model) is model
    assert not torch_modules(model)
    assert len(fastdl_modules(model)) == len(before) == 8
    assert model.head[1] is model.dropout
    compare(model, reference, run_token_net, device)


def test_torch_model_training_updates_batch_norm_statistics(backend, device):
    model = noisy(TokenNet()).to(device).train()
    model.dropout.p = 0.0  # dropout masks come from different random streams
    model.attention.dropout = 0.0
    reference = copy.deepcopy(model).double().cpu()
    fastdl.patch(model)
    assert model.training and all(m.training for m in model.modules())
    compare(model, reference, run_token_net, device)
    for name in ("bn1", "bn2", "bn3"):
        ours, ref = getattr(model, name), getattr(reference, name)
        assert_close(f"{name}.running_mean", ours.running_mean.cpu(), ref.running_mean, rtol=1e-5)
        assert_close(f"{name}.running_var", ours.running_var.cpu(), ref.running_var, rtol=1e-5)
        assert ours.num_batches_tracked.item() == 1


def test_patch_shares_tensors_keeps_hooks_and_is_idempotent(capsys):
    model = TokenNet()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    model.norm.register_forward_hook(lambda *args: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fastdl.patch(model)
    assert list(model.parameters()) == params and all(a is b for a, b in zip(model.parameters(), params))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert type(model.attention) is fastdl.nn.MultiheadAttention
    assert type(model.embedding) is fastdl.nn.Embedding and model.embedding.padding_idx == 0
    assert model.bn1.momentum == 0.3 and model.rms.eps == 1e-6 and model.dropout.p == 0.25
    model.eval()
    with fastdl.backend.use("torch"):
        model(torch.randint(1, 50, (2, 5))).sum().backward()
    assert calls == [1]
    optimizer.step()  # the optimizer built before patching updates the live weights
    assert not torch.equal(model.head[0].weight, state["head.0.weight"])
    swapped = fastdl_modules(model)
    fastdl.patch(model)
    assert all(a is b for a, b in zip(fastdl_modules(model), swapped))
    assert capsys.readouterr() == ("", "")


def test_patch_root_module_subclasses_and_bad_input():
    norm = torch.nn.LayerNorm(8, eps=1e-3, bias=False)
    swapped = fastdl.patch(norm)
    assert type(swapped) is fastdl.nn.LayerNorm and swapped.weight is norm.weight and swapped.bias is None

    class MyNorm(torch.nn.LayerNorm):  # may change forward: left alone
        pass

    model = torch.nn.Sequential(MyNorm(8), torch.nn.Dropout())
    fastdl.patch(model)
    assert type(model[0]) is MyNorm and type(model[1]) is fastdl.nn.Dropout
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastdl.patch(lambda x: x)


# ---------------------------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def hf_bert(cls=None, **overrides):
    kwargs = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=16, num_labels=3, attn_implementation="sdpa")
    kwargs.update(overrides)
    cls = cls or transformers.BertForSequenceClassification
    return noisy(cls(transformers.BertConfig(**kwargs))).eval()


def run_bert(model, device):
    ids = torch.randint(1, 99, (2, 8), generator=torch.Generator().manual_seed(1))  # same on both runs
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    out = model(ids.to(device), attention_mask=mask.to(device), labels=torch.tensor([2, 0], device=device))
    return (out.logits,), out.loss


def test_hf_bert_classifier(backend, device, attention_masks, capsys):
    model = hf_bert().to(device)
    reference = copy.deepcopy(model).double().cpu()
    reference.set_attn_implementation("eager")
    n_torch = len(torch_modules(model))
    assert fastdl.patch(model) is model
    assert model.config._attn_implementation == "fastdl"
    assert len(fastdl_modules(model)) == n_torch > 0 and not torch_modules(model)
    compare(model, reference, run_bert, device)
    assert len(attention_masks) == 1 and attention_masks[0] is not None  # one layer, padded batch
    assert capsys.readouterr().out == ""


def test_hf_masked_lm_keeps_tied_weights():
    model = hf_bert(transformers.BertForMaskedLM)
    fastdl.patch(model)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert isinstance(model.bert.embeddings.word_embeddings, fastdl.nn.Embedding)


def run_vit(model, device):
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))  # same on both runs
    out = model(pixels.to(device), labels=torch.tensor([1, 2], device=device))
    return (out.logits,), out.loss


def test_hf_vit_classifier(backend, device, attention_masks):
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, intermediate_size=37, num_labels=3)
    model = noisy(transformers.ViTForImageClassification(config)).eval().to(device)
    reference = copy.deepcopy(model).double().cpu()
    reference.set_attn_implementation("eager")
    n_torch = len(torch_modules(model))
    fastdl.patch(model)
    assert len(fastdl_modules(model)) == n_torch > 0
    compare(model, reference, run_vit, device)
    assert attention_masks == [None]  # no padding: no mask


def _sdpa_reference():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward


@pytest.mark.parametrize("case", ["padding", "causal", "gqa", "float-mask", "position-bias", "cross"])
def test_hf_attention_function_matches_transformers_sdpa(case):
    """hf_attention honours the contract of transformers' sdpa_attention_forward."""
    torch.manual_seed(0)
    b, h, lq, lk, d = 2, 4, 5, 5, 8
    if case == "cross":
        lk = 7
    h_kv = 2 if case == "gqa" else h
    module = torch.nn.Module()
    module.is_causal = case in ("causal", "gqa")
    module.num_key_value_groups = h // h_kv
    q = torch.randn(b, h, lq, d, dtype=torch.float64)
    k, v = torch.randn(2, b, h_kv, lk, d, dtype=torch.float64)
    mask, kwargs = None, {}
    if case in ("padding", "cross"):
        mask = torch.ones(b, 1, lq, lk, dtype=torch.bool)
        mask[1, ..., 3:] = False
    if case == "float-mask":
        mask = torch.randn(b, 1, lq, lk, dtype=torch.float64)
    if case == "position-bias":
        kwargs["position_bias"] = torch.randn(1, h, lq, lk, dtype=torch.float64)
        module.is_causal = True
    with fastdl.backend.use("torch"):
        out, weights = hf_attention(module, q, k, v, mask, scaling=0.3, **kwargs)
    ref, _ = _sdpa_reference()(module, q, k, v, mask, scaling=0.3, **kwargs)
    assert weights is None and out.shape == (b, lq, h, d)
    assert_close("attention", out, ref, rtol=1e-10)
    with pytest.raises(ValueError, match="softcap"):
        hf_attention(module, q, k, v, mask, softcap=30.0)


# ---------------------------------------------------------------------------------------------
# Model-specific norms, the report, models without attention
# ---------------------------------------------------------------------------------------------

def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attn_implementation="sdpa")
    return noisy(transformers.LlamaForCausalLM(config)).eval()


def run_causal_lm(model, device):
    ids = torch.randint(1, 99, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    out = model(ids.to(device), attention_mask=mask.to(device))
    logits = out.logits * mask.to(device)[..., None]  # padded positions hold unspecified values
    weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype, device=device).view(logits.shape)
    return (logits,), (logits * weights).sum()


def test_llama_rms_norms_are_swapped_and_reported(backend, device, attention_masks, capsys):
    model = tiny_llama().to(device)
    reference = copy.deepcopy(model).double().cpu()
    norms = [name for name, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5
    out, report = fastdl.patch(model, report=True, verbose=True)
    assert out is model and model.fastdl_patch_report is report
    assert not any(type(m).__name__ == "LlamaRMSNorm" for m in model.modules())
    swapped = {e.path: e for e in report.swapped}
    assert all(swapped[name].detail == "fastdl.nn.RMSNorm" for name in norms)
    rms = model.get_submodule(norms[0])
    assert rms.weight is dict(model.named_parameters())[norms[0] + ".weight"] and rms.eps == 1e-6
    assert [e.detail for e in report.attention] == ["attn_implementation sdpa -> fastdl"]
    assert not report.left
    table = capsys.readouterr().out
    assert "LlamaRMSNorm" in table and "fastdl.nn.RMSNorm" in table and " 5 " in table
    compare(model, reference, run_causal_lm, device)
    assert len(attention_masks) == 2


def test_t5_layer_norms_are_swapped():
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0)
    model = noisy(transformers.T5Model(config)).eval()
    n = sum(type(m).__name__ == "T5LayerNorm" for m in model.modules())
    keys = set(model.state_dict())
    reference = copy.deepcopy(model)
    fastdl.patch(model)
    assert n == 7 and len([e for e in model.fastdl_patch_report.swapped if e.module == "T5LayerNorm"]) == n
    assert set(model.state_dict()) == keys
    ids = torch.randint(2, 99, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.randint(2, 99, (2, 5)))
    for autocast in (False, True):  # the fp32 position bias meets bf16 queries under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, ref = model(**kwargs).last_hidden_state, reference(**kwargs).last_hidden_state
        assert_close(f"T5 (autocast {autocast})", out.float(), ref.float(), rtol=2e-2 if autocast else 1e-5)


def test_model_without_attention_keeps_its_implementation():
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    model = transformers.ResNetModel(config).eval()
    before = model.config._attn_implementation
    fastdl.patch(model)
    assert model.config._attn_implementation == before
    report = model.fastdl_patch_report
    assert not report.attention
    assert [e.detail for e in report.left] == ["attention not routed: it has no attention layers"]
    assert {e.module for e in report.swapped} == {"BatchNorm2d"}


class ShiftedNorm(torch.nn.Module):
    """A LayerNorm written by hand (the form many model files use)."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(n))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(n))
        self.epsilon = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.epsilon) * self.weight + self.bias


class OffsetRMSNorm(torch.nn.Module):
    """Scales by (1 + weight), as Gemma's norm: not an RMSNorm with this weight."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(0.1 * torch.randn(n))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def test_register_norm_swaps_after_a_self_check(monkeypatch):
    monkeypatch.setattr(fastdl.patch, "NORMS", dict(fastdl.patch.NORMS))
    fastdl.patch.register_norm(ShiftedNorm, "layer_norm", eps_attr="epsilon")
    fastdl.patch.register_norm("OffsetRMSNorm", "rms_norm")
    model = torch.nn.Sequential(ShiftedNorm(12, eps=1e-3), OffsetRMSNorm(12), torch.nn.Linear(12, 3))
    x = torch.randn(4, 12)
    expected = model(x)
    custom = model[0]
    fastdl.patch(model)
    assert isinstance(model[0], fastdl.nn.LayerNorm) and model[0].eps == 1e-3
    assert model[0].weight is custom.weight and model[0].bias is custom.bias
    assert model[0].epsilon == 1e-3  # the model's own attribute stays readable
    assert type(model[1]) is OffsetRMSNorm  # refused by the self-check
    (left,) = model.fastdl_patch_report.left
    assert left.path == "1" and "self-check" in left.detail and "RMSNorm" in left.detail
    with fastdl.backend.use("torch"):
        assert_close("patched", model(x), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        fastdl.patch.register_norm(ShiftedNorm, "batch_norm")


def test_left_modules_are_reported():
    class MyNorm(torch.nn.LayerNorm):
        pass

    class FancyNorm(torch.nn.Module):
        def forward(self, x):
            return x

    model = torch.nn.Sequential(MyNorm(8), FancyNorm(), torch.nn.ReLU())
    report = fastdl.patch(model, report=True)[1]
    reasons = {e.module: e.detail for e in report.left}
    assert set(reasons) == {"MyNorm", "FancyNorm"}
    assert "subclass of torch.nn.LayerNorm" in reasons["MyNorm"]
    assert "register_norm" in reasons["FancyNorm"]
    assert "2 modules left" in str(report)


def test_patch_module_is_reachable():
    import fastdl.patch as patch_module
    from fastdl.integrations.transformers import attention_forward

    assert patch_module is fastdl.patch and callable(fastdl.patch)
    assert fastdl.patch.hf_attention is attention_forward is hf_attention
    assert fastdl.patch.patch(torch.nn.Dropout()).__class__ is fastdl.nn.Dropout


@pytest.mark.parametrize("cls_name", ["T5LayerNorm", "LlamaRMSNorm"])
@pytest.mark.parametrize("weight_dtype,input_dtype", [
    (torch.float16, torch.float32), (torch.float32, torch.float16), (torch.bfloat16, torch.float32)])
def test_registered_norms_keep_the_models_dtype_rule(backend, device, cls_name, weight_dtype, input_dtype):
    """A model norm fed another dtype than its weight's returns what the model's class returns:
    T5 casts to a half-precision weight's dtype (a float16 T5 keeps its `wo` in float32, so its
    norms see float32), Llama promotes; torch's rule (the input's dtype) would break the next
    layer or change its precision."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    old = {"T5LayerNorm": T5LayerNorm, "LlamaRMSNorm": LlamaRMSNorm}[cls_name](24, eps=1e-6)
    with torch.no_grad():
        old.weight.normal_()
    old = old.to(device, weight_dtype)
    model = fastdl.patch(torch.nn.Sequential(old))
    assert isinstance(model[0], fastdl.nn.RMSNorm) and type(model[0]) is not type(old)
    x = torch.randn(3, 24, device=device).to(input_dtype)
    with fastdl.backend.use(backend):
        got = model[0](x)
    want = old(x)
    assert got.dtype == want.dtype
    assert_close("output", got.double(), want.double(), rtol=1e-2)
    same = torch.randn(3, 24, device=device).to(weight_dtype)  # the same dtype runs fastdl's norm
    with fastdl.backend.use(backend):
        torch.testing.assert_close(model[0](same).float(), old(same).float(), rtol=2e-2, atol=2e-2)


def test_float16_t5_checkpoint_runs_after_patch(tmp_path, backend, device):
    """T5 loaded in float16 keeps its `wo` projections in float32; after patch it still runs and
    gives the unpatched model's output."""
    cfg = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                relative_attention_num_buckets=8, decoder_start_token_id=0)
    transformers.T5Model(cfg).save_pretrained(tmp_path)
    model = transformers.T5Model.from_pretrained(tmp_path, dtype=torch.float16).to(device).eval()
    reference = copy.deepcopy(model)
    fastdl.patch(model)
    ids = torch.randint(2, 99, (2, 6), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), fastdl.backend.use("auto" if backend == "interpret" else backend):
        got = model(input_ids=ids, decoder_input_ids=ids).last_hidden_state
    want = reference(input_ids=ids, decoder_input_ids=ids).last_hidden_state
    assert got.dtype == want.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
