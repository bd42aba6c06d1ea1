"""Bad input gets a clear error, and nothing is changed."""

import copy

import pytest
import torch
from torch import nn

import locoprop
from conftest import bce_sum_mean, small_autoencoder


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snap):
    params, state = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    now = opt.state_dict()
    assert now["inner"]["state"].keys() == state["inner"]["state"].keys()
    for k, s in state["inner"]["state"].items():
        for name, v in s.items():
            assert torch.equal(now["inner"]["state"][k][name], v), (k, name)


def test_model_without_linear_layer():
    with pytest.raises(ValueError, match="no nn.Linear"):
        locoprop.LocoProp(nn.Sequential(nn.Tanh()))


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU()])
def test_non_monotone_transfer_for_matching_loss_names_the_layer(act):
    model = nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 4))
    with pytest.raises(ValueError, match=r"layer '0'.*not a monotone"):
        locoprop.LocoProp(model, variant="M", output_transfer="linear")
    locoprop.LocoProp(model, variant="S")  # the squared pre-activation loss never uses f


def test_unknown_transfer_in_explicit_pairs():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 4))
    with pytest.raises(ValueError, match=r"layer '0'.*gelu"):
        locoprop.LocoProp(model, layers=[(model[0], "gelu"), (model[1], "linear")])
    with pytest.raises(ValueError, match=r"layers\[0\]: expected an nn.Linear"):
        locoprop.LocoProp(model, layers=[(nn.Tanh(), "tanh")])


def test_inplace_activation_is_rejected():
    with pytest.raises(ValueError, match="inplace"):
        locoprop.LocoProp(nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 3)))


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": 0.0}, "lr"), ({"lr": -1e-3}, "lr"), ({"activation_lr": 0}, "activation_lr"),
    ({"activation_lr": float("nan")}, "activation_lr"), ({"local_steps": 0}, "local_steps"),
    ({"local_steps": 2.5}, "local_steps"), ({"variant": "Q"}, "variant"), ({"output_transfer": "swish"},
                                                                           "output_transfer"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio"), ({"solver": "magic"}, "solver"), ({"rollback": "disk"}, "rollback"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        locoprop.LocoProp(small_autoencoder(), **kwargs)


def _trained(backend="auto"):
    torch.manual_seed(0)
    model = small_autoencoder()
    x = torch.rand(16, 20)
    opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid", backend=backend)
    for _ in range(2):
        opt.step(lambda: bce_sum_mean(model(x), x))
    return model, opt, x


@pytest.mark.parametrize("closure,exc,match", [
    (lambda m, x: bce_sum_mean(m(x), x).expand(3), ValueError, "scalar"),
    (lambda m, x: 1.0, TypeError, "scalar tensor"),
    (lambda m, x: bce_sum_mean(m(x), x) * float("nan"), locoprop.DivergenceError, "nan"),
    (lambda m, x: bce_sum_mean(m(x), x) + float("inf"), locoprop.DivergenceError, "inf"),
    (lambda m, x: bce_sum_mean(m(x), x).detach(), ValueError, "does not depend"),
    (lambda m, x: nn.Linear(x.shape[1], 1)(x).sum(), RuntimeError, "none of LocoProp's layers ran"),
])
def test_bad_closure_changes_nothing(closure, exc, match):
    model, opt, x = _trained()
    snap = _snapshot(model, opt)
    with pytest.raises(exc, match=match):
        opt.step(lambda: closure(model, x))
    _assert_unchanged(model, opt, snap)


def test_closure_that_calls_backward_gets_a_clear_error():
    model, opt, x = _trained()

    def closure():
        loss = bce_sum_mean(model(x), x)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="without calling backward"):
        opt.step(closure)


def test_missing_closure():
    model, opt, _ = _trained()
    with pytest.raises(ValueError, match="closure"):
        opt.step()


@pytest.mark.parametrize("backend, rollback", [("reference", "device"), ("fused", "device"), ("fused", "host")])
def test_non_finite_local_update_is_undone_and_raises(backend, rollback):
    model, opt, x = _trained(backend)
    opt.rollback = rollback
    snap = _snapshot(model, opt)
    for g in opt.param_groups:
        g["activation_lr"] = 1e300  # targets overflow: the local update is inf/nan
    with pytest.raises(locoprop.DivergenceError, match="undone"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    _assert_unchanged(model, opt, snap)
    assert opt.last_solver == ("fused" if backend == "fused" else "reference")  # the undone step ran there
    # and the optimizer still works afterwards
    for g in opt.param_groups:
        g["activation_lr"] = 1.0
    assert torch.isfinite(opt.step(lambda: bce_sum_mean(model(x), x)))


def test_target_shape_mismatch_names_the_layer():
    class BadTarget(locoprop.GDTarget):
        def __call__(self, batch, gamma):
            return super().__call__(batch, gamma)[:, :-1]

    model, _, x = _trained()
    opt = locoprop.LocoProp(model, variant="S", target=BadTarget())
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer '\d+'.*shape"):  # the first built: '5' during the backward pass
        opt.step(lambda: bce_sum_mean(model(x), x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k])


def test_load_state_dict_mismatch():
    model, opt, _ = _trained()
    other = locoprop.LocoProp(nn.Sequential(nn.Linear(20, 20)), output_transfer="sigmoid")
    with pytest.raises(ValueError, match="layers"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"foo": 1})


def test_finiteness_check_does_not_overflow_on_large_finite_weights():
    """A norm of squares would overflow at 1e20; the check must call only inf and NaN non-finite."""
    model, opt, _ = _trained()
    with torch.no_grad():
        model[0].weight[0, 0] = 1e30
    assert bool(opt._all_finite())
    with torch.no_grad():
        model[0].weight[0, 1] = float("nan")
    assert not bool(opt._all_finite())


@pytest.mark.parametrize("backend, settings, after_solve", [
    ("auto", {}, True), ("fused", {}, True), ("fused", {"rollback": "host"}, True),
    ("fused", {"reset_inner_state": True}, False),  # the reset is not undone: the loss is read first
    ("auto", {"variant": "S-natural"}, False),  # its target's Cholesky factorisation would raise on a NaN
    ("fused", {"check_finite": False}, False),  # nothing undoes the solve: the loss is read first
])
def test_a_non_finite_loss_is_read_with_the_weights_and_changes_nothing(backend, settings, after_solve):
    """Where the solve can be undone and takes a NaN without raising, ``step`` reads whether the loss is finite
    together with the weights after the solve (one read-back a step), undoes the solve and raises; elsewhere
    it reads the loss before the solve.  Either way a non-finite loss changes nothing and names itself."""
    torch.manual_seed(0)
    model = small_autoencoder()
    x = torch.rand(16, 20)
    variant = settings.pop("variant", "M")
    opt = locoprop.LocoProp(model, variant=variant, lr=1e-2, output_transfer="sigmoid", backend=backend, **settings)
    for _ in range(2):
        opt.step(lambda: bce_sum_mean(model(x), x))
    assert opt._loss_checked_after_solve() == after_solve
    snap = _snapshot(model, opt)
    solved = []
    solver = opt.fused_solver if backend == "fused" else opt.solver
    original = solver.solve
    solver.solve = lambda *a, **k: solved.append(1) or original(*a, **k)
    with pytest.raises(locoprop.DivergenceError, match="closure's loss is nan"):
        opt.step(lambda: bce_sum_mean(model(x), x) * float("nan"))
    _assert_unchanged(model, opt, snap)
    assert bool(solved) == after_solve  # one solve, or one a layer where they run in the backward pass
    assert torch.isfinite(opt.step(lambda: bce_sum_mean(model(x), x)))
