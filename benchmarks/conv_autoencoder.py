"""LocoProp on convolution layers, on real MNIST: a small convolutional autoencoder trained by LocoProp-M and
by the BackProp baselines, a few learning rates each, for a few epochs on the CPU.

Not a figure of the paper (its models are fully connected): a check that the convolution layers
(:class:`locoprop.layers.ConvMatrix`) train on real data, with the honest comparison beside them.  The model:
two strided 5x5 convolutions (1 -> 16 -> 32 channels, tanh), a linear code of 30, and a fully connected
decoder (tanh); the paper's loss (sigmoid cross-entropy summed over pixels, mean over the batch).  Every
optimizer keeps the harness's settings (``locoprop.harness.optimizers.build_optimizer``: TF-RMSProp and the
notebook's LocoProp-M hyper-parameters, β1 0.999, β2 0.9, ε 1e-5, γ 10, T 10) but its learning rate, which
``--runs`` lists, which stays constant (no schedule: a short run is not a truncated long one).

    python benchmarks/conv_autoencoder.py --data-dir ../shared/data/mnist --epochs 10 --limit-train 10000 \\
        --out results/conv-autoencoder-cpu/runs.json
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch
from torch import nn

from locoprop.harness.data import load_dataset
from locoprop.harness.models import AutoencoderLoss, autoencoder_loss
from locoprop.harness.optimizers import build_optimizer
from locoprop.harness.records import (final_records, parse_runs, processor, readme_header, resumed_records,
                                     train_missing_runs)
from locoprop.harness.train import evaluate

#: The harness's settings of each optimizer, but the learning rate (``--runs``).
SETTINGS = {
    "rmsprop": dict(beta1=0.9, beta2=0.9, eps=1e-8),
    "adam": dict(),
    "locoprop-m": dict(activation_lr=10.0, local_steps=10, beta1=0.999, beta2=0.9, eps=1e-5),
}


#: The decoders after the code of 30: fully connected (the first results), or the encoder mirrored by transposed
#: convolutions (:class:`locoprop.layers.ConvTransposeMatrix`), with what the README says of each.
DECODERS = {
    "linear": ("a fully connected decoder (tanh)",
               lambda: [nn.Linear(30, 1568), nn.Tanh(), nn.Linear(1568, 784)]),
    "transposed": ("a decoder mirroring the encoder with transposed convolutions (30 -> 32 x 7 x 7, tanh, "
                   "5x5 stride 2 to 16 x 14 x 14, tanh, 5x5 stride 2 to 1 x 28 x 28)",
                   lambda: [nn.Linear(30, 1568), nn.Tanh(), nn.Unflatten(1, (32, 7, 7)),
                            nn.ConvTranspose2d(32, 16, 5, stride=2, padding=2, output_padding=1), nn.Tanh(),
                            nn.ConvTranspose2d(16, 1, 5, stride=2, padding=2, output_padding=1), nn.Flatten()]),
}


def conv_autoencoder(seed: int = 0, decoder: str = "linear") -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.Tanh(),
                         nn.Conv2d(16, 32, 5, stride=2, padding=2), nn.Tanh(), nn.Flatten(), nn.Linear(1568, 30),
                         *DECODERS[decoder][1]())


def mean_loss(model: nn.Module, images: torch.Tensor) -> float:
    """The paper's loss over a whole split (the harness's :func:`~locoprop.harness.train.evaluate`)."""
    with torch.no_grad():
        return evaluate(model, images)


def train(name: str, lr: float, data, epochs: int, batch: int, seed: int, decoder: str = "linear") -> list[dict]:
    model = conv_autoencoder(seed, decoder)
    opt = build_optimizer(name, model, AutoencoderLoss(), lr=lr, **SETTINGS[name])
    order = torch.Generator().manual_seed(seed)
    records, wall = [], 0.0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        for index in torch.randperm(len(data.train), generator=order).split(batch):
            x = data.train[index]
            opt.step(lambda: autoencoder_loss(model(x), x))
        wall += time.perf_counter() - t0
        records.append({"optimizer": name, "lr": lr, "epoch": epoch, "train_loss": mean_loss(model, data.train),
                        "test_loss": mean_loss(model, data.test), "train_wall_s": wall})
        print(f"{name} lr={lr:g} epoch {epoch}: train {records[-1]['train_loss']:.3f} "
              f"test {records[-1]['test_loss']:.3f} ({wall:.0f} s)", flush=True)
    return records


def readme(meta: dict, records: list[dict], json_name: str) -> str:
    rows = final_records(records)
    lines = readme_header("benchmarks/conv_autoencoder.py", meta, json_name) + [
        f"After {meta['epochs']} epochs of {meta['train_examples']} training images (batch {meta['batch_size']}), "
        "best train loss first:", "",
        "| optimizer | learning rate | train loss | test loss | train wall s |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['optimizer']} | {r['lr']:g} | {r['train_loss']:.3f} | {r['test_loss']:.3f} | "
              f"{r['train_wall_s']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n\nEvery epoch of every run is in the JSON file.\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--limit-train", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="+", metavar="OPTIMIZER:LR",
                    default=["rmsprop:3e-4", "rmsprop:1e-3", "rmsprop:3e-3", "adam:1e-3", "adam:3e-3",
                             "locoprop-m:3e-6", "locoprop-m:1e-5", "locoprop-m:3e-5"])
    ap.add_argument("--decoder", choices=sorted(DECODERS), default="linear",
                    help="the decoder after the code: fully connected, or transposed convolutions")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs --out already holds (same epochs) and train only the others")
    args = ap.parse_args(argv)
    runs = parse_runs(ap, args.runs, SETTINGS)
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", args.data_dir, limit_train=args.limit_train)
    meta = {
        "title": "LocoProp-M on convolution layers: a convolutional autoencoder on MNIST (CPU)" + (
            ", transposed-convolution decoder" if args.decoder == "transposed" else ""),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "machine": f"CPU {processor()} ({platform.machine()}), {args.threads} threads",
        "torch": torch.__version__, "epochs": args.epochs, "train_examples": len(data.train),
        "batch_size": args.batch_size, "data": data.describe(),
        "about": __doc__.split("\n\n")[1].replace("\n", " ").replace(DECODERS["linear"][0],
                                                                       DECODERS[args.decoder][0]),
    }
    records = resumed_records(ap, args.out, meta, args.resume)
    train_missing_runs(runs, records, args.epochs,
                       lambda name, lr: train(name, lr, data, args.epochs, args.batch_size, args.seed, args.decoder),
                       args.out, meta, readme)


if __name__ == "__main__":
    main()
