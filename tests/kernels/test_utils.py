"""Launch grids against CUDA's limits (kernels/utils.py ``check_grid``, ``grid_2d``).

CUDA runs at most 65,535 programs along grid axes 1 and 2. Launchers whose grid grows with the
batch, the heads or the channels fold those into axis 0 (2^31 - 1 programs), and every launcher
passes its grid through ``check_grid``. The shapes here would have passed the limit on a
(tiles, heads, batch) or (rows, channel blocks) grid. Their grids are recorded rather than run:
70,000 interpreted attention programs take most of an hour. The folded indexing itself
(``grid_2d``: tile, head and batch entry of each program) runs in every kernel test, against
references, on batch x heads and channel counts that span several programs.
"""

import pytest
import torch

import fastdl
from fastdl.kernels import attention, batch_norm, utils

BATCH = 70_000  # > 65,535

# The launchers run on CPU tensors with an empty grid: only the interpreter takes CPU tensors
# (compiled, Triton's launcher refuses their pointers before it looks at the grid).
needs_interpreter = pytest.mark.skipif(not fastdl.backend.interpreter_active(),
                                       reason="launches on CPU tensors: Triton's interpreter only")


def _record_grids(monkeypatch, module) -> list[tuple]:
    """Grids ``module``'s launchers pass to check_grid; each launch then runs no program."""
    grids = []

    def record(grid, op):
        grids.append(utils.check_grid(grid, op))
        return (0,)

    monkeypatch.setattr(module, "check_grid", record)
    return grids


def test_check_grid_names_the_op_and_the_limit():
    assert utils.check_grid((2**31 - 1, 65535, 65535), "op") == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match=r"attention: .*70,000 programs on launch-grid axis 1.*65,535"):
        utils.check_grid((1, BATCH), "attention")
    with pytest.raises(ValueError, match="axis 0"):
        utils.check_grid((2**31,), "op")


@needs_interpreter
def test_attention_batch_past_the_axis_limit(monkeypatch):
    """70,000 batch entries x 2 heads of 3 rows, forward and backward: one axis of
    tiles * heads * batch programs per kernel."""
    grids = _record_grids(monkeypatch, attention)
    q, k, v = (torch.randn(BATCH, 2, 3, 16) for _ in range(3))
    o, lse = attention.attention_fwd(q, k, v, None, True)
    attention.attention_bwd(o, q, k, v, o, lse, None, True)
    assert len(grids) == 4 and all(len(g) == 1 and g[0] == 2 * BATCH for g in grids), grids


@needs_interpreter
def test_varlen_attention_many_sequences(monkeypatch):
    """70,000 packed sequences of 1 or 2 tokens: the sequence index is the batch index."""
    grids = _record_grids(monkeypatch, attention)
    lengths = torch.randint(1, 3, (BATCH,))
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), 1, 16) for _ in range(3))
    o, lse = attention.varlen_attention_fwd(q, k, v, cu, cu, 2, 2)
    attention.varlen_attention_bwd(o, q, k, v, o, lse, cu, cu, 2, 2)
    # forward, dK/dV and dQ: one program per sequence (one tile covers 2 rows); delta: packed rows
    assert [g[0] for g in grids if len(g) == 1].count(BATCH) == 3, grids


@needs_interpreter
def test_batch_norm_channel_blocks_past_the_axis_limit(monkeypatch):
    """262,148 channels of an (N, C, S) input read in blocks of 4 channels: 65,537 channel blocks,
    folded into axis 0 with the row tiles, training forward and backward."""
    grids = _record_grids(monkeypatch, batch_norm)
    C = 4 * 65_537
    x = torch.randn(1, C, 2)
    y, mean, rstd = batch_norm.batch_norm_fwd(x, None, None, None, None, True, 0.1, 1e-5)
    batch_norm.batch_norm_bwd(x, x, None, mean, rstd, True, True)
    assert max(g[0] for g in grids) >= 65_537 and all(len(g) == 1 for g in grids), grids
