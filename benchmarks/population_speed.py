"""Time a population (``locoprop tune --population K``) against one run at a time.

For each optimizer, precision and population size ``K`` it times the median step of a
:class:`locoprop.harness.population.Population` of ``K`` members of the autoencoder at one batch size
(CUDA events on a GPU, ``time.perf_counter`` on the CPU), beside the step one run takes the way ``locoprop
train`` runs it (LocoProp: :meth:`locoprop.LocoProp.graphed_step` on CUDA, ``step()`` on the CPU;
RMSProp: the harness's eager TF-RMSProp).  ``trial_step_ms`` is the population's step divided by ``K``;
``speedup`` is the single run's step over it: how many times more trials the same device time trains.
``--updates compiled`` also times populations whose updates are compiled (``compile_update``).  Peak
memory: on a GPU ``max_memory_allocated`` during the population's steps; on the CPU, with
``--tensor-memory``, the exact peak of the tensors one step holds (``peak MB`` in the table).
Members have the tuned settings of ``results/tuning-h200-100epoch`` with their learning rates spread
over a factor of 10, as a study's trials would be.

    python benchmarks/population_speed.py --sizes 1 2 4 --steps 5 --out results/population/cpu.json
    python benchmarks/population_speed.py --table results/population/*.json   # Markdown tables
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from locoprop.harness.models import AutoencoderLoss, build_autoencoder, num_parameters
from locoprop.harness.optimizers import build_optimizer
from locoprop.harness.population import Member, Population


def _step_time():
    spec = importlib.util.spec_from_file_location("step_time", Path(__file__).with_name("step_time.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: The tuned settings (results/tuning-h200-100epoch/best-*.yaml), rounded.
SETTINGS = {
    "locoprop-m": dict(lr=8.06e-6, beta1=0.976, beta2=0.931, eps=7.3e-9, activation_lr=500.0),
    "rmsprop": dict(lr=6.33e-4, beta1=0.914, beta2=0.982, eps=1.06e-8),
}


def members(optimizer: str, k: int) -> list[Member]:
    base = SETTINGS[optimizer]
    spread = [10 ** (-0.5 + (j / (k - 1) if k > 1 else 0.5)) for j in range(k)]  # lr x 0.32 .. 3.2
    return [Member(**{**base, "lr": base["lr"] * f}) for f in spread]


def single_step(optimizer: str, model, x, precision: str, local_steps: int):
    """One run's step as ``locoprop train`` takes it."""
    loss_fn = AutoencoderLoss()
    s = SETTINGS[optimizer]
    opt = build_optimizer(optimizer, model, loss_fn, lr=s["lr"], beta1=s["beta1"], beta2=s["beta2"], eps=s["eps"],
                          activation_lr=s.get("activation_lr", 1.0), local_steps=local_steps,
                          **({"precision": precision} if optimizer != "rmsprop" else {}))
    if optimizer != "rmsprop" and x.is_cuda:
        return opt.graphed_step(lambda: loss_fn(model(x), x))
    return lambda: opt.step(lambda: loss_fn(model(x), x))


def _ms(value, unit: str = "") -> str:
    return "" if value is None else f"{value:.2f}{unit}"


def table(path: Path) -> list[str]:
    """A Markdown section of one JSON file of this benchmark: its machine and command, then a row per record."""
    data = json.loads(Path(path).read_text())
    meta = data["meta"]
    lines = [f"## {Path(path).name}", "",
             f"- Device: {meta['device']}; torch {meta['torch']}; date {meta['date']}; threads {meta['threads']}.",
             f"- Command: `{meta['command']}`.", "",
             "| model | batch | optimizer | T | precision | updates | K | population step ms | per trial ms | "
             "one run ms | speedup | peak MB | one run's peak MB |", "|" + " --- |" * 13]
    for r in data["records"]:
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['optimizer']} | | {r['precision']} | {r['updates']} | "
                         f"{r['population']} | {r['error']} | | | | | |")
            continue
        peak = next((f"{r[k]:.0f}" for k in ("peak_mem_mb", "peak_tensor_mb") if r.get(k) is not None), "")
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['optimizer']} | {r['local_steps'] or ''} | "
                     f"{r['precision']} | {r.get('updates', 'eager')} | {r['population']} | "
                     f"{r['step_ms_median']:.2f} | {r['trial_step_ms']:.2f} | "
                     f"{_ms(r['single_step_ms'])} | {_ms(r['speedup'], 'x')} | {peak} | "
                     f"{_ms(r.get('single_peak_tensor_mb'))} |")
    return lines + [""]


def time_population(st, args, device, x, optimizer: str, precision: str, k: int, compiled: bool) -> dict:
    """The median step of a population of ``k`` (its first steps, compilation included, are the warm-up)."""
    model = build_autoencoder(args.model, "tanh", device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    pop = Population(model, optimizer, members(optimizer, k), local_steps=args.local_steps, precision=precision,
                     compile_update=compiled)
    times, _ = st.timed_calls(lambda: pop.step(x, 1.0), device, args.warmup, args.steps)
    step = statistics.median(times)
    rec = {"model": args.model, "parameters": num_parameters(model), "batch_size": args.batch_size,
           "optimizer": optimizer, "local_steps": args.local_steps if optimizer != "rmsprop" else 0,
           "precision": precision, "population": k, "updates": "compiled" if compiled else "eager",
           "step_ms_median": step, "trial_step_ms": step / k}
    if device.type == "cuda":
        rec["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    elif args.tensor_memory:  # exact: the tensors alive during one more step (the profiler's memory timeline)
        rec["peak_tensor_mb"] = st.peak_tensor_bytes(lambda: pop.step(x, 1.0)) / 2 ** 20
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", nargs="+", default=None, metavar="FILE.json",
                    help="print the Markdown tables of these result files instead of timing anything")
    ap.add_argument("--model", default="standard")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--optimizers", nargs="+", default=["locoprop-m", "rmsprop"], choices=sorted(SETTINGS))
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "tf32"],
                    help="LocoProp's local products (RMSProp always fp32)")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 8, 16, 32], help="population sizes K")
    ap.add_argument("--updates", nargs="+", default=["eager"], choices=["eager", "compiled"],
                    help="the population's updates: eager, and/or compiled (Population's compile_update)")
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--tensor-memory", action="store_true",
                    help="on the CPU, also the exact peak of the tensors one population step holds (slow)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON file (default: results/population/DEVICE-DATE.json)")
    args = ap.parse_args(argv)
    if args.table:
        print("\n".join(line for path in args.table for line in table(path)))
        return 0
    st = _step_time()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 784, device=device)
    name = st.device_name(device)
    date = datetime.date.today().isoformat()
    out = Path(args.out or f"results/population/{name.replace(' ', '-')}-{date}.json")
    meta = {"command": "python benchmarks/population_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": name, "date": date, "torch": torch.__version__, "threads": torch.get_num_threads()}
    records = []
    for optimizer in args.optimizers:
        for precision in (["fp32"] if optimizer == "rmsprop" else args.precisions):
            model = build_autoencoder(args.model, "tanh", device=device)
            single_mb = None
            try:
                one_run = single_step(optimizer, model, x, precision, args.local_steps)
                times, _ = st.timed_calls(one_run, device, args.warmup, args.steps)
                single = statistics.median(times)
                if device.type == "cpu" and args.tensor_memory:
                    single_mb = st.peak_tensor_bytes(one_run) / 2 ** 20
            except Exception as exc:  # the populations are still timed, without a speedup
                single = None
                print(f"{optimizer:10s} {precision} one run failed: {type(exc).__name__}: {exc}", flush=True)
            for k in args.sizes:
                for updates in args.updates:
                    try:
                        rec = time_population(st, args, device, x, optimizer, precision, k, updates == "compiled")
                    except Exception as exc:  # out of memory, a compiler missing: record it, time the rest
                        first_line = (str(exc).splitlines() or [""])[0]
                        records.append({"device": name, "model": args.model, "optimizer": optimizer,
                                        "precision": precision, "population": k, "updates": updates,
                                        "error": f"{type(exc).__name__}: {first_line}"})
                        print(f"{optimizer:10s} {precision} {updates:8s} K={k:3d}  {records[-1]['error']}", flush=True)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    else:
                        if single_mb is not None:
                            rec["single_peak_tensor_mb"] = single_mb
                        rec.update({"device": name, "single_step_ms": single,
                                    "speedup": single / rec["trial_step_ms"] if single else None})
                        records.append(rec)
                        print(f"{optimizer:10s} {precision} {updates:8s} K={k:3d}  step {rec['step_ms_median']:9.2f} "
                              f"ms  per trial {rec['trial_step_ms']:8.2f} ms  one run {single or math.nan:8.2f} ms  "
                              f"speedup {rec['speedup'] or math.nan:5.2f}x", flush=True)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
