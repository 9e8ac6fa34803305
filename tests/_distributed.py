"""Worker side of tests/test_distributed.py: models built identically in every process, and one
training step's gradients under DistributedDataParallel or FSDP2 (gloo, CPU), saved per rank."""

import os

import torch
import torch.distributed as dist

import fastdl
import fastdl.nn as fnn
from fastdl.models import BertConfig, BertForMaskedLM

BATCH = 4  # split evenly over two ranks


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        return BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64,
                                          max_position_embeddings=16, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0))
    # no conv bias: batch norm cancels it (its gradient would be rounding alone)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), fnn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.Flatten(), fnn.LayerNorm(8 * 6 * 6),
                               torch.nn.Linear(8 * 6 * 6, 5))


def batch(family: str):
    """(inputs, target) of the whole batch: fresh random values, padding in two BERT rows."""
    g = torch.Generator().manual_seed(1)
    if family == "bert":
        ids = torch.randint(0, 50, (BATCH, 12), generator=g)
        labels = torch.where(torch.rand(BATCH, 12, generator=g) < 0.3, ids, -100)
        labels[:, 0] = ids[:, 0]
        mask = torch.ones(BATCH, 12, dtype=torch.long)
        mask[1, 9:] = mask[3, 5:] = 0
        return (ids, mask), labels
    return (torch.randn(BATCH, 3, 6, 6, generator=g) * 2 + 0.5,), torch.randint(0, 5, (BATCH,), generator=g)


def loss_of(family: str, model, inputs, target) -> torch.Tensor:
    if family == "bert":
        return model(input_ids=inputs[0], attention_mask=inputs[1], labels=target).loss
    return torch.nn.functional.cross_entropy(model(*inputs), target)


def shard(inputs, target, rank: int, world: int):
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return tuple(t[part] for t in inputs), target[part]


def worker(rank: int, world: int, init: str, family: str, wrapper: str, backend: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = build(family)
        if wrapper == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in model.bert.encoder.layer:
                fully_shard(layer)
            wrapped = fully_shard(model)
        with fastdl.backend.use(backend):  # a forced backend: the kernels run, or the call raises
            loss_of(family, wrapped, *shard(*batch(family), rank, world)).backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                 for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        torch.save({"grads": grads, "buffers": buffers}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
