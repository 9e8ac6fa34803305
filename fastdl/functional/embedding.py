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

Weight gradients on the kernel path are always computed deterministically (the default, and the
only path): the launcher sorts the indices and one program sums each run of equal indices in a
fixed order (see ``fastdl.kernels.embedding``). A float-atomic scatter would change the result
from run to run and cannot run in fp16 under Triton's interpreter; the sort costs little next to
the rows moved. Double backward works: a backward recorded with ``create_graph=True`` takes
torch's differentiable ops (see ``_double_backward``).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from .. import backend
from ._double_backward import differentiable_grads, dropout_scale_mask, recording_backward
from ._random import draw_seed
from ._validate import check_floating, check_same_device, eager_index_check


def _check_weight(name: str, weight: torch.Tensor) -> None:
    check_floating(name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (num_embeddings, embedding_dim) tensor, "
                         f"got shape {tuple(weight.shape)}")


def _check_indices(name: str, indices: torch.Tensor, num_embeddings: int, table: str,
                   values: bool = True) -> None:
    """TypeError unless ``indices`` is an int32/int64 tensor; with ``values``, an index outside
    ``[0, num_embeddings)`` raises IndexError naming it at the call (CPU), or fails a device-side
    assertion raised at the next synchronisation (CUDA): see the module docstring."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 or int32 indices, "
                        f"got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold int64 or int32 indices, got dtype {indices.dtype}")
    if not values or indices.numel() == 0 or indices.device.type == "meta":  # meta: no values
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


class EmbeddingFunction(torch.autograd.Function):
    """weight[input] on the kernel path. Saved: the flat indices only.

    The weight gradient is dense, from the deterministic sort-and-segment-sum kernel
    (``fastdl.kernels.embedding``); with ``sparse=True`` it is a sparse COO tensor built from the
    indices and the output gradient rows, as torch builds it (no kernel needed: nothing is summed).
    """

    @staticmethod
    def forward(ctx, input, weight, padding_idx: int | None, scale_grad_by_freq: bool, sparse: bool):
        idx = input.reshape(-1)
        out = backend.kernels("embedding").embedding_fwd(idx, weight)
        ctx.save_for_backward(idx)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.padding_idx, ctx.scale_grad_by_freq, ctx.sparse = padding_idx, scale_grad_by_freq, sparse
        return out.view(*input.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, dout):
        (idx,) = ctx.saved_tensors
        num, dim = ctx.weight_shape
        dout = dout.reshape(-1, dim)
        if recording_backward():  # torch's op, differentiable in dout (the weight enters linearly)
            pad = -1 if ctx.padding_idx is None else ctx.padding_idx
            dweight = torch.ops.aten.embedding_backward(dout, idx, num, pad, ctx.scale_grad_by_freq,
                                                        ctx.sparse)
            return None, dweight.to(ctx.weight_dtype), None, None, None
        if ctx.sparse:
            if ctx.scale_grad_by_freq:
                raise RuntimeError("embedding: scale_grad_by_freq is not supported with sparse gradients "
                                   "(as in PyTorch)")
            values = dout.to(ctx.weight_dtype)
            if ctx.padding_idx is not None:  # zeroed rather than removed: no data-sized result
                values = values * (idx != ctx.padding_idx).unsqueeze(1).to(values.dtype)
            dweight = torch.sparse_coo_tensor(idx.to(torch.int64).unsqueeze(0), values, (num, dim),
                                              check_invariants=False)  # indices were range-checked
        else:
            dweight = backend.kernels("embedding").embedding_bwd(
                dout, idx, num, ctx.padding_idx, ctx.scale_grad_by_freq, ctx.weight_dtype)
        return None, dweight, None, None, None


class BertEmbeddingsFunction(torch.autograd.Function):
    """The fused BERT embedding block on the kernel path.

    Saved: the three flat index vectors, the tables and LayerNorm weight and bias (references, not copies),
    per-token mean and rstd, and the dropout seed; the sum and the mask are recomputed.
    """

    @staticmethod
    def forward(ctx, input_ids, token_type_ids, position_ids, word, position, token_type, ln_weight,
                ln_bias, eps: float, p: float, seed: torch.Tensor | None, padding_idx: int | None):
        ids = [t.reshape(-1) for t in (input_ids, position_ids, token_type_ids)]
        out, mean, rstd = backend.kernels("embedding").bert_embeddings_fwd(
            *ids, word, position, token_type, ln_weight, ln_bias, eps, p, seed)
        ctx.save_for_backward(*ids, word, position, token_type, ln_weight, ln_bias, mean, rstd)
        ctx.p, ctx.seed, ctx.padding_idx, ctx.eps = p, seed, padding_idx, eps
        ctx.ln_bias_dtype = None if ln_bias is None else ln_bias.dtype
        return out.view(*input_ids.shape, word.shape[1])

    @staticmethod
    def backward(ctx, dout):
        word_ids, pos_ids, type_ids, word, position, token_type, ln_weight, ln_bias, mean, rstd = (
            ctx.saved_tensors)
        needs = ctx.needs_input_grad
        if recording_backward():
            keep = dropout_scale_mask((word_ids.numel(), word.shape[1]), ctx.p, ctx.seed, word.device)

            def reference(word, position, token_type, ln_weight, ln_bias):
                s = (F.embedding(word_ids, word, ctx.padding_idx) + F.embedding(pos_ids, position)
                     + F.embedding(type_ids, token_type))
                y = F.layer_norm(s, (word.shape[1],), ln_weight, ln_bias, ctx.eps)
                return y if keep is None else y * keep

            grads = differentiable_grads(reference, (word, position, token_type, ln_weight, ln_bias),
                                         needs[3:8], dout.reshape(-1, word.shape[1]))
            return (None, None, None, *grads, None, None, None, None)
        d_word, d_pos, d_type, d_ln_w, d_ln_b = backend.kernels("embedding").bert_embeddings_bwd(
            dout.reshape(-1, word.shape[1]), word_ids, pos_ids, type_ids, word, position, token_type,
            ln_weight, mean, rstd, ctx.p, ctx.seed, ctx.padding_idx, (needs[3], needs[4], needs[5]),
            ctx.ln_bias_dtype)
        return (None, None, None, d_word, d_pos, d_type, d_ln_w, d_ln_b, None, None, None, None)


def embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
              sparse: bool = False) -> torch.Tensor:
    """Rows of ``weight`` at ``input``, as ``torch.nn.functional.embedding``.

    input: int64/int32 indices of any shape (0-d and empty included); weight: (V, D)
    fp16/bf16/fp32/fp64. Returns ``input.shape + (D,)`` in weight's dtype. With ``max_norm`` the
    rows looked up are renormalised in place in ``weight`` first, as torch does
    (``torch.embedding_renorm_`` under no_grad). The dense weight gradient is bitwise reproducible
    (sort + segment sum, no atomics); ``sparse=True`` gives a sparse COO gradient built from the
    indices and output-gradient rows, as torch's (with ``scale_grad_by_freq`` its backward raises,
    as torch's does).
    """
    _check_weight("weight", weight)
    _check_indices("input", input, weight.shape[0], "weight", values=False)
    check_same_device("weight", {"weight": weight, "input": input})
    pad = _padding_index(padding_idx, weight.shape[0])
    if backend.select("embedding", weight) == "torch":
        # torch checks the range itself (IndexError on CPU, a device-side assert on CUDA); ours
        # runs only to name the bad index, so a valid call pays nothing for it.
        try:
            return F.embedding(input, weight, pad, max_norm, norm_type, scale_grad_by_freq, sparse)
        except IndexError:
            _check_indices("input", input, weight.shape[0], "weight")
            raise
    _check_indices("input", input, weight.shape[0], "weight")
    if max_norm is not None:
        with torch.no_grad():  # in place, and invisible to autograd, exactly as torch does it
            torch.embedding_renorm_(weight, input.contiguous(), float(max_norm), float(norm_type))
    return EmbeddingFunction.apply(input, weight, pad, bool(scale_grad_by_freq), bool(sparse))


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
    ids = {"token_type_ids": token_type_ids, "position_ids": position_ids}
    for name, ids_tensor in ids.items():
        if not isinstance(ids_tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(ids_tensor).__name__}")
        try:
            ids[name] = ids_tensor.expand(shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(ids_tensor.shape)} does not broadcast to "
                             f"input_ids' shape {tuple(shape)}") from None
    return ids["token_type_ids"], ids["position_ids"]


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
    from .dropout import _check_p

    p = _check_p(p)
    for name, table in (("word", word), ("position", position), ("token_type", token_type)):
        _check_weight(name, table)
    check_floating("ln_weight", ln_weight)
    check_floating("ln_bias", ln_bias)
    check_same_device("word", {"word": word, "position": position, "token_type": token_type,
                               "ln_weight": ln_weight, "ln_bias": ln_bias, "input_ids": input_ids,
                               "token_type_ids": token_type_ids, "position_ids": position_ids})
    dim = word.shape[1]
    for name, t in (("position", position), ("token_type", token_type), ("ln_weight", ln_weight),
                    ("ln_bias", ln_bias)):
        if t is not None and t.shape[-1] != dim:
            raise ValueError(f"{name} must have {dim} columns (word's embedding dim), got shape "
                             f"{tuple(t.shape)}")
    token_type_ids, position_ids = _bert_ids(input_ids, token_type_ids, position_ids)
    lookups = (("input_ids", input_ids, word, "word"),
               ("token_type_ids", token_type_ids, token_type, "token_type"),
               ("position_ids", position_ids, position, "position"))
    for name, ids, table, table_name in lookups:
        _check_indices(name, ids, table.shape[0], table_name, values=False)
    pad = _padding_index(padding_idx, word.shape[0])
    unsupported = None if dim <= _MAX_BERT_DIM else f"embedding dim {dim} > {_MAX_BERT_DIM}"
    if backend.select("bert_embeddings", word, unsupported) == "torch":
        try:  # as in embedding(): torch checks the range, ours only names the bad index
            x = (F.embedding(input_ids, word, pad) + F.embedding(position_ids, position)
                 + F.embedding(token_type_ids, token_type))
        except IndexError:
            for name, ids, table, table_name in lookups:
                _check_indices(name, ids, table.shape[0], table_name)
            raise
        return F.dropout(F.layer_norm(x, (dim,), ln_weight, ln_bias, eps), p, training)
    for name, ids, table, table_name in lookups:
        _check_indices(name, ids, table.shape[0], table_name)
    if not training:
        p = 0.0
    seed = draw_seed(word.device) if p > 0.0 and input_ids.numel() else None
    return BertEmbeddingsFunction.apply(input_ids, token_type_ids, position_ids, word, position,
                                        token_type, ln_weight, ln_bias, float(eps), p, seed, pad)
