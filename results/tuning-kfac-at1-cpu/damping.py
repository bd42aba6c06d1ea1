"""How large K-FAC's factored damping is against its Kronecker factors, on MNIST with the standard model.

After 5 K-FAC@1 steps with the best setting of this folder (lr 0.01, beta1 0.9, beta2 0.95, eps = damping
1e-2), for each Linear layer: the factors' mean eigenvalue (trace / dim, which the pi-rule balances), the
damping added to each (pi sqrt(lambda) to A, sqrt(lambda) / pi to D), and the share of each factor's
eigenvalues below its damping (directions where the step is the damping's, not the curvature's).
Run from the repository root: .venv/bin/python results/tuning-kfac-at1-cpu/damping.py > results/tuning-kfac-at1-cpu/damping.txt
"""

import datetime
import math
import platform

import torch
import yaml

from locoprop.harness.data import load_dataset
from locoprop.harness.models import AutoencoderLoss, build_autoencoder
from locoprop.harness.optimizers import build_optimizer

best = yaml.safe_load(open("results/tuning-kfac-at1-cpu/best-kfac.yaml"))["settings"]
print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M}Z; machine: {platform.machine()} CPU; "
      f"torch {torch.__version__}; settings: lr {best['lr']}, beta1 {best['beta1']}, beta2 {best['beta2']}, "
      f"eps {best['eps']}")
data = load_dataset("mnist", None, limit_train=5000, limit_test=100)
torch.manual_seed(0)
model, loss_fn = build_autoencoder("standard", "tanh"), AutoencoderLoss()
opt = build_optimizer("kfac", model, loss_fn, lr=best["lr"], beta1=best["beta1"], beta2=best["beta2"],
                      eps=best["eps"])
for i in range(5):
    x = data.train[i * 1000:(i + 1) * 1000]
    loss = opt.step(lambda: loss_fn(model(x), x))
print(f"loss at the 5th step: {float(loss):.2f}")
kfac = opt.optimizer
root = math.sqrt(best["eps"])
print("layer | A: dim, mean eig, damping, eigs below damping | D: dim, mean eig, damping, eigs below damping")
for n, layer in enumerate(kfac._layers):
    st = kfac.state[layer.weight]
    a, d = st["A"].double(), st["D"].double()
    ma, md = float(torch.trace(a)) / a.shape[0], float(torch.trace(d)) / d.shape[0]
    pi = math.sqrt(ma / md)
    ea, ed = torch.linalg.eigvalsh(a), torch.linalg.eigvalsh(d)
    da, dd = pi * root, root / pi
    print(f"{n} {tuple(layer.weight.shape)} | A: {a.shape[0]}, {ma:.3g}, {da:.3g}, {float((ea < da).double().mean()):.0%} "
          f"| D: {d.shape[0]}, {md:.3g}, {dd:.3g}, {float((ed < dd).double().mean()):.0%}")
