"""Write results/tuning/README.md from the study database, the report files and run.log (no typed numbers).

    .venv/bin/python results/tuning/make_readme.py
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import optuna
import yaml

HERE = Path(__file__).resolve().parent
DB = HERE / "standard-mnist-tanh-cpu.db"
OPTIMIZERS = ("rmsprop", "adam", "sgd", "momentum", "nesterov", "adagrad", "locoprop-m", "locoprop-s", "shampoo", "kfac")


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{DB}"
    log = (HERE / "run.log").read_text() if (HERE / "run.log").exists() else ""
    commands = re.findall(r"start (\S+): (locoprop tune .*)", log)
    rows, details = [], []
    for opt in OPTIMIZERS:
        report = HERE / f"best-{opt}.yaml"
        try:
            study = optuna.load_study(study_name=f"mnist-standard-tanh-{opt}", storage=storage)
        except KeyError:
            rows.append(f"| {opt} | not run | | | | | |")
            continue
        s = study.user_attrs["settings"]
        states = {}
        for t in study.trials:
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
        fixed = {k: s[k] for k in ("inverse_every",) if opt in ("shampoo", "kfac")}
        if report.exists():
            doc = yaml.safe_load(report.read_text())
            tun = doc["tuning"]
            best = doc["settings"]
            rows.append(f"| {opt} | {tun['final_train_loss']:.4f} | {tun['final_test_loss']:.4f} | "
                        f"trial {tun['best_trial']} | {', '.join(f'{k} {v}' for k, v in states.items())} | "
                        f"{s['epochs']} | [best-{opt}.yaml](best-{opt}.yaml) |")
            space = study.user_attrs.get("search_space", [])
            keys = [k for k in ("lr", "beta1", "beta2", "eps", "activation_lr")
                    if any(d.startswith((f"{k} in", f"1 - {k} in")) for d in space)]
            tuned = ", ".join(f"{k}={best[k]:.4g}" for k in keys)
            details.append(f"- **{opt}**: best {tuned}" + (f"; fixed {fixed}" if fixed else "")
                           + f"; searched: {'; '.join(study.user_attrs.get('search_space', []))}. "
                           f"Trials ran {tun['first_trial_start']} to {tun['last_trial_end']} (UTC).")
        else:
            rows.append(f"| {opt} | no completed trial | | | {states} | {s['epochs']} | |")
    any_settings = next((optuna.load_study(study_name=f"mnist-standard-tanh-{o}", storage=storage).user_attrs["settings"]
                         for o in OPTIMIZERS if (HERE / f"best-{o}.yaml").exists()), {})
    machine = f"{cpu()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, shared with other jobs"
    try:
        torch_v = subprocess.run([str(HERE.parents[1] / ".venv/bin/python"), "-c", "import torch;print(torch.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        torch_v = "?"
    dates = sorted(re.findall(r"^(\S+) (?:start|done) ", log, flags=re.M))
    size = DB.stat().st_size if DB.exists() else 0
    text = f"""# Small CPU tuning studies: standard MNIST autoencoder, tanh

Written by `make_readme.py` from `{DB.name}` (Optuna storage, {size / 1e6:.2f} MB), the report
files `best-<optimizer>.yaml` and `run.log`. Nothing here is typed by hand.

**Scale.** Each study ran {any_settings.get('epochs')} epochs per trial on the first
{any_settings.get('limit_train')} MNIST training images (test loss on the first
{any_settings.get('limit_test')} test images), batch {any_settings.get('batch_size')}, warm-up
{any_settings.get('warmup_epochs')} epochs, with the trial counts below (the first trials of each study
are random: `--startup-trials`). The paper's protocol (App. F) is up to 4096 trials of 100 epochs on
all 60000 images on V100 GPUs; these studies are far below it. The schedule's last epoch trains at
learning rate 0 (the notebook's linear decay ends there), so each trial has
{max(0, (any_settings.get('epochs') or 1) - 1)} epochs of effective training. The best settings here
suit this short budget, not the paper's 100 epochs: use them for CPU-sized runs, and rerun
`locoprop tune` with `--epochs 100` and thousands of trials for the paper's.

- Machine: {machine}; torch {torch_v}, one thread per study (`OMP_NUM_THREADS=1`), two studies at a time.
- Date (UTC): {dates[0] if dates else '?'} to {dates[-1] if dates else '?'} (from `run.log`).
- Script: `bash results/tuning/run.sh` (writes `run.log`, `log-<optimizer>.txt`, the reports, this file).

## Best final train loss per optimizer

| optimizer | best final train loss | its test loss | trial | trials | epochs | settings |
| --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows) + """

""" + "\n".join(details) + """

## Notes

- Shampoo recomputed its inverse roots every 5 steps (`--set inverse_every=5`, shown as "fixed"
  above), because a root every step cost about 5 s per step on this CPU. The other studies use the
  paper's settings (K-FAC's inverse every step, LocoProp T = 10, inner TF-RMSProp).
- The machine was shared with other jobs (load average well above 2), so the wall times recorded in
  the trials are not comparable between optimizers.
- The shampoo, locoprop-m and locoprop-s studies started before two changes to `locoprop tune`:
  reporting to Optuna the train loss of the epoch at which a trial exits early (before, such a
  pruned trial reported only its earlier epochs), and the default run folder
  (`runs/tune/STUDY/` then, `runs/tune/STORAGE/STUDY/` now; `run_dir` in each trial records it).
  The kfac, rmsprop and adam studies ran with both changes.

## Commands

""" + "\n".join(f"- `{c}`" for _, c in commands) + """
- then, for each: `locoprop tune --storage results/tuning/standard-mnist-tanh-cpu.db --study mnist-standard-tanh-OPTIMIZER --report results/tuning/best-OPTIMIZER.yaml --top 5`

Train a best setting: `locoprop train --config results/tuning/best-rmsprop.yaml --out runs/NAME`.
Use them in figures: `locoprop reproduce fig4-standard --settings-dir results/tuning` (only where
dataset, model, activation and batch size match).
"""
    (HERE / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
