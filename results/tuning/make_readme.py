"""Write a tuning folder's README.md from its study database, report files, run.log and notes.md (no typed
numbers; notes.md is prose).

    .venv/bin/python results/tuning/make_readme.py [FOLDER]     # default: results/tuning
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import optuna
import yaml

OPTIMIZERS = ("rmsprop", "adam", "sgd", "momentum", "nesterov", "adagrad", "locoprop-m", "locoprop-s", "shampoo", "kfac")


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(folder: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    HERE = folder.resolve()
    DB, = HERE.glob("*.db")
    rel = HERE.relative_to(HERE.parents[1])  # results/NAME
    storage = f"sqlite:///{DB}"
    log = (HERE / "run.log").read_text() if (HERE / "run.log").exists() else ""
    commands = re.findall(r"start (\S+): (locoprop tune .*)", log)
    rows, details = [], []
    # one row per study: its report file names it (best-NAME.yaml); studies without a report follow
    reports = {}
    for report in sorted(HERE.glob("best-*.yaml")):
        reports[yaml.safe_load(report.read_text())["tuning"]["study"]] = report
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    order = {f"mnist-standard-tanh-{o}": i for i, o in enumerate(OPTIMIZERS)}
    names.sort(key=lambda n: (order.get(n, len(order)), n))
    any_settings = {}
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        s = study.user_attrs["settings"]
        any_settings = any_settings or s
        opt = s["optimizer"]
        states = {}
        for t in study.trials:
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
        fixed = {k: s[k] for k in ("inverse_every", "kl_clip") if opt in ("shampoo", "kfac") and s.get(k) is not None}
        report = reports.get(name)
        if report is None:
            rows.append(f"| {opt} (`{name}`) | no report | | | {', '.join(f'{k} {v}' for k, v in states.items())} "
                        f"| {s['epochs']} | |")
            continue
        doc = yaml.safe_load(report.read_text())
        tun = doc["tuning"]
        best = doc["settings"]
        label = opt if report.name == f"best-{opt}.yaml" else f"{opt} (`{name}`)"
        rows.append(f"| {label} | {tun['final_train_loss']:.4f} | {tun['final_test_loss']:.4f} | "
                    f"trial {tun['best_trial']} | {', '.join(f'{k} {v}' for k, v in states.items())} | "
                    f"{s['epochs']} | [{report.name}]({report.name}) |")
        space = study.user_attrs.get("search_space", [])
        keys = [k for k in ("lr", "beta1", "beta2", "eps", "activation_lr")
                if any(d.startswith((f"{k} in", f"1 - {k} in")) for d in space)]
        tuned = ", ".join(f"{k}={best[k]:.4g}" for k in keys)
        details.append(f"- **{opt}** (`{name}`): best {tuned}" + (f"; fixed {fixed}" if fixed else "")
                       + f"; searched: {'; '.join(space)}. "
                       f"Trials ran {tun['first_trial_start']} to {tun['last_trial_end']} (UTC).")
    machine = f"{cpu()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, shared with other jobs"
    try:
        torch_v = subprocess.run([str(HERE.parents[1] / ".venv/bin/python"), "-c", "import torch;print(torch.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        torch_v = "?"
    dates = sorted(re.findall(r"^(\S+) (?:start|done) ", log, flags=re.M))
    size = DB.stat().st_size if DB.exists() else 0
    notes = (HERE / "notes.md").read_text() if (HERE / "notes.md").exists() else ""
    title = notes.splitlines()[0].lstrip("# ") if notes.startswith("# ") else "CPU tuning studies"
    notes = "\n".join(notes.splitlines()[1:]).strip() + "\n" if notes.startswith("# ") else notes

    def images(n, kind):
        return f"all {kind} images" if n is None else f"the first {n} {kind} images"

    text = f"""# {title}: standard MNIST autoencoder, tanh

Written by `make_readme.py` from `{DB.name}` (Optuna storage, {size / 1e6:.2f} MB), the report
files `best-<optimizer>.yaml` and `run.log`. Nothing here is typed by hand.

**Scale.** Each study ran {any_settings.get('epochs')} epochs per trial on
{images(any_settings.get('limit_train'), 'MNIST training')} (test loss on
{images(any_settings.get('limit_test'), 'test')}), batch {any_settings.get('batch_size')}, warm-up
{any_settings.get('warmup_epochs')} epochs, with the trial counts below (the first trials of each study
are random: `--startup-trials`). The paper's protocol (App. F) is up to 4096 trials of 100 epochs on
all 60000 images on V100 GPUs; these studies are far below it. The schedule's last epoch trains at
learning rate 0 (the notebook's linear decay ends there), so each trial has
{max(0, (any_settings.get('epochs') or 1) - 1)} epochs of effective training. The best settings here
suit this short budget, not the paper's 100 epochs: use them for CPU-sized runs, and rerun
`locoprop tune` with `--epochs 100` and thousands of trials for the paper's.

- Machine: {machine}; torch {torch_v}, one thread per study (`OMP_NUM_THREADS=1`), two studies at a time.
- Date (UTC): {dates[0] if dates else '?'} to {dates[-1] if dates else '?'} (from `run.log`).
- Script: `bash {rel}/run.sh` (writes `run.log`, `log-<optimizer>.txt`, the reports, this file).

## Best final train loss per optimizer

| optimizer | best final train loss | its test loss | trial | trials | epochs | settings |
| --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows) + """

""" + "\n".join(details) + """

## Notes

""" + notes + """
## Commands

""" + "\n".join(f"- `{c}`" for _, c in commands) + f"""
- then, for each: `locoprop tune --storage {rel}/{DB.name} --study mnist-standard-tanh-OPTIMIZER --report {rel}/best-OPTIMIZER.yaml --top 5`

Train a best setting: `locoprop train --config {rel}/best-OPTIMIZER.yaml --out runs/NAME`.
Use them in figures: `locoprop reproduce fig4-standard --settings-dir {rel}` (only where
dataset, model, activation and batch size match).
"""
    (HERE / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
