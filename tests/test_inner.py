"""Inner optimizers, including TensorFlow-1 RMSProp with momentum (reference notes)."""


import pytest
import torch

import locoprop
from locoprop.inner import INNER_OPTIMIZERS, TFRMSprop, make_inner_optimizer
from conftest import bce_sum_mean, small_autoencoder


@pytest.mark.parametrize("foreach", [True, False])
def test_tf_rmsprop_follows_the_tensorflow1_recurrence(foreach):
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.float64)
    p = torch.nn.Parameter(w.clone())
    lr, alpha, momentum, eps = 0.01, 0.95, 0.8, 1e-7
    opt = TFRMSprop([p], lr=lr, alpha=alpha, momentum=momentum, eps=eps, foreach=foreach)
    ms, mom = torch.ones_like(w), torch.zeros_like(w)
    for _ in range(6):
        g = torch.randn_like(w)
        p.grad = g.clone()
        opt.step()
        ms = alpha * ms + (1 - alpha) * g * g          # starts at 1.0
        mom = momentum * mom + lr * g / torch.sqrt(ms + eps)  # eps inside the root, lr inside momentum
        w = w - mom
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(INNER_OPTIMIZERS))
def test_every_inner_optimizer_trains(name):
    torch.manual_seed(0)
    model = small_autoencoder()
    x = torch.rand(64, 20)
    # the local gradient is summed over the batch: plain SGD needs a smaller step than adaptive methods
    lr = {"sgd": 1e-3, "momentum": 2e-4, "nesterov": 2e-4}.get(name, 1e-2)
    opt = locoprop.LocoProp(model, variant="M", lr=lr, activation_lr=1.0,
                            local_steps=5, inner=name, output_transfer="sigmoid")
    before = [p.detach().clone() for p in model.parameters()]
    losses = [opt.step(lambda: bce_sum_mean(model(x), x)).item() for _ in range(15)]
    assert all(map(lambda v: v == v, losses))
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_inner_optimizer_class_and_kwargs():
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, inner=torch.optim.Adamax, inner_kwargs={"betas": (0.8, 0.99)},
                            output_transfer="sigmoid")
    assert isinstance(opt.inner, torch.optim.Adamax)
    assert opt.inner.param_groups[0]["betas"] == (0.8, 0.99)


def test_inner_state_persists_or_resets():
    torch.manual_seed(0)
    x = torch.rand(32, 20)
    results = {}
    for reset in (False, True):
        model = small_autoencoder()
        torch.manual_seed(1)
        model.load_state_dict(small_autoencoder().state_dict())
        opt = locoprop.LocoProp(model, lr=1e-2, inner="adam", output_transfer="sigmoid", reset_inner_state=reset)
        for _ in range(2):
            opt.step(lambda: bce_sum_mean(model(x), x))
        steps = {int(s["step"]) for s in opt.inner.state.values()}
        results[reset] = steps
    assert results[False] == {20}  # 2 outer steps x 10 local iterations
    assert results[True] == {10}


@pytest.mark.parametrize("bad,match", [("nope", "valid names"), (42, "torch.optim.Optimizer")])
def test_unknown_inner_optimizer(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_inner_optimizer(bad, [torch.nn.Parameter(torch.zeros(2))], 0.1)


def test_inner_kwargs_errors_name_the_argument():
    with pytest.raises(TypeError, match="inner_kwargs"):
        locoprop.LocoProp(small_autoencoder(), inner="sgd", inner_kwargs={"betas": (0.9, 0.9)})
    with pytest.raises(ValueError, match="alpha"):
        TFRMSprop([torch.nn.Parameter(torch.zeros(2))], alpha=1.5)
