"""``locoprop tune``: Bayesian hyper-parameter search with Optuna (paper App. F and Tables 3-5).

The paper tunes every optimizer with "a Bayesian optimization package" on
the training loss, up to 4096 trials for the standard autoencoder and 512
for the deep and wide ones (App. F), and its notebook abandons a trial
whose loss is NaN, above 1000, whose best is above 600, or still above 350
after epoch 10 (reference notes, "Tuning protocol").  This module does the
same with Optuna:

* **Search spaces** (:func:`search_space`): Table 3 for the first-order
  methods (dropping what does not apply), Table 4 for Shampoo and K-FAC,
  Table 5 for the LocoProp variants (inner optimizer TF-RMSProp).  ``β1``
  and ``β2`` are searched as ``1 - β`` on a log scale, as in the tables.
* **Objective**: the final train loss of a :func:`~locoprop.harness.train.train`
  run (minimised).  Each trial is a run folder ``<runs-dir>/trial-NNNNN``, so
  its metrics and checkpoint are kept.
* **Pruning**: every epoch's train loss is reported to Optuna.  A run that
  :func:`train` stops under the notebook's rules (``early-exit``) or that
  diverges is recorded and then raised as :class:`optuna.TrialPruned`;
  ``--pruner median`` adds Optuna's :class:`~optuna.pruners.MedianPruner`.
  A pruned or failed trial never stops the study.
* **Storage**: :class:`optuna.storages.RDBStorage` (a SQLite file by
  default, any SQLAlchemy URL such as PostgreSQL or MySQL for many machines)
  with a heartbeat.  A worker that is killed leaves its trial ``RUNNING``
  with a stale heartbeat; once the grace period has passed, the next trial
  that any worker starts marks it ``FAIL`` (Optuna's ``fail_stale_trials``)
  and :class:`optuna.storages.RetryHeartbeatStaleTrialCallback` queues a
  retry with the same parameters, which resumes the killed trial's run
  folder from its last checkpoint.
* **Populations** (``--population K``, :func:`run_population_study`): K
  trials asked at a time and trained together as one stacked model
  (:mod:`locoprop.harness.population`), each still its own run folder,
  pruning and result; on a GPU far cheaper than K runs one by one.
* **Sampler**: multivariate TPE by default, or Optuna's ``GPSampler``
  (see :func:`make_sampler` and docs/tuning.md for why).
* **Report** (``--report FILE``): the best trials as a table, and the best
  trial's settings as YAML under ``settings:``, which
  ``locoprop train --config FILE`` accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .optimizers import LOCOPROP_VARIANTS, OPTIMIZER_NAMES
from .train import CONFIG, TrainConfig, read_metrics, train

__all__ = ["Dimension", "search_space", "TUNED_FIELDS", "GAMMAS", "storage_url", "open_storage", "make_sampler",
           "open_study", "run_study", "run_population_study", "report", "register", "main_tune", "default_warmup"]

#: TrainConfig fields a study searches over (the others are fixed for the study).
TUNED_FIELDS = ("lr", "beta1", "beta2", "eps", "activation_lr")
#: Table 5: the values of LocoProp's activation step size γ.
GAMMAS = (10, 100, 500, 1000, 2000, 3000, 5000)
#: Settings that belong to a worker, not to the study (a GPU worker may join a CPU worker's study).
WORKER_FIELDS = ("device", "data_dir")
#: The command-line options that fix a study's settings (TrainConfig fields of the same name).
STUDY_OPTIONS = ("dataset", "model", "activation", "optimizer", "epochs", "batch_size", "limit_train", "limit_test",
                 "seed", "warmup_epochs", "schedule_epochs")


@dataclass(frozen=True)
class Dimension:
    """One searched hyper-parameter: a TrainConfig ``field`` under the Optuna parameter name ``param``.

    Continuous dimensions are log-uniform on ``[low, high]``; with
    ``one_minus`` the search runs over ``1 - value`` (the tables' ``1 - β``).
    Categorical dimensions list their ``choices`` (Table 5's γ).
    """

    field: str
    param: str
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    one_minus: bool = False
    source: str = ""

    def suggest(self, trial) -> float:
        if self.choices is not None:
            raw = trial.suggest_categorical(self.param, list(self.choices))
        else:
            raw = trial.suggest_float(self.param, self.low, self.high, log=True)
        return self.to_field(raw)

    def to_field(self, raw) -> float:
        return 1.0 - float(raw) if self.one_minus else float(raw)

    def to_param(self, value: float):
        raw = 1.0 - float(value) if self.one_minus else float(value)
        if self.choices is not None:
            for c in self.choices:
                if float(c) == raw:
                    return c
            return raw
        return raw

    def describe(self) -> str:
        name = f"1 - {self.field}" if self.one_minus else self.field
        if self.choices is not None:
            return f"{name} in {list(self.choices)} (categorical; {self.source})"
        return f"{name} in [{self.low:g}, {self.high:g}], log ({self.source})"


def _dims(source: str, eta_high: float, eps_high: float, which: str) -> list[Dimension]:
    table = {
        "lr": Dimension("lr", "eta", 1e-7, eta_high, source=source),
        "beta1": Dimension("beta1", "one_minus_beta1", 1e-3, 0.1, one_minus=True, source=source),
        "beta2": Dimension("beta2", "one_minus_beta2", 1e-3, 0.1, one_minus=True, source=source),
        "eps": Dimension("eps", "epsilon", 1e-10, eps_high, source=source),
    }
    return [table[k] for k in which.split()]


#: Table 3: which of (η, β1, β2, ε) apply to each first-order method ("dropped when not applicable").
_FIRST_ORDER_APPLIES = {
    "sgd": "lr",
    "momentum": "lr beta1",
    "nesterov": "lr beta1",
    "adagrad": "lr eps",
    "adam": "lr beta1 beta2 eps",
    "rmsprop": "lr beta1 beta2 eps",
    "tf_rmsprop": "lr beta1 beta2 eps",  # as a LocoProp inner optimizer
    "adamw": "lr beta1 beta2 eps",
}


def search_space(optimizer: str, inner: str = "tf_rmsprop") -> list[Dimension]:
    """The paper's search space for ``optimizer`` (App. F).

    * First-order methods: Table 3, η in [1e-7, 0.1], 1-β1 and 1-β2 in
      [1e-3, 0.1], ε in [1e-10, 1e-5], all log; only what applies: ``sgd``
      η; ``momentum``/``nesterov`` η, β1; ``adagrad`` η, ε; ``adam`` and
      ``rmsprop`` all four.
    * Shampoo and K-FAC: Table 4, η in [1e-7, 10], 1-β1, 1-β2 in
      [1e-3, 0.1], ε in [1e-10, 0.1] (ε is the damping / matrix epsilon).
    * LocoProp variants: Table 5, γ in {10, 100, 500, 1000, 2000, 3000,
      5000} (categorical), η in [1e-7, 0.1], 1-β1, 1-β2 in [1e-3, 0.1],
      ε in [1e-10, 1e-5] for the inner TF-RMSProp ("Base optimizer is
      RMSProp").  With another ``inner`` the Table 3 rule drops what does not
      apply; the closed-form variants have no inner optimizer (γ and η only).
    """
    if optimizer in LOCOPROP_VARIANTS:
        from locoprop.variants import get_variant

        gamma = Dimension("activation_lr", "gamma", choices=GAMMAS, source="Table 5")
        if get_variant(LOCOPROP_VARIANTS[optimizer]).solver == "closed_form":
            return [gamma] + _dims("Table 5", 0.1, 1e-5, "lr")
        if inner not in _FIRST_ORDER_APPLIES:
            raise ValueError(f"inner: no search space for the inner optimizer {inner!r}; "
                             f"valid: {sorted(_FIRST_ORDER_APPLIES)}")
        return [gamma] + _dims("Table 5", 0.1, 1e-5, _FIRST_ORDER_APPLIES[inner])
    if optimizer in ("shampoo", "kfac"):
        return _dims("Table 4", 10.0, 1e-1, "lr beta1 beta2 eps")
    if optimizer in _FIRST_ORDER_APPLIES:
        return _dims("Table 3", 0.1, 1e-5, _FIRST_ORDER_APPLIES[optimizer])
    raise ValueError(f"optimizer: unknown {optimizer!r}; valid: {list(OPTIMIZER_NAMES)}")


def _of_schedule(settings: dict) -> str:
    """`` of a 100-epoch schedule`` where the schedule spans more epochs than are trained, else ``""``."""
    spans = settings.get("schedule_epochs")
    return f" of a {spans}-epoch schedule" if spans and spans != settings["epochs"] else ""


def default_warmup(epochs: int) -> int:
    """Warm-up epochs at the paper's ratio: 5 of 100 epochs (Sec. 3), rounded (0 for short studies)."""
    return int(round(0.05 * epochs)) if epochs > 1 else 0


# ---------------------------------------------------------------------------------------------------
# Storage, sampler, study
# ---------------------------------------------------------------------------------------------------


def storage_url(value: str) -> str:
    """A SQLAlchemy URL as given (``postgresql://...``), or ``sqlite:///`` for a file path."""
    if not value:
        raise ValueError("--storage: empty; give a SQLite file path or a database URL")
    if "://" in value:
        return value
    path = Path(value).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _safe_url(url: str) -> str:
    """The URL without its password (for messages and reports)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # pragma: no cover - a URL SQLAlchemy cannot parse is reported by RDBStorage
        return url


def _storage_tag(url: str) -> str:
    """A folder name for the storage: the SQLite file's stem, else the database's name (default runs dirs)."""
    try:
        from sqlalchemy.engine import make_url

        u = make_url(url)
        name = Path(u.database).stem if u.drivername.startswith("sqlite") and u.database else \
            f"{u.host or 'local'}-{u.database or 'db'}"
    except Exception:
        name = "storage"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "storage"


def open_storage(url: str, *, heartbeat_interval: int = 60, grace_period: int | None = None,
                 max_retry: int | None = 1):
    """``optuna.storages.RDBStorage`` with a heartbeat and a retry of stale trials.

    A trial whose heartbeat is older than ``grace_period`` seconds (default
    ``2 * heartbeat_interval``) is failed by the next worker that starts a
    trial, and :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`
    re-queues its parameters (at most ``max_retry`` times; ``None``: always).
    SQLite waits up to 60 s for a lock instead of failing at once, and the
    first creation of the tables is retried (two workers may race on it).
    """
    import optuna
    from optuna.exceptions import ExperimentalWarning
    from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

    if heartbeat_interval < 1:
        raise ValueError(f"--heartbeat-interval: expected an integer >= 1, got {heartbeat_interval}")
    if grace_period is not None and grace_period <= heartbeat_interval:
        raise ValueError(f"--grace-period: must exceed --heartbeat-interval ({heartbeat_interval}), "
                         f"got {grace_period}")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # Optuna >= 4.9 renamed RetryFailedTrialCallback / failed_trial_callback (the old names are deprecated)
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    key = "heartbeat_stale_trial_callback"
    if retry_cls is None:  # pragma: no cover - older Optuna
        retry_cls, key = optuna.storages.RetryFailedTrialCallback, "failed_trial_callback"
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                retry = retry_cls(max_retry=max_retry, inherit_intermediate_values=True)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period, **{key: retry})
        except (OperationalError, IntegrityError) as exc:
            if attempt == 5:
                raise ValueError(f"--storage {_safe_url(url)}: cannot open the database ({exc})") from None
            time.sleep(0.3 * (attempt + 1))
        except ImportError as exc:
            raise ValueError(f"--storage {_safe_url(url)}: no database driver for this URL ({exc}); "
                             "install it (e.g. psycopg2 for PostgreSQL, PyMySQL for MySQL)") from None
        except ArgumentError as exc:
            raise ValueError(f"--storage {_safe_url(url)}: not a database URL SQLAlchemy knows ({exc})") from None
    raise AssertionError("unreachable")  # pragma: no cover


def make_sampler(name: str, seed: int | None = None, startup_trials: int = 10):
    """The Bayesian-optimisation sampler of a study.

    ``tpe`` (default): :class:`optuna.samplers.TPESampler` with
    ``multivariate=True`` (models the joint density of η, β1, β2, ε, which
    interact: the best η depends on ε and the momentum) and ``constant_liar``
    (parallel workers do not all sample around the same running point).  TPE
    handles Table 5's categorical γ natively, learns from pruned trials'
    intermediate losses, and costs little per trial, so it scales to the
    paper's thousands of trials.  ``gp``: :class:`optuna.samplers.GPSampler`,
    a Gaussian process with expected improvement, often better for budgets of
    tens of trials, but its cost grows with the cube of the trial count and
    it learns nothing from pruned trials.  Both sample at random for the
    first ``startup_trials`` trials.
    """
    import optuna
    from optuna.exceptions import ExperimentalWarning

    if startup_trials < 0:
        raise ValueError(f"--startup-trials: expected an integer >= 0, got {startup_trials}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=seed,
                                              n_startup_trials=startup_trials)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials)
    raise ValueError(f"--sampler: expected tpe or gp, got {name!r}")


def make_pruner(name: str):
    """``notebook``: only the notebook's rules (applied by :func:`train`); ``median``: also MedianPruner."""
    import optuna

    if name == "notebook":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    raise ValueError(f"--pruner: expected notebook or median, got {name!r}")


def _study_settings(given: dict, stored: dict | None, study_name: str) -> dict:
    """The study's fixed settings: the stored ones (checked against ``given``), or new ones from ``given``."""
    if stored is not None:
        differ = {k: (stored.get(k), v) for k, v in given.items() if stored.get(k) != v}
        if differ:
            what = ", ".join(f"{k}: study has {a!r}, given {b!r}" for k, (a, b) in sorted(differ.items()))
            raise ValueError(f"--study {study_name}: it was created with other settings ({what}); leave these "
                             "options out to continue it, or name another --study")
        return dict(stored)
    values = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    values.update(given)
    if "warmup_epochs" not in given:
        values["warmup_epochs"] = default_warmup(values.get("schedule_epochs") or values["epochs"])
    for name in TUNED_FIELDS + WORKER_FIELDS:
        values.pop(name, None)
    return values


def _check_settings(settings: dict) -> list[Dimension]:
    """Validate fixed settings as a TrainConfig (with a placeholder η) and return the search space."""
    cfg = TrainConfig.from_dict({**settings, "lr": 1e-3})
    cfg.validate()
    return search_space(cfg.optimizer, cfg.inner)


def open_study(storage, study_name: str, given: dict | None = None, *, sampler=None, pruner=None,
               create: bool = True):
    """Create or load (``load_if_exists``) a minimising study and its fixed settings.

    ``given`` holds the settings named on the command line; a new study
    stores them (with TrainConfig's defaults for the rest) in its user attrs
    ``settings``; an existing study must agree with them.  Returns
    ``(study, settings, space)``.
    """
    import optuna

    given = dict(given or {})
    try:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        if not create:
            names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
            raise ValueError(f"--study {study_name}: no such study in the storage; it holds {names}") from None
        settings = _study_settings(given, None, study_name)
        space = _check_settings(settings)
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="minimize", load_if_exists=True)
        if "settings" not in study.user_attrs:
            study.set_user_attr("settings", settings)
            study.set_user_attr("search_space", [d.describe() for d in space])
            study.set_user_attr("objective", "final train loss (paper App. F), minimised")
            study.set_user_attr("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    stored = study.user_attrs.get("settings")
    deadline = time.monotonic() + 10.0
    while stored is None and time.monotonic() < deadline:  # another worker may be creating it right now
        time.sleep(0.2)
        stored = study.user_attrs.get("settings")
    if stored is None:
        raise ValueError(f"--study {study_name}: exists but was not made by `locoprop tune` (no 'settings' attr)")
    settings = _study_settings(given, stored, study_name)
    return study, settings, _check_settings(settings)


# ---------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------


def _run_dir_of(trial, runs_dir: Path) -> tuple[Path, bool]:
    """The trial's run folder, and whether it continues an earlier trial's.

    :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` copies a
    stale trial's user attrs into its retry, so a retry finds the killed
    trial's ``run_dir`` there and resumes it from its last checkpoint.
    """
    previous = trial.user_attrs.get("run_dir")
    if previous:
        return Path(previous), True
    return runs_dir / f"trial-{trial.number:05d}", False


def _start_trial(trial, settings: dict, worker: dict, space: Sequence[Dimension], runs_dir: Path,
                 sampler_name: str, log: Callable[[str], None]) -> tuple[TrainConfig, Path, bool]:
    """The trial's run settings (its sampled values over the study's), folder, and whether it is a retry."""
    run_dir, resumed = _run_dir_of(trial, runs_dir)
    values = {**settings, **worker}
    if resumed:  # resuming needs the killed trial's exact settings, its worker's device included
        previous = trial.user_attrs.get("settings") or {}
        values.update({k: previous[k] for k in WORKER_FIELDS if k in previous})
    for dim in space:
        values[dim.field] = dim.suggest(trial)
    cfg = TrainConfig.from_dict(values)
    trial.set_user_attr("settings", asdict(cfg))
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("host", platform.node())
    trial.set_user_attr("sampler", sampler_name)
    if resumed:
        trial.set_user_attr("resumed", True)
    tuned = "  ".join(f"{d.field}={values[d.field]:.4g}" for d in space)
    log(f"trial {trial.number}{f' (resumes {run_dir.name})' if resumed else ''}: {tuned}")
    return cfg, run_dir, resumed


def _report_epoch(trial, rec: dict) -> str | None:
    """Report an epoch's train loss to Optuna; the reason to stop when its pruner says so."""
    trial.report(float(rec["train_loss"]), int(rec["epoch"]))
    if trial.should_prune():
        return f"pruned by Optuna's {type(trial.study.pruner).__name__}"
    return None


def _finish_trial(trial, result, run_dir: Path, log: Callable[[str], None]) -> float:
    """Record a finished run on its trial; its final train loss, or :class:`optuna.TrialPruned` when it
    stopped early (pruned, the notebook's early exit, diverged) or has no finite loss."""
    import optuna

    records, _ = read_metrics(run_dir)
    info = json.loads((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).exists() else {}
    trial.set_user_attr("status", result.status)
    trial.set_user_attr("reason", result.reason)
    trial.set_user_attr("epochs_done", result.epochs_done)
    trial.set_user_attr("final_train_loss", result.final_train_loss)
    trial.set_user_attr("final_test_loss", result.final_test_loss)
    trial.set_user_attr("wall_time", records[-1]["wall_time"] if records else None)
    trial.set_user_attr("device", info.get("device"))
    trial.set_user_attr("data_source", info.get("data_source"))
    if "population" in info:
        trial.set_user_attr("population", info["population"]["size"])
    loss = result.final_train_loss
    log(f"trial {trial.number}: {result.status} after {result.epochs_done} epochs, train loss {loss}"
        + (f" ({result.reason})" if result.reason else ""))
    if result.status == "early-exit" and loss is not None and math.isfinite(loss):
        # train stops before on_epoch at an early exit; report that epoch's loss so the sampler sees it
        trial.report(float(loss), int(result.epochs_done))
    if result.status in ("early-exit", "diverged", "pruned"):
        raise optuna.TrialPruned(f"{result.status}: {result.reason}")
    if loss is None or not math.isfinite(loss):
        raise optuna.TrialPruned(f"no finite final train loss ({loss})")
    return float(loss)


def make_objective(settings: dict, worker: dict, space: Sequence[Dimension], runs_dir: Path, *,
                   sampler_name: str, progress: bool = False, log: Callable[[str], None] = print):
    """The objective: one :func:`train` run per trial; returns its final train loss (App. F)."""
    runs_dir = Path(runs_dir)

    def objective(trial) -> float:
        cfg, run_dir, resumed = _start_trial(trial, settings, worker, space, runs_dir, sampler_name, log)
        # a new trial never reuses a folder (it would hold another study's run); a retry resumes its own
        result = train(cfg, run_dir, resume=resumed, progress=progress, log=lambda s: None,
                       on_epoch=lambda rec: _report_epoch(trial, rec))
        return _finish_trial(trial, result, run_dir, log)

    return objective


def _enqueue(study, settings: dict, space: Sequence[Dimension], enqueue: Sequence[dict]) -> None:
    by_field = {d.field: d for d in space}
    for item in enqueue:
        unknown = sorted(set(item) - set(by_field))
        if unknown:
            raise ValueError(f"--enqueue: {unknown} not searched for {settings['optimizer']}; "
                             f"searched: {sorted(by_field)}")
        study.enqueue_trial({by_field[k].param: by_field[k].to_param(v) for k, v in item.items()})


def run_study(study, settings: dict, space: Sequence[Dimension], *, trials: int | None, runs_dir: Path,
              worker: dict | None = None, max_trials: int | None = None, sampler_name: str = "tpe",
              enqueue: Sequence[dict] = (), progress: bool = False, log: Callable[[str], None] = print) -> None:
    """Run ``trials`` trials of the study in this process (and stop early once ``max_trials`` are done).

    ``enqueue`` holds settings (TrainConfig names, e.g. ``{"lr": 1e-3}``) to
    try first, through :meth:`optuna.Study.enqueue_trial`.  Every exception
    inside a trial fails only that trial (``catch=(Exception,)``).
    """
    import optuna
    from optuna.trial import TrialState

    _enqueue(study, settings, space, enqueue)
    callbacks = []
    if max_trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(max_trials, states=(TrialState.COMPLETE,
                                                                            TrialState.PRUNED)))
    objective = make_objective(settings, dict(worker or {}), space, runs_dir, sampler_name=sampler_name,
                               progress=progress, log=log)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is out of range for distribution.*")
        study.optimize(objective, n_trials=trials, catch=(Exception,), callbacks=callbacks,
                       gc_after_trial=False, show_progress_bar=False)


def _heartbeat_interval(storage) -> int | None:
    """The storage's heartbeat interval in seconds; ``None`` where it keeps no heartbeats."""
    get = getattr(storage, "get_heartbeat_interval", None)
    return get() if get is not None and hasattr(storage, "record_heartbeat") else None


class _Heartbeats:
    """Record a heartbeat for each of ``trial_ids`` every ``storage.get_heartbeat_interval()`` seconds
    while in the ``with`` block (what Optuna's ``optimize`` does for its one trial), so that a killed
    population leaves stale trials that the next worker fails and retries."""

    def __init__(self, storage, trial_ids: Sequence[int]) -> None:
        import threading

        self.storage, self.trial_ids = storage, set(trial_ids)  # end(trial_id) takes one out
        self.interval = _heartbeat_interval(storage)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True) if self.interval else None

    def end(self, trial_id: int) -> None:
        self.trial_ids.discard(trial_id)

    def _beat(self) -> None:
        while True:
            for tid in tuple(self.trial_ids):
                self.storage.record_heartbeat(tid)
            if self.stop.wait(self.interval):
                return

    def __enter__(self):
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()


def run_population_study(study, settings: dict, space: Sequence[Dimension], *, population: int,
                         trials: int | None, runs_dir: Path, worker: dict | None = None,
                         max_trials: int | None = None, sampler_name: str = "tpe", enqueue: Sequence[dict] = (),
                         progress: bool = False, log: Callable[[str], None] = print) -> None:
    """:func:`run_study`, ``population`` trials at a time trained together in this process
    (:mod:`locoprop.harness.population`: on a GPU, many small trials cost far less together than one by one).

    Trials are asked from the study in groups (Optuna's ask-and-tell interface; the sampler proposes a
    group's members one after another, as for parallel workers), each member's epochs are reported to its
    trial (so the pruner can stop it; the others go on), and every trial ends as with :func:`run_study`, as
    soon as its member does: the same user attributes, ``COMPLETE`` with its final train loss or ``PRUNED``.
    A group that fails fails the trials it has not ended, and the study goes on.  A killed group's trials are retried like a killed worker's, but start over
    (a population keeps no checkpoint).  ``trials=None`` runs until ``max_trials`` are finished.
    """
    import optuna
    import torch
    from optuna.trial import TrialState

    from .population import POPULATION_OPTIMIZERS, check_population_config, shared_settings, train_population

    if not isinstance(population, int) or population < 1:
        raise ValueError(f"--population: expected an integer >= 1, got {population!r}")
    if trials is None and max_trials is None:
        raise ValueError("give trials or max_trials")
    if settings["optimizer"] not in POPULATION_OPTIMIZERS:
        raise ValueError(f"--population: trains {list(POPULATION_OPTIMIZERS)} only, not {settings['optimizer']!r}")
    runs_dir = Path(runs_dir)
    worker = dict(worker or {})
    _enqueue(study, settings, space, enqueue)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    started = 0
    while True:
        size = population if trials is None else min(population, trials - started)
        if max_trials is not None:
            size = min(size, max_trials - len(study.get_trials(deepcopy=False, states=finished)))
        if size <= 0:
            return
        if _heartbeat_interval(study._storage):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        group = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is out of range for distribution.*")
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")  # _Heartbeats beats
            for _ in range(size):
                trial = study.ask()
                try:
                    cfg, run_dir, resumed = _start_trial(trial, settings, worker, space, runs_dir, sampler_name,
                                                         log)
                    check_population_config(cfg)
                except Exception as exc:  # the trial's settings are wrong: it fails, the others go on
                    log(f"trial {trial.number}: failed ({exc})")
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                if group and shared_settings(cfg) != shared_settings(group[0][1]):  # e.g. another worker's retry
                    log(f"trial {trial.number}: failed (its settings differ from trial {group[0][0].number}'s "
                        "beyond the tuned ones; a population shares them)")
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                if resumed:  # a retry starts over: a population keeps no checkpoint to resume from
                    for name in ("metrics.jsonl", "checkpoint.pt"):
                        (run_dir / name).unlink(missing_ok=True)
                group.append((trial, cfg, run_dir))
        started += size
        if not group:
            continue
        log(f"population of {len(group)}: trials {', '.join(str(t.number) for t, _, _ in group)}")
        told: set[int] = set()
        with _Heartbeats(study._storage, [t._trial_id for t, _, _ in group]) as beats:

            def on_end(j: int, result) -> None:  # a trial ends when its member does; the others go on
                trial, _, run_dir = group[j]
                try:
                    study.tell(trial, _finish_trial(trial, result, run_dir, log))
                except optuna.TrialPruned:
                    study.tell(trial, state=TrialState.PRUNED)
                told.add(j)
                beats.end(trial._trial_id)

            try:
                train_population([c for _, c, _ in group], [d for _, _, d in group], progress=progress, log=log,
                                 on_epoch=lambda j, rec: _report_epoch(group[j][0], rec), on_end=on_end)
            except Exception as exc:
                log(f"population of trials {[t.number for t, _, _ in group]} failed: {type(exc).__name__}: {exc}")
                for j, (trial, _, _) in enumerate(group):
                    if j not in told:
                        study.tell(trial, state=TrialState.FAIL)
                if isinstance(exc, torch.OutOfMemoryError):  # every later group of this size would fail too
                    raise ValueError(f"--population {population}: {len(group)} members do not fit in the "
                                     f"device's memory ({str(exc).splitlines()[0]}); use a smaller "
                                     "--population") from None


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def report(study, path: str | os.PathLike | None, *, top: int = 5, storage_label: str = "",
           log: Callable[[str], None] = print) -> dict:
    """Print the ``top`` best completed trials and write the best one's settings as YAML.

    The YAML holds the best trial's complete TrainConfig under ``settings:``
    (``locoprop train --config FILE`` reads it), and under ``tuning:`` the
    study, its trial counts, the ``top`` trials and the machine the trials
    ran on.  Stale running trials are failed first, so the counts are current.
    """
    import optuna
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState

    if top < 1:
        raise ValueError(f"--top: expected an integer >= 1, got {top}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    counts = {k: v for k, v in counts.items() if v}
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    if not done:
        raise ValueError(f"--report: study {study.study_name!r} has no completed trial yet (trials: {counts})")
    space_params = sorted({p for t in done for p in t.params})
    headers = ["trial", "final train loss", "test loss", "epochs", "wall s"] + \
        [f for f in TUNED_FIELDS if _tuned(f, space_params)]
    rows = []
    best_rows = []
    for t in done[:top]:
        s = t.user_attrs.get("settings") or {}
        row = [str(t.number), _fmt(t.value), _fmt(t.user_attrs.get("final_test_loss")),
               _fmt(t.user_attrs.get("epochs_done")), _fmt(t.user_attrs.get("wall_time"))]
        row += [_fmt(s.get(f)) for f in headers[5:]]
        rows.append(row)
        best_rows.append({"trial": t.number, "final_train_loss": t.value,
                          "final_test_loss": t.user_attrs.get("final_test_loss"),
                          **{f: s.get(f) for f in headers[5:]}, "run_dir": t.user_attrs.get("run_dir")})
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    settings = study.user_attrs.get("settings", {})
    log(f"study {study.study_name}: {settings.get('optimizer')} on {settings.get('dataset')} "
        f"{settings.get('model')} {settings.get('activation')}, {settings.get('epochs')} epochs; "
        f"trials: {', '.join(f'{k} {v}' for k, v in counts.items())}")
    log("\n".join(lines))

    best = done[0]
    doc = {
        "settings": dict(best.user_attrs["settings"]),
        "tuning": {
            "study": study.study_name,
            "storage": storage_label,
            "best_trial": best.number,
            "final_train_loss": best.value,
            "final_test_loss": best.user_attrs.get("final_test_loss"),
            "epochs_done": best.user_attrs.get("epochs_done"),
            "wall_time_s": best.user_attrs.get("wall_time"),
            "device": best.user_attrs.get("device"),
            "host": best.user_attrs.get("host"),
            "data_source": best.user_attrs.get("data_source"),
            "sampler": best.user_attrs.get("sampler"),
            "run_dir": best.user_attrs.get("run_dir"),
            "search_space": study.user_attrs.get("search_space"),
            "trials": counts,
            "first_trial_start": _iso(min((t.datetime_start for t in trials if t.datetime_start), default=None)),
            "last_trial_end": _iso(max((t.datetime_complete for t in trials if t.datetime_complete),
                                       default=None)),
            "top": best_rows,
            "reported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = (f"# Best trial of Optuna study {study.study_name!r}, written by `locoprop tune --report`.\n"
                  f"# Train it: locoprop train --config {path} --out runs/NAME  (flags such as --device override)\n"
                  "# `settings` is the trial's complete TrainConfig; `tuning` records where it came from.\n")
        path.write_text(header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
        log(f"best settings: {path}")
    return doc


def _tuned(field: str, params: list[str]) -> bool:
    names = {"lr": "eta", "beta1": "one_minus_beta1", "beta2": "one_minus_beta2", "eps": "epsilon",
             "activation_lr": "gamma"}
    return names[field] in params


def _iso(dt) -> str | None:
    return dt.isoformat(timespec="seconds") if dt is not None else None


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def _parse_assignments(items: Sequence[str], option: str) -> dict:
    """``KEY=VALUE`` pairs (values read as YAML scalars, e.g. ``1e-3``, ``null``, ``true``)."""
    out: dict = {}
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{option}: expected KEY=VALUE, got {part!r}")
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ValueError(f"{option}: {key}: cannot read {value!r} ({exc})") from None
            if isinstance(parsed, str):  # YAML 1.1 reads '1e-3' as a string
                try:
                    parsed = float(parsed)
                except ValueError:
                    pass
            out[key.strip().replace("-", "_")] = parsed
    return out


def register(subparsers) -> None:
    """Add ``locoprop tune`` (see the module docstring and docs/tuning.md)."""
    p = subparsers.add_parser(
        "tune", help="Bayesian hyper-parameter search with Optuna (paper App. F, Tables 3-5)",
        description="Search the paper's space (Tables 3-5) for one optimizer, minimising the final train "
                    "loss; trials are kept in an Optuna RDB storage, so a study continues where it stopped "
                    "and several workers (on one or many machines) can share it.")
    g = p.add_argument_group("study settings (fixed for a study; taken from it when it exists)")
    g.add_argument("--dataset", default=None, help="mnist, fashion-mnist or curves (default: mnist)")
    g.add_argument("--model", default=None, help="standard, deep, wide or tiny (default: standard)")
    g.add_argument("--activation", default=None, help="tanh or relu (default: tanh)")
    g.add_argument("--optimizer", default=None, help=f"one of {', '.join(OPTIMIZER_NAMES)} (default: locoprop-m)")
    g.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: 100, the paper's)")
    g.add_argument("--batch-size", type=int, default=None, help="default: 1000")
    g.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    g.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    g.add_argument("--seed", type=int, default=None, help="training seed of every trial (default: 0)")
    g.add_argument("--warmup-epochs", type=int, default=None,
                   help="default: 5%% of the schedule's epochs, rounded (the paper's 5 of 100)")
    g.add_argument("--schedule-epochs", type=int, default=None,
                   help="epochs the learning-rate schedule spans (default: --epochs); --epochs 99 "
                        "--schedule-epochs 100 is the authors' notebook, which never trains the last epoch, at "
                        "learning rate 0")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other fixed TrainConfig setting, e.g. --set local_steps=5 --set inverse_every=50")
    g = p.add_argument_group("study and workers")
    g.add_argument("--storage", default="runs/tune/studies.db",
                   help="a SQLite file (default: runs/tune/studies.db) or a database URL such as "
                        "postgresql://user@host/db for workers on many machines")
    g.add_argument("--study", default=None, help="study name (default: DATASET-MODEL-ACTIVATION-OPTIMIZER)")
    g.add_argument("--trials", type=int, default=None, help="trials this command runs")
    g.add_argument("--max-trials", type=int, default=None,
                   help="stop once the study holds this many finished (complete or pruned) trials")
    g.add_argument("--runs-dir", default=None,
                   help="folder of the trials' run folders (default: runs/tune/STORAGE/STUDY, STORAGE being the "
                        "SQLite file's name or the database's)")
    g.add_argument("--device", default=None, help="this worker's device: cpu, cuda or auto (default: auto)")
    g.add_argument("--data-dir", default=None, help="this worker's dataset folder")
    g.add_argument("--sampler", choices=("tpe", "gp"), default="tpe",
                   help="tpe: multivariate TPE (default); gp: Optuna's GPSampler")
    g.add_argument("--startup-trials", type=int, default=10,
                   help="random trials before the sampler models the results (Optuna's default 10)")
    g.add_argument("--sampler-seed", type=int, default=None,
                   help="seed of the sampler (default: none, so parallel workers differ)")
    g.add_argument("--pruner", choices=("notebook", "median"), default="notebook",
                   help="notebook: the notebook's early-exit rules only (default); median: also "
                        "Optuna's MedianPruner")
    g.add_argument("--enqueue", action="append", default=[], metavar="KEY=VALUE,...",
                   help="try these settings first (TrainConfig names, e.g. lr=1e-3,beta1=0.9)")
    g.add_argument("--heartbeat-interval", type=int, default=60, help="seconds between heartbeats (default 60)")
    g.add_argument("--grace-period", type=int, default=None,
                   help="seconds without a heartbeat before a running trial is failed (default: 2x interval)")
    g.add_argument("--max-retry", type=int, default=1,
                   help="times a killed worker's trial is retried (resuming its run folder); default 1")
    g.add_argument("--population", type=int, default=1, metavar="K",
                   help="train K trials at a time as one population in this process (locoprop-s, locoprop-m and "
                        "the first-order methods; on a GPU many small trials cost far less together); default 1: "
                        "one at a time")
    g.add_argument("--progress", action="store_true", help="show a progress bar for each epoch")
    g = p.add_argument_group("report")
    g.add_argument("--report", default=None, metavar="FILE.yaml",
                   help="print the best trials and write the best settings as YAML for `locoprop train --config`")
    g.add_argument("--top", type=int, default=5, help="trials in the report's table (default 5)")
    p.set_defaults(func=main_tune)


def _log(msg: str) -> None:
    print(msg, flush=True)


def main_tune(args: argparse.Namespace) -> int:
    """Run trials (``--trials``/``--max-trials``) and/or write a report (``--report``)."""
    import optuna

    if args.trials is None and args.max_trials is None and args.report is None:
        raise ValueError("tune: give --trials N (or --max-trials N) to run trials, and/or --report FILE")
    if args.population < 1:
        raise ValueError(f"--population: expected an integer >= 1, got {args.population}")
    for name in ("trials", "max_trials"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 0, got {v}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    given = {k: getattr(args, k) for k in STUDY_OPTIONS if getattr(args, k, None) is not None}
    extra = _parse_assignments(args.set, "--set")
    bad = sorted(set(extra) & set(TUNED_FIELDS))
    if bad:
        raise ValueError(f"--set: {bad} are searched by the study (Tables 3-5), not fixed")
    bad = sorted(set(extra) & set(WORKER_FIELDS))
    if bad:
        raise ValueError(f"--set: {bad} belong to a worker; use --{bad[0].replace('_', '-')}")
    given = {**extra, **given}
    url = storage_url(args.storage)
    name = args.study
    if name is None:
        d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        d.update(given)
        name = f"{d['dataset']}-{d['model']}-{d['activation']}-{d['optimizer']}"
    storage = open_storage(url, heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
                           max_retry=args.max_retry)
    running = args.trials is not None or args.max_trials is not None
    sampler = make_sampler(args.sampler, args.sampler_seed, args.startup_trials)
    study, settings, space = open_study(storage, name, given, sampler=sampler, pruner=make_pruner(args.pruner),
                                        create=running)
    if running:
        worker = {"device": args.device or "auto", "data_dir": args.data_dir}
        runs_dir = Path(args.runs_dir) if args.runs_dir else Path("runs") / "tune" / _storage_tag(url) / name
        enqueue = [_parse_assignments([e], "--enqueue") for e in args.enqueue]
        _log(f"study {name} in {_safe_url(url)}: {settings['optimizer']} on {settings['dataset']} "
             f"{settings['model']} {settings['activation']}, {settings['epochs']} epochs"
             f"{_of_schedule(settings)}; sampler {args.sampler}; "
             f"searching {'; '.join(d.describe() for d in space)}")
        common = dict(trials=args.trials, runs_dir=runs_dir, worker=worker, max_trials=args.max_trials,
                      sampler_name=args.sampler, enqueue=enqueue, progress=args.progress, log=_log)
        if args.population == 1:
            run_study(study, settings, space, **common)
        else:
            run_population_study(study, settings, space, population=args.population, **common)
    if args.report is not None:
        report(study, args.report, top=args.top, storage_label=_safe_url(url), log=_log)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["tune", *sys.argv[1:]]))
