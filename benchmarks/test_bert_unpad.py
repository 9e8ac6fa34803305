"""BERT on padded batches: the work unpadding saves, and a training step padded vs unpadded.

    python -m pytest benchmarks/test_bert_unpad.py -q --benchmark-group-by=group -s

``test_work_saved`` counts, for BERT-base at 16 x 512 and 32 x 128 with a realistic mix of
sequence lengths (``benchmarks.ops.padded_lengths``: log-normal, median ~40% of the padded
length), the tokens each layer processes and the training FLOPs of encoder + MLM transform, on
the padded batch and on the packed tokens alone; it prints them and stores them in the
benchmark's ``extra_info``. ``test_train_step`` times one forward + backward of a small BERT
(``config.unpad`` False vs True) on the same kind of batch: on a GPU the kernels run, on a CPU
the torch path (where varlen attention loops over the sequences in Python).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import CUDA, DEVICE
from benchmarks.ops import bert_flops, padded_lengths
from fastdl.models import BertConfig, BertForMaskedLM

BERT_BASE = dict(layers=12, hidden=768, intermediate=3072, vocab=30522)


@pytest.mark.parametrize("batch,seq", [(16, 512), (32, 128)])
def test_work_saved(benchmark, batch, seq):
    lengths = padded_lengths(batch, seq).tolist()
    padded = bert_flops(lengths, **BERT_BASE, padded_to=seq)
    packed = bert_flops(lengths, **BERT_BASE, padded_to=None)
    tokens = sum(lengths)
    benchmark.group = f"BERT-base {batch}x{seq}: work of a training step"
    benchmark.extra_info.update(padded_tokens=batch * seq, real_tokens=tokens, padded_TFLOP=padded / 1e12,
                                unpadded_TFLOP=packed / 1e12, flops_saved=1 - packed / padded)
    print(f"\nBERT-base {batch}x{seq}: {tokens} of {batch * seq} tokens real ({tokens / (batch * seq):.0%}); "
          f"training step {padded / 1e12:.2f} TFLOP padded, {packed / 1e12:.2f} TFLOP unpadded "
          f"({1 - packed / padded:.0%} saved)")
    benchmark(bert_flops, lengths, **BERT_BASE, padded_to=None)


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
def test_train_step(bench, unpad):
    if CUDA:
        fields = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    else:
        fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    batch, seq = (16, 512) if CUDA else (8, 64)
    model = BertForMaskedLM(BertConfig(vocab_size=30522 if CUDA else 1000, unpad=unpad, **fields)).to(DEVICE)
    if CUDA:
        model = model.to(torch.bfloat16)
    lengths = padded_lengths(batch, seq)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long().to(DEVICE)
    ids = torch.randint(5, model.config.vocab_size, (batch, seq), device=DEVICE) * mask
    labels = torch.where((torch.rand(batch, seq, device=DEVICE) < 0.15) & mask.bool(), ids, -100)

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, mask, labels=labels, return_logits=False).loss.backward()
        if CUDA:
            torch.cuda.synchronize()

    bench(step, group=f"BERT {batch}x{seq} train step ({int(lengths.sum())} real tokens)",
          impl="unpadded" if unpad else "padded", backend=str(model.config.unpad))
