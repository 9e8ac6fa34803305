"""Train a small Vision Transformer on scikit-learn's bundled handwritten digits.

    python examples/train_vit.py                          # about 1-2 minutes on a CPU
    python examples/train_vit.py --mixup 0.2 --epochs 60 --plot runs/vit_digits.png

Data: ``sklearn.datasets.load_digits`` — 1797 greyscale 8x8 images of the digits 0-9, shipped
with scikit-learn (nothing is downloaded); 80% for training, 20% held out (stratified, fixed
seed). Each image is cut into 2x2 patches, so the model sees 16 patch tokens and a [CLS] token.

Model: ``fastdl.models.ViTForImageClassification`` (4 layers, hidden 64, 4 heads); its
LayerNorms, fused dropout + add + LayerNorm and attention run on fastdl's kernels on a GPU and on
the PyTorch path on a CPU. Training: augmentation by 1-pixel shifts (of 10% of the images,
``--shift-prob``; on 8x8 digits more shifting slows learning a lot), contrast jitter and pixel
noise; optional mixup (``--mixup ALPHA``); label smoothing, AdamW, warm-up then cosine decay.
Prints the loss and the held-out accuracy after every epoch and saves the curves as a PNG
(``--plot``; skipped with a message if matplotlib is missing).

Measured (defaults: 50 epochs of batch 64, 1150 steps, 0.14M parameters; ``OMP_NUM_THREADS=1
python examples/train_vit.py`` on a shared 2-core CPU): held-out accuracy 17.2% after epoch 1,
93.6% after 10, 95.0% after 25 and 97.8% (352 of 360 images) after epoch 50, in 73 s; the
training loss falls from 2.30 to 0.59 (label smoothing 0.1 and augmentation keep it above the
held-out loss, 0.15).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as TF

import fastdl


def load_digits(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) float32 in [0, 1], labels int64."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=test_fraction,
                                           random_state=seed, stratify=digits.target)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def augment(images: torch.Tensor, generator: torch.Generator, shift_prob: float) -> torch.Tensor:
    """Shift an image by one pixel (zero padding) with probability ``shift_prob``, in a random
    direction, jitter its contrast by up to 10% and add a little pixel noise."""
    b = images.shape[0]
    padded = TF.pad(images, (1, 1, 1, 1))
    shifted = torch.rand(b, generator=generator) < shift_prob
    dy = torch.where(shifted, torch.randint(0, 3, (b,), generator=generator), 1)
    dx = torch.where(shifted, torch.randint(0, 3, (b,), generator=generator), 1)
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(b, 1, 8, 10)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(b, 1, 8, 8)
    shifted = shifted.gather(3, cols)
    contrast = 1.0 + 0.2 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    noise = 0.03 * torch.randn(shifted.shape, generator=generator)
    return (shifted * contrast + noise).clamp(0, 1)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, images, labels, device, batch_size=256) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a held-out set."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = normalise(images[start:start + batch_size]).to(device)
        y = labels[start:start + batch_size].to(device)
        logits = model(x).logits.float()
        loss += TF.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
    model.train()
    return loss / len(labels), correct / len(labels)


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - 0.3) / 0.4  # about the digits' mean and standard deviation


def save_plot(history: dict, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    epochs = range(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, history["train_loss"], label="training (augmented)")
    ax_loss.plot(epochs, history["test_loss"], label="held out")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, [100 * a for a in history["test_acc"]], color="tab:green")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("held-out accuracy (%)")
    ax_acc.grid(alpha=0.3)
    fig.suptitle("fastdl ViT on scikit-learn digits")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"saved the curves to {path}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="mix pairs of images with weight ~ Beta(ALPHA, ALPHA) (0: off)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--shift-prob", type=float, default=0.1, help="fraction of images shifted by a pixel")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=2, choices=[1, 2, 4])
    p.add_argument("--plot", type=Path, default=Path("vit_digits.png"), help="where to save the curves")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_digits(args.seed)
    config = fastdl.models.ViTConfig(
        image_size=8, patch_size=args.patch, num_channels=1, hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, intermediate_size=2 * args.hidden,
        hidden_dropout_prob=0.1, num_labels=10)
    model = fastdl.models.ViTForImageClassification(config).to(args.device).train()
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    if args.steps is not None:
        total = min(total, args.steps)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "position" not in n]
    others = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "position" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=args.lr)
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    print(f"digits: {len(y_train)} training / {len(y_test)} held-out 8x8 images; ViT with "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {(8 // args.patch) ** 2} patches, "
          f"on {args.device} (fastdl backend {fastdl.backend.resolve(next(model.parameters()))!r})")

    history = {"train_loss": [], "test_loss": [], "test_acc": []}
    step, start = 0, time.perf_counter()
    beta = torch.distributions.Beta(args.mixup, args.mixup) if args.mixup > 0 else None
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(y_train), generator=gen)
        running, seen = 0.0, 0
        for first in range(0, len(order), args.batch_size):
            if step >= total:
                break
            idx = order[first:first + args.batch_size]
            x, y = x_train[idx], y_train[idx]
            if not args.no_augment:
                x = augment(x, gen, args.shift_prob)
            x, y = normalise(x).to(args.device), y.to(args.device)
            if beta is not None:
                lam = float(beta.sample())
                perm = torch.randperm(len(y), generator=gen).to(args.device)
                # Mixed images, mixed targets: class probabilities lam and 1 - lam, into the
                # fused classifier + cross-entropy (soft targets, label smoothing on top).
                cls_state = model.vit(lam * x + (1 - lam) * x[perm]).last_hidden_state[:, 0]
                classes = model.config.num_labels
                target = lam * TF.one_hot(y, classes) + (1 - lam) * TF.one_hot(y[perm], classes)
                loss = fastdl.functional.linear_cross_entropy(
                    cls_state, model.classifier.weight, target.to(cls_state.dtype), model.classifier.bias,
                    label_smoothing=args.label_smoothing).float()
            else:
                logits = model(x).logits.float()
                loss = TF.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            running += loss.item() * len(y)
            seen += len(y)
        if seen == 0:
            break
        test_loss, test_acc = evaluate(model, x_test, y_test, args.device)
        history["train_loss"].append(running / seen)
        history["test_loss"].append(test_loss)
        history["test_acc"].append(test_acc)
        print(f"epoch {epoch:3d}  step {step:5d}  train loss {running / seen:.3f}  "
              f"held-out loss {test_loss:.3f}  accuracy {100 * test_acc:5.1f}%  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    final = history["test_acc"][-1] if history["test_acc"] else float("nan")
    correct = round(final * len(y_test)) if history["test_acc"] else 0
    print(f"held-out accuracy after {len(history['test_acc'])} epochs ({step} steps): {100 * final:.1f}% "
          f"({correct}/{len(y_test)}), in {time.perf_counter() - start:.0f} s")
    print(save_plot(history, args.plot))
    return history


if __name__ == "__main__":
    main()
