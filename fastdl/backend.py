"""Which implementation runs a call: ``"triton"``, ``"interpret"`` or ``"torch"``.

* ``triton``    -- the Triton kernels, compiled for the GPU; needs CUDA tensors.
* ``interpret`` -- the same Triton kernels executed by Triton's CPU interpreter
  (``TRITON_INTERPRET=1``). Slow, but it proves the kernels on a machine without a GPU.
* ``torch``     -- the pure-PyTorch reference path; always available.

The choice comes from, in order: the innermost :func:`use` context, the environment variable
``FASTDL_BACKEND`` (``auto`` by default), and, for ``auto``, the tensor itself::

    CUDA tensor, Triton importable, kernels compiled   -> "triton"
    Triton's interpreter active (TRITON_INTERPRET=1)   -> "interpret"
    otherwise                                          -> "torch"

Triton decides between compiling and interpreting when a kernel is *defined*, i.e. when
``fastdl.kernels`` is first imported, so one process runs the kernels one way only. fastdl imports
its kernels lazily, at the first call that needs them; ``FASTDL_BACKEND=interpret`` (or
``use("interpret")`` before any kernel ran) sets ``TRITON_INTERPRET=1`` while that is still
possible. Forcing a backend that cannot run a call raises :class:`BackendError` naming the reason;
fastdl never falls back silently from a forced backend.

The choice is cached per (``use`` override, ``FASTDL_BACKEND``, ``TRITON_INTERPRET`` until the
kernels are imported, device type): a call costs a few dictionary lookups, and changing any of those
(entering ``use``, setting the variable) takes effect at the next call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator

import torch

BACKENDS = ("triton", "interpret", "torch")
_CHOICES = ("auto",) + BACKENDS
ENV_VAR = "FASTDL_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastdl_backend", default=None)


class BackendError(RuntimeError):
    """A forced backend cannot run this call (the message says why)."""


def _check_choice(name: str, where: str) -> str:
    name = name.strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"{where} must be one of {', '.join(_CHOICES)}; got {name!r}")
    return name


def requested() -> str:
    """The backend asked for: the innermost ``use(...)``, else ``FASTDL_BACKEND``, else ``auto``."""
    name = _override.get()
    if name is not None:
        return name
    return _check_choice(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is absent on macOS and Windows)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    return _triton_findable()


@functools.cache
def _triton_findable() -> bool:
    # Searching sys.path costs ~100 us; installed packages do not come and go within a process.
    return importlib.util.find_spec("triton") is not None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def interpreter_active() -> bool:
    """True when fastdl's Triton kernels are (or, once imported, will be) interpreted on the CPU."""
    utils = sys.modules.get("fastdl.kernels.utils")
    if utils is not None:  # kernels already defined: their mode is fixed for this process
        return utils.INTERPRET
    return _env_true("TRITON_INTERPRET")


def _enable_interpreter() -> None:
    """Turn the interpreter on if nothing has fixed Triton's mode yet."""
    if interpreter_active() or not triton_available():
        return
    if "triton" in sys.modules or "fastdl.kernels.utils" in sys.modules:
        return  # too late: kernels would already be compiled-mode JIT functions
    os.environ["TRITON_INTERPRET"] = "1"


def _why_not(name: str, tensor: torch.Tensor) -> str | None:
    """Why backend ``name`` cannot run on ``tensor`` (None when it can)."""
    if name == "torch":
        return None
    if not triton_available():
        return "Triton is not installed (pip install triton; Linux only)"
    if name == "triton":
        if tensor.device.type != "cuda":
            return f"it needs CUDA tensors and the input is on {tensor.device}"
        if interpreter_active():
            return "TRITON_INTERPRET=1 is set, so the kernels are interpreted, not compiled"
        return None
    # interpret
    if not interpreter_active():
        return ("Triton was imported before TRITON_INTERPRET=1 was set; set "
                "FASTDL_BACKEND=interpret or TRITON_INTERPRET=1 before importing triton")
    return None


# (override, FASTDL_BACKEND, TRITON_INTERPRET or True once kernels are imported, device type) -> name.
_resolved: dict[tuple, str] = {}


def _device_type(tensor: torch.Tensor) -> str:
    """``tensor.device.type``; the is_cpu / is_cuda flags answer the common cases without building
    a torch.device and its type string."""
    if tensor.is_cpu:
        return "cpu"
    if tensor.is_cuda:
        return "cuda"
    return tensor.device.type


def resolve(tensor: torch.Tensor, requested_name: str | None = None) -> str:
    """The backend a fastdl call on ``tensor`` will use: for ``requested_name`` (what an operator
    call carries, see :func:`operator_requested`), else for :func:`requested`.

    Raises :class:`BackendError` if a forced backend (``triton`` or ``interpret``) cannot run on
    this tensor.
    """
    override = _override.get() if requested_name is None else requested_name
    if override == "torch":
        return "torch"  # fast path: use("torch") decides before the environment is read (~0.7 us)
    if override is None:
        env = os.environ.get(ENV_VAR)
        if env is not None and env.strip().lower() == "torch":
            return "torch"  # the common forced case, answered before any other lookup
    else:
        env = None  # a use() override wins over FASTDL_BACKEND (see requested()): not read
    # Once the kernels are imported, TRITON_INTERPRET no longer matters (their mode is fixed);
    # without Triton it never does.
    if "fastdl.kernels.utils" in sys.modules:
        kernels_mode = True
    else:
        kernels_mode = os.environ.get("TRITON_INTERPRET") if triton_available() else False
    key = (override, env, kernels_mode, _device_type(tensor))
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve(tensor, override)  # not cached when it raises
    return name


def _resolve(tensor: torch.Tensor, override: str | None) -> str:
    name = requested() if override is None else _check_choice(override, "the requested backend")
    if tensor.device.type == "meta":
        return "torch"  # shapes and dtypes only: torch's meta functions compute them, nothing runs
    if name == "auto":
        if triton_available() and interpreter_active():
            return "interpret"
        if _why_not("triton", tensor) is None:
            return "triton"
        return "torch"
    if name == "interpret":
        _enable_interpreter()
    reason = _why_not(name, tensor)
    if reason is not None:
        raise BackendError(f"fastdl backend {name!r} is forced but cannot run: {reason}")
    return name


def select(op: str, tensor: torch.Tensor, unsupported: str | None = None,
           requested_name: str | None = None) -> str:
    """The backend for one call of ``op``, given why its kernel cannot take this call, if it can't.

    ``unsupported`` is the op's own reason (an unsupported dtype, head dim, option...). Under
    ``auto`` such a call takes the torch path; under a forced kernel backend it raises.
    ``requested_name`` as for :func:`resolve`.
    """
    name = resolve(tensor, requested_name)
    if name == "torch" or unsupported is None:
        return name
    if (requested() if requested_name is None else requested_name) == "auto":
        return "torch"
    raise BackendError(f"{op}: the {name!r} backend is forced but its kernel cannot run this call: "
                       f"{unsupported}")


def kernels(family: str):
    """The launcher module ``fastdl.kernels.<family>``, imported on first use (needs Triton)."""
    module = sys.modules.get(f"fastdl.kernels.{family}")
    return module if module is not None else importlib.import_module(f"fastdl.kernels.{family}")


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the enclosed fastdl calls on backend ``name`` (``auto``, ``triton``, ``interpret``,
    ``torch``), whatever ``FASTDL_BACKEND`` says. Contexts nest; each thread/task has its own."""
    name = _check_choice(name, "fastdl.backend.use(name)")
    if name == "interpret":
        _enable_interpreter()
    global _use_mirror
    token = _override.set(name)
    _use_mirror = name
    tag = _tag_compile_caches()
    try:
        yield
    finally:
        _override.reset(token)
        _use_mirror = _override.get() or ""
        _tag_compile_caches(tag)


# What use() last made the innermost override, in any thread ("" for none). torch.compile cannot
# read the ContextVar, but it guards on this global: a graph traced under one use() is traced
# again under another instead of being reused.
_use_mirror = ""


def operator_requested() -> str:
    """The requested backend a fastdl operator call carries (its ``requested`` argument), which its
    implementation and its autograd formula both resolve: :func:`requested`, or, under
    ``torch.compile``, its value when the graph was traced. A compiled graph's forward and backward
    then run on one backend: the one asked for when it was traced (``use()`` changes retrace it;
    ``FASTDL_BACKEND`` is read at tracing only)."""
    if torch.compiler.is_compiling():
        return _requested_when_traced(_use_mirror)
    return requested()


def _constant_when_traced(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (which
    imports Triton and so fixes its mode before ``use("interpret")`` could, see
    :func:`_enable_interpreter`): that function only sets this attribute (tested)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_when_traced
def _requested_when_traced(_mirror: str) -> str:
    # A constant of the graph, computed once when it is traced (Dynamo cannot trace the ContextVar);
    # the argument only makes the graph guard on _use_mirror.
    return requested()


_TAG = "fastdl-backend="


def source_fingerprint(roots: tuple[str, ...] | None = None) -> str:
    """A short hash of the package's source (``fastdl`` and ``fastdl.kernels``, or ``roots``).
    Compiled graphs bake in the fake implementations and autograd formulas they were traced
    with; keyed by it, a changed or upgraded fastdl never loads a graph cached from another one
    (Inductor checked the old output shapes and raised, at best)."""
    if roots is None:
        return _package_fingerprint()
    digest = hashlib.sha256()
    for root in roots:
        for folder, _, files in sorted(os.walk(root)):
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def _package_fingerprint() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.find_spec("fastdl.kernels")  # its own folder (a package-dir mapping)
    kernels = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
    return source_fingerprint(tuple(r for r in (here, kernels) if r and not r.startswith(here + os.sep)))


def _tag_compile_caches(previous: str | None = None) -> str | None:
    """Put the requested backend and the source fingerprint into ``torch.compile``'s cache key tag
    (or restore ``previous``); returns the tag it replaced. A compiled graph's backward bakes in
    the backend chosen when it was traced, and Inductor's on-disk caches key graphs without it:
    untagged, a process running another backend could load that graph and mix backends (wrong
    gradients)."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):  # older PyTorch: nothing to tag
        return None
    old = config.cache_key_tag
    if previous is None:
        base = old.split(_TAG)[0].rstrip(";")
        mode = "interpreted" if _env_true("TRITON_INTERPRET") else "compiled"
        ours = f"{_TAG}{requested()}/{mode}/{source_fingerprint()}"
        config.cache_key_tag = f"{base};{ours}" if base else ours
    else:
        config.cache_key_tag = previous
    return old


# FASTDL_BACKEND=interpret must reach Triton before it is imported anywhere.
if os.environ.get(ENV_VAR, "").strip().lower() == "interpret":
    _enable_interpreter()
try:
    _tag_compile_caches()
except ValueError:  # a bad FASTDL_BACKEND: the first call reports it
    pass
