"""``LocoProp(check_finite="layer")``: each layer's update is checked as its solve ends; a layer whose update is
not finite is undone (weights and inner state to the bit) and the others keep theirs, exactly the update they
get in a step where every layer is finite (each layer's local problem is independent of the others' updates);
where the layers are solved during the backward pass, the step holds one layer's copy at a time."""

import copy
import re
import warnings

import pytest
import torch

import locoprop
from conftest import bce_sum_mean, small_autoencoder

# (backend, solve_in_backward): the readable loop and the fast solver, each solving during the backward pass
# (the CPU's default) and after it
PATHS = [("reference", None), ("fused", None), ("reference", False), ("fused", False)]


def _pair(backend, solve_in_backward, **settings):
    """Two equal models and optimizers after two steps: one with ``check_finite="layer"``, one with the
    default ``check_finite=True``; and the batch."""
    torch.manual_seed(0)
    model = small_autoencoder()
    x = torch.rand(16, 20)
    opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid", backend=backend,
                            solve_in_backward=solve_in_backward, check_finite="layer", **settings)
    for _ in range(2):
        opt.step(lambda: bce_sum_mean(model(x), x))
    twin_model, twin = copy.deepcopy((model, opt))
    twin.check_finite = True
    return (model, opt), (twin_model, twin), x


def _layer_state(opt, m):
    """Layer ``m``'s weights and inner state, copied."""
    out = []
    for p in opt.param_groups[m]["params"]:
        out.append(p.detach().clone())
        out += [v.clone() if torch.is_tensor(v) else v for _, v in sorted(opt.inner.state[p].items())]
    return out


def _equal(a, b):
    return all(torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("backend, solve_in_backward", PATHS)
@pytest.mark.parametrize("bad", [0, 2])  # the first layer (solved last) or a middle one
def test_a_layer_whose_update_is_not_finite_is_undone_and_the_others_keep_theirs(backend, solve_in_backward, bad):
    (model, opt), (twin_model, twin), x = _pair(backend, solve_in_backward)
    assert opt._solves_in_backward([lambda: None], False) == (solve_in_backward is None)
    before = _layer_state(opt, bad)
    steps = [g["step"] for g in opt.param_groups]
    opt.param_groups[bad]["activation_lr"] = 1e300  # that layer's targets overflow: its update is inf/nan
    name = opt.param_groups[bad]["name"]
    with pytest.raises(locoprop.DivergenceError, match=rf"layer\(s\) \['{name}'\].*undone, the others kept"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    twin.step(lambda: bce_sum_mean(twin_model(x), x))  # every layer finite: the update each layer makes alone
    for m in range(len(opt.param_groups)):
        if m == bad:
            assert _equal(_layer_state(opt, m), before), m
            assert opt.param_groups[m]["step"] == steps[m]
        else:
            assert _equal(_layer_state(opt, m), _layer_state(twin, m)), m
            assert opt.param_groups[m]["step"] == steps[m] + 1
    assert opt.last_solver == ("fused" if backend == "fused" else "reference")
    opt.param_groups[bad]["activation_lr"] = 1.0  # and it steps on from there
    assert torch.isfinite(opt.step(lambda: bce_sum_mean(model(x), x)))


# bf16 local products (the fast solver's): their update form reads W₀ from the layer's copy
@pytest.mark.parametrize("backend, solve_in_backward, precision",
                         [(*path, "fp32") for path in PATHS] + [("fused", None, "bf16"), ("fused", False, "bf16")])
def test_a_finite_step_is_the_default_step_to_the_bit(backend, solve_in_backward, precision):
    (model, opt), (twin_model, twin), x = _pair(backend, solve_in_backward, precision=precision)
    for _ in range(2):
        assert torch.equal(opt.step(lambda: bce_sum_mean(model(x), x)),
                           twin.step(lambda: bce_sum_mean(twin_model(x), x)))
    for m in range(len(opt.param_groups)):
        assert _equal(_layer_state(opt, m), _layer_state(twin, m)), m


@pytest.mark.parametrize("backend, solve_in_backward", PATHS)
def test_a_non_finite_loss_is_refused_before_the_solve_and_changes_nothing(backend, solve_in_backward):
    (model, opt), _, x = _pair(backend, solve_in_backward)
    assert not opt._loss_checked_after_solve()  # read before any layer is solved: nothing to undo
    before = [_layer_state(opt, m) for m in range(len(opt.param_groups))]
    with pytest.raises(locoprop.DivergenceError, match="closure's loss is nan; the step was not taken"):
        opt.step(lambda: bce_sum_mean(model(x), x) * float("nan"))
    assert all(_equal(_layer_state(opt, m), s) for m, s in enumerate(before))


def test_during_the_backward_pass_the_step_holds_one_layers_copy_at_a_time(monkeypatch):
    """Each layer's copy is let go once its update is checked (``check_finite="layer"``); the default keeps
    every layer's copy to the step's end, since a later layer's failure undoes them all."""
    held = {}
    for check in (True, "layer"):
        (model, opt), _, x = _pair("fused", None)
        opt.check_finite = check
        rollback, counts = opt._rollback, []
        original = rollback.save_layer
        monkeypatch.setattr(rollback, "save_layer", lambda params, inner: (
            counts.append(len(rollback._buffers)), original(params, inner))[1])
        opt.step(lambda: bce_sum_mean(model(x), x))
        held[check] = counts, len(rollback._buffers)
    per_layer = sum(1 + sum(torch.is_tensor(v) for v in opt.inner.state[p].values())  # weight, bias, their state
                    for p in opt.param_groups[0]["params"])
    assert per_layer >= 6  # TF-RMSProp's two moments at least
    assert held[True] == ([0, per_layer, 2 * per_layer, 3 * per_layer], 4 * per_layer)
    assert held["layer"] == ([0, 0, 0, 0], 0)


def test_an_error_during_the_pass_undoes_its_layer_and_the_layers_before_keep_their_update():
    """A local problem that raises after other layers were solved during the pass: their copies are gone
    (checked finite), so they keep their update, count the step and are named in a warning; the failing
    layer is as it was.  (``check_finite=True`` undoes every layer: test_solve_in_backward.py.)"""
    class Bad(locoprop.MDTarget):
        def __call__(self, batch, gamma):
            target = super().__call__(batch, gamma)
            return target[:, :-1] if batch.layer.name == "0" else target

    (model, opt), (twin_model, twin), x = _pair("fused", None)
    before = _layer_state(opt, 0)
    steps = [g["step"] for g in opt.param_groups]
    opt.variant = opt.variant.with_components(Bad(), None, None, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"layer '0'.*shape"):
            opt.step(lambda: bce_sum_mean(model(x), x))
    assert any("check_finite='layer': layers ['5', '3', '2'], solved before the error, keep their update"
               in str(w.message) for w in caught)
    twin.step(lambda: bce_sum_mean(twin_model(x), x))
    assert _equal(_layer_state(opt, 0), before) and opt.param_groups[0]["step"] == steps[0]
    for m in (1, 2, 3):
        assert _equal(_layer_state(opt, m), _layer_state(twin, m)), m
        assert opt.param_groups[m]["step"] == steps[m] + 1


def test_check_finite_takes_true_false_or_layer_and_names_itself():
    for value in ("yes", "layers", 1, None):
        with pytest.raises(ValueError, match="check_finite: expected True, False or 'layer'"):
            locoprop.LocoProp(small_autoencoder(), output_transfer="sigmoid", check_finite=value)
    opt = locoprop.LocoProp(small_autoencoder(), output_transfer="sigmoid")
    with pytest.raises(ValueError, match="check_finite"):
        opt.check_finite = "step"
    assert opt.check_finite is True


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("name", ["normed", "attention", "shared", "convolutions"])
def test_on_models_with_layers_solved_after_the_pass_each_diverged_layer_is_undone_alone(name, backend):
    """Models where some layers are solved after the backward pass (a bias-free layer, a shared layer, a
    convolution's matrix, an attention's input projections) and others during it, with another optimizer's
    parameters (a LayerNorm): the first layer and the last diverge (``activation_lr`` overflows their targets);
    both are undone, and every other layer takes the default step's update to the bit."""
    from test_solve_in_backward import MODELS

    states = []
    for check in ("layer", True):
        torch.manual_seed(0)
        model = MODELS[name]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the LayerNorm is left to another optimizer
            opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=3.0, local_steps=3, output_transfer="sigmoid",
                                    backend=backend, check_finite=check)
        x = torch.rand(16, 20, generator=torch.Generator().manual_seed(1))
        opt.step(lambda: bce_sum_mean(model(x), x))
        bad = [0, len(opt.param_groups) - 1] if check == "layer" else []
        before = {m: _layer_state(opt, m) for m in bad}
        for m in bad:
            opt.param_groups[m]["activation_lr"] = 1e300
        if bad:
            names = sorted(opt.param_groups[m]["name"] for m in bad)
            with pytest.raises(locoprop.DivergenceError, match=re.escape(f"layer(s) {names} is not finite")):
                opt.step(lambda: bce_sum_mean(model(x), x))
            assert all(_equal(_layer_state(opt, m), s) for m, s in before.items())
        else:
            opt.step(lambda: bce_sum_mean(model(x), x))
        states.append([_layer_state(opt, m) for m in range(len(opt.param_groups))])
    layer, default = states
    for m in range(1, len(layer) - 1):
        assert _equal(layer[m], default[m]), m
