"""Argument checks shared by the functional API: clear errors that name the bad argument."""

from __future__ import annotations

import operator
import os

import torch


def check_floating(name: str, tensor: torch.Tensor | None) -> None:
    """TypeError unless ``tensor`` (if given) is a floating-point tensor."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_bool(name: str, value) -> None:
    """TypeError unless ``value`` is a bool (PyTorch's ops take no int, None or tensor for a flag)."""
    if type(value) is not bool:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


_CPU = torch.device("cpu")


def all_cpu(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor (None skipped) is on the CPU: they then share its one device. A
    cheap test for the common case; callers run :func:`check_same_device` when it is False, for its
    error or for other devices. (``device == _CPU`` rather than ``is_cpu``: torch.compile folds a
    device to a constant but would record each ``is_cpu`` read in its graph.)"""
    try:
        for t in tensors:
            if t is not None and t.device != _CPU:
                return False
    except AttributeError:  # not a tensor: check_same_device reports it as it always has
        return False
    return True


def check_same_device(reference: str, tensors: dict[str, torch.Tensor | None]) -> None:
    """ValueError unless every given tensor sits on the device of ``tensors[reference]``."""
    device = tensors[reference].device
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {reference} is on {device}; "
                             "move them to the same device")


def check_shape(name: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """ValueError unless ``tensor`` (if given) has exactly ``shape``."""
    if tensor is not None and tensor.shape != tuple(shape):  # torch.Size compares as a tuple
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_param_dtypes(input: torch.Tensor | torch.dtype, params: dict[str, torch.Tensor | None],
                       input_name: str = "input") -> None:
    """TypeError unless the given parameters share one dtype that is ``input``'s (a tensor, or the
    dtype of what is normalised), or float32 for an fp16/bf16 input (autocast's mix) -- the
    combinations torch's layer and batch norm accept."""
    dtype = input if isinstance(input, torch.dtype) else input.dtype
    for t in params.values():
        if t is not None and t.dtype != dtype:
            break
    else:
        return  # fast path: every parameter has the input's dtype
    given = {name: t.dtype for name, t in params.items() if t is not None}
    dtypes = set(given.values())
    if not dtypes:
        return
    low = dtype in (torch.float16, torch.bfloat16)
    if len(dtypes) > 1 or not (dtypes == {dtype} or (low and dtypes == {torch.float32})):
        listed = ", ".join(f"{name} {t}" for name, t in given.items())
        raise TypeError(f"{input_name} is {dtype} but {listed}: parameters must have the {input_name}'s "
                        "dtype (or all be float32 for a float16/bfloat16 one)")


def as_shape(name: str, shape) -> tuple[int, ...]:
    """An int or a sequence of ints as a tuple, else TypeError naming ``name``."""
    if isinstance(shape, int):
        return (shape,)
    if isinstance(shape, (torch.Size, tuple, list)):
        for s in shape:  # a loop, not all(<generator>): this runs on every norm call
            if type(s) is not int:  # (not isinstance: a bool is no size)
                break
        else:
            return tuple(shape)
        if not any(isinstance(s, bool) for s in shape):
            try:  # numpy integers and 0-d integer tensors, which torch takes too
                return tuple(operator.index(s) for s in shape)
            except TypeError:
                pass
    raise TypeError(f"{name} must be an int or a sequence of ints, got {shape!r}")


EAGER_INDEX_CHECK_VAR = "FASTDL_EAGER_INDEX_CHECK"


def eager_index_check(device: torch.device) -> bool:
    """Whether index values (embedding rows, target classes) are checked on the host, raising
    IndexError at the call: ``FASTDL_EAGER_INDEX_CHECK`` = 1 / 0 forces yes / no; unset means CPU
    tensors only (on CUDA a host check would stop the host until the GPU catches up)."""
    forced = os.environ.get(EAGER_INDEX_CHECK_VAR)
    if forced is None or forced.strip() == "":
        return device.type == "cpu"
    return forced.strip().lower() in ("1", "true", "yes", "on")


def broadcast(*shapes) -> tuple[int, ...] | None:
    """The broadcast of several shapes, or None when they do not broadcast: what
    ``torch.broadcast_shapes`` computes, at a fraction of its cost per call (it sits on every
    attention call's path)."""
    out = [1] * max(map(len, shapes))
    for shape in shapes:
        for i, d in enumerate(shape, len(out) - len(shape)):
            if d != 1:
                if out[i] != 1 and out[i] != d:
                    return None
                out[i] = d
    return tuple(out)
