"""Step time, peak memory and the matrix-product floor of every optimizer (issue: a LocoProp step at the
speed of its matrix products; paper Table 1 and Sec. 3.4).

For each (model, batch size, optimizer, T) it times the median of many steps after warm-up (CUDA events
on a GPU, ``time.perf_counter`` on the CPU), records the peak memory (``torch.cuda.max_memory_allocated``
on a GPU; on the CPU the peak resident set of a fresh process running only that configuration, minus the
process's resident set before the optimizer's first step), and computes the FLOP floor from the layer
shapes and the matrix-product rate measured on the same machine:

* BackProp: 3 products per layer (forward, backward to the input, backward to the weights);
* LocoProp with T local iterations: those 3 plus 2 per layer per local iteration.

It writes ``results/perf/DEVICE-DATE.json`` (a list of records with ``device``, ``model``, ``optimizer``,
``local_steps``, ``batch_size``, ``step_ms_median``, ``peak_mem_mb``, ``floor_ms``, ...) and prints a table.

    python benchmarks/step_time.py --models standard --batch-sizes 100 1000
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from locoprop.harness.models import AutoencoderLoss, build_autoencoder
from locoprop.harness.optimizers import build_optimizer

# (harness name, settings); LocoProp entries are expanded over --local-steps.
OPTIMIZERS = {
    "sgd": dict(lr=1e-3),
    "adam": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8),
    "rmsprop": dict(lr=1e-3, beta1=0.9, beta2=0.9, eps=1e-8),
    "locoprop-s": dict(lr=1e-4, activation_lr=10.0, beta1=0.9, beta2=0.9, eps=1e-8),
    "locoprop-m": dict(lr=1e-4, activation_lr=10.0, beta1=0.9, beta2=0.9, eps=1e-8),
    "shampoo": dict(lr=1e-3, beta1=0.9),
    "kfac": dict(lr=1e-3, beta1=0.9, damping=1e-2),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def matmul_rate(device: torch.device, dtype=torch.float32, n: int = 2048, reps: int = 10) -> float:
    """Measured FLOP/s of a large square matrix product on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def product_flops(model: torch.nn.Module, batch: int, local_steps: int, locoprop: bool) -> float:
    """FLOPs of the matrix products of one step (see the module docstring)."""
    flops = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            one = 2.0 * batch * m.in_features * m.out_features
            flops += 3 * one + (2 * local_steps * one if locoprop else 0.0)
    return flops


def measure(spec: dict) -> dict:
    """Run one configuration (in its own process on the CPU) and return its record."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_autoencoder(spec["model"], "tanh", device=device)
    loss_fn = AutoencoderLoss()
    kwargs = dict(OPTIMIZERS[spec["optimizer"]])
    if spec["local_steps"]:
        kwargs["local_steps"] = spec["local_steps"]
    opt = build_optimizer(spec["optimizer"], model, loss_fn, **kwargs)
    x = torch.rand(spec["batch_size"], 784, device=device)
    closure = lambda: loss_fn(model(x), x)  # noqa: E731
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step(closure)
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            opt.step(closure)
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= spec["warmup"]:
            times.append(elapsed)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:  # ru_maxrss is in KiB on Linux
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    locoprop = spec["optimizer"].startswith("locoprop")
    flops = product_flops(model, spec["batch_size"], spec["local_steps"] or 0, locoprop)
    return {
        "device": spec["device_name"], "model": spec["model"], "optimizer": spec["optimizer"],
        "local_steps": spec["local_steps"], "batch_size": spec["batch_size"],
        "step_ms_median": statistics.median(times), "step_ms_min": min(times), "steps_timed": len(times),
        "peak_mem_mb": peak, "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda"
        else "CPU peak RSS growth of a fresh process during the steps",
        "product_gflop": flops / 1e9, "floor_ms": flops / spec["rate"] * 1e3,
    }


def _worker(spec, queue):
    try:
        queue.put(measure(spec))
    except Exception as exc:  # report, do not hide
        queue.put({"error": f"{type(exc).__name__}: {exc}", **{k: spec[k] for k in ("model", "optimizer",
                                                                                     "batch_size")}})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["standard"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[100, 1000])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    p.add_argument("--local-steps", nargs="+", type=int, default=[1, 5, 10])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None, help="JSON file (default results/perf/DEVICE-DATE.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rate = matmul_rate(device)
    name = device_name(device)
    date = datetime.date.today().isoformat()
    records = []
    ctx = mp.get_context("spawn")
    for model in args.models:
        for batch in args.batch_sizes:
            for opt in args.optimizers:
                for T in (args.local_steps if opt.startswith("locoprop") else [0]):
                    spec = dict(device=args.device, device_name=name, model=model, batch_size=batch, optimizer=opt,
                                local_steps=T, steps=args.steps, warmup=args.warmup, rate=rate,
                                threads=args.threads)
                    if device.type == "cpu":  # a fresh process per configuration, for its peak RSS
                        q = ctx.Queue()
                        proc = ctx.Process(target=_worker, args=(spec, q))
                        proc.start()
                        rec = q.get()
                        proc.join()
                    else:
                        rec = measure(spec)
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
    # ratios to the BackProp + RMSProp step of the same model and batch
    base = {(r["model"], r["batch_size"]): r["step_ms_median"] for r in records if r.get("optimizer") == "rmsprop"}
    for r in records:
        if "error" not in r and (r["model"], r["batch_size"]) in base:
            r["ratio_to_rmsprop"] = r["step_ms_median"] / base[(r["model"], r["batch_size"])]
            r["ratio_to_floor"] = r["step_ms_median"] / r["floor_ms"]
    out = Path(args.out or f"results/perf/{name}-{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python"] + sys.argv), "date": date, "device": name,
            "torch": torch.__version__, "matmul_tflops": rate / 1e12, "threads": args.threads}
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    print(f"\n{name}, fp32 product rate {rate / 1e12:.3f} TFLOP/s; written {out}\n")
    head = f"{'model':9} {'batch':>5} {'optimizer':11} {'T':>2} {'step ms':>9} {'floor ms':>9} {'x floor':>7} " \
           f"{'x rmsprop':>9} {'peak MB':>8}"
    print(head)
    for r in records:
        if "error" in r:
            print(f"{r['model']:9} {r['batch_size']:>5} {r['optimizer']:11} ERROR {r['error']}")
            continue
        print(f"{r['model']:9} {r['batch_size']:>5} {r['optimizer']:11} {r['local_steps']:>2} "
              f"{r['step_ms_median']:9.1f} {r['floor_ms']:9.1f} {r.get('ratio_to_floor', 0):7.2f} "
              f"{r.get('ratio_to_rmsprop', 0):9.2f} {r['peak_mem_mb']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
