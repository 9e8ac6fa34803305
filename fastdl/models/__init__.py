"""Models built from fastdl's modules: BERT and ViT (loading Hugging Face checkpoints) and the
encoder-decoder Transformer of "Attention Is All You Need".

    model = fastdl.models.BertModel.from_pretrained("path/to/bert-base-uncased")
    out = model(input_ids, attention_mask=attention_mask)
    out.last_hidden_state, out.pooler_output
"""

from ._hf import LoadingInfo, PretrainedConfig
from .bert import BertConfig, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification, BertModel
from .seq2seq import Seq2SeqTransformer
from .vit import ViTConfig, ViTForImageClassification, ViTModel

__all__ = [
    "BertConfig",
    "BertModel",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "ViTConfig",
    "ViTModel",
    "ViTForImageClassification",
    "Seq2SeqTransformer",
    "PretrainedConfig",
    "LoadingInfo",
]
