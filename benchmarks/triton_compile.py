"""How long Triton takes to compile the fast solver's kernels, cold and from its disk cache.

The kernels of :mod:`locoprop.triton_kernels` (the update, and the residual of a tanh layer) are compiled at
their first launch on a GPU.  Triton compiles for a
named architecture on any machine (it brings its own ``ptxas``), so this script times, on the machine it runs
on, what a first launch on an A100 (``sm_80``) or an H100/H200 (``sm_90``) compiles: cold, with an empty cache
directory each time, and again from the filled cache (a second process, or a second run).  The CPU does the
compiling in both cases, so the figures carry over to a GPU machine up to the speed of its CPU.

    python benchmarks/triton_compile.py --archs 80 90 --repeat 3 --out results/triton-compile/compile-times.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from locoprop import triton_kernels
from locoprop.harness.records import write_records


#: The kernels timed: (name, transfer code of the residual kernel).
KERNELS = (("tf_rmsprop_pair", 1), ("residual_column_sums", 1))


def time_compile(arch: int, kernel: str, transfer: int, cache_dir: str) -> float:
    """Seconds for one :func:`~locoprop.triton_kernels.compile_for` with Triton's cache in ``cache_dir``."""
    before = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    try:
        t0 = time.perf_counter()
        compiled = triton_kernels.compile_for(arch, kernel, transfer)
        seconds = time.perf_counter() - t0
    finally:
        if before is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = before
    if f".target sm_{arch}" not in compiled.asm["ptx"]:
        raise RuntimeError(f"sm_{arch}: the PTX names another target")
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", type=int, default=[80, 90], help="CUDA architectures (90: Hopper)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file; a README.md is written beside it")
    args = p.parse_args(argv)
    import triton

    records = []
    for arch in args.archs:
        for kernel, transfer in KERNELS:
            cold, warm = [], []
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as cache:
                    cold.append(time_compile(arch, kernel, transfer, cache))
                    warm.append(time_compile(arch, kernel, transfer, cache))
            records.append({"arch": f"sm_{arch}", "kernel": kernel, "cold_s": cold, "warm_s": warm,
                            "cold_s_median": statistics.median(cold), "warm_s_median": statistics.median(warm)})
            print(f"sm_{arch} {kernel}: cold {statistics.median(cold):.3f} s, from the cache "
                  f"{statistics.median(warm):.4f} s (median of {args.repeat})", flush=True)
    meta = {"command": " ".join(["python"] + sys.argv), "date": datetime.date.today().isoformat(),
            "machine": f"CPU {platform.machine()}, {os.cpu_count()} cores", "triton": triton.__version__,
            "torch": torch.__version__, "kernels": "locoprop.triton_kernels: the TF-RMSProp update (BLOCK "
            f"{triton_kernels.BLOCK}) and the residual of a tanh layer (tiles {triton_kernels.BLOCK_ROWS} x "
            f"{triton_kernels.BLOCK_COLUMNS})"}
    if args.out:
        write_records(args.out, meta, records, readme)
    return 0


def readme(meta: dict, records: list[dict], json_name: str) -> str:
    """A Markdown page of the times (written beside the JSON; nothing in it typed by hand)."""
    lines = ["# Compiling the fast solver's Triton kernels", "",
             f"Written by `benchmarks/triton_compile.py` with `{json_name}`: {meta['kernels']}, each compiled for "
             f"each architecture with an empty cache (cold) and then from that cache, in one process (its first "
             f"compile pays Triton's start-up); {meta['machine']}, no GPU; Triton {meta['triton']}, torch "
             f"{meta['torch']}; {meta['date']}. Command: `{meta['command']}`.", "",
             "| architecture | kernel | cold compile, median | from the cache, median | cold, each run in order |",
             "| --- | --- | --- | --- | --- |"]
    for r in records:
        each = ", ".join(f"{s:.3f}" for s in r["cold_s"])
        lines.append(f"| {r['arch']} | {r['kernel']} | {r['cold_s_median']:.3f} s | {r['warm_s_median']:.4f} s | "
                     f"{each} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
