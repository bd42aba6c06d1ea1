#!/usr/bin/env bash
# Why Shampoo@1 does not fit a 15-minute device lease: the size of its checkpoint (the device returns files of
# at most 16 MB) and where one step's time goes on this CPU. Run from the repository root:
#   bash results/shampoo-cost-cpu/run.sh      (writes results/shampoo-cost-cpu/out.txt)
set -euo pipefail
OUT=results/shampoo-cost-cpu/out.txt
PY=${PYTHON:-.venv/bin/python}
W=$(mktemp -d)
{
  echo "date: $(date -u +%FT%TZ); machine: $(uname -m), $(nproc) cores; torch $($PY -c 'import torch; print(torch.__version__)')"
  echo "\$ locoprop train --optimizer shampoo --lr 1e-4 --beta1 0.9 --epochs 2 --warmup-epochs 0 --limit-train 2000 --limit-test 1000"
  ${LOCOPROP:-.venv/bin/locoprop} train --optimizer shampoo --lr 1e-4 --beta1 0.9 --epochs 2 --warmup-epochs 0 \
      --limit-train 2000 --limit-test 1000 --data-dir ${DATA_DIR:-../shared/data/mnist} --out "$W/run" --no-progress | tail -1
  echo "checkpoint bytes: $(stat -c %s "$W/run/checkpoint.pt")"
  OMP_NUM_THREADS=2 PYTHONPATH=src $PY - <<'PY'
import time
import torch
from torch.profiler import ProfilerActivity, profile
from locoprop.harness.models import AutoencoderLoss, build_autoencoder
from locoprop.harness.optimizers import build_optimizer
torch.manual_seed(0)
model, loss_fn, x = build_autoencoder("standard", "tanh"), AutoencoderLoss(), torch.rand(1000, 784)
opt = build_optimizer("shampoo", model, loss_fn, lr=1e-4, beta1=0.9)  # @1: roots every step
for _ in range(2):
    opt.step(lambda: loss_fn(model(x), x))
t = time.perf_counter()
opt.step(lambda: loss_fn(model(x), x))
print(f"one Shampoo@1 step, standard model, batch 1000, 2 threads: {time.perf_counter() - t:.2f} s")
with profile(activities=[ProfilerActivity.CPU]) as prof:
    opt.step(lambda: loss_fn(model(x), x))
mm = [e for e in prof.key_averages() if e.key == "aten::mm"][0]
print(f"matrix products (aten::mm) in one step: {mm.count}, {mm.self_cpu_time_total / 1e3:.0f} ms of it")
PY
} 2>&1 | grep -v -e USDT -e CPUAllocator > "$OUT"  # the profiler's own chatter left out
rm -rf "$W"
cat "$OUT"
