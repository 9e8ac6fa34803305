"""Distributed training on CPU (gloo, two processes): one step of a fastdl BERT (attention with
a padding mask, fused add & norm, embeddings, fused linear + cross-entropy) and of a CNN with
fastdl's BatchNorm2d and LayerNorm under DistributedDataParallel, and BERT under FSDP2
(``fully_shard`` per layer). Every rank's gradients must equal the mean of the two half-batch
gradients computed in one process; batch norm's running statistics are rank 0's half-batch's.
On the torch and interpret backends (the kernels themselves, forced). And the operators on a GPU
that is not the current one."""

import contextlib
import os

import pytest
import torch
import torch.multiprocessing as mp
from _distributed import batch, build, loss_of, shard, worker
from helpers import assert_close

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo")


def _reference(family: str):
    """Gradients of the mean of the two ranks' losses, and the buffers after rank 0's half."""
    inputs, target = batch(family)
    grads, buffers = None, None
    for rank in range(2):
        model = build(family)
        loss_of(family, model, *shard(inputs, target, rank, 2)).backward()
        g = {n: p.grad / 2 for n, p in model.named_parameters()}
        grads = g if grads is None else {n: grads[n] + g[n] for n in g}
        if rank == 0:
            buffers = dict(model.named_buffers())
    return grads, buffers


@pytest.mark.parametrize("family,wrapper", [("bert", "ddp"), ("cnn", "ddp"), ("bert", "fsdp")])
def test_one_training_step_equals_the_mean_of_the_ranks_gradients(backend, device, tmp_path, family, wrapper):
    if backend == "triton":
        pytest.skip("CPU processes (gloo)")
    mp.spawn(worker, nprocs=2, join=True,
             args=(2, f"file://{tmp_path / 'init'}", family, wrapper, backend, str(tmp_path)))
    grads, buffers = _reference(family)
    scale = max(g.abs().max().item() for g in grads.values())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["grads"].keys() == grads.keys()
        for name, g in grads.items():
            # atol: gradients that are 0 in exact arithmetic (attention's key bias) are rounding
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-7 * scale,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
        if rank == 0:
            for name, b in buffers.items():
                if b.is_floating_point():
                    assert_close(f"buffer {name}", got["buffers"][name], b, rtol=1e-6)
                else:
                    assert torch.equal(got["buffers"][name], b), name
    assert os.path.exists(tmp_path / "rank1.pt")


# Tensors on a GPU that is not the current one (a model moved with .to("cuda:1"), no
# torch.cuda.set_device): Triton launches on the current device, so each operator makes the
# tensors' device current for its call.

def test_an_operator_runs_on_its_tensors_device(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastdl.functional import _library

    current, entered = [0], []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d).index)
        current.insert(0, torch.device(d).index)
        yield
        current.pop(0)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    run = _library.on_inputs_device(lambda *args, **kwargs: seen.append(current[0]))
    with FakeTensorMode():  # CUDA tensors without a GPU
        on1, on0, cpu = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:0"), torch.empty(2)
    run(3, cpu, on1, on0)         # the first CUDA tensor's device, wherever it is
    run(cpu, scale=1.0, x=on1)    # keyword arguments too
    run(on0, on1)                 # already current: no device switch
    run(cpu, 2.0)                 # no CUDA tensor: nothing to switch
    assert seen == [1, 1, 0, 0]
    assert entered == [1, 1]


def test_every_operator_runs_on_its_tensors_device():
    opdefs = getattr(torch._library.custom_ops, "OPDEFS", None)
    if opdefs is None:
        pytest.skip("this PyTorch does not list its custom operators")
    import fastdl.functional  # noqa: F401  (registers the operators)
    ours = {name: op for name, op in opdefs.items() if name.startswith("fastdl::")}
    assert len(ours) >= 20
    for name, op in ours.items():
        fn = op._init_fn
        while not getattr(fn, "runs_on_inputs_device", False) and hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        assert getattr(fn, "runs_on_inputs_device", False), f"{name} does not set its tensors' device"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_modules_on_the_second_gpu_while_the_first_is_current(backend):
    if backend != "triton":
        pytest.skip("the kernels on CUDA")
    import fastdl.nn as fnn
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, device="cuda:1", requires_grad=True)
    torch.cuda.set_device(0)
    for ours, ref in [(fnn.LayerNorm(64), torch.nn.LayerNorm(64)),
                      (fnn.MultiheadAttention(64, 4, batch_first=True),
                       torch.nn.MultiheadAttention(64, 4, batch_first=True))]:
        ref.load_state_dict(ours.state_dict())
        ours.to("cuda:1")
        ref.to("cuda:1")
        call = (lambda m: m(x)) if isinstance(ours, fnn.LayerNorm) else (lambda m: m(x, x, x)[0])
        got, want = call(ours), call(ref)
        g = torch.randn_like(want)
        (gx,) = torch.autograd.grad(got, x, g)
        (rx,) = torch.autograd.grad(want, x, g)
        assert got.device == torch.device("cuda:1")
        assert_close("output", got, want, rtol=2e-3)
        assert_close("input gradient", gx, rx, rtol=2e-3)
