"""Every config of every autotune list, and both values of every constant that differs between the
interpreter and a GPU, executed on the CPU against float64 references.

Under the interpreter ``FASTDL_AUTOTUNE`` defaults to each list's first config; here every index
is pinned in turn (``kernels.utils.autotune_setting``), so a config that only a GPU's autotuner
would pick still runs forward and backward, on lengths that span several tiles and end on every
kind of boundary (L, S in {1, 63, 129, 300}), with masks read through strides, causality, dropout,
grouped key/value heads and a mask gradient.

The norm, batch-norm, dropout and embedding launchers size their grids with constants that a GPU
sets differently (persistent programs per GPU, elements per dropout program, gather tile, rows per
segment-sum piece); each op runs with the interpreter's values and with an H100's.
"""

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, check_op, ref_attention

import fastdl
import fastdl.functional as F

pytestmark = pytest.mark.skipif(not fastdl.backend.interpreter_active(),
                                reason="pins configs under Triton's interpreter (CPU only)")


@pytest.fixture
def kernels():
    """The launcher modules, with fastdl on the interpreter and configs pinned back afterwards."""
    with fastdl.backend.use("interpret"):
        yield lambda family: fastdl.backend.kernels(family)


# ---------------------------------------------------------------------------------------------
# Attention: every (head-dim class, dtype) list, every index
# ---------------------------------------------------------------------------------------------

# Head dims in each class that are not powers of two, a little past the class below: the BLOCK_D
# padding, a partial last chunk of every chunk width and output chunks wholly in the padding
# (which return at once) are all exercised.
HEAD_DIMS = {64: 40, 128: 72, 256: 136}
TABLES = ("_FWD_CONFIGS", "_BWD_KV_CONFIGS", "_BWD_Q_CONFIGS")
MAX_TILINGS = 15  # the most distinct tilings of one head-dim class's lists (see _tilings)


def _qkv(B, H, H_kv, L, S, D):
    return [torch.randn(shape).requires_grad_() for shape in ((B, H, L, D), (B, H_kv, S, D), (B, H_kv, S, D))]


def _check_attention(inputs, **kwargs):
    check_op(lambda *t: F.scaled_dot_product_attention(*t, **kwargs),
             lambda *t: ref_attention(*t, **{k: v for k, v in kwargs.items() if k != "enable_gqa"}),
             inputs, rtol=2e-4, grad_rtol=2e-4)


def _check_causal_dropout_gqa(D):
    """Causal with L < S, dropout, grouped heads: forward and backward under the seed's mask."""
    keep = _keep_mask(1, 2, 63, 129, 0.25, 11)

    def dropped(q, k, v):
        torch.manual_seed(11)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True, enable_gqa=True)

    check_op(dropped, lambda q, k, v: ref_attention(q, k, v, is_causal=True, keep=keep, p=0.25),
             _qkv(1, 2, 1, 63, 129, D), rtol=2e-4, grad_rtol=2e-4)


def _keep_mask(B, H, L, S, p, seed):
    """The dropout mask of a (B, H, L, S) call after ``torch.manual_seed(seed)``, read off an
    identity problem (q = k = 0 so P = 1/S; v = I returns P's mask); S <= 256."""
    D = max(16, S)
    eye = torch.eye(S, D).expand(B, H, S, D)
    torch.manual_seed(seed)
    out = F.scaled_dot_product_attention(torch.zeros(B, H, L, D), torch.zeros(B, H, S, D), eye, dropout_p=p)
    scaled = out[..., :S].double() * S * (1.0 - p)
    keep = scaled > 0.5
    assert_close("identity problem", scaled, keep.double(), rtol=1e-6)
    return keep


def _tilings(attention, cls: int, dropout: bool, tables=TABLES):
    """Per table (``tables`` order), the distinct tilings -- (BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DO) --
    of every list of head-dim class ``cls``, both GPU generations (where the table has lists for
    them) and both element sizes, for plain launches or for dropout ones, as config tuples. The
    interpreter runs a program's operations one after another whatever num_warps and num_stages
    say, so two configs that differ only in those compute the same thing: one run proves both."""
    lists = []
    for name in tables:
        table, seen = getattr(attention, name), {}
        for key in ((g, cls, size) for g in (90, 80) for size in (2, 4) if (g, cls, size) in table):
            entries = table.get(key + ("dropout",), table[key]) if dropout else table[key]
            for m, n, _, _, *chunks in entries:
                seen.setdefault((m, n, *(chunks or (0, 0))), None)
        lists.append([(m, n, 4, 1, dk, do) for m, n, dk, do in seen])
    return lists


def _pin_tilings(kernels, monkeypatch, cls: int, index: int, tables=TABLES) -> tuple[bool, bool]:
    """Make the fp32 lists of ``tables`` (the interpreter's, Hopper's) hold every tiling of
    head-dim class ``cls``; (whether a plain, a dropout list has a tiling ``index``), skipping the
    test when neither has."""
    attention = kernels("attention")
    plain, with_dropout = _tilings(attention, cls, False, tables), _tilings(attention, cls, True, tables)
    run_plain, run_dropout = (index < max(map(len, lists)) for lists in (plain, with_dropout))
    if not (run_plain or run_dropout):
        pytest.skip(f"head-dim class {cls} has fewer than {index + 1} tilings")
    key = (90, cls, 4)  # the interpreter's lists (Hopper's) for fp32 inputs
    monkeypatch.setattr(kernels("utils"), "INTERPRETER_CAPABILITY", 90)
    for name, plain_list, dropout_list in zip(tables, plain, with_dropout):
        table = dict(getattr(attention, name))
        table[key], table[key + ("dropout",)] = plain_list, dropout_list  # fp32 inputs run these
        monkeypatch.setattr(attention, name, table)
    monkeypatch.setattr(attention, "_tuned", {})
    return run_plain, run_dropout


@pytest.mark.parametrize("index", range(MAX_TILINGS))
@pytest.mark.parametrize("cls", list(HEAD_DIMS))
def test_attention_config(kernels, monkeypatch, cls, index):
    """Tiling ``index`` of every config list of head-dim class ``cls`` (both GPU generations, both
    element sizes; the last one of a shorter list) of all three attention kernels, forward and
    backward, at every kind of tile boundary.

    The interpreter computes in fp32 whatever the list (it has no registers or shared memory to
    run out of, and fp16 arithmetic there is slow), so the fp16/bf16 lists run on fp32 inputs:
    what is proven is the tiling and the head-dim chunking, the dtype paths are test_attention's."""
    run_plain, run_dropout = _pin_tilings(kernels, monkeypatch, cls, index)
    D = HEAD_DIMS[cls]
    with kernels("utils").autotune_setting(index):
        if run_plain:
            # One query row against 300 keys; grouped heads; a (B, 1, 1, S) padding mask read
            # through stride-0 head and row axes.
            _check_attention([*_qkv(1, 2, 1, 1, 300, D), torch.rand(1, 1, 1, 300) > 0.3], enable_gqa=True)
            # Causal with L > S: the bottom rows see every key.
            _check_attention(_qkv(1, 1, 1, 300, 63, D), is_causal=True)
            # A float mask with a gradient (a row fully at -inf included): the dS buffer.
            mask = torch.randn(1, 1, 129, 63)
            mask[:, :, 5] = float("-inf")
            _check_attention([*_qkv(1, 1, 1, 129, 63, D), mask.requires_grad_()])
            # A single key: the softmax is constant, so only v takes a gradient.
            q, k, v = _qkv(1, 1, 1, 63, 1, D)
            _check_attention([q.detach(), k.detach(), v])
        if run_dropout:
            _check_causal_dropout_gqa(D)


@pytest.mark.parametrize("index", range(MAX_TILINGS))
@pytest.mark.parametrize("cls", list(HEAD_DIMS))
def test_attention_atomic_dq_config(kernels, monkeypatch, cls, index):
    """Tiling ``index`` of every atomic-dQ list of head-dim class ``cls``
    (FASTDL_ATTENTION_BACKWARD=atomic: the dK/dV kernel also adds dQ, in the tiling's head-dim
    chunks): grouped heads with a padding mask, causal with L > S; with dropout, causal L < S."""
    run_plain, run_dropout = _pin_tilings(kernels, monkeypatch, cls, index, ("_ATOMIC_KV_CONFIGS",))
    monkeypatch.setenv("FASTDL_ATTENTION_BACKWARD", "atomic")
    D = HEAD_DIMS[cls]
    with kernels("utils").autotune_setting(index):
        if run_plain:
            _check_attention([*_qkv(1, 2, 1, 129, 63, D), torch.rand(1, 1, 1, 63) > 0.3], enable_gqa=True)
            _check_attention(_qkv(1, 1, 1, 300, 63, D), is_causal=True)
        if run_dropout:
            _check_causal_dropout_gqa(D)


def test_generation_picks_its_lists(kernels, monkeypatch):
    """A launch takes the lists of its GPU generation: sm_80's below compute capability 9.0."""
    attention = kernels("attention")
    for capability, generation in ((80, 80), (86, 80), (89, 80), (90, 90), (100, 90)):
        monkeypatch.setattr(kernels("utils"), "INTERPRETER_CAPABILITY", capability)
        monkeypatch.setattr(attention, "_tuned", {})
        tuned = attention._tuned_kernel("fwd", attention._attn_fwd_kernel, attention._FWD_CONFIGS, 64, 64,
                                        torch.float16, torch.device("cpu"), dropout=False)
        expected = attention._triton_configs("fwd", attention._FWD_CONFIGS[(generation, 64, 2)], 64, 64)
        assert [c.all_kwargs() for c in tuned.configs] == [c.all_kwargs() for c in expected], capability


@pytest.mark.parametrize("capability,kinds", [(90, {"bwd_kv_atomic"}), (80, {"bwd_kv", "bwd_q"})])
def test_atomic_dq_where_it_has_lists(kernels, monkeypatch, capability, kinds):
    """FASTDL_ATTENTION_BACKWARD=atomic takes the atomic dK/dV kernel where its generation has
    lists (Hopper), the deterministic kernels elsewhere (Ampere's spill): right gradients both ways."""
    attention = kernels("attention")
    monkeypatch.setattr(kernels("utils"), "INTERPRETER_CAPABILITY", capability)
    monkeypatch.setattr(attention, "_tuned", {})
    monkeypatch.setenv("FASTDL_ATTENTION_BACKWARD", "atomic")
    launched = []
    real = attention._tuned_kernel
    monkeypatch.setattr(attention, "_tuned_kernel", lambda kind, *a, **kw: launched.append(kind) or real(
        kind, *a, **kw))
    _check_attention(_qkv(1, 2, 1, 70, 45, 40), is_causal=True, enable_gqa=True)
    assert set(launched) - {"fwd"} == kinds, launched


def test_lists_fit_the_sweep(kernels):
    """MAX_TILINGS covers every head-dim class's tilings, and each list is keyed by a GPU
    generation, a head-dim class and an element size (optionally for dropout):
    test_attention_config runs them all (the atomic-dQ lists: test_attention_atomic_dq_config)."""
    attention = kernels("attention")
    for name in TABLES + ("_ATOMIC_KV_CONFIGS",):
        for key, entries in getattr(attention, name).items():
            assert len(entries) <= 4, (name, key)  # what an autotuner on a GPU can afford to try
            assert key[:3] in {(g, c, s) for g in (90, 80) for c in HEAD_DIMS for s in (2, 4)}, (name, key)
            assert key[3:] in ((), ("dropout",)), (name, key)
    for cls in HEAD_DIMS:
        for dropout in (False, True):
            for tables in (TABLES, ("_ATOMIC_KV_CONFIGS",)):
                assert max(map(len, _tilings(attention, cls, dropout, tables))) <= MAX_TILINGS, (cls, dropout)


def test_every_config_is_pinned(kernels):
    """autotune_setting(i) launches config i (the last one past the end of a list)."""
    utils = kernels("utils")
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((kw["BLOCK"], kw["num_warps"], kw["num_stages"]))

    import triton
    tuned = utils.Tuned(Recorder(), [triton.Config({"BLOCK": b}, num_warps=w, num_stages=s)
                                     for b, w, s in ((16, 1, 1), (32, 2, 2), (64, 4, 3))], key=[])
    for setting in ("first", 0, 1, 2, 7):
        with utils.autotune_setting(setting):
            tuned[(1,)]()
    assert launched == [(16, 1, 1), (16, 1, 1), (32, 2, 2), (64, 4, 3), (64, 4, 3)]
    with utils.autotune_setting("all"), pytest.raises(RuntimeError, match="needs a GPU"):
        tuned[(1,)]()
    with pytest.raises(ValueError, match="FASTDL_AUTOTUNE"):
        utils._autotune_setting("fastest")


# ---------------------------------------------------------------------------------------------
# Constants that differ between the interpreter and a GPU
# ---------------------------------------------------------------------------------------------

# (module, name, GPU value): programs per GPU for persistent loops (132 SMs x 4 on an H100),
# elements per dropout program, elements per gather program, rows per segment-sum piece, vocabulary
# tile of the cross-entropy kernel.
GPU_CONSTANTS = [("utils", "INTERPRETER_PROGRAMS", 132 * 4), ("dropout", "BLOCK", 1024),
                 ("embedding", "GATHER_TILE", 4096), ("embedding", "ROWS_PER_PIECE", 256),
                 ("cross_entropy", "MAX_BLOCK_V", 4096)]


@pytest.fixture(params=["interpreter", "gpu"])
def constants(request, kernels, monkeypatch):
    """Run the test with the interpreter's launch constants, then with a GPU's."""
    if request.param == "gpu":
        for module, name, value in GPU_CONSTANTS:
            monkeypatch.setattr(kernels(module), name, value)
    return request.param


def test_gpu_constants_differ(kernels):
    """The constants above are the ones that differ; if one disappears, update GPU_CONSTANTS."""
    for module, name, value in GPU_CONSTANTS:
        assert getattr(kernels(module), name) != value, (module, name)


@pytest.mark.parametrize("N", [61, 10007, 16411])  # in registers; backward streamed; both streamed
def test_norms_many_rows_per_program(kernels, constants, N):
    """LayerNorm / RMSNorm / add & norm backward with M far above the program count (every
    program loops over many rows) and, with a GPU's count, more programs than rows per program."""
    M = 600 if N < 1000 else 9

    def leaves(*shapes, offset=0.0):
        return [(torch.randn(shape) + offset).requires_grad_() for shape in shapes]

    check_op(lambda x, w, b: F.layer_norm(x, (N,), w, b), lambda x, w, b: TF.layer_norm(x, (N,), w, b),
             leaves((M, N), N, N, offset=3.0), rtol=1e-5, grad_rtol=1e-5)
    check_op(lambda x, w: F.rms_norm(x, (N,), w, 1e-6), lambda x, w: TF.rms_norm(x, (N,), w, 1e-6),
             leaves((M, N), N), rtol=1e-5, grad_rtol=1e-5)
    check_op(lambda x, r, w, b: F.dropout_add_layer_norm(x, r, w, b, p=0.0, training=True)[0],
             lambda x, r, w, b: TF.layer_norm(x + r, (N,), w, b), leaves((M, N), (M, N), N, N),
             rtol=1e-5, grad_rtol=1e-5)


@pytest.mark.parametrize("N", [61, 10007])  # a row in registers (partials stored whole); streamed
def test_partial_rows_from_unwritten_buffers(kernels, constants, monkeypatch, N):
    """The norm, add & norm and BERT-embedding backwards take their per-program dw/db rows
    unzeroed where every program stores its row whole: buffers come NaN-filled here, so a row
    that some program failed to store (or a streamed row that needs its zeros) shows."""
    utils = kernels("utils")
    monkeypatch.setattr(utils, "_uninitialised", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    M = 37

    def leaves(*shapes):
        return [torch.randn(shape).requires_grad_() for shape in shapes]

    check_op(lambda x, w, b: F.layer_norm(x, (N,), w, b), lambda x, w, b: TF.layer_norm(x, (N,), w, b),
             leaves((M, N), N, N), rtol=1e-5, grad_rtol=1e-5)
    check_op(lambda x, r, w, b: F.dropout_add_layer_norm(x, r, w, b, p=0.0, training=True)[0],
             lambda x, r, w, b: TF.layer_norm(x + r, (N,), w, b), leaves((M, N), (M, N), N, N),
             rtol=1e-5, grad_rtol=1e-5)
    if N < 1000:
        ids, types = torch.randint(0, 50, (2, 19)), torch.randint(0, 2, (2, 19))
        check_op(lambda word, pos, typ, w, b: F.bert_embeddings(ids, types, None, word, pos, typ, w, b, 1e-12,
                                                                0.0, True),
                 lambda word, pos, typ, w, b: TF.layer_norm(word[ids] + pos[:19] + typ[types], (N,), w, b,
                                                            1e-12),
                 leaves((50, N), (19, N), (2, N), N, N), rtol=1e-5, grad_rtol=1e-5)


# (N, C, S) [, layout]: a few tiles; with a GPU's program count, 66 programs per channel block (two
# finalize blocks of 64 partials, the last program 4 rows) with S a multiple of 4 (r vectors) and
# odd; channels_last (one r stride: no division by S), 130 programs; the same with its H sliced
# (channels fastest, n's stride not S times s's).
@pytest.mark.parametrize("shape", [(37, 5, 29), (129, 5, 516), (129, 5, 517), (65, 5, 1024, "cl"),
                                   (65, 5, 1024, "cl sliced")],
                         ids=["few", "vec", "odd", "channels_last", "strided"])
def test_batch_norm_program_split(kernels, constants, shape):
    """Training batch norm: per-program partial statistics merged in order, for either split."""
    x = torch.randn(shape[:3]) * 2 + 4
    if shape[3:]:
        x = x.view(*shape[:2], 32, 32).to(memory_format=torch.channels_last)
        x = x[..., :31, :] if "sliced" in shape[3] else x
    x.requires_grad_()
    w, b = torch.randn(5).requires_grad_(), torch.randn(5).requires_grad_()
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    def buffers(dtype):
        return rm.clone().to(dtype), rv.clone().to(dtype)

    check_op(lambda x, w, b: F.batch_norm(x, *buffers(x.dtype), w, b, training=True),
             lambda x, w, b: TF.batch_norm(x, *buffers(x.dtype), w, b, training=True),
             [x, w, b], rtol=1e-5, grad_rtol=1e-5)
    # The running buffers take the merged statistics (float64 reference, unbiased variance).
    m, v = rm.clone(), rv.clone()
    F.batch_norm(x.detach(), m, v, w, b, training=True)
    xd = x.detach().double().transpose(0, 1).reshape(5, -1)
    assert_close("running_mean", m.double(), 0.9 * rm.double() + 0.1 * xd.mean(1), rtol=1e-5)
    assert_close("running_var", v.double(), 0.9 * rv.double() + 0.1 * xd.var(1), rtol=1e-5)


def test_dropout_blocks(kernels, constants):
    """Dropout over several programs' blocks: y = keep * x / (1 - p) with the mask that
    ``keep_mask`` draws for the seed, element by element, whatever the block size."""
    dropout = kernels("dropout")
    x = torch.randn(5, 2049)
    seed = torch.tensor([123])
    y = dropout.dropout_fwd(x, 0.3, seed)
    # Plain dropout counts elements in flat order: its mask is the (numel,) mask.
    keep = dropout.keep_mask((x.numel(),), 0.3, seed, "cpu").view(x.shape)
    assert 0.6 < keep.double().mean() < 0.8
    assert_close("dropout", y.double(), torch.where(keep, x.double() / 0.7, 0.0), rtol=1e-6)
    # Element i's decision depends on (seed, i) only: a shorter call draws the same first bits.
    assert torch.equal(keep.flatten()[:1000], dropout.keep_mask((1000,), 0.3, seed, "cpu"))


def test_embedding_long_runs(kernels, constants):
    """Gather with either tile; the backward with runs of one index longer than a piece (600
    tokens of row 3, 300 of row 0) and single tokens, against float64 index_add."""
    V, N = 11, 70
    idx = torch.cat([torch.full((600,), 3), torch.randint(0, V, (90,)), torch.zeros(300, dtype=torch.long)])
    idx = idx[torch.randperm(idx.numel())]
    w = torch.randn(V, N).requires_grad_()
    check_op(lambda w: F.embedding(idx, w), lambda w: TF.embedding(idx, w), [w], rtol=1e-5, grad_rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Launcher paths the functional API does not reach
# ---------------------------------------------------------------------------------------------

def test_causal_mask_gradient_from_unwritten_buffers(kernels, monkeypatch):
    """A causal launch with a float mask gradient: key tiles right of a query tile are skipped by
    the dQ kernel (which stores dS), so their dS entries are never written; they must read as 0,
    not as whatever the buffer held (buffers come NaN-filled here). Every config of the fp32
    head-dim-64 lists, against float64."""
    attention = kernels("attention")
    monkeypatch.setattr(attention, "_alloc", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    for index in range(len(attention._FWD_CONFIGS[(90, 64, 4)])):
        with kernels("utils").autotune_setting(index):
            q, k, v = (t.detach() for t in _qkv(1, 2, 1, 97, 130, 40))
            mask = torch.randn(1, 2, 97, 130)
            o, lse = attention.attention_fwd(q, k, v, mask, is_causal=True)
            do = torch.randn_like(o)
            *_, dmask = attention.attention_bwd(do, q, k, v, o, lse, mask, is_causal=True, mask_grad=True)
            ref_mask = mask.double().requires_grad_()
            ref = ref_attention(q.double(), k.double(), v.double(), attn_mask=ref_mask, is_causal=True)
            ref.backward(do.double())
            assert_close(f"mask gradient, config {index}", dmask, ref_mask.grad, rtol=2e-4)


def test_cross_entropy_vocabulary_tiles(kernels, constants):
    """Fused linear + cross-entropy over a vocabulary wider than the interpreter's tile and than
    a GPU's (hard targets with label smoothing and ignored rows), against float64."""
    V, N = 4500, 32
    hidden, weight = torch.randn(37, N).requires_grad_(), (torch.randn(V, N) * 0.3).requires_grad_()
    target = torch.randint(0, V, (37,))
    target[5] = -100
    check_op(lambda h, w: F.linear_cross_entropy(h, w, target, label_smoothing=0.1),
             lambda h, w: TF.cross_entropy(h @ w.T, target, label_smoothing=0.1), [hidden, weight],
             rtol=1e-5, grad_rtol=1e-5)
