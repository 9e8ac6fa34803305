"""fastdl.models BERT against Hugging Face transformers (the independent reference): checkpoints
saved by ``save_pretrained`` load with ``from_pretrained`` (safetensors, .bin, sharded) or
convert with ``from_hf``; outputs, losses and parameter gradients match a float64 copy of the
Hugging Face model on padded batches."""

import copy
import json
import warnings

import pytest
import torch
from helpers import assert_close

import fastdl
from fastdl.models import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
)

transformers = pytest.importorskip("transformers")

PAIRS = {
    "BertModel": (transformers.BertModel, BertModel),
    "BertForMaskedLM": (transformers.BertForMaskedLM, BertForMaskedLM),
    "BertForPreTraining": (transformers.BertForPreTraining, BertForPreTraining),
    "BertForSequenceClassification": (transformers.BertForSequenceClassification,
                                      BertForSequenceClassification),
}
RTOL = 1e-4  # fp32 model vs the float64 reference


@pytest.fixture
def torch_path():
    with fastdl.backend.use("torch"):
        yield


def hf_config(**overrides):
    kwargs = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=24, type_vocab_size=3, num_labels=3,
                  hidden_act="gelu", attn_implementation="eager")
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def hf_model(name, **overrides):
    """A random Hugging Face model with non-trivial LayerNorm and bias values (fresh init has
    LayerNorm = 1/0 and biases = 0, which would hide a swapped weight and bias)."""
    model = PAIRS[name][0](hf_config(**overrides))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "LayerNorm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def batch(b=2, s=7, vocab=99, types=3, device="cpu"):
    """input_ids, attention_mask with padding (zeros) at the end of all rows but the first,
    token_type_ids."""
    ids = torch.randint(1, vocab, (b, s), device=device)
    mask = torch.ones(b, s, dtype=torch.long, device=device)
    for i in range(1, b):
        mask[i, s - 1 - (i * 2) % (s - 1):] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, torch.randint(0, types, (b, s), device=device)


def save(model, directory, weights="safetensors"):
    """``save_pretrained``; for "bin", rewrite the weights as the ``pytorch_model.bin`` of older
    releases (transformers 5 writes safetensors only)."""
    model.save_pretrained(directory)
    if weights == "bin":
        from safetensors.torch import load_file
        path = directory / "model.safetensors"
        torch.save(load_file(path), directory / "pytorch_model.bin")
        path.unlink()


def reference(model):
    """A float64 copy of a Hugging Face model (the independent reference)."""
    return copy.deepcopy(model).double().cpu()


def compare_outputs(ours, ref, mask=None):
    for key in ours.keys():
        a, r = ours[key], ref[key]
        if key in ("last_hidden_state", "logits", "prediction_logits") and mask is not None and a.dim() == 3:
            # Padded positions hold no meaning (0 in unpadded mode); compare the real tokens.
            a, r = a[mask.bool().to(a.device)], r[mask.bool().cpu()]
        assert_close(key, a.cpu(), r, rtol=RTOL)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_from_pretrained_matches_hf(torch_path, tmp_path, name, weights):
    hf = hf_model(name)
    save(hf, tmp_path, weights)
    ours, info = PAIRS[name][1].from_pretrained(tmp_path, output_loading_info=True)
    assert not info.missing_keys and not info.unexpected_keys and not info.newly_initialized
    assert not ours.training
    ids, mask, types = batch()
    compare_outputs(ours(ids, attention_mask=mask, token_type_ids=types),
                    reference(hf)(ids, attention_mask=mask, token_type_ids=types), mask)


def _grads_match_hf(ours, hf, inputs, labels, device):
    ref = reference(hf)
    ours_out = ours(*[t.to(device) for t in inputs], **{k: v.to(device) for k, v in labels.items()})
    ref_out = ref(*inputs, **labels)
    compare_outputs(ours_out, ref_out, inputs[1])
    ours_out.loss.backward()
    ref_out.loss.backward()
    ref_params = dict(ref.named_parameters())
    checked = 0
    for pname, p in ours.named_parameters():
        assert p.grad is not None, f"no gradient reached {pname}"
        ref_grad = ref_params[pname].grad
        if pname.endswith("attention.self.key.bias"):
            # Softmax ignores a shift shared by all keys: this gradient is zero up to rounding.
            assert p.grad.abs().max() < 1e-6 and ref_grad.abs().max() < 1e-12
        else:
            assert_close(f"grad {pname}", p.grad.cpu(), ref_grad, rtol=RTOL)
        checked += 1
    assert checked == len(ref_params)  # every Hugging Face parameter has its fastdl twin


def test_pretraining_loss_and_gradients_match_hf(backend, device):
    """MLM + next-sentence loss, and the gradient of every parameter (tied word embeddings
    included), on the torch path and through the kernels. Tiny: the interpreter is slow."""
    hf = hf_model("BertForPreTraining", num_hidden_layers=1)
    ours = BertForPreTraining.from_hf(hf).to(device)
    ids, mask, types = batch(b=2, s=8)
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = torch.randint(0, 99, (2, 3))
    _grads_match_hf(ours, hf, (ids, mask, types),
                    dict(labels=labels, next_sentence_label=torch.tensor([0, 1])), device)


def test_classifier_gradients_match_hf(backend, device):
    hf = hf_model("BertForSequenceClassification", num_hidden_layers=1)
    ours = BertForSequenceClassification.from_hf(hf).to(device)
    ids, mask, types = batch(b=2, s=8)
    _grads_match_hf(ours, hf, (ids, mask, types), dict(labels=torch.tensor([2, 0])), device)


@pytest.mark.parametrize("num_labels,labels", [
    (1, torch.tensor([0.5, -1.0, 2.0])),                                     # regression
    (3, torch.tensor([2, 0, 1])),                                            # single label
    (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),  # multi-label
])
def test_classification_losses_match_hf(torch_path, num_labels, labels):
    hf = hf_model("BertForSequenceClassification", num_labels=num_labels)
    ours = BertForSequenceClassification.from_hf(hf)
    ids, mask, types = batch(b=3)
    compare_outputs(ours(ids, mask, types, labels=labels), reference(hf)(ids, mask, types, labels=labels))



def test_problem_type_is_kept_from_the_first_call_as_hf(torch_path):
    """Hugging Face writes its first guess into config.problem_type: a later call with float
    labels is then still single-label (and fails as HF's does), not a BCE loss; a second model
    guessing from float labels first stays multi-label for integer labels too."""
    hf = hf_model("BertForSequenceClassification", num_labels=3)
    ours = BertForSequenceClassification.from_hf(hf)
    ids, mask, types = batch(b=3)
    ref = reference(hf)
    compare_outputs(ours(ids, mask, types, labels=torch.tensor([2, 0, 1])),
                    ref(ids, mask, types, labels=torch.tensor([2, 0, 1])))
    assert ours.config.problem_type == ref.config.problem_type == "single_label_classification"
    soft = torch.rand(3, 3)
    for model in (ours, ref):
        with pytest.raises((ValueError, RuntimeError)):
            model(ids, mask, types, labels=soft)
    hf2 = hf_model("BertForSequenceClassification", num_labels=3)
    ours2 = BertForSequenceClassification.from_hf(hf2)
    ref2 = reference(hf2)
    compare_outputs(ours2(ids, mask, types, labels=soft), ref2(ids, mask, types, labels=soft))
    hard = torch.nn.functional.one_hot(torch.tensor([1, 0, 2]), 3)  # int64, read as multi-label
    # (HF's BCE then refuses int64 targets; fastdl casts them, as for every other problem type.)
    compare_outputs(ours2(ids, mask, types, labels=hard), ref2(ids, mask, types, labels=hard.float()))
    assert ours2.config.problem_type == "multi_label_classification"

def test_masked_lm_loss_matches_hf(torch_path):
    hf = hf_model("BertForMaskedLM")
    ours = BertForMaskedLM.from_hf(hf)
    ids, mask, types = batch(b=3, s=9)
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    labels[0, 0] = 5
    out = ours(ids, mask, types, labels=labels)
    compare_outputs(out, reference(hf)(ids, mask, types, labels=labels))
    assert out.loss.dim() == 0


def test_masked_lm_fused_loss_without_logits(torch_path):
    """The loss (fused linear + cross-entropy over the labelled positions) and its gradients equal
    cross_entropy of the model's own logits; return_logits=False drops the logits only. (The
    kernel path is covered by tests/kernels/test_cross_entropy.py and the HF comparisons.)"""
    device = "cpu"
    ours = BertForMaskedLM.from_hf(hf_model("BertForMaskedLM")).to(device)
    params = list(ours.parameters())
    ids, mask, types = (t.to(device) for t in batch(b=3, s=9))
    labels = torch.where(torch.rand(ids.shape, device=device) < 0.3, ids, -100)
    labels[0, 0] = 5
    out = ours(ids, mask, types, labels=labels)
    ref_loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.reshape(-1))
    ref_grads = torch.autograd.grad(ref_loss, params)
    lean = ours(ids, mask, types, labels=labels, return_logits=False)
    assert lean.logits is None
    assert_close("loss", lean.loss, ref_loss, rtol=1e-5)
    for (name, _), g, ref in zip(ours.named_parameters(), torch.autograd.grad(lean.loss, params), ref_grads):
        if not name.endswith("attention.self.key.bias"):  # zero up to rounding (shift-invariant softmax)
            assert_close(f"grad {name}", g, ref, rtol=1e-4)
    with pytest.raises(ValueError, match="labels"):
        ours(ids, mask, types, labels=labels[:, :-1])


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForPreTraining"])
def test_mlm_labels_of_any_shape_with_one_entry_per_token(backend, device, name):
    """Hugging Face flattens the MLM labels (labels.view(-1)): (B, S), (B * S,) and (B, S, 1) give
    its loss on every backend, unpadded (which tests the labels against the mask) or not;
    another count raises ValueError naming labels."""
    hf = hf_model(name, num_hidden_layers=1)
    ours = PAIRS[name][1].from_hf(hf).to(device)
    ids, mask, types = batch(b=3, s=6)
    labels = torch.where(torch.rand(ids.shape) < 0.5, ids, -100).masked_fill(mask == 0, -100)
    labels[0, 0] = 5
    extra = {"next_sentence_label": torch.tensor([0, 1, 1])} if name == "BertForPreTraining" else {}
    expected = reference(hf)(ids, mask, types, labels=labels.reshape(-1), **extra).loss
    ids, mask, types = ids.to(device), mask.to(device), types.to(device)
    extra = {k: v.to(device) for k, v in extra.items()}
    for unpad in (None, True, False):
        ours.config.unpad = unpad
        for shape in ((3, 6), (18,), (3, 6, 1), (1, 18)):
            loss = ours(ids, mask, types, labels=labels.reshape(shape).to(device), **extra).loss
            assert_close(f"loss, unpad={unpad}, labels {shape}", loss.cpu(), expected, rtol=RTOL)
        for bad in (labels[:, :-1], labels.reshape(-1)[:-1], labels[None].expand(2, -1, -1)):
            with pytest.raises(ValueError, match="labels"):
                ours(ids, mask, types, labels=bad.to(device), **extra)


def test_unpadded_encoder_equals_padded(backend, device):
    """unpad=True (padding dropped after the embeddings, varlen attention, layout restored) gives
    the padded path's outputs and gradients at every real token; padded positions are 0."""
    hf = hf_model("BertForPreTraining")
    padded = BertForPreTraining.from_hf(hf).to(device)
    padded.config.unpad = False
    unpadded = copy.deepcopy(padded)
    unpadded.config.unpad = True
    ids, mask, types = (t.to(device) for t in batch(b=3, s=11))
    mask[2, 1:3] = 0  # holes inside a row, too (a padded first position is test_unpad_falls_back...)
    real = mask.bool()
    outs, grads = [], []
    for model in (padded, unpadded):
        out = model(ids, mask, types)
        hidden = model.bert(ids, mask, types).last_hidden_state
        weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0)).to(device)
        loss = (hidden[real] * weights[real]).sum() + (out.prediction_logits[real] ** 2).mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
        outs.append((hidden, out.prediction_logits))
    assert torch.equal(outs[1][0][~real], torch.zeros_like(outs[1][0][~real]))
    for a, b, name in zip(outs[0], outs[1], ("last_hidden_state", "prediction_logits")):
        assert_close(name, b[real], a[real], rtol=RTOL)
    for (name, _), g_padded, g_unpadded in zip(padded.named_parameters(), *grads):
        if not name.endswith("attention.self.key.bias"):  # zero up to rounding (shift-invariant softmax)
            assert_close(f"grad {name}", g_unpadded, g_padded, rtol=RTOL)


def test_unpad_falls_back_where_padding_is_read(backend, device, monkeypatch):
    """Unpadded mode returns zeros at padded positions, so it runs only where nothing reads them:
    with a padded first position under the pooler, or an MLM label (not -100) at a padded
    position, the automatic choice is the padded path -- pooler, NSP and MLM losses and gradients
    then equal Hugging Face's -- and an explicit unpad=True raises instead of answering otherwise."""
    hf = hf_model("BertForPreTraining")
    ids, mask, types = (t.to(device) for t in batch(b=3, s=11))
    labels = torch.where(torch.rand(ids.shape, device=device) < 0.5, ids, -100)
    nsp = torch.randint(0, 2, (3,), device=device)
    calls = []
    real_unpad = fastdl.models.bert.unpad_indices
    monkeypatch.setattr(fastdl.models.bert, "unpad_indices", lambda m: calls.append(1) or real_unpad(m))
    cases = {"padded first position": (mask.clone(), labels.masked_fill(mask == 0, -100)),
             "label at a padded position": (mask, labels.masked_fill(mask == 0, 5))}
    cases["padded first position"][0][2, :3] = 0
    for name, (m, lab) in cases.items():
        ours = BertForPreTraining.from_hf(hf).to(device)
        ref = reference(hf)
        loss = ours(ids, m, types, labels=lab, next_sentence_label=nsp).loss
        expected = ref(ids.cpu(), m.cpu(), types.cpu(), labels=lab.cpu(), next_sentence_label=nsp.cpu()).loss
        assert_close(f"{name}: loss", loss, expected, rtol=RTOL)
        loss.backward()
        expected.backward()
        for (pname, p), (_, r) in zip(ours.named_parameters(), ref.named_parameters()):
            if not pname.endswith("attention.self.key.bias"):  # zero up to rounding (softmax shift)
                assert_close(f"{name}: grad {pname}", p.grad, r.grad, rtol=1e-3)
        assert not calls, f"{name}: unpadded although a padded position is read"
        ours.config.unpad = True
        with pytest.raises(ValueError, match="unpad=True drops padded positions"):
            ours(ids, m, types, labels=lab, next_sentence_label=nsp)
    # Nothing read at the padding (labels -100 there, the first positions real): unpadded.
    ours = BertForPreTraining.from_hf(hf).to(device)
    ours(ids, mask, types, labels=labels.masked_fill(mask == 0, -100), next_sentence_label=nsp)
    assert calls == ([] if backend == "torch" else [1])


def test_unpadded_rows_without_tokens(backend, device, monkeypatch):
    """Unpadded mode (unpad=True on the torch path, the automatic choice on the kernels) on an
    attention_mask without a single token, and on a batch mixing an all-padding row with real
    ones: the call succeeds with the padded path's shapes, the encoder output is 0 at padded
    positions (as documented), and the real tokens' logits and the MLM loss equal the padded
    path's and Hugging Face's."""
    hf = hf_model("BertForMaskedLM", num_hidden_layers=1)
    padded = BertForMaskedLM.from_hf(hf).to(device)
    padded.config.unpad = False
    unpadded = BertForMaskedLM.from_hf(hf).to(device)
    unpadded.config.unpad = True if backend == "torch" else None
    calls = []
    real_unpad = fastdl.models.bert.unpad_indices
    monkeypatch.setattr(fastdl.models.bert, "unpad_indices", lambda m: calls.append(1) or real_unpad(m))
    ids, mask, types = batch(b=3, s=8)
    mask[1] = 0  # row 1: padding only; row 0 full, row 2 padded at the end
    ids = ids.masked_fill(mask == 0, 0)
    ids, mask, types = ids.to(device), mask.to(device), types.to(device)

    empty = torch.zeros_like(mask)
    out = unpadded(ids, empty, types)
    assert calls == [1]  # unpadded mode ran (no fallback to the padded path)
    assert out.logits.shape == padded(ids, empty, types).logits.shape == (3, 8, 99)
    hidden = unpadded.bert(ids, empty, types).last_hidden_state
    assert hidden.shape == (3, 8, 32) and torch.equal(hidden, torch.zeros_like(hidden))

    labels = torch.where(torch.rand(ids.shape, device=device) < 0.5, ids, -100).masked_fill(mask == 0, -100)
    labels[0, 0] = 7
    out = unpadded(ids, mask, types, labels=labels)
    assert len(calls) == 3
    real = mask.bool()
    expected = padded(ids, mask, types, labels=labels)
    hf_out = reference(hf)(ids.cpu(), mask.cpu(), types.cpu(), labels=labels.cpu())
    assert_close("logits vs the padded path", out.logits[real], expected.logits[real], rtol=RTOL)
    assert_close("logits vs Hugging Face", out.logits[real].cpu(), hf_out.logits[real.cpu()], rtol=RTOL)
    assert_close("loss vs Hugging Face", out.loss.cpu(), hf_out.loss, rtol=RTOL)


def test_from_hf_keeps_device_dtype_and_training_flag(torch_path):
    hf = hf_model("BertModel").train()
    ours = BertModel.from_hf(hf)
    assert ours.training
    hf16 = hf_model("BertModel").to(torch.bfloat16)
    assert BertModel.from_hf(hf16).pooler.dense.weight.dtype == torch.bfloat16


def test_sharded_and_legacy_checkpoints(torch_path, tmp_path):
    hf = hf_model("BertForPreTraining")
    ids, mask, types = batch()
    expected = reference(hf)(ids, mask, types)

    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    compare_outputs(BertForPreTraining.from_pretrained(sharded)(ids, mask, types), expected)

    # TensorFlow-converted checkpoints: LayerNorm gamma/beta, an explicit (tied) decoder
    # weight and the position_ids buffer.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in hf.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(24)[None]
    torch.save(state, legacy / "pytorch_model.bin")
    hf.config.to_json_file(legacy / "config.json")
    ours, info = BertForPreTraining.from_pretrained(legacy, output_loading_info=True)
    assert "cls.predictions.decoder.weight" in info.ignored_keys
    compare_outputs(ours(ids, mask, types), expected)


def test_backbone_from_checkpoint_with_heads_and_head_from_backbone(torch_path, tmp_path):
    hf = hf_model("BertForPreTraining")
    hf.save_pretrained(tmp_path / "pretraining")
    ids, mask, types = batch()
    base, info = BertModel.from_pretrained(tmp_path / "pretraining", output_loading_info=True)
    assert any(k.startswith("cls.") for k in info.ignored_keys)
    compare_outputs(base(ids, mask, types), reference(hf.bert)(ids, mask, types), mask)

    hf.bert.save_pretrained(tmp_path / "backbone")
    with pytest.warns(UserWarning, match="classifier.weight"):
        clf, info = BertForSequenceClassification.from_pretrained(tmp_path / "backbone", num_labels=4,
                                                                  output_loading_info=True)
    assert info.newly_initialized == ["classifier.bias", "classifier.weight"]
    assert clf.classifier.out_features == 4
    compare_outputs(clf.bert(ids, mask, types), reference(hf.bert)(ids, mask, types), mask)


def _edit_checkpoint(directory, edit):
    from safetensors.torch import load_file, save_file
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("bert.encoder.layer.1.attention.self.key.weight"),
     r"missing from the checkpoint: bert\.encoder\.layer\.1\.attention\.self\.key\.weight"),
    (lambda s: s.__setitem__("bert.encoder.layer.0.extra.weight", torch.zeros(3)),
     r"unexpected in the checkpoint: bert\.encoder\.layer\.0\.extra\.weight"),
    (lambda s: s.__setitem__("bert.pooler.dense.weight", torch.zeros(32, 31)),
     r"shape mismatch: bert\.pooler\.dense\.weight \(checkpoint \(32, 31\), model \(32, 32\)\)"),
])
def test_strict_loading_names_bad_keys(torch_path, tmp_path, edit, message):
    hf_model("BertForPreTraining").save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        BertForPreTraining.from_pretrained(tmp_path)


def test_non_strict_loading_warns(torch_path, tmp_path):
    hf_model("BertForPreTraining").save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, lambda s: s.pop("bert.pooler.dense.bias"))
    with pytest.warns(UserWarning, match="bert.pooler.dense.bias"):
        _, info = BertForPreTraining.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert info.missing_keys == ["bert.pooler.dense.bias"]


def test_bad_checkpoint_directories(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        BertModel.from_pretrained(tmp_path / "nowhere")
    BertConfig(vocab_size=10, hidden_size=8, num_attention_heads=2).to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        BertModel.from_pretrained(tmp_path)


def test_config_round_trip_and_validation(tmp_path):
    hf = hf_config(num_labels=5)
    hf.to_json_file(tmp_path / "config.json")
    assert "num_labels" not in json.loads((tmp_path / "config.json").read_text())  # only id2label
    config = BertConfig.from_json_file(tmp_path / "config.json")
    assert (config.hidden_size, config.intermediate_size, config.num_labels) == (32, 37, 5)
    assert config.layer_norm_eps == hf.layer_norm_eps
    assert "id2label" in config.extra
    assert BertConfig.from_dict(config.to_dict()) == config
    assert BertConfig.from_dict(hf.to_dict(), num_labels=2).num_labels == 2
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="mish2")
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        BertConfig(hidden_dropout_prob=1.5)
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig(position_embedding_type="relative_key")


def test_outputs_index_like_hugging_face(torch_path):
    model = BertForPreTraining(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=20)).eval()
    ids = torch.randint(0, 50, (2, 5))
    out = model(ids)
    assert out.loss is None and len(out) == 2
    prediction, nsp = out
    assert prediction is out[0] is out["prediction_logits"] is out.prediction_logits
    assert nsp.shape == (2, 2) and out.keys() == ["prediction_logits", "seq_relationship_logits"]
    with pytest.raises(KeyError):
        out["loss"]
    base = BertModel(model.config, add_pooling_layer=False)
    assert base(ids).pooler_output is None and base(ids)[0].shape == (2, 5, 16)


def test_padding_does_not_change_real_tokens(torch_path):
    """Key-padding mask: a sequence gives the same states alone or padded in a batch."""
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=20)).eval()
    short = torch.randint(1, 50, (1, 4))
    padded = torch.cat((short, torch.zeros(1, 3, dtype=torch.long)), dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    alone = model(short).last_hidden_state
    in_batch = model(padded, attention_mask=mask).last_hidden_state[:, :4]
    assert_close("real tokens", in_batch, alone, rtol=1e-5)
    unmasked = model(padded).last_hidden_state[:, :4]
    assert (unmasked - alone).abs().max() > 1e-3  # the mask matters


def test_dropout_in_training_mode(torch_path):
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=20, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = BertModel(config)
    ids = torch.randint(1, 50, (2, 6))
    torch.manual_seed(1)
    first = model(ids).last_hidden_state
    torch.manual_seed(1)
    assert torch.equal(model(ids).last_hidden_state, first)  # seeded: reproducible
    assert (model.eval()(ids).last_hidden_state - first).abs().max() > 1e-3


def test_initialisation():
    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=128, initializer_range=0.05)
    model = BertForMaskedLM(config)
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    assert abs(weight.std().item() - 0.05) < 0.005 and abs(weight.mean().item()) < 0.005
    assert torch.all(model.bert.encoder.layer[0].intermediate.dense.bias == 0)
    norm = model.bert.encoder.layer[0].output.LayerNorm
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert torch.all(model.bert.embeddings.word_embeddings.weight[config.pad_token_id] == 0)
    assert torch.all(model.cls.predictions.bias == 0)
    # The MLM decoder is the word embedding matrix, not a copy.
    assert "cls.predictions.decoder.weight" not in model.state_dict()


def test_untied_decoder(torch_path, tmp_path):
    hf = hf_model("BertForMaskedLM", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    ours = BertForMaskedLM.from_pretrained(tmp_path)
    decoder, embeddings = ours.cls.predictions.decoder.weight, ours.bert.embeddings.word_embeddings.weight
    assert decoder.data_ptr() != embeddings.data_ptr()
    ids, mask, types = batch()
    compare_outputs(ours(ids, mask, types), reference(hf)(ids, mask, types))


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForPreTraining"])
@pytest.mark.parametrize("stored", ["decoder.bias only", "both, different values"])
def test_mlm_bias_stored_under_the_decoder_alias(torch_path, tmp_path, name, stored):
    """With tied embeddings Hugging Face's cls.predictions.decoder.bias is cls.predictions.bias;
    older checkpoints store the decoder's name. The logits equal those of Hugging Face's model
    loaded from the same file -- which, given both names with different values, does not tie
    them and adds decoder.bias (fastdl warns and does the same)."""
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    decoder_bias = torch.randn(99)

    def edit(state):
        bias = state.pop("cls.predictions.bias")
        state["cls.predictions.decoder.bias"] = decoder_bias
        if stored != "decoder.bias only":
            state["cls.predictions.bias"] = bias

    _edit_checkpoint(tmp_path, edit)
    ref = PAIRS[name][0].from_pretrained(tmp_path).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, info = PAIRS[name][1].from_pretrained(tmp_path, output_loading_info=True)
    ids, mask, types = batch()
    compare_outputs(ours(ids, mask, types), reference(ref)(ids, mask, types), mask)
    assert torch.equal(ours.cls.predictions.bias, decoder_bias)
    messages = [str(w.message) for w in caught]
    assert not info.missing_keys and not info.newly_initialized, messages
    assert any("different values" in m for m in messages) == (stored != "decoder.bias only"), messages


def test_num_labels_override_rebuilds_the_label_names(torch_path, tmp_path):
    """from_pretrained(..., num_labels=5) on a checkpoint whose config names 3 labels: the config,
    and the config.json save_pretrained writes, carry transformers' LABEL_0 .. LABEL_4 (the
    stale 3 names go); with the checkpoint's own count the names stay."""
    hf = hf_model("BertForSequenceClassification", num_labels=3)
    hf.config.id2label = {0: "neg", 1: "neutral", 2: "pos"}
    hf.config.label2id = {"neg": 0, "neutral": 1, "pos": 2}
    hf.bert.save_pretrained(tmp_path / "backbone")  # the encoder's config keeps the 3 names

    def labels_of(config):
        return ({int(k): v for k, v in config["id2label"].items()},
                {k: int(v) for k, v in config["label2id"].items()})

    for num_labels in (5, 2, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the classifier is new (and transformers' count warning)
            ours = BertForSequenceClassification.from_pretrained(tmp_path / "backbone", num_labels=num_labels)
            ref = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "backbone",
                                                                             num_labels=num_labels)
        expected = (ref.config.id2label, ref.config.label2id)
        assert ours.config.num_labels == ref.config.num_labels == num_labels
        assert labels_of(ours.config.extra) == expected
        saved = tmp_path / f"saved{num_labels}"
        ours.save_pretrained(saved)
        written = json.loads((saved / "config.json").read_text())
        assert written["num_labels"] == num_labels and labels_of(written) == expected
        assert transformers.AutoConfig.from_pretrained(saved).id2label == ref.config.id2label
        assert ours.classifier.out_features == num_labels
    assert expected[0] == {0: "neg", 1: "neutral", 2: "pos"}  # same count: the names stay
    with pytest.warns(UserWarning, match="classifier"):  # from_hf takes the override the same way
        converted = BertForSequenceClassification.from_hf(hf.bert, num_labels=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_config = transformers.BertConfig.from_dict(hf.bert.config.to_dict(), num_labels=4)
    assert labels_of(converted.config.extra) == (ref_config.id2label, ref_config.label2id)


def test_bad_inputs(torch_path):
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=20, max_position_embeddings=8))
    ids = torch.randint(1, 50, (2, 6))
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(1, 50, (2, 9)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids, attention_mask=torch.ones(2, 6, dtype=torch.bool))


def test_meta_device_shapes_with_labels():
    """Models built on the meta device infer shapes, labels included (no value is read)."""
    with torch.device("meta"):
        model = BertForPreTraining(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=4, intermediate_size=37))
        ids = torch.randint(0, 99, (2, 7))
        out = model(ids, torch.ones(2, 7), labels=ids, next_sentence_label=torch.zeros(2, dtype=torch.long))
    assert out.loss.device.type == "meta" and out.loss.shape == ()
    assert out.prediction_logits.shape == (2, 7, 99)
