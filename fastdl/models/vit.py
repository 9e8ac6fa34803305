"""Vision Transformer (Dosovitskiy et al., 2021) on fastdl's kernels, weight-compatible with
Hugging Face.

Data flow::

    pixel_values (B, C, H, W)
      -> patches: Conv2d(kernel = stride = patch)          (B, N, hidden), N = (H/p) * (W/p)
      -> [CLS] + patches, + learned positions, dropout     (B, N + 1, hidden)
      -> L x pre-norm layer:
           a = attention(LayerNorm(x))                     F.layer_norm, F.scaled_dot_product_attention
           y, x = LayerNorm(x + dropout(dense(a))), x + dropout(dense(a))   F.dropout_add_layer_norm
           x = x + dropout(mlp(y))                         F.dropout
      -> final LayerNorm -> (pooler: act(dense(x[:, 0]))) / (classifier on x[:, 0])

The fused "add & norm" returns the sum as well as its LayerNorm, which is exactly what a pre-norm
block needs: the normalised tensor feeds the MLP, the sum is the residual stream.

``interpolate_pos_encoding=True`` runs images of another size than the config's: the grid of
patch position embeddings is resized bicubically (``align_corners=False``), the [CLS] position
kept, exactly as Hugging Face's ``ViTEmbeddings.interpolate_pos_encoding``.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as TF

from .. import functional as F
from .. import nn as fnn
from ._common import (
    BaseModelOutputWithPooling,
    ClassifierOutput,
    activation,
    classification_loss,
    init_weights,
    merge_heads,
    split_heads,
)
from ._hf import PretrainedConfig, PretrainedModel, _positive, _probability, rename_legacy_layer_norm

__all__ = ["ViTConfig", "ViTModel", "ViTForImageClassification"]


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


@dataclasses.dataclass
class ViTConfig(PretrainedConfig):
    """ViT hyper-parameters under Hugging Face's names; defaults are vit-base-patch16-224."""

    model_type = "vit"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    encoder_stride: int = 16
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    num_labels: int = 2
    problem_type: str | None = None

    def __post_init__(self):
        _positive(self, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "num_channels")
        _probability(self, "hidden_dropout_prob", "attention_probs_dropout_prob")
        activation(self.hidden_act)
        activation(self.pooler_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        image, patch = _pair(self.image_size), _pair(self.patch_size)
        if any(i % p for i, p in zip(image, patch)):
            raise ValueError(f"image_size {image} must be a multiple of patch_size {patch}")
        if self.num_labels < 0:
            raise ValueError(f"num_labels must be >= 0, got {self.num_labels}")
        if self.pooler_output_size is None:
            self.pooler_output_size = self.hidden_size


class ViTPatchEmbeddings(torch.nn.Module):
    """(B, C, H, W) -> (B, (H/p)(W/p), hidden) by a convolution with kernel = stride = patch."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.image_size = _pair(config.image_size)
        self.patch_size = _pair(config.patch_size)
        self.num_channels = config.num_channels
        grid = [i // p for i, p in zip(self.image_size, self.patch_size)]
        self.num_patches = grid[0] * grid[1]
        self.projection = torch.nn.Conv2d(config.num_channels, config.hidden_size,
                                          kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(torch.nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(config)
        self.position_embeddings = torch.nn.Parameter(
            torch.zeros(1, self.patch_embeddings.num_patches + 1, config.hidden_size))
        self.dropout = fnn.Dropout(config.hidden_dropout_prob)
        self.patch_size = self.patch_embeddings.patch_size

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an image of ``height`` x ``width`` pixels: the square grid of
        the config's patch positions resized bicubically to the new grid (Hugging Face's rule)."""
        num_patches = embeddings.shape[1] - 1
        num_positions = self.position_embeddings.shape[1] - 1
        if num_patches == num_positions and height == width:
            return self.position_embeddings
        dim = embeddings.shape[-1]
        side = int(num_positions ** 0.5)
        grid = self.position_embeddings[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = TF.interpolate(grid, size=(height // self.patch_size[0], width // self.patch_size[1]),
                              mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.position_embeddings[:, :1], grid), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch, channels, height, width = pixel_values.shape
        expected = self.patch_embeddings
        if channels != expected.num_channels:
            raise ValueError(f"pixel_values has {channels} channels; "
                             f"the model expects {expected.num_channels}")
        if not interpolate_pos_encoding and (height, width) != expected.image_size:
            raise ValueError(f"pixel_values is {height}x{width}; the model expects "
                             f"{expected.image_size[0]}x{expected.image_size[1]} "
                             "(pass interpolate_pos_encoding=True for other sizes)")
        x = self.patch_embeddings(pixel_values)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), x), dim=1)
        if interpolate_pos_encoding:
            x = x + self.interpolate_pos_encoding(x, height, width)
        else:
            x = x + self.position_embeddings
        return self.dropout(x)


class ViTSelfAttention(torch.nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        return merge_heads(out)


class ViTSelfOutput(torch.nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = torch.nn.Linear(config.hidden_size, config.hidden_size)


class ViTAttention(torch.nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = ViTSelfAttention(config)
        self.output = ViTSelfOutput(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class ViTIntermediate(torch.nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = torch.nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class ViTOutput(torch.nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = torch.nn.Linear(config.intermediate_size, config.hidden_size)


class ViTLayer(torch.nn.Module):
    """Pre-norm encoder layer (see the module docstring for the fused steps)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = ViTAttention(config)
        self.intermediate = ViTIntermediate(config)
        self.output = ViTOutput(config)
        self.layernorm_before = fnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = fnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = fnn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention(self.layernorm_before(x))
        norm = self.layernorm_after
        y, x = F.dropout_add_layer_norm(a, x, norm.weight, norm.bias, self.dropout.p, norm.eps, self.training)
        return x + self.dropout(self.output.dense(self.intermediate(y)))


class ViTEncoder(torch.nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layer = torch.nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class ViTPooler(torch.nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = torch.nn.Linear(config.hidden_size, config.pooler_output_size)
        self.act = activation(config.pooler_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x[:, 0]))


# Names of newer ``transformers`` releases in memory -> the checkpoint names we use.
_LIVE_TO_CHECKPOINT = [
    (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"\.attention\.([qkv])_proj\.", None),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]
_QKV = {"q": "query", "k": "key", "v": "value"}


class ViTPreTrainedModel(PretrainedModel):
    config_class = ViTConfig
    base_model_prefix = "vit"

    def _init(self) -> None:
        init_weights(self, self.config.initializer_range, truncated=True)
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, ViTEmbeddings):
                torch.nn.init.trunc_normal_(m.position_embeddings, 0.0, std, -2 * std, 2 * std)
                torch.nn.init.trunc_normal_(m.cls_token, 0.0, std, -2 * std, 2 * std)

    def _hf_key(self, key: str) -> str | None:
        key = rename_legacy_layer_norm(key)
        if key.endswith("embeddings.mask_token"):
            return None  # only used by masked image modelling
        for pattern, repl in _LIVE_TO_CHECKPOINT:
            if repl is None:
                key = re.sub(pattern, lambda m: f".attention.attention.{_QKV[m.group(1)]}.", key)
            else:
                key = re.sub(pattern, repl, key)
        return key


def _check_pixels(pixel_values: torch.Tensor) -> None:
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise TypeError("pixel_values must be a floating-point tensor")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have shape (batch, channels, height, width); "
                         f"got {tuple(pixel_values.shape)}")


class ViTModel(ViTPreTrainedModel):
    """forward(pixel_values (B, C, H, W)) -> ``last_hidden_state`` (B, N + 1, hidden) after the
    final LayerNorm, ``pooler_output`` (B, pooler_output_size) or None."""

    is_backbone = True

    def __init__(self, config: ViTConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = fnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        self._init()

    def forward(self, pixel_values: torch.Tensor, *,
                interpolate_pos_encoding: bool = False) -> BaseModelOutputWithPooling:
        _check_pixels(pixel_values)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        x = self.embeddings(pixel_values, interpolate_pos_encoding)
        x = self.layernorm(self.encoder(x))
        pooled = self.pooler(x) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


class ViTForImageClassification(ViTPreTrainedModel):
    """ViT with a Linear classifier on the final [CLS] state; ``loss`` when ``labels`` are given
    (Hugging Face's rule: regression for num_labels == 1, else cross-entropy / BCE).

    Soft labels -- float (B, num_labels) class probabilities, as mixup and cutmix make -- with
    ``config.problem_type == "single_label_classification"`` give the cross-entropy against those
    probabilities, through the fused linear + cross-entropy (Hugging Face rejects such labels for
    that problem type; with ``problem_type=None`` float labels mean multi-label BCE, as there)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier = (torch.nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0
                           else torch.nn.Identity())
        self._init()

    def forward(self, pixel_values: torch.Tensor, *, labels: torch.Tensor | None = None,
                interpolate_pos_encoding: bool = False) -> ClassifierOutput:
        hidden = self.vit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state
        logits = self.classifier(hidden[:, 0])
        if labels is None:
            loss = None
        elif self._soft_labels(labels, logits):
            loss = F.linear_cross_entropy(hidden[:, 0], self.classifier.weight, labels, self.classifier.bias)
        else:
            loss = classification_loss(self.config, logits, labels)
        return ClassifierOutput(loss=loss, logits=logits)

    def _soft_labels(self, labels: torch.Tensor, logits: torch.Tensor) -> bool:
        return (self.config.problem_type == "single_label_classification" and labels.is_floating_point()
                and labels.shape == logits.shape and isinstance(self.classifier, torch.nn.Linear))
