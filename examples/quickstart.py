"""Swap torch.nn modules for fastdl's and check nothing changes.

    python examples/quickstart.py

First a small model has its ``torch.nn.LayerNorm`` replaced by ``fastdl.nn.LayerNorm`` (same
constructor, same ``state_dict``); then every drop-in module — LayerNorm, RMSNorm, BatchNorm1d/2d,
Embedding, MultiheadAttention, TransformerEncoderLayer, Dropout — is built beside its torch.nn
twin with the same weights and run forward and backward on the same input. Prints which backend
ran (``triton`` on a GPU, ``torch`` or ``interpret`` on a CPU) and the largest differences.

More: examples/train_bert_mlm.py, examples/train_vit.py, examples/translate_toy.py,
examples/bert_from_checkpoint.py, and benchmarks/README.md for timings.
"""

from __future__ import annotations

import torch

import fastdl


def swap_layer_norm(device: str) -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.LayerNorm(256), torch.nn.GELU(), torch.nn.Linear(256, 10),
    ).to(device)
    x = torch.randn(32, 64, device=device)

    expected = model(x)
    expected.square().mean().backward()
    expected_grad = model[0].weight.grad.clone()
    model.zero_grad()

    fused = fastdl.nn.LayerNorm(256).to(device)
    fused.load_state_dict(model[1].state_dict())  # same parameter names as torch.nn
    model[1] = fused
    out = model(x)
    out.square().mean().backward()

    print(f"fastdl {fastdl.__version__}: LayerNorm ran on the {fastdl.backend.resolve(x)!r} backend")
    print(f"max |output difference|   = {(out - expected).abs().max().item():.2e}")
    print(f"max |gradient difference| = {(model[0].weight.grad - expected_grad).abs().max().item():.2e}")


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # MultiheadAttention returns (output, weights)


def compare(name: str, reference: torch.nn.Module, fused: torch.nn.Module, make_input, call=None) -> None:
    """Same weights, same input: largest |difference| of the output and of the input's gradient
    (of the weight's gradient for an embedding, whose input is integer ids)."""
    fused.load_state_dict(reference.state_dict())
    call = call or (lambda module, x: module(x))
    results = []
    for module in (reference, fused):
        torch.manual_seed(1)
        x = make_input()
        out = _first(call(module, x))
        out.float().square().mean().backward()
        grad = x.grad if x.is_floating_point() else module.weight.grad
        results.append((out.detach(), grad, x))
    (out_ref, grad_ref, x), (out_new, grad_new, _) = results
    backend = fastdl.backend.resolve(x if x.is_floating_point() else fused.weight)
    print(f"  {name:<26} {backend:<10} {(out_new - out_ref).abs().max().item():>10.2e} "
          f"{(grad_new - grad_ref).abs().max().item():>10.2e}")


def drop_in_modules(device: str) -> None:
    print("\nevery drop-in module against its torch.nn twin (same weights, same input):")
    print(f"  {'module':<26} {'backend':<10} {'max |dout|':>10} {'max |dgrad|':>10}")

    def randn(*shape):
        return lambda: torch.randn(*shape, device=device, requires_grad=True)

    compare("LayerNorm(256)", torch.nn.LayerNorm(256), fastdl.nn.LayerNorm(256), randn(32, 256))
    compare("RMSNorm(256)", torch.nn.RMSNorm(256), fastdl.nn.RMSNorm(256), randn(32, 256))
    compare("BatchNorm1d(48)", torch.nn.BatchNorm1d(48), fastdl.nn.BatchNorm1d(48), randn(16, 48, 20))
    compare("BatchNorm2d(16)", torch.nn.BatchNorm2d(16), fastdl.nn.BatchNorm2d(16), randn(8, 16, 10, 10))
    compare("Embedding(1000, 64)", torch.nn.Embedding(1000, 64, padding_idx=0),
            fastdl.nn.Embedding(1000, 64, padding_idx=0),
            lambda: torch.randint(0, 1000, (8, 20), device=device))
    compare("MultiheadAttention(64, 4)", torch.nn.MultiheadAttention(64, 4, batch_first=True),
            fastdl.nn.MultiheadAttention(64, 4, batch_first=True), randn(8, 20, 64),
            call=lambda m, x: m(x, x, x, need_weights=False))
    layer_args = dict(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
    compare("TransformerEncoderLayer", torch.nn.TransformerEncoderLayer(**layer_args),
            fastdl.nn.TransformerEncoderLayer(**layer_args), randn(8, 20, 64))

    # Dropout draws its own random numbers, so its mask differs from torch's: check its statistics
    # and that torch.manual_seed reproduces it.
    drop = fastdl.nn.Dropout(0.25)
    x = torch.ones(100_000, device=device)
    torch.manual_seed(0)
    y = drop(x)
    torch.manual_seed(0)
    same = torch.equal(drop(x), y)
    kept = (y != 0).float().mean().item()
    print(f"  {'Dropout(0.25)':<26} {fastdl.backend.resolve(x):<10} kept {kept:.3f} (expected 0.75), "
          f"kept values scaled to {y.max().item():.4f} (expected 1/0.75 = 1.3333)")
    print(f"  {'':<26} {'':<10} reproducible with torch.manual_seed: {same}; "
          f"identity in eval(): {torch.equal(drop.eval()(x), x)}")


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    swap_layer_norm(device)
    drop_in_modules(device)


if __name__ == "__main__":
    main()
