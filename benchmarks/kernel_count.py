"""Operations a LocoProp step's local solve issues, counted by the dispatcher, for each order of the fast solver.

On a GPU each counted ATen operation is (at least) one kernel launch, and a captured graph replays them all:
with small products the step's time follows this count (issue 5; ``docs/performance.md``).  This script
runs one step of LocoProp-M on the CPU (the same Python path issues the same operations on CUDA, apart from
the streams' fork and join), counts the non-view ATen operations of its local solve with a
``TorchDispatchMode`` (multi-tensor ``_foreach_*`` operations count once: one launch for up to a few hundred
64K-element chunks on CUDA), and writes them per order and in total; for TF-RMSProp also with the elementwise
work as the CUDA default issues it, as Triton launches (``--elementwise``).

    python benchmarks/kernel_count.py --models standard wide deep --local-steps 10 \\
        --inners tf_rmsprop adam adagrad --out results/kernel-counts/kernel-counts.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import sys
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import locoprop
from locoprop import triton_kernels
from locoprop.fused import SOLVE_ORDERS
from locoprop.harness.records import write_records
from locoprop.update_rules import update_rule_for
from locoprop.harness.models import OUTPUT_TRANSFER, AutoencoderLoss, build_autoencoder


class OperationCount(TorchDispatchMode):
    """Counts the ATen operations dispatched inside it, views left out (they launch nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.paused = False  # inside a stand-in for a Triton launch (counted as one launch by the caller)
        self.counting = False  # inside the counted solve

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and not self.paused:
            self.ops[func.overloadpacket.__name__] += 1
            out = (kwargs or {}).get("out")
            if func is torch.ops.aten.addmm.out and args[0].dim() == 2 and out is not None \
                    and args[0].data_ptr() != out.data_ptr():  # CUDA's addmm first copies a matrix it adds into
                self.ops["addmm:copy"] += 1  # its output, a kernel of its own (a bias vector goes to cuBLASLt's
                # epilogue instead)
        return func(*args, **(kwargs or {}))


def solve_operations(model_name: str, local_steps: int, order: str, batch_size: int = 64,
                     inner: str = "tf_rmsprop", elementwise: str = "torch", precision: str = "fp32",
                     change_in_update: bool | None = None) -> collections.Counter:
    """The operations of one local solve of LocoProp-M (with ``inner`` as inner optimizer) on ``model_name``.

    ``elementwise="triton"``: the elementwise work as the CUDA default issues it (``triton_elementwise``): one Triton
    launch per layer and iteration for the update, counted as ``triton:tf_rmsprop_pair``, and one for ``δ`` and
    ``Σδ`` of every iteration after the first, ``triton:residual_column_sums``; on the CPU each launch's
    arithmetic is done by PyTorch's operations, uncounted (the count is of what the solver issues, which the
    values do not change).  The grouped order (``order="grouped"``, Triton only) counts its two launches per
    iteration for all layers, ``triton:grouped_residual`` and ``triton:grouped_gradient_update``, and leaves
    their arithmetic out (the solve issues the same launches whatever the values).  ``precision="tf32"``: the
    local products as CUDA's TF32 issues them, in the update
    form ``a₀ + x (W - W₀)ᵀ + (b - b₀)`` (on the CPU in float32: the same operations); ``change_in_update``: the
    solver's attribute (``False``: the update form's changes by operations of their own, not by the kernels)."""
    torch.manual_seed(0)
    model = build_autoencoder(model_name, "tanh")
    loss_fn = AutoencoderLoss()
    x = torch.rand(batch_size, 784)
    opt = locoprop.LocoProp(model, variant="M", lr=1e-4, activation_lr=10.0, local_steps=local_steps,
                            output_transfer=OUTPUT_TRANSFER, backend="fused", solve_order=order, inner=inner,
                            triton_elementwise=elementwise == "triton", precision=precision)
    opt.fused_solver.denominators_in_residual = False  # the multi-tensor update as CUDA issues it
    opt.fused_solver.change_in_update = change_in_update
    if precision == "tf32":  # the update form, as on CUDA (the CPU's TF32 is float32's plain product)
        opt.fused_solver.rounds_products = lambda cuda: True
    counter = OperationCount()
    rule, _ = update_rule_for(opt.inner)

    def uncounted(name: str, work) -> None:  # one launch (of the counted solve), its arithmetic uncounted
        counter.ops[f"triton:{name}"] += counter.counting
        counter.paused = True
        try:
            work()
        finally:
            counter.paused = False

    def update_launch(params, grads, states, lr, *hyper, starts=None):
        def work():  # with starts, the launch also writes each tensor's change into its gradient
            rule.update_layers([(params, grads, states, (lr,))])
            for p, g, start in zip(params, grads, starts or []):
                torch.sub(p.detach(), start, out=g)
        uncounted("tf_rmsprop_pair", work)

    def residual_launch(pre, target, bias_grad, transfer, shift=None, base=None, slope=0.0):
        one_block = pre.shape[0] <= triton_kernels.BLOCK_ROWS  # the kernel then writes the bias gradient itself

        def work():
            for added in (base, shift):  # the update form's a₀ and bias change, added as the kernel reads the product
                if added is not None:
                    pre.add_(added)
            [lambda a: a, torch.tanh_, torch.sigmoid_,
             lambda a: a.copy_(torch.where(a > 0, a, a * slope))][transfer](pre).sub_(target)
            if bias_grad is not None and one_block:
                torch.sum(pre, 0, out=bias_grad)
        uncounted("residual_column_sums", work)
        if bias_grad is not None and not one_block:  # the sum of the tiles' column sums, as residual_ issues it
            torch.sum(pre, 0, out=bias_grad)
        return pre

    def grouped_launch(name: str):  # the grouped order's launches; their arithmetic left out (not the count's)
        return lambda *args, **kwargs: uncounted(name, lambda: None)

    with contextlib.ExitStack() as stack:
        if elementwise == "triton":
            stack.enter_context(mock.patch.object(triton_kernels, "available", lambda device: True))
            stack.enter_context(mock.patch.object(triton_kernels, "tf_rmsprop_update_", update_launch))
            stack.enter_context(mock.patch.object(triton_kernels, "residual_", residual_launch))
            stack.enter_context(mock.patch.object(triton_kernels, "grouped_compile", lambda *args: None))
            for name in ("grouped_residual", "grouped_gradient_update"):
                stack.enter_context(mock.patch.object(triton_kernels, name + "_", grouped_launch(name)))
        opt.step(lambda: loss_fn(model(x), x))  # creates the inner state, as on every later step
        solver, run = opt.fused_solver, opt.fused_solver._run

        def counted(*args, **kwargs):
            counter.counting = True
            with counter:
                run(*args, **kwargs)

        solver._run = counted
        opt.step(lambda: loss_fn(model(x), x))
    return counter.ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["standard"])
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1000,
                   help="rows of the batch (the Triton residual adds a sum of its tiles' sums above 128 rows)")
    p.add_argument("--inners", nargs="+", default=["tf_rmsprop"], help="inner optimizers (locoprop.inner names)")
    p.add_argument("--elementwise", nargs="+", default=["torch", "triton"],
                   choices=["torch", "triton", "triton-nochange"],
                   help="the elementwise work as PyTorch's operations, or as the Triton kernels (TF-RMSProp only; "
                        "triton-nochange: the update form's weight change by operations of their own)")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "tf32"],
                   help="the local products' precision; tf32 as CUDA runs it, in the update form")
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = p.parse_args(argv)
    records = []
    for model_name in args.models:
        for inner in args.inners:
            for elementwise, precision in [(e, q) for q in args.precisions for e in args.elementwise]:
                if elementwise != "torch" and inner != "tf_rmsprop":  # the only rule with a Triton kernel
                    continue
                if elementwise == "triton-nochange" and precision == "fp32":  # no update form: nothing changes
                    continue
                for order in SOLVE_ORDERS:
                    if order == "grouped" and elementwise != "triton":  # its kernels are Triton's (else the
                        continue  # layer-major order runs, with a warning)
                    ops = solve_operations(model_name, args.local_steps, order, args.batch_size, inner,
                                           elementwise.split("-")[0], precision,
                                           False if elementwise.endswith("nochange") else None)
                    records.append({"model": model_name, "local_steps": args.local_steps, "batch_size": args.batch_size,
                                    "inner": inner, "elementwise": elementwise, "precision": precision, "order": order,
                                    "operations": sum(ops.values()),
                                    "per_iteration": sum(ops.values()) / args.local_steps, "by_name": dict(ops)})
                    print(f"{model_name:9} T={args.local_steps:<3} {inner:10} {elementwise:15} {precision:5} "
                          f"{order:16} {sum(ops.values()):6d} operations "
                          f"({sum(ops.values()) / args.local_steps:.1f} per iteration)", flush=True)
    if args.out:
        meta = {"command": " ".join(["python"] + sys.argv), "date": datetime.date.today().isoformat(),
                "torch": torch.__version__, "what": "non-view ATen operations of one local solve of LocoProp-M, "
                "counted by a TorchDispatchMode on the CPU (the fast solver's eager path; compile_elementwise "
                "off; without the CUDA streams' fork and join); with elementwise triton, each Triton launch (the "
                "CUDA default: the update, and δ with Σδ; the grouped order's two launches an iteration for all "
                "layers) counts as one operation"}
        write_records(args.out, meta, records, readme)
    return 0


def readme(meta: dict, records: list[dict], json_name: str) -> str:
    """A Markdown page of the counts (written beside the JSON; nothing in it typed by hand)."""
    lines = ["# Operations of one local solve, by order of the fast solver", "",
             f"Written by `benchmarks/kernel_count.py` with `{json_name}` (its docstring says what is counted): "
             f"{meta['what']}. Command: `{meta['command']}`; torch {meta['torch']}; {meta['date']}.", "",
             "| model | batch | T | inner optimizer | elementwise | precision | order | operations | per iteration | "
             "update's operations |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        update = sum(c for n, c in r["by_name"].items()
                     if n.startswith(("_foreach", "triton:tf_rmsprop", "triton:grouped_gradient_update")))
        lines.append(f"| {r['model']} | {r.get('batch_size', 64)} | {r['local_steps']} | {r.get('inner', 'tf_rmsprop')} | "
                     f"{r.get('elementwise', 'torch')} | {r.get('precision', 'fp32')} | {r['order']} | "
                     f"{r['operations']} | {r['per_iteration']:.1f} | "
                     f"{update} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
