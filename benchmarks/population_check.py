"""Train the finished trials of an existing study again as populations and compare the final train losses.

A check on real data, at a real model size, that a population member computes what its separate run
computed (``tests/harness/test_population.py`` checks it on small models): every ``COMPLETE`` trial of
``--study`` in ``--storage`` is enqueued, with its parameters, in a new study of the same settings in
``--out/check.db``, which :func:`locoprop.harness.tune.run_population_study` runs ``--population`` at a
time with the original study's pruner (``--pruner``, ``locoprop tune``'s default: none but the notebook's
rules; Optuna's own default, a median pruner, would stop trials the original study ran to the end).  It writes ``--out/check.json`` and ``--out/README.md``: for each trial, its settings, the study's
final train loss (one run at a time), the population's, and their relative difference.

    python benchmarks/population_check.py --storage results/tuning/standard-mnist-tanh-cpu.db \\
        --study mnist-standard-tanh-locoprop-m --population 8 --data-dir ../shared/data/mnist \\
        --out results/population/check-cpu-locoprop-m
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    import optuna
    from optuna.trial import TrialState

    from locoprop.harness.tune import make_pruner, open_storage, open_study, run_population_study

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", required=True, help="the SQLite file of the study to check")
    ap.add_argument("--study", required=True)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--pruner", choices=("notebook", "median"), default="notebook",
                    help="the pruner of the original study (locoprop tune's --pruner; default notebook: no Optuna "
                         "pruning, only the notebook's rules, which the runs apply themselves)")
    ap.add_argument("--out", required=True, help="folder of the new study, its run folders and the report")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    src = Path(args.storage)
    if not src.is_file():
        raise SystemExit(f"--storage {src}: no such file")
    original = optuna.load_study(study_name=args.study, storage=f"sqlite:///{src}")
    settings = original.user_attrs["settings"]
    done = [t for t in original.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        raise SystemExit(f"--study {args.study}: no complete trial to check")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "check.db"
    if db.exists():
        raise SystemExit(f"{db}: exists; choose another --out")
    storage = open_storage(f"sqlite:///{db}")
    study, settings, space = open_study(storage, args.study, settings, pruner=make_pruner(args.pruner))
    for t in done:
        study.enqueue_trial(dict(t.params))
    t0 = time.time()
    run_population_study(study, settings, space, population=args.population, trials=len(done),
                         runs_dir=out / "trials", worker={"device": args.device, "data_dir": args.data_dir},
                         log=lambda s: print(s, flush=True))
    wall = time.time() - t0
    by_params = {json.dumps(t.params, sort_keys=True): t for t in study.get_trials(deepcopy=False)}
    rows = []
    for t in done:
        mine = by_params[json.dumps(t.params, sort_keys=True)]
        value = mine.value if mine.state == TrialState.COMPLETE else None
        rows.append({"trial": t.number, "params": t.params, "study_value": t.value, "population_value": value,
                     "population_state": mine.state.name,
                     "relative_difference": None if value is None else abs(value - t.value) / abs(t.value)})
    meta = {"command": "python benchmarks/population_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.date.today().isoformat(), "host": platform.node(), "torch": torch.__version__,
            "device": args.device, "threads": torch.get_num_threads(), "settings": settings,
            "population": args.population, "wall_s": wall,
            "original": {"storage": str(src), "study": args.study}}
    (out / "check.json").write_text(json.dumps({"meta": meta, "trials": rows}, indent=1) + "\n")
    diffs = [r["relative_difference"] for r in rows if r["relative_difference"] is not None]
    lines = [f"# Population check: {args.study}", "",
             f"Written by `benchmarks/population_check.py` ({meta['date']}, {args.device}, {meta['threads']} "
             f"threads, torch {meta['torch']}); command: `{meta['command']}`.", "",
             f"Every complete trial of `{args.study}` in `{src}` (trained one at a time) trained again, "
             f"{args.population} at a time, as populations (`check.db` is the new study, `trials/` its run "
             f"folders); {len(rows)} trials in {wall:.0f} s. Largest relative difference of the final train "
             f"losses: {max(diffs):.2e}." if diffs else "No trial completed in the population.", "",
             "| trial | " + " | ".join(sorted(done[0].params)) + " | one at a time | population | relative "
             "difference |", "|" + " --- |" * (len(done[0].params) + 4)]
    for r in rows:
        cells = [f"{r['params'][k]:.4g}" for k in sorted(r["params"])]
        pop = f"{r['population_value']:.6f}" if r["population_value"] is not None else r["population_state"]
        rel = f"{r['relative_difference']:.2e}" if r["relative_difference"] is not None else ""
        lines.append(f"| {r['trial']} | " + " | ".join(cells) + f" | {r['study_value']:.6f} | {pop} | {rel} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
