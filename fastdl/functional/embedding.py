"""Embedding lookup, and the fused BERT embedding block.

``embedding`` has ``torch.nn.functional.embedding``'s signature and semantics: ``padding_idx`` (its
row gets no gradient; negative values count from the end), ``max_norm`` / ``norm_type`` (the rows
looked up are renormalised in place in ``weight`` before the lookup), ``scale_grad_by_freq`` (each
row's gradient divided by how often it occurs in the batch) and ``sparse`` (a sparse COO gradient).

``bert_embeddings`` computes, in one forward and one backward kernel::

    out = dropout(LayerNorm(word[input_ids] + position[position_ids] + token_type[token_type_ids]))

Every backend checks the indices: a non-integer index tensor raises TypeError at the call. An
index outside ``[0, num_embeddings)``:

* CPU tensors: IndexError at the call, naming the first bad value (one min/max reduction; reading
  it costs nothing on the CPU).
* CUDA (and other accelerator) tensors: a device-side check, as torch's own embedding does -- the
  error is raised at the next synchronisation point (``RuntimeError: ... device-side assert``), so
  the check never stops the host and a step can run inside a CUDA graph. The kernels never read
  or write out of bounds meanwhile (the row of a bad index is zero). To see the bad value, run
  the same call on CPU tensors, or set the environment variable ``FASTDL_EAGER_INDEX_CHECK=1``
  (every device then reads the range back, one host sync per index tensor, and raises the CPU's
  IndexError at the call; ``=0`` gives CPU tensors the device-side check too).

The checks read index values, so they run inside the operators (below ``torch.compile``'s
tracing): eager calls still raise at once and compiled graphs do not break on them.

Weight gradients on the kernel path are always computed deterministically (the default, and the
only path): the launcher sorts the indices and one program sums each run of equal indices in a
fixed order (see ``fastdl.kernels.embedding``). A float-atomic scatter would change the result
from run to run and cannot run in fp16 under Triton's interpreter; the sort costs little next to
the rows moved. Double backward works on every path: a backward recorded with
``create_graph=True`` runs torch's differentiable ops.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .. import backend
from ._library import (as_output, autocast_dtype, eager_torch_path, fake, fake_like, masks_from, operator,
                       or_empty,
                       or_none, path, recompute_grads, stats_dtype, unaliased)
from ._double_backward import dropout_scale_mask
from ._random import draw_seed
from ._validate import all_cpu, check_bool, check_floating, check_same_device, eager_index_check
from .dropout import _check_p, _torch_dropout


# Tables PyTorch also looks rows up in, without gradient; fastdl hands them to torch's lookup.
_PLAIN_TABLES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)


def _check_weight(name: str, weight: torch.Tensor, plain_ok: bool = False) -> None:
    if not (plain_ok and isinstance(weight, torch.Tensor) and weight.dtype in _PLAIN_TABLES):
        check_floating(name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (num_embeddings, embedding_dim) tensor, "
                         f"got shape {tuple(weight.shape)}")


def _check_index_dtype(name: str, indices) -> None:
    """TypeError unless ``indices`` is an int32/int64 tensor."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 or int32 indices, "
                        f"got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold int64 or int32 indices, got dtype {indices.dtype}")


def _check_range(name: str, indices: torch.Tensor, num_embeddings: int, table: str) -> None:
    """An index outside ``[0, num_embeddings)`` raises IndexError naming it at the call (CPU), or
    fails a device-side assertion raised at the next synchronisation (CUDA): see the module
    docstring. It reads values, so it runs inside the operators."""
    if indices.numel() == 0 or indices.device.type == "meta":  # meta: no values
        return
    if not eager_index_check(indices.device):
        in_range = ((indices >= 0) & (indices < num_embeddings)).all()
        torch._assert_async(in_range, f"fastdl: {name} contains an index outside [0, {num_embeddings}) "
                                      f"for {table}")
        return
    low, high = (v.item() for v in torch.aminmax(indices))
    if low < 0 or high >= num_embeddings:
        bad = low if low < 0 else high
        raise IndexError(f"{name} contains index {bad}, outside [0, {num_embeddings}) for {table} "
                         f"with {num_embeddings} rows")


def _padding_index(padding_idx, num_embeddings: int) -> int | None:
    """``padding_idx`` as a row number in ``[0, num_embeddings)`` (negative counts from the end)."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx={padding_idx} must be within num_embeddings={num_embeddings} "
                         f"(in [{-num_embeddings}, {num_embeddings}))")
    return int(padding_idx) % num_embeddings


# Widest embedding dim the fused BERT kernel takes (its row stays in registers); wider -> torch path.
_MAX_BERT_DIM = 16384


def _pad_or_none(padding_idx: int) -> int | None:
    """Operators carry "no padding row" as -1 (as aten does)."""
    return None if padding_idx < 0 else padding_idx


@operator("embedding")
def _embedding_op(input: torch.Tensor, weight: torch.Tensor, padding_idx: int, scale_grad_by_freq: bool,
                  sparse: bool, requested: str) -> torch.Tensor:
    """weight[input] -> input.shape + (D,); ``padding_idx`` -1 for none."""
    if path("embedding", weight, None, requested) == "torch":
        # torch checks the range itself (IndexError on CPU, a device-side assert on CUDA); ours
        # runs only to name the bad index, so a valid call pays nothing for it.
        try:
            return F.embedding(input, weight, _pad_or_none(padding_idx), None, 2.0, scale_grad_by_freq,
                               sparse)
        except IndexError:
            _check_range("input", input, weight.shape[0], "weight")
            raise
    _check_range("input", input, weight.shape[0], "weight")
    out = backend.kernels("embedding").embedding_fwd(input.reshape(-1), weight)
    return as_output(out, (*input.shape, weight.shape[1]))


@fake(_embedding_op)
def _(input, weight, padding_idx, scale_grad_by_freq, sparse, requested):
    return weight.new_empty((*input.shape, weight.shape[1]))


@operator("embedding_backward")
def _embedding_backward_op(grad: torch.Tensor, input: torch.Tensor, num_embeddings: int, padding_idx: int,
                           scale_grad_by_freq: bool, weight_dtype: torch.dtype,
                           backend_name: str) -> torch.Tensor:
    """The dense (V, D) weight gradient: row v sums the gradient rows of the tokens equal to v."""
    grad = grad.reshape(input.numel(), grad.shape[-1])  # not (-1, D): D may be 0
    if backend_name == "torch":
        return torch.ops.aten.embedding_dense_backward(
            grad, input.reshape(-1), num_embeddings, padding_idx, scale_grad_by_freq).to(weight_dtype)
    return backend.kernels("embedding").embedding_bwd(grad, input.reshape(-1), num_embeddings,
                                                      _pad_or_none(padding_idx), scale_grad_by_freq,
                                                      weight_dtype)


@fake(_embedding_backward_op)
def _(grad, input, num_embeddings, padding_idx, scale_grad_by_freq, weight_dtype, backend_name):
    return grad.new_empty((num_embeddings, grad.shape[-1]), dtype=weight_dtype)


def _embedding_setup(ctx, inputs, output):
    input, weight, padding_idx, scale_grad_by_freq, sparse, requested = inputs
    ctx.save_for_backward(input)
    ctx.args = (weight.shape[0], padding_idx, scale_grad_by_freq)
    ctx.sparse, ctx.weight_dtype = sparse, weight.dtype
    ctx.backend_name = path("embedding", weight, None, requested)


def _embedding_grad(ctx, grad):
    (input,) = ctx.saved_tensors
    num, padding_idx, scale_grad_by_freq = ctx.args
    if ctx.sparse:  # built from the indices and gradient rows, as torch builds it: nothing is summed
        if scale_grad_by_freq:
            raise RuntimeError("embedding: scale_grad_by_freq is not supported with sparse gradients "
                               "(as in PyTorch)")
        idx, values = input.reshape(-1), grad.reshape(input.numel(), grad.shape[-1]).to(ctx.weight_dtype)
        if padding_idx >= 0:  # zeroed (not times 0: inf * 0 is NaN) rather than removed: no data-sized result
            values = torch.where((idx != padding_idx).unsqueeze(1), values, 0)
        dweight = torch.sparse_coo_tensor(idx.to(torch.int64).unsqueeze(0), values, (num, values.shape[1]),
                                          check_invariants=False)  # indices were range-checked
    elif torch.is_grad_enabled():  # double backward: the same linear map in differentiable torch
        dweight = torch.ops.aten.embedding_dense_backward(
            grad, input, num, padding_idx, scale_grad_by_freq).to(ctx.weight_dtype)
    else:
        dweight = torch.ops.fastdl.embedding_backward(grad, input, *ctx.args, ctx.weight_dtype,
                                                      ctx.backend_name)
    return None, dweight, None, None, None, None


_embedding_op.register_autograd(_embedding_grad, setup_context=_embedding_setup)


@operator("embedding_renorm_", mutates_args=("weight",))
def _embedding_renorm_op(weight: torch.Tensor, input: torch.Tensor, max_norm: float,
                         norm_type: float) -> None:
    """Rescale, in place, the rows of ``weight`` that ``input`` looks up to norm <= max_norm
    (``torch.embedding_renorm_``), after checking the indices (a bad one would write out of
    bounds)."""
    _check_range("input", input, weight.shape[0], "weight")
    torch.embedding_renorm_(weight, input.contiguous(), max_norm, norm_type)


@fake(_embedding_renorm_op)
def _(weight, input, max_norm, norm_type):
    return None


def _bert_unsupported(word: torch.Tensor) -> str | None:
    dim = word.shape[1]
    return None if dim <= _MAX_BERT_DIM else f"embedding dim {dim} > {_MAX_BERT_DIM}"


def _bert_path(word: torch.Tensor, requested: str) -> str:
    return path("bert_embeddings", word, _bert_unsupported(word), requested)


def _torch_bert_embeddings(input_ids, token_type_ids, position_ids, word, position, token_type, ln_weight,
                           ln_bias, eps: float, p: float, seed, padding_idx: int,
                           backend_name: str = "torch"):
    """The block in PyTorch, the dropout mask being ``backend_name``'s for ``seed``: the torch
    path's forward and what its backward recomputes, and the differentiable recomputation for
    double backward."""
    x = (F.embedding(input_ids, word, _pad_or_none(padding_idx)) + F.embedding(position_ids, position)
         + F.embedding(token_type_ids, token_type))
    x = F.layer_norm(x, (word.shape[1],), ln_weight, ln_bias, eps)
    if p == 0.0:
        return x
    if backend_name == "torch":
        return _torch_dropout(x, p, seed)
    # The kernel's mask over the contiguous (tokens, D) rows, differentiably.
    return (x * dropout_scale_mask(x.shape, p, seed, x.device)).to(x.dtype)


def _lookups(input_ids, token_type_ids, position_ids, word, position, token_type):
    """(argument name, indices, table, table name) of the three lookups."""
    return (("input_ids", input_ids, word, "word"),
            ("token_type_ids", token_type_ids, token_type, "token_type"),
            ("position_ids", position_ids, position, "position"))


def _bert_embeddings_torch_path(input_ids, token_type_ids, position_ids, word, position, token_type, *rest):
    """The torch path's forward; torch checks the index range, ours runs only to name a bad index."""
    try:
        return _torch_bert_embeddings(input_ids, token_type_ids, position_ids, word, position, token_type,
                                      *rest)
    except IndexError:
        for name, ids, table, table_name in _lookups(input_ids, token_type_ids, position_ids, word, position,
                                                     token_type):
            _check_range(name, ids, table.shape[0], table_name)
        raise


@operator("bert_embeddings")
def _bert_embeddings_op(input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor,
                        word: torch.Tensor, position: torch.Tensor, token_type: torch.Tensor,
                        ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float, p: float,
                        seed: torch.Tensor | None, padding_idx: int, requested: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out input_ids.shape + (D,), mean (M,), rstd (M,)); the statistics are zeros on the torch
    path (its backward recomputes). The index tensors share input_ids' shape."""
    if _bert_path(word, requested) == "torch":
        out = _bert_embeddings_torch_path(input_ids, token_type_ids, position_ids, word, position, token_type,
                                          ln_weight, ln_bias, eps, p, seed, padding_idx)
        zeros = word.new_zeros(input_ids.numel(), dtype=stats_dtype(out.dtype))
        return out, zeros, zeros.clone()
    for name, ids, table, table_name in _lookups(input_ids, token_type_ids, position_ids, word, position,
                                                 token_type):
        _check_range(name, ids, table.shape[0], table_name)
    ids = [t.reshape(-1) for t in (input_ids, position_ids, token_type_ids)]
    out, mean, rstd = backend.kernels("embedding").bert_embeddings_fwd(
        *ids, word, position, token_type, ln_weight, ln_bias, eps, p, seed)
    return as_output(out, (*input_ids.shape, word.shape[1])), mean, rstd


def _bert_dtype(word, position, token_type) -> torch.dtype:
    return torch.promote_types(torch.promote_types(word.dtype, position.dtype), token_type.dtype)


@fake(_bert_embeddings_op)
def _(input_ids, token_type_ids, position_ids, word, position, token_type, ln_weight, ln_bias, eps, p, seed,
      padding_idx, requested):
    dtype = _bert_dtype(word, position, token_type)
    rows = input_ids.numel()
    return (word.new_empty((*input_ids.shape, word.shape[1]), dtype=dtype),
            word.new_empty(rows, dtype=stats_dtype(dtype)), word.new_empty(rows, dtype=stats_dtype(dtype)))


@operator("bert_embeddings_backward")
def _bert_embeddings_backward_op(
        grad: torch.Tensor, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor,
        word: torch.Tensor, position: torch.Tensor, token_type: torch.Tensor, ln_weight: torch.Tensor | None,
        ln_bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, eps: float, p: float,
        seed: torch.Tensor | None, padding_idx: int, needs_grad: list[bool], backend_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of word, position, token_type, ln_weight, ln_bias (an empty tensor where absent
    or, for a table, not in ``needs_grad``)."""
    if backend_name == "torch":
        grads = recompute_grads(
            lambda w, pos, typ, lw, lb: _torch_bert_embeddings(
                input_ids, token_type_ids, position_ids, w, pos, typ, lw, lb, eps, p, seed, padding_idx),
            (word, position, token_type, ln_weight, ln_bias), (grad,))
    else:
        ids = [t.reshape(-1) for t in (input_ids, position_ids, token_type_ids)]
        grads = backend.kernels("embedding").bert_embeddings_bwd(
            grad.reshape(-1, word.shape[1]), *ids, word, position, token_type, ln_weight, mean, rstd, p,
            seed, _pad_or_none(padding_idx), tuple(needs_grad),
            None if ln_bias is None else ln_bias.dtype)
    grads = [g if i >= 3 or need else None for i, (g, need) in enumerate(zip(grads, [*needs_grad, 1, 1]))]
    return tuple(unaliased([or_empty(g, word) for g in grads], (grad,)))


@fake(_bert_embeddings_backward_op)
def _(grad, input_ids, token_type_ids, position_ids, word, position, token_type, ln_weight, ln_bias, mean,
      rstd, eps, p, seed, padding_idx, needs_grad, backend_name):
    tables = [fake_like(t if need else None, word)
              for t, need in zip((word, position, token_type), needs_grad)]
    return (*tables, fake_like(ln_weight, word), fake_like(ln_bias, word))


def _bert_embeddings_setup(ctx, inputs, output):
    *tensors, eps, p, seed, padding_idx, requested = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*tensors, *output[1:], seed)
    ctx.args = (eps, p)
    ctx.padding_idx = padding_idx
    ctx.backend_name = _bert_path(tensors[3], requested)


def _bert_embeddings_grad(ctx, grad, *_stats):
    *tensors, mean, rstd, seed = ctx.saved_tensors
    (eps, p), pad = ctx.args, ctx.padding_idx
    if torch.is_grad_enabled():  # double backward: differentiable PyTorch with the forward's mask
        grads = recompute_grads(lambda *t: _torch_bert_embeddings(*t, eps, p, seed, pad, ctx.backend_name),
                                tensors, (grad,), create_graph=True)
        return (*grads, None, None, None, None, None)
    needs = list(ctx.needs_input_grad[3:6])
    d_word, d_pos, d_type, d_lnw, d_lnb = torch.ops.fastdl.bert_embeddings_backward(
        grad, *tensors, mean, rstd, eps, p, seed, pad, needs, ctx.backend_name)
    word, position, token_type, ln_weight, ln_bias = tensors[3:]
    d_tables = [d if need else None for d, need in zip((d_word, d_pos, d_type), needs)]
    return (None, None, None, *d_tables, or_none(d_lnw, ln_weight), or_none(d_lnb, ln_bias),
            None, None, None, None, None)


_bert_embeddings_op.register_autograd(_bert_embeddings_grad, setup_context=_bert_embeddings_setup)


def embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
              sparse: bool = False) -> torch.Tensor:
    """Rows of ``weight`` at ``input``, as ``torch.nn.functional.embedding``.

    input: int64/int32 indices of any shape (0-d and empty included); weight: (V, D)
    fp16/bf16/fp32/fp64 (or an integer or bool table: PyTorch's plain lookup, no gradient).
    Returns ``input.shape + (D,)`` in weight's dtype. With ``max_norm`` the rows looked up are
    renormalised in place in ``weight`` first, as torch does
    (``torch.embedding_renorm_`` under no_grad). The dense weight gradient is bitwise reproducible
    (sort + segment sum, no atomics); ``sparse=True`` gives a sparse COO gradient built from the
    indices and output-gradient rows, as torch's (with ``scale_grad_by_freq`` its backward raises,
    as torch's does).
    """
    _check_weight("weight", weight, plain_ok=True)
    _check_index_dtype("input", input)
    if not all_cpu(weight, input):
        check_same_device("weight", {"weight": weight, "input": input})
    pad = _padding_index(padding_idx, weight.shape[0])
    # An integer or bool table is a plain lookup without gradient: PyTorch's, on every backend.
    if not weight.is_floating_point() or eager_torch_path("embedding", weight):
        try:  # torch checks the range itself; ours runs only to name the bad index
            return F.embedding(input, weight, pad, max_norm, norm_type, scale_grad_by_freq, sparse)
        except IndexError:
            _check_range("input", input, weight.shape[0], "weight")
            raise
    if max_norm is not None:
        with torch.no_grad():  # in place, and invisible to autograd, exactly as torch does it
            torch.ops.fastdl.embedding_renorm_(weight, input, float(max_norm), float(norm_type))
    return torch.ops.fastdl.embedding(input, weight, -1 if pad is None else pad, bool(scale_grad_by_freq),
                                      bool(sparse), backend.operator_requested())


def _bert_ids(input_ids, token_type_ids, position_ids):
    """token_type_ids None -> zeros; position_ids None -> arange(L) over the last dim; both
    broadcast to input_ids' shape."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() == 0:
        raise ValueError("input_ids must be a tensor of at least one dimension, (B, L) or (L,)")
    shape = input_ids.shape
    if token_type_ids is None:
        token_type_ids = torch.zeros(shape, dtype=input_ids.dtype, device=input_ids.device)
    if position_ids is None:
        position_ids = torch.arange(shape[-1], dtype=input_ids.dtype, device=input_ids.device)
    return (_broadcast_ids("token_type_ids", token_type_ids, shape),
            _broadcast_ids("position_ids", position_ids, shape))


def _broadcast_ids(name: str, ids, shape: torch.Size) -> torch.Tensor:
    """``ids`` expanded to ``shape``, else TypeError / ValueError naming ``name``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(ids).__name__}")
    if ids.shape == shape:
        return ids  # fast path: already input_ids' shape, nothing to expand
    try:
        return ids.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(ids.shape)} does not broadcast to "
                         f"input_ids' shape {tuple(shape)}") from None


def bert_embeddings(input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                    position_ids: torch.Tensor | None, word: torch.Tensor, position: torch.Tensor,
                    token_type: torch.Tensor, ln_weight: torch.Tensor | None,
                    ln_bias: torch.Tensor | None, eps: float, p: float, training: bool, *,
                    padding_idx: int | None = None) -> torch.Tensor:
    """BERT's embedding block, fused::

        dropout(LayerNorm(word[input_ids] + position[position_ids] + token_type[token_type_ids]))

    input_ids: int64/int32 (B, L) (any shape whose last dim is the sequence); token_type_ids:
    broadcastable to it, or None (all zeros); position_ids: broadcastable to it, or None
    (``arange(L)`` for every sequence, as Hugging Face BERT). word (V, D), position (P, D),
    token_type (T, D): fp16/bf16/fp32/fp64; ln_weight, ln_bias: (D,) or None. ``padding_idx`` is
    the word table's padding row (it gets no gradient, as ``torch.nn.Embedding(padding_idx=...)``).
    Dropout with probability ``p`` when ``training``. Returns ``input_ids.shape + (D,)`` in the
    promoted dtype of the three tables.
    """
    p = _check_p(p)
    check_bool("training", training)
    _check_weight("word", word)
    _check_weight("position", position)
    _check_weight("token_type", token_type)
    check_floating("ln_weight", ln_weight)
    check_floating("ln_bias", ln_bias)
    if not all_cpu(word, position, token_type, ln_weight, ln_bias, input_ids, token_type_ids, position_ids):
        check_same_device("word", {"word": word, "position": position, "token_type": token_type,
                                   "ln_weight": ln_weight, "ln_bias": ln_bias, "input_ids": input_ids,
                                   "token_type_ids": token_type_ids, "position_ids": position_ids})
    dim = word.shape[1]
    if (position.shape[1] != dim or token_type.shape[1] != dim  # fast path: one test per table
            or (ln_weight is not None and ln_weight.shape != (dim,))
            or (ln_bias is not None and ln_bias.shape != (dim,))):
        for name, t in (("position", position), ("token_type", token_type)):
            if t.shape[1] != dim:
                raise ValueError(f"{name} must have {dim} columns (word's embedding dim), got shape "
                                 f"{tuple(t.shape)}")
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
            if t is not None and t.shape != (dim,):
                raise ValueError(f"{name} must have shape ({dim},) (word's embedding dim), got shape "
                                 f"{tuple(t.shape)}")
    _check_index_dtype("input_ids", input_ids)
    token_type_ids, position_ids = _bert_ids(input_ids, token_type_ids, position_ids)
    _check_index_dtype("token_type_ids", token_type_ids)
    _check_index_dtype("position_ids", position_ids)
    pad = _padding_index(padding_idx, word.shape[0])
    if not training:
        p = 0.0
    seed = draw_seed(word.device) if p > 0.0 and input_ids.numel() else None
    args = (input_ids, token_type_ids, position_ids, word, position, token_type, ln_weight, ln_bias,
            float(eps), p, seed, -1 if pad is None else pad)
    if eager_torch_path("bert_embeddings", word, lambda: _bert_unsupported(word)):
        out = _bert_embeddings_torch_path(*args, masks_from(word, seed, lambda: _bert_unsupported(word)))
    else:
        out = torch.ops.fastdl.bert_embeddings(*args, backend.operator_requested())[0]
    if word.is_cuda and autocast_dtype(word) is not None:
        out = out.float()  # torch's LayerNorm runs in float32 under CUDA autocast
    return out
