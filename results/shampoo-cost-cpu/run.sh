#!/usr/bin/env bash
# What Shampoo@1 costs and how exact its inverse roots are: the size of its checkpoint (the device returns
# files of at most 16 MB), where one step's time goes on this CPU with the library's Newton roots, the same
# step with shampoo_root=eigh, and how far the library's float32 Newton roots lie from the ridged roots
# they aim at, on the first MNIST steps of the standard model. Run from the repository root:
#   bash results/shampoo-cost-cpu/run.sh      (writes results/shampoo-cost-cpu/out.txt)
set -euo pipefail
OUT=results/shampoo-cost-cpu/out.txt
PY=${PYTHON:-.venv/bin/python}
W=$(mktemp -d)
{
  echo "date: $(date -u +%FT%TZ); machine: $(uname -m), $(nproc) cores; torch $($PY -c 'import torch; print(torch.__version__)'); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "\$ locoprop train --optimizer shampoo --lr 1e-4 --beta1 0.9 --epochs 2 --warmup-epochs 0 --limit-train 2000 --limit-test 1000"
  ${LOCOPROP:-.venv/bin/locoprop} train --optimizer shampoo --lr 1e-4 --beta1 0.9 --epochs 2 --warmup-epochs 0 \
      --limit-train 2000 --limit-test 1000 --data-dir ${DATA_DIR:-../shared/data/mnist} --out "$W/run" --no-progress | tail -1
  echo "checkpoint bytes: $(stat -c %s "$W/run/checkpoint.pt")"
  OMP_NUM_THREADS=2 PYTHONPATH=src $PY - <<'PY'
import time
import torch
from torch.profiler import ProfilerActivity, profile
import pytorch_optimizer.optimizer.utils.preconditioner as pc_module
from locoprop.harness.baselines import _eigh_inverse_root
from locoprop.harness.data import load_dataset
from locoprop.harness.models import AutoencoderLoss, build_autoencoder
from locoprop.harness.optimizers import build_optimizer
torch.manual_seed(0)
x = torch.rand(1000, 784)
times = {}
for root in ("newton", "eigh", "newton", "eigh"):  # interleaved, so that both see the same load
    torch.manual_seed(0)
    model, loss_fn = build_autoencoder("standard", "tanh"), AutoencoderLoss()
    opt = build_optimizer("shampoo", model, loss_fn, lr=1e-4, beta1=0.9, shampoo_root=root)  # @1
    for _ in range(2):
        opt.step(lambda: loss_fn(model(x), x))
    t = time.perf_counter()
    for _ in range(3):
        opt.step(lambda: loss_fn(model(x), x))
    times.setdefault(root, []).append((time.perf_counter() - t) / 3)
    if root == "newton" and len(times[root]) == 1:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step(lambda: loss_fn(model(x), x))
        mm = [e for e in prof.key_averages() if e.key == "aten::mm"][0]
        print(f"matrix products (aten::mm) in one Newton-root step: {mm.count}, {mm.self_cpu_time_total / 1e3:.0f} ms of it")
for root, ts in times.items():
    print(f"one Shampoo@1 step, standard model, batch 1000, 2 threads, shampoo_root={root}: "
          + ", ".join(f"{t:.2f}" for t in ts) + " s (two passes)")

# the library's Newton roots against the ridged roots they approximate, first MNIST steps
original = pc_module.compute_power_schur_newton
gaps = []
def measured_newton(mat_g, p, ridge_epsilon=1e-6, **kwargs):
    root = original(mat_g, p, ridge_epsilon=ridge_epsilon, **kwargs)
    exact = _eigh_inverse_root(mat_g, p, ridge_epsilon)
    gaps.append(float((root - exact).norm() / exact.norm()))
    return root
pc_module.compute_power_schur_newton = measured_newton
data = load_dataset("mnist", None, limit_train=3000, limit_test=100)
for eps in (1.4367255171576717e-09, 1e-6, 1e-3):
    torch.manual_seed(0)
    model, loss_fn = build_autoencoder("standard", "tanh"), AutoencoderLoss()
    opt = build_optimizer("shampoo", model, loss_fn, lr=4.8e-5, beta1=0.998, beta2=0.953, eps=eps)
    for i in range(3):
        xb = data.train[i * 1000:(i + 1) * 1000]
        gaps.clear()
        opt.step(lambda: loss_fn(model(xb), xb))
        print(f"matrix_eps={eps:.3g}, MNIST step {i}: {len(gaps)} Newton roots, {sum(g > 1e-2 for g in gaps)} more "
              f"than 1% from the ridged root (relative Frobenius distance: largest {max(gaps):.3g}, median "
              f"{sorted(gaps)[len(gaps) // 2]:.3g})")
PY
} 2>&1 | grep -v -e USDT -e CPUAllocator > "$OUT"  # the profiler's own chatter left out
rm -rf "$W"
cat "$OUT"
