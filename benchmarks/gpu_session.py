"""One prepared GPU session for issues 4 and 5, sized to fit a 15-minute device lease.

Run from the repository root on a machine with a CUDA GPU (the package importable, e.g.
``PYTHONPATH=src``; MNIST in ``--data-dir``)::

    python benchmarks/gpu_session.py --out $OUT --data-dir .carrydata/mnist --budget-s 500

Each part has its own time limit and the script goes on when a part fails, so a short lease still
brings back what finished.  In order:

1. ``tests/cuda`` and ``tests/test_fused.py`` (the fast solver against the reference loop on CUDA);
2. ``benchmarks/step_time.py`` (step times, peak memory and FLOP floors; stops starting new
   configurations at its deadline), then, with ``--profile-s``, ``benchmarks/step_profile.py`` (the
   kernels of a step by kind: where its time goes), then, with ``--population-s``,
   ``benchmarks/population_speed.py`` (a population of K trials against one run at a time);
3. with ``--tune OPTIMIZER[:TRIALS[:EPOCHS[:WORKERS]]] ...``: Optuna studies on the GPU (WORKERS
   ``locoprop tune`` processes per study, every study side by side, each in its own SQLite file, the
   first trial being the best settings found so far; ``--tune-population K``: each worker trains K
   trials at a time as one population), stopped at ``--tune-s``; their best settings
   then come first for the runs of part 4 (``tuning.tar.gz`` holds the database, reports and logs);
   ``--with-tune RUN ...`` starts those runs of part 4 beside the studies, with the settings found before
   them, and lets them go on through part 4 (so their wall-clock times are contended: use them for loss
   against epochs only);
4. 100-epoch MNIST runs of Figs. 3(a), 3(b) and 4 (standard), with the tuned settings of the first of
   ``--settings-dirs`` that has some for the run (``locoprop reproduce``'s rules), plus LocoProp-M with
   TF32 and bf16 local products.  The ``--alone`` runs (default RMSProp and LocoProp-M) go first, one at a
   time on the GPU, so that their wall-clock times are uncontended (time to RMSProp's final loss); the rest
   then run at once and are stopped at the session's deadline (their folders resume with
   ``locoprop train --resume``).

Everything lands in ``--out`` (``session.log``, ``tests.txt``, ``perf.json``, ``perf.txt``, ``profile.json``,
``population.json``, ``tuning.tar.gz``, ``runs.tar.gz``, ``env.txt``); a device call returns at most eight
files, so one call should not ask for all of them (the population benchmark and the studies, say, belong in
different calls).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("fig4-standard", "fig3a", "fig3b")
ALONE = ("rmsprop", "locoprop-m")  # uncontended, first


def _log(fh, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    fh.write(line + "\n")
    fh.flush()


def _run(cmd: list[str], timeout: float, out_file: Path, log, env: dict | None = None, note: str = "") -> int | str:
    _log(log, f"$ {' '.join(cmd)}  ({note}limit {timeout:.0f} s)")
    t0 = time.time()
    with out_file.open("a") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=max(timeout, 1), cwd=ROOT,
                                env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    _log(log, f"  -> {rc} after {time.time() - t0:.0f} s")
    return rc


def without_checkpoints(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """``tarfile`` filter leaving out checkpoints, finished (``checkpoint.pt``) or cut off mid-write by a time
    limit (``checkpoint.pt.XXXX.tmp``): they do not fit what a device call returns, and stay out of git anyway."""
    name = Path(info.name).name
    return None if ".pt" in name or name.endswith(".tmp") else info


def training_runs(data_dir: str, epochs: int | None, limit_train: int | None, device: str = "cuda",
                  settings_dirs=("results/tuning",), configs=()) -> dict[str, dict]:
    """``name -> settings`` of every run of the figures, tuned where ``settings_dirs`` have settings (the first
    folder with a matching ``best-OPTIMIZER.yaml`` wins), and of each ``NAME=FILE`` of ``configs`` (a settings
    YAML as ``locoprop train --config`` reads it); LocoProp's FP32 runs come with ``NAME-tf32`` and
    ``NAME-bf16``, the same settings with reduced-precision local products."""
    import yaml

    sys.path.insert(0, str(ROOT / "src"))
    from locoprop.harness.cli import load_yaml
    from locoprop.harness.reproduce import figure_runs, load_figure, rescheduled
    from locoprop.harness.train import TrainConfig

    overrides = {"device": device, "data_dir": data_dir}
    if epochs:
        overrides["epochs"] = epochs
    if limit_train:
        overrides["limit_train"] = limit_train
        overrides["limit_test"] = limit_train
    runs: dict[str, dict] = {}
    origins: dict[str, str] = {}
    for fig in FIGURES:
        for name, cfg, origin in figure_runs(load_figure(fig), overrides, [ROOT / d for d in settings_dirs],
                                             log=print):
            settings = asdict(cfg)
            if name in runs and runs[name] != settings:
                name = f"{fig}-{name}"
            runs[name] = settings
            origins[name] = origin
    for prec in ("tf32", "bf16"):
        runs[f"locoprop-m-{prec}"] = dict(runs["locoprop-m"], precision=prec)
        origins[f"locoprop-m-{prec}"] = origins["locoprop-m"]
    for spec in configs:
        name, _, path = spec.partition("=")
        path, _, sets = path.partition(":")
        if not name or not path:
            raise ValueError(f"--configs: expected NAME=FILE or NAME=FILE:KEY=VALUE,..., got {spec!r}")
        values = load_yaml(ROOT / path)
        values = values.get("settings", values)
        for pair in filter(None, sets.split(",")):  # the file's settings with some changed (T = 5, say)
            key, eq, value = pair.partition("=")
            if not eq or key not in TrainConfig.__dataclass_fields__:
                raise ValueError(f"--configs {spec!r}: expected KEY=VALUE with KEY a setting of locoprop train, "
                                 f"got {pair!r}")
            values[key] = yaml.safe_load(value)
        if epochs:  # the figures' rule: the warm-up keeps its share, the schedule its untrained tail
            values = rescheduled(values, epochs)
        cfg = TrainConfig.from_dict({**values, **overrides})
        cfg.validate()
        runs[name], origins[name] = asdict(cfg), path
        if cfg.optimizer.startswith("locoprop") and cfg.precision == "fp32":
            for prec in ("tf32", "bf16"):  # reduced-precision local products (issue 5: within 0.5% of FP32)
                runs[f"{name}-{prec}"], origins[f"{name}-{prec}"] = dict(runs[name], precision=prec), path
    for name in runs:
        runs[name]["_origin"] = origins[name]
    return runs


def run_limits(specs: list[str]) -> dict[str, float]:
    """``RUN=SECONDS`` pairs of ``--alone-limits`` as ``{run: seconds}``; a malformed pair is an error naming
    the option and the pair."""
    limits = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = float("nan")
        if not name or not seconds > 0:
            raise ValueError(f"--alone-limits: expected RUN=SECONDS with SECONDS > 0, got {spec!r}")
        limits[name] = seconds
    return limits


def enqueued_settings(opt: str, settings_dirs) -> str | None:
    """``KEY=VALUE,...`` of the searched parameters of the best trial in the first of ``settings_dirs`` holding a
    ``best-OPT.yaml`` (``locoprop tune --enqueue``), so that a new study starts from what earlier ones found."""
    import yaml

    for d in settings_dirs:
        path = ROOT / d / f"best-{opt}.yaml"
        if path.exists():
            top = yaml.safe_load(path.read_text())["tuning"]["top"][0]
            searched = {k: v for k, v in top.items() if k not in ("trial", "run_dir") and not k.startswith("final_")}
            return ",".join(f"{k}={v}" for k, v in searched.items())
    return None


def tune_commands(args, folder: Path, py: str) -> list[tuple[str, Path, Path | None, list[list[str]]]]:
    """``(optimizer, database, earlier database or None, one command per worker)`` for each ``--tune`` spec
    ``OPTIMIZER:TRIALS:EPOCHS:WORKERS``: WORKERS processes share the study (its own SQLite file, with the fixed
    settings ``--tune-set OPTIMIZER:KEY=VALUE``) and stop once it holds TRIALS finished trials, the first worker
    enqueuing the best settings of ``--settings-dirs`` and then those of ``--tune-enqueue``; a study found in
    ``--tune-from`` continues instead (each worker runs up to TRIALS more trials, only ``--tune-enqueue``'s
    settings enqueued)."""
    out = []
    for spec in args.tune:
        parts = spec.split(":") + [None] * 3
        opt, trials, epochs, workers = parts[0], parts[1] or "32", parts[2] or "10", int(parts[3] or 1)
        db = folder / f"standard-mnist-tanh-{opt}-gpu.db"
        earlier = Path(args.tune_from) / db.name if args.tune_from else None
        if earlier is not None and earlier.exists():
            limits, first = ["--trials", trials], None
        else:
            earlier = None
            limits, first = ["--trials", trials, "--max-trials", trials], enqueued_settings(opt, args.settings_dirs)
        fixed = [a for spec_set in getattr(args, "tune_set", []) if spec_set.partition(":")[0] == opt
                 for a in ("--set", spec_set.partition(":")[2])]
        cmd = [py, "-m", "locoprop", "tune", "--dataset", "mnist", "--model", "standard", "--activation", "tanh",
               "--batch-size", "1000", "--epochs", epochs, *limits,
               "--startup-trials", str(args.startup_trials), "--sampler", "tpe", "--device", args.device,
               "--data-dir", args.data_dir, "--storage", str(db), "--runs-dir", str(folder / "trials" / opt),
               "--optimizer", opt, *fixed,
               *(["--population", str(args.tune_population)] if args.tune_population > 1 else [])]
        extra = [a for spec_enq in getattr(args, "tune_enqueue", []) if spec_enq.partition(":")[0] == opt
                 for a in ("--enqueue", spec_enq.partition(":")[2])]
        first_worker = (["--enqueue", first] if first else []) + extra
        out.append((opt, db, earlier, [cmd + (first_worker if w == 0 else []) for w in range(workers)]))
    return out


def tune_on_gpu(args, work: Path, out: Path, log, env: dict, py: str, limit: float) -> Path:
    """Part 3: the ``--tune`` studies (:func:`tune_commands`) side by side until ``limit`` s; returns the folder
    of their reports."""
    folder = work / "tuning"
    folder.mkdir(parents=True, exist_ok=True)
    procs, dbs = [], {}
    for opt, db, earlier, commands in tune_commands(args, folder, py):
        dbs[opt] = db
        if earlier is not None:
            shutil.copyfile(earlier, db)
            _log(log, f"tune {opt}: continuing the study in {earlier}")
        for w, cmd in enumerate(commands):
            _log(log, f"$ {' '.join(cmd)}  (worker {w + 1} of {len(commands)})")
            fh = (folder / f"log-{opt}-{w}.txt").open("a")
            procs.append((opt, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                                env=dict(env, OMP_NUM_THREADS="1"), start_new_session=True), fh))
            time.sleep(3 if w == 0 else 0.5)  # the first worker creates the study
    stop_at = time.time() + max(limit, 10)
    while any(pr.poll() is None for _, pr, _ in procs) and time.time() < stop_at:
        time.sleep(1)
    for opt, pr, fh in procs:
        if pr.poll() is None:
            _log(log, f"tune {opt}: stopped at its time limit (the study keeps its finished trials)")
            os.killpg(pr.pid, signal.SIGTERM)
            try:
                pr.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(pr.pid, signal.SIGKILL)
        fh.close()
    for opt, db in dbs.items():
        _run([py, "-m", "locoprop", "tune", "--storage", str(db), "--study", f"mnist-standard-tanh-{opt}",
              "--report", str(folder / f"best-{opt}.yaml"), "--top", "5"], 60, folder / f"log-{opt}.txt", log, env=env)
    with tarfile.open(out / "tuning.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="tuning", filter=without_checkpoints)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-session")
    p.add_argument("--data-dir", default=".carrydata/mnist")
    p.add_argument("--budget-s", type=float, default=500.0, help="the whole script's time")
    p.add_argument("--tests-s", type=float, default=90.0)
    p.add_argument("--perf-s", type=float, default=140.0, help="time for the step-time benchmark (0: skip it)")
    p.add_argument("--profile-s", type=float, default=0.0, help="time for the step profile (0: skip it)")
    p.add_argument("--profile-args", default="--model standard --modes graph graphed graphed-iter",
                   help="arguments of benchmarks/step_profile.py")
    p.add_argument("--alone-s", type=float, default=90.0, help="limit for each of the uncontended runs")
    p.add_argument("--perf-args", default="--models standard wide deep --batch-sizes 1000 100 --steps 20 --warmup 5")
    p.add_argument("--epochs", type=int, default=None, help="override (a smoke test); default: the figures' 100")
    p.add_argument("--limit-train", type=int, default=None, help="override (a smoke test)")
    p.add_argument("--runs", nargs="*", default=None, help="only these runs (names as in session.log)")
    p.add_argument("--configs", nargs="*", default=[], metavar="NAME=FILE[:KEY=VALUE,...]",
                   help="more runs of part 4: settings YAML files as locoprop train --config reads them, with "
                        "settings changed after the colon, e.g. notebook-m=configs/notebook-defaults-locoprop-m.yaml "
                        "notebook-m-T5=configs/notebook-defaults-locoprop-m.yaml:local_steps=5")
    p.add_argument("--precision-error-s", type=float, default=0.0,
                   help="time for benchmarks/precision_error.py (0: skip it)")
    p.add_argument("--settings-dirs", nargs="+",
                   default=["results/tuning-h200-100epoch", "results/tuning-kfac-at1-cpu",
                            "results/tuning-shampoo-at1-cpu", "results/tuning-5epoch", "results/tuning"],
                   help="folders of tuned settings, first match wins")
    p.add_argument("--tune", nargs="*", default=[], metavar="OPTIMIZER[:TRIALS[:EPOCHS[:WORKERS]]]",
                   help="studies to run on the GPU before the runs (default 32 trials of 10 epochs each, 1 worker)")
    p.add_argument("--startup-trials", type=int, default=8, help="random trials before TPE models a study")
    p.add_argument("--tune-set", nargs="*", default=[], metavar="OPTIMIZER:KEY=VALUE",
                   help="a fixed setting of that optimizer's study (locoprop tune --set), e.g. shampoo:shampoo_root=eigh")
    p.add_argument("--tune-enqueue", nargs="*", default=[], metavar="OPTIMIZER:KEY=VALUE,...",
                   help="settings that study's first worker tries first (locoprop tune --enqueue; after the best "
                        "of --settings-dirs), e.g. locoprop-m:lr=1e-5,activation_lr=10")
    p.add_argument("--tune-from", default=None,
                   help="folder holding standard-mnist-tanh-OPTIMIZER-gpu.db files of an earlier session: those "
                        "studies continue (each worker runs up to TRIALS more; trials left running are retried)")
    p.add_argument("--tune-s", type=float, default=240.0, help="time for all studies together")
    p.add_argument("--tune-population", type=int, default=1,
                   help="each tuning worker trains this many trials at a time as one population")
    p.add_argument("--population-s", type=float, default=0.0,
                   help="time for benchmarks/population_speed.py (0: skip it)")
    p.add_argument("--population-args", default="--sizes 1 16 64 --precisions fp32 tf32 --updates eager compiled",
                   help="arguments of benchmarks/population_speed.py")
    p.add_argument("--alone", nargs="*", default=list(ALONE), help="runs made first, one at a time")
    p.add_argument("--alone-limits", nargs="*", default=[], metavar="RUN=SECONDS",
                   help="a limit of its own for an --alone run (others get --alone-s), e.g. shampoo=45: a run stopped "
                        "there still shows whether, and when, it reached a loss")
    p.add_argument("--with-tune", nargs="*", default=[], metavar="RUN",
                   help="runs started beside the --tune studies, with the settings of --settings-dirs (not those "
                        "studies'); they go on with the rest after the studies end (their wall times are contended)")
    p.add_argument("--beside-tests", nargs="*", default=[], metavar="RUN",
                   help="runs started with the tests, for their losses only (their wall times are contended); "
                        "waited for until --beside-tests-s after the start, then stopped (resumable), before "
                        "the step times")
    p.add_argument("--beside-tests-s", type=float, default=150.0)
    p.add_argument("--tests", default="tests/cuda tests/test_fused.py", help="pytest paths ('' for none)")
    p.add_argument("--device", default="cuda", help="device of the training runs (cpu: a smoke test)")
    p.add_argument("--work", default="/tmp/locoprop-gpu-work", help="run folders (packed into runs.tar.gz)")
    p.add_argument("--keep-work", action="store_true",
                   help="keep what an earlier call left in --work on this machine: its runs resume from their "
                        "checkpoints and its tuning folder can be one of --settings-dirs")
    args = p.parse_args(argv)
    alone_limits = run_limits(args.alone_limits)

    start = time.time()
    deadline = start + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    log = (out / "session.log").open("a")
    env = os.environ.copy()
    env.setdefault("PYTHONPATH", str(ROOT / "src"))
    py = sys.executable

    with (out / "env.txt").open("w") as fh:
        if shutil.which("nvidia-smi"):
            subprocess.run(["nvidia-smi"], stdout=fh, stderr=subprocess.STDOUT)
        subprocess.run([py, "-c", "import torch, sys; print(sys.version); print('torch', torch.__version__, "
                        "torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"],
                       stdout=fh, stderr=subprocess.STDOUT)
    _log(log, (out / "env.txt").read_text().strip().splitlines()[-1])

    def chosen_runs(settings_dirs, names) -> dict[str, dict]:
        """The runs named by ``names`` (None: all), their settings written to ``work/runs/NAME.json``."""
        runs = training_runs(args.data_dir, args.epochs, args.limit_train, args.device, settings_dirs,
                             args.configs)
        if names is not None:
            unknown = sorted(set(names) - set(runs))
            if unknown:
                _log(log, f"unknown runs {unknown}; known: {sorted(runs)}")
            runs = {n: runs[n] for n in runs if n in names}
        for name, settings in runs.items():
            origin = settings.pop("_origin")
            (work / "runs" / f"{name}.json").write_text(json.dumps(settings, indent=1))
            _log(log, f"run {name}: {origin}")
        return runs

    def command(name):
        return [py, "-m", "locoprop", "train", "--config", str(work / "runs" / f"{name}.json"),
                "--out", str(work / "runs" / name), "--resume", "--no-progress"]

    child_env = dict(env, OMP_NUM_THREADS="1")
    procs = {}  # name -> (process, log file, start time) of the runs going on in the background
    finished = set()  # runs already made (beside the tests), not started again in part 4

    def start_runs(names):
        for name in names:
            fh = (work / "runs" / f"{name}.log").open("a")
            procs[name] = (subprocess.Popen(command(name), stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env=child_env, start_new_session=True), fh, time.time())
        if names:
            _log(log, f"started together: {', '.join(names)}")

    def wait_for_runs(stop_at: float) -> None:
        """Wait for the background runs until ``stop_at``; stop those still going (their folders resume)."""
        while procs and time.time() < stop_at:
            for name, (proc, fh, t0) in list(procs.items()):
                if proc.poll() is not None:
                    _log(log, f"{name}: exit {proc.returncode} after {time.time() - t0:.0f} s")
                    fh.close()
                    finished.add(name)
                    del procs[name]
            time.sleep(1)
        for name, (proc, fh, t0) in procs.items():
            _log(log, f"{name}: stopped after {time.time() - t0:.0f} s (resumable)")
            os.killpg(proc.pid, signal.SIGTERM)
        for name, (proc, fh, t0) in procs.items():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            fh.close()
            finished.add(name)
        procs.clear()

    # 1. correctness on CUDA, with the --beside-tests runs (loss only: their wall times are contended)
    settings_dirs = list(args.settings_dirs)
    if args.beside_tests:
        start_runs(list(chosen_runs(settings_dirs, args.beside_tests)))
    if args.tests:
        _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests.split()],
             min(args.tests_s, deadline - time.time()), out / "tests.txt", log)
    if procs:  # the step times below must have the GPU to themselves
        wait_for_runs(min(start + args.beside_tests_s, deadline - 60))

    # 2. step times (uncontended); --perf-s 0 skips them
    perf_limit = min(args.perf_s, deadline - time.time() - 60)
    if args.perf_s > 0:
        _run([py, "benchmarks/step_time.py", *args.perf_args.split(), "--deadline-s", str(max(perf_limit - 25, 5)),
              "--out", str(out / "perf.json")], perf_limit, out / "perf.txt", log)
    if args.profile_s > 0:
        _run([py, "benchmarks/step_profile.py", *args.profile_args.split(), "--out", str(out / "profile.json")],
             min(args.profile_s, deadline - time.time() - 30), out / "perf.txt", log)
    if args.precision_error_s > 0:
        _run([py, "benchmarks/precision_error.py", "--data-dir", args.data_dir, "--device", args.device,
              "--out", str(out / "precision-error.json")],
             min(args.precision_error_s, deadline - time.time() - 30), out / "perf.txt", log)
    if args.population_s > 0:
        _run([py, "benchmarks/population_speed.py", *args.population_args.split(),
              "--out", str(out / "population.json")],
             min(args.population_s, deadline - time.time() - 30), out / "perf.txt", log)

    # 3. tuning on the GPU, with the --with-tune runs beside it
    if args.tune:
        if args.with_tune:
            start_runs(list(chosen_runs(settings_dirs, args.with_tune)))
        tuned = tune_on_gpu(args, work, out, log, env, py, min(args.tune_s, deadline - time.time() - 60))
        settings_dirs = [str(tuned)] + settings_dirs

    # 4. training runs
    runs = chosen_runs(settings_dirs, args.runs)
    runs = {n: s for n, s in runs.items() if n not in procs and n not in finished}
    for name in [n for n in args.alone if n in runs]:
        limit = min(alone_limits.get(name, args.alone_s), deadline - time.time() - 30)
        if limit < 10:
            _log(log, f"{name}: no time left")
            continue
        _run(command(name), limit, work / "runs" / f"{name}.log", log, env=child_env, note="alone, ")

    start_runs([n for n in runs if n not in args.alone])
    wait_for_runs(deadline - 25)

    # 5. pack (no checkpoints: they stay out of git anyway)
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        tar.add(work / "runs", arcname="runs",
                filter=without_checkpoints)
    _log(log, f"packed runs.tar.gz ({(out / 'runs.tar.gz').stat().st_size / 1e6:.1f} MB); "
              f"total {time.time() - start:.0f} s")
    summary = (out / "perf.txt").read_text().splitlines() if (out / "perf.txt").exists() else []
    tail = [ln for ln in summary if ln and not ln.startswith("{")]
    print("\n".join(tail[-60:]))
    tests = (out / "tests.txt").read_text().splitlines() if (out / "tests.txt").exists() else []
    print("\n".join(tests[-5:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
