"""Bytes communicated per step and step time of distributed LocoProp (issue 6), on the CPU with gloo.

For each number of processes (default 1, 2, 4) and each mode (``data``: exact data parallelism, ``layers``:
layer sharding), it starts that many processes on 127.0.0.1 (gloo), trains the paper's standard autoencoder
(784-1000-500-250-30-250-500-1000-784, ``build_autoencoder("standard")``) with LocoProp-M, T local iterations,
on one global batch of the first B MNIST training images (each rank its slice), and records per step:

* the bytes of every collective the distributor calls, counted by :class:`locoprop.distributed.Communicator`
  from the tensors it hands to ``torch.distributed`` (``payload``) and, per rank, the bytes it must receive
  under each collective's bandwidth-optimal algorithm (``recv``: all-reduce ``2(N-1)/N S``, gather ``(N-1) S``
  on the destination, broadcast ``S``); their sum over ranks is the traffic between ranks;
* the step time: the slowest rank's ``opt.step`` wall time (a barrier, not counted, precedes each step); the
  median over the timed steps; and the time spent inside the collective calls.

A one-process run without a distributor (``single``) is the baseline.  Every process uses
``--threads-per-process`` intra-op threads (default 1, so N processes want N cores; on a machine shared with
other jobs, a process with several threads is hurt most by contention); with more processes than cores they
oversubscribe.

It then computes, from the same counting rules and the layer shapes (not measured), the bytes per step for 8
ranks, and a communication-time estimate for 8 GPUs over NVLink and for 8 machines over Ethernet under the
stated bandwidth and latency assumptions.  Everything goes into ``results/distributed/cpu-<date>.json`` with
the command, machine and date; ``--readme`` writes ``results/distributed/README.md`` from that JSON.

    python benchmarks/distributed_comm.py                 # about 5 minutes on 2 cores
    python benchmarks/distributed_comm.py --readme results/distributed/cpu-2026-11-27.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "distributed"

#: Assumptions of the estimate for other machines (stated in the JSON and the README).
ASSUMPTIONS = {
    "nvlink_8gpu": {"bandwidth_GBps_per_direction": 300.0, "latency_us_per_collective": 10.0,
                    "what": "8 GPUs in one machine, NVLink/NVSwitch, ~300 GB/s per direction per GPU (A100-class; "
                            "H100 has ~450)"},
    "ethernet_8_machines": {"bandwidth_GBps_per_direction": 12.5, "latency_us_per_collective": 50.0,
                            "what": "8 machines with one process each, 100 Gb/s Ethernet (12.5 GB/s per direction)"},
}


# -- worker --------------------------------------------------------------------------------------
def worker(args) -> None:
    import torch.distributed as dist

    import locoprop
    from locoprop.distributed import batch_shard
    from locoprop.harness.data import load_dataset
    from locoprop.harness.models import AutoencoderLoss, build_autoencoder

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(args.threads)
    mode = None if args.mode == "single" else args.mode
    if mode is not None:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    data = load_dataset("mnist", limit_train=args.batch, limit_test=1).train
    torch.manual_seed(0)
    model = build_autoencoder("standard")
    loss_fn = AutoencoderLoss()
    opt = locoprop.LocoProp(model, "M", lr=1e-5, activation_lr=10.0, local_steps=args.local_steps,
                            output_transfer="sigmoid", distributed=mode)
    xb = data[batch_shard(torch.arange(args.batch), rank, world)]
    steps = []
    for i in range(args.warmup + args.steps):
        if mode is not None:
            dist.barrier()
            opt.distributor.stats.reset()
        t0 = time.perf_counter()
        loss = float(opt.step(lambda: loss_fn(model(xb), xb)))
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            rec = {"seconds": dt, "loss": loss}
            if mode is not None:
                rec["stats"] = opt.distributor.stats.as_dict()
            steps.append(rec)
    record = {"rank": rank, "threads": torch.get_num_threads(), "rows": int(xb.shape[0]), "steps": steps}
    if mode is not None:
        record["describe"] = opt.distributor.describe()
        every = [None] * world
        dist.all_gather_object(every, record)  # not counted: outside the distributor
        if rank == 0:
            Path(args.worker_out).write_text(json.dumps(every))
        dist.barrier()
        dist.destroy_process_group()
    else:
        Path(args.worker_out).write_text(json.dumps([record]))


# -- launcher ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(mode: str, nprocs: int, args, cores: int) -> dict:
    threads = args.threads_per_process
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode, "--threads", str(threads),
               "--batch", str(args.batch), "--local-steps", str(args.local_steps), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--worker-out", str(out)]
        procs = []
        for r in range(nprocs):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait(timeout=args.timeout) for p in procs]
        if any(codes):
            raise SystemExit(f"{mode} with {nprocs} processes failed: exit codes {codes}")
        ranks = json.loads(out.read_text())
    return summarize(mode, nprocs, threads, ranks)


def summarize(mode: str, nprocs: int, threads: int, ranks: list[dict]) -> dict:
    nsteps = len(ranks[0]["steps"])
    step_max = [max(r["steps"][i]["seconds"] for r in ranks) for i in range(nsteps)]
    rec = {"mode": mode, "processes": nprocs, "threads_per_process": threads,
           "rows_per_rank": [r["rows"] for r in ranks],
           "step_seconds_slowest_rank": step_max, "step_seconds_median": statistics.median(step_max),
           "loss": ranks[0]["steps"][-1]["loss"]}
    if mode != "single":
        last = [r["steps"][-1]["stats"] for r in ranks]  # every step sends the same bytes
        payload = [sum(s["payload_bytes"].values()) for s in last]
        recv = [sum(s["recv_bytes"].values()) for s in last]
        comm_s = [statistics.median(sum(r["steps"][i]["stats"]["seconds"].values()) for i in range(nsteps))
                  for r in ranks]
        rec.update({
            "per_rank_stats_last_step": last,
            "payload_bytes_per_rank": payload, "recv_bytes_per_rank": recv,
            "traffic_bytes_per_step": sum(recv), "max_recv_bytes_per_rank": max(recv),
            "collective_seconds_median_per_rank": comm_s,
            "describe": ranks[0]["describe"],
        })
    return rec


# -- the model (not measured): bytes for any N from the counting rules --------------------------
def layer_shapes() -> list[tuple[int, int]]:
    from locoprop.harness.models import WIDTHS

    dims = [784] + WIDTHS["standard"] + [784]
    return [(dims[i], dims[i + 1]) for i in range(len(dims) - 1)]


def model_bytes(n: int, batch: int, local_steps: int, elem: int = 4) -> dict:
    """Per-rank receive bytes per step by the rules of CommStats, for N ranks (equal shards, LPT assignment)."""
    from locoprop.distributed import assign_layers

    shapes = layer_shapes()
    params = sum(i * o + o for i, o in shapes)
    costs = [2.0 * local_steps * (i + 1) * o for i, o in shapes]
    owner = assign_layers(costs, n)
    rows = -(-batch // n)  # the padded shard
    loss_gather = (n - 1) * 16
    data_recv = local_steps * 2 * (n - 1) / n * params * elem + loss_gather
    layers_recv = []
    for r in range(n):
        mine = [m for m in range(len(shapes)) if owner[m] == r]
        width = sum(shapes[m][0] + shapes[m][1] for m in mine)
        own_params = sum(shapes[m][0] * shapes[m][1] + shapes[m][1] for m in mine)
        gather = (n - 1) * rows * width * elem
        bcast = (params - own_params) * elem
        layers_recv.append(gather + bcast + loss_gather)
    load = [sum(costs[m] for m in range(len(shapes)) if owner[m] == r) for r in range(n)]
    # approximate FLOPs of one step: forward and backward (2 products per layer) + 2 per local iteration
    macs = sum(i * o for i, o in shapes)
    fb_flop, local_flop = 2.0 * batch * macs * 2, 2.0 * batch * macs * 2 * local_steps
    share = max(load) / sum(load)
    return {
        "flop_per_step_single_device": fb_flop + local_flop,
        "gflop_busiest_rank": {"data": (fb_flop + local_flop) / n / 1e9,
                               "layers": (fb_flop / n + share * local_flop) / 1e9},
        "ranks": n, "parameters": params, "data": {"recv_bytes_per_rank": data_recv,
                                                   "traffic_bytes": data_recv * n, "collectives": local_steps + 1},
        "layers": {"recv_bytes_per_rank": layers_recv, "max_recv_bytes_per_rank": max(layers_recv),
                   "traffic_bytes": sum(layers_recv), "collectives": 1 + len(set(owner)) * 2,
                   "assignment": owner,
                   "local_iteration_share_of_busiest_rank": max(load) / sum(load)},
    }


def estimates(batch: int, local_steps: int) -> dict:
    out = {}
    for n in (2, 4, 8):
        m = model_bytes(n, batch, local_steps)
        if n == 8:
            for name, a in ASSUMPTIONS.items():
                bw, lat = a["bandwidth_GBps_per_direction"] * 1e9, a["latency_us_per_collective"] * 1e-6
                comm = {
                    "data": 1e3 * (m["data"]["recv_bytes_per_rank"] / bw + m["data"]["collectives"] * lat),
                    "layers": 1e3 * (m["layers"]["max_recv_bytes_per_rank"] / bw + m["layers"]["collectives"] * lat),
                }
                m[f"comm_ms_{name}"] = comm
                # the sustained compute rate at which the busiest rank's compute takes as long as the communication
                m[f"break_even_tflops_{name}"] = {k: m["gflop_busiest_rank"][k] / comm[k] for k in comm}
                # compute + communication, no overlap: the rate at which both modes take equally long
                g = m["gflop_busiest_rank"]
                m[f"crossover_tflops_{name}"] = (g["layers"] - g["data"]) / (comm["data"] - comm["layers"])
        out[str(n)] = m
    return out


# -- report --------------------------------------------------------------------------------------
def table(result: dict) -> str:
    lines = ["| mode | processes | threads each | step s (median) | bytes per step, all ranks (traffic) "
             "| max received by one rank | payload per rank | s in collectives (rank 0) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["runs"]:
        if r["mode"] == "single":
            lines.append(f"| single (no distributor) | 1 | {r['threads_per_process']} | {r['step_seconds_median']:.3f} "
                         "| - | - | - | - |")
            continue
        lines.append(
            f"| {r['mode']} | {r['processes']} | {r['threads_per_process']} | {r['step_seconds_median']:.3f} | "
            f"{r['traffic_bytes_per_step'] / 1e6:.2f} MB | {r['max_recv_bytes_per_rank'] / 1e6:.2f} MB | "
            f"{max(r['payload_bytes_per_rank']) / 1e6:.2f} MB | {r['collective_seconds_median_per_rank'][0]:.3f} |")
    return "\n".join(lines)


def _rate(x: float) -> str:
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def readme(result: dict, json_name: str) -> str:
    est = result["estimates"]
    e8 = est["8"]
    runs = {(r["mode"], r["processes"]): r for r in result["runs"]}
    ratio = {n: runs[("data", n)]["traffic_bytes_per_step"] / runs[("layers", n)]["traffic_bytes_per_step"]
             for n in result["settings"]["processes"] if n > 1 and ("data", n) in runs and ("layers", n) in runs}
    s = result["settings"]
    lines = [
        "# Distributed LocoProp: bytes per step and step time (CPU, gloo)", "",
        f"Generated by `benchmarks/distributed_comm.py --readme` from [`{json_name}`]({json_name}); every number "
        "below is read from that file.", "",
        "Made by:", "", "```sh", result["command"], "```", "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['platform']}; "
        f"torch {result['machine']['torch']}; date {result['date']}.", "",
        f"Setting: the standard autoencoder ({result['parameters']:,} parameters), LocoProp-M, T = "
        f"{s['local_steps']} local iterations, one global batch of {s['batch']} MNIST images split over the "
        f"processes; {s['steps']} timed steps after {s['warmup']} warm-up step(s).", "",
        table(result), "",
        "- *traffic*: the bytes every rank must receive, summed over ranks, under each collective's "
        "bandwidth-optimal algorithm (all-reduce 2(N-1)/N·S per rank, gather (N-1)·S on the destination, "
        "broadcast S per receiver), from the tensors the distributor hands to `torch.distributed`. *payload*: "
        "the bytes of those tensors on one rank (for an all-reduce: its whole gradient buffer, every local "
        "iteration).",
        "- *step s*: the slowest rank's `opt.step` wall time, median over the timed steps.", "",
    ]
    if ratio:
        lines += ["Layer sharding moves " + ", ".join(f"{ratio[n]:.1f}x fewer bytes than exact data parallelism with "
                                                     f"{n} processes" for n in sorted(ratio))
                  + f" (T = {s['local_steps']}).",
                  ""]
    check = [f"{n} processes: data {runs[('data', n)]['max_recv_bytes_per_rank'] / 1e6:.2f} MB measured vs "
             f"{est[str(n)]['data']['recv_bytes_per_rank'] / 1e6:.2f} MB counted from the shapes, layers "
             f"{runs[('layers', n)]['max_recv_bytes_per_rank'] / 1e6:.2f} MB vs "
             f"{est[str(n)]['layers']['max_recv_bytes_per_rank'] / 1e6:.2f} MB"
             for n in (2, 4) if ("data", n) in runs and ("layers", n) in runs and str(n) in est]
    if check:
        lines += ["Largest number of bytes one rank receives per step, measured against the shape-based count "
                  "used for the estimates below: " + "; ".join(check) + ".", ""]
    lines += [
        "## Caveats of this measurement", "",
        f"- The machine has {result['machine']['cores']} cores and was shared with other jobs (load average "
        f"{result['machine']['load_average_at_start'][0]:.1f} at the start, "
        f"{result['machine']['load_average_at_end'][0]:.1f} at the end), so every step time is inflated and "
        f"noisy. Each process used {s['threads_per_process']} thread(s); with 4 processes on "
        f"{result['machine']['cores']} cores they oversubscribe the cores 2:1 (more with the other jobs), so the "
        "4-process step times measure contention, not scaling. All ranks run on one machine and talk over "
        "loopback TCP, where moving bytes is memory copying; the step times say little about GPUs or networks.",
        "- The byte counts do not depend on the machine: they follow from the layer shapes, the batch and T.", "",
        "## What it predicts for 8 GPUs and for several machines", "",
        "Computed by the same script from the same counting rules and the layer shapes (not measured), with the "
        "largest-processing-time layer assignment; per rank and per step:", "",
        "| ranks | data: received per rank | layers: max received by one rank "
        "| layers: busiest rank's share of the local iterations |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for n in ("2", "4", "8"):
        m = est[n]
        lines.append(f"| {n} | {m['data']['recv_bytes_per_rank'] / 1e6:.1f} MB | "
                     f"{m['layers']['max_recv_bytes_per_rank'] / 1e6:.1f} MB | "
                     f"{100 * m['layers']['local_iteration_share_of_busiest_rank']:.0f}% |")
    g = e8["gflop_busiest_rank"]
    lines += ["", f"With 8 ranks the busiest rank computes about {g['data']:.1f} GFLOP per step in the data-parallel "
              f"mode and {g['layers']:.1f} GFLOP in the layer-sharded mode (forward and backward on its shard, plus "
              "its layers' local iterations; 2 products per layer for the pass and 2 per local iteration). "
              "Communication per step, and the sustained compute rate at which that compute takes as long as the "
              "communication (above it, communication dominates):", ""]
    for name, a in result["assumptions"].items():
        c, be = e8[f"comm_ms_{name}"], e8[f"break_even_tflops_{name}"]
        lines.append(f"- {a['what']}; {a['latency_us_per_collective']:g} µs per collective: about "
                     f"**{c['data']:.2f} ms** (data; break-even at {_rate(be['data'])} TFLOP/s) vs "
                     f"**{c['layers']:.2f} ms** (layers; break-even at {_rate(be['layers'])} TFLOP/s).")
    share = {n: est[n]["layers"]["local_iteration_share_of_busiest_rank"] for n in ("2", "4", "8")}
    eth = e8["break_even_tflops_ethernet_8_machines"]
    x_eth, x_nvl = e8["crossover_tflops_ethernet_8_machines"], e8["crossover_tflops_nvlink_8gpu"]
    lines += [
        "",
        "Reading (an estimate from byte counts and stated bandwidths, not a GPU measurement): exact data "
        "parallelism sends T all-reduces of all parameters per step, so its bytes grow with T; layer sharding "
        "sends the layers' rows once and the weights once, independent of T. But layer sharding balances its "
        "work only across whole layers: for this model the rank with the largest layer keeps "
        f"{100 * share['4']:.0f}% of the local iterations from 4 ranks on ({100 * share['8']:.0f}% at 8), so its "
        f"busiest rank computes {g['layers'] / g['data']:.1f}x what a data-parallel rank does. Counting step time "
        "as compute plus communication (no overlap), the two modes take equally long when the GPUs sustain "
        f"{_rate(x_eth)} TFLOP/s on these products for 8 machines over Ethernet, and {_rate(x_nvl)} TFLOP/s for 8 GPUs "
        "over NVLink; above that rate layer sharding is faster, below it data parallelism. Between machines, "
        "where GPUs run far above that crossover, layer sharding is the mode to use (the data-parallel "
        f"communication alone equals computing at {_rate(eth['data'])} TFLOP/s). Inside one NVLink machine the "
        "crossover is a GPU-class rate, so which mode wins for this small model depends on the GPU and should be "
        "measured there; for models whose layers are of similar size "
        "the balance moves toward layer sharding. Neither a hierarchical split "
        "(data parallel inside a machine, layers across machines) nor splitting one layer over several ranks is "
        "implemented.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--modes", nargs="+", default=["data", "layers"], choices=["data", "layers"])
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads-per-process", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--readme", type=Path, default=None, help="write README.md next to this JSON and stop")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.readme is not None:
        result = json.loads(args.readme.read_text())
        target = args.readme.with_name("README.md")
        target.write_text(readme(result, args.readme.name))
        print(f"wrote {target}")
        return 0
    if any(n < 1 for n in args.procs):
        raise SystemExit("--procs: expected numbers of processes >= 1")
    cores = os.cpu_count() or 1
    load_at_start = os.getloadavg()
    command = "python benchmarks/distributed_comm.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    runs = [run_config("single", 1, args, cores)]
    print(f"single: {runs[-1]['step_seconds_median']:.3f} s per step", flush=True)
    for n in args.procs:
        for mode in args.modes:
            runs.append(run_config(mode, n, args, cores))
            r = runs[-1]
            print(f"{mode} x{n}: {r['step_seconds_median']:.3f} s per step, {r['traffic_bytes_per_step'] / 1e6:.2f} MB "
                  "traffic per step", flush=True)
    from locoprop.harness.reproduce import cpu_model

    cpu = cpu_model()
    date = datetime.date.today().isoformat()
    from locoprop.harness.models import build_autoencoder, num_parameters

    result = {
        "command": command.strip(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "cores": cores, "platform": platform.platform(), "host": platform.node(),
                    "torch": torch.__version__, "backend": "gloo", "python": platform.python_version(),
                    "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "settings": {"model": "standard", "variant": "LocoProp-M", "batch": args.batch, "local_steps": args.local_steps,
                     "steps": args.steps, "warmup": args.warmup, "processes": args.procs, "modes": args.modes,
                     "threads_per_process": args.threads_per_process, "dtype": "float32"},
        "parameters": num_parameters(build_autoencoder("standard")),
        "runs": runs, "assumptions": ASSUMPTIONS, "estimates": estimates(args.batch, args.local_steps),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-{date}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
