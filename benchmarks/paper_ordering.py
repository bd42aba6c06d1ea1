"""The paper's ordering of final train losses (issue 4's closing comparison), checked on run folders.

The paper (Sec. 5, Figs. 3 and 4, standard MNIST autoencoder) reports: RMSProp is the best first-order
method; LocoProp-M beats LocoProp-S; more local iterations help, up to about T = 10; LocoProp-M comes close
to Shampoo and K-FAC.  This script reads the runs named on the command line (``ROLE=FOLDER``), takes each
one's last recorded train loss, and says for each claim whether these runs agree.  Runs that have not
finished their configured epochs are listed as such and still compared (their loss so far).  Writes
``OUT.json`` and ``OUT.md``; no number is typed by hand.

Roles: ``first-order:NAME`` (Fig. 3(a); the one named ``rmsprop`` is RMSProp), ``locoprop-s``,
``locoprop-m`` (T = 10), ``locoprop-m-T5``, ``locoprop-m-T50``, ``second-order:NAME`` (Fig. 4)::

    python benchmarks/paper_ordering.py first-order:rmsprop=results/gpu-h200-standard-mnist/rmsprop \\
        first-order:adam=results/gpu-standard-mnist/adam locoprop-m=results/gpu-h200-standard-mnist/locoprop-m \\
        ... --close 0.10 --out results/paper-ordering/ordering
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from locoprop.harness.plots import load_run


def final(folder: Path) -> dict:
    """The last epoch record of a run folder, with its configured number of epochs and device."""
    run = load_run(folder)
    records = [r for r in run["records"] if r.get("train_loss") is not None]
    if not records:
        raise ValueError(f"{folder}: no epoch with a train loss in metrics.jsonl")
    settings = run["config"].get("settings", {})
    last = records[-1]
    return {"folder": str(folder), "train_loss": last["train_loss"], "epoch": last["epoch"],
            "epochs": settings.get("epochs"), "optimizer": settings.get("optimizer"),
            "local_steps": settings.get("local_steps"), "inverse_every": settings.get("inverse_every"),
            "device": run["config"].get("device", "?"),
            "events": [e.get("event") for e in run["events"]]}


def parse_runs(specs: list[str]) -> dict[str, Path]:
    runs = {}
    for spec in specs:
        role, sep, folder = spec.partition("=")
        if not sep or not folder:
            raise SystemExit(f"run {spec!r}: expected ROLE=FOLDER")
        if role in runs:
            raise SystemExit(f"run {spec!r}: role {role!r} given twice")
        runs[role] = Path(folder)
    return runs


def check(runs: dict[str, dict], close: float) -> list[dict]:
    """One entry per claim: ``claim``, ``agrees`` (True, False or None when a run is missing), ``detail``."""
    loss = {role: r["train_loss"] for role, r in runs.items()}
    out = []
    first = {role.split(":", 1)[1]: v for role, v in loss.items() if role.startswith("first-order:")}
    if "rmsprop" in first and len(first) > 1:
        best = min(first, key=first.get)
        out.append({"claim": "RMSProp is the best first-order method (Fig. 3(a))", "agrees": best == "rmsprop",
                    "detail": ", ".join(f"{k} {v:.2f}" for k, v in sorted(first.items(), key=lambda kv: kv[1]))})
    else:
        out.append({"claim": "RMSProp is the best first-order method (Fig. 3(a))", "agrees": None,
                    "detail": "needs first-order:rmsprop and another first-order run"})
    if "locoprop-m" in loss and "locoprop-s" in loss:
        out.append({"claim": "LocoProp-M beats LocoProp-S (Fig. 3(b))", "agrees": loss["locoprop-m"] < loss["locoprop-s"],
                    "detail": f"LocoProp-M {loss['locoprop-m']:.2f}, LocoProp-S {loss['locoprop-s']:.2f}"})
    ts = [(t, loss[role]) for t, role in ((5, "locoprop-m-T5"), (10, "locoprop-m"), (50, "locoprop-m-T50"))
          if role in loss]
    if len(ts) > 1:
        steps = [f"T = {a} to {b}: {100 * (lb - la) / la:+.1f}%" for (a, la), (b, lb) in zip(ts, ts[1:])]
        out.append({"claim": "more local iterations help, up to about T = 10 (Fig. 3(b))",
                    "agrees": all(lb < la for (_, la), (_, lb) in zip(ts, ts[1:])),
                    "detail": ", ".join(f"T = {t} {v:.2f}" for t, v in ts) + "; change in final loss " +
                              ", ".join(steps)})
    second = {role.split(":", 1)[1]: v for role, v in loss.items() if role.startswith("second-order:")}
    if "locoprop-m" in loss and second:
        m = loss["locoprop-m"]
        ratios = {k: v / m for k, v in second.items()}
        out.append({"claim": f"LocoProp-M is close to Shampoo and K-FAC (Fig. 4; here: within {100 * close:.0f}% "
                             "of the best second-order run's final loss)",
                    "agrees": abs(min(second.values()) / m - 1) <= close,
                    "detail": f"LocoProp-M {m:.2f}; " + ", ".join(
                        f"{k} {second[k]:.2f} ({ratios[k]:.2f}x)" for k in sorted(second, key=second.get))})
    if "locoprop-m" in loss and "first-order:rmsprop" in loss:
        m, r = loss["locoprop-m"], loss["first-order:rmsprop"]
        out.append({"claim": "LocoProp-M beats RMSProp (Figs. 3 and 4)", "agrees": m < r,
                    "detail": f"LocoProp-M {m:.2f}, RMSProp {r:.2f} ({100 * (m - r) / r:+.1f}%)"})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="ROLE=FOLDER")
    p.add_argument("--close", type=float, default=0.10,
                   help="'close' means within this fraction of LocoProp-M's final loss (default 0.10)")
    p.add_argument("--out", required=True, help="output path without suffix")
    args = p.parse_args(argv)
    if not 0 < args.close < 1:
        raise SystemExit(f"--close: expected a fraction in (0, 1), got {args.close}")
    runs = {role: final(folder) for role, folder in parse_runs(args.runs).items()}
    claims = check(runs, args.close)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "claims": claims}, indent=1) + "\n")
    word = {True: "agrees", False: "**disagrees**", None: "not shown"}
    lines = ["| claim of the paper | these runs | final train losses |", "| --- | --- | --- |"]
    lines += [f"| {c['claim']} | {word[c['agrees']]} | {c['detail']} |" for c in claims]
    lines += ["", "| role | final train loss | epoch | of | optimizer | T | inverse every | device | run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for role, r in runs.items():
        t = r["local_steps"] if str(r["optimizer"]).startswith("locoprop") else ""
        inv = r["inverse_every"] if r["optimizer"] in ("shampoo", "kfac") else ""
        stopped = "" if r["epoch"] == r["epochs"] else " (not finished)"
        ev = f" [{r['events'][-1]}]" if r["events"] else ""
        lines.append(f"| {role} | {r['train_loss']:.3f} | {r['epoch']}{stopped}{ev} | {r['epochs']} | "
                     f"{r['optimizer']} | {t} | {inv} | {r['device']} | `{r['folder']}` |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
