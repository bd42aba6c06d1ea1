"""The paper's two views of a comparison (Figs. 3-8): loss against epochs and against wall-clock time.

Drawn with matplotlib (the Agg backend, so it works without a display).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .train import CONFIG, TrainConfig, read_metrics

__all__ = ["load_run", "plot_runs", "run_label", "legend_labels", "summary_table"]


def load_run(run_dir: str | Path) -> dict:
    """A run's config, epoch records and events."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: missing; {run_dir} is not a run folder made by `locoprop train`")
    config = json.loads(cfg_path.read_text())
    records, events = read_metrics(run_dir)
    return {"dir": run_dir, "config": config, "records": records, "events": events}


def run_label(run: dict) -> str:
    """A run's label, recomputed from its settings (so older folders get today's labels)."""
    try:
        return TrainConfig.from_dict(run["config"]["settings"]).label()
    except (KeyError, TypeError, ValueError):  # not a harness run folder, or settings of another version
        return run["config"].get("label") or run["dir"].name


def legend_labels(runs: Sequence[dict], given: Sequence[str] | None = None) -> list[str]:
    """Each run's legend label: ``given`` (one per run) where it is given, else its settings, how it stopped if
    it did not finish, and, where the runs come from more than one device, its device (``cpu``,
    ``NVIDIA H200``)."""
    if given is not None:
        if len(given) != len(runs):
            raise ValueError(f"labels: expected one per run, {len(runs)}, got {len(given)}")
        return [str(label) for label in given]
    devices = [str(r["config"].get("device", "?")).split(" (")[0] for r in runs]
    labels = []
    for run, device in zip(runs, devices):
        label = run_label(run)
        if len(set(devices)) > 1:
            label += f", {device}"
        if run["events"]:
            label += f" [{run['events'][-1]['event']}]"
        labels.append(label)
    return labels


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, *, metric: str = "train_loss",
              title: str | None = None, views: Sequence[str] = ("epoch", "wall_time"),
              labels: Sequence[str] | None = None) -> Path:
    """Draw ``metric`` against each of ``views`` for every run; write ``out`` (PNG, PDF or SVG); ``labels``:
    the legend's, one per run (:func:`legend_labels`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("plot: no runs given")
    names = legend_labels(runs, labels)  # a wrong count of labels is an error before anything is drawn
    fig, axes = plt.subplots(1, len(views), figsize=(6.0 * len(views), 4.4), squeeze=False)
    xlabels = {"epoch": "epoch", "wall_time": "training wall-clock time (s)"}
    for ax, view in zip(axes[0], views):
        for run, label in zip(runs, names):
            recs = [r for r in run["records"] if r.get(metric) is not None]
            xs = [r[view] for r in recs]
            ys = [r[metric] for r in recs]
            if view == "wall_time":  # the initial point has zero time, which a log axis cannot show
                xs, ys = xs[1:], ys[1:]
            ax.plot(xs, ys, label=label, linewidth=1.6)
        ax.set_yscale("log")
        if view == "wall_time":
            ax.set_xscale("log")
        ax.set_xlabel(xlabels.get(view, view))
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    sources = sorted({r["config"].get("data_source", "?") for r in runs})
    devices = sorted({r["config"].get("device", "?") for r in runs})
    settings = runs[0]["config"].get("settings", {})
    head = title or (f"{settings.get('dataset', '?')} {settings.get('model', '?')} autoencoder, "
                     f"{settings.get('activation', '?')}, batch {settings.get('batch_size', '?')}")
    synthetic = any(r["config"].get("synthetic_data") for r in runs)
    sub = ("GENERATED CURVES-like data, not the original digs3pts_1.mat; " if synthetic else "") + \
        f"data: {'; '.join(sources)[:110]} | device: {'; '.join(devices)[:80]}"
    import textwrap

    width = 78 * len(views)  # characters that fit across the figure at this font size
    fig.suptitle("\n".join(textwrap.wrap(head, width) + textwrap.wrap(sub, width)), fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def summary_table(run_dirs: Sequence[str | Path]) -> str:
    """A plain-text table of the final losses of each run."""
    rows = [("run", "optimizer / settings", "epochs", "train loss", "test loss", "wall s", "status")]
    for d in run_dirs:
        run = load_run(d)
        last = run["records"][-1] if run["records"] else {}
        status = run["events"][-1]["event"] if run["events"] else "ok"
        rows.append((Path(d).name, run_label(run), str(last.get("epoch", 0)),
                     f"{last.get('train_loss', float('nan')):.4f}", f"{last.get('test_loss', float('nan')):.4f}",
                     f"{last.get('wall_time', 0.0):.1f}", status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
