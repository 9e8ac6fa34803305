"""Going back to transformers and finding checkpoints: fastdl's BERT and ViT ``save_pretrained``
write a directory that ``transformers.AutoModel*.from_pretrained`` loads with no missing,
unexpected or mismatched keys and the same outputs; ``from_pretrained`` takes a model id from the
local Hugging Face cache (offline) and names the id when it is not there."""

import json

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
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=16, num_labels=3)
VIT = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=37, num_labels=3)

# fastdl class, its config, the transformers Auto class that must load it, the output to compare
CASES = {
    "BertModel": (BertModel, BertConfig(**BERT), "AutoModel", "last_hidden_state"),
    "BertForMaskedLM": (BertForMaskedLM, BertConfig(**BERT), "AutoModelForMaskedLM", "logits"),
    "BertForPreTraining": (BertForPreTraining, BertConfig(**BERT), "AutoModelForPreTraining",
                           "prediction_logits"),
    "BertForSequenceClassification": (BertForSequenceClassification, BertConfig(**BERT),
                                      "AutoModelForSequenceClassification", "logits"),
    "ViTModel": (ViTModel, ViTConfig(**VIT), "AutoModel", "pooler_output"),
    "ViTForImageClassification": (ViTForImageClassification, ViTConfig(**VIT),
                                  "AutoModelForImageClassification", "logits"),
}


def noisy(model):
    """Every parameter moved off its init (zero biases, unit norms would hide a swapped key)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def model_inputs(name):
    if name.startswith("ViT"):
        return dict(pixel_values=torch.randn(2, 3, 16, 16))
    ids = torch.randint(1, 99, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return dict(input_ids=ids, attention_mask=mask)


@pytest.fixture
def torch_path():
    with fastdl.backend.use("torch"):
        yield


@pytest.mark.parametrize("name", list(CASES))
def test_save_pretrained_loads_in_transformers(torch_path, tmp_path, name):
    cls, config, auto, output = CASES[name]
    ours = noisy(cls(config))
    ours.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == [name]
    hf, info = getattr(transformers, auto).from_pretrained(tmp_path / "saved", output_loading_info=True,
                                                           attn_implementation="eager")
    assert type(hf).__name__ == name
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    inputs = model_inputs(name)
    with torch.no_grad():
        expected = getattr(hf.eval()(**inputs), output)
        got = getattr(ours(**inputs), output)
        again = getattr(cls.from_pretrained(tmp_path / "saved")(**inputs), output)
    assert_close(output, got, expected, rtol=1e-5)
    assert torch.equal(again, got)  # and back into fastdl


def hub_cache(root, repo_id, model, revision="0123456789abcdef0123456789abcdef01234567"):
    """A checkpoint laid out as huggingface_hub's cache: models--org--name/snapshots/<sha>/...
    with refs/main naming the snapshot."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    model.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return revision


def test_from_pretrained_finds_a_model_id_in_the_local_cache(torch_path, tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    saved = noisy(BertForSequenceClassification(BertConfig(**BERT)))
    sha = hub_cache(tmp_path, "tiny-org/tiny-bert", saved)
    inputs = model_inputs("BertModel")
    with torch.no_grad():
        expected = saved(**inputs).logits
        loaded = BertForSequenceClassification.from_pretrained("tiny-org/tiny-bert")
        assert torch.equal(loaded(**inputs).logits, expected)
        by_sha = BertForSequenceClassification.from_pretrained("tiny-org/tiny-bert", revision=sha)
        assert torch.equal(by_sha(**inputs).logits, expected)
    # The backbone alone, from the same cached checkpoint.
    assert isinstance(BertModel.from_pretrained("tiny-org/tiny-bert"), BertModel)
    with pytest.raises(FileNotFoundError, match="'tiny-org/absent'.*not in the local Hugging Face cache"):
        BertModel.from_pretrained("tiny-org/absent")
    with pytest.raises(FileNotFoundError, match="revision 'v2'"):
        BertModel.from_pretrained("tiny-org/tiny-bert", revision="v2")
    with pytest.raises(ValueError, match="not a directory"):
        BertModel.from_pretrained(tmp_path / "nowhere")  # a path, not an id


def test_save_pretrained_rejects_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="save_directory"):
        ViTModel(ViTConfig(**VIT)).save_pretrained(tmp_path / "file")
