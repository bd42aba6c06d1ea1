"""``check_finite="layer"`` on CUDA: in the captured whole step (``graphed_step``, one read-back of every layer's
flag) and with each layer solved eagerly during the backward pass (``solve_in_backward=True``, each layer's copy
let go once its update is checked): a layer whose update is not finite is undone alone, the others keep the
update the default step gives them, and the step solving in the pass holds less than with the whole-step check."""

import pytest
import torch

import locoprop
from test_fused_cuda import DEV, _batches, _loss, _model, _opt
from test_layer_rollback import _equal, _layer_state
from test_solve_in_backward_cuda import _NaNFirst, _peak_mb


def _close(a, b, tol=1e-6):
    return all((u - v).norm() <= tol * v.norm().clamp(min=1.0) if torch.is_tensor(u) and u.is_floating_point()
               else torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(a, b, strict=True))


def test_graphed_step_undoes_the_layer_whose_update_is_not_finite_alone():
    models, steps, opts = [], [], []
    static_x = torch.empty(256, 784, device=DEV)
    for check in ("layer", True):
        model = _model()
        opt = _opt(model, check_finite=check)
        models.append(model)
        opts.append(opt)
        steps.append(opt.graphed_step(lambda model=model: _loss(model(static_x), static_x)))
    batches = _batches(5)
    for x in batches[:4]:
        static_x.copy_(x)
        for step in steps:
            step()
    layer, twin = opts
    before = _layer_state(layer, 0)
    layer.param_groups[0]["lr"] = float("inf")  # the first layer's update is not finite, the others' are
    static_x.copy_(batches[4])
    with pytest.raises(locoprop.DivergenceError, match=r"layer\(s\) \['0'\] is not finite; those layers were undone"):
        steps[0]()
    steps[1]()
    assert _equal(_layer_state(layer, 0), before)
    for m in range(1, len(layer.param_groups)):
        assert _close(_layer_state(layer, m), _layer_state(twin, m)), m
    layer.param_groups[0]["lr"] = twin.param_groups[0]["lr"]
    assert torch.isfinite(steps[0]())


def test_solving_in_the_pass_undoes_the_diverged_layer_alone_and_holds_less():
    model, twin_model = _model(), _model()
    opt = _opt(model, solve_in_backward=True, check_finite="layer")
    twin = _opt(twin_model, solve_in_backward=True)
    x = _batches(1)[0]
    for o, m in ((opt, model), (twin, twin_model)):
        o.step(lambda m=m: _loss(m(x), x))
    before = _layer_state(opt, 0)
    opt.variant = opt.variant.with_components(_NaNFirst(), None, None, None)  # layer '0', the last solved
    with pytest.raises(locoprop.DivergenceError, match=r"layer\(s\) \['0'\]"):
        opt.step(lambda: _loss(model(x), x))
    twin.step(lambda: _loss(twin_model(x), x))
    assert _equal(_layer_state(opt, 0), before)
    for m in range(1, len(opt.param_groups)):
        assert _close(_layer_state(opt, m), _layer_state(twin, m)), m
    peaks = {name: _peak_mb(settings) for name, settings in (
        ("whole step", dict(solve_in_backward=True)), ("layer", dict(solve_in_backward=True, check_finite="layer")))}
    assert peaks["layer"] < peaks["whole step"], peaks


def test_graphed_step_with_a_non_finite_loss_undoes_every_layer_and_names_the_loss():
    """The captured step cannot read the loss before its solve: a NaN loss is read with the layers' flags, and
    every layer is undone."""
    model = _model()
    opt = _opt(model, check_finite="layer")
    static_x = torch.empty(256, 784, device=DEV)
    scale = torch.ones((), device=DEV)
    step = opt.graphed_step(lambda: _loss(model(static_x), static_x) * scale)
    batches = _batches(4)
    for x in batches[:3]:
        static_x.copy_(x)
        step()
    before = [_layer_state(opt, m) for m in range(len(opt.param_groups))]
    scale.fill_(float("nan"))
    static_x.copy_(batches[3])
    with pytest.raises(locoprop.DivergenceError, match="closure's loss is not finite; every layer was undone"):
        step()
    assert step.last_mode == "replay"
    assert all(_equal(_layer_state(opt, m), b) for m, b in enumerate(before))
