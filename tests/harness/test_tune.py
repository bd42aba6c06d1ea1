"""`locoprop tune` (issue 4): search spaces of Tables 3-5, an Optuna study in a SQLite file that
continues across commands and workers, pruning, a killed worker, and the `--report` YAML."""

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from locoprop.harness.cli import build_parser
from locoprop.harness.cli import main as cli_main
from locoprop.harness.optimizers import LOCOPROP_VARIANTS, OPTIMIZER_NAMES
from locoprop.harness.train import TrainConfig, read_metrics
from locoprop.harness.tune import GAMMAS, main_tune, open_storage, search_space

REPO = Path(__file__).resolve().parents[2]
# A trial of the tiny autoencoder: 2 epochs (the schedule's last epoch has learning rate 0), 200 images.
TINY = ["--dataset", "mnist", "--model", "tiny", "--epochs", "2", "--limit-train", "200", "--limit-test", "100",
        "--batch-size", "50", "--device", "cpu"]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def _tune_cmd(*args):
    return [sys.executable, "-m", "locoprop", "tune", *args]


def _trials(db: Path, study: str):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{db}").get_trials(deepcopy=False)


def test_search_spaces_are_tables_3_to_5():
    def space(name):
        return {d.field: d for d in search_space(name)}

    assert set(space("sgd")) == {"lr"}
    assert set(space("momentum")) == set(space("nesterov")) == {"lr", "beta1"}
    assert set(space("adagrad")) == {"lr", "eps"}
    for name in ("adam", "rmsprop"):
        s = space(name)
        assert set(s) == {"lr", "beta1", "beta2", "eps"}
        assert (s["lr"].low, s["lr"].high, s["eps"].low, s["eps"].high) == (1e-7, 0.1, 1e-10, 1e-5)
        assert s["beta1"].one_minus and (s["beta1"].low, s["beta1"].high) == (1e-3, 0.1)
    for name in ("shampoo", "kfac"):  # Table 4
        s = space(name)
        assert (s["lr"].high, s["eps"].high) == (10.0, 0.1) and set(s) == {"lr", "beta1", "beta2", "eps"}
    for name in ("locoprop-m", "locoprop-s"):  # Table 5, inner TF-RMSProp
        s = space(name)
        assert s["activation_lr"].choices == GAMMAS == (10, 100, 500, 1000, 2000, 3000, 5000)
        assert set(s) == {"activation_lr", "lr", "beta1", "beta2", "eps"} and s["eps"].high == 1e-5
    for name in OPTIMIZER_NAMES:
        assert search_space(name), name
    closed = [n for n in LOCOPROP_VARIANTS if n.endswith("closed")]
    assert closed and all(set(space(n)) == {"activation_lr", "lr"} for n in closed)
    # 1 - beta is what is searched; the config gets beta
    assert space("adam")["beta1"].to_field(0.1) == pytest.approx(0.9)


def test_a_study_continues_in_the_same_sqlite_file(tmp_path):
    db, runs = tmp_path / "s.db", tmp_path / "runs"
    args = ["tune", *TINY, "--optimizer", "rmsprop", "--storage", str(db), "--study", "s", "--runs-dir", str(runs)]
    assert cli_main(args + ["--trials", "2"]) == 0
    first = _trials(db, "s")
    assert len(first) == 2 and all(t.state == TrialState.COMPLETE for t in first)
    # the second command names only the study: its settings come from the storage
    assert cli_main(["tune", "--storage", str(db), "--study", "s", "--runs-dir", str(runs), "--trials", "2"]) == 0
    second = _trials(db, "s")
    assert len(second) == 4 and [t.number for t in second] == [0, 1, 2, 3]
    assert len(optuna.get_all_study_summaries(f"sqlite:///{db}")) == 1
    for t in second:  # each trial is a run folder whose metrics are kept, and its settings are recorded
        settings = t.user_attrs["settings"]
        assert TrainConfig.from_dict(settings).optimizer == "rmsprop"
        assert settings["beta1"] == pytest.approx(1 - t.params["one_minus_beta1"])
        records, _ = read_metrics(t.user_attrs["run_dir"])
        assert records[-1]["epoch"] == 2 and records[-1]["train_loss"] == pytest.approx(t.value)
        assert [s for s, _ in sorted(t.intermediate_values.items())] == [1, 2]
    # other settings for an existing study are refused, naming them
    with pytest.raises(ValueError, match="epochs: study has 2, given 3"):
        main_tune(build_parser().parse_args(args + ["--trials", "1", "--epochs", "3"]))


def test_a_study_can_tune_the_notebooks_protocol(tmp_path):
    """``--schedule-epochs``: each trial trains ``--epochs`` of a longer schedule (the notebook's 99 of 100)."""
    db, runs = tmp_path / "s.db", tmp_path / "runs"
    args = ["tune", *TINY[:4], "--epochs", "2", "--schedule-epochs", "3", *TINY[6:], "--optimizer", "rmsprop",
            "--storage", str(db), "--study", "nb", "--runs-dir", str(runs)]
    assert cli_main(args + ["--trials", "1"]) == 0
    (trial,) = _trials(db, "nb")
    settings = trial.user_attrs["settings"]
    assert (settings["epochs"], settings["schedule_epochs"], settings["warmup_epochs"]) == (2, 3, 0)
    records, _ = read_metrics(trial.user_attrs["run_dir"])
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["lr"] == pytest.approx(settings["lr"] / 3) and trial.value == records[-1]["train_loss"]
    with pytest.raises(ValueError, match="schedule_epochs: study has 3, given 4"):
        main_tune(build_parser().parse_args(args[:7] + ["--schedule-epochs", "4"] + args[9:] + ["--trials", "1"]))


def test_a_nan_trial_is_pruned_and_the_study_goes_on(tmp_path):
    db = tmp_path / "s.db"
    # lr = 1e6 (outside Table 3, enqueued on purpose) makes the loss NaN or huge
    assert cli_main(["tune", *TINY, "--optimizer", "sgd", "--storage", str(db), "--study", "nan",
                     "--runs-dir", str(tmp_path / "runs"), "--trials", "3", "--enqueue", "lr=1e6"]) == 0
    trials = _trials(db, "nan")
    assert len(trials) == 3
    assert trials[0].params["eta"] == 1e6 and trials[0].state == TrialState.PRUNED
    assert trials[0].user_attrs["status"] in ("diverged", "early-exit") and trials[0].user_attrs["reason"]
    assert all(t.state == TrialState.COMPLETE and math.isfinite(t.value) for t in trials[1:])


def test_report_writes_a_yaml_that_train_accepts(tmp_path, capsys):
    db, out = tmp_path / "s.db", tmp_path / "best.yaml"
    # Optuna's GPSampler on Table 5's space (categorical gamma) after 2 random trials
    assert cli_main(["tune", *TINY, "--optimizer", "locoprop-m", "--set", "local_steps=2", "--storage", str(db),
                     "--runs-dir", str(tmp_path / "runs"), "--trials", "3", "--sampler", "gp",
                     "--startup-trials", "2", "--sampler-seed", "0"]) == 0
    capsys.readouterr()
    # the default study name, and --report alone (no trials run)
    assert cli_main(["tune", "--storage", str(db), "--study", "mnist-tiny-tanh-locoprop-m", "--report", str(out),
                     "--top", "2"]) == 0
    table = capsys.readouterr().out
    doc = yaml.safe_load(out.read_text())
    best = min((t for t in _trials(db, "mnist-tiny-tanh-locoprop-m") if t.state == TrialState.COMPLETE),
               key=lambda t: t.value)
    assert doc["tuning"]["best_trial"] == best.number and doc["tuning"]["final_train_loss"] == best.value
    assert doc["settings"]["local_steps"] == 2 and doc["settings"]["activation_lr"] in GAMMAS
    assert doc["tuning"]["sampler"] == "gp" and sum(doc["tuning"]["trials"].values()) == 3
    assert len(doc["tuning"]["top"]) == min(2, doc["tuning"]["trials"]["complete"])
    assert "final train loss" in table and "activation_lr" in table
    assert cli_main(["train", "--config", str(out), "--epochs", "2", "--out", str(tmp_path / "again"),
                     "--no-progress"]) == 0
    records, _ = read_metrics(tmp_path / "again")
    assert records[-1]["train_loss"] == pytest.approx(best.value)  # the same run, trained again


def test_bad_input_names_the_option(tmp_path):
    db = str(tmp_path / "s.db")
    assert cli_main(["tune", "--storage", db]) == 2  # neither --trials nor --report
    assert cli_main(["tune", *TINY, "--optimizer", "rmsprop", "--storage", db, "--trials", "1",
                     "--set", "lr=0.1"]) == 2
    assert cli_main(["tune", *TINY, "--optimizer", "nope", "--storage", db, "--trials", "1"]) == 2
    assert cli_main(["tune", "--storage", db, "--study", "missing", "--report", str(tmp_path / "r.yaml")]) == 2
    with pytest.raises(ValueError, match="--storage"):
        open_storage("notadb://x")


def test_two_workers_share_one_study(tmp_path):
    db = tmp_path / "s.db"
    args = _tune_cmd(*TINY, "--optimizer", "adam", "--storage", str(db), "--study", "two", "--runs-dir",
                     str(tmp_path / "runs"), "--trials", "2")
    procs = [subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = _trials(db, "two")
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4


def test_a_killed_worker_leaves_its_trial_failed_and_a_rerun_continues(tmp_path):
    db, study = tmp_path / "s.db", "killed"
    base = ["--storage", str(db), "--study", study, "--runs-dir", str(tmp_path / "runs"),
            "--heartbeat-interval", "1", "--grace-period", "2"]
    long = ["--dataset", "mnist", "--model", "tiny", "--epochs", "20", "--limit-train", "100", "--limit-test", "50",
            "--batch-size", "50", "--device", "cpu", "--optimizer", "rmsprop", "--set", "early_exit=false"]
    proc = subprocess.Popen(_tune_cmd(*long, *base, "--trials", "1"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "runs" / "trial-00000" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = _trials(db, study)
    assert [t.state for t in killed] == [TrialState.RUNNING], "the worker was not killed mid-trial"
    done_before = len(metrics.read_text().splitlines()) - 1
    assert 2 <= done_before < 20
    time.sleep(3)  # past the grace period
    subprocess.run(_tune_cmd(*base, "--trials", "1"), env=_env(), check=True, capture_output=True, timeout=120)
    trials = _trials(db, study)
    assert trials[0].state == TrialState.FAIL
    retry = trials[1]  # the retry (same parameters) resumed the killed trial's run folder
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert retry.user_attrs["run_dir"] == trials[0].user_attrs["run_dir"] and retry.user_attrs["resumed"]
    records, _ = read_metrics(retry.user_attrs["run_dir"])
    assert [r["epoch"] for r in records] == list(range(21))
    assert len(trials) == 2


def test_a_population_runs_a_studys_trials_together(tmp_path):
    db, runs = tmp_path / "s.db", tmp_path / "runs"
    args = ["tune", *TINY, "--optimizer", "rmsprop", "--storage", str(db), "--study", "p", "--runs-dir", str(runs),
            "--population", "3", "--enqueue", "lr=1e6"]  # far outside Table 3: the member diverges or exits
    assert cli_main(args + ["--trials", "5"]) == 0
    trials = _trials(db, "p")
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert [t.user_attrs["population"] for t in trials] == [3, 3, 3, 2, 2]
    assert trials[0].state == TrialState.PRUNED and trials[0].user_attrs["status"] in ("diverged", "early-exit")
    done = [t for t in trials[1:]]
    assert all(t.state == TrialState.COMPLETE and math.isfinite(t.value) for t in done)
    for t in done:  # the same records and values as the one-at-a-time path: a run folder per trial
        records, _ = read_metrics(t.user_attrs["run_dir"])
        assert records[-1]["epoch"] == 2 and records[-1]["train_loss"] == pytest.approx(t.value)
        assert [s for s, _ in sorted(t.intermediate_values.items())] == [1, 2]
    # a member's value is what a separate run of its settings gives
    from locoprop.harness.train import train

    alone = train(TrainConfig.from_dict(done[0].user_attrs["settings"]), tmp_path / "alone", progress=False,
                  log=lambda s: None)
    assert alone.final_train_loss == pytest.approx(done[0].value, rel=1e-4)
    # --max-trials counts finished trials: one more group of 2 reaches 7
    assert cli_main(["tune", "--storage", str(db), "--study", "p", "--runs-dir", str(runs), "--population", "4",
                     "--max-trials", "7"]) == 0
    assert len(_trials(db, "p")) == 7


def test_population_input_errors_name_the_option(tmp_path):
    db = tmp_path / "s.db"
    base = ["tune", *TINY, "--storage", str(db), "--runs-dir", str(tmp_path / "runs"), "--trials", "2"]
    with pytest.raises(ValueError, match="--population: expected an integer >= 1, got 0"):
        main_tune(build_parser().parse_args(base + ["--optimizer", "rmsprop", "--population", "0"]))
    with pytest.raises(ValueError, match=r"--population: trains \['locoprop-s', .*'adagrad'\] only, not 'kfac'"):
        main_tune(build_parser().parse_args(base + ["--optimizer", "kfac", "--study", "k", "--population", "2"]))
    assert not (tmp_path / "runs").exists()


def test_a_killed_population_leaves_its_trials_failed_and_a_rerun_retries_them(tmp_path):
    """The population's heartbeats: a killed population's trials go stale, the next worker fails them and
    Optuna's retries run them again, from the start (a population keeps no checkpoint)."""
    db, study = tmp_path / "s.db", "killed-pop"
    base = ["--storage", str(db), "--study", study, "--runs-dir", str(tmp_path / "runs"),
            "--heartbeat-interval", "1", "--grace-period", "2"]
    long = ["--dataset", "mnist", "--model", "tiny", "--epochs", "20", "--limit-train", "1000", "--limit-test", "50",
            "--batch-size", "50", "--device", "cpu", "--optimizer", "rmsprop", "--set", "early_exit=false"]
    proc = subprocess.Popen(_tune_cmd(*long, *base, "--trials", "2", "--population", "2"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "runs" / "trial-00001" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    with sqlite3.connect(db) as con:  # Optuna's heartbeat table: one row for each trial of the population
        beating = sorted(row[0] for row in con.execute("SELECT trial_id FROM trial_heartbeats"))
    assert [t.state for t in _trials(db, study)] == [TrialState.RUNNING] * 2, "not killed mid-population"
    assert beating == sorted(t._trial_id for t in _trials(db, study))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # past the grace period
    subprocess.run(_tune_cmd(*base, "--trials", "2", "--population", "2"), env=_env(), check=True,
                   capture_output=True, timeout=120)
    trials = _trials(db, study)
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    for killed, retry in zip(trials[:2], trials[2:]):
        assert retry.params == killed.params and retry.user_attrs["run_dir"] == killed.user_attrs["run_dir"]
        records, _ = read_metrics(retry.user_attrs["run_dir"])
        assert [r["epoch"] for r in records] == list(range(21))  # started over, one record per epoch
        assert records[-1]["train_loss"] == pytest.approx(retry.value)


def test_a_population_that_does_not_fit_stops_the_worker_with_a_clear_error(tmp_path, monkeypatch):
    """Out of device memory, every later group of the same size would fail too: its trials fail and the
    worker stops, naming --population (simulated: train_population raises torch's OutOfMemoryError)."""
    import torch

    import locoprop.harness.population as population

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(population, "train_population", out_of_memory)
    db = tmp_path / "s.db"
    args = ["tune", *TINY, "--optimizer", "rmsprop", "--storage", str(db), "--study", "oom", "--runs-dir",
            str(tmp_path / "runs"), "--population", "4", "--trials", "8"]
    with pytest.raises(ValueError, match=r"--population 4: 4 members do not fit in the device's memory \(CUDA out "
                                         r"of memory. Tried to allocate 20.00 GiB\); use a smaller --population"):
        main_tune(build_parser().parse_args(args))
    assert [t.state for t in _trials(db, "oom")] == [TrialState.FAIL] * 4
