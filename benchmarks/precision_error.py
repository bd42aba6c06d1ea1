"""How far one LocoProp-M step with reduced-precision local products lands from the FP32 step (issue 5).

From one state of the standard MNIST autoencoder (``--warm-steps`` FP32 steps at the settings' learning rate
after the seeded initialisation), every mode takes the same step on the same batch, and the script reports
``|Δθ_mode - Δθ_fp32| / |Δθ_fp32|`` over all weights and biases, for the settings given (default: the
authors' notebook defaults, γ = 10, and the tuned settings of the CPU studies, γ = 500).  Modes:

* ``bf16``: the library's bf16 local products on this device, in the update form
  ``a₀ + x (W - W₀)ᵀ + (b - b₀)`` (only the product of the weights' change rounded; ``locoprop.fused``);
* ``bf16-rounded-output``: plain bf16 products ``x Wᵀ``, bf16 operands, float32 accumulation, the result
  rounded to bf16 (PyTorch's bf16 product; the library's CPU path before the update form);
* ``bf16-float32-output``: plain bf16 products with a float32 result (on the CPU emulated with a float32
  product of the rounded operands);
* ``tf32`` (CUDA only; in the update form) and ``tf32-plain`` (CUDA only: plain TF32 products ``x Wᵀ``);
* ``tf32-emulated`` / ``tf32-emulated-plain`` (any device): TF32's operand rounding emulated (the float32
  operands rounded to TF32's 10-bit mantissa, to nearest with ties away from zero, as the conversion of
  NVIDIA's tensor cores does; then float32 products) in the update form and in plain products: an estimate
  of TF32's error on a machine without a GPU (the GPU's own accumulation order is not emulated);
* ``bf16-forward-only`` / ``bf16-wgrad-only``: plain bf16 (rounded result) in the pre-activation's product
  only, or in the weight gradient's only, the other in float32: which of the two products costs the accuracy;
* ``bf16-exact-tanh``: ``bf16`` with the local iterations' ``tanh`` evaluated by ``torch.tanh`` (the library's
  bf16 on the CPU takes ``2σ(2a) - 1``, :class:`locoprop.transfer.TanhViaSigmoid`; on CUDA both modes are
  ``torch.tanh``), and ``fp32-quick-tanh``: the fast solver in FP32 with ``2σ(2a) - 1`` alone: what the
  quick ``tanh`` adds to bf16's error, and its own.

The step's residual ``f(a) - y`` is a small difference of two numbers of the size of the activations when γ
is small, so an error of the pre-activation's product relative to the activation (a plain product's, from
its operands or its result) is large beside the residual; the update form's error is relative to the
change of the pre-activation.  Writes ``--out`` (JSON: command, device, date, rows) and prints a table.

    python benchmarks/precision_error.py --data-dir ../shared/data/mnist --out results/precision-error/cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from locoprop.fused import FusedIterativeSolver
from locoprop.harness.data import load_dataset
from locoprop.harness.models import AutoencoderLoss, build_autoencoder
from locoprop.harness.optimizers import build_optimizer

SETTINGS = {  # name -> (lr, gamma, beta1, beta2, eps)
    "notebook-defaults": (1e-5, 10.0, 0.999, 0.9, 1e-5),
    "tuned-cpu-study": (8.06e-6, 500.0, 0.976, 0.931, 7.3e-9),
}


def _bf16(t):
    return t.to(torch.bfloat16).float()


def _products_with(output: str):
    """A replacement for ``FusedIterativeSolver._products``: plain bf16 products (``x Wᵀ``, not the library's
    update form) that round their result, or bf16 in one of the two products only (a float32 result:
    :func:`_rounded_operand_products`)."""
    def products(self, x, start=None):  # plain products: the step's start is ignored
        xb = x.to(torch.bfloat16)
        if output in ("forward-only", "wgrad-only"):
            def pre(W, b, out, free=None):
                if output == "forward-only":
                    return torch.add(xb @ W.to(torch.bfloat16).T, b, out=out)
                return torch.addmm(b, x, W.T, out=out)

            def wgrad(delta, out):
                if output == "wgrad-only":
                    return out.copy_(delta.to(torch.bfloat16).T @ xb)
                return torch.mm(delta.T, x, out=out)
            return pre, wgrad
        def pre(W, b, out, free=None):  # "bfloat16": the product's result rounded to bf16
            product = xb @ W.to(torch.bfloat16).T
            return out.copy_(product) if b is None else torch.add(product, b, out=out)

        def wgrad(delta, out):
            out.copy_(delta.to(torch.bfloat16).T @ xb)
        return pre, wgrad
    return products


def _tf32(t):
    """``t`` (float32) rounded to TF32: 10 mantissa bits, to nearest with ties away from zero (the sign is a
    separate bit, so adding half of the dropped bits' unit to the integer pattern rounds the magnitude)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def _rounded_operand_products(rounded, update_form: bool):
    """A replacement for ``FusedIterativeSolver._products`` whose float32 products take operands rounded by
    ``rounded`` (``_bf16``, ``_tf32``: a reduced-precision product with an unrounded float32 result,
    emulated), in the library's update form ``a₀ + x (W - W₀)ᵀ + (b - b₀)`` or plain ``x Wᵀ + b``."""
    def products(self, x, start=None):
        xr = rounded(x)

        def wgrad(delta, out):
            torch.mm(rounded(delta).T, xr, out=out)
        if update_form:
            a0, (W0, *b0) = start

            def pre(W, b, out, free=None):
                torch.addmm(a0, xr, rounded(W - W0).T, out=out)
                return out if b is None else out.add_(b - b0[0])
        else:
            def pre(W, b, out, free=None):
                Wr = rounded(W)
                return torch.mm(xr, Wr.T, out=out) if b is None else torch.addmm(b, xr, Wr.T, out=out)
        return pre, wgrad
    return products


@contextlib.contextmanager
def _patched(output: str | None):
    """The solver's products replaced for one mode (``None``: the library's own); the emulated update form also
    needs the step's start kept, as LocoProp keeps it where the products round."""
    if output is None:
        yield
        return
    if output in ("exact-transfers", "quick-transfers"):  # the library's products, tanh one way or the other
        quick = FusedIterativeSolver.uses_quick_transfers
        FusedIterativeSolver.uses_quick_transfers = lambda self, device: output == "quick-transfers"
        try:
            yield
        finally:
            FusedIterativeSolver.uses_quick_transfers = quick
        return
    original, rounds = FusedIterativeSolver._products, FusedIterativeSolver.rounds_products
    if output.startswith("tf32-"):
        FusedIterativeSolver._products = _rounded_operand_products(_tf32, update_form=output == "tf32-update-form")
        FusedIterativeSolver.rounds_products = lambda self, cuda: output == "tf32-update-form"
    elif output == "float32":  # plain bf16 products with a float32 result, emulated
        FusedIterativeSolver._products = _rounded_operand_products(_bf16, update_form=False)
    elif output == "plain":
        FusedIterativeSolver.rounds_products = lambda self, cuda: False
    else:
        FusedIterativeSolver._products = _products_with(output)
    try:
        yield
    finally:
        FusedIterativeSolver._products, FusedIterativeSolver.rounds_products = original, rounds


MODES = {  # mode -> (precision, products patch)
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "bf16-rounded-output": ("bf16", "bfloat16"),
    "bf16-float32-output": ("bf16", "float32"),
    "tf32": ("tf32", None),
    "tf32-plain": ("tf32", "plain"),
    "tf32-emulated": ("tf32", "tf32-update-form"),  # "tf32" selects the fast solver on the CPU too
    "tf32-emulated-plain": ("tf32", "tf32-plain"),
    "bf16-forward-only": ("bf16", "forward-only"),
    "bf16-wgrad-only": ("bf16", "wgrad-only"),
    "bf16-exact-tanh": ("bf16", "exact-transfers"),
    "fp32-quick-tanh": ("fp32", "quick-transfers"),  # the fast solver in FP32 (the CPU's default is the loop)
}


def _optimizer(model, loss_fn, settings, precision):
    lr, gamma, beta1, beta2, eps = settings
    return build_optimizer("locoprop-m", model, loss_fn, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                           activation_lr=gamma, local_steps=10, precision=precision)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--warm-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    modes = [m for m in MODES if m not in ("tf32", "tf32-plain") or device.type == "cuda"]
    data = load_dataset("mnist", args.data_dir, device=device, limit_train=args.batch_size * (args.warm_steps + 1))
    batches = data.train.split(args.batch_size)
    loss_fn = AutoencoderLoss()
    rows = []
    for name in args.settings:
        torch.manual_seed(0)
        model = build_autoencoder("standard", "tanh", device=device)
        opt = _optimizer(model, loss_fn, SETTINGS[name], "fp32")
        for x in batches[:args.warm_steps]:
            opt.step(lambda: loss_fn(model(x), x))
        start = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        x = batches[args.warm_steps]
        updates = {}
        for mode in modes:
            precision, output = MODES[mode]
            m = build_autoencoder("standard", "tanh", device=device)
            m.load_state_dict(start[0])
            o = _optimizer(m, loss_fn, SETTINGS[name], precision)
            o.load_state_dict(start[1])
            if output == "quick-transfers":
                o.backend = "fused"
            with _patched(output):
                o.step(lambda: loss_fn(m(x), x))
            updates[mode] = torch.cat([(a - b).flatten() for a, b in zip(m.state_dict().values(),
                                                                         start[0].values())])
        ref = updates["fp32"]
        for mode in modes[1:]:
            err = ((updates[mode] - ref).norm() / ref.norm()).item()
            rows.append({"settings": name, "mode": mode, "update_error_vs_fp32": err,
                         "update_norm_fp32": ref.norm().item()})
            print(f"{name:20s} {mode:22s} |Δθ - Δθ_fp32| / |Δθ_fp32| = {err:.3e}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, " \
            f"{torch.get_num_threads()} threads)"
        out.write_text(json.dumps({
            "command": " ".join(["python"] + sys.argv), "device": dev, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "warm_steps": args.warm_steps, "batch_size": args.batch_size,
            "settings": {k: dict(zip(("lr", "activation_lr", "beta1", "beta2", "eps"), SETTINGS[k]))
                         for k in args.settings},
            "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
