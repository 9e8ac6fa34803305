"""fastdl.integrations.transformers: attn_implementation="fastdl" gives the outputs and gradients
of the model's own sdpa path (run in float64 as the reference) on padded, causal, sliding-window
and position-bias models built from tiny configs, in float32 on each backend and under CPU bf16
autocast; the mask builder is registered with the attention function."""

import copy

import pytest
import torch
from helpers import LOW_PRECISION_FLOOR, assert_close, rel_error

import fastdl
import fastdl.integrations.transformers as fastdl_hf

transformers = pytest.importorskip("transformers")

RTOL = 1e-4
TEXT = dict(vocab_size=99, max_position_embeddings=32)
BERT_LIKE = dict(TEXT, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
DECODER = dict(TEXT, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2)  # grouped-query attention
IMAGE = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
             intermediate_size=37)


def config(name):
    t = transformers
    return {
        "bert": lambda: t.BertConfig(**BERT_LIKE),
        "roberta": lambda: t.RobertaConfig(**BERT_LIKE, pad_token_id=1),
        "distilbert": lambda: t.DistilBertConfig(vocab_size=99, dim=32, n_layers=1, n_heads=4, hidden_dim=37,
                                                 max_position_embeddings=32),
        "vit": lambda: t.ViTConfig(**IMAGE),
        "deit": lambda: t.DeiTConfig(**IMAGE),
        "gpt2": lambda: t.GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4, n_positions=32),
        "llama": lambda: t.LlamaConfig(**DECODER),
        "mistral-sliding": lambda: t.MistralConfig(**DECODER, sliding_window=4),
        "t5": lambda: t.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0),
    }[name]()


MODELS = ["bert", "roberta", "distilbert", "vit", "deit", "gpt2", "llama", "mistral-sliding", "t5"]


def inputs(name, device):
    """Keyword inputs (fixed seed, the same on every call) and a (B, S) 0/1 weight of the output
    positions that are real tokens (padded positions hold unspecified values)."""
    g = torch.Generator().manual_seed(3)
    if name in ("vit", "deit"):
        pixels = torch.randn(2, 3, 16, 16, generator=g)
        return dict(pixel_values=pixels.to(device)), None
    ids = torch.randint(2, 99, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if name in ("gpt2", "llama", "mistral-sliding"):
        mask[1, :3] = 0  # left padding, as for generation
    else:
        mask[1, 6:] = 0
        mask[2, 8:] = 0
    kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device))
    if name == "t5":
        kwargs["decoder_input_ids"] = torch.randint(2, 99, (3, 7), generator=g).to(device)
        return kwargs, None  # the decoder's outputs: no padding there
    return kwargs, mask


def build(name):
    """(the model on fastdl's attention built through from_config, its float64 sdpa twin)."""
    fastdl_hf.register()
    cfg = config(name)
    reference = transformers.AutoModel.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    with torch.no_grad():  # non-trivial norm weights and biases
        for p in reference.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model = transformers.AutoModel.from_config(cfg, attn_implementation="fastdl")
    model.load_state_dict(reference.state_dict())
    assert model.config._attn_implementation == "fastdl"
    return model.eval(), reference.double().eval()


def run(model, name, device, autocast=False):
    """(output, loss) of a weighted sum of the real positions of ``last_hidden_state``."""
    kwargs, mask = inputs(name, device)
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**kwargs).last_hidden_state
    else:
        out = model(**kwargs).last_hidden_state
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape).to(out.dtype)
    if mask is not None:
        weights = weights * mask.to(device)[..., None]
        out = out * mask.to(device)[..., None]
    return out, (out * weights).sum()


@pytest.mark.parametrize("name", MODELS)
def test_matches_the_models_sdpa(name, backend, device, attention_masks):
    model, reference = build(name)
    model.to(device)
    out, loss = run(model, name, device)
    ref_out, ref_loss = run(reference, name, "cpu")
    assert_close("last_hidden_state", out.cpu(), ref_out, rtol=RTOL)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        ref_grad = ref_params[pname].grad
        if ref_grad is None or ref_grad.abs().max() < 1e-9:
            continue  # unused (a pooler), or mathematically zero (a key bias under softmax)
        assert_close(f"grad {pname}", p.grad.cpu(), ref_grad, rtol=RTOL)
    assert attention_masks, "fastdl's attention did not run"
    if name not in ("vit", "deit"):  # padded (or windowed, or biased) batches: a mask reaches the kernel
        assert any(m is not None for m in attention_masks)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_error_is_sdpa_s(name):
    """Under CPU bf16 autocast the error against float64 is within 3x that of the model's own sdpa
    path under the same autocast (auto backend: kernels where they take bf16, else torch)."""
    model, reference = build(name)
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    out, loss = run(model, name, "cpu", autocast=True)
    base_out, base_loss = run(sdpa, name, "cpu", autocast=True)
    ref_out, ref_loss = run(reference, name, "cpu")
    assert out.dtype == base_out.dtype
    floor = LOW_PRECISION_FLOOR[torch.bfloat16]
    assert rel_error(out, ref_out) <= 3 * rel_error(base_out, ref_out) + floor
    for tensor in (loss, base_loss, ref_loss):
        tensor.backward()
    sdpa_params, ref_params = dict(sdpa.named_parameters()), dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        ref_grad = ref_params[pname].grad
        if ref_grad is None or ref_grad.abs().max() < 1e-9:
            continue
        ours, base = rel_error(p.grad, ref_grad), rel_error(sdpa_params[pname].grad, ref_grad)
        assert ours <= 3 * base + 10 * floor, (pname, ours, base)


def test_register_adds_attention_and_mask_builder(tmp_path):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert fastdl_hf.register() == "fastdl" and fastdl_hf.is_registered()
    assert AttentionInterface._global_mapping["fastdl"] is fastdl_hf.attention_forward
    assert AttentionMaskInterface._global_mapping["fastdl"] is sdpa_mask
    # The documented route: from_pretrained(..., attn_implementation="fastdl").
    transformers.BertModel(config("bert")).save_pretrained(tmp_path)
    model = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="fastdl")
    assert model.config._attn_implementation == "fastdl"


def test_float_bias_under_autocast_takes_the_query_dtype():
    """T5's position bias is float32 while autocast makes the queries bf16; the bias is cast."""
    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = torch.randn(3, 2, 4, 5, 8, dtype=torch.bfloat16)
    bias = torch.randn(1, 4, 5, 5)
    with fastdl.backend.use("torch"):
        out, _ = fastdl_hf.attention_forward(module, q, k, v, None, position_bias=bias)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                           attn_mask=bias.double())
    assert out.dtype == torch.bfloat16
    assert rel_error(out.transpose(1, 2), ref) < 2e-2


def test_supports_attention():
    bert = transformers.BertModel(config("bert"))
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                depths=[1, 1]))
    assert fastdl_hf.supports_attention(bert) is None
    assert "no attention" in fastdl_hf.supports_attention(resnet)


def test_supports_attention_refuses_models_sdpa_does_not_cover():
    """A model transformers keeps off sdpa (GPT-OSS: attention sinks), or whose code computes
    differently when the implementation is named "sdpa" (DeepSeek-V3.2 folds its top-k key
    selection into the mask for eager and sdpa alone), is left on its own attention: under
    "fastdl" it would silently compute something else."""
    t = transformers
    gpt_oss = t.GptOssModel(t.GptOssConfig(
        vocab_size=99, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
        max_position_embeddings=32))
    assert "not supporting sdpa" in fastdl_hf.supports_attention(gpt_oss)
    deepseek = t.DeepseekV32Model(t.DeepseekV32Config(
        vocab_size=99, hidden_size=32, intermediate_size=37, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=2, n_group=1,
        topk_group=1, num_experts_per_tok=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        v_head_dim=8, qk_nope_head_dim=8, head_dim=8, index_topk=3, index_head_dim=8, index_n_heads=2,
        first_k_dense_replace=1, max_position_embeddings=32))
    assert "modeling_deepseek_v32.py" in fastdl_hf.supports_attention(deepseek)
    patched, report = fastdl.patch(copy.deepcopy(deepseek).eval(), report=True)
    assert patched.config._attn_implementation == deepseek.config._attn_implementation
    assert any("attention not routed" in e.detail for e in report.left)
    ids = torch.randint(2, 99, (2, 10))  # more tokens than index_topk: the selection matters
    with torch.no_grad(), fastdl.backend.use("torch"):
        assert_close("deepseek", patched(input_ids=ids).last_hidden_state,
                     deepseek.eval()(input_ids=ids).last_hidden_state, rtol=1e-6)


@pytest.mark.parametrize("name", ["s_aux", "sinks", "indices", "block_indices", "softcap"])
def test_arguments_the_kernel_cannot_compute_raise(name):
    module = torch.nn.Module()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=name):
        fastdl_hf.attention_forward(module, q, q, q, None, **{name: torch.randn(2)})


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_output_attentions_returns_eager_weights(name, backend, device):
    """A model switched from eager (the implementation that returns attention weights) keeps
    returning them: output_attentions=True gives eager's weights, outputs and gradients."""
    cfg = config(name)
    eager = transformers.AutoModel.from_config(copy.deepcopy(cfg), attn_implementation="eager")
    eager = eager.to(device).eval()
    patched = fastdl.patch(copy.deepcopy(eager))
    assert patched.config._attn_implementation == "fastdl"
    eager = eager.double()  # the reference: eager attention in float64
    kwargs, _ = inputs(name, device)
    kwargs["attention_mask"] = torch.ones_like(kwargs["attention_mask"])  # eager averages padded rows
    with fastdl.backend.use(backend):
        got = patched(**kwargs, output_attentions=True)
    want = eager(**kwargs, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == cfg.num_hidden_layers
    for g, w in zip(got.attentions, want.attentions):
        assert_close("attention weights", g, w.float(), rtol=RTOL)
    assert_close("output", got.last_hidden_state, want.last_hidden_state.float(), rtol=RTOL)
    def loss(out):  # random weights: a plain sum of squares of a LayerNorm output is nearly constant
        g = torch.Generator().manual_seed(1)
        return sum((t * torch.randn(t.shape, generator=g).to(device, t.dtype)).sum()
                   for t in (out.last_hidden_state, *out.attentions))

    grads_got = torch.autograd.grad(loss(got), list(patched.parameters()), allow_unused=True)
    grads_want = torch.autograd.grad(loss(want), list(eager.parameters()), allow_unused=True)
    for (n, _), g, w in zip(patched.named_parameters(), grads_got, grads_want):
        if w is not None and w.abs().max() > 1e-6:  # the key bias's gradient is 0 up to rounding
            assert_close(f"grad {n}", g, w.to(g.dtype), rtol=RTOL)


def test_batch_one_queries_against_a_batched_mask():
    """Learned queries with batch 1 against batch-B keys and mask, as transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    module = torch.nn.Module()
    module.is_causal = False
    q = torch.randn(1, 4, 3, 8, dtype=torch.float64)
    k, v = torch.randn(2, 4, 5, 8, dtype=torch.float64), torch.randn(2, 4, 5, 8, dtype=torch.float64)
    mask = torch.rand(2, 1, 3, 5) > 0.3
    got, _ = fastdl_hf.attention_forward(module, q, k, v, mask)
    want, _ = sdpa_attention_forward(module, q, k, v, mask)
    assert got.shape == want.shape == (2, 3, 4, 8)
    assert_close("output", got, want, rtol=1e-12)


@pytest.mark.parametrize("name,field", [("bert", "attention_probs_dropout_prob"),
                                        ("llama", "attention_dropout")])
def test_attention_dropout_reaches_the_kernel_in_training_only(name, field, attention_dropout):
    """The model's attention dropout is applied in train mode (as sdpa's: dropout_p = the
    config's probability) and not in eval; the outputs of two training calls differ."""
    fastdl_hf.register()
    cfg = config(name)
    setattr(cfg, field, 0.5)
    if name == "bert":
        cfg.hidden_dropout_prob = 0.0
    model = transformers.AutoModel.from_config(cfg, attn_implementation="fastdl")
    probs = attention_dropout
    kwargs, _ = inputs(name, "cpu")
    model.eval()
    ref = model(**kwargs).last_hidden_state
    assert probs and set(probs) == {0.0}
    probs.clear()
    model.train()
    a, b = model(**kwargs).last_hidden_state, model(**kwargs).last_hidden_state
    assert probs and set(probs) == {0.5}
    assert not torch.allclose(a, b) and not torch.allclose(a, ref)
