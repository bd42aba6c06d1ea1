"""What the residual of a bf16 local iteration costs on the CPU, by how it is computed (issue 5, the CPU's goal).

With ``precision="bf16"`` and ``compile_elementwise=True`` the fast solver computes each local iteration's
residual ``δ = f(a₀ + x (W - W₀)ᵀ + (b - b₀)) - y`` and ``Σδ`` in one compiled program that reads the bf16
product as it is (``locoprop.fused._bf16_residual_``, ``FusedIterativeSolver._bf16_chain_compiled``).  This
times that program on layer-sized tensors, the caches flushed before each call as they are between a layer's
products in a step, for each variant:

* ``compiled-quick-tanh``: the library's program with ``tanh`` as ``2σ(2a) - 1`` (``TanhViaSigmoid``, what the
  solver uses for bf16 on the CPU);
* ``compiled-exact-tanh``: the same program with ``torch.tanh`` (the compiler's vectorized ``tanh``);
* ``compiled-quick-tanh-no-bias``: without ``Σδ`` (a layer without bias): what the column sum costs;
* ``eager-quick-tanh``: the eager chain's operations for the same result (the product's float32 copy, the two
  additions, ``2σ(2a) - 1`` in place, the difference, the column sum, ``δ`` rounded to bf16);
* ``compiled-quick-tanh-bf16-sum``: not the library's: ``Σδ`` summed from the bf16-rounded ``δ`` (the operand
  of ``δᵀx``) inside the compiled program, which then need not keep the float32 ``δ`` for its column sum
  (another rounding of the bias gradient than the eager chain's, so the library does not do it).

It also records each compiled variant's first call (its compilation, shorter where the compiler's cache on
this machine already holds it).  Writes ``--out`` (JSON: command, machine, date, records) and prints a table.

    python benchmarks/cpu_residual_kernels.py --out results/cpu-residual-kernels/cpu-x86_64-2threads-DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from locoprop import fused
from locoprop.harness.records import processor
from locoprop.losses import MatchingLoss
from locoprop.transfer import Tanh

VARIANTS = ("compiled-quick-tanh", "compiled-exact-tanh", "compiled-quick-tanh-no-bias", "eager-quick-tanh",
            "compiled-quick-tanh-bf16-sum")


def _eager_residual(loss, product, start_pre, bias_change, target, transfer):
    """The eager bf16 chain's residual on the CPU (``FusedIterativeSolver._products``' float32 copy of the
    product, then ``loss.grad_`` and the column sum), returning what the compiled program returns."""
    pre = torch.empty(product.shape, dtype=torch.float32).copy_(product).add_(start_pre)
    if bias_change is not None:
        pre.add_(bias_change)
    delta = loss.grad_(pre, target, transfer)
    return delta.to(torch.bfloat16), delta.sum(0) if bias_change is not None else None


def _bf16_sum_residual(loss, product, start_pre, bias_change, target, transfer):
    """``compiled-quick-tanh-bf16-sum``: the library's residual with ``Σδ`` of the bf16-rounded ``δ``."""
    pre = product.float() + start_pre
    if bias_change is not None:
        pre = pre + bias_change
    delta = loss.grad_(pre, target, transfer).to(torch.bfloat16)
    return delta, delta.float().sum(0) if bias_change is not None else None


def parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: expected ROWSxCOLUMNS, e.g. 1000x1000") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: both sizes must be at least 1")
    return rows, cols


def time_variant(variant: str, shape: tuple[int, int], repeats: int, flush_mb: int) -> dict:
    """The median and minimum time of ``repeats`` calls of ``variant`` on tensors of ``shape`` (batch, units),
    each after writing ``flush_mb`` MiB of other memory, and the first call's time."""
    torch.manual_seed(0)
    rows, cols = shape
    product = (0.1 * torch.randn(rows, cols)).to(torch.bfloat16)
    start_pre, target = torch.randn(rows, cols), torch.rand(rows, cols) * 1.6 - 0.8
    bias_change = None if variant.endswith("no-bias") else 0.01 * torch.randn(cols)
    transfer = Tanh() if "exact" in variant else Tanh().quick()
    if variant.endswith("bf16-sum"):
        fn = fused.compile_once(_bf16_sum_residual)
    else:
        fn = fused.compile_once(fused._bf16_residual_) if variant.startswith("compiled") else _eager_residual
    flush = torch.empty(max(flush_mb, 0) * 2 ** 18)

    def call():
        return fn(MatchingLoss(), product, start_pre, bias_change, target, transfer)

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        flush.fill_(1.0)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "rows": rows, "columns": cols, "first_call_ms": 1000 * first,
            "ms_median": 1000 * statistics.median(times), "ms_min": 1000 * min(times), "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(1000, 1000), (1000, 500)],
                        help="tensor shapes BATCHxUNITS (default: the standard autoencoder's widest layers at "
                             "batch 1000)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--flush-mb", type=int, default=64, help="MiB written before each call (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    # every variant and shape compiled (not left to run eagerly at torch.compile's default limit of 8)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 256)
    records = []
    for shape in args.shapes:
        for variant in args.variants:
            records.append(time_variant(variant, shape, args.repeats, args.flush_mb))
            r = records[-1]
            print(f"{r['rows']:>6}x{r['columns']:<6} {variant:<30} {r['ms_median']:8.3f} ms "
                  f"(min {r['ms_min']:.3f}; first call {r['first_call_ms']:.0f} ms)")
    meta = {"command": "python " + " ".join([sys.argv[0] if argv is None else "benchmarks/cpu_residual_kernels.py",
                                             *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.date.today().isoformat(), "device": f"cpu-{platform.machine()}-{args.threads}threads",
            "processor": processor(), "torch": torch.__version__, "threads": args.threads}
    if fused._UNCOMPILED:
        raise RuntimeError(f"{sorted(fn.__name__ for fn in fused._UNCOMPILED)} ran uncompiled: the records would "
                           "not time the compiled programs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
