"""The host's own work in one call of a captured LocoProp step (``LocoProp.graphed_step``), without the GPU's.

A captured step's call does Python bookkeeping around one ``graph.replay()``: before it, the checks that the
layers are still trainable, the key of what the graph is specific to, the learning-rate table and its copy
to the device; after it (once ``check_finite``'s flag has come back from the GPU), the inner optimizer's step
counters and the groups' ``step``.  On the GPU that time is not hidden: ``benchmarks/step_time.py`` times
each call from an idle stream (CUDA events), so the bookkeeping before the replay adds to the step, and the
flag's read makes the GPU wait for the bookkeeping after it (device session 18: without the check the standard
step was 15% faster).  This script measures that bookkeeping alone, on the CPU: it runs the real
``CapturedStep.__call__`` with the graph replaced by a stand-in whose ``replay()`` does nothing (and the flag
a CPU tensor), so the time per call is exactly the host's.  It needs no GPU and runs against any version of
the library (``PYTHONPATH=<checkout>/src``), so one machine gives the figure before and after a change.

    python benchmarks/host_overhead.py --models standard deep --calls 2000 --out results/host-overhead/NAME.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import locoprop
from locoprop.harness.models import AutoencoderLoss, build_autoencoder
from locoprop.harness.records import processor, write_records
from locoprop.optimizer import CapturedStep


class _NoReplay:
    """Stands in for the captured CUDA graph: the call's host work runs, the GPU's does not."""

    def replay(self) -> None:
        pass


def captured_step_on_the_cpu(opt: locoprop.LocoProp, closure) -> CapturedStep:
    """A :class:`~locoprop.optimizer.CapturedStep` of ``opt`` (on the CPU) past its warm-up and capture, whose
    calls take the replay path: the real ``__call__`` around :class:`_NoReplay`."""
    loss, problems = opt._step_body([closure])  # one eager step body: the inner state and the problems
    solver = opt.fused_solver
    rule = locoprop.fused.update_rule_for(opt.inner)[0]
    table = solver.table_for(opt.param_groups, opt.variant.regularizer, opt._needs_anchor(), rule,
                             fresh=opt.reset_inner_state)
    solver.prepare_capture(table, opt.param_groups, table.dtype, table.device)
    step = CapturedStep.__new__(CapturedStep)  # __init__ refuses a CPU model; the attributes it sets:
    step.optimizer, step.closure, step.warmup, step.calls = opt, closure, 0, 0
    step.other_grads, step.last_mode, step._model_params, step._rule = [], "", None, rule
    step.graph, step.loss, step.problems, step.flag = _NoReplay(), loss.detach(), problems, torch.tensor(True)
    # since session 32: the learning-rate table the graph reads, its own (and no grouped kernels' staging)
    step._static_table, step._grouped_staging, step._staging_finalizer = solver.static_table, None, None
    if hasattr(opt._rollback, "held"):  # since session 30: the copies the graph writes, taken back after a replay
        step._copies = opt._rollback.held()
    graph_key = getattr(step, "_graph_key", None)  # before session 20: the settings and the shared rates
    hyper = step._hyper_key()
    step._key = graph_key(hyper, table) if graph_key else hyper + (solver.shared_rates_of(table),)
    return step


def measure(model_name: str, calls: int, local_steps: int) -> dict:
    torch.manual_seed(0)
    model = build_autoencoder(model_name)
    loss_fn = AutoencoderLoss()
    x = torch.rand(8, 784)
    opt = locoprop.LocoProp(model, variant="locoprop-m", local_steps=local_steps, output_transfer="sigmoid",
                            backend="fused")
    opt.step(lambda: loss_fn(model(x), x))
    step = captured_step_on_the_cpu(opt, lambda: loss_fn(model(x), x))
    times = []
    for _ in range(calls // 10 + 1):
        step()  # warm-up
    for _ in range(calls):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e6)
    if step.last_mode != "replay":
        raise RuntimeError(f"the stand-in step did not take the replay path ({step.last_mode!r})")
    times.sort()
    return dict(model=model_name, layers=len(opt.layers), parameters=sum(len(g["params"]) for g in opt.param_groups),
                local_steps=local_steps, calls=calls, host_us_median=statistics.median(times),
                host_us_p10=times[len(times) // 10], host_us_p90=times[9 * len(times) // 10])


def _commit() -> str:
    """The short commit of the library measured (``unknown`` outside a git checkout)."""
    try:
        src = Path(locoprop.__file__).resolve().parent
        return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def readme(folder: Path) -> str:
    """A README for ``folder`` from its JSON files (each one run of this script), no number typed by hand."""
    lines = ["# Host time of a captured step's call", "",
             "Generated by `benchmarks/host_overhead.py --readme` from the JSON files here. Each file: one run of",
             "the script (the real `CapturedStep.__call__` with a replay that does nothing, on the CPU: the host's",
             "bookkeeping around the replay alone; see the script's docstring). LocoProp-M, T as given, TF-RMSProp.",
             ""]
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        meta = data["meta"]
        lines += [f"## `{path.name}`: {meta['label'] or 'unlabelled'}", "",
                  f"Commit {meta['commit']}, {meta['date']}, {meta['processor']}, torch {meta['torch']}, "
                  f"{meta['threads']} thread(s).", "", "```sh", meta["command"], "```", "",
                  "| model | layers | T | calls | median µs | p10 µs | p90 µs |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['layers']} | {r['local_steps']} | {r['calls']} | {r['host_us_median']:.1f} | "
                  f"{r['host_us_p10']:.1f} | {r['host_us_p90']:.1f} |" for r in data["records"]]
        lines.append("")
    return "\n".join(lines)


def arguments() -> argparse.ArgumentParser:
    """The command line (``benchmarks/device_call.sh``'s command is checked against it by a test)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["standard", "deep"], choices=["standard", "deep", "wide"])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per model (after a tenth as warm-up)")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the bookkeeping is serial)")
    parser.add_argument("--label", default="", help="a name for the code measured (before, after, ...)")
    parser.add_argument("--out", type=Path, help="write the records here as JSON")
    parser.add_argument("--readme", action="store_true", help="then write README.md beside --out from its folder's "
                        "JSON files")
    return parser


def main(argv=None) -> None:
    parser = arguments()
    args = parser.parse_args(argv)
    if args.calls < 10:
        parser.error(f"--calls: expected at least 10, got {args.calls}")
    if args.readme and not args.out:
        parser.error("--readme: needs --out (the README goes beside it)")
    torch.set_num_threads(args.threads)
    records = [measure(m, args.calls, args.local_steps) for m in args.models]
    print(f"{'model':10s} {'layers':>6s} {'median µs':>10s} {'p10':>8s} {'p90':>8s}")
    for r in records:
        print(f"{r['model']:10s} {r['layers']:6d} {r['host_us_median']:10.1f} {r['host_us_p10']:8.1f} "
              f"{r['host_us_p90']:8.1f}")
    if args.out:
        meta = dict(label=args.label, commit=_commit(), date=datetime.date.today().isoformat(),
                    processor=processor(), torch=torch.__version__, threads=args.threads,
                    command=shlex.join(["python", "benchmarks/host_overhead.py",
                                        *(sys.argv[1:] if argv is None else argv)]))
        write_records(args.out, meta, records)
        if args.readme:
            (args.out.parent / "README.md").write_text(readme(args.out.parent))


if __name__ == "__main__":
    main()
