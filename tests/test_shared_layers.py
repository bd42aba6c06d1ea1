"""A layer the forward pass calls more than once (shared weights): one local problem over every call's rows.

Its loss gradient is the sum over the calls, so one local SGD iteration is BackProp's step (Sec. 2.1), and a
closure that runs the model on two batches solves exactly the local problems of one run on the stacked batch.
"""

import copy

import pytest
import torch
from torch import nn

import locoprop
from conftest import bce_sum_mean
from test_backprop_identity import GAMMA, ETA, assert_changed, assert_close_models, backprop_step
from test_errors import _assert_unchanged, _snapshot


class Siamese(nn.Module):
    """One encoder applied to two inputs, a head on both codes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(6, 5)
        self.act = nn.Tanh()
        self.head = nn.Linear(10, 6)

    def forward(self, a, b):
        return self.head(torch.cat([self.act(self.encoder(a)), self.act(self.encoder(b))], -1))


def _siamese_problem():
    g = torch.Generator().manual_seed(3)
    a, b = (torch.rand(9, 6, generator=g, dtype=torch.float64) for _ in range(2))
    return Siamese().double(), (lambda m: bce_sum_mean(m(a, b), a))


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("variant", ["S", "M", "post-S", "poco-M"])
def test_one_local_sgd_iteration_on_a_shared_layer_is_backprop(variant, backend):
    model, loss_fn = _siamese_problem()
    expected = backprop_step(model, loss_fn, ETA * GAMMA)
    opt = locoprop.LocoProp(model, variant=variant, lr=ETA, activation_lr=GAMMA, local_steps=1, inner="sgd",
                            layers=[(model.encoder, model.act), (model.head, "sigmoid")], backend=backend)
    before = copy.deepcopy(model)
    opt.step(lambda: loss_fn(model))
    assert_changed(model, before)
    assert_close_models(model, expected, rtol=1e-10)


def _two_batches():
    g = torch.Generator().manual_seed(5)
    return torch.rand(7, 12, generator=g, dtype=torch.float64), torch.rand(5, 12, generator=g, dtype=torch.float64)


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6), nn.Softplus(), nn.Linear(6, 12)).double()


def _bce_sum(logits, x):
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")


@pytest.mark.parametrize("variant, backend", [(v, b) for v in ("M", "S", "post-S", "poco-M")
                                               for b in ("reference", "fused")] + [("S-closed", "auto")])
def test_a_closure_running_the_model_twice_solves_the_stacked_batch(variant, backend):
    """Every layer is called twice (on ``x1``, then ``x2``): its local problem holds the rows of both calls, in
    that order, so ``T`` local iterations equal those of one call on ``cat(x1, x2)`` (float64, 1e-10)."""
    x1, x2 = _two_batches()
    finals = []
    for twice in (True, False):
        model = _mlp()
        opt = locoprop.LocoProp(model, variant=variant, lr=1e-2, activation_lr=0.5, local_steps=4,
                                output_transfer="sigmoid", backend=backend)
        for _ in range(3):
            if twice:
                opt.step(lambda: _bce_sum(model(x1), x1) + _bce_sum(model(x2), x2))
            else:
                both = torch.cat([x1, x2])
                opt.step(lambda: _bce_sum(model(both), both))
        finals.append(model)
    assert_changed(finals[0], _mlp())
    assert_close_models(finals[0], finals[1], rtol=1e-10)


def test_a_module_listed_twice_in_a_sequential_is_one_shared_layer():
    torch.manual_seed(2)
    twice = nn.Linear(12, 12)
    model = nn.Sequential(twice, nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), twice, nn.Tanh(), nn.Linear(12, 12)).double()
    opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid", local_steps=1, inner="sgd", activation_lr=GAMMA)
    assert [lay.name for lay in opt.layers] == ["0", "2", "6"]
    x = _two_batches()[0]
    expected = backprop_step(model, lambda m: bce_sum_mean(m(x), x), 1e-2 * GAMMA)
    opt.step(lambda: bce_sum_mean(model(x), x))
    assert_close_models(model, expected, rtol=1e-10)

    other = nn.Sequential(twice, nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), twice, nn.Softplus(), nn.Linear(12, 12))
    with pytest.raises(ValueError, match="layer '0' appears again in the nn.Sequential, followed by Softplus where "
                                         "it was followed by Tanh"):
        locoprop.LocoProp(other, output_transfer="sigmoid")


def test_a_call_outside_the_loss_adds_rows_that_stay_where_they_are():
    """A call whose output the loss does not use: zero loss gradient, so its rows' targets are their outputs
    (with M's matching loss the local problem is still minimised at the weights' start, one step = BackProp)."""
    x1, x2 = _two_batches()
    model = _mlp()
    expected = backprop_step(model, lambda m: bce_sum_mean(m(x1), x1), ETA * GAMMA)
    opt = locoprop.LocoProp(model, lr=ETA, activation_lr=GAMMA, local_steps=1, inner="sgd",
                            output_transfer="sigmoid", retain_problems=True)

    def closure():
        model(x2)  # computed, unused
        return bce_sum_mean(model(x1), x1)
    opt.step(closure)
    assert_close_models(model, expected, rtol=1e-10)
    assert opt.last_problems[0].batch.inputs.shape[0] == len(x1) + len(x2)


def test_a_layer_run_only_under_no_grad_is_named_and_nothing_changes():
    x = _two_batches()[0]
    model = _mlp()
    opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid")
    opt.step(lambda: bce_sum_mean(model(x), x))
    snap = _snapshot(model, opt)

    def closure():
        with torch.no_grad():
            hidden = model[1](model[0](x))
        return bce_sum_mean(model[4](model[3](model[2](hidden))), x)
    with pytest.raises(RuntimeError, match=r"layer '0' ran 1 times in the closure's forward pass, each time outside "
                                           r"autograd \(under torch.no_grad"):
        opt.step(closure)
    _assert_unchanged(model, opt, snap)
