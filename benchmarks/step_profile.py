"""Where a step's time goes: its kernels (on a GPU) or operations (on the CPU), by kind, from the PyTorch profiler.

``benchmarks/step_time.py`` says how long a step takes; this says of what.  For each mode (the modes of
``step_time.py``: ``graphed``, ``graphed-iter``, ``graphed-compiled``, ``eager``, ...) it builds the step as
``step_time.py`` does, warms it up, and profiles ``--steps`` calls.  On a GPU it sums the device time of
the kernels (kernels inside a replayed CUDA graph included) by kind: matrix products (cuBLAS / CUTLASS
GEMM and GEMV kernels), multi-tensor (``foreach``) kernels, reductions, and other elementwise kernels, with
their counts per step, beside the step's wall time from CUDA events.  Kernel time summed over several
streams can exceed the wall time (the kernels overlapped); wall time above it is the GPU idle between
kernels.  The timeline says the same from the kernels' intervals: per step, the time from the first
kernel's start to the last one's end, the part in which some kernel ran on any stream (busy), the rest
(idle: the GPU waited for the host or for a dependency), and the time with 1, 2, ... kernels running at
once (how far the layer streams overlap).  If the profiler sees no kernels inside replayed graphs on some
setup, the ``fused-nograph`` and ``fused-iter-nograph`` modes launch the same solve eagerly.  On the CPU
the same table counts the ATen operations and their own CPU time (a check of the script; on 2 cores the
products dominate).

    python benchmarks/step_profile.py --model standard --modes eager graph graphed graphed-iter --out profile.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from locoprop.harness.models import AutoencoderLoss, build_autoencoder
from locoprop.harness.records import processor
from locoprop.precision import set_cuda_matmul_tf32


def _step_time_module():
    spec = importlib.util.spec_from_file_location("step_time", Path(__file__).with_name("step_time.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: Top-level ATen operations on the CPU that are matrix products: ``a @ b`` is counted as ``aten::matmul`` and an
#: ``nn.Linear`` call as ``aten::linear`` (their ``aten::mm`` / ``aten::addmm`` inside are not counted again).
CPU_PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
                "aten::matmul", "aten::linear", "aten::_int_mm"}


def kind_of(name: str) -> str:
    """The kind of a kernel (or ATen operation) by its name."""
    low = name.lower()
    if name in CPU_PRODUCTS or any(k in low for k in ("gemm", "gemv", "cutlass", "xmma")):
        return "product"
    if "foreach" in low or "multi_tensor" in low:
        return "multi-tensor"
    if any(k in low for k in ("reduce", "triton_red", "triton_per", "aten::sum", "norm")):
        return "reduction"
    return "elementwise"


#: ATen operations that launch no kernel (views, metadata, allocation), left out of the CPU count.
NO_KERNEL = {"aten::select", "aten::numpy_T", "aten::t", "aten::transpose", "aten::permute", "aten::view",
             "aten::reshape", "aten::detach", "aten::alias", "aten::expand", "aten::as_strided", "aten::slice",
             "aten::unsqueeze", "aten::squeeze", "aten::lift_fresh", "aten::empty", "aten::empty_like",
             "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::flatten", "aten::unbind",
             "aten::split", "aten::chunk", "aten::contiguous", "aten::stack", "aten::item", "aten::_local_scalar_dense"}


def counted_events(events, cuda: bool):
    """The events a profile counts: each kernel (GPU) or each top-level ATen operation that computes (CPU)."""
    for e in events:
        if cuda:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                yield e
        elif (e.name.startswith("aten::") and e.name not in NO_KERNEL
              and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))):
            yield e


def timed_events(events, cuda: bool):
    """``(name, microseconds)`` of each of :func:`counted_events`."""
    for e in counted_events(events, cuda):
        yield e.name, e.time_range.elapsed_us()


def timed_intervals(events, cuda: bool) -> list[tuple[float, float]]:
    """``(start, end)`` in microseconds of each of :func:`counted_events`."""
    return [(e.time_range.start, e.time_range.end) for e in counted_events(events, cuda)]


def concurrency(intervals: list[tuple[float, float]]) -> dict:
    """How the kernels' intervals cover the time from the first start to the last end: ``span`` (that time),
    ``busy`` (some kernel running, on any stream), ``idle`` (none: the GPU waits for the host, or for a
    dependency's latency) and ``by_running`` (time with exactly n kernels running, n >= 1), in the intervals'
    unit.  Where the kernels' summed time exceeds ``busy``, streams overlapped them."""
    if not intervals:
        return {"span": 0.0, "busy": 0.0, "idle": 0.0, "by_running": {}}
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    running, last, by_running = 0, edges[0][0], {}
    for t, change in edges:  # ends before starts at the same instant: touching kernels do not overlap
        if running > 0 and t > last:
            by_running[running] = by_running.get(running, 0.0) + (t - last)
        running += change
        last = t
    span = max(b for _, b in intervals) - min(a for a, _ in intervals)
    busy = sum(by_running.values())
    return {"span": span, "busy": busy, "idle": span - busy, "by_running": dict(sorted(by_running.items()))}


def profile_mode(step_time, model_name: str, optimizer: str, mode: str, precision: str, batch: int,
                 local_steps: int, warmup: int, steps: int, device: torch.device) -> dict:
    """One mode's profile: wall time per step and, per kind, the count and time of kernels per step."""
    torch.manual_seed(0)
    model = build_autoencoder(model_name, "tanh", device=device)
    loss_fn = AutoencoderLoss()
    x = torch.rand(batch, 784, device=device)
    step = step_time.build_step({"optimizer": optimizer, "mode": mode, "local_steps": local_steps,
                                 "precision": precision}, model, loss_fn, x)
    walls, _ = step_time.timed_calls(step, device, warmup, steps)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    kinds: dict = {}
    for name, us in timed_events(events, cuda):
        k = kinds.setdefault(kind_of(name), {"count_per_step": 0.0, "ms_per_step": 0.0})
        k["count_per_step"] += 1 / steps
        k["ms_per_step"] += us / 1e3 / steps
    top = []
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:  # the profiler's own table, for reading (its column names vary between torch versions)
            top = prof.key_averages().table(sort_by=key, row_limit=30).splitlines()
            break
        except Exception:  # noqa: BLE001 - the next name
            continue
    return {"model": model_name, "optimizer": optimizer, "mode": mode, "precision": precision, "batch_size": batch,
            "local_steps": local_steps if optimizer.startswith("locoprop") else 0,
            "wall_ms_median": statistics.median(walls), "kinds": kinds,
            "counted_ms_per_step": sum(k["ms_per_step"] for k in kinds.values()),
            "count_per_step": sum(k["count_per_step"] for k in kinds.values()),
            "timeline_ms_per_step": _per_step_ms(concurrency(timed_intervals(events, cuda)), steps),
            "profiler_table": top}


def _per_step_ms(cover: dict, steps: int) -> dict:
    """:func:`concurrency`'s microseconds over ``steps`` steps as milliseconds per step."""
    return {"span": cover["span"] / 1e3 / steps, "busy": cover["busy"] / 1e3 / steps,
            "idle": cover["idle"] / 1e3 / steps,
            "by_running": {str(n): v / 1e3 / steps for n, v in cover["by_running"].items()}}


def arguments() -> argparse.ArgumentParser:
    """The command line (``benchmarks/device_call.sh``'s command is checked against it by a test)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="standard")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=["graphed", "graphed-iter"],
                   help="LocoProp-M modes of step_time.py; 'eager', 'graph' and 'compiled' time BackProp + RMSProp")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    return p


def main(argv=None) -> int:
    args = arguments().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":  # a TF32 step with TF32 allowed in all of it, as step_time.py's TF32 rows
        set_cuda_matmul_tf32(args.precision == "tf32")
    step_time = _step_time_module()
    records = []
    for mode in args.modes:
        optimizer = "rmsprop" if mode in ("eager", "graph", "compiled") else "locoprop-m"
        rec = profile_mode(step_time, args.model, optimizer, mode, args.precision, args.batch_size,
                           args.local_steps, args.warmup, args.steps, device)
        records.append(rec)
        kinds = ", ".join(f"{k} {v['count_per_step']:.0f} x / {v['ms_per_step']:.2f} ms"
                          for k, v in sorted(rec["kinds"].items()))
        line = rec["timeline_ms_per_step"]
        print(f"{mode:24} wall {rec['wall_ms_median']:8.2f} ms; counted {rec['counted_ms_per_step']:8.2f} ms in "
              f"{rec['count_per_step']:.0f} per step ({kinds}); timeline {line['span']:.2f} ms a step, busy "
              f"{line['busy']:.2f}, idle {line['idle']:.2f}", flush=True)
    if args.out:
        meta = {"command": " ".join(["python"] + sys.argv), "date": datetime.date.today().isoformat(),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "processor": processor(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
