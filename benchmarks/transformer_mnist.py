"""LocoProp on a transformer, on real MNIST: a small transformer classifier trained with LocoProp-M on its Linear
layers and Adam on the rest, beside Adam on everything, a few learning rates each, for a few epochs on the CPU.

Not a figure of the paper (its models are fully connected MLPs): a check that LocoProp trains the layers of a
model it cannot trace into (``nn.TransformerEncoder``: its feed-forward layers are paired at the first step,
``locoprop.layers.pair_from_autograd``) on real data, with the honest comparison beside it.  The model reads
each image as 28 tokens (its rows of 28 pixels): a Linear embedding to 64, a learned position per row, two
``nn.TransformerEncoderLayer`` blocks (4 heads, feed-forward 128 with ReLU, no dropout), the mean over tokens, a
LayerNorm and a Linear head to 10 classes; the loss is the mean cross-entropy.  LocoProp-M (``output_transfer=
"softmax"``, ``T`` local iterations of Adam, γ ``--activation-lr``) solves the Linear layers (the embedding, the
blocks' ``linear1`` with its ReLU and ``linear2``, the head); the attention, the norms and the positions take
Adam at ``--other-lr`` from the gradients LocoProp's step leaves in ``.grad`` (``other_grads``).  Learning rates
stay constant (no schedule: a short run is not a truncated long one).

    python benchmarks/transformer_mnist.py --data-dir ../shared/data/mnist --epochs 5 --limit-train 20000 \\
        --out results/transformer-mnist-cpu/runs.json

``locoprop-m-attention`` runs are LocoProp-M on the attention's projections too (its query, key, value and
output projections, ``locoprop.layers.AttentionProjection``: eight more layers), Adam then only on the norms
and the positions; ``locoprop-m`` keeps the attention with Adam (``attention=False``).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import locoprop
from locoprop.harness.data import load_dataset
from locoprop.harness.records import (final_records, parse_runs, processor, readme_header, resumed_records,
                                     train_missing_runs)

OPTIMIZERS = ("adam", "locoprop-m", "locoprop-m-attention")


class RowTransformer(nn.Module):
    """Each 28 x 28 image as 28 tokens of 28 pixels; mean-pooled, then classified."""

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, feedforward: int = 128) -> None:
        super().__init__()
        self.embed = nn.Linear(28, width)
        self.position = nn.Parameter(0.02 * torch.randn(28, width))
        block = nn.TransformerEncoderLayer(width, heads, feedforward, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(x.reshape(-1, 28, 28)) + self.position)
        return self.head(self.norm(h.mean(1)))


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and error rate over a whole split."""
    loss, wrong = 0.0, 0
    with torch.no_grad():
        for part, y in zip(images.split(2000), labels.split(2000)):
            logits = model(part)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            wrong += int((logits.argmax(1) != y).sum())
    return loss / len(images), wrong / len(images)


class Optimizers:
    """One training step: Adam on every parameter, or LocoProp-M on the Linear layers and Adam on the rest."""

    def __init__(self, name: str, model: nn.Module, lr: float, args) -> None:
        self.name, self.locoprop = name, None
        if name == "adam":
            self.adam = torch.optim.Adam(model.parameters(), lr=lr)
            return
        self.locoprop = locoprop.LocoProp(model, "M", lr=lr, activation_lr=args.activation_lr,
                                          local_steps=args.local_steps, inner="adam", output_transfer="softmax",
                                          attention=name == "locoprop-m-attention")
        if args.attention_activation_lr is not None:  # the attention's projections' own γ (their param groups)
            for lay, group in zip(self.locoprop.layers, self.locoprop.param_groups):
                if isinstance(lay.linear, locoprop.layers.AttentionProjection):
                    group["activation_lr"] = args.attention_activation_lr
        self.adam = torch.optim.Adam(self.locoprop.other_parameters(), lr=args.other_lr)

    def step(self, closure) -> None:
        self.adam.zero_grad()
        if self.locoprop is None:
            closure().backward()
        else:
            self.locoprop.step(closure)
        self.adam.step()


def train(name: str, lr: float, data, args) -> list[dict]:
    torch.manual_seed(args.seed)
    model = RowTransformer()
    opt = Optimizers(name, model, lr, args)
    order = torch.Generator().manual_seed(args.seed)
    records, wall = [], 0.0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        for index in torch.randperm(len(data.train), generator=order).split(args.batch_size):
            x, y = data.train[index], data.train_labels[index]
            opt.step(lambda: F.cross_entropy(model(x), y))
        wall += time.perf_counter() - t0
        train_loss, train_error = evaluate(model, data.train, data.train_labels)
        test_loss, test_error = evaluate(model, data.test, data.test_labels)
        records.append({"optimizer": name, "lr": lr, "epoch": epoch, "train_loss": train_loss,
                        "train_error": train_error, "test_loss": test_loss, "test_error": test_error,
                        "train_wall_s": wall})
        print(f"{name} lr={lr:g} epoch {epoch}: train {train_loss:.4f} ({100 * train_error:.2f}%) test "
              f"{test_loss:.4f} ({100 * test_error:.2f}%) ({wall:.0f} s)", flush=True)
    if opt.locoprop is not None:
        records[-1]["pairs"] = {lay.name: lay.transfer_desc for lay in opt.locoprop.layers}
    return records


def readme(meta: dict, records: list[dict], json_name: str) -> str:
    rows = final_records(records)
    lines = readme_header("benchmarks/transformer_mnist.py", meta, json_name) + [
             f"LocoProp-M: γ {meta['activation_lr']:g}"
             + (f" (the attention's projections: γ {meta['attention_activation_lr']:g})"
                if meta.get("attention_activation_lr") is not None else "")
             + f", T {meta['local_steps']}, Adam at "
             f"{meta['other_lr']:g} on the other parameters. After {meta['epochs']} epochs of "
             f"{meta['train_examples']} training images (batch {meta['batch_size']}), best train loss first:", "",
             "| optimizer | learning rate | train loss | train error | test loss | test error | train wall s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['optimizer']} | {r['lr']:g} | {r['train_loss']:.4f} | {100 * r['train_error']:.2f}% | "
              f"{r['test_loss']:.4f} | {100 * r['test_error']:.2f}% | {r['train_wall_s']:.0f} |" for r in rows]
    best = {}
    for r in rows:
        best.setdefault(r["optimizer"], r)
    epochs = sorted({r["epoch"] for r in records})
    lines += ["", "Train loss by epoch of each optimizer's best run (and its train wall time):", "",
              "| optimizer | learning rate | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
              "| --- | --- | " + " | ".join("---" for _ in epochs) + " |"]
    for r in best.values():
        run = {x["epoch"]: x for x in records if (x["optimizer"], x["lr"]) == (r["optimizer"], r["lr"])}
        lines.append(f"| {r['optimizer']} | {r['lr']:g} | " + " | ".join(
            f"{run[e]['train_loss']:.4f} ({run[e]['train_wall_s']:.0f} s)" for e in epochs) + " |")
    pairs = next((r["pairs"] for r in records if "pairs" in r), None)
    if pairs:
        lines += ["", "The layers LocoProp-M solved and their transfer functions (those inside "
                  "`nn.TransformerEncoder` paired at the first step, the others by the trace):", "",
                  "| layer | transfer function |", "| --- | --- |"]
        lines += [f"| `{name}` | {desc} |" for name, desc in pairs.items()]
    return "\n".join(lines) + "\n\nEvery epoch of every run is in the JSON file.\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--limit-train", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--activation-lr", type=float, default=25.0, help="LocoProp-M's gamma")
    ap.add_argument("--local-steps", type=int, default=5, help="LocoProp-M's T")
    ap.add_argument("--attention-activation-lr", type=float, default=None,
                    help="locoprop-m-attention: the attention projections' gamma (default: --activation-lr)")
    ap.add_argument("--other-lr", type=float, default=3e-3,
                    help="Adam's learning rate on the parameters outside LocoProp-M's layers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="+", metavar="OPTIMIZER:LR",
                    default=["adam:1e-3", "adam:3e-3", "adam:1e-2", "locoprop-m:3e-4", "locoprop-m:1e-3",
                             "locoprop-m:3e-3"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs --out already holds (same settings) and train only the others")
    args = ap.parse_args(argv)
    runs = parse_runs(ap, args.runs, OPTIMIZERS)
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", args.data_dir, limit_train=args.limit_train)
    meta = {
        "title": "LocoProp-M on a transformer's Linear layers: a row-token transformer classifier on MNIST (CPU)",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "machine": f"CPU {processor()} ({platform.machine()}), {args.threads} threads",
        "torch": torch.__version__, "epochs": args.epochs, "train_examples": len(data.train),
        "batch_size": args.batch_size, "activation_lr": args.activation_lr,
        "attention_activation_lr": args.attention_activation_lr, "local_steps": args.local_steps,
        "other_lr": args.other_lr, "data": data.describe(), "about": __doc__.split("\n\n")[1].replace("\n", " "),
    }
    records = resumed_records(ap, args.out, meta, args.resume)
    train_missing_runs(runs, records, args.epochs, lambda name, lr: train(name, lr, data, args), args.out, meta, readme)


if __name__ == "__main__":
    main()
