"""A small learning-rate grid per optimizer on a subset of MNIST, to pick settings for CPU runs.

This is not the paper's tuning (Bayesian search, thousands of trials, 100
epochs: that is `locoprop tune`); it is a cheap grid that picks usable
settings when only a CPU and minutes are available.  It writes every trial and
the best setting of each optimizer to a JSON file and, with ``--emit``, a
comparison YAML that `locoprop compare` runs.

    python benchmarks/quick_sweep.py --out results/sweeps/quick-sweep.json --emit configs/cpu-standard.yaml
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from locoprop.harness.train import TrainConfig, train

# Grids over the paper's search spaces (Tables 3-5), coarse.
GRIDS = {
    "sgd": {"lr": [1e-3, 3e-3, 1e-2, 3e-2]},
    "momentum": {"lr": [3e-4, 1e-3, 3e-3], "beta1": [0.9]},
    "nesterov": {"lr": [3e-4, 1e-3, 3e-3], "beta1": [0.9]},
    "adagrad": {"lr": [1e-2, 3e-2, 1e-1], "eps": [1e-8]},
    "adam": {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "beta1": [0.9], "beta2": [0.999], "eps": [1e-8]},
    "rmsprop": {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "beta1": [0.9], "beta2": [0.9], "eps": [1e-8]},
    "locoprop-m": {"lr": [3e-5, 1e-4, 3e-4], "activation_lr": [10.0, 100.0], "beta1": [0.9], "beta2": [0.9],
                   "eps": [1e-8]},
    "locoprop-s": {"lr": [3e-5, 1e-4, 3e-4], "activation_lr": [10.0, 100.0], "beta1": [0.9], "beta2": [0.9],
                   "eps": [1e-8]},
    "shampoo": {"lr": [1e-4, 3e-4, 1e-3], "beta1": [0.9]},
    "kfac": {"lr": [1e-4, 3e-4, 1e-3], "beta1": [0.9], "damping": [1e-2]},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizers", nargs="*", default=list(GRIDS))
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model", default="standard")
    p.add_argument("--out", required=True)
    p.add_argument("--emit", help="write a comparison YAML with the best setting of each optimizer")
    p.add_argument("--emit-epochs", type=int, default=10)
    p.add_argument("--emit-out", default="runs/cpu-standard")
    p.add_argument("--lrs", nargs="*", type=float, default=None, help="override the learning-rate grid")
    p.add_argument("--previous", nargs="*", default=[], help="earlier sweep JSON files whose trials are merged in")
    args = p.parse_args(argv)

    trials, best = [], {}
    for prev in args.previous:
        for rec in json.loads(Path(prev).read_text())["trials"]:
            rec = dict(rec, source=str(prev))
            trials.append(rec)
            if rec["status"] == "finished" and rec["final_train_loss"] is not None and (
                    rec["optimizer"] not in best or rec["final_train_loss"] < best[rec["optimizer"]]["final_train_loss"]):
                best[rec["optimizer"]] = rec
    work = Path(tempfile.mkdtemp(prefix="sweep-"))
    for name in args.optimizers:
        grid = dict(GRIDS[name], **({"lr": args.lrs} if args.lrs else {}))
        keys = sorted(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            hp = dict(zip(keys, values))
            cfg = TrainConfig(dataset="mnist", model=args.model, optimizer=name, epochs=args.epochs, warmup_epochs=1,
                              limit_train=args.limit_train, limit_test=2000, device="cpu", early_exit=False, **hp)
            run_dir = work / f"{name}-{len(trials)}"
            result = train(cfg, run_dir, progress=False, log=lambda s: None)
            rec = {"optimizer": name, **hp, "status": result.status, "final_train_loss": result.final_train_loss}
            trials.append(rec)
            print(json.dumps(rec), flush=True)
            ok = result.status == "finished" and result.final_train_loss is not None
            if ok and (name not in best or result.final_train_loss < best[name]["final_train_loss"]):
                best[name] = rec
            shutil.rmtree(run_dir, ignore_errors=True)
    record = {
        "command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"cpu {platform.machine()} ({torch.get_num_threads()} threads)", "torch": torch.__version__,
        "protocol": f"MNIST first {args.limit_train} train images, {args.epochs} epochs (1 warm-up), batch 1000, "
                    f"{args.model} tanh autoencoder; final train loss on that subset",
        "trials": trials, "best": best,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    if args.emit:
        runs = []
        for name, rec in best.items():
            settings = {k: v for k, v in rec.items() if k not in ("optimizer", "status", "final_train_loss", "source")}
            runs.append({"name": name, "optimizer": name, **settings})
        spec = {
            "title": f"MNIST standard tanh autoencoder, {args.emit_epochs} epochs on CPU (settings from "
                     f"{Path(args.out).name})",
            "out": args.emit_out,
            "defaults": {"dataset": "mnist", "model": args.model, "activation": "tanh", "epochs": args.emit_epochs,
                         "warmup_epochs": 1, "batch_size": 1000, "device": "cpu"},
            "runs": runs,
        }
        Path(args.emit).parent.mkdir(parents=True, exist_ok=True)
        Path(args.emit).write_text(f"# generated by: {record['command']} ({record['date']})\n"
                                   + yaml.safe_dump(spec, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
