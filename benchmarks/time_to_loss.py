"""Time for each run to reach a reference run's final train loss (issue 5: LocoProp-M against RMSProp).

Reads run folders (``config.json``, ``metrics.jsonl``); the target is the final train loss of the
``--reference`` run, or with ``--target-epoch N`` its train loss after epoch N (99: the end of the authors'
notebook, which trains 99 epochs of the 100-epoch schedule and never the last one, at learning rate 0).
For each run it reports the first epoch whose train loss is at or below the target, the run's measured
training wall time at that epoch (the harness times the batches only, not the evaluation) and, where ``--perf`` gives a step-time file of the same device, the uncontended estimate
``epochs x steps per epoch x median step time`` (for runs that shared the GPU with others, whose wall
times are not comparable).  ``--reference-dir`` takes the reference from another folder: a run of
another device, against which the runs' epochs count and their time is the estimate from ``--perf``.
Writes ``OUT.json`` and ``OUT.md``.

    python benchmarks/time_to_loss.py results/gpu-standard-mnist --reference rmsprop \
        --runs locoprop-m shampoo-at50 kfac --perf results/perf/NVIDIA-H100-80GB-HBM3-2026-11-27.json \
        --alone rmsprop locoprop-m --out results/gpu-standard-mnist/time-to-rmsprop-loss
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from locoprop.harness.plots import run_label

# how the harness runs each optimizer on CUDA -> the benchmark's mode of the same configuration
_MODE = {"locoprop": "graphed", "first-order": "eager", "other": "eager"}
# the whole step captured in one CUDA graph (what each optimizer could run at, the harness aside)
_CAPTURED = {"locoprop": "graphed", "first-order": "graph", "other": None}


def _load(folder: Path) -> tuple[dict, list[dict]]:
    config = json.loads((folder / "config.json").read_text())
    records = [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]
    return config, records


def _locoprop_mode(base: str, settings: dict) -> str:
    """The step-time benchmark's mode of a LocoProp run's settings: ``base`` and its flags in the benchmark's
    order (``graphed-iter-compiled``, ``graphed-adam-compiled``, ``graphed-iter-nocheck``, ...): the solve
    order, no finite check, the host rollback, an inner optimizer of torch's, ``compile_elementwise`` and the
    multi-tensor update (``triton_elementwise`` false)."""
    flags = ["iter" if settings.get("solve_order") == "iteration-major" else None,
             "nocheck" if settings.get("check_finite") is False else None,
             "layercheck" if settings.get("check_finite") == "layer" else None,
             "host" if settings.get("rollback") == "host" else None,
             settings.get("inner") if settings.get("inner") in ("adam", "adagrad") else None,
             "compiled" if settings.get("compile_elementwise") else None,
             "notriton" if settings.get("triton_elementwise") is False else None]
    return "-".join([base] + [f for f in flags if f])


def _step_ms(perf: list[dict], settings: dict, modes: dict = _MODE) -> float | None:
    opt = settings["optimizer"]
    if settings.get("inverse_every", 1) != 1:  # the benchmark times Shampoo and K-FAC at @1 only
        return None
    kind = "locoprop" if opt.startswith("locoprop") else "first-order" if opt in ("sgd", "adam", "rmsprop") else "other"
    mode = _locoprop_mode(modes[kind], settings) if kind == "locoprop" else modes[kind]
    for r in perf:
        if (r.get("model") == settings["model"] and r.get("batch_size") == settings["batch_size"]
                and r.get("optimizer") == opt and r.get("mode") == mode and "step_ms_median" in r
                and r.get("precision", "fp32") == settings.get("precision", "fp32")
                and (not opt.startswith("locoprop") or r.get("local_steps") == settings["local_steps"])):
            return r["step_ms_median"]
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--reference", required=True)
    p.add_argument("--reference-dir", default=None,
                   help="the folder the reference run lies in, if not FOLDER (a run of another device: the other "
                        "runs' epochs against its loss, their time estimated from --perf's step times)")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--alone", nargs="*", default=[], help="runs that had the device to themselves")
    p.add_argument("--perf", default=None, help="step_time.py JSON of the same device")
    p.add_argument("--target-epoch", type=int, default=None,
                   help="the reference's train loss after this epoch is the target (default: its last epoch)")
    p.add_argument("--out", required=True, help="output path without suffix")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    perf = json.loads(Path(args.perf).read_text())["records"] if args.perf else []
    ref_folder = Path(args.reference_dir) if args.reference_dir else folder
    ref_cfg, ref = _load(ref_folder / args.reference)
    if args.target_epoch is None:
        at, target_name = ref[-1], f"final train loss of {args.reference}"
    else:
        at = next((r for r in ref if r["epoch"] == args.target_epoch), None)
        if at is None:
            p.error(f"--target-epoch: {args.reference} has no epoch {args.target_epoch} "
                    f"(epochs 0 to {ref[-1]['epoch']})")
        target_name = f"train loss of {args.reference} after epoch {args.target_epoch}"
    target = at["train_loss"]
    rows = []
    for i, name in enumerate([args.reference, *args.runs]):
        run_dir = (ref_folder if i == 0 else folder) / name
        cfg, recs = (ref_cfg, ref) if i == 0 else _load(run_dir)
        s = cfg["settings"]
        steps_per_epoch = math.ceil(cfg.get("train_examples", 60000) / s["batch_size"])
        hit = next((r for r in recs if r["epoch"] > 0 and r["train_loss"] <= target), None)
        first = next((r for r in recs if r["epoch"] == 1), None)
        step_ms, captured_ms = _step_ms(perf, s), _step_ms(perf, s, _CAPTURED)
        row = {"run": name, "label": run_label({"config": cfg, "dir": run_dir}), "device": cfg.get("device"),
               "epochs_run": recs[-1]["epoch"], "epochs_planned": s["epochs"], "final_train_loss": recs[-1]["train_loss"],
               "alone_on_device": name in args.alone, "reaches_target": hit is not None,
               "epoch": hit["epoch"] if hit else None, "wall_s": hit["wall_time"] if hit else None,
               "first_epoch_wall_s": first["wall_time"] if first else None,
               "step_ms_uncontended": step_ms,
               "estimate_s": hit["epoch"] * steps_per_epoch * step_ms / 1e3 if hit and step_ms else None,
               "step_ms_captured": captured_ms,
               "estimate_captured_s": hit["epoch"] * steps_per_epoch * captured_ms / 1e3 if hit and captured_ms
               else None}
        rows.append(row)
    base = rows[0]["wall_s"]
    for row in rows:
        row["wall_ratio_to_reference"] = row["wall_s"] / base if row["wall_s"] and row["alone_on_device"] else None
    result = {"target": target_name, "target_loss": target, "rows": rows,
              "command": " ".join(["python"] + sys.argv)}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Time to the {target_name} ({target:.3f})", "",
             "Generated by `benchmarks/time_to_loss.py` from the run folders"
             + (f" and `{args.perf}`" if args.perf else "") + ":", "", "```sh", result["command"], "```", "",
             "Wall time is the harness's training time (batches only). Runs not alone on the device shared "
             "it with other runs: their wall times are not comparable, use the estimate (epochs x steps x "
             "the uncontended median step time of the same configuration, from the step-time benchmark). The "
             "harness runs BackProp baselines eagerly and LocoProp's whole step as one CUDA graph; the last two "
             "columns put every optimizer on the same footing, its whole step captured in one CUDA graph "
             "(`graph` and `graphed` rows of the benchmark). `first epoch s` is the wall time of the first "
             "epoch, which holds the one-off costs (CUDA graph capture, torch.compile's compilations).", "",
             "| run | settings | epochs run | final train loss | reaches target | at epoch | wall s | alone | "
             "x reference wall | first epoch s | step ms | estimate s | captured step ms | captured estimate s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"| {r['run']} | {r['label']} | {r['epochs_run']}/{r['epochs_planned']} | "
                     f"{r['final_train_loss']:.3f} | {'yes' if r['reaches_target'] else 'no'} | {f(r['epoch'], 'd')} | "
                     f"{f(r['wall_s'], '.1f')} | {'yes' if r['alone_on_device'] else 'no'} | "
                     f"{f(r['wall_ratio_to_reference'], '.2f')} | {f(r['first_epoch_wall_s'], '.2f')} | "
                     f"{f(r['step_ms_uncontended'], '.2f')} | "
                     f"{f(r['estimate_s'], '.1f')} | {f(r['step_ms_captured'], '.2f')} | "
                     f"{f(r['estimate_captured_s'], '.1f')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
