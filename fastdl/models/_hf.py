"""Hugging Face checkpoints: configs with HF field names, reading a checkpoint directory from local
disk or the local Hugging Face cache, mapping its state_dict keys onto ours, converting a live
``transformers`` model, and writing a directory ``transformers`` loads (``save_pretrained``).

Our modules are named as Hugging Face's *checkpoint files* name them (what ``save_pretrained``
writes and what every checkpoint on the Hub holds), so most keys map one to one. A model's
``_hf_key`` renames the rest: legacy LayerNorm ``gamma``/``beta``, the renamed attention and MLP
of newer ``transformers`` releases in memory, and drops tied or derived entries (the MLM decoder
that *is* the word embedding, ``position_ids`` buffers).

Loading is strict: a missing or unexpected weight inside the backbone, or a shape mismatch, raises
``ValueError`` listing every offending key. Two cases are not errors, as in ``transformers``:
loading a backbone from a checkpoint that also holds task heads (the heads are ignored), and
loading a model with a task head or a pooler from a checkpoint without it (it keeps its fresh
init and a ``UserWarning`` names it). ``output_loading_info=True`` returns the key lists as well.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PretrainedConfig:
    """Base of the model configs: a dataclass whose fields carry Hugging Face's names.

    Keys of a ``config.json`` that are not fields (``architectures``, ``id2label``...) are kept
    in ``extra`` and written back by :meth:`to_dict`; ``num_labels`` is derived from
    ``id2label`` when the file has no explicit count, and a count (``num_labels=5`` passed to
    ``from_pretrained``) that differs from the map's replaces ``id2label``/``label2id`` with
    ``LABEL_0`` .. ``LABEL_{n-1}``, as ``transformers`` does.
    """

    model_type: ClassVar[str] = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any], **overrides):
        """Build from a dict (a parsed ``config.json`` or ``transformers`` ``config.to_dict()``)."""
        values = {**values, **overrides}
        model_type = values.get("model_type")
        if model_type not in (None, "", cls.model_type):
            raise ValueError(f"{cls.__name__} expects model_type {cls.model_type!r}; the config says "
                             f"{model_type!r}")
        id2label = values.get("id2label")
        if isinstance(id2label, dict):
            if "num_labels" not in values:
                values["num_labels"] = len(id2label)
            elif values["num_labels"] != len(id2label):
                # As transformers' num_labels setter: a count other than the map's replaces the
                # names with LABEL_0 .. LABEL_{n-1} (an override, or a file contradicting itself).
                count = values["num_labels"]
                if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                    values["id2label"] = {str(i): f"LABEL_{i}" for i in range(count)}
                    values["label2id"] = {f"LABEL_{i}": i for i in range(count)}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names and k != "model_type"}
        return cls(**known, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides):
        """Read a ``config.json`` (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **overrides)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**self.extra, **out, "model_type": self.model_type}

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)


def _positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


def _probability(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{type(config).__name__}.{name} must be in [0, 1], got {value!r}")


# ---------------------------------------------------------------------------------------------
# Finding and reading checkpoint files
# ---------------------------------------------------------------------------------------------

# "bert-base-uncased", "google/vit-base-patch16-224": a Hub repository id, not a path.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def checkpoint_directory(path: str | os.PathLike, revision: str | None = None,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """The local directory of a checkpoint: ``path`` itself when it is a directory, else, when it
    reads as a Hub model id (``org/name``), its snapshot in the local Hugging Face cache
    (``HF_HUB_CACHE``, or ``cache_dir``; ``revision`` defaults to the cached ``main``). Never
    downloads. Raises ValueError for a path that is not a directory and FileNotFoundError for an
    id that is not cached, naming it."""
    if Path(path).is_dir():
        return Path(path)
    name = os.fspath(path)
    if not _MODEL_ID.match(name) or name.endswith(".") or ".." in name:
        raise ValueError(f"path must be a local checkpoint directory or a Hugging Face model id; "
                         f"{name!r} is not a directory")
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError as e:
        raise FileNotFoundError(f"{name!r} is not a directory; reading it as a model id from the Hugging "
                                "Face cache needs huggingface_hub (pip install 'fastdl[hf]')") from e
    found = try_to_load_from_cache(name, CONFIG_NAME, cache_dir=cache_dir, revision=revision)
    if not isinstance(found, str):  # None (not cached) or a marker that the file does not exist
        where = os.fspath(cache_dir) if cache_dir is not None else HF_HUB_CACHE
        raise FileNotFoundError(
            f"model id {name!r}{f' (revision {revision!r})' if revision else ''} is not in the local Hugging "
            f"Face cache ({where}) and {name!r} is not a directory; fastdl does not download: fetch it "
            f"first (`hf download {name}`) or pass a checkpoint directory")
    return Path(found).parent


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional dependency: pip install safetensors
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face checkpoint directory: ``model.safetensors`` or
    ``pytorch_model.bin``, single file or sharded (``*.index.json``), safetensors preferred."""
    directory = Path(directory)
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (directory / name).is_file():
            return _load_file(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_file(directory / shard))
            return state
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {BIN_NAME} (or a sharded index of them) "
                            f"in {directory}")


def rename_legacy_layer_norm(key: str) -> str:
    """Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta."""
    return re.sub(r"(LayerNorm|layernorm\w*|layer_norm\w*)\.(gamma|beta)$",
                  lambda m: f"{m.group(1)}.{'weight' if m.group(2) == 'gamma' else 'bias'}", key)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadingInfo:
    """What loading did with the keys (all names in our model's naming)."""

    missing_keys: list[str]          # our weights the checkpoint lacks (error unless a new head)
    unexpected_keys: list[str]       # checkpoint weights we have no place for (error in the backbone)
    mismatched_keys: list[str]       # present on both sides with different shapes (always an error)
    newly_initialized: list[str]     # head weights left at their fresh init
    ignored_keys: list[str]          # checkpoint entries dropped on purpose (tied, buffers, other heads)


class PretrainedModel(torch.nn.Module):
    """Adds ``from_pretrained`` / ``from_hf`` to a model class.

    Subclasses set ``config_class``, ``base_model_prefix`` (``"bert"``, ``"vit"``), whether they
    are the backbone itself (``is_backbone``), and may override ``_hf_key``.
    """

    config_class: ClassVar[type[PretrainedConfig]]
    base_model_prefix: ClassVar[str] = ""
    is_backbone: ClassVar[bool] = False

    def _hf_key(self, key: str) -> str | None:
        """Our name for a checkpoint key (None drops it)."""
        return rename_legacy_layer_norm(key)

    def _prepare_hf_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's state_dict before its keys are renamed one by one (``_hf_key``): a model
        whose entries depend on one another (aliases of a tied weight) rewrites them here."""
        return state

    # -- public API -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, config: PretrainedConfig | None = None,
                        strict: bool = True, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, output_loading_info: bool = False,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        **config_overrides):
        """Load a Hugging Face checkpoint (no network access): a directory holding
        ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``, or a model id
        (``"google-bert/bert-base-uncased"``) already in the local Hugging Face cache
        (``revision`` and ``cache_dir`` as in ``transformers``; see :func:`checkpoint_directory`).

        ``config_overrides`` replace config fields (e.g. ``num_labels=3``). ``dtype``/``device``
        place the model; weights are loaded in float32 otherwise. The model is returned in
        eval mode, as ``transformers`` does. ``strict=False`` turns the key errors into a
        warning. See the module docstring for the rules.
        """
        path = checkpoint_directory(path, revision=revision, cache_dir=cache_dir)
        if config is None:
            config = cls.config_class.from_json_file(path / CONFIG_NAME, **config_overrides)
        elif config_overrides:
            raise ValueError("pass either config or config overrides, not both")
        model = cls(config)
        info = model.load_hf_state_dict(read_state_dict(path), strict=strict)
        model.to(device=device, dtype=dtype)
        model.eval()
        return (model, info) if output_loading_info else model

    @classmethod
    def from_hf(cls, hf_model: torch.nn.Module, *, strict: bool = True, output_loading_info: bool = False,
                **config_overrides):
        """Convert a live ``transformers`` model: same config, weights copied, same device,
        dtype and training flag."""
        hf_config = getattr(hf_model, "config", None)
        if hf_config is None or not hasattr(hf_config, "to_dict"):
            raise TypeError("hf_model must be a transformers model with a config; "
                            f"got {type(hf_model).__name__}")
        config = cls.config_class.from_dict(hf_config.to_dict(), **config_overrides)
        model = cls(config)
        state = {k: v.detach() for k, v in hf_model.state_dict().items()}
        info = model.load_hf_state_dict(state, strict=strict)
        reference = next(hf_model.parameters(), None)
        if reference is not None:
            model.to(device=reference.device, dtype=reference.dtype)
        model.train(hf_model.training)
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory`` (created if
        needed) in Hugging Face's layout: ``transformers.AutoModel*.from_pretrained`` loads it
        with no missing or unexpected keys, as does :meth:`from_pretrained`. Weights are saved
        in their current dtype; tied weights are stored once (``transformers`` re-ties them)."""
        from safetensors.torch import save_file  # optional dependency: pip install safetensors

        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_directory {str(directory)!r} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        config = {**self.config.to_dict(), "architectures": [type(self).__name__]}
        with open(directory / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        # Our state_dict keys are the checkpoint names (module docstring); a tied weight appears once.
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> LoadingInfo:
        """Copy a Hugging Face state_dict into this model (see the module docstring)."""
        ignored: list[str] = []
        renamed: dict[str, torch.Tensor] = {}
        for key, value in self._prepare_hf_state(state).items():
            ours = self._hf_key(key)
            if ours is None:
                ignored.append(key)
            else:
                renamed[ours] = value
        ours_state = self.state_dict()
        renamed, dropped = self._align_prefix(renamed, set(ours_state))
        ignored += dropped

        prefix = self.base_model_prefix + "."

        def in_backbone(key: str) -> bool:
            if not (self.is_backbone or key.startswith(prefix)):
                return False
            # The pooler counts as a head: many checkpoints (MLM, image classifiers) lack it.
            return not key.removeprefix(prefix).startswith("pooler.")

        missing = sorted(set(ours_state) - set(renamed))
        unexpected = sorted(set(renamed) - set(ours_state))
        mismatched = sorted(k for k in set(renamed) & set(ours_state)
                            if renamed[k].shape != ours_state[k].shape)
        new_head = [k for k in missing if not in_backbone(k)]
        # A checkpoint head we do not have (e.g. the MLM head when loading a classifier).
        other_head = [k for k in unexpected if not in_backbone(k)]
        ignored += other_head
        bad_missing = [k for k in missing if in_backbone(k)]
        bad_unexpected = [k for k in unexpected if in_backbone(k)]

        problems = []
        if mismatched:
            problems.append("shape mismatch: " + ", ".join(
                f"{k} (checkpoint {tuple(renamed[k].shape)}, model {tuple(ours_state[k].shape)})"
                for k in mismatched))
        if bad_missing:
            problems.append("missing from the checkpoint: " + ", ".join(bad_missing))
        if bad_unexpected:
            problems.append("unexpected in the checkpoint: " + ", ".join(bad_unexpected))
        name = type(self).__name__
        if mismatched or (strict and problems):
            raise ValueError(f"cannot load the checkpoint into {name}:\n  " + "\n  ".join(problems))
        if problems:
            warnings.warn(f"loading {name} non-strictly:\n  " + "\n  ".join(problems), stacklevel=3)
        if new_head:
            warnings.warn(f"{name}: not in the checkpoint, left at their initialisation (train them): "
                          + ", ".join(new_head), stacklevel=3)

        loadable = {k: v for k, v in renamed.items() if k in ours_state}
        self.load_state_dict(loadable, strict=False)
        return LoadingInfo(missing, unexpected, mismatched, new_head, sorted(ignored))

    def _align_prefix(self, state: dict[str, torch.Tensor], ours: set[str]
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Make checkpoint keys and ours agree on the backbone prefix (``bert.``, ``vit.``):
        a backbone takes the prefixed entries of a checkpoint with heads (and drops the heads);
        a model with a head takes a backbone-only checkpoint by prefixing its keys."""
        prefix = self.base_model_prefix + "."
        has_prefix = any(k.startswith(prefix) for k in state)
        if self.is_backbone and has_prefix:
            kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            return kept, sorted(k for k in state if not k.startswith(prefix))
        if not self.is_backbone and not has_prefix and any(k.startswith(prefix) for k in ours):
            return {prefix + k: v for k, v in state.items()}, []
        return state, []
