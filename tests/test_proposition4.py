"""Proposition 4: with a matching loss in the last layer and γ = 1, the last layer's local
objective is the network loss plus the regularizer."""

import copy

import pytest
import torch
from torch import nn

import locoprop
from locoprop.transfer import Sigmoid, Softmax


@pytest.mark.parametrize("output", ["sigmoid", "softmax"])
def test_last_layer_local_objective_is_network_loss_plus_regularizer(output):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    transfer = Sigmoid() if output == "sigmoid" else Softmax()
    if output == "sigmoid":
        y = torch.rand(16, 6, dtype=torch.float64)  # soft targets in (0, 1)
    else:
        y = torch.softmax(torch.randn(16, 6, dtype=torch.float64), -1)

    def network_loss(m):  # the matching loss of the output transfer, summed over the batch
        return transfer.matching_loss(m(x), y).sum()

    coef = 0.3
    original = copy.deepcopy(model)
    opt = locoprop.LocoProp(model, variant="M", lr=0.01, activation_lr=1.0, local_steps=3, inner="sgd",
                            output_transfer=output, regularizer=locoprop.L2Proximity(coef), retain_problems=True)
    opt.step(lambda: network_loss(model))
    last = original[2]
    for trial in range(4):
        W = last.weight.detach() + 0.3 * torch.randn_like(last.weight)
        b = last.bias.detach() + 0.3 * torch.randn_like(last.bias)
        probe = copy.deepcopy(original)
        with torch.no_grad():
            probe[2].weight.copy_(W)
            probe[2].bias.copy_(b)
        reg = 0.5 * coef * ((W - last.weight) ** 2).sum() + 0.5 * coef * ((b - last.bias) ** 2).sum()
        expected = network_loss(probe) + reg
        got = opt.local_objective(-1, [W, b])
        torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)


def test_proposition4_fails_for_gamma_not_one():
    """The identity needs γ = 1: with γ = 0.5 the objectives differ (the test above can fail)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    y = torch.rand(16, 6, dtype=torch.float64)
    original = copy.deepcopy(model)
    loss = lambda m: Sigmoid().matching_loss(m(x), y).sum()  # noqa: E731
    opt = locoprop.LocoProp(model, variant="M", lr=0.01, activation_lr=0.5, local_steps=1, inner="sgd",
                            output_transfer="sigmoid", retain_problems=True)
    opt.step(lambda: loss(model))
    W = original[2].weight.detach() + 0.3
    probe = copy.deepcopy(original)
    with torch.no_grad():
        probe[2].weight.copy_(W)
    got = opt.local_objective(-1, [W, original[2].bias.detach()])
    assert not torch.allclose(got, loss(probe).detach(), rtol=1e-3)


def test_binary_cross_entropy_is_the_sigmoid_matching_loss_for_binary_targets():
    a = torch.randn(50, 7, dtype=torch.float64)
    y = torch.randint(0, 2, (50, 7)).double()
    bce = nn.functional.binary_cross_entropy_with_logits(a, y, reduction="none").sum(-1)
    torch.testing.assert_close(Sigmoid().matching_loss(a, y), bce)
