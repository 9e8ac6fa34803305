"""``fastdl.patch(model)``: put fastdl's kernels into an existing model, in place, and say what
was done.

Three things happen:

1. Every submodule whose type is exactly one of ``torch.nn.LayerNorm``, ``RMSNorm``,
   ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``, ``Dropout``, ``Embedding``,
   ``MultiheadAttention`` is replaced by the fastdl module of the same name, built with the same
   constructor arguments and holding *the same* parameter and buffer objects (not copies): tied
   weights stay tied, an optimizer made
   before patching keeps updating the live weights, and device, dtype, training flag and hooks
   carry over. Subclasses of those torch types (which may change ``forward``) and modules that
   already are fastdl's are left alone.
2. Model-specific norms that compute exactly a LayerNorm or an RMSNorm (``LlamaRMSNorm``,
   ``T5LayerNorm``, ...) are found by class name in a registry (:data:`NORMS`; extend it with
   :func:`register_norm`) and replaced by ``fastdl.nn.LayerNorm`` / ``fastdl.nn.RMSNorm`` holding
   the same ``weight`` (and ``bias``), so ``state_dict`` keys do not change. Before a norm is
   swapped both modules run on one small random input; if they disagree beyond the dtype's
   tolerance the module is left as it was and the report says by how much. An input whose dtype
   differs from the weight's runs the model's own forward, whose output dtype rule is the
   model's (T5 casts to a float16 weight's dtype, Llama promotes), not torch's.
3. A Hugging Face ``transformers`` model whose attention goes through ``transformers``'
   attention-function registry is switched to ``attn_implementation="fastdl"``
   (:mod:`fastdl.integrations.transformers`), so its attention runs on
   ``fastdl.functional.scaled_dot_product_attention``. Models without attention layers (a ResNet)
   or whose attention code does not use the registry keep theirs.

``patch`` returns the model (or, if the model itself is one of the swapped types, its
replacement) with a :class:`PatchReport` attached as ``model.fastdl_patch_report``: every module
swapped, every norm-, attention- or dropout-like module left and why. ``verbose=True`` prints it
as a table; ``report=True`` returns ``(model, report)``.

``fastdl.patch`` is this module and is callable: ``fastdl.patch(model)`` is
``fastdl.patch.patch(model)``, and ``fastdl.patch.register_norm`` etc. are reachable from it.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import torch

from . import nn as fnn
from .integrations import transformers as hf_integration

__all__ = ["patch", "register_norm", "NormSpec", "NORMS", "PatchReport", "PatchEntry", "hf_attention",
           "ATTENTION_NAME"]

# The transformers attention function, kept here under its earlier name.
hf_attention = hf_integration.attention_forward
ATTENTION_NAME = hf_integration.ATTENTION_NAME

# torch.nn class -> (fastdl.nn class name, constructor arguments read off an instance).
_SWAPS = {
    torch.nn.LayerNorm: ("LayerNorm", lambda m: dict(
        normalized_shape=m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
        bias=m.bias is not None if m.elementwise_affine else True)),
    torch.nn.RMSNorm: ("RMSNorm", lambda m: dict(
        normalized_shape=m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine)),
    torch.nn.BatchNorm1d: ("BatchNorm1d", lambda m: dict(
        num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats)),
    torch.nn.BatchNorm2d: ("BatchNorm2d", lambda m: dict(
        num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats)),
    torch.nn.BatchNorm3d: ("BatchNorm3d", lambda m: dict(
        num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats)),
    torch.nn.Dropout: ("Dropout", lambda m: dict(p=m.p, inplace=m.inplace)),
    torch.nn.Embedding: ("Embedding", lambda m: dict(
        num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim, padding_idx=m.padding_idx,
        max_norm=m.max_norm, norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq,
        sparse=m.sparse)),
    torch.nn.MultiheadAttention: ("MultiheadAttention", lambda m: dict(
        embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=m.dropout,
        bias=m.out_proj.bias is not None, add_bias_kv=m.bias_k is not None,
        add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first)),
}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PatchEntry:
    """One module: ``action`` is "swapped", "attention" (routed to fastdl's kernel) or "left"."""

    path: str        # the module's name in the model ("" for the model itself)
    module: str      # its class name
    action: str
    detail: str      # what it became, or why it was left


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did, module by module."""

    entries: list[PatchEntry] = dataclasses.field(default_factory=list)

    def of(self, action: str) -> list[PatchEntry]:
        return [e for e in self.entries if e.action == action]

    @property
    def swapped(self) -> list[PatchEntry]:
        return self.of("swapped")

    @property
    def attention(self) -> list[PatchEntry]:
        return self.of("attention")

    @property
    def left(self) -> list[PatchEntry]:
        return self.of("left")

    def table(self) -> str:
        """One row per (action, class, detail) with a count and the first module's path."""
        groups: dict[tuple[str, str, str], list[str]] = {}
        for e in self.entries:
            groups.setdefault((e.action, e.module, e.detail), []).append(e.path or "(model)")
        rows = [(action, str(len(paths)), module, detail, paths[0])
                for (action, module, detail), paths in groups.items()]
        head = ("action", "count", "module", "result / reason", "e.g.")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        lines = [f"fastdl.patch: {len(self.swapped)} modules swapped, {len(self.attention)} models' "
                 f"attention routed to fastdl, {len(self.left)} modules left"]
        for r in [head, *rows]:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------------------------
# Exact torch.nn types
# ---------------------------------------------------------------------------------------------

def _torch_replacement(old: torch.nn.Module) -> torch.nn.Module | None:
    """The fastdl module for an exact torch.nn ``old``, sharing its tensors; None if not swapped."""
    entry = _SWAPS.get(type(old))
    cls = getattr(fnn, entry[0], None) if entry else None
    if cls is None:
        return None
    kwargs = entry[1](old)
    tensors = list(old.parameters(recurse=False)) + list(old.buffers(recurse=False))
    floating = [t for t in tensors if t.is_floating_point()]
    if "p" not in kwargs:  # every swapped type but Dropout takes factory kwargs
        # Build on the meta device: no memory, no init cost; the real tensors are moved in below.
        kwargs.update(device="meta", dtype=floating[0].dtype if floating else None)
    new = cls(**kwargs)
    same = (set(new._parameters) == set(old._parameters) and set(new._buffers) == set(old._buffers)
            and set(new._modules) == set(old._modules))
    if not same:
        raise RuntimeError(f"fastdl.nn.{cls.__name__} does not have the structure of {type(old).__name__} "
                           f"(parameters {sorted(new._parameters)} vs {sorted(old._parameters)})")
    # Everything the torch module holds (parameters, buffers, children, hooks, training flag,
    # cached flags such as MultiheadAttention._qkv_same_embed_dim) moves over as is; attributes
    # only the fastdl class has keep their constructor values.
    new.__dict__.update(old.__dict__)
    return new


# ---------------------------------------------------------------------------------------------
# Model-specific norms
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NormSpec:
    """How to read a model-specific norm as fastdl's LayerNorm or RMSNorm.

    kind: "layer_norm" (mean and variance, then weight and optional bias) or "rms_norm" (root mean
    square, then weight). eps_attr: the attribute holding epsilon. The module must hold its scale
    as a parameter named ``weight`` (and its shift as ``bias`` for a layer norm with one), whose
    shape is the normalized shape; the replacement keeps those names, so ``state_dict`` keys stay.
    """

    kind: str
    eps_attr: str = "eps"


#: class name -> NormSpec. Names, not classes, so that no model library has to be imported.
NORMS: dict[str, NormSpec] = {
    name: NormSpec("rms_norm", "variance_epsilon")
    for name in ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                 "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm", "T5LayerNorm", "MT5LayerNorm",
                 "LongT5LayerNorm", "UMT5LayerNorm", "Starcoder2RMSNorm", "GraniteRMSNorm")
}


def register_norm(cls: type | str, kind: str, eps_attr: str = "eps") -> None:
    """Tell :func:`patch` that modules of class ``cls`` (or with that class name) compute exactly
    ``kind`` ("layer_norm" or "rms_norm") with epsilon in attribute ``eps_attr``. They are still
    checked numerically against fastdl's before each swap.

        fastdl.patch.register_norm(MyRMSNorm, "rms_norm", eps_attr="variance_epsilon")
    """
    if kind not in ("layer_norm", "rms_norm"):
        raise ValueError(f"kind must be 'layer_norm' or 'rms_norm', got {kind!r}")
    if not isinstance(eps_attr, str):
        raise TypeError(f"eps_attr must be an attribute name, got {type(eps_attr).__name__}")
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"cls must be a class or a class name, got {cls!r}")
    NORMS[name] = NormSpec(kind, eps_attr)


class _ModelDtypeRule:
    """Mixed into fastdl's norms standing in for a model's own norm class. An input of another
    dtype than the weight runs that class's forward (``_model_forward``): models set their own
    output dtype there (Llama's promotes input and weight, T5's casts to a half-precision
    weight's dtype), not torch's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype != self.weight.dtype:
            return self._model_forward(self, input)
        return super().forward(input)


class _ModelRMSNorm(_ModelDtypeRule, fnn.RMSNorm):
    pass


class _ModelLayerNorm(_ModelDtypeRule, fnn.LayerNorm):
    pass


# Relative error allowed between a registered norm and fastdl's on the self-check input.
_CHECK_RTOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _norm_replacement(old: torch.nn.Module, spec: NormSpec) -> tuple[torch.nn.Module | None, str]:
    """(fastdl norm sharing ``old``'s weight and bias, "") or (None, why it is left)."""
    weight = old._parameters.get("weight")
    bias = old._parameters.get("bias")
    if weight is None:
        return None, "no 'weight' parameter"
    extra = set(old._parameters) - {"weight", "bias"}
    if extra or old._buffers or old._modules or (spec.kind == "rms_norm" and bias is not None):
        return None, "holds more than the norm's weight" + (" and bias" if spec.kind == "layer_norm" else "")
    eps = getattr(old, spec.eps_attr, None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None, f"no numeric epsilon attribute {spec.eps_attr!r}"
    if weight.device.type == "meta":
        return None, "on the meta device: cannot be checked"
    factory = dict(device="meta", dtype=weight.dtype)
    if spec.kind == "rms_norm":
        new = _ModelRMSNorm(weight.shape, eps=float(eps), **factory)
    else:
        new = _ModelLayerNorm(weight.shape, eps=float(eps), bias=bias is not None, **factory)
    new._model_forward = type(old).forward
    new._parameters = {"weight": weight, **({"bias": bias} if bias is not None else {})}
    new.train(old.training)
    problem = _self_check(old, new, weight)
    if problem:
        return None, problem
    # Hooks, the training flag and any attribute the model's code may read (``variance_epsilon``)
    # move over; the fastdl module keeps its own parameters dict and constructor attributes.
    own = {"_parameters", "normalized_shape", "eps", "elementwise_affine"}
    new.__dict__.update({k: v for k, v in old.__dict__.items() if k not in own})
    return new, ""


@torch.no_grad()
def _self_check(old: torch.nn.Module, new: torch.nn.Module, weight: torch.Tensor) -> str:
    """Run both norms (forward only, hooks not called) on a small random input of the weight's
    dtype and device; the reason they differ, or "" when they agree."""
    rtol = _CHECK_RTOL.get(weight.dtype)
    if rtol is None:
        return f"weight dtype {weight.dtype} is not a float type fastdl computes in"
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(3, 7, *weight.shape, generator=generator, device=weight.device, dtype=torch.float32)
    x = (x * 2 + 0.5).to(weight.dtype)  # a non-zero mean tells a LayerNorm from an RMSNorm
    try:
        expected = type(old).forward(old, x)
        got = type(new).forward(new, x)
    except Exception as e:  # a norm whose forward needs other arguments, a backend refusing
        return f"self-check failed to run: {type(e).__name__}: {e}"
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return "self-check: the module does not return a tensor of its input's shape"
    error = ((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()
    if not error <= rtol:  # also catches NaN
        return f"self-check: differs from fastdl's {type(new).__name__} by {error:.1e} (relative, > {rtol:g})"
    return ""


# ---------------------------------------------------------------------------------------------
# Walking the model
# ---------------------------------------------------------------------------------------------

def _looks_left_out(module: torch.nn.Module) -> str | None:
    """Why a module that was not swapped deserves a line in the report (None if it does not)."""
    cls = type(module)
    if cls.__module__.startswith("fastdl."):
        return None
    for torch_cls in _SWAPS:
        if isinstance(module, torch_cls):
            return (f"subclass of torch.nn.{torch_cls.__name__} (may change forward); "
                    "fastdl.patch.register_norm() it if it is a plain norm")
    name = cls.__name__
    if name.endswith("Norm") or name.endswith("LayerNorm") or name.endswith("RMSNorm"):
        return "not in the norm registry: fastdl.patch.register_norm() it if it computes LayerNorm/RMSNorm"
    return None


def _swap_modules(model: torch.nn.Module, report: PatchReport) -> torch.nn.Module:
    swapped: dict[int, torch.nn.Module] = {}  # a module used in several places is swapped once
    left: set[int] = set()

    def replacement(path: str, module: torch.nn.Module) -> torch.nn.Module | None:
        if id(module) in swapped:
            return swapped[id(module)]
        if id(module) in left:
            return None
        new, reason = _torch_replacement(module), ""
        spec = NORMS.get(type(module).__name__)
        if new is None and spec is not None:
            new, reason = _norm_replacement(module, spec)
        if new is not None:
            swapped[id(module)] = new
            public = next(c for c in type(new).__mro__ if c.__module__.startswith("fastdl.nn"))
            report.entries.append(PatchEntry(path, type(module).__name__, "swapped",
                                             f"fastdl.nn.{public.__name__}"))
            return new
        left.add(id(module))
        reason = reason or _looks_left_out(module)
        if reason:
            report.entries.append(PatchEntry(path, type(module).__name__, "left", reason))
        return None

    def visit(module: torch.nn.Module, prefix: str, seen: set[int]) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            path = f"{prefix}{name}"
            new = replacement(path, child)
            if new is not None:
                module._modules[name] = new
                child = new
            visit(child, path + ".", seen)

    root = replacement("", model) or model
    visit(root, "", set())
    return root


def _route_hf_attention(model: torch.nn.Module, report: PatchReport) -> None:
    if "transformers" not in sys.modules:  # no transformers model can exist without it
        return
    from transformers import PreTrainedModel

    roots: list[tuple[str, torch.nn.Module]] = []  # the outermost ones: they set their submodels
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(r == "" or name.startswith(r + ".") for r, _ in roots):
            roots.append((name, m))
    if not roots:
        return
    try:
        hf_integration.register()
    except ImportError as e:
        for name, hf_model in roots:
            report.entries.append(PatchEntry(name, type(hf_model).__name__, "left", str(e)))
        return
    for name, hf_model in roots:
        before = hf_model.config._attn_implementation
        reason = hf_integration.supports_attention(hf_model)
        if reason is None and before != ATTENTION_NAME:
            if hasattr(hf_model, "set_attn_implementation"):
                hf_model.set_attn_implementation(ATTENTION_NAME)
            else:
                hf_model.config._attn_implementation = ATTENTION_NAME
        if reason is None:
            report.entries.append(PatchEntry(name, type(hf_model).__name__, "attention",
                                             f"attn_implementation {before} -> {ATTENTION_NAME}"))
        else:
            report.entries.append(PatchEntry(name, type(hf_model).__name__, "left",
                                             f"attention not routed: {reason}"))


def patch(model: torch.nn.Module, verbose: bool = False, report: bool = False):
    """Swap ``model``'s torch.nn norms, dropout, embeddings and multi-head attention, and its
    registered model-specific norms, for fastdl's (same weights, shared), and route a
    ``transformers`` model's attention through fastdl's fused kernel. See :mod:`fastdl.patch`.

    Returns the model, with the :class:`PatchReport` as ``model.fastdl_patch_report``;
    ``(model, report)`` with ``report=True``. ``verbose=True`` prints the report as a table.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    result = PatchReport()
    model = _swap_modules(model, result)
    _route_hf_attention(model, result)
    model.fastdl_patch_report = result
    if verbose:
        print(result.table())
    return (model, result) if report else model


class _CallableModule(types.ModuleType):
    """Lets ``fastdl.patch`` be both this module and the function :func:`patch`."""

    def __call__(self, model: torch.nn.Module, verbose: bool = False, report: bool = False):
        return patch(model, verbose=verbose, report=report)


sys.modules[__name__].__class__ = _CallableModule
