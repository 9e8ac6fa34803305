"""Seq2SeqTransformer: shapes, tied output projection, the sinusoid table, padding masks, greedy
generate against a hand-written loop, and that a few Adam steps learn a tiny copy task."""

import math

import pytest
import torch
from helpers import assert_close

import fastdl
from fastdl.models import Seq2SeqTransformer
from fastdl.models._common import sinusoidal_positions

SMALL = dict(src_vocab_size=23, tgt_vocab_size=19, d_model=16, nhead=2, num_encoder_layers=1,
             num_decoder_layers=1, dim_feedforward=24, dropout=0.0, max_len=16, pad_id=0)


@pytest.fixture
def torch_path():
    with fastdl.backend.use("torch"):
        yield


def tokens(b, n, vocab, pad_from=None):
    x = torch.randint(3, vocab, (b, n))
    if pad_from is not None:
        x[-1, pad_from:] = 0
    return x


def test_forward_shapes_and_tied_projection(backend, device):
    model = Seq2SeqTransformer(**SMALL).to(device).eval()
    src, tgt = tokens(2, 7, 23, pad_from=5).to(device), tokens(2, 5, 19).to(device)
    logits = model(src, tgt)
    assert logits.shape == (2, 5, 19)
    # No output weight of its own: the projection is the target embedding matrix.
    assert not any(p.shape == (19, 16) and p is not model.tgt_embedding.weight for p in model.parameters())
    assert isinstance(model.transformer, fastdl.nn.Transformer)
    decoded = model.transformer.decoder(
        model.tgt_embedding(tgt) * 4.0 + model.positions[:5], model.encode(src),
        tgt_mask=torch.ones(5, 5, dtype=torch.bool, device=device).triu(1),
        memory_key_padding_mask=src == 0)
    assert_close("tied logits", logits, decoded @ model.tgt_embedding.weight.T, rtol=1e-5)
    logits.sum().backward()
    assert model.tgt_embedding.weight.grad.abs().sum() > 0
    assert torch.all(model.src_embedding.weight.grad[0] == 0)  # the padding row learns nothing


def test_sinusoidal_positions():
    table = sinusoidal_positions(50, 8)
    pos, i = 37, 3
    assert math.isclose(table[pos, 2 * i].item(), math.sin(pos / 10000 ** (2 * i / 8)), abs_tol=1e-6)
    assert math.isclose(table[pos, 2 * i + 1].item(), math.cos(pos / 10000 ** (2 * i / 8)), abs_tol=1e-6)
    model = Seq2SeqTransformer(**SMALL)
    assert "positions" not in model.state_dict()  # derived, not learned


def test_causal_and_padding_masks(torch_path):
    model = Seq2SeqTransformer(**SMALL).eval()
    src, tgt = tokens(2, 7, 23, pad_from=4), tokens(2, 6, 19)
    logits = model(src, tgt)
    # Causal: changing a later target token leaves earlier positions unchanged.
    changed = tgt.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 18 + 1
    later = model(src, changed)
    assert_close("prefix", later[:, :4], logits[:, :4], rtol=1e-6)
    assert (later[:, 4:] - logits[:, 4:]).abs().max() > 1e-4
    # Source padding (derived from pad_id) is invisible: other pad-token ids change nothing.
    other = src.clone()
    other[-1, 4:] = 7
    masked = model(other, tgt, src_key_padding_mask=src == 0)
    assert_close("padding", masked, logits, rtol=1e-6)


def test_generate_matches_a_greedy_loop(backend, device):
    model = Seq2SeqTransformer(**SMALL).to(device).eval()
    src = tokens(3, 6, 23, pad_from=3).to(device)
    # eos = the first token the model picks for row 0, so that row stops at once.
    eos = model(src, torch.ones(3, 1, dtype=torch.long, device=device))[0, -1].argmax().item()
    calls = []
    model.transformer.encoder.register_forward_hook(lambda *args: calls.append(1))
    out = model.generate(src, max_new_tokens=4, bos_id=1, eos_id=eos)
    assert calls == [1]  # the encoder ran once

    ys = torch.ones(3, 1, dtype=torch.long, device=device)
    done = torch.zeros(3, dtype=torch.bool, device=device)
    for _ in range(4):
        with torch.no_grad():
            step = model(src, ys)[:, -1].argmax(-1)
        step = torch.where(done, torch.zeros_like(step), step)
        done |= step == eos
        ys = torch.cat((ys, step[:, None]), 1)
        if done.all():
            break
    assert torch.equal(out, ys)
    assert out[0, 1] == eos and torch.all(out[0, 2:] == 0)
    assert model.generate(src, 3, bos_id=1).shape == (3, 4)  # no eos: exactly max_new_tokens


def test_bos_equal_to_pad_trains_what_generate_decodes(backend, device):
    """bos_id == pad_id (T5's convention: the decoder starts from the pad token). The start token
    at position 0 is not padding: teacher forcing on generate's output gives the logits of
    torch.nn.Transformer with the same weights attending to it (no target padding mask, as
    generate feeds the prefix), and generate's tokens are that reference's greedy choices."""
    model = Seq2SeqTransformer(**SMALL).to(device).eval()  # pad_id = 0
    src = tokens(3, 6, 23, pad_from=4).to(device)
    src[0, 2] = 0  # padding inside a row too
    out = model.generate(src, 4, bos_id=0)
    assert torch.all(out[:, 0] == 0) and out.shape == (3, 5)
    with torch.no_grad():
        logits = model(src, out[:, :-1])  # what training on these targets computes

        ref = torch.nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                   dim_feedforward=24, dropout=0.0, batch_first=True)
        ref.load_state_dict(model.transformer.state_dict())
        ref = ref.double().eval()
        scale, positions = math.sqrt(16), model.positions.double().cpu()
        src_emb = model.src_embedding.weight.double().cpu()
        tgt_emb = model.tgt_embedding.weight.double().cpu()
        ys, src_cpu = out[:, :-1].cpu(), src.cpu()
        causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
        hidden = ref(src_emb[src_cpu] * scale + positions[:6], tgt_emb[ys] * scale + positions[:4],
                     tgt_mask=causal, src_key_padding_mask=src_cpu == 0, memory_key_padding_mask=src_cpu == 0)
        expected = hidden @ tgt_emb.T
    assert_close("teacher-forced logits", logits.cpu(), expected, rtol=1e-5)
    assert torch.equal(out[:, 1:].cpu(), expected.argmax(-1))


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a shared CPU extra threads make
    each of the many small steps wait (seconds instead of a fraction of one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_few_adam_steps_learn_to_copy(torch_path, one_thread):
    """Copy task: the target is the source; the loss must fall far below its start."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(src_vocab_size=12, tgt_vocab_size=12, d_model=32, nhead=4,
                               num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, dropout=0.0,
                               max_len=8, pad_id=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    src = torch.randint(3, 12, (16, 5))
    tgt = torch.cat((torch.ones(16, 1, dtype=torch.long), src), dim=1)  # bos = 1

    def loss_fn():
        logits = model(src, tgt[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 12), tgt[:, 1:].reshape(-1))

    first = loss_fn().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first, (first, loss.item())
    model.eval()
    assert (model.generate(src, 5, bos_id=1)[:, 1:] == src).float().mean() > 0.8


def test_bad_arguments(torch_path):
    with pytest.raises(ValueError, match="d_model"):
        Seq2SeqTransformer(10, 10, d_model=15, nhead=3)
    with pytest.raises(ValueError, match="pad_id"):
        Seq2SeqTransformer(10, 10, d_model=8, nhead=2, pad_id=10)
    model = Seq2SeqTransformer(**SMALL)
    with pytest.raises(TypeError, match="src"):
        model(torch.rand(2, 3), tokens(2, 3, 19))
    with pytest.raises(ValueError, match="max_len"):
        model(tokens(2, 17, 23), tokens(2, 3, 19))
    with pytest.raises(ValueError, match="mask"):
        model(tokens(2, 5, 23), tokens(2, 3, 19), src_key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(tokens(2, 5, 23), max_new_tokens=16, bos_id=1)


# ---------------------------------------------------------------------------------------------
# generate with a key/value cache, beam search
# ---------------------------------------------------------------------------------------------

DEEPER = {**SMALL, "num_decoder_layers": 2, "d_model": 32, "nhead": 4}


@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_steps_give_the_uncached_logits(backend, device, norm_first):
    """Teacher-forced through a random prefix, one token at a time: the cached decoder's logits
    at every step are those of the decoder re-run over the whole prefix."""
    from fastdl.models.seq2seq import _CachedDecoder, _UncachedDecoder

    if backend == "interpret" and norm_first:
        pytest.skip("the interpreter is slow; the layer order is tested on the torch path")
    # Under the interpreter: one decoder layer, three steps (each kernel call takes a while).
    config = SMALL if backend == "interpret" else DEEPER
    model = Seq2SeqTransformer(**config, norm_first=norm_first).to(device).eval()
    src = tokens(3, 7, 23, pad_from=5).to(device)
    steps = 3 if backend == "interpret" else 12
    ys = torch.cat((torch.ones(3, 1, dtype=torch.long), tokens(3, steps - 1, 19)), dim=1).to(device)
    with torch.no_grad():
        mask = src == 0
        memory = model.encode(src, mask)
        cached = _CachedDecoder(model, memory, mask, steps)
        uncached = _UncachedDecoder(model, memory, mask)
        for t in range(1, steps + 1):
            assert_close(f"step {t}", cached(ys[:, :t]), uncached(ys[:, :t]), rtol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generate_gives_the_uncached_tokens(torch_path, num_beams):
    model = Seq2SeqTransformer(**DEEPER).eval()
    src = tokens(3, 7, 23, pad_from=5)
    cached = model.generate(src, 12, bos_id=1, num_beams=num_beams)
    assert cached.shape == (3, 13)
    assert torch.equal(cached, model.generate(src, 12, bos_id=1, num_beams=num_beams, use_cache=False))
    # With an eos: rows stop, are padded after it, and both paths still agree.
    eos = int(cached[0, 2])
    out = model.generate(src, 12, bos_id=1, eos_token_id=eos, num_beams=num_beams)
    uncached = model.generate(src, 12, bos_id=1, eos_id=eos, num_beams=num_beams, use_cache=False)
    assert torch.equal(out, uncached)
    if num_beams == 1:
        assert eos in out[0, 1:3].tolist()
    for row in out.tolist():
        if eos in row[1:]:
            assert all(t == 0 for t in row[row.index(eos, 1) + 1:])


def test_one_row_queries_run_on_the_attention_kernel(backend, device, monkeypatch):
    """Each cached step calls fastdl's attention with a single query row against the cache."""
    model = Seq2SeqTransformer(**SMALL).to(device).eval()
    shapes = []
    real = fastdl.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        shapes.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(fastdl.functional, "scaled_dot_product_attention", spy)
    src = tokens(2, 7, 23, pad_from=5).to(device)
    model.generate(src, 4, bos_id=1)
    decode = shapes[-8:]  # 4 steps x (self, cross) in the one decoder layer
    assert decode == [(1, 1), (1, 7), (1, 2), (1, 7), (1, 3), (1, 7), (1, 4), (1, 7)]


def test_beam_search_finds_the_best_pair(torch_path):
    """With as many beams as target tokens, two steps of beam search are exhaustive: the result
    is the pair with the highest total log-probability over all vocab^2 continuations."""
    model = Seq2SeqTransformer(**SMALL).eval()
    src = tokens(2, 6, 23, pad_from=4)
    out = model.generate(src, 2, bos_id=1, num_beams=19)
    with torch.no_grad():
        for i in range(2):
            first = torch.log_softmax(model(src[i:i + 1], torch.ones(1, 1, dtype=torch.long))[0, -1], -1)
            pairs = torch.stack([torch.ones(19, dtype=torch.long), torch.arange(19)], 1)
            second = torch.log_softmax(model(src[i:i + 1].expand(19, -1), pairs)[:, -1], -1)
            total = first[:, None] + second                              # (first token, second token)
            best = divmod(int(total.argmax()), 19)
            assert tuple(out[i, 1:].tolist()) == best
    greedy = model.generate(src, 2, bos_id=1)
    assert torch.equal(model.generate(src, 2, bos_id=1, num_beams=1), greedy)


def matmul_flops(model, src, n, use_cache):
    """FLOPs of the matrix products of one generate call (FlopCounterMode does not count torch's
    CPU attention; how many keys each step's attention reads is tested above)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.generate(src, n, bos_id=1, use_cache=use_cache)
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if "attention" not in str(op))


def test_cached_step_work_does_not_grow_with_the_prefix(torch_path):
    """With the cache, the matrix products per generated token are the same at every prefix
    length (total linear in n); without it they grow with the prefix (total quadratic)."""
    model = Seq2SeqTransformer(**{**SMALL, "max_len": 20}).eval()
    src = tokens(2, 7, 23)
    cached = {n: matmul_flops(model, src, n, True) for n in (4, 8, 16)}
    per_token = [(cached[8] - cached[4]) / 4, (cached[16] - cached[8]) / 8]
    assert per_token[0] == per_token[1] > 0
    uncached = {n: matmul_flops(model, src, n, False) for n in (4, 8, 16)}
    assert (uncached[16] - uncached[8]) / 8 > 1.5 * (uncached[8] - uncached[4]) / 4
    assert uncached[16] > 3 * cached[16]


def test_generate_bad_arguments(torch_path):
    model = Seq2SeqTransformer(**SMALL)
    src = tokens(2, 5, 23)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(src, 3, bos_id=1, num_beams=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(src, 3, bos_id=1, eos_id=2, eos_token_id=3)


def test_meta_build_then_load_state_dict_is_whole(torch_path):
    """Built on the meta device, moved with to_empty() and given a state_dict, the model computes
    what the original does: the sinusoid table (a non-persistent buffer, never saved) is refilled
    on load."""
    model = Seq2SeqTransformer(**SMALL).eval()
    with torch.device("meta"):
        empty = Seq2SeqTransformer(**SMALL)
    empty = empty.to_empty(device="cpu").eval()
    empty.load_state_dict(model.state_dict())
    assert torch.equal(empty.positions, sinusoidal_positions(empty.max_len, empty.d_model))
    src, tgt = torch.randint(1, 23, (2, 6)), torch.randint(1, 19, (2, 5))
    assert_close("logits", empty(src, tgt), model(src, tgt).double(), rtol=1e-6)



def test_meta_build_then_load_state_dict_with_assign_is_whole(torch_path):
    """load_state_dict(assign=True) leaves a meta-built model's non-persistent buffers on the meta
    device; the sinusoid table is rebuilt on the loaded weights' device instead."""
    model = Seq2SeqTransformer(**SMALL).eval()
    with torch.device("meta"):
        empty = Seq2SeqTransformer(**SMALL)
    empty.load_state_dict(model.state_dict(), assign=True)
    empty.eval()
    assert torch.equal(empty.positions, sinusoidal_positions(empty.max_len, empty.d_model))
    src, tgt = torch.randint(1, 23, (2, 6)), torch.randint(1, 19, (2, 5))
    assert_close("logits", empty(src, tgt), model(src, tgt).double(), rtol=1e-6)
