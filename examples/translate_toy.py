"""Teach an encoder-decoder Transformer to reverse sequences, then decode greedily and by beam search.

    python examples/translate_toy.py                 # about 3 minutes on a CPU
    python examples/translate_toy.py --task sort     # sort the symbols instead of reversing them

The "translation": a source of 4 to 12 symbols drawn from an alphabet of 10, whose target is the
same symbols reversed (``--task reverse``, default) or sorted (``--task sort``). Every batch is
freshly sampled, so the model cannot memorise; 500 held-out sources (fixed seed) are decoded
with ``Seq2SeqTransformer.generate`` — greedy, one token at a time from [BOS] until [EOS] — and
scored by exact match (the whole output right, [EOS] included) and per-token accuracy. At the
end the held-out set is decoded again, timed: greedy and beam search (``--num-beams``), each with
the key/value cache (each step feeds one token) and without it (each step re-runs the decoder
over the prefix), reporting generated tokens per second.

Model: ``fastdl.models.Seq2SeqTransformer`` (2 + 2 layers, d_model 64, 4 heads, tied output
projection), whose embeddings, attention, LayerNorms and dropout run on fastdl's kernels on a GPU
and on the PyTorch path on a CPU. Teacher forcing with padding masks, AdamW, warm-up then cosine
decay, label smoothing.

Measured (defaults: 2000 steps of batch 64; ``OMP_NUM_THREADS=1 python examples/translate_toy.py``
on a shared 2-core CPU): exact match on the 500 held-out sequences 0.0% at step 0, 54.2% at step
500, 96.6% at step 1000, 98.6% after 2000 steps (tokens 99.7%), in 197 s. Decoding the 500
held-out sequences (after 300 steps, same CPU under load): greedy 4,494 generated tokens/s with
the key/value cache vs 1,434 without it; beam search with 4 beams 1,269 vs 439 tokens/s.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as TF

import fastdl

PAD, BOS, EOS = 0, 1, 2
FIRST_SYMBOL = 3


def make_batch(batch: int, symbols: int, min_len: int, max_len: int, task: str, generator: torch.Generator):
    """(src (B, S), tgt (B, T)) padded with PAD; tgt = [BOS] answer [EOS]."""
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=generator)
    src = torch.full((batch, max_len), PAD, dtype=torch.long)
    tgt = torch.full((batch, max_len + 2), PAD, dtype=torch.long)
    tgt[:, 0] = BOS
    for i, n in enumerate(lengths.tolist()):
        seq = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + symbols, (n,), generator=generator)
        answer = seq.flip(0) if task == "reverse" else seq.sort().values
        src[i, :n] = seq
        tgt[i, 1:n + 1] = answer
        tgt[i, n + 1] = EOS
    return src, tgt


@torch.no_grad()
def evaluate(model, src: torch.Tensor, tgt: torch.Tensor, device: str, batch_size: int = 250):
    """(exact-match accuracy, token accuracy) of greedy decoding against ``tgt``."""
    model.eval()
    exact, tokens_right, tokens = 0, 0, 0
    for start in range(0, len(src), batch_size):
        s = src[start:start + batch_size].to(device)
        t = tgt[start:start + batch_size].to(device)
        out = model.generate(s, max_new_tokens=t.shape[1] - 1, bos_id=BOS, eos_id=EOS)
        pred = torch.full_like(t, PAD)
        pred[:, :out.shape[1]] = out[:, :t.shape[1]]
        scored = t != PAD  # [BOS], the answer and [EOS]; the padding after it is not scored
        same = (pred == t) | ~scored
        exact += int(same.all(dim=1).sum())
        tokens_right += int(((pred == t) & scored).sum())
        tokens += int(scored.sum())
    model.train()
    return exact / len(src), tokens_right / tokens


@torch.no_grad()
def decoding_speed(model, src: torch.Tensor, max_new_tokens: int, device: str, **generate_kwargs):
    """(generated tokens per second, the output) of one ``generate`` call over ``src``."""
    model.eval()
    src = src.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(src, max_new_tokens=max_new_tokens, bos_id=BOS, eos_id=EOS, **generate_kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = int((out[:, 1:] != PAD).sum())  # up to and including each [EOS]
    return generated / seconds, out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--task", choices=["reverse", "sort"], default="reverse")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--symbols", type=int, default=10, help="alphabet size")
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--max-len", type=int, default=12)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--label-smoothing", type=float, default=0.05)
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--num-beams", type=int, default=4, help="beams for the timed beam-search decoding")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if not 1 <= args.min_len <= args.max_len:
        p.error("need 1 <= --min-len <= --max-len")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    vocab = FIRST_SYMBOL + args.symbols
    model = fastdl.models.Seq2SeqTransformer(
        vocab, vocab, d_model=args.d_model, nhead=args.heads, num_encoder_layers=args.layers,
        num_decoder_layers=args.layers, dim_feedforward=2 * args.d_model, dropout=0.1,
        max_len=args.max_len + 2, pad_id=PAD).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, args.steps - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    held_out = make_batch(args.eval_size, args.symbols, args.min_len, args.max_len, args.task,
                          torch.Generator().manual_seed(10_000 + args.seed))
    gen = torch.Generator().manual_seed(args.seed)
    print(f"task: {args.task} {args.min_len}-{args.max_len} symbols of {args.symbols}; "
          f"Seq2SeqTransformer with {sum(p.numel() for p in model.parameters()):,} parameters "
          f"on {args.device} "
          f"(fastdl backend {fastdl.backend.resolve(next(model.parameters()))!r})")

    history = {"step": [0], "exact": [], "token": []}
    exact, token = evaluate(model, *held_out, args.device)
    history["exact"].append(exact)
    history["token"].append(token)
    print(f"step     0: exact match {100 * exact:5.1f}%  tokens {100 * token:5.1f}%")
    start, smooth = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        src, tgt = make_batch(args.batch_size, args.symbols, args.min_len, args.max_len, args.task, gen)
        src, tgt = src.to(args.device), tgt.to(args.device)
        logits = model(src, tgt[:, :-1])  # position t predicts tgt[:, t + 1]
        loss = TF.cross_entropy(logits.reshape(-1, vocab).float(), tgt[:, 1:].reshape(-1), ignore_index=PAD,
                                label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            exact, token = evaluate(model, *held_out, args.device)
            history["step"].append(step)
            history["exact"].append(exact)
            history["token"].append(token)
            print(f"step {step:5d}: loss {smooth:.3f}  exact match {100 * exact:5.1f}%  "
                  f"tokens {100 * token:5.1f}%  ({time.perf_counter() - start:.0f} s)", flush=True)

    src, tgt = held_out
    model.eval()
    sample = model.generate(src[:3].to(args.device), max_new_tokens=tgt.shape[1] - 1, bos_id=BOS, eos_id=EOS)
    for s, out in zip(src[:3].tolist(), sample.tolist()):
        shown = [x - FIRST_SYMBOL for x in s if x != PAD]
        decoded = [x - FIRST_SYMBOL for x in out[1:] if x >= FIRST_SYMBOL]
        print(f"  {shown} -> {decoded}")
    print(f"exact match on {len(src)} held-out sequences: {100 * history['exact'][-1]:.1f}% "
          f"after {args.steps} steps (tokens {100 * history['token'][-1]:.1f}%), "
          f"{time.perf_counter() - start:.0f} s")

    max_new = tgt.shape[1] - 1
    beams = args.num_beams
    for label, kwargs in (("greedy", {}), (f"beam search ({beams} beams)", {"num_beams": beams})):
        speeds = {}
        for use_cache in (True, False):
            speeds[use_cache], out = decoding_speed(model, src, max_new, args.device, use_cache=use_cache,
                                                    **kwargs)
        pred = torch.full_like(tgt, PAD)
        pred[:, :out.shape[1]] = out[:, :tgt.shape[1]].cpu()
        exact = ((pred == tgt) | (tgt == PAD)).all(dim=1).float().mean().item()
        history[f"tokens_per_s {label}"] = speeds[True]
        print(f"decoding {len(src)} sequences, {label}: {speeds[True]:,.0f} tokens/s with the key/value "
              f"cache, {speeds[False]:,.0f} without; exact match {100 * exact:.1f}%")
    return history


if __name__ == "__main__":
    main()
