"""Closed forms: LocoProp-S's implicit update (Sec. 2.1), Proposition 1 (Eq. 15 = K-FAC Eq. 14)."""

import copy

import pytest
import torch
from torch import nn

import locoprop
from conftest import bce_sum_mean, mixed_mlp


def _augmented_inputs_and_grads(model, x, loss_fn):
    """Per Linear layer: x̃ = [input, 1] and G_a = ∂L/∂â, computed here with plain autograd."""
    inputs, pres = [], []

    def record(module, inp, out):
        inputs.append(inp[0].detach())
        pres.append(out)

    hooks = [m.register_forward_hook(record) for m in model if isinstance(m, nn.Linear)]
    loss = loss_fn(model)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, pres)
    xs = [torch.cat([i, torch.ones_like(i[:, :1])], 1) for i in inputs]
    return xs, [g.detach() for g in grads]


def _joined(lin):
    return torch.cat([lin.weight, lin.bias[:, None]], 1)


@pytest.mark.parametrize("batch", [6, 40])  # smaller and larger than the input widths (Woodbury or not)
def test_closed_form_equals_paper_formula(batch):
    """ΔW = -η_e ∇_W L (I + η x̃x̃ᵀ)⁻¹ (Sec. 2.1), both branches of the solver."""
    eta, gamma = 0.3, 0.8
    model = mixed_mlp()
    x = torch.rand(batch, 12, dtype=torch.float64)
    loss_fn = lambda m: bce_sum_mean(m(x), x)  # noqa: E731
    xs, gs = _augmented_inputs_and_grads(model, x, loss_fn)
    before = [_joined(m).detach().clone() for m in model if isinstance(m, nn.Linear)]
    opt = locoprop.LocoProp(model, variant="S-closed", lr=eta, activation_lr=gamma, output_transfer="sigmoid")
    opt.step(lambda: loss_fn(model))
    for lin, w0, xt, ga in zip([m for m in model if isinstance(m, nn.Linear)], before, xs, gs):
        grad_w = ga.T @ xt
        n1 = xt.shape[1]
        expected = w0 - eta * gamma * grad_w @ torch.linalg.inv(torch.eye(n1, dtype=xt.dtype) + eta * xt.T @ xt)
        torch.testing.assert_close(_joined(lin).detach(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant,closed", [("S", "S-closed"), ("S-natural", "S-natural-closed")])
def test_closed_form_is_the_limit_of_local_sgd_iterations(variant, closed):
    """Many local SGD steps on ½‖x̃Θ - a‖² + (1/2η)‖Θ - Θ₀‖² converge to the closed form."""
    eta, gamma = 0.5, 1.0
    model = mixed_mlp()
    x = torch.rand(24, 12, dtype=torch.float64) * 0.5
    loss_fn = lambda m: bce_sum_mean(m(x), x)  # noqa: E731
    xs, _ = _augmented_inputs_and_grads(model, x, loss_fn)
    step = 1.0 / (max(torch.linalg.eigvalsh(xt.T @ xt).max().item() for xt in xs) + 1.0 / eta)
    m_closed, m_iter = copy.deepcopy(model), copy.deepcopy(model)
    opt_c = locoprop.LocoProp(m_closed, variant=closed, lr=eta, activation_lr=gamma, output_transfer="sigmoid")
    opt_c.step(lambda: loss_fn(m_closed))
    opt_i = locoprop.LocoProp(m_iter, variant=variant, lr=step, activation_lr=gamma, local_steps=4000,
                              inner="sgd", lr_decay=False, regularizer=locoprop.L2Proximity(1.0 / eta),
                              output_transfer="sigmoid")
    opt_i.step(lambda: loss_fn(m_iter))
    for (name, p), q in zip(m_iter.named_parameters(), m_closed.parameters()):
        err = ((p - q).norm() / q.norm()).item()
        assert err < 1e-5, f"{name}: {err:.3g}"
    # and the iterations did move away from BackProp towards it
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), m_closed.parameters()))


def test_proposition_1_natural_gradient_targets_recover_kfac():
    """Eq. 15 equals the K-FAC update of Eq. 14, W - γ D⁻¹ G X⁻¹, with damping 1/η on X = x̃ᵀx̃."""
    eta, gamma, damping = 0.4, 0.9, 1e-2
    model = mixed_mlp()
    b = 30
    x = torch.rand(b, 12, dtype=torch.float64)
    loss_fn = lambda m: bce_sum_mean(m(x), x)  # noqa: E731
    xs, gs = _augmented_inputs_and_grads(model, x, loss_fn)
    before = [_joined(m).detach().clone() for m in model if isinstance(m, nn.Linear)]
    target = locoprop.NaturalGradientTarget(damping=damping, fisher="empirical")
    opt = locoprop.LocoProp(model, variant="S-natural-closed", target=target, lr=eta, activation_lr=gamma,
                            output_transfer="sigmoid")
    opt.step(lambda: loss_fn(model))
    for lin, w0, xt, ga in zip([m for m in model if isinstance(m, nn.Linear)], before, xs, gs):
        per_example = b * ga  # per-example gradients of the batch-mean loss
        D = per_example.T @ per_example / b + damping * torch.eye(ga.shape[1], dtype=ga.dtype)
        X = xt.T @ xt + (1.0 / eta) * torch.eye(xt.shape[1], dtype=xt.dtype)
        G = ga.T @ xt
        expected = w0 - gamma * torch.linalg.solve(D, G) @ torch.linalg.inv(X)
        torch.testing.assert_close(_joined(lin).detach(), expected, rtol=1e-8, atol=1e-12)


def test_sampled_fisher_targets_run_and_differ_from_empirical():
    model = mixed_mlp()
    x = torch.rand(20, 12, dtype=torch.float64)
    loss_fn = lambda m: bce_sum_mean(m(x), x)  # noqa: E731
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = locoprop.LocoProp(a, variant="S-natural-closed", lr=0.1, output_transfer="sigmoid",
                              target=locoprop.NaturalGradientTarget(fisher="sampled"))
    opt_b = locoprop.LocoProp(b, variant="S-natural-closed", lr=0.1, output_transfer="sigmoid")
    opt_a.step(lambda: loss_fn(a))
    opt_b.step(lambda: loss_fn(b))
    assert all(torch.isfinite(p).all() for p in a.parameters())
    assert any(not torch.allclose(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_closed_form_rejects_a_matching_loss():
    with pytest.raises(ValueError, match="closed_form"):
        locoprop.LocoProp(mixed_mlp(), variant="M", solver="closed_form")
