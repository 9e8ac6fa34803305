"""fastdl.models ViT against Hugging Face transformers (the independent reference): checkpoints
load with ``from_pretrained`` (safetensors or .bin) or convert with ``from_hf`` (whose in-memory
names differ from the checkpoint's in transformers 5); outputs, losses, parameter gradients and
position-embedding interpolation match a float64 copy of the Hugging Face model."""

import copy

import pytest
import torch
from helpers import assert_close

import fastdl
from fastdl.models import ViTConfig, ViTForImageClassification, ViTModel

transformers = pytest.importorskip("transformers")

PAIRS = {
    "ViTModel": (transformers.ViTModel, ViTModel),
    "ViTForImageClassification": (transformers.ViTForImageClassification, ViTForImageClassification),
}
RTOL = 1e-4


@pytest.fixture
def torch_path():
    with fastdl.backend.use("torch"):
        yield


def hf_model(name, **overrides):
    kwargs = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, num_labels=3, attn_implementation="eager")
    kwargs.update(overrides)
    model = PAIRS[name][0](transformers.ViTConfig(**kwargs))
    with torch.no_grad():  # make LayerNorm and biases non-trivial (fresh init: 1/0 and 0)
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save(model, directory, weights="safetensors"):
    model.save_pretrained(directory)
    if weights == "bin":  # the pytorch_model.bin of older releases
        from safetensors.torch import load_file
        torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()


def reference(model):
    return copy.deepcopy(model).double().cpu()


def compare_outputs(ours, ref):
    for key in ours.keys():
        assert_close(key, ours[key].cpu(), ref[key], rtol=RTOL)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_from_pretrained_matches_hf(torch_path, tmp_path, name, weights):
    hf = hf_model(name)
    save(hf, tmp_path, weights)
    ours, info = PAIRS[name][1].from_pretrained(tmp_path, output_loading_info=True)
    assert not (info.missing_keys or info.unexpected_keys or info.newly_initialized or info.ignored_keys)
    pixels = torch.randn(3, 3, 16, 16)
    compare_outputs(ours(pixels), reference(hf)(pixels))


@pytest.mark.parametrize("name", list(PAIRS))
def test_from_hf_matches_hf(torch_path, name):
    hf = hf_model(name)
    ours, info = PAIRS[name][1].from_hf(hf, output_loading_info=True)
    assert not (info.missing_keys or info.unexpected_keys)
    pixels = torch.randn(2, 3, 16, 16)
    compare_outputs(ours(pixels), reference(hf)(pixels))


@pytest.mark.parametrize("size", [(24, 24), (20, 12), (8, 8)])
def test_interpolated_positions_match_hf(torch_path, size):
    hf = hf_model("ViTModel")
    ours = ViTModel.from_hf(hf)
    pixels = torch.randn(2, 3, *size)
    compare_outputs(ours(pixels, interpolate_pos_encoding=True),
                    reference(hf)(pixels, interpolate_pos_encoding=True))
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(pixels)


def test_classifier_loss_and_gradients_match_hf(backend, device):
    """Cross-entropy loss and every parameter's gradient, on the torch path and through the
    kernels (tiny: one layer, 17 tokens)."""
    hf = hf_model("ViTForImageClassification", num_hidden_layers=1)
    ours = ViTForImageClassification.from_hf(hf).to(device)
    ref = reference(hf)
    pixels, labels = torch.randn(2, 3, 16, 16), torch.tensor([2, 0])
    out = ours(pixels.to(device), labels=labels.to(device))
    ref_out = ref(pixels, labels=labels)
    compare_outputs(out, ref_out)
    out.loss.backward()
    ref_out.loss.backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    # transformers 5 names the layers differently in memory; match through the state_dict order.
    ref_by_ours = dict(zip(ours.state_dict(), [ref_grads[k] for k in _hf_param_names(ref, ours)]))
    for pname, p in ours.named_parameters():
        if pname.endswith("attention.attention.key.bias"):  # zero gradient up to rounding
            assert p.grad.abs().max() < 1e-6
            continue
        assert_close(f"grad {pname}", p.grad.cpu(), ref_by_ours[pname], rtol=RTOL)


def test_soft_labels_cross_entropy(torch_path):
    """Float (B, num_labels) probabilities with problem_type single_label_classification: the
    cross-entropy against them (mixup), through the fused classifier + loss (kernel path: see
    tests/kernels/test_cross_entropy.py)."""
    device = "cpu"
    hf = hf_model("ViTForImageClassification", num_hidden_layers=1,
                  problem_type="single_label_classification")
    ours = ViTForImageClassification.from_hf(hf).to(device)
    params = list(ours.parameters())
    pixels = torch.randn(3, 3, 16, 16, device=device)
    labels = torch.softmax(torch.randn(3, 3, device=device), dim=-1)
    out = ours(pixels, labels=labels)
    ref_loss = torch.nn.functional.cross_entropy(out.logits, labels)
    assert_close("loss", out.loss, ref_loss, rtol=1e-5)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True, retain_graph=True)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for (name, _), g, ref in zip(ours.named_parameters(), grads, ref_grads):
        if not name.endswith("attention.attention.key.bias"):  # zero up to rounding (shift-invariant softmax)
            assert_close(f"grad {name}", g, ref, rtol=1e-4)


def _hf_param_names(hf, ours):
    """Hugging Face's parameter names in the order of our state_dict keys."""
    ours_to_hf = {ours._hf_key(k): k for k in hf.state_dict()}
    return [ours_to_hf[k] for k in ours.state_dict()]


@pytest.mark.parametrize("num_labels,labels", [(1, torch.tensor([0.3, -2.0])),
                                               (4, torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]]))])
def test_regression_and_multi_label_losses_match_hf(torch_path, num_labels, labels):
    hf = hf_model("ViTForImageClassification", num_labels=num_labels)
    ours = ViTForImageClassification.from_hf(hf)
    pixels = torch.randn(2, 3, 16, 16)
    compare_outputs(ours(pixels, labels=labels), reference(hf)(pixels, labels=labels))


def test_options_match_hf(torch_path, tmp_path):
    """No qkv bias, non-square patches and images, another activation, no pooler."""
    kwargs = dict(qkv_bias=False, image_size=(12, 16), patch_size=(4, 8), hidden_act="gelu_new",
                  num_channels=1)
    hf = hf_model("ViTModel", **kwargs)
    save(hf, tmp_path)
    ours = ViTModel.from_pretrained(tmp_path)
    assert ours.encoder.layer[0].attention.attention.query.bias is None
    pixels = torch.randn(2, 1, 12, 16)
    compare_outputs(ours(pixels), reference(hf)(pixels))
    assert ViTModel(ours.config, add_pooling_layer=False)(pixels).pooler_output is None


def test_backbone_from_classifier_checkpoint(torch_path, tmp_path):
    hf = hf_model("ViTForImageClassification")
    save(hf, tmp_path)
    with pytest.warns(UserWarning, match="pooler.dense.weight"):
        ours, info = ViTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info.ignored_keys == ["classifier.bias", "classifier.weight"]
    assert info.newly_initialized == ["pooler.dense.bias", "pooler.dense.weight"]
    pixels = torch.randn(2, 3, 16, 16)
    compare_outputs({"last_hidden_state": ours(pixels).last_hidden_state},
                    {"last_hidden_state": reference(hf.vit)(pixels).last_hidden_state})


def test_bad_inputs(torch_path):
    model = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=20))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="16x16"):
        model(torch.randn(1, 3, 16, 12))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match="pixel_values"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=18, patch_size=4)



def test_classifier_takes_labels_by_keyword_only(torch_path):
    """Hugging Face's second positional argument is head_mask: a call written for its order
    raises instead of reading the head mask as labels."""
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=20, num_labels=3)
    model = ViTForImageClassification(config)
    pixels, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    with pytest.raises(TypeError):
        model(pixels, labels)
    assert model(pixels, labels=labels).loss.dim() == 0

def test_initialisation():
    config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=128, num_labels=10)
    model = ViTForImageClassification(config)
    pos = model.vit.embeddings.position_embeddings
    assert abs(pos.std().item() - 0.02) < 0.004 and pos.abs().max() <= 0.04 + 1e-7  # truncated at 2 std
    layer = model.vit.encoder.layer[0]
    assert torch.all(layer.intermediate.dense.bias == 0)
    assert torch.all(layer.layernorm_before.weight == 1) and torch.all(layer.layernorm_before.bias == 0)
    assert isinstance(layer.layernorm_before, fastdl.nn.LayerNorm)
