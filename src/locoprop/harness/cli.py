"""The ``locoprop`` command line (argparse).

    locoprop train --optimizer locoprop-m --lr 1e-5 --activation-lr 10 --out runs/NAME
    torchrun --nproc_per_node 4 -m locoprop train ... --distributed layers --out runs/NAME
    locoprop compare configs/demo.yaml
    locoprop plot runs/A runs/B --out fig.png
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from ..distributed import DistributedError
from .train import TrainConfig

__all__ = ["main", "build_parser", "load_yaml", "run_compare", "SUBCOMMAND_MODULES"]

#: Further subcommands, each a module of this package with ``register(subparsers)``
#: (adds its parser and sets ``func`` to a callable taking the parsed args and
#: returning an exit code).
SUBCOMMAND_MODULES = ("tune", "reproduce")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with the safe loader; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _field_type(f: dataclasses.Field):
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and (typing.get_origin(hint) in (typing.Union, types.UnionType)) else hint


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per :class:`TrainConfig` field, default ``None`` (= not given)."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = _field_type(f)
        help_ = f"{f.metadata.get('help', '')} (default: {f.default})"
        if typ is bool and f.metadata.get("words"):  # true, false or a word: --NAME [WORD], --no-NAME
            p.add_argument(flag, dest=f.name, nargs="?", const=True, choices=f.metadata["words"], default=None,
                           help=help_)
            p.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=False, help="false")
        elif typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=help_)


def _config_from(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    values = dict(base or {})
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainConfig.from_dict(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locoprop", description="LocoProp experiments (AISTATS 2022)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one autoencoder run")
    _add_config_options(p)
    p.add_argument("--config", help="YAML file of settings (e.g. from `locoprop tune --report`); flags override")
    p.add_argument("--out", required=True, help="run folder (config.json, metrics.jsonl, checkpoint.pt)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                   help="one run per seed, all trained at once as one population (locoprop.harness.population; "
                        "LocoProp-S, LocoProp-M and the first-order methods) into OUT/seed-SEED, with the mean "
                        "and spread of their final losses in OUT/seeds.json")

    p = sub.add_parser("compare", help="run every optimizer of a YAML comparison, then plot")
    p.add_argument("config", help="YAML: out, defaults, runs (list of settings with a name), plot")
    p.add_argument("--out", help="override the folder of the runs")
    for name in ("epochs", "limit_train", "limit_test"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--only", nargs="+", default=None, help="run only these runs (by name); plot all finished")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("plot", help="draw loss against epochs and wall-clock time")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", required=True, help="image file (png, pdf, svg)")
    p.add_argument("--metric", default="train_loss", choices=["train_loss", "test_loss"])
    p.add_argument("--title", default=None)
    p.add_argument("--views", nargs="+", default=["epoch", "wall_time"], choices=["epoch", "wall_time"],
                   help="x axes, one panel each (default: both; epoch alone for runs from different machines)")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="legend labels, one per run in order (default: each run's settings, and its device where "
                        "the runs come from several)")

    import importlib

    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
            continue
        module.register(sub)
    return parser


def run_compare(config_path: str | Path, *, out: str | None = None, overrides: dict | None = None,
                progress: bool = True, log=print, only: list[str] | None = None) -> tuple[list[Path], Path | None]:
    """Run (or reuse) every run of a comparison file, then draw its plot(s) and print a table."""
    from .plots import plot_runs, summary_table
    from .train import train

    spec = load_yaml(config_path)
    unknown = sorted(set(spec) - {"out", "defaults", "runs", "plot", "title", "metrics"})
    if unknown:
        raise ValueError(f"{config_path}: unknown key(s) {unknown}; valid: out, defaults, runs, plot, title, metrics")
    runs = spec.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{config_path}: 'runs' must be a non-empty list of settings")
    root = Path(out or spec.get("out") or Path("runs") / Path(config_path).stem)
    defaults = dict(spec.get("defaults") or {})
    dirs = []
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or "name" not in run:
            raise ValueError(f"{config_path}: runs[{i}] must be a mapping with a 'name'")
        values = {**defaults, **{k: v for k, v in run.items() if k != "name"}, **(overrides or {})}
        cfg = TrainConfig.from_dict(values)
        run_dir = root / str(run["name"])
        if only is not None and run["name"] not in only:
            if (run_dir / "metrics.jsonl").exists():
                dirs.append(run_dir)
            continue
        log(f"== {run['name']}: {cfg.label()}")
        result = train(cfg, run_dir, resume=True, progress=progress, log=log)
        log(f"   {result.status}: final train loss {result.final_train_loss}")
        dirs.append(run_dir)
    figure = None
    if spec.get("plot", True) and dirs:
        figure = root / (spec.get("plot") if isinstance(spec.get("plot"), str) else "train_loss.png")
        plot_runs(dirs, figure, title=spec.get("title"))
        test_fig = figure.with_name(figure.stem.replace("train_loss", "") + "test_loss.png") \
            if "train_loss" in figure.stem else figure.with_name(figure.stem + "_test_loss.png")
        plot_runs(dirs, test_fig, metric="test_loss", title=spec.get("title"))
        log(f"plots: {figure}, {test_fig}")
    table = summary_table(dirs) if dirs else "(no finished runs)"
    (root / "summary.txt").write_text(table + "\n")
    log(table)
    return dirs, figure


def _train_seeds(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """``locoprop train --seeds``: one run per seed as one population; ``OUT/seeds.json`` sums them up."""
    import json
    import statistics
    from dataclasses import replace

    from .population import train_population

    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds: each seed once, got {args.seeds}")
    if args.resume:
        raise ValueError("--seeds: a population keeps no checkpoint, so it cannot --resume; train it again")
    out = Path(args.out)
    outs = [out / f"seed-{seed}" for seed in args.seeds]
    results = train_population([replace(cfg, seed=seed) for seed in args.seeds], outs,
                               progress=not args.no_progress)
    finals = [r.final_train_loss for r in results if r.status == "finished"]
    summary = {"settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "seed"}, "seeds": args.seeds,
               "runs": [{"seed": seed, "run_dir": str(r.out), "status": r.status, "epochs": r.epochs_done,
                         "final_train_loss": r.final_train_loss, "final_test_loss": r.final_test_loss,
                         "reason": r.reason} for seed, r in zip(args.seeds, results)],
               "finished": len(finals),
               "final_train_loss_mean": statistics.fmean(finals) if finals else None,
               "final_train_loss_stdev": statistics.stdev(finals) if len(finals) > 1 else None}
    (out / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
    for seed, r in zip(args.seeds, results):
        print(f"seed {seed}: {r.status}: {r.epochs_done} epochs, train loss {r.final_train_loss}, "
              f"test loss {r.final_test_loss}" + (f" ({r.reason})" if r.reason else ""))
    if finals:
        spread = f" ± {summary['final_train_loss_stdev']:.4f} (standard deviation)" if len(finals) > 1 else ""
        print(f"{len(finals)} of {len(results)} finished: final train loss {summary['final_train_loss_mean']:.4f}"
              f"{spread}; {out / 'seeds.json'}")
    return 0 if all(r.status in ("finished", "early-exit") for r in results) else 3


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from .train import train

            base = load_yaml(args.config) if args.config else None
            if base and "settings" in base:  # a tune report holds its settings under 'settings'
                base = base["settings"]
            cfg = _config_from(args, base)
            if args.seeds is not None:
                return _train_seeds(cfg, args)
            result = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
            if cfg.distributed is None or int(os.environ.get("RANK", "0")) == 0:  # rank 0 reports
                print(f"{result.status}: {result.epochs_done} epochs, train loss {result.final_train_loss}, "
                      f"test loss {result.final_test_loss}" + (f" ({result.reason})" if result.reason else ""))
            return 0 if result.status in ("finished", "early-exit") else 3
        if args.command == "compare":
            overrides = {k: getattr(args, k) for k in ("epochs", "limit_train", "limit_test", "device")
                         if getattr(args, k) is not None}
            run_compare(args.config, out=args.out, overrides=overrides, progress=not args.no_progress, only=args.only)
            return 0
        if args.command == "plot":
            from .plots import plot_runs

            print(plot_runs(args.runs, args.out, metric=args.metric, title=args.title, views=args.views,
                            labels=args.labels))
            return 0
        if getattr(args, "func", None) is not None:
            return int(args.func(args))
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"locoprop {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:  # a rank died or hung: the message names it
        print(f"locoprop {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return 4
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
