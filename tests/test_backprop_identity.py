"""One local iteration with SGD equals a BackProp SGD step with learning rate η·γ (Sec. 2.1, 2.2.3, App. E)."""

import copy

import pytest
import torch
from torch import nn

import locoprop
from conftest import bce_sum_mean, mixed_mlp

ETA, GAMMA = 0.05, 0.7


def backprop_step(model, loss_fn, lr):
    model = copy.deepcopy(model)
    loss = loss_fn(model)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.sub_(lr * g)
    return model


def assert_close_models(a, b, rtol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        err = (p - q).norm() / q.norm()
        assert err < rtol, f"{name}: relative error {err:.3g}"


def assert_changed(a, b):
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("variant", ["S", "M", "post-S", "poco-M"])
@pytest.mark.parametrize("output", ["sigmoid", "softmax", "linear"])
def test_one_local_sgd_iteration_is_backprop(variant, output):
    model = mixed_mlp()
    x = torch.rand(32, 12, dtype=torch.float64)
    if output == "sigmoid":
        loss_fn = lambda m: bce_sum_mean(m(x), x)  # noqa: E731
    elif output == "softmax":
        labels = torch.randint(0, 12, (32,))
        loss_fn = lambda m: nn.functional.cross_entropy(m(x), labels)  # noqa: E731
    else:
        loss_fn = lambda m: nn.functional.mse_loss(m(x), x)  # noqa: E731
    expected = backprop_step(model, loss_fn, ETA * GAMMA)
    opt = locoprop.LocoProp(model, variant=variant, lr=ETA, activation_lr=GAMMA, local_steps=1, inner="sgd",
                            output_transfer=output)
    before = copy.deepcopy(model)
    opt.step(lambda: loss_fn(model))
    assert_changed(model, before)
    assert_close_models(model, expected)


@pytest.mark.parametrize("variant", ["S", "M", "post-S", "poco-M"])
def test_backprop_identity_with_explicit_pairs_and_arctan(variant):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(9, 7)
            self.mid = nn.Linear(7, 5)
            self.out = nn.Linear(5, 9)

        def forward(self, x):
            return self.out(torch.atan(self.mid(torch.tanh(self.enc(x)))))

    model = Net().double()
    x = torch.rand(16, 9, dtype=torch.float64)
    loss_fn = lambda m: bce_sum_mean(m(x), x)  # noqa: E731
    expected = backprop_step(model, loss_fn, ETA * GAMMA)
    opt = locoprop.LocoProp(model, variant=variant, lr=ETA, activation_lr=GAMMA, local_steps=1, inner="sgd",
                            layers=[(model.enc, "tanh"), (model.mid, "arctan"), (model.out, "sigmoid")])
    opt.step(lambda: loss_fn(model))
    assert_close_models(model, expected)


def _other_activations_mlp():
    """An MLP with the monotone activations of torch.nn beyond Table 2 (``locoprop.transfer.MONOTONE_MODULES``)."""
    torch.manual_seed(4)
    acts = [nn.Hardtanh(-2.0, 2.0), nn.SELU(), nn.Softsign(), nn.LogSigmoid(), nn.CELU(0.6), nn.Softplus(beta=2.0),
            nn.ReLU6(), nn.Hardsigmoid()]
    widths = (12, 11, 10, 9, 9, 8, 8, 7, 7, 12)
    mods = []
    for i in range(len(widths) - 1):
        mods.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(acts):
            mods.append(acts[i])
    return nn.Sequential(*mods).double()


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("variant", ["S", "M", "post-S", "poco-M"])
def test_backprop_identity_with_the_other_monotone_activations(variant, backend):
    """Hardtanh, SELU, Softsign, LogSigmoid, CELU, Softplus(β), ReLU6 and Hardsigmoid are discovered as
    transfer functions, and one local SGD iteration is BackProp's step for every variant."""
    model = _other_activations_mlp()
    x = torch.rand(32, 12, dtype=torch.float64) * 3
    loss_fn = lambda m: bce_sum_mean(m(x), x.clamp(max=1))  # noqa: E731
    expected = backprop_step(model, loss_fn, ETA * GAMMA)
    opt = locoprop.LocoProp(model, variant=variant, lr=ETA, activation_lr=GAMMA, local_steps=1, inner="sgd",
                            output_transfer="sigmoid", backend=backend)
    assert [lay.transfer.name for lay in opt.layers] == ["hardtanh", "selu", "softsign", "logsigmoid", "celu",
                                                         "softplus", "relu6", "hardsigmoid", "sigmoid"]
    before = copy.deepcopy(model)
    opt.step(lambda: loss_fn(model))
    assert_changed(model, before)
    assert_close_models(model, expected, rtol=1e-8)


def test_more_local_iterations_move_further_than_backprop():
    model = mixed_mlp()
    x = torch.rand(32, 12, dtype=torch.float64)
    loss_fn = lambda m: bce_sum_mean(m(x), x)  # noqa: E731
    bp = backprop_step(model, loss_fn, ETA * GAMMA)
    opt = locoprop.LocoProp(model, variant="M", lr=ETA, activation_lr=GAMMA, local_steps=5, inner="sgd",
                            output_transfer="sigmoid")
    opt.step(lambda: loss_fn(model))
    diffs = [(p - q).norm() / q.norm() for p, q in zip(model.parameters(), bp.parameters())]
    assert max(diffs) > 1e-4


class _RecordingSolver:
    """A solver that records what the local problems hold when the solve starts (and changes nothing)."""

    name = "recording"

    def __init__(self):
        self.seen = {}

    def solve(self, problems, loss, regularizer, inner):  # one solve, or one a layer during the backward pass
        self.seen.update({pr.batch.layer.name: (pr.batch.pre, pr.residual, pr.first_residual(loss), pr.batch.post)
                          for pr in problems})


@pytest.mark.parametrize("variant", ["S", "M"])
@pytest.mark.parametrize("retain", [False, True])
def test_first_residual_is_the_scaled_backprop_gradient_and_the_pre_activation_is_released(variant, retain):
    """δ of iteration 1 is ``γ ∇_â L`` (GD target ``â - γ∇``, MD target ``f(â) - γ∇``), computed when the problem
    is built; the forward pass's pre-activation is then dropped unless ``retain_problems``.  LocoProp-M's layers
    followed by a transfer module keep its output ``ŷ`` instead of ``â`` and of δ₀ (``tests/test_kept_output.py``),
    and δ₀ = ``ŷ - y`` computed from it is that same ``γ ∇_â L``."""
    model = mixed_mlp()
    x = torch.rand(16, 12, dtype=torch.float64)
    captured = {}

    def hook(index):
        def record(module, inputs, out):
            out.register_hook(lambda g: captured.__setitem__(index, g))
        return record

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    handles = [lin.register_forward_hook(hook(i)) for i, lin in enumerate(linears)]
    opt = locoprop.LocoProp(model, variant=variant, lr=ETA, activation_lr=GAMMA, local_steps=3, inner="sgd",
                            output_transfer="sigmoid", retain_problems=retain)
    opt.solver = recorder = _RecordingSolver()
    opt.step(lambda: bce_sum_mean(model(x), x))
    for h in handles:
        h.remove()
    assert len(recorder.seen) == len(linears)
    kept_output = 0
    for i, (pre, residual, first, post) in enumerate(recorder.seen[lay.name] for lay in opt.layers):
        assert (pre is not None) == retain, f"layer {i}: pre-activation {'dropped' if retain else 'kept'}"
        if residual is None:  # LocoProp-M: ŷ kept in place of â and δ₀
            assert variant == "M" and not retain and post is not None
            kept_output += 1
        else:
            torch.testing.assert_close(residual, first, rtol=0, atol=0)
        torch.testing.assert_close(first, GAMMA * captured[i], rtol=1e-10, atol=1e-12)
    expected = 0 if variant == "S" or retain else sum(lay.transfer_module is not None for lay in opt.layers)
    assert kept_output == expected and (expected > 0) == (variant == "M" and not retain)
