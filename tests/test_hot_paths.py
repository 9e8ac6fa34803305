"""Hot paths a GPU can run flat out: no device-to-host synchronisation on the kernel path, and
dropout bits that are statistically sound at four decisions per Philox call.

No sync, on CPU: every op's forward and backward runs on the interpreter (the kernel path) under
a ``TorchFunctionMode`` that records each call made from fastdl's own code that would make a GPU
wait for the host -- ``item``, ``tolist``, ``bool``/``int``/``float`` of a tensor, and the ops whose
output size depends on values (``nonzero``, ``unique``, boolean-mask indexing...). The embedding
range check takes its device-side form, the one CUDA tensors get. On a GPU the same runs on CUDA
tensors under ``torch.cuda.set_sync_debug_mode("error")``, and a whole BERT training step is
captured in a CUDA graph.
"""

import contextlib
import math
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastdl
import fastdl.functional as F
from fastdl.functional._random import draw_seed
from fastdl.models import BertConfig, BertForMaskedLM

# Tensor methods and functions that read values back to the host, or whose result size does.
_SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__array__", "numpy",
            "cpu", "nonzero", "argwhere", "unique", "unique_consecutive", "_unique2", "masked_select",
            "bincount"}
_FASTDL_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (fastdl, fastdl.backend.kernels("utils")))
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _caller() -> str:
    """File of the innermost frame outside torch: who asked for the op."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        frame = frame.f_back
    return "" if frame is None else frame.f_code.co_filename


class SyncRecorder(TorchFunctionMode):
    """Records (op, file:line) for each host-syncing call issued by fastdl's own code."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        syncing = name in _SYNCING or (name == "repeat_interleave" and "output_size" not in kwargs)
        if name == "__getitem__" and len(args) > 1:  # boolean-mask indexing: a data-sized result
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            syncing = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if syncing:
            caller = _caller()
            if caller.startswith(_FASTDL_DIRS):
                self.calls.append(f"{name} from {caller}")
        return func(*args, **kwargs)


def _op_cases(device):
    """(name, function of fresh inputs returning the tensors to differentiate) for every op."""
    def rnd(*shape, grad=True):
        return torch.randn(*shape, device=device).requires_grad_(grad)

    idx = torch.randint(0, 50, (2, 37), device=device)
    idx[:, :30] = 3  # a run of 60 equal indices: longer than one segment-sum piece (interpreter: 32)
    type_ids = torch.randint(0, 2, (2, 37), device=device)
    target = torch.tensor([3, 0, -100, 29, 7, 7, 1], device=device)
    return [
        ("layer_norm", lambda: F.layer_norm(rnd(7, 33), (33,), rnd(33), rnd(33))),
        ("rms_norm", lambda: F.rms_norm(rnd(7, 33), (33,), rnd(33))),
        ("batch_norm", lambda: F.batch_norm(rnd(6, 5, 7), torch.zeros(5, device=device),
                                            torch.ones(5, device=device), rnd(5), rnd(5), training=True)),
        ("dropout", lambda: F.dropout(rnd(7, 33), 0.3)),
        ("dropout_add_layer_norm", lambda: F.dropout_add_layer_norm(rnd(7, 33), rnd(7, 33), rnd(33), rnd(33),
                                                                    0.3)[0]),
        ("embedding", lambda: F.embedding(idx, rnd(50, 19), padding_idx=3)),
        ("embedding scale_grad_by_freq", lambda: F.embedding(idx, rnd(50, 19), scale_grad_by_freq=True)),
        ("embedding sparse", lambda: F.embedding(idx, rnd(50, 19), padding_idx=0, sparse=True)),
        ("bert_embeddings", lambda: F.bert_embeddings(idx, type_ids, None, rnd(50, 16), rnd(37, 16),
                                                      rnd(2, 16), rnd(16), rnd(16), 1e-12, 0.1, True,
                                                      padding_idx=0)),
        ("attention dropout causal gqa", lambda: F.scaled_dot_product_attention(
            rnd(2, 4, 19, 16), rnd(2, 2, 23, 16), rnd(2, 2, 23, 16), dropout_p=0.2, is_causal=True,
            enable_gqa=True)),
        ("attention float mask", lambda: F.scaled_dot_product_attention(
            rnd(1, 2, 19, 16), rnd(1, 2, 23, 16), rnd(1, 2, 23, 16), attn_mask=rnd(1, 1, 19, 23))),
        ("linear_cross_entropy", lambda: F.linear_cross_entropy(rnd(7, 16), rnd(30, 16), target)),
        ("attention bool mask", lambda: F.scaled_dot_product_attention(
            rnd(1, 2, 19, 16), rnd(1, 2, 23, 16), rnd(1, 2, 23, 16),
            attn_mask=torch.rand(19, 23, device=device) > 0.3)),
    ]


@pytest.fixture(params=["interpret", pytest.param("triton", marks=pytest.mark.cuda)])
def kernel_backend(request, monkeypatch):
    """A kernel path (the interpreter on CPU tensors, the compiled kernels on CUDA ones) with the
    embedding range check in its device-side form; the tensors' device."""
    name = request.param
    if name == "triton" and (not torch.cuda.is_available() or fastdl.backend.interpreter_active()):
        pytest.skip("needs a CUDA GPU with compiled Triton kernels")
    if name == "interpret" and not fastdl.backend.interpreter_active():
        pytest.skip("Triton's interpreter is not active in this process")
    monkeypatch.setenv("FASTDL_EAGER_INDEX_CHECK", "0")
    with fastdl.backend.use(name):
        yield "cuda" if name == "triton" else "cpu"


@contextlib.contextmanager
def _sync_free(device):
    recorder = SyncRecorder()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with recorder:
            yield recorder
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("case", range(len(_op_cases("cpu"))),
                         ids=[name for name, _ in _op_cases("cpu")])
def test_kernel_path_never_syncs(kernel_backend, case):
    """Forward and backward of every op, kernel path: no host-syncing call from fastdl's code."""
    name, run = _op_cases(kernel_backend)[case]
    run()  # compile (GPU) / warm up outside the recorder
    with _sync_free(kernel_backend) as recorder:
        out = run()
        out.backward(torch.ones_like(out))
    assert recorder.calls == [], f"{name} synchronises: {recorder.calls}"


def test_atomic_dq_never_syncs(kernel_backend, monkeypatch):
    """The atomic-dQ attention backward (FASTDL_ATTENTION_BACKWARD=atomic): no host sync either."""
    monkeypatch.setenv("FASTDL_ATTENTION_BACKWARD", "atomic")
    device = kernel_backend

    def run():
        q, k, v = (torch.randn(2, 4, 23, 16, device=device).requires_grad_() for _ in range(3))
        mask = (torch.rand(2, 1, 1, 23, device=device) > 0.3)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.2)

    run()
    with _sync_free(kernel_backend) as recorder:
        out = run()
        out.backward(torch.ones_like(out))
    assert recorder.calls == [], recorder.calls


def test_device_side_index_check(kernel_backend):
    """The check CUDA tensors get by default, here in its CPU form (torch._assert_async raises at
    once on CPU, at the next synchronisation on CUDA): it fails for a bad index of each table."""
    if kernel_backend == "cuda":
        pytest.skip("a failed device-side assertion ends the CUDA context")
    w = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match=r"input contains an index outside \[0, 10\)"):
        F.embedding(torch.tensor([[0, 3], [10, 2]]), w)
    ids = torch.tensor([[1, 2, 3]])
    tables = (torch.randn(10, 8), torch.randn(3, 8), torch.randn(2, 8), None, None)
    with pytest.raises(RuntimeError, match="token_type_ids contains an index outside"):
        F.bert_embeddings(ids, torch.tensor([[0, 2, 1]]), None, *tables, 1e-12, 0.0, True)
    with pytest.raises(RuntimeError, match="position_ids contains an index outside"):
        F.bert_embeddings(ids, None, torch.tensor([[0, 1, 3]]), *tables, 1e-12, 0.0, True)


def test_kernels_never_read_out_of_bounds(kernel_backend):
    """While a device-side check is pending, the kernels read no row for a bad index: it is 0."""
    device = kernel_backend  # the launchers themselves: no check runs, on CPU or CUDA tensors
    w = torch.randn(10, 4, device=device)
    out = fastdl.backend.kernels("embedding").embedding_fwd(torch.tensor([3, 10, -1, 2], device=device), w)
    assert torch.equal(out[[0, 3]], w[[3, 2]]) and torch.equal(out[[1, 2]], torch.zeros(2, 4, device=device))
    dw = fastdl.backend.kernels("embedding").embedding_bwd(
        torch.ones(4, 4, device=device), torch.tensor([3, 10, -1, 3], device=device), 10, None, False,
        torch.float32)
    expected = torch.zeros(10, 4, device=device)
    expected[3] = 2.0
    assert torch.equal(dw, expected)


def _tiny_bert(device):
    # unpad=False: the padded path. The unpadded one (the default with a mask on the kernels)
    # finds the real tokens with nonzero, one documented sync per forward.
    config = BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=16, unpad=False)
    model = BertForMaskedLM(config).to(device)
    ids = torch.randint(0, 61, (2, 11), device=device)
    labels = torch.where(torch.rand(2, 11, device=device) < 0.3, ids, -100)
    mask = torch.ones(2, 11, dtype=torch.long, device=device)
    mask[1, 8:] = 0
    return model, ids, labels, mask


def test_bert_training_step_never_syncs(kernel_backend):
    """A whole BERT MLM training step (every op, dropout on, padded batch, optimizer step). On CPU
    the loss is taken from the logits: the model's own MLM loss gathers the labelled rows first on
    CPU tensors only (on CUDA it does not; the CUDA-graph test below covers that path)."""
    model, ids, labels, mask = _tiny_bert(kernel_backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step():
        if kernel_backend == "cuda":
            loss = model(ids, attention_mask=mask, labels=labels).loss
        else:
            logits = model(ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()

    if kernel_backend == "cuda":
        step()  # compile, and time each config once (the autotuner synchronises to time them)
    with _sync_free(kernel_backend) as recorder:
        step()
    assert recorder.calls == [], f"a BERT step synchronises: {recorder.calls}"


@pytest.mark.cuda
def test_bert_training_step_in_cuda_graph(monkeypatch):
    """A BERT training step runs with sync debug mode "error" and is captured in a CUDA graph;
    each replay draws new dropout masks and trains."""
    monkeypatch.setenv("FASTDL_EAGER_INDEX_CHECK", "0")
    with fastdl.backend.use("triton"):
        model, ids, labels, mask = _tiny_bert("cuda")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=False)
            loss = model(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            return loss

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and autotune before capture
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()  # eager, under the debug mode
            with torch.cuda.graph(graph):
                loss = step()
            losses = []
            for _ in range(5):
                graph.replay()
                losses.append(loss.clone())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        losses = torch.stack(losses).cpu()
        assert torch.isfinite(losses).all()
        assert losses[-1] < losses[0], f"no training progress under replay: {losses.tolist()}"


# ---------------------------------------------------------------------------------------------
# Dropout bits: four decisions per Philox call, statistically independent
# ---------------------------------------------------------------------------------------------

def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_bits_statistics(kernel_backend, p):
    """The mask the kernels apply (kernels.dropout.keep_mask, the shared dropout_keep helper):
    keep fraction within 5 sigma of 1 - p; no correlation (5 sigma) between horizontal or
    vertical neighbours, or between the four lanes of one Philox call; reproducible per seed."""
    M, N = 16, 4100  # 65,600 elements in few, long rows (fast under the interpreter); N a
    # multiple of 4, so the lanes of one Philox call are columns 4k .. 4k + 3
    torch.manual_seed(5)
    seed = draw_seed(kernel_backend)
    keep = fastdl.backend.kernels("dropout").keep_mask((M, N), p, seed, kernel_backend).cpu()
    n = keep.numel()
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    bound = 5 / math.sqrt(n / 4)
    assert abs(_correlation(keep[:, 1:], keep[:, :-1])) < bound, "horizontal neighbours correlate"
    assert abs(_correlation(keep[1:], keep[:-1])) < bound, "vertical neighbours correlate"
    lanes = keep.reshape(M, N // 4, 4)
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(_correlation(lanes[..., i], lanes[..., j])) < bound, f"lanes {i} and {j} correlate"
        rate = lanes[..., i].double().mean().item()  # every lane keeps at the same rate
        assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / (n / 4)), f"lane {i} keeps {rate}"
    again = fastdl.backend.kernels("dropout").keep_mask((M, N), p, seed, kernel_backend).cpu()
    assert torch.equal(keep, again)
    other = fastdl.backend.kernels("dropout").keep_mask((M, N), p, draw_seed(kernel_backend), kernel_backend)
    assert not torch.equal(keep, other.cpu())


def test_seed_stays_on_the_device(kernel_backend):
    """Seeds are device tensors from torch's generator: manual_seed reproduces, calls differ."""
    torch.manual_seed(11)
    a, b = draw_seed(kernel_backend), draw_seed(kernel_backend)
    torch.manual_seed(11)
    assert torch.equal(a, draw_seed(kernel_backend)) and not torch.equal(a, b)
    assert a.device.type == kernel_backend and a.dtype == torch.int64 and a.shape == (1,)
