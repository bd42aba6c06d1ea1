"""Local losses and regularizers: closed-form gradients equal autograd of their values (Eqs. 2, 17, 19; App. E.3)."""

import pytest
import torch

import locoprop
from locoprop.layers import Layer, LayerBatch
from locoprop.losses import DualMatchingLoss, MatchingLoss, SquaredPostLoss, SquaredPreLoss
from locoprop.regularizers import FisherProximity, L1Proximity, L2Proximity
from locoprop.transfer import get_transfer

LOSSES = [SquaredPreLoss(), MatchingLoss(), SquaredPostLoss(), DualMatchingLoss()]
TRANSFERS = ["linear", "tanh", "sigmoid", "softmax", "softplus", "arctan", "elu", "leaky_relu"]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: type(l).__name__)
@pytest.mark.parametrize("name", TRANSFERS)
def test_local_loss_gradient_is_autograd_of_its_value(loss, name):
    t = get_transfer(name)
    pre = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    if loss.domain == "post":
        target = t.f(torch.randn(7, 5, dtype=torch.float64))  # inside the range
    else:
        target = torch.randn(7, 5, dtype=torch.float64)
    (expected,) = torch.autograd.grad(loss.value(pre, target, t), pre)
    torch.testing.assert_close(loss.grad(pre.detach(), target, t), expected)


@pytest.mark.parametrize("name", ["linear", "tanh", "softmax"])
def test_step_targets_and_the_matching_gradient_write_only_into_their_own_new_tensors(name):
    """The four targets ``base - γ∇`` (Algorithms 1-4) and the matching loss's gradient ``f(â) - y`` (Eq. 2)
    are the formula to the bit, computed in place in ``f(â)`` where that is a new tensor (one activation set
    less while a step's problems are built), never in the batch's own tensors (the identity returns ``â``
    itself), and a backward pass through them still works."""
    t = get_transfer(name)
    lin = torch.nn.Linear(6, 5)
    pre = torch.randn(9, 5)
    batch = LayerBatch(Layer("l", lin, t), torch.randn(9, 6), pre.clone(), grad_pre=torch.randn(9, 5),
                       grad_post=torch.randn(9, 5))
    kept = {k: getattr(batch, k).clone() for k in ("pre", "grad_pre", "grad_post")}
    formulas = {locoprop.GDTarget(): pre - 0.3 * batch.grad_pre, locoprop.MDTarget(): t.f(pre) - 0.3 * batch.grad_pre,
                locoprop.PostGDTarget(): t.f(pre) - 0.3 * batch.grad_post, locoprop.DualMDTarget(): pre - 0.3 * batch.grad_post}
    for target, expected in formulas.items():
        got = target(batch, 0.3)
        assert torch.equal(got, expected), target
        assert got.untyped_storage().data_ptr() != batch.pre.untyped_storage().data_ptr()
        y = t.f(torch.randn(9, 5))
        assert torch.equal(MatchingLoss().grad(batch.pre, y, t), t.f(pre) - y)
        for k, v in kept.items():
            assert torch.equal(getattr(batch, k), v), f"{target!r} changed the batch's {k}"
    a = pre.clone().requires_grad_()  # inside autograd: nothing in place that its backward pass reads
    (g,) = torch.autograd.grad(MatchingLoss().grad(a, y, t).square().sum(), a)
    (g_formula,) = torch.autograd.grad((t.f(a) - y).square().sum(), a)
    assert torch.equal(g, g_formula)


def _batch(bias=True):
    lin = torch.nn.Linear(6, 4, bias=bias).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    pre = lin(x).detach()
    return LayerBatch(Layer("l", lin, get_transfer("tanh")), x, pre, grad_pre=torch.randn_like(pre) / 9), lin


@pytest.mark.parametrize("reg", [L2Proximity(0.7), L2Proximity(None), FisherProximity(0.5, damping=0.1)],
                         ids=repr)
@pytest.mark.parametrize("bias", [True, False])
def test_regularizer_gradient_is_autograd_of_its_value(reg, bias):
    batch, lin = _batch(bias)
    reg.prepare(batch)
    delta = [torch.randn_like(p, requires_grad=True) for p in batch.layer.params]
    value = reg.value(batch, delta, lr=0.2)
    expected = torch.autograd.grad(value, delta)
    got = reg.grad(batch, [d.detach() for d in delta], lr=0.2)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_l1_proximity_gives_sparse_updates_by_soft_thresholding():
    """L1 (App. E.3) applied as a proximal step: small coordinates of the update are exactly 0."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).double()
    x = torch.rand(32, 10, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    opt = locoprop.LocoProp(model, variant="M", lr=0.05, activation_lr=1.0, local_steps=1, inner="sgd",
                            output_transfer="sigmoid", regularizer=L1Proximity(0.5))
    loss = lambda: torch.nn.functional.binary_cross_entropy_with_logits(model(x), x)  # noqa: E731
    # the expected update: soft-threshold(BackProp step, lr * coef)
    grads = torch.autograd.grad(loss(), list(model.parameters()))
    opt.step(loss)
    zeros = 0
    for p, p0, g in zip(model.parameters(), before, grads):
        step = -0.05 * 1.0 * g
        expected = p0 + torch.sign(step) * (step.abs() - 0.05 * 0.5).clamp(min=0)
        torch.testing.assert_close(p.detach(), expected)
        zeros += int(((p - p0) == 0).sum())
    assert zeros > 0


def test_fisher_regularizer_runs_in_a_step_and_shrinks_the_update():
    torch.manual_seed(4)
    base = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).double()
    x = torch.rand(32, 10, dtype=torch.float64)
    sizes = []
    for reg in (L2Proximity(0.0), FisherProximity(coef=50.0, damping=1.0)):
        model = __import__("copy").deepcopy(base)
        opt = locoprop.LocoProp(model, variant="M", lr=0.005, activation_lr=1.0, local_steps=10, inner="sgd",
                                output_transfer="sigmoid", regularizer=reg)
        opt.step(lambda: torch.nn.functional.binary_cross_entropy_with_logits(model(x), x))
        sizes.append(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), base.parameters())))
    assert 0 < sizes[1] < 0.5 * sizes[0]


def test_mismatched_target_and_loss_domains_are_rejected():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="post-activation targets but local_loss"):
        locoprop.LocoProp(model, variant="S", target=locoprop.MDTarget())
