"""Step times of the grouped order (``solve_order="grouped"``) for several tile sizes and launch options.

The grouped kernels (:mod:`locoprop.triton_kernels`: ``grouped_residual_``, ``grouped_gradient_update_``) work
on tiles whose sizes and Triton launch options (warps, pipeline stages) were chosen without a GPU (session 32).
This script times LocoProp-M's captured step (``graphed_step``, as ``benchmarks/step_time.py``'s
``graphed-grouped`` mode builds it) for each configuration given, beside the default layer-major step, in
each precision asked for, and writes one record per configuration::

    python benchmarks/grouped_tiles.py --models standard --precisions tf32 fp32 \\
        --configs 64x64x32,64x64x32,4,3 128x64x32,64x128x32,8,3 --out results/perf/grouped-tiles.json

A configuration is ``RESIDUAL,UPDATE,WARPS,STAGES``: the residual kernel's tile (rows x columns of ``δ`` x
columns of ``x`` summed at a time), the update kernel's (rows x columns of ``W`` x rows of the batch summed at a
time), ``num_warps`` and ``num_stages`` (``-`` for Triton's default).  Precision ``tf32x3`` is FP32 with the
grouped kernels' products emulated by three TF32 products.  On the CPU (``--device cpu``, for the tests) the
kernels run in Triton's interpreter and the step is not captured: the times mean nothing there.

``--resources ARCH`` times nothing and needs no GPU: it compiles both kernels of each configuration and precision
for the CUDA architecture ``ARCH`` (``90``: the H100/H200; Triton brings its own compiler) and records what each
compiled kernel uses per thread and block (registers, stack: what ``ptxas`` spilled, shared memory), read from the
cubin by the ``cuobjdump`` that comes with Triton::

    python benchmarks/grouped_tiles.py --resources 90 --precisions fp32 tf32 bf16 tf32x3 \
        --configs 64x64x32,64x64x32,4,- 64x64x32,64x64x32,8,- --out results/grouped-tiles-sm90/resources.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from locoprop import triton_kernels
from locoprop.harness.models import AutoencoderLoss, build_autoencoder
from locoprop.harness.records import readme_header, write_records
from locoprop.precision import set_cuda_matmul_tf32


def _step_time_module():
    spec = importlib.util.spec_from_file_location("step_time", Path(__file__).with_name("step_time.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config(text: str) -> dict:
    """``RESIDUAL,UPDATE,WARPS,STAGES`` (each tile ``AxBxC``, powers of two of at least 16) as the settings of
    :mod:`locoprop.triton_kernels`; a ``ValueError`` naming ``--configs`` where it is not that."""
    parts = text.split(",")
    try:
        if len(parts) != 4:
            raise ValueError
        tiles = [tuple(int(v) for v in p.split("x")) for p in parts[:2]]
        if any(len(t) != 3 or any(v < 16 or v & (v - 1) for v in t) for t in tiles):
            raise ValueError
        options = {name: int(v) for name, v in zip(("num_warps", "num_stages"), parts[2:]) if v != "-"}
    except ValueError:
        raise ValueError(f"--configs {text!r}: expected RESIDUAL,UPDATE,WARPS,STAGES, each tile AxBxC of powers of "
                         "two of at least 16, warps and stages integers or '-' (e.g. 64x64x32,64x64x32,4,3)") from None
    return {"residual_blocks": tiles[0], "update_blocks": tiles[1], "launch_options": options}


def time_config(step_time, model_name: str, batch: int, local_steps: int, precision: str, config: dict | None,
                device: torch.device, warmup: int, steps: int) -> dict:
    """One record: the median step of LocoProp-M in the grouped order with ``config`` (``None``: the default
    layer-major order, for comparison)."""
    saved = (triton_kernels.GROUPED_RESIDUAL_BLOCKS, triton_kernels.GROUPED_UPDATE_BLOCKS,
             triton_kernels.GROUPED_LAUNCH_OPTIONS)
    cuda = device.type == "cuda"
    mode = ("graphed" if cuda else "fused") + ("" if config is None else "-grouped")
    mode += "-tf32x3" if config is not None and precision == "tf32x3" else ""
    spec = {"optimizer": "locoprop-m", "mode": mode, "precision": "fp32" if precision == "tf32x3" else precision,
            "local_steps": local_steps}
    try:
        if config is not None:
            triton_kernels.GROUPED_RESIDUAL_BLOCKS = config["residual_blocks"]
            triton_kernels.GROUPED_UPDATE_BLOCKS = config["update_blocks"]
            triton_kernels.GROUPED_LAUNCH_OPTIONS = config["launch_options"]
        if cuda:  # as step_time.py's TF32 rows: the whole step with TF32 allowed
            set_cuda_matmul_tf32(precision == "tf32")
        torch.manual_seed(0)
        model = build_autoencoder(model_name, "tanh", device=device)
        x = torch.rand(batch, 784, device=device)
        step = step_time.build_step(spec, model, AutoencoderLoss(), x)
        if not cuda and config is not None:  # the grouped kernels in the interpreter (the tests)
            step.optimizer.fused_solver.triton_elementwise = True
        times, loss = step_time.timed_calls(step, device, warmup, steps)
        solver = step.optimizer.fused_solver
        return {"model": model_name, "batch_size": batch, "local_steps": local_steps, "precision": precision,
                "order": solver.solve_order, "mode": mode,
                "residual_blocks": list(triton_kernels.GROUPED_RESIDUAL_BLOCKS) if config else None,
                "update_blocks": list(triton_kernels.GROUPED_UPDATE_BLOCKS) if config else None,
                "launch_options": dict(triton_kernels.GROUPED_LAUNCH_OPTIONS) if config else None,
                "step_ms_median": statistics.median(times), "step_ms_min": min(times), "steps_timed": len(times),
                "loss": float(loss)}
    finally:
        (triton_kernels.GROUPED_RESIDUAL_BLOCKS, triton_kernels.GROUPED_UPDATE_BLOCKS,
         triton_kernels.GROUPED_LAUNCH_OPTIONS) = saved
        if cuda:
            set_cuda_matmul_tf32(False)


def compiled_resources(arch: int, kernel: str, precision: str, update_form: bool, config: dict) -> dict:
    """What ``kernel`` compiled for ``sm_{arch}`` with ``config``'s tiles and launch options uses: registers per
    thread, stack bytes per thread (spills), shared memory per block, warps."""
    import triton

    saved = (triton_kernels.GROUPED_RESIDUAL_BLOCKS, triton_kernels.GROUPED_UPDATE_BLOCKS,
             triton_kernels.GROUPED_LAUNCH_OPTIONS)
    try:
        triton_kernels.GROUPED_RESIDUAL_BLOCKS = config["residual_blocks"]
        triton_kernels.GROUPED_UPDATE_BLOCKS = config["update_blocks"]
        triton_kernels.GROUPED_LAUNCH_OPTIONS = config["launch_options"]
        compiled = triton_kernels.compile_for(arch, kernel, change=update_form, precision=precision)
    finally:
        (triton_kernels.GROUPED_RESIDUAL_BLOCKS, triton_kernels.GROUPED_UPDATE_BLOCKS,
         triton_kernels.GROUPED_LAUNCH_OPTIONS) = saved
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage: no resource line in {usage!r}")
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2)),
            "shared_bytes": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages}


def resources(arch: int, precisions: list[str], configs: list[dict]) -> list[dict]:
    """:func:`compiled_resources` of both kernels (the residual plain and, for TF32 and bf16, in the update form
    it runs in there) for each precision and configuration."""
    records = []
    for config in configs:
        for precision in precisions:
            for kernel in ("grouped_residual", "grouped_gradient_update"):
                forms = [False] + ([True] if kernel == "grouped_residual" and precision in ("tf32", "bf16") else [])
                for form in forms:
                    record = {"arch": arch, "kernel": kernel, "precision": precision, "update_form": form,
                              "residual_blocks": list(config["residual_blocks"]),
                              "update_blocks": list(config["update_blocks"]),
                              "launch_options": dict(config["launch_options"]),
                              **compiled_resources(arch, kernel, precision, form, config)}
                    records.append(record)
                    tile = record["residual_blocks" if kernel == "grouped_residual" else "update_blocks"]
                    print(f"sm_{arch} {kernel:24} {precision:6} {'update form' if form else '':11} {str(tile):15} "
                          f"warps {record['num_warps']} stages {record['num_stages']}: {record['registers']} "
                          f"registers, {record['stack_bytes']} B stack, {record['shared_bytes'] // 1024} KiB shared",
                          flush=True)
    return records


def resources_readme(meta: dict, records: list[dict], json_name: str) -> str:
    """A Markdown page of :func:`resources`' records (nothing in it typed by hand)."""
    lines = readme_header("benchmarks/grouped_tiles.py", meta, json_name) + [
        "| kernel | precision | update form | tile | warps | stages | registers | stack B | shared KiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        tile = r["residual_blocks"] if r["kernel"] == "grouped_residual" else r["update_blocks"]
        lines.append(f"| {r['kernel']} | {r['precision']} | {'yes' if r['update_form'] else 'no'} | "
                     f"{'x'.join(map(str, tile))} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
                     f"{r['stack_bytes']} | {r['shared_bytes'] / 1024:.0f} |")
    return "\n".join(lines) + "\n"


def arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["standard"])
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--precisions", nargs="+", default=["tf32"], choices=["fp32", "tf32", "bf16", "tf32x3"])
    p.add_argument("--configs", nargs="+", default=["64x64x32,64x64x32,-,-"],
                   help="RESIDUAL,UPDATE,WARPS,STAGES for each configuration (see the module docstring)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resources", type=int, default=None, metavar="ARCH",
                   help="time nothing: compile each configuration for this CUDA architecture (90: Hopper) and record "
                        "its registers, spills and shared memory (no GPU needed)")
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    return p


def main(argv=None) -> int:
    args = arguments().parse_args(argv)
    configs = [parse_config(c) for c in args.configs]
    if args.resources is not None:
        import triton

        records = resources(args.resources, args.precisions, configs)
        if args.out:
            meta = {"title": "What the grouped kernels use, compiled ahead of time",
                    "command": " ".join(["python"] + sys.argv), "date": datetime.date.today().isoformat(),
                    "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), no GPU, "
                               f"Triton {triton.__version__}",
                    "triton": triton.__version__, "torch": torch.__version__,
                    "about": f"Registers and stack (spills) per thread and shared memory per block of each grouped "
                             f"kernel compiled for sm_{args.resources} (Triton's compiler, read from the cubin by "
                             "cuobjdump -res-usage); nothing run."}
            write_records(args.out, meta, records, resources_readme)
        return 0
    device = torch.device(args.device)
    step_time = _step_time_module()
    records = []
    meta = {"title": "The grouped order's tiles", "command": " ".join(["python"] + sys.argv),
            "date": datetime.date.today().isoformat(), "machine": step_time.device_name(device),
            "torch": torch.__version__,
            "about": "The median step of LocoProp-M (T local iterations, batch rows) captured by graphed_step in "
                     "the grouped order for each tile configuration, and in the default layer-major order."}
    for model_name in args.models:
        for precision in args.precisions:
            for config in [None] + configs:
                record = time_config(step_time, model_name, args.batch_size, args.local_steps, precision, config,
                                     device, args.warmup, args.steps)
                if config is None:  # the default order, first: the others' ratios are to it
                    layer_major = record
                record["ratio_to_layer_major"] = record["step_ms_median"] / layer_major["step_ms_median"]
                records.append(record)
                print(f"{model_name:9} {precision:6} {record['order']:12} "
                      f"{str(record['residual_blocks']):15} {str(record['update_blocks']):15} "
                      f"{str(record['launch_options']):35} {record['step_ms_median']:8.3f} ms "
                      f"({record['ratio_to_layer_major']:.2f}x)", flush=True)
                if args.out:  # after each record, so that a timeout keeps those done
                    write_records(args.out, meta, records, readme)
    return 0


def readme(meta: dict, records: list[dict], json_name: str) -> str:
    """A Markdown page of the records (written beside the JSON; nothing in it typed by hand)."""
    lines = readme_header("benchmarks/grouped_tiles.py", meta, json_name) + [
        "| model | precision | order | residual tile | update tile | launch options | step ms | x layer-major |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r['model']} | {r['precision']} | {r['order']} | {r['residual_blocks'] or ''} | "
                     f"{r['update_blocks'] or ''} | {r['launch_options'] if r['launch_options'] is not None else ''} | "
                     f"{r['step_ms_median']:.3f} | {r['ratio_to_layer_major']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
