"""Swap torch.nn.LayerNorm for fastdl's in a small model and check nothing changes.

    python examples/quickstart.py

Prints which backend ran (``triton`` on a GPU, ``torch`` or ``interpret`` on a CPU) and the
largest difference between the two models' outputs and gradients.
"""

import torch

import fastdl


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
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


if __name__ == "__main__":
    main()
