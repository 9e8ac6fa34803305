"""How a public function becomes a PyTorch operator, ``torch.ops.fastdl.<name>``.

Each public function is a thin Python front -- argument checks that read shapes and dtypes (never
values), autocast casts, the dropout seed -- over a ``torch.library.custom_op``:

* the operator takes the *requested* backend as its last argument
  (:func:`fastdl.backend.operator_requested`: ``use()``, else ``FASTDL_BACKEND``, else ``auto``; a
  constant of a compiled graph, which guards on ``use()``), and its implementation and its autograd
  formula both resolve it against the tensors (:func:`path`), so forward and backward run on one
  backend, eager or compiled, and ``torch.compile`` / ``torch.export`` see one opaque ``fastdl``
  operator whatever backend runs; checks that read index *values* run there too;
* a fake implementation gives output shapes and dtypes (FakeTensors, meta tensors, export);
* the autograd formula calls a backward operator, ``torch.ops.fastdl.<name>_backward``, with the
  backend the forward resolved (recorded when the forward's autograd node is made).

The torch path's backward re-runs the forward in PyTorch under autograd (:func:`recompute_grads`)
rather than storing its intermediates, and its randomness comes from torch's generator seeded
with the op's seed (:func:`seeded`; CPU dropout draws the same from a private generator in that
state, :func:`seeded_cpu_generator`), so the backward sees the forward's mask again. When the
backward itself runs with grad mode on (``create_graph=True``), the formula runs that PyTorch
recomputation differentiably instead of calling the backward operator: double backward works on
every backend.

Autocast: torch's autocast lists have no entry for a custom operator (autocast passes it through,
and its implementation runs with autocast off), so each front casts its arguments as autocast
casts the torch twin's (:func:`autocast_dtype`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence

import torch

from .. import backend

_CPU = torch.device("cpu")
_forward_ad = torch.autograd.forward_ad
_functorch = torch._C._functorch
_DIFFERENTIATING = (_functorch.TransformType.Grad, _functorch.TransformType.Jvp)


def operator(name: str, mutates_args: Sequence[str] = ()):
    """``torch.library.custom_op("fastdl::<name>")``. Its implementation runs below autocast (the
    dispatcher excludes the autocast keys there), so the front does the casting; it refuses
    forward-mode AD (:func:`refusing_tangents`) and runs on its tensors' GPU
    (:func:`on_inputs_device`)."""
    return lambda fn: torch.library.custom_op(
        f"fastdl::{name}", on_inputs_device(refusing_tangents(name, fn)), mutates_args=tuple(mutates_args))


def on_inputs_device(fn: Callable) -> Callable:
    """``fn``, run with its first CUDA tensor argument's device as the current CUDA device. Triton
    launches on the current device (and its current stream), and PyTorch sets no device for a
    custom operator: without this, tensors on ``cuda:1`` while ``cuda:0`` is current -- a model
    moved with ``.to("cuda:1")``, no ``torch.cuda.set_device`` -- would be refused by Triton's
    launcher. The common case, tensors on the current device, costs one device query."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = cuda_device_of(args, kwargs.values())
        if device is None or device.index is None or device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    run.runs_on_inputs_device = True
    return run


def cuda_device_of(*groups) -> torch.device | None:
    """The device of the first CUDA tensor among the arguments in ``groups``, else None."""
    for group in groups:
        for arg in group:
            if isinstance(arg, torch.Tensor) and arg.is_cuda:
                return arg.device
    return None


def fake(op):
    """``op.register_fake`` for a fake implementation that refuses forward-mode AD, as the real
    one does (a compiled graph is traced through the fake one)."""
    return lambda fn: op.register_fake(refusing_tangents(op._name, fn))


def refusing_tangents(name: str, fn: Callable) -> Callable:
    """``fn``, raising NotImplementedError when called under forward-mode AD. PyTorch calls a custom
    operator there without its tangents and returns zero tangents for its outputs: a silent wrong
    answer. Eager fronts never get here under forward AD (:func:`transform_reason` sends them to
    PyTorch ops); ``torch.compile`` traces through the operator, so it raises at compile time."""
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if _forward_ad._current_level >= 0:
            raise NotImplementedError(
                f"fastdl::{name} has no forward-mode AD formula (torch.func.jvp/jacfwd, "
                f"torch.autograd.forward_ad): call the fastdl function outside torch.compile, where "
                f"it runs PyTorch ops under forward AD")
        return fn(*args, **kwargs)

    return checked


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The lower-precision dtype autocast is on for ``tensor``'s device type, else None."""
    # Not device.type, which builds a string on every call. (Compiled fronts trace this: a device
    # and is_cuda fold to constants there, is_cpu would be recorded in the graph.)
    if tensor.device == _CPU:
        device_type = "cpu"
    elif tensor.is_cuda:
        device_type = "cuda"
    else:
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_to(dtype: torch.dtype | None, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` cast as autocast casts an eligible argument (floating, not float64) to
    ``dtype``; unchanged when ``dtype`` is None or the tensor is not eligible."""
    if dtype is None or tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


def path(op: str, tensor: torch.Tensor, unsupported: str | None, requested: str) -> str:
    """The backend that runs this call of ``op``, for the ``requested`` backend its operator call
    carries (see :func:`fastdl.backend.select`, :func:`fastdl.backend.operator_requested`)."""
    return backend.select(op, tensor, unsupported, requested)


def transform_reason() -> str | None:
    """Why no operator can take a call now, or None: forward-mode AD is on (a
    ``forward_ad.dual_level``, or ``torch.func.jvp`` / ``jacfwd``, which open one), or a
    ``torch.func`` transform that differentiates (``grad``, ``vjp``, ``jacrev``) is active.
    PyTorch runs a custom operator without its tangents under the first (silent zeros) and
    refuses its autograd formula under the second, so fronts then run PyTorch ops (the torch
    path) -- or raise, when a kernel backend is forced. ``vmap`` alone is fine (PyTorch loops)."""
    if _forward_ad._current_level >= 0:
        return ("forward-mode AD is active (torch.func.jvp/jacfwd or torch.autograd.forward_ad), and "
                "PyTorch would run the kernel's operator without its tangents")
    stack = _functorch.get_interpreter_stack()
    if stack and any(level.key() in _DIFFERENTIATING for level in stack):
        return ("a torch.func transform that differentiates (grad, vjp, jacrev) is active, and "
                "PyTorch's custom operators cannot run under it")
    return None


def eager_torch_path(op: str, tensor: torch.Tensor, unsupported: Callable[[], str | None] | None = None
                     ) -> bool:
    """True when this call runs eagerly on the torch path. The front then calls the PyTorch ops the
    operator would run, itself: no operator dispatch (about 13 us a call) and PyTorch's own
    autograd instead of the operator's recomputing backward -- same values, same dropout masks.
    Under ``torch.compile`` / ``torch.export`` it is False without looking at the backend, so
    graphs always hold the operator. ``unsupported`` (called only when a kernel backend is
    active) gives the op's reason the kernel cannot take the call, as for :func:`path`; under
    forward-mode AD or ``torch.func.grad`` (:func:`transform_reason`) no kernel can."""
    if torch.compiler.is_compiling():
        return False
    name = backend.resolve(tensor)
    if name == "torch":
        return True
    reason = transform_reason()
    if reason is None and unsupported is not None:
        reason = unsupported()
    return backend.select(op, tensor, reason) == "torch"


def masks_from(tensor: torch.Tensor, seed: torch.Tensor | None,
               unsupported: Callable[[], str | None] | None = None) -> str:
    """Whose dropout masks a call on the eager torch path draws (after :func:`eager_torch_path`
    said True): the kernel backend's when only a ``torch.func`` transform or forward-mode AD kept
    the kernel from the call -- so ``torch.manual_seed`` gives the masks eager calls get, and
    forward-mode and reverse-mode checks of one function agree -- else ``"torch"`` (also for a
    per-sample seed under ``vmap``, whose masks vmap draws)."""
    if seed is None or torch.compiler.is_compiling():
        return "torch"
    name = backend.resolve(tensor)
    if name == "torch" or transform_reason() is None or per_sample(seed):
        return "torch"
    return "torch" if unsupported is not None and unsupported() is not None else name


def or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``t``, or for None the empty tensor an operator returns in its place (a schema's tensor
    outputs cannot be None, e.g. the gradient of an absent bias)."""
    return like.new_empty(0) if t is None else t


def or_none(t: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor | None:
    """An operator's output back as None where the tensor it stands for is absent."""
    return t if present is not None else None


def fake_like(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Fake output shaped like ``t``, or the empty stand-in for None."""
    return like.new_empty(0) if t is None else t.new_empty(t.shape)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-row/per-channel statistics: float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def seeded(seed: torch.Tensor | None):
    """Run the enclosed PyTorch code with torch's generator for ``seed``'s device seeded from
    ``seed`` (a 1-element integer tensor), restoring the generator afterwards: the torch path's
    randomness is then a function of the seed, as the kernels' is. Reads the seed on the host."""
    if seed is None or seed.is_meta or per_sample(seed):
        # Meta tensors: no values, nothing to seed. A seed batched by vmap(randomness="different"):
        # one per sample, which torch's generator cannot take; vmap draws each sample's randomness
        # itself, as for torch's op (an eager path: PyTorch's autograd records the mask).
        yield
        return
    if seed.is_cuda:
        device = seed.device
        with torch.random.fork_rng(devices=[device], device_type="cuda"), torch.cuda.device(device):
            torch.cuda.manual_seed(int(seed))
            yield
        return
    # What fork_rng(devices=[]) saves and restores (the CPU generator's state), without its ~5 us
    # of accelerator and device bookkeeping.
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(int(seed))
    try:
        yield
    finally:
        generator.set_state(state)


def per_sample(seed: torch.Tensor) -> bool:
    """Whether ``seed`` holds one value per sample: batched by ``vmap(randomness="different")`` at
    some level of ``torch.func`` wrappers (``vmap(grad(f))`` wraps the batched seed again)."""
    while _functorch.is_functorch_wrapped_tensor(seed):
        if _functorch.is_batchedtensor(seed):
            return True
        seed = _functorch.get_unwrapped(seed)
    return False


class _PrivateGenerators(threading.local):
    """One CPU generator per thread, private to fastdl (seeding it leaves torch's alone)."""

    def __init__(self):
        self.cpu = torch.Generator()


_private = _PrivateGenerators()


def seeded_cpu_generator(seed: torch.Tensor) -> torch.Generator:
    """A CPU generator in the state torch's default generator is in after ``manual_seed(seed)``:
    it draws what the default generator would under :func:`seeded`, without saving and restoring
    the default generator's state. One per thread; reseeded at each call. Reads the seed."""
    generator = _private.cpu
    generator.manual_seed(int(seed))
    return generator


def recompute_grads(fn: Callable, inputs: Sequence, grads: Sequence[torch.Tensor | None],
                    create_graph: bool = False) -> list[torch.Tensor | None]:
    """Gradients of ``fn(*inputs)`` (a tensor or tuple of tensors) with respect to the
    floating-point tensors in ``inputs``, given the outputs' gradients (None for an unused
    output); None for the other inputs.

    Without ``create_graph`` (inside a backward operator's implementation, below the autograd
    dispatch key, where ``torch.autograd.grad`` records nothing) ``torch.func.vjp`` differentiates
    detached inputs. With ``create_graph`` (inside an autograd formula) the inputs that require
    grad are differentiated by ``torch.autograd.grad`` and the result keeps its history.
    """
    def wants(x) -> bool:
        return isinstance(x, torch.Tensor) and (x.requires_grad if create_graph else x.is_floating_point())

    wanted = [wants(x) for x in inputs]
    if not any(wanted):
        return [None] * len(inputs)
    if create_graph:
        with torch.enable_grad():
            outs = fn(*inputs)
            outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            found = torch.autograd.grad([o for o, _ in pairs], [x for x, w in zip(inputs, wanted) if w],
                                        [g for _, g in pairs], allow_unused=True, create_graph=True)
    else:
        def call(*primals):
            it = iter(primals)
            return fn(*[next(it) if want else x for x, want in zip(inputs, wanted)])

        outs, vjp = torch.func.vjp(call, *[x.detach() for x, want in zip(inputs, wanted) if want])
        single = isinstance(outs, torch.Tensor)
        outs = (outs,) if single else tuple(outs)
        grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads)]
        found = unaliased(vjp(grads[0] if single else tuple(grads)), grads)
    found = iter(found)
    return [next(found) if want else None for want in wanted]


def unaliased(results: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor | None]) -> list:
    """``results`` with copies where one shares memory with an input or an earlier result (an
    operator's outputs must not alias: a vjp may hand one gradient to two inputs, a launcher may
    return slices of one buffer)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    out = []
    for r in results:
        if r is not None:
            ptr = r.untyped_storage().data_ptr()
            if ptr in seen:
                r = r.clone()
            seen.add(r.untyped_storage().data_ptr())
        out.append(r)
    return out


def as_output(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``t.view(shape)`` as a tensor of its own, not a view: what an operator returns for a kernel's
    (rows, N) result. Autograd forbids changing in place a view made inside a custom function, so
    a viewed output would make ``y = layer_norm(x); y.relu_()`` raise where torch's works. ``t``
    is the launcher's fresh buffer, held by no one else: sharing its storage is safe."""
    v = t.view(shape)
    if not v._is_view():
        return v
    return v.new_empty(0).set_(v.untyped_storage(), v.storage_offset(), v.shape, v.stride())
