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

``--baseline REV`` times a change of the library itself: every LocoProp mode is then also built from the library
of the git revision ``REV`` (its ``src/locoprop`` without the harness, imported under another name; the
harness, models and BackProp baselines stay this checkout's) and timed in turn with this checkout's, in the
same process, so that two versions of a step are compared on the same machine state (between processes
this project's shared 2-core machines drift by 10% and more).  A mode that runs threads of its own slows the
other modes of its process (session 26: an unthreaded bf16 step took 485 ms alone and 622 ms beside a step
whose layers ran in a thread pool, ``results/interleaved-time/``): time such a mode in processes of its own.

    python benchmarks/interleaved_time.py --modes rmsprop/eager fused fused@bf16 --baseline 44bb52f \\
        --rounds 20 --out results/interleaved-time/Z.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import io
import json
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
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


def library_of(revision: str, into: Path):
    """The package ``locoprop`` of git revision ``revision`` of this repository, without its harness, imported as
    ``locoprop_<commit>`` from a copy under ``into``; and the full commit.  Raises ``ValueError`` naming
    ``--baseline`` where git cannot read it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=root, check=True,
                                capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", "archive", commit, "src/locoprop"], cwd=root, check=True,
                                 capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ValueError(f"--baseline {revision!r}: git cannot read src/locoprop of it in {root} ({exc})") from exc
    name = f"locoprop_{commit[:12]}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = [m for m in tar.getmembers() if not m.name.startswith("src/locoprop/harness")
                   and m.name != "src/locoprop/__main__.py"]
        for m in members:
            m.name = m.name.replace("src/locoprop", name, 1)
        tar.extractall(into, members=members, filter="data")
    sys.path.insert(0, str(into))
    try:
        return importlib.import_module(name), commit
    finally:
        sys.path.remove(str(into))


@contextlib.contextmanager
def built_with(library):
    """The harness's optimizers built from ``library`` (a version of the package ``locoprop``) inside."""
    from locoprop.harness import optimizers

    current = optimizers.locoprop
    optimizers.locoprop = library
    try:
        yield
    finally:
        optimizers.locoprop = current


def interleaved(step_time, model_name: str, batch: int, modes: list[str], local_steps: int, rounds: int,
                warmup: int, baseline: tuple | None = None) -> list[dict]:
    """One record per mode: the median and minimum of its ``rounds`` steps, timed in turn with the others;
    with ``baseline = (library, commit)`` a second record for each LocoProp mode, built from that library."""
    import locoprop
    from locoprop.harness.models import AutoencoderLoss, build_autoencoder

    torch.manual_seed(0)
    x = torch.rand(batch, 784)
    specs = {mode: parse_mode(step_time, mode, local_steps) for mode in modes}
    runs = [(mode, "working tree", locoprop) for mode in modes]
    if baseline is not None:
        runs += [(mode, baseline[1], baseline[0]) for mode in modes if specs[mode]["optimizer"].startswith("locoprop")]
    steps = {}
    for mode, library, package in runs:
        torch.manual_seed(0)
        model = build_autoencoder(model_name, "tanh")
        with built_with(package):
            steps[mode, library] = step_time.build_step(specs[mode], model, AutoencoderLoss(), x)
        for _ in range(warmup):
            steps[mode, library]()
    times: dict[tuple, list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(1000 * (time.perf_counter() - start))
    first = statistics.median(times[modes[0], "working tree"])
    return [{"model": model_name, "batch_size": batch, "optimizer": specs[mode]["optimizer"],
             "local_steps": specs[mode]["local_steps"], "mode": mode, "precision": specs[mode]["precision"],
             "library": library, "step_ms_median": statistics.median(t), "step_ms_min": min(t),
             "steps_timed": rounds, "ratio_to_first_mode": statistics.median(t) / first}
            for (mode, library), t in times.items()]


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
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="a git revision: each LocoProp mode also built from its library and timed in turn")
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
    records, baseline = [], None
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline is not None:
            try:
                baseline = library_of(args.baseline, Path(tmp))
            except ValueError as exc:
                parser.error(str(exc))
        for model_name in args.models:
            for batch in args.batch_sizes:
                for r in interleaved(step_time, model_name, batch, args.modes, args.local_steps, args.rounds,
                                     args.warmup, baseline):
                    records.append(r)
                    print(f"{r['model']:9s} {r['batch_size']:5d} {r['mode']:28s} {r['library'][:12]:12s} "
                          f"{r['step_ms_median']:9.1f} ms (min {r['step_ms_min']:.1f}) x{r['ratio_to_first_mode']:.3f}",
                          flush=True)
    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else
                                                                                 sys.argv[1:])]),
            "date": datetime.date.today().isoformat(), "device": f"cpu-{platform.machine()}-{args.threads}threads",
            "processor": step_time.processor(), "commit": _working_tree_commit(),
            "baseline_commit": None if baseline is None else baseline[1],
            "torch": torch.__version__, "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(f"written {args.out}")
    return 0


def _working_tree_commit() -> str | None:
    """This checkout's commit, with ``+changes`` where its ``src/`` differs from it (``None`` without git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, check=True,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty else "")


if __name__ == "__main__":
    raise SystemExit(main())
