"""fastdl's ops as PyTorch operators: ``opcheck``, ``torch.compile(fullgraph=True)``, ``torch.export``.

Every public function is a ``torch.ops.fastdl`` operator with a fake implementation and an
autograd formula; ``torch.library.opcheck`` checks the registrations on samples that cover masks,
GQA, dropout, padding_idx and running statistics. Compiled modules and models must trace into ONE
graph (``fullgraph=True`` raises on any graph break) and compute what eager computes, forward and
backward, on the torch and interpret backends. ``aot_eager`` runs fastdl's operators as eager
does, so dropout masks agree too; one Inductor run per model family (without dropout: Inductor
draws its own random numbers). Tiny sizes throughout.
"""

import copy
import os
import warnings

import pytest
import torch

import fastdl
import fastdl.nn as fnn
from fastdl.models import (BertConfig, BertForMaskedLM, BertModel, Seq2SeqTransformer, ViTConfig,
                           ViTForImageClassification, ViTModel)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles afresh (dynamo caches per code object, not per backend)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------

def _r(*shape, grad=True, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _opcheck_samples(requested: str):
    """(operator, args) pairs covering each op's options, each call carrying ``requested`` (the
    backend its implementation and autograd formula resolve)."""
    ops = torch.ops.fastdl
    ids = torch.randint(0, 11, (3, 5))
    ids[0, :2] = 2  # repeated and padding rows
    mask_bool = torch.rand(2, 1, 5, 7) > 0.3
    seed = torch.tensor([1234])
    yield ops.layer_norm, (_r(3, 5, 7), _r(7), _r(7), 1, 1e-5, requested)
    yield ops.layer_norm, (_r(3, 5, 7), None, None, 2, 1e-3, requested)
    yield ops.rms_norm, (_r(3, 5, 7), _r(7), 1, None, requested)
    yield ops.rms_norm, (_r(4, 6), None, 1, 1e-4, requested)
    yield ops.batch_norm, (_r(4, 3, 5), _r(3), _r(3), torch.randn(3), torch.rand(3) + 0.5, True, 0.1, 1e-5,
                           requested)
    yield ops.batch_norm, (_r(4, 3, 5), _r(3), None, torch.randn(3), torch.rand(3) + 0.5, False, 0.1, 1e-5,
                           requested)
    yield ops.batch_norm, (_r(4, 3, 2, 3).contiguous(memory_format=torch.channels_last), None, None,
                           None, None, True, 0.1, 1e-5, requested)
    yield ops.dropout, (_r(5, 7), 0.3, seed, requested)
    yield ops.dropout_add_layer_norm, (_r(3, 5, 8), _r(3, 5, 8), _r(8), _r(8), 0.2, 1e-5, seed, requested)
    yield ops.dropout_add_layer_norm, (_r(4, 8), None, None, None, 0.0, 1e-5, None, requested)
    yield ops.embedding, (ids, _r(11, 6), 2, False, False, requested)
    yield ops.embedding, (ids, _r(11, 6), -1, True, False, requested)
    yield ops.embedding_renorm_, (torch.randn(11, 6), ids, 1.0, 2.0)
    yield ops.bert_embeddings, (ids, torch.randint(0, 2, (3, 5)), torch.arange(5).expand(3, 5), _r(11, 8),
                                _r(9, 8), _r(2, 8), _r(8), _r(8), 1e-12, 0.1, seed, 0, requested)
    q, k, v = _r(2, 4, 5, 16), _r(2, 2, 7, 16), _r(2, 2, 7, 16)
    yield ops.scaled_dot_product_attention, (q, k, v, mask_bool, 0.0, False, None, True, None, requested)
    yield ops.scaled_dot_product_attention, (q, _r(2, 4, 7, 16), _r(2, 4, 7, 16), _r(5, 7), 0.0, False,
                                             0.3, False, None, requested)
    yield ops.scaled_dot_product_attention, (q, k, v, None, 0.2, True, None, True, seed, requested)
    cu_q, cu_k = torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 4, 6], dtype=torch.int32)
    yield ops.varlen_attention, (_r(8, 4, 16), _r(6, 2, 16), _r(6, 2, 16), cu_q, cu_k, 5, 4, 0.0, True, None,
                                 None, requested)
    yield ops.varlen_attention, (_r(8, 2, 16), _r(6, 2, 16), _r(6, 2, 16), cu_q, cu_k, 5, 4, 0.3, False, 0.2,
                                 seed, requested)


@pytest.mark.parametrize("index", range(19))
def test_opcheck(backend, device, index):
    if backend == "triton":
        pytest.skip("CPU samples")
    op, args = list(_opcheck_samples(backend))[index]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# torch.compile: one graph, eager's results
# ---------------------------------------------------------------------------------------------

def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def _assert_same(a, b, what, rtol=1e-5, atol=1e-6):
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None, f"{what}[{i}]: one is None"
            continue
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def check_compiled(module, *inputs, seed=0, compiler="aot_eager", rtol=1e-5):
    """module(*inputs) eagerly and compiled with fullgraph=True: same output, same gradients of
    the floating inputs and parameters (the module's state is copied for each run)."""
    results = []
    for compiled in (False, True):
        m = copy.deepcopy(module)
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        fn = torch.compile(m, backend=compiler, fullgraph=True) if compiled else m
        torch.manual_seed(seed)
        out = fn(*xs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out) / out.numel() ** 0.5)
        params = [x for x in xs if x.is_floating_point()] + list(m.parameters())
        results.append(([out.detach()] + _grads(params), [b.clone() for b in m.buffers()]))
    (eager, eager_buffers), (comp, comp_buffers) = results
    _assert_same(comp, eager, "output and gradients", rtol=rtol)
    _assert_same(comp_buffers, eager_buffers, "buffers", rtol=rtol)


class _MHA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = fnn.MultiheadAttention(16, 4, dropout=0.2, batch_first=True)

    def forward(self, x, padding):
        return self.attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]


def _module_cases():
    x = torch.randn(2, 5, 16)
    yield "LayerNorm", fnn.LayerNorm(16), (x,)
    yield "RMSNorm", fnn.RMSNorm([5, 16]), (x,)
    yield "BatchNorm1d", fnn.BatchNorm1d(5), (x,)
    yield "BatchNorm2d", fnn.BatchNorm2d(3).eval(), (torch.randn(2, 3, 4, 5),)
    yield "Dropout", fnn.Dropout(0.3), (x,)
    yield "Embedding", fnn.Embedding(10, 16, padding_idx=0, max_norm=1.5), (torch.randint(0, 10, (2, 5)),)
    yield "MultiheadAttention", _MHA(), (x, torch.tensor([[False] * 5, [False] * 3 + [True] * 2]))
    yield ("TransformerEncoderLayer", fnn.TransformerEncoderLayer(16, 2, 24, dropout=0.1, batch_first=True),
           (x,))


@pytest.mark.parametrize("case", [c[0] for c in _module_cases()])
def test_compile_modules(backend, device, case):
    if backend == "triton":
        pytest.skip("CPU")
    _, module, inputs = next(c for c in _module_cases() if c[0] == case)
    check_compiled(module, *inputs)


class _Transformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = fnn.Transformer(16, 2, 1, 1, 24, dropout=0.1, batch_first=True)

    def forward(self, src, tgt):
        mask = fnn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.model(src, tgt, tgt_mask=mask)  # causality detected from the mask in eager


def test_compile_transformer_and_seq2seq(backend, device):
    if backend == "triton":
        pytest.skip("CPU")
    check_compiled(_Transformer(), torch.randn(2, 6, 16), torch.randn(2, 5, 16), rtol=1e-4)
    s2s = Seq2SeqTransformer(20, 20, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                             dim_feedforward=24, max_len=16)
    src, tgt = torch.randint(1, 20, (2, 6)), torch.randint(1, 20, (2, 5))
    src[1, 4:] = 0  # padding
    check_compiled(s2s, src, tgt, rtol=1e-4)


def _bert_config(dropout, unpad=False):
    # unpad=False: eager and compiled runs take the same (padded) path, so their dropout masks
    # match; the automatic choice under compile is tested on its own below.
    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout, unpad=unpad)


def _vit_config(dropout):
    return ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=3, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)


def _training_steps(model, batch, compiler, steps=2):
    """Losses and final parameters of ``steps`` SGD steps, eager or compiled: the model's
    forward (and loss) and the optimizer step each compile to one graph; the backward is
    AOTAutograd's compiled backward."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    forward, step = model, opt.step
    if compiler is not None:
        forward = torch.compile(model, backend=compiler, fullgraph=True)
        step = torch.compile(opt.step, backend=compiler)  # torch.optim breaks its own graph (no_grad)
    losses = []
    torch.manual_seed(7)
    for _ in range(steps):
        loss = forward(**batch).loss
        loss.backward()
        step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses + [p.detach().clone() for p in model.parameters()]


def _mlm_batch():
    ids = torch.randint(1, 50, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.where(torch.rand(2, 8) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _image_batch():
    return dict(pixel_values=torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 2]))


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_compile_training_step(backend, device, family):
    if backend == "triton":
        pytest.skip("CPU")
    make, cfg, batch = ((BertForMaskedLM, _bert_config, _mlm_batch) if family == "bert"
                        else (ViTForImageClassification, _vit_config, _image_batch))
    model, batch = make(cfg(0.1)), batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same(_training_steps(model, batch, "aot_eager"), _training_steps(model, batch, None),
                     "losses and parameters", rtol=1e-4, atol=1e-5)


def test_compiled_bert_takes_the_padded_path_with_the_same_real_tokens(backend, device):
    """Default config (unpad automatic): eager unpads on the kernel path, a compiled model keeps
    the padded path in one graph; the real tokens' outputs and the MLM loss agree."""
    if backend == "triton":
        pytest.skip("CPU")
    torch.manual_seed(0)
    model = BertForMaskedLM(_bert_config(0.0, unpad=None)).eval()
    batch = _mlm_batch()
    batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    explanation = torch._dynamo.explain(model)(**batch)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    eager = model(**batch)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(compiled.logits[real], eager.logits[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "vit"])
def test_compile_training_step_inductor(family):
    """One Inductor compile per model family (torch backend: CPU code generation is slow enough)."""
    make, cfg, batch = ((BertForMaskedLM, _bert_config, _mlm_batch) if family == "bert"
                        else (ViTForImageClassification, _vit_config, _image_batch))
    model, batch = make(cfg(0.0)), batch()
    with fastdl.backend.use("torch"):
        _assert_same(_training_steps(model, batch, "inductor"), _training_steps(model, batch, None),
                     "losses and parameters", rtol=1e-4, atol=1e-5)


transformers = pytest.importorskip("transformers")


def test_compile_patched_hf_bert_has_one_graph(backend, device):
    if backend == "triton":
        pytest.skip("CPU")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = fastdl.patch(transformers.BertModel(config).eval())
    batch = _mlm_batch()
    del batch["labels"]
    explanation = torch._dynamo.explain(model)(**batch)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(**batch).last_hidden_state, model(**batch).last_hidden_state)


# ---------------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------------

def _fastdl_ops(graph_module) -> set[str]:
    return {str(n.target).split(".")[1] for n in graph_module.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("fastdl.")}


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_export(backend, device, family):
    if backend == "triton":
        pytest.skip("CPU")
    if family == "bert":
        model, batch = BertModel(_bert_config(0.1)).eval(), _mlm_batch()
        del batch["labels"]
        expected = {"bert_embeddings", "dropout_add_layer_norm", "scaled_dot_product_attention"}
    else:
        model, batch = ViTModel(_vit_config(0.1)).eval(), _image_batch()
        del batch["labels"]
        expected = {"layer_norm", "scaled_dot_product_attention"}
    exported = torch.export.export(model, (), batch)
    assert expected <= _fastdl_ops(exported.graph_module), _fastdl_ops(exported.graph_module)
    got = exported.module()(**batch)
    want = model(**batch)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)



def test_export_of_a_bert_forced_to_unpad_raises_clearly():
    """unpad=True needs the number of real tokens on the host: export says so (and what to use)
    instead of failing deep in the tracer; the default unpad=None exports the padded path."""
    config = _bert_config(0.1)
    batch = _mlm_batch()
    del batch["labels"]
    config.unpad = True
    with pytest.raises(ValueError, match="unpad=None"):
        torch.export.export(BertModel(config).eval(), (), batch)

# ---------------------------------------------------------------------------------------------
# Inductor's on-disk caches and the backend
# ---------------------------------------------------------------------------------------------

_CACHED_STEP = """
import torch, torch.nn.functional as TF
import fastdl.functional as F
torch.manual_seed(0)
x, w, scale = torch.randn(4, 16), torch.randn(16), torch.arange(16.0)
f = torch.compile(lambda x, w: (F.rms_norm(x, (16,), w) * scale).sum(), fullgraph=True)
ours = x.clone().requires_grad_()
f(ours, w).backward()
ref = x.double().requires_grad_()
(TF.rms_norm(ref, (16,), w.double()) * scale.double()).sum().backward()
print((ours.grad.double() - ref.grad).abs().max().item())
"""


def test_processes_on_other_backends_do_not_share_compiled_graphs(tmp_path):
    """A compiled backward bakes in the backend it was traced with. Two processes sharing
    Inductor's on-disk cache, one on the interpreted kernels and one on torch, each get their own
    graph (fastdl tags torch.compile's cache key with the backend) and the right gradient; sharing
    one graph would pair the torch forward with the kernels' backward."""
    import os
    import subprocess
    import sys
    if not fastdl.backend.triton_available():
        pytest.skip("needs Triton for the interpreted kernels")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1")
    for name in ("interpret", "torch"):
        run = subprocess.run([sys.executable, "-c", _CACHED_STEP], env=dict(env, FASTDL_BACKEND=name),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        assert float(run.stdout.split()[-1]) < 1e-4, f"{name}: gradient off by {run.stdout.split()[-1]}"


def test_use_tags_the_compile_cache_key():
    config = torch.compiler.config
    before = config.cache_key_tag
    with fastdl.backend.use("torch"):
        assert "fastdl-backend=torch" in config.cache_key_tag
        with fastdl.backend.use("auto"):
            assert "fastdl-backend=auto" in config.cache_key_tag
        assert "fastdl-backend=torch" in config.cache_key_tag
    assert config.cache_key_tag == before


def test_the_compile_cache_key_holds_the_source_fingerprint(tmp_path):
    """Graphs cached by another fastdl (other fake implementations, autograd formulas, kernels)
    are never loaded: the tag holds a hash of the package's source, which any edit changes."""
    import shutil
    assert fastdl.backend.source_fingerprint() in torch.compiler.config.cache_key_tag
    package = os.path.dirname(fastdl.__file__)
    copy_root = tmp_path / "fastdl"
    shutil.copytree(package, copy_root, ignore=shutil.ignore_patterns("__pycache__"))
    before = fastdl.backend.source_fingerprint((str(copy_root),))
    assert before == fastdl.backend.source_fingerprint((str(copy_root),))
    with open(copy_root / "functional" / "attention.py", "a") as f:
        f.write("\n# another version\n")
    assert fastdl.backend.source_fingerprint((str(copy_root),)) != before


# ---------------------------------------------------------------------------------------------
# One process, several backends: use() around a compiled function
# ---------------------------------------------------------------------------------------------

def test_use_around_a_compiled_function_retraces_it(monkeypatch):
    """A compiled graph's forward and backward run on the backend asked for when it was traced: a
    graph traced under one use() is traced again under another (it guards on use()), and one
    backend's forward is never paired with another's backward. Dropout shows a pairing: the kernels'
    mask differs from the torch path's, so the gradient would not match the output's zeros."""
    if not (fastdl.backend.triton_available() and fastdl.backend.interpreter_active()):
        pytest.skip("needs Triton's interpreter")
    import fastdl.functional as F
    kernels = fastdl.backend.kernels("dropout")
    launches = []
    real = kernels.dropout_fwd
    monkeypatch.setattr(kernels, "dropout_fwd", lambda *a: launches.append(1) or real(*a))
    p = 0.5
    step = torch.compile(lambda x: F.dropout(x, p) * 3.0, backend="aot_eager", fullgraph=True)

    def run(name, launched):
        before = len(launches)
        with fastdl.backend.use(name):
            x = torch.randn(64, 32, requires_grad=True)
            out = step(x)
            out.sum().backward()
        kept = (out != 0).float()
        assert 0.3 < kept.mean() < 0.7
        torch.testing.assert_close(x.grad, kept * 3.0 / (1 - p), msg=f"{name}: forward and backward masks")
        assert len(launches) - before == launched, f"{name}: {len(launches) - before} kernel launches"

    run("interpret", 2)  # the forward's mask and the backward's, on the kernel
    run("torch", 0)
    run("interpret", 2)
    run("torch", 0)


def test_the_compile_marker_is_torchs():
    """fastdl marks its trace-time constant as torch.compiler.assume_constant_result would (without
    importing torch._dynamo at import)."""
    marked = vars(torch.compiler.assume_constant_result(lambda: None))
    assert marked and all(getattr(fastdl.backend._requested_when_traced, k) == v for k, v in marked.items())


def test_fx_tracing_with_fastdl_modules_kept_whole():
    """The README's recipe: an FX tracer that keeps fastdl's modules whole traces a model holding
    them, and the traced graph computes the model's output."""
    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return type(m).__module__.startswith("fastdl.nn") or super().is_leaf_module(m, qualname)

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), fnn.LayerNorm(16), fnn.Dropout(0.1),
                                fnn.TransformerEncoderLayer(16, 2, 24, batch_first=True)).eval()
    traced = torch.fx.GraphModule(model, Leaves().trace(model))
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(traced(x), model(x))
