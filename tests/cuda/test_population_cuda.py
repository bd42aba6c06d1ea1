"""A population on CUDA (locoprop.harness.population): every member equals its separate run there."""

import copy

import pytest
import torch

from locoprop.harness.models import AutoencoderLoss, build_autoencoder
from locoprop.harness.optimizers import build_optimizer
from locoprop.harness.population import Member, Population

DEV = torch.device("cuda")
MEMBERS = {"locoprop-m": [Member(lr=1e-5, beta1=0.97, beta2=0.93, eps=1e-8, activation_lr=500.0),
                          Member(lr=3e-5, beta1=0.9, beta2=0.99, eps=1e-9, activation_lr=100.0)],
           "rmsprop": [Member(lr=6e-4, beta1=0.91, beta2=0.98, eps=1e-8), Member(lr=2e-3, beta1=0.5)]}


@pytest.mark.parametrize("name", ["locoprop-m", "rmsprop"])
def test_members_equal_their_separate_runs_on_cuda(name):
    """6 steps of the standard model at batch 500, FP32: weights within 1e-5 relative of separate runs (the
    separate LocoProp run takes the default CUDA path: the fast solver and its captured solve)."""
    torch.manual_seed(0)
    model = build_autoencoder("standard", "tanh", device=DEV)
    g = torch.Generator(device=DEV).manual_seed(3)
    batches = [torch.rand(500, 784, device=DEV, generator=g) for _ in range(6)]
    pop = Population(model, name, MEMBERS[name], local_steps=10)
    for x in batches:
        pop.step(x, 1.0)
    loss_fn = AutoencoderLoss()
    for j, m in enumerate(MEMBERS[name]):
        alone = copy.deepcopy(model)
        opt = build_optimizer(name, alone, loss_fn, lr=m.lr, beta1=m.beta1, beta2=m.beta2, eps=m.eps,
                              activation_lr=m.activation_lr, local_steps=10)
        for x in batches:
            opt.step(lambda: loss_fn(alone(x), x))
        mine = pop.member_model(j, copy.deepcopy(model))
        rel = max(((a - b).norm() / a.norm()).item() for a, b in zip(alone.parameters(), mine.parameters()))
        moved = max(((a - b).norm() / b.norm()).item() for a, b in zip(alone.parameters(), model.parameters()))
        assert rel < 1e-5 and moved > 1e-3, (j, rel, moved)
