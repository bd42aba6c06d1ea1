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


def this_cpu(here: Path) -> str:
    """This machine, for studies run here (a folder's ``machine.txt`` describes any other)."""
    try:
        torch_v = subprocess.run([str(here.parents[1] / ".venv/bin/python"), "-c", "import torch;print(torch.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        torch_v = "?"
    return (f"{cpu()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, shared with other jobs; "
            f"torch {torch_v}, one thread per study (`OMP_NUM_THREADS=1`), two studies at a time")


def main(folder: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    HERE = folder.resolve()
    dbs = sorted(HERE.glob("*.db"))
    rel = HERE.relative_to(HERE.parents[1])  # results/NAME
    log = "".join((HERE / f).read_text() for f in ("run.log", "session.log") if (HERE / f).exists())
    # "start OPT: locoprop tune ...", "start: locoprop tune ..." or "start: N workers x locoprop tune ..."
    commands = re.findall(r"start(?: \S+)?: (?:\d+ workers x )?(locoprop tune .*)", log)
    commands += [c.split("  (")[0] for c in re.findall(r"\$ \S*python3? -m (locoprop tune .*--epochs.*)", log)]
    commands = list(dict.fromkeys(commands))  # parallel workers of one study run the same command
    rows, details = [], []
    # one row per study: its report file names it (best-NAME.yaml); studies without a report follow
    reports = {}
    for report in sorted(HERE.glob("best-*.yaml")):
        reports[yaml.safe_load(report.read_text())["tuning"]["study"]] = report
    names = [(s.study_name, f"sqlite:///{db}") for db in dbs
             for s in optuna.get_all_study_summaries(f"sqlite:///{db}")]
    order = {f"mnist-standard-tanh-{o}": i for i, o in enumerate(OPTIMIZERS)}
    names.sort(key=lambda n: (order.get(n[0], len(order)), n))
    any_settings, times, report_commands = {}, [], []
    for name, storage in names:
        study = optuna.load_study(study_name=name, storage=storage)
        times += [t for tr in study.trials for t in (tr.datetime_start, tr.datetime_complete) if t is not None]
        s = study.user_attrs["settings"]
        any_settings = any_settings or s
        opt = s["optimizer"]
        states = {}
        for t in study.trials:
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
        fixed = {k: s[k] for k in ("inverse_every", "kl_clip", "shampoo_root")
                 if opt in ("shampoo", "kfac") and s.get(k) is not None and not (k == "shampoo_root" and opt != "shampoo")}
        report = reports.get(name)
        if report is not None:
            report_commands.append(f"locoprop tune --storage {rel}/{Path(storage).name} --study {name} "
                                   f"--report {rel}/{report.name} --top 5")
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
    machine = (HERE / "machine.txt").read_text().strip() if (HERE / "machine.txt").exists() else this_cpu(HERE)
    span = f"{min(times):%Y-%m-%dT%H:%M:%S} to {max(times):%Y-%m-%dT%H:%M:%S}" if times else "?"
    size = ", ".join(f"`{db.name}` ({db.stat().st_size / 1e6:.2f} MB)" for db in dbs)
    notes = (HERE / "notes.md").read_text() if (HERE / "notes.md").exists() else ""
    title = notes.splitlines()[0].lstrip("# ") if notes.startswith("# ") else "CPU tuning studies"
    notes = "\n".join(notes.splitlines()[1:]).strip() + "\n" if notes.startswith("# ") else notes

    def images(n, kind):
        return f"all {kind} images" if n is None else f"the first {n} {kind} images"

    text = f"""# {title}: standard MNIST autoencoder, tanh

Written by `make_readme.py` from the Optuna storage {size}, the report
files `best-<optimizer>.yaml` and the log. Nothing here is typed by hand.

**Scale.** Each study ran {any_settings.get('epochs')} epochs per trial on
{images(any_settings.get('limit_train'), 'MNIST training')} (test loss on
{images(any_settings.get('limit_test'), 'test')}), batch {any_settings.get('batch_size')}, warm-up
{any_settings.get('warmup_epochs')} epochs, with the trial counts below (the first trials of each study
are random: `--startup-trials`). The paper's protocol (App. F) is up to 4096 trials of 100 epochs on
all 60000 images on V100 GPUs; these studies are far below it. The schedule's last epoch trains at
learning rate 0 (the notebook's linear decay ends there), so each trial has
{max(0, (any_settings.get('epochs') or 1) - 1)} epochs of effective training. """ + (
        "Each trial has the paper's length; only the number of trials is far below the paper's, so rerun "
        "`locoprop tune` on these databases with more workers to go on."
        if (any_settings.get("epochs") or 0) >= 100 else
        "The best settings here suit this short budget, not the paper's 100 epochs: use them for CPU-sized "
        "runs, and rerun\n`locoprop tune` with `--epochs 100` and thousands of trials for the paper's.") + f"""

- Machine: {machine}.
- Trials ran (UTC): {span} (from the studies).
""" + (f"- Script: `bash {rel}/run.sh` (writes `run.log`, `log-<optimizer>.txt`, the reports, this file).\n"
       if (HERE / "run.sh").exists() else "") + f"""
## Best final train loss per optimizer

| optimizer | best final train loss | its test loss | trial | trials | epochs | settings |
| --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows) + """

""" + "\n".join(details) + """

## Notes

""" + notes + """
## Commands

""" + "\n".join(f"- `{c}`" for c in commands) + "\n- then the reports:\n" + "\n".join(
        f"  - `{c}`" for c in report_commands) + f"""

Train a best setting: `locoprop train --config {rel}/best-OPTIMIZER.yaml --out runs/NAME`.
Use them in figures: `locoprop reproduce fig4-standard --settings-dir {rel}` (only where
dataset, model, activation and batch size match).
"""
    (HERE / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
