"""Peak memory and time of one step on a batch taken in micro-batches (``LocoProp.step([closure, ...])``, gradient
accumulation), beside BackProp + Adam accumulating ``loss.backward()`` over the same micro-batches.

LocoProp holds each layer's rows of the whole batch (its input, pre-activation and loss gradient: what its local
problem is made of) until the local solve, but each micro-batch's autograd graph (every other activation the
backward pass needs: attention weights, norms' statistics, the transfer functions' outputs) is freed before the
next micro-batch runs.  The peak is read from the profiler's memory timeline of one step (tensors alive during
the step: the model, the optimizers' state, the batch's rows, one micro-batch's graph).  Each configuration also
checks that its step is the one-closure step: from the same weights, the largest relative difference of a
parameter after one float64 step against ``K = 1``.  Models: ``transformer`` (the row-token transformer of
``benchmarks/transformer_mnist.py``, LocoProp-M with inner Adam on its Linear layers, Adam on the rest; and
``locoprop-m-attention``: on its attention's projections too, Adam on the norms and positions; mean
cross-entropy) and ``standard`` (the paper's standard MNIST autoencoder, tanh, LocoProp-M with TF-RMSProp; the
paper's loss), on real MNIST images.

    python benchmarks/micro_batches.py --data-dir ../shared/data/mnist --out results/micro-batches-cpu/results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import locoprop
from locoprop.harness.data import load_dataset
from locoprop.harness.models import autoencoder_loss, build_autoencoder
from locoprop.harness.records import processor, readme_header

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import peak_tensor_bytes  # noqa: E402
from transformer_mnist import RowTransformer  # noqa: E402

MODELS = ("transformer", "standard")
OPTIMIZERS = ("locoprop-m", "locoprop-m-attention", "adam")


def build(model_name: str, optimizer: str, seed: int, dtype: torch.dtype = torch.float32):
    """The model and a ``step(closures)`` that runs one step over the closures' micro-batches."""
    torch.manual_seed(seed)
    if model_name == "transformer":
        model = RowTransformer().to(dtype)
        kwargs = dict(local_steps=5, activation_lr=25.0, inner="adam", output_transfer="softmax", lr=1e-3)
    else:
        model = build_autoencoder("standard", "tanh").to(dtype)
        kwargs = dict(local_steps=10, activation_lr=10.0, inner="tf_rmsprop", output_transfer="sigmoid", lr=1e-5,
                      inner_kwargs={"momentum": 0.999, "alpha": 0.9, "eps": 1e-5})
    if optimizer == "adam":
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(closures):
            adam.zero_grad()
            for closure in closures:
                closure().backward()
            adam.step()
        return model, step
    opt = locoprop.LocoProp(model, "M", attention=optimizer == "locoprop-m-attention", **kwargs)
    others = opt.other_parameters()
    adam = torch.optim.Adam(others, lr=1e-3) if others else None

    def step(closures):
        if adam is not None:
            adam.zero_grad()
        opt.step(closures)
        if adam is not None:
            adam.step()
    return model, step


def closures_for(model_name: str, model, images, labels, parts: int):
    """``parts`` closures whose losses add up to the batch's (each micro-batch's share of the mean)."""
    n = len(images)

    def loss(x, y):
        if model_name == "transformer":
            return F.cross_entropy(model(x), y, reduction="sum") / n
        return autoencoder_loss(model(x), x) * len(x) / n
    return [lambda x=x, y=y: loss(x, y) for x, y in zip(images.chunk(parts), labels.chunk(parts))]


def one_step(model_name: str, optimizer: str, parts: int, images, labels, seed: int) -> list[torch.Tensor]:
    """The weights after one float64 step from the seed's initial weights (float64: Adam's first step divides
    each gradient by its own size, so float32 rounding of a gradient near zero would move its weight by about
    the learning rate either way, hiding whether the steps are the same)."""
    model, step = build(model_name, optimizer, seed, torch.float64)
    step(closures_for(model_name, model, images.double(), labels, parts))
    return [p.detach() for p in model.parameters()]


def measure(model_name: str, optimizer: str, parts: int, images, labels, args) -> dict:
    model, step = build(model_name, optimizer, args.seed)
    step(closures_for(model_name, model, images, labels, parts))  # warm-up (the first step pairs, allocates state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(closures_for(model_name, model, images, labels, parts))
        times.append(time.perf_counter() - t0)
    peak = peak_tensor_bytes(lambda: step(closures_for(model_name, model, images, labels, parts))) / 2 ** 20
    return {"model": model_name, "optimizer": optimizer, "micro_batches": parts, "batch_size": len(images),
            "peak_tensor_mb": peak, "step_ms_median": 1e3 * statistics.median(times), "steps_timed": args.steps}


def readme(meta: dict, records: list[dict], json_name: str) -> str:
    lines = readme_header("benchmarks/micro_batches.py", meta, json_name) + [
        f"Batch {meta['batch_size']}; `K` micro-batches of it in one step. Peak: MiB of tensors alive during one "
        "step; ratio: against the same optimizer's one-closure step; difference: the largest relative "
        "difference of a parameter after one float64 step against `K = 1` from the same weights.", "",
        "| model | optimizer | K | peak tensor MiB | peak ratio | step ms (median) | difference to K = 1 |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    base = {(r["model"], r["optimizer"]): r for r in records if r["micro_batches"] == 1}
    for r in records:
        b = base[(r["model"], r["optimizer"])]
        diff = "—" if r["micro_batches"] == 1 else f"{r['max_rel_diff_to_one']:.1e}"
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['micro_batches']} | {r['peak_tensor_mb']:.1f} | "
                     f"{r['peak_tensor_mb'] / b['peak_tensor_mb']:.2f} | {r['step_ms_median']:.0f} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    ap.add_argument("--micro-batches", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON file; a README.md is written beside it")
    args = ap.parse_args(argv)
    if 1 not in args.micro_batches:
        ap.error("--micro-batches: include 1 (the one-closure step every other K is compared with)")
    if any(k < 1 or k > args.batch_size for k in args.micro_batches):
        ap.error(f"--micro-batches: each K must be between 1 and --batch-size ({args.batch_size})")
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", args.data_dir, limit_train=args.batch_size)
    images, labels = data.train, data.train_labels
    meta = {"title": "A step in micro-batches: peak memory and step time (CPU)",
            "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.date.today().isoformat(),
            "machine": f"CPU {processor()} ({platform.machine()}), {args.threads} threads",
            "torch": torch.__version__, "batch_size": len(images), "data": data.describe(),
            "about": __doc__.split("\n\n")[1].replace("\n", " ")}
    records = []
    for model_name in args.models:
        for optimizer in args.optimizers:
            if optimizer == "locoprop-m-attention" and model_name != "transformer":
                continue  # no attention: locoprop-m's steps
            one = one_step(model_name, optimizer, 1, images, labels, args.seed)
            for parts in sorted(args.micro_batches):
                r = measure(model_name, optimizer, parts, images, labels, args)
                if parts > 1:
                    after = one_step(model_name, optimizer, parts, images, labels, args.seed)
                    r["max_rel_diff_to_one"] = max(float((a - b).norm() / b.norm().clamp_min(1e-300))
                                                   for a, b in zip(after, one))
                records.append(r)
                print(f"{model_name} {optimizer} K={parts}: peak {r['peak_tensor_mb']:.1f} MiB, step "
                      f"{r['step_ms_median']:.0f} ms", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    (out.parent / "README.md").write_text(readme(meta, records, out.name))


if __name__ == "__main__":
    main()
