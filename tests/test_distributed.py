"""Distributed training on CPU (gloo, two processes): one step of a fastdl BERT (attention with
a padding mask, fused add & norm, embeddings, fused linear + cross-entropy) and of a CNN with
fastdl's BatchNorm2d and LayerNorm under DistributedDataParallel, and BERT under FSDP2
(``fully_shard`` per layer). Every rank's gradients must equal the mean of the two half-batch
gradients computed in one process; batch norm's running statistics are rank 0's half-batch's.
On the torch and interpret backends (the kernels themselves, forced)."""

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
