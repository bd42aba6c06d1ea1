"""Benchmark results on disk: ``{"meta": ..., "records": [...]}`` as JSON, with a README made from them beside it.

The benchmarks of ``benchmarks/`` write their figures through :func:`write_records`, so that every file in
``results/`` says the command, machine and date that produced it (in ``meta``) and its README is generated from
the same records (no figure typed by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["write_records", "processor", "parse_runs", "resumed_records", "train_missing_runs", "final_records",
           "readme_header"]


def write_records(out: str | Path, meta: dict, records: list[dict],
                  readme: Callable[[dict, list[dict], str], str] | None = None) -> Path:
    """Write ``{"meta": meta, "records": records}`` to ``out`` atomically (a reader never sees half a file, and
    a run stopped mid-write leaves the previous file), and, with ``readme(meta, records, json_name)``, a
    ``README.md`` beside it.  Returns the JSON file's path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    os.replace(tmp, out)
    if readme is not None:
        (out.parent / "README.md").write_text(readme(meta, records, out.name))
    return out


def processor() -> str:
    """The CPU's model name and the instruction sets that decide its product rates (bf16 is fast only with
    AVX512-BF16 or AMX), from ``/proc/cpuinfo`` where there is one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    sets = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(sets) or 'no AVX2'})"


def parse_runs(ap: argparse.ArgumentParser, specs: Iterable[str], optimizers: Iterable[str]) -> list[tuple[str, float]]:
    """A learning-rate sweep's ``--runs OPTIMIZER:LR ...`` as ``(optimizer, lr)`` pairs; ``ap.error`` names a
    spec with an unknown optimizer or a learning rate that is not a number."""
    optimizers = list(optimizers)
    runs = []
    for spec in specs:
        name, _, lr = spec.partition(":")
        if name not in optimizers:
            ap.error(f"--runs {spec!r}: optimizer must be one of {sorted(optimizers)}")
        try:
            runs.append((name, float(lr)))
        except ValueError:
            ap.error(f"--runs {spec!r}: expected OPTIMIZER:LEARNING_RATE")
    return runs


def resumed_records(ap: argparse.ArgumentParser, out: str | os.PathLike, meta: dict, resume: bool) -> list[dict]:
    """The records ``out`` already holds when ``resume`` (``meta["command"]`` then lists the earlier command
    first), else none; ``ap.error`` where the file was made with other settings (any ``meta`` entry but the
    command and the date)."""
    if not (resume and Path(out).exists()):
        return []
    previous = json.loads(Path(out).read_text())
    kept = {key for key in previous["meta"] if key not in ("command", "date")}
    if {k: previous["meta"][k] for k in kept} != {k: meta.get(k) for k in kept}:
        ap.error(f"--resume: {out} was made with other settings ({previous['meta']['command']})")
    meta["command"] = previous["meta"]["command"] + "  # then: " + meta["command"]
    return previous["records"]


def train_missing_runs(runs: Iterable[tuple[str, float]], records: list[dict], epochs: int,
                       train_one: Callable[[str, float], list[dict]], out: str | os.PathLike, meta: dict,
                       readme: Callable[[dict, list[dict], str], str]) -> list[dict]:
    """Train each ``(optimizer, lr)`` run that ``records`` does not hold to ``epochs`` (an unfinished one again),
    writing the records and README after every run, so that a stopped job keeps what it did."""
    done = {(r["optimizer"], r["lr"]) for r in records if r["epoch"] == epochs}
    for name, lr in runs:
        if (name, lr) in done:
            continue
        records = [r for r in records if (r["optimizer"], r["lr"]) != (name, lr)] + train_one(name, lr)
        write_records(out, meta, records, readme)
    return records


def final_records(records: list[dict]) -> list[dict]:
    """The last record of each ``(optimizer, lr)`` run of a sweep, lowest ``train_loss`` first."""
    last = {}
    for r in records:
        last[(r["optimizer"], r["lr"])] = r
    return sorted(last.values(), key=lambda r: r["train_loss"])


def readme_header(script: str, meta: dict, json_name: str) -> list[str]:
    """A generated README's first lines: the title, who wrote which file when and where, the command, and what
    the benchmark is (``meta``'s ``title``, ``date``, ``machine``, ``torch``, ``command``, ``about``)."""
    return [f"# {meta['title']}", "", f"Generated by `{script}` into `{json_name}` on {meta['date']}, "
            f"{meta['machine']}, torch {meta['torch']}:", "", "```sh", meta["command"], "```", "", meta["about"], ""]
