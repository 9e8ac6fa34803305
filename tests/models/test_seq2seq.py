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
