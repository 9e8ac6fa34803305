"""Load a Hugging Face BERT checkpoint with fastdl, run a padded batch, fine-tune a few steps.

    python examples/bert_from_checkpoint.py                    # a small random checkpoint
    python examples/bert_from_checkpoint.py path/to/bert-dir   # any local HF BERT directory
    python examples/bert_from_checkpoint.py --steps 20 --batch 8 --seq 32

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``),
as ``save_pretrained`` writes it; nothing is downloaded. Without a path, a small random BERT is
written to a temporary directory first (by ``transformers`` when it is installed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch

import fastdl
from fastdl.models import BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel

SMALL = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=128)


def write_random_checkpoint(directory: Path) -> None:
    """A BertForPreTraining checkpoint in Hugging Face's format, random weights."""
    try:
        import transformers
    except ImportError:  # same files, written from fastdl's model (its keys are Hugging Face's)
        from safetensors.torch import save_file
        model = BertForPreTraining(BertConfig(**SMALL))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
        return
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.BertForPreTraining(transformers.BertConfig(**SMALL)).save_pretrained(directory)


def padded_batch(batch: int, seq: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids; row i keeps a random length and is padded (id 0, mask 0) after it."""
    lengths = torch.randint(2, seq + 1, (batch,))
    lengths[0] = seq
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (batch, seq)) * mask
    return ids.to(device), mask.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="a local Hugging Face BERT checkpoint directory")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="fine-tuning steps of a classifier")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.path) if args.path else Path(tmp)
        if not args.path:
            write_random_checkpoint(path)
        bert = BertModel.from_pretrained(path, device=device)
        # The classifier head is not in the checkpoint: it starts from its init (a warning says so).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            classifier = BertForSequenceClassification.from_pretrained(path, num_labels=2, device=device)

    ids, mask = padded_batch(args.batch, args.seq, bert.config.vocab_size, device)
    with torch.no_grad():
        out = bert(ids, attention_mask=mask)
    print(f"fastdl {fastdl.__version__} on the {fastdl.backend.resolve(out.last_hidden_state)!r} backend")
    print(f"input_ids {tuple(ids.shape)}, {int((mask == 0).sum())} padded positions")
    print(f"last_hidden_state {tuple(out.last_hidden_state.shape)}, "
          f"pooler_output {tuple(out.pooler_output.shape)}")

    labels = torch.randint(0, 2, (args.batch,), device=device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3)
    classifier.train()
    for step in range(args.steps):
        loss = classifier(ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
