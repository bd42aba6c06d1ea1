"""``locoprop reproduce``: the paper's figures (Figs. 3-8) and its cost table (Table 1).

Figures
-------
``locoprop reproduce fig4-standard`` reads ``configs/figures/fig4-standard.yaml``
(see docs/tuning.md for the format), trains every run that is missing from
the output folder (finished runs are reused, unfinished ones resumed with
``train(..., resume=True)``), and draws the figure the way the paper does:
loss against epochs (Figs. 3, 4, 6a-c, 7a), against wall-clock time
(Fig. 5), test loss (Figs. 6d-f, 7b, 8).  Runs live in
``OUT/EXPERIMENT/RUN`` so figures of the same experiment (Fig. 4, 5 and 8
of one autoencoder) share them.  The paper's tuned values are not
published: a run without ``settings_from`` (or a matching file in
``--settings-dir``) uses the configuration's untuned placeholders, and the
figure title says so.

Table 1
-------
``locoprop reproduce table1`` measures, on one layer pair
``Sequential(Linear(d, d), Tanh(), Linear(d, d))`` over a grid of widths
``d`` and batch sizes ``b``, the optimizer-state memory (bytes of the
floating-point tensors in the optimizer's state dict after a few steps; for
LocoProp also the per-step inputs, pre-activations, gradients and targets it
keeps, counted from ``last_problems`` with ``retain_problems=True``), and the
median step time, for Adam, Shampoo, K-FAC and LocoProp-M at T = 1, 5, 10;
fits ``cost ~ c d^p b^q`` by least squares in log-log space; and prints the
exponents beside the paper's O(.) entries (Table 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from .cli import load_yaml
from .train import CONFIG, TrainConfig, read_metrics, train

__all__ = ["figures_dir", "list_figures", "load_figure", "figure_runs", "rescheduled", "reproduce_figure", "measure_table1",
           "fit_power_law", "table1_text", "PAPER_TABLE1", "register", "main_reproduce"]

FIGURE_KEYS = {"figure", "title", "note", "experiment", "runs_from", "defaults", "runs", "plots"}
RUN_META_KEYS = {"name", "settings_from"}
PLOT_KEYS = {"file", "metric", "views", "title"}
#: The hyper-parameters a tuned settings file supplies (the searched ones of Tables 3-5).
TUNED_KEYS = ("lr", "beta1", "beta2", "eps", "activation_lr")
#: Fixed settings of a study that belong to the method its values were tuned for (K-FAC's KL clipping,
#: Shampoo's inverse-root method, whose tiny epsilons act differently with each root): taken from a tuned
#: file along with :data:`TUNED_KEYS`.
METHOD_KEYS = ("kl_clip", "shampoo_root")
#: Settings a tuned file must share with a run for ``--settings-dir`` to apply it.
CONTEXT_KEYS = ("optimizer", "dataset", "model", "activation", "batch_size", "inner")


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def figures_dir(given: str | os.PathLike | None = None) -> Path:
    """``given``, else ``./configs/figures`` if it exists, else the repository's ``configs/figures``."""
    if given is not None:
        path = Path(given)
        if not path.is_dir():
            raise FileNotFoundError(f"--figures-dir {path}: no such folder")
        return path
    local = Path("configs") / "figures"
    return local if local.is_dir() else _repo_root() / "configs" / "figures"


def list_figures(folder: Path) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def _figure_path(name: str, folder: Path) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = Path(folder) / f"{name}.yaml"
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"FIGURE {name!r}: no {candidate}; valid: {', '.join(list_figures(folder))}, table1")


def load_figure(name: str, folder: str | os.PathLike | None = None, _seen: tuple = ()) -> dict:
    """Read a figure file (``yaml.safe_load``), following ``runs_from``; errors name the file and key."""
    path = _figure_path(name, figures_dir(folder))
    spec = load_yaml(path)
    unknown = sorted(set(spec) - FIGURE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid: {sorted(FIGURE_KEYS)}")
    spec = dict(spec)
    spec["_path"] = path
    spec["_name"] = path.stem
    if spec.get("runs_from"):
        other = str(spec["runs_from"])
        if other in _seen or other == path.stem:
            raise ValueError(f"{path}: runs_from {other!r} makes a cycle ({' -> '.join(_seen + (other,))})")
        base = load_figure(other, path.parent, _seen + (path.stem,))
        for key in ("experiment", "runs"):
            if key in spec:
                raise ValueError(f"{path}: '{key}' and 'runs_from' exclude each other")
        spec["experiment"] = base["experiment"]
        spec["defaults"] = {**base.get("defaults", {}), **(spec.get("defaults") or {})}
        spec["runs"] = base["runs"]
        spec["_runs_path"] = base["_runs_path"]
    else:
        spec["_runs_path"] = path
    if not isinstance(spec.get("experiment"), str) or not spec["experiment"]:
        raise ValueError(f"{path}: 'experiment' (the runs folder shared by figures) must be a non-empty string")
    if not isinstance(spec.get("defaults", {}), dict):
        raise ValueError(f"{path}: 'defaults' must be a mapping of settings")
    runs = spec.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{path}: 'runs' must be a non-empty list of settings")
    names = [r.get("name") if isinstance(r, dict) else None for r in runs]
    for i, (run, n) in enumerate(zip(runs, names)):
        if not isinstance(run, dict) or not n:
            raise ValueError(f"{spec['_runs_path']}: runs[{i}] must be a mapping with a 'name'")
    if len(set(names)) != len(names):
        raise ValueError(f"{spec['_runs_path']}: run names repeat: {names}")
    plots = spec.get("plots")
    if not isinstance(plots, list) or not plots:
        raise ValueError(f"{path}: 'plots' must be a non-empty list of {{file, metric, views}}")
    for i, p in enumerate(plots):
        if not isinstance(p, dict):
            raise ValueError(f"{path}: plots[{i}] must be a mapping")
        bad = sorted(set(p) - PLOT_KEYS)
        if bad:
            raise ValueError(f"{path}: plots[{i}]: unknown key(s) {bad}; valid: {sorted(PLOT_KEYS)}")
        if p.get("metric", "train_loss") not in ("train_loss", "test_loss"):
            raise ValueError(f"{path}: plots[{i}].metric: expected train_loss or test_loss, got {p['metric']!r}")
        views = p.get("views", ["epoch"])
        if not isinstance(views, list) or not views or not set(views) <= {"epoch", "wall_time"}:
            raise ValueError(f"{path}: plots[{i}].views: expected a list of epoch and/or wall_time, got {views!r}")
    return spec


def _resolve_file(value: str, spec: dict, what: str) -> Path:
    """A path as given (relative to the current folder), else relative to the repository of the figure file."""
    path = Path(value)
    if path.is_absolute() or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"{spec['_runs_path']}: {what} {value}: no such file")
        return path
    root = Path(spec["_runs_path"]).resolve().parent.parent.parent  # configs/figures/X.yaml -> repository
    candidate = root / path
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"{spec['_runs_path']}: {what} {value}: no such file (looked in {Path.cwd()} and {root})")


def _tuned_settings(path: Path) -> dict:
    """The settings of a ``locoprop tune --report`` file (or a flat mapping of TrainConfig fields)."""
    data = load_yaml(path)
    settings = data.get("settings", data)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: 'settings' must be a mapping of TrainConfig fields")
    TrainConfig.from_dict({k: v for k, v in settings.items()})  # names checked
    return settings


def _scaled_warmup(warmup: int, old_epochs: int, new_epochs: int) -> int:
    """Keep the warm-up's share of the schedule (the paper's 5 of 100 epochs) when ``--epochs`` changes it."""
    return min(int(round(warmup * new_epochs / old_epochs)), new_epochs - 1)


def rescheduled(values: dict, epochs: int) -> dict:
    """TrainConfig ``values`` trained for ``epochs`` instead: the warm-up keeps its share of the schedule, and
    a schedule longer than the epochs trained keeps its untrained tail (the notebook's: 99 of 100 epochs)."""
    old = values.get("epochs", TrainConfig.epochs)
    out = dict(values, epochs=epochs,
               warmup_epochs=_scaled_warmup(values.get("warmup_epochs", TrainConfig.warmup_epochs), old, epochs))
    if values.get("schedule_epochs"):
        out["schedule_epochs"] = values["schedule_epochs"] + epochs - old
    return out


def _settings_dirs(settings_dir) -> list[Path]:
    if settings_dir is None:
        return []
    if isinstance(settings_dir, (str, os.PathLike)):
        return [Path(settings_dir)]
    return [Path(d) for d in settings_dir]


def figure_runs(spec: dict, overrides: dict | None = None, settings_dir=None,
                log: Callable[[str], None] = print) -> list[tuple[str, TrainConfig, str]]:
    """``(name, config, origin)`` of each run: defaults, the run's settings, tuned values, then overrides.

    ``settings_dir`` is a folder or a list of folders of ``best-OPTIMIZER.yaml``
    files; a run takes its tuned values from the first that has a file for its
    optimizer tuned in the same context (:data:`CONTEXT_KEYS`).  ``origin``
    says where the tuned hyper-parameters came from, or ``"untuned"`` when the
    configuration's placeholders are used.
    """
    overrides = dict(overrides or {})
    defaults = dict(spec.get("defaults") or {})
    out = []
    for run in spec["runs"]:
        values = {**defaults, **{k: v for k, v in run.items() if k not in RUN_META_KEYS}}
        origin = "untuned"
        source = None
        if run.get("settings_from"):
            source = _resolve_file(str(run["settings_from"]), spec, f"runs '{run['name']}': settings_from")
        else:
            for folder in _settings_dirs(settings_dir):
                candidate = folder / f"best-{values.get('optimizer')}.yaml"
                if not candidate.exists():
                    continue
                tuned = _tuned_settings(candidate)
                base = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
                differ = [k for k in CONTEXT_KEYS if tuned.get(k, base[k]) != values.get(k, base[k])]
                if differ:
                    log(f"   {run['name']}: {candidate} was tuned for other {differ}; not used")
                    continue
                source = candidate
                break
        if source is not None:
            tuned = _tuned_settings(source)
            if tuned.get("optimizer", values.get("optimizer")) != values.get("optimizer"):
                raise ValueError(f"{spec['_runs_path']}: runs '{run['name']}': settings_from {source} is for "
                                 f"optimizer {tuned.get('optimizer')!r}, the run is {values.get('optimizer')!r}")
            values.update({k: tuned[k] for k in TUNED_KEYS + METHOD_KEYS if k in tuned})
            origin = str(source)
        if "epochs" in overrides:
            values = rescheduled(values, overrides["epochs"])
        values.update(overrides)
        try:
            cfg = TrainConfig.from_dict(values)
            cfg.validate()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{spec['_runs_path']}: runs '{run['name']}': {exc}") from None
        out.append((str(run["name"]), cfg, origin))
    return out


def _suffix(overrides: dict) -> str:
    return "".join(f"+{k}={v}" for k, v in sorted(overrides.items()))


def _finished(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether ``run_dir`` holds a finished (or stopped early) run of exactly ``cfg``; errors on other settings."""
    config = run_dir / CONFIG
    if not config.exists():
        return False
    saved = json.loads(config.read_text()).get("settings", {})
    differ = sorted(k for k, v in asdict(cfg).items() if saved.get(k) != v)
    if differ:
        raise ValueError(f"{run_dir}: holds a run with other settings {differ}; choose another --out")
    try:
        records, events = read_metrics(run_dir)
    except FileNotFoundError:
        return False
    return bool(events) or (bool(records) and records[-1]["epoch"] >= cfg.epochs)


def reproduce_figure(name: str, *, out: str | os.PathLike = "runs/figures", overrides: dict | None = None,
                     settings_dir=None, folder: Path | None = None,
                     progress: bool = True, log: Callable[[str], None] = print) -> list[Path]:
    """Run what is missing for figure ``name`` and draw it; returns the image files."""
    from .plots import plot_runs, summary_table

    overrides = dict(overrides or {})
    spec = load_figure(name, folder)
    runs = figure_runs(spec, overrides, settings_dir, log=log)
    out = Path(out)
    suffix = _suffix(overrides)
    root = out / (spec["experiment"] + suffix)
    log(f"{spec['_name']}: {spec.get('figure', '')} -> runs in {root}")
    dirs = []
    for run_name, cfg, origin in runs:
        run_dir = root / run_name
        dirs.append(run_dir)
        tag = "untuned placeholders" if origin == "untuned" else f"tuned: {origin}"
        if _finished(run_dir, cfg):
            log(f"== {run_name}: {cfg.label()} ({tag}): reused")
            continue
        log(f"== {run_name}: {cfg.label()} ({tag})")
        result = train(cfg, run_dir, resume=True, progress=progress, log=log)
        log(f"   {result.status}: final train loss {result.final_train_loss}")
    untuned = [n for n, _, o in runs if o == "untuned"]
    files = []
    for p in spec["plots"]:
        notes = []
        if untuned:
            notes.append(f"UNTUNED placeholder settings for {len(untuned)} of {len(runs)} runs")
        if suffix:
            notes.append("overrides: " + suffix.lstrip("+").replace("+", ", "))
        title = "\n".join([str(p.get("title") or spec.get("title") or spec.get("figure"))]
                          + textwrap.wrap("; ".join(notes), 75))
        stem = Path(p.get("file") or spec["_name"]).stem
        target = out / f"{stem}{suffix}.png"
        plot_runs(dirs, target, metric=p.get("metric", "train_loss"), title=title,
                  views=tuple(p.get("views", ["epoch"])))
        files.append(target)
        log(f"figure: {target}")
    table = summary_table(dirs)
    (out / f"{spec['_name']}{suffix}.txt").write_text(table + "\n")
    log(table)
    return files


# ---------------------------------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------------------------------

#: Table 1 of the paper: additional memory and computation for a layer with dimensions {d_i}, batch b.
PAPER_TABLE1 = {
    "adam": ("O(prod_i d_i)", "O(prod_i d_i)"),
    "shampoo": ("O(sum_i d_i^2)", "O(sum_i d_i^3)"),
    "kfac": ("O(sum_i d_i^2)", "O(b sum_i d_i^2) + O(sum_i d_i^3) + O(b prod_i d_i)"),
    "locoprop": ("O(prod_i d_i) + O(b sum_i d_i)", "O(b T prod_i d_i)"),
}


def _tensor_bytes(obj, seen: set, floating_only: bool = True) -> int:
    """Bytes of the distinct tensors inside nested dicts/lists/tuples (floating point only by default)."""
    import torch

    if isinstance(obj, torch.Tensor):
        if floating_only and not (obj.is_floating_point() or obj.is_complex()):
            return 0
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.numel())
        if key in seen or obj.numel() == 0:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen, floating_only) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen, floating_only) for v in obj)
    return 0


def _problem_bytes(problems, seen: set) -> int:
    """Bytes LocoProp keeps per step: each layer's input, first residual (or pre-activation), gradients and target."""
    total = 0
    for pr in problems or []:
        b = pr.batch
        first = pr.residual if pr.residual is not None else b.pre  # one (b, d) tensor in a step (the other is freed)
        parts = [b.inputs, first, b.grad_pre, b.post, b.grad_post, b.grad_pre_sampled, pr.target, pr.anchor,
                 list(b.extras.values())]
        total += sum(_tensor_bytes(x, seen) for x in parts if x is not None)
    return total


def _table1_optimizers(local_steps: Sequence[int]) -> list[tuple[str, str, dict]]:
    return ([("adam", "adam", {}), ("shampoo", "shampoo", {}), ("kfac", "kfac", {})]
            + [(f"locoprop-m T={t}", "locoprop-m", {"local_steps": t}) for t in local_steps])


def measure_table1(dims: Sequence[int] = (128, 256, 512), batches: Sequence[int] = (100, 400), *,
                   local_steps: Sequence[int] = (1, 5, 10), steps: int = 5, warmup: int = 2, seed: int = 0,
                   log: Callable[[str], None] = print) -> dict:
    """Measure memory and step time of each optimizer on ``Sequential(Linear(d,d), Tanh(), Linear(d,d))``.

    Inputs are uniform in [0, 1]^(b x d) and the loss is the paper's
    (sigmoid cross-entropy against the input, summed over units, averaged
    over the batch), so K-FAC and LocoProp see the same kind of problem as in
    Sec. 3.  ``state_bytes``: floating-point tensors of the optimizer's state
    dict (integer step counters and RNG states are not counted), the model's
    own parameters excluded.  ``step_bytes``: for LocoProp, the tensors of
    its last step's local problems (``retain_problems=True``).  Times: the
    median of ``steps`` timed steps after ``warmup`` untimed ones, and the
    median of plain forward+backward passes for reference.
    """
    import torch
    from torch import nn

    from .models import AutoencoderLoss
    from .optimizers import build_optimizer

    for name, values in (("--dims", dims), ("--batches", batches), ("--local-steps", local_steps)):
        if not values or any((not isinstance(v, int)) or v < 1 for v in values):
            raise ValueError(f"{name}: expected positive integers, got {list(values)}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps: expected >= 1 (and warm-up >= 0), got {steps}, {warmup}")
    rows = []
    loss_fn = AutoencoderLoss()
    for d in dims:
        for b in batches:
            g = torch.Generator().manual_seed(seed)
            x = torch.rand(b, d, generator=g)

            def make_model():
                torch.manual_seed(seed)
                return nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))

            model = make_model()
            times = []
            for i in range(warmup + steps):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss_fn(model(x), x).backward()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            fwd_bwd = statistics.median(times)
            for label, opt_name, kw in _table1_optimizers(local_steps):
                model = make_model()
                opt = build_optimizer(opt_name, model, loss_fn, lr=1e-4, activation_lr=10.0, **kw)
                if hasattr(opt, "retain_problems"):
                    opt.retain_problems = True
                closure = lambda: loss_fn(model(x), x)  # noqa: E731
                times = []
                for i in range(warmup + steps):
                    t0 = time.perf_counter()
                    opt.step(closure)
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
                seen = {(p.untyped_storage().data_ptr(), p.storage_offset(), p.numel()) for p in model.parameters()}
                state_bytes = _tensor_bytes(opt.state_dict(), seen)
                step_bytes = _problem_bytes(getattr(opt, "last_problems", None), set()) \
                    if hasattr(opt, "last_problems") else None
                row = {"optimizer": label, "name": opt_name, "local_steps": kw.get("local_steps"), "d": d, "b": b,
                       "state_bytes": state_bytes, "step_bytes": step_bytes, "median_step_s": statistics.median(times),
                       "step_times_s": times, "fwd_bwd_s": fwd_bwd}
                rows.append(row)
                log(f"d={d:5d} b={b:5d} {label:18s} state {state_bytes:>11,d} B  "
                    f"{'' if step_bytes is None else f'per-step {step_bytes:>10,d} B  '}"
                    f"step {row['median_step_s'] * 1e3:8.2f} ms (fwd+bwd {fwd_bwd * 1e3:.2f} ms)")
    return {"rows": rows, "fits": _table1_fits(rows), "dims": list(dims), "batches": list(batches),
            "local_steps": list(local_steps), "steps": steps, "warmup": warmup, "seed": seed,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": _machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _machine() -> str:
    return f"{platform.node()}: {cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def fit_power_law(points: Sequence[tuple[float, float, float]]) -> dict | None:
    """Least squares of ``log y = log c + p log d + q log b`` over ``(d, b, y)`` points (numpy).

    Returns ``{"p_d", "q_b", "c", "r2", "n"}``, or ``None`` when some ``y`` is
    not positive or the points do not vary in both ``d`` and ``b``.
    """
    import numpy as np

    pts = [(float(d), float(b), float(y)) for d, b, y in points]
    if len(pts) < 3 or any(not (y > 0 and math.isfinite(y)) for _, _, y in pts):
        return None
    if len({d for d, _, _ in pts}) < 2 or len({b for _, b, _ in pts}) < 2:
        return None
    a = np.array([[1.0, math.log(d), math.log(b)] for d, b, _ in pts])
    y = np.array([math.log(v) for _, _, v in pts])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ coef
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss if ss > 0 else 1.0
    return {"c": float(math.exp(coef[0])), "p_d": float(coef[1]), "q_b": float(coef[2]), "r2": r2, "n": len(pts)}


def _table1_fits(rows: list[dict]) -> dict:
    fits = {}
    for label in dict.fromkeys(r["optimizer"] for r in rows):
        rs = [r for r in rows if r["optimizer"] == label]
        fits[label] = {
            "state_bytes": fit_power_law([(r["d"], r["b"], r["state_bytes"]) for r in rs]),
            "step_bytes": fit_power_law([(r["d"], r["b"], r["step_bytes"]) for r in rs])
            if all(r["step_bytes"] for r in rs) else None,
            "median_step_s": fit_power_law([(r["d"], r["b"], r["median_step_s"]) for r in rs]),
            "overhead_s": fit_power_law([(r["d"], r["b"], r["median_step_s"] - r["fwd_bwd_s"]) for r in rs]),
        }
    return fits


def table1_text(result: dict) -> str:
    """The fitted exponents beside the paper's O(.) entries (Table 1)."""
    def f(fit):
        return "-" if fit is None else f"d^{fit['p_d']:.2f} b^{fit['q_b']:.2f} (R2 {fit['r2']:.2f})"

    header = ("optimizer", "paper memory", "state bytes ~", "per-step bytes ~", "paper computation",
              "step time ~", "step - fwd/bwd ~")
    rows = [header]
    for label, fit in result["fits"].items():
        key = "locoprop" if label.startswith("locoprop") else label
        mem, comp = PAPER_TABLE1.get(key, ("?", "?"))
        rows.append((label, mem, f(fit["state_bytes"]), f(fit["step_bytes"]), comp, f(fit["median_step_s"]),
                     f(fit["overhead_s"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = (f"Layer: Linear(d,d)-Tanh-Linear(d,d), so prod_i d_i = d^2 and sum_i d_i^2 = 2 d^2 (their exponents "
            f"coincide in d); d in {result['dims']}, b in {result['batches']}; {result['steps']} timed steps; "
            f"{result['threads']} torch threads; {result['machine']}; {result['date']}.")
    return "\n".join(lines) + "\n" + note


def _ints(value: str, option: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers, got {value!r}") from None


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add ``locoprop reproduce`` (see the module docstring and docs/tuning.md)."""
    p = subparsers.add_parser(
        "reproduce", help="run and draw a figure of the paper (configs/figures/), or measure Table 1",
        description="FIGURE is a file name of configs/figures/ without .yaml (e.g. fig4-standard), a path to "
                    "such a file, or table1.")
    p.add_argument("figure", nargs="?", help="figure name, e.g. fig4-standard; or table1")
    p.add_argument("--list", action="store_true", help="list the figures and exit")
    p.add_argument("--out", default="runs/figures", help="folder of runs and figures (default: runs/figures)")
    p.add_argument("--figures-dir", default=None, help="folder of figure files (default: configs/figures)")
    p.add_argument("--settings-dir", action="append", default=None,
                   help="take a run's tuned values from DIR/best-OPTIMIZER.yaml when it matches the run "
                        "(e.g. results/tuning); repeat it to search several folders, first match wins")
    g = p.add_argument_group("overrides (a quick, smaller version; runs go to a folder named after them)")
    g.add_argument("--epochs", type=int, default=None, help="epochs (the warm-up keeps its share)")
    g.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    g.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    g.add_argument("--device", default=None, help="cpu, cuda or auto")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other setting")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("table1")
    g.add_argument("--dims", default="128,256,512", help="layer widths d (default 128,256,512)")
    g.add_argument("--batches", default="100,400", help="batch sizes b (default 100,400)")
    g.add_argument("--local-steps", default="1,5,10", help="LocoProp's T values (default 1,5,10)")
    g.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default 5)")
    p.set_defaults(func=main_reproduce)


def main_reproduce(args: argparse.Namespace) -> int:
    from .tune import _parse_assignments

    folder = figures_dir(args.figures_dir)
    if args.list:
        for name in list_figures(folder):
            spec = load_yaml(folder / f"{name}.yaml")
            print(f"{name:16s} {spec.get('figure', '')}")
        print(f"{'table1':16s} Table 1: optimizer memory and step time against width d and batch b")
        return 0
    if not args.figure:
        raise ValueError("reproduce: give FIGURE (see --list)")
    if args.figure == "table1":
        result = measure_table1(_ints(args.dims, "--dims"), _ints(args.batches, "--batches"),
                                local_steps=_ints(args.local_steps, "--local-steps"), steps=args.steps)
        result["command"] = (f"locoprop reproduce table1 --dims {args.dims} --batches {args.batches} "
                             f"--local-steps {args.local_steps} --steps {args.steps} --out {args.out}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = table1_text(result)
        (out / "table1.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "table1.txt").write_text(text + "\n")
        print(text)
        print(f"measurements: {out / 'table1.json'}")
        return 0
    overrides = _parse_assignments(args.set, "--set")
    for key in ("epochs", "limit_train", "limit_test", "device"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    reproduce_figure(args.figure, out=args.out, overrides=overrides, settings_dir=args.settings_dir, folder=folder,
                     progress=not args.no_progress)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["reproduce", *sys.argv[1:]]))
