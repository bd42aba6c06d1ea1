"""Step times of two or more LocoProp modes measured in one process, one step of each in turn.

``benchmarks/step_time.py`` runs each configuration in a process of its own, one after another, so on a shared
machine two configurations' times differ by the machine's drift between them (about 10% on this project's
2-core CPUs).  A change that should leave the step's time alone is better timed here: every mode is built on
its own copy of the model, warmed up, then timed one step each in turn for ``--rounds`` rounds, so drift falls
on all of them alike.  Modes and flags are ``step_time.py``'s (``fused``, ``reference``, ``-afterbackward``,
``-nocheck``, ...), each LocoProp-M's in FP32 unless it says ``[OPTIMIZER/]MODE[@PRECISION]``: ``fused@bf16``
(bf16 local products), ``rmsprop/eager`` (BackProp + TF-RMSProp, the issue's yardstick).  Writes the medians,
each mode's ratio to the first mode, and the command, machine and date.

    python benchmarks/interleaved_time.py --models standard deep --batch-sizes 100 1000 \\
        --modes reference reference-afterbackward fused fused-afterbackward --rounds 10 \\
        --out results/interleaved-time/X.json
    python benchmarks/interleaved_time.py --modes rmsprop/eager fused fused@bf16 --rounds 10 \\
        --out results/interleaved-time/Y.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from locoprop.fused import PRECISIONS


def _step_time_module():
    spec = importlib.util.spec_from_file_location("step_time", Path(__file__).with_name("step_time.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_mode(step_time, spec: str, local_steps: int) -> dict:
    """``[OPTIMIZER/]MODE[@PRECISION]`` as ``step_time.build_step``'s settings (LocoProp-M and FP32 where not
    said; no local steps for BackProp); a ``ValueError`` naming ``--modes`` for an unknown optimizer or
    precision."""
    optimizer, _, rest = spec.rpartition("/")
    mode, _, precision = rest.partition("@")
    optimizer, precision = optimizer or "locoprop-m", precision or "fp32"
    if optimizer not in step_time.OPTIMIZERS:
        raise ValueError(f"--modes {spec!r}: the optimizer must be one of {sorted(step_time.OPTIMIZERS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"--modes {spec!r}: the precision must be one of {list(PRECISIONS)}")
    return {"optimizer": optimizer, "mode": mode, "precision": precision,
            "local_steps": local_steps if optimizer.startswith("locoprop") else 0}


def interleaved(step_time, model_name: str, batch: int, modes: list[str], local_steps: int, rounds: int,
                warmup: int) -> list[dict]:
    """One record per mode: the median and minimum of its ``rounds`` steps, timed in turn with the others."""
    from locoprop.harness.models import AutoencoderLoss, build_autoencoder

    torch.manual_seed(0)
    x = torch.rand(batch, 784)
    steps, specs = {}, {mode: parse_mode(step_time, mode, local_steps) for mode in modes}
    for mode in modes:
        torch.manual_seed(0)
        model = build_autoencoder(model_name, "tanh")
        steps[mode] = step_time.build_step(specs[mode], model, AutoencoderLoss(), x)
        for _ in range(warmup):
            steps[mode]()
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, step in steps.items():
            start = time.perf_counter()
            step()
            times[mode].append(1000 * (time.perf_counter() - start))
    first = statistics.median(times[modes[0]])
    return [{"model": model_name, "batch_size": batch, "optimizer": specs[mode]["optimizer"],
             "local_steps": specs[mode]["local_steps"], "mode": mode, "precision": specs[mode]["precision"],
             "step_ms_median": statistics.median(t), "step_ms_min": min(t), "steps_timed": rounds,
             "ratio_to_first_mode": statistics.median(t) / first} for mode, t in times.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["standard"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1000])
    parser.add_argument("--modes", nargs="+", required=True,
                        help="step_time.py's modes, as [OPTIMIZER/]MODE[@PRECISION] (LocoProp-M, FP32 where not "
                             "said); ratios are to the first")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10, help="timed steps of each mode, one of each in turn")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds: at least 1; --warmup: at least 0")
    torch.set_num_threads(args.threads)
    step_time = _step_time_module()
    for mode in args.modes:
        try:
            parse_mode(step_time, mode, args.local_steps)
        except ValueError as exc:
            parser.error(str(exc))
    records = []
    for model_name in args.models:
        for batch in args.batch_sizes:
            for r in interleaved(step_time, model_name, batch, args.modes, args.local_steps, args.rounds,
                                 args.warmup):
                records.append(r)
                print(f"{r['model']:9s} {r['batch_size']:5d} {r['mode']:28s} {r['step_ms_median']:9.1f} ms "
                      f"(min {r['step_ms_min']:.1f}) x{r['ratio_to_first_mode']:.3f}", flush=True)
    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else
                                                                                 sys.argv[1:])]),
            "date": datetime.date.today().isoformat(), "device": f"cpu-{platform.machine()}-{args.threads}threads",
            "processor": step_time.processor(),
            "torch": torch.__version__, "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
