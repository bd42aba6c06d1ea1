"""The torch.optim.Optimizer contract: param groups, schedulers, state_dict round trip, zero_grad."""

import copy
import io

import pytest
import torch

import locoprop
from conftest import bce_sum_mean, small_autoencoder


def _run(model, opt, xs):
    for x in xs:
        opt.step(lambda: bce_sum_mean(model(x), x))


@pytest.mark.parametrize("inner", ["tf_rmsprop", "adam", "momentum"])
@pytest.mark.parametrize("variant", ["M", "S"])
def test_state_dict_round_trip_is_bit_identical(inner, variant):
    torch.manual_seed(0)
    xs = [torch.rand(32, 20) for _ in range(6)]
    kw = dict(variant=variant, lr=1e-2, activation_lr=2.0, local_steps=4, inner=inner,
              inner_kwargs={"momentum": 0.5} if inner != "adam" else {}, output_transfer="sigmoid")
    model_a = small_autoencoder()
    opt_a = locoprop.LocoProp(model_a, **kw)
    _run(model_a, opt_a, xs[:3])
    # save mid-run through bytes, as a checkpoint would, and load with weights_only=True
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b = small_autoencoder()
    model_b.load_state_dict(ckpt["model"])
    opt_b = locoprop.LocoProp(model_b, **kw)
    opt_b.load_state_dict(ckpt["opt"])
    _run(model_a, opt_a, xs[3:])
    _run(model_b, opt_b, xs[3:])
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_scheduler_drives_the_local_learning_rate():
    torch.manual_seed(0)
    x = torch.rand(16, 20, dtype=torch.float64)
    base = small_autoencoder(torch.float64)
    deltas = []
    for factor in (1.0, 0.5):
        model = copy.deepcopy(base)
        opt = locoprop.LocoProp(model, variant="M", lr=0.1, local_steps=1, inner="sgd", output_transfer="sigmoid")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch, f=factor: f)
        assert all(g["lr"] == pytest.approx(0.1 * factor) for g in opt.param_groups)
        opt.step(lambda: bce_sum_mean(model(x), x))
        sched.step()
        deltas.append(torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), base.parameters())]))
    torch.testing.assert_close(deltas[1], 0.5 * deltas[0])


_SCHEDULERS = {
    "one-cycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=10,
                                                               cycle_momentum=False),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 1e-4, 1e-2, step_size_up=2, cycle_momentum=False),
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=2),
            torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 3)], milestones=[2]),
}


@pytest.mark.parametrize("name", sorted(_SCHEDULERS))
def test_schedulers_set_each_layers_local_lr_as_they_set_a_torch_optimizers(name):
    """The scheduler sees one group per layer and sets its ``lr`` step by step exactly as for an SGD optimizer
    with the same groups (that a local step runs at the group's rate: the LambdaLR test above)."""
    torch.manual_seed(0)
    model = small_autoencoder()
    x = torch.rand(8, 20)
    opt = locoprop.LocoProp(model, variant="M", lr=1e-3, local_steps=1, output_transfer="sigmoid")
    twin = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]} for _ in opt.param_groups], lr=1e-3)
    scheds = [_SCHEDULERS[name](o) for o in (opt, twin)]
    seen = set()
    for _ in range(6):
        opt.step(lambda: bce_sum_mean(model(x), x))
        twin.step()
        for sched in scheds:
            sched.step(*([1.0] if name == "plateau" else []))
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in twin.param_groups]
        seen.add(opt.param_groups[0]["lr"])
    assert len(seen) > 2  # the rate did change


def test_param_groups_are_layers():
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, output_transfer="sigmoid")
    assert [g["name"] for g in opt.param_groups] == ["0", "2", "3", "5"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    model(torch.rand(2, 20)).sum().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_returns_the_loss_before_the_update_and_leaves_no_grads():
    model = small_autoencoder()
    x = torch.rand(8, 20)
    opt = locoprop.LocoProp(model, output_transfer="sigmoid")
    expected = bce_sum_mean(model(x), x).item()
    got = opt.step(lambda: bce_sum_mean(model(x), x))
    assert got.item() == pytest.approx(expected)
    assert not got.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_per_layer_local_steps():
    """A layer whose group has fewer local steps stops early (grad None skips it in the inner optimizer)."""
    torch.manual_seed(0)
    model = small_autoencoder(torch.float64)
    x = torch.rand(16, 20, dtype=torch.float64)
    opt = locoprop.LocoProp(model, lr=0.01, local_steps=3, inner="adam", output_transfer="sigmoid")
    opt.param_groups[0]["local_steps"] = 1
    opt.step(lambda: bce_sum_mean(model(x), x))
    steps = [int(opt.inner.state[g["params"][0]]["step"]) for g in opt.param_groups]
    assert steps == [1, 3, 3, 3]


def test_works_on_inputs_with_extra_leading_dimensions():
    model = small_autoencoder()
    x = torch.rand(4, 3, 20)
    opt = locoprop.LocoProp(model, output_transfer="sigmoid")
    l0 = opt.step(lambda: bce_sum_mean(model(x), x))
    assert torch.isfinite(l0)


@pytest.mark.parametrize("check_finite, retain_problems, solve_in_backward, shared", [
    (True, False, True, True), (True, False, False, True), (False, False, None, False), (True, True, None, False)])
def test_the_proximity_anchor_is_the_rollback_copy_not_a_second_one(monkeypatch, check_finite, retain_problems,
                                                                     solve_in_backward, shared):
    """An explicit L2 proximity term's anchor (the weights at the start of the step, Eq. 7) is the copy that
    check_finite takes anyway (before the forward pass, or, solving in the backward pass, just before the layer's
    solve), so a step holds one copy of the weights, not two; where there is no such copy, or the problems
    outlive the step (retain_problems), it is a fresh one.  Either way the update is the same, bit for bit."""
    import locoprop.optimizer as lo

    anchors, copies = {}, {}  # by layer: the anchor, and the rollback's copies of its weights when it was built

    class Recording(lo.LocalProblem):  # by layer: built in the backward pass's order where solved during it
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            anchors[self.group["name"]] = self.anchor
            copies[self.group["name"]] = opt._rollback.copies_of(self.params)

    torch.manual_seed(0)
    xs = [torch.rand(32, 20) for _ in range(3)]
    kw = dict(lr=1e-2, activation_lr=2.0, local_steps=4, output_transfer="sigmoid",
              regularizer=locoprop.L2Proximity(0.5))  # an explicit proximity term (the default has none)
    model = small_autoencoder()
    plain_model = copy.deepcopy(model)
    opt = locoprop.LocoProp(model, check_finite=check_finite, retain_problems=retain_problems,
                            solve_in_backward=solve_in_backward, **kw)
    plain = locoprop.LocoProp(plain_model, check_finite=False, **kw)
    _run(plain_model, plain, xs)
    monkeypatch.setattr(lo, "LocalProblem", Recording)
    for x in xs:
        start = [p.detach().clone() for p in model.parameters()]
        anchors.clear()
        opt.step(lambda: bce_sum_mean(model(x), x))
        names = [g["name"] for g in opt.param_groups]
        flat = [a for n in names for a in anchors[n]]
        assert all(torch.equal(a, s) for a, s in zip(flat, start)) and len(flat) == len(start)
        kept = [c for n in names for c in (copies[n] or [None] * len(anchors[n]))]
        assert all(a is c for a, c in zip(flat, kept)) == shared
    for p, q in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("variant", ["M", "S"])
def test_steps_under_autocast_solve_the_weights_dtype_problems(variant):
    """Under ``torch.autocast`` the forward and backward passes run in bfloat16; the local problems take
    the layer inputs, pre-activations and gradients they produce in the weights' float32 (their values
    are the bfloat16 ones), and the reference loop and the fast solver then solve the same problems."""
    torch.manual_seed(0)
    model = small_autoencoder()
    runs = {}
    x = torch.rand(32, 20)
    for backend in ("reference", "fused"):
        m = copy.deepcopy(model)
        opt = locoprop.LocoProp(m, variant=variant, output_transfer="sigmoid", backend=backend, lr=1e-2,
                                retain_problems=True)

        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return bce_sum_mean(m(x).float(), x)
        first = float(opt.step(closure))
        runs[backend] = (m, opt, first)
    (m_ref, o_ref, l_ref), (m_fast, _, l_fast) = runs["reference"], runs["fused"]
    assert l_ref == l_fast
    for p, q in zip(m_ref.parameters(), m_fast.parameters()):
        assert p.dtype == torch.float32 and torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model[1](model[0](x))  # the second layer's input, as the autocast forward made it
    problem = o_ref.last_problems[1]
    assert hidden.dtype == torch.bfloat16
    assert problem.batch.inputs.dtype == torch.float32 and problem.target.dtype == torch.float32
    assert torch.equal(problem.batch.inputs, hidden.float())
    losses = [l_ref]
    for _ in range(5):
        losses.append(float(o_ref.step(lambda: _autocast_loss(m_ref, x))))
    assert losses[-1] < losses[0]


def _autocast_loss(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return bce_sum_mean(model(x).float(), x)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_a_step_called_inside_an_autocast_region_is_the_step_with_autocast_in_the_closure(backend):
    """A training loop that wraps ``opt.step(closure)`` in ``torch.autocast`` (as it would wrap
    ``loss.backward(); opt.step()``) runs its forward pass in bfloat16 and its local solve in the weights'
    float32, bit for bit the step whose closure holds the autocast region (before: the local products ran
    in bfloat16 and the step failed assigning a bfloat16 gradient to a float32 weight)."""
    torch.manual_seed(0)
    model = small_autoencoder()
    x = torch.rand(32, 20)
    finals = []
    for outer in (False, True):
        m = copy.deepcopy(model)
        opt = locoprop.LocoProp(m, variant="M", output_transfer="sigmoid", backend=backend, lr=1e-2)
        for _ in range(3):
            if outer:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    opt.step(lambda: bce_sum_mean(m(x).float(), x))
            else:
                opt.step(lambda: _autocast_loss(m, x))
        finals.append(list(m.parameters()))
    for p, q in zip(*finals):
        assert p.dtype == torch.float32 and torch.equal(p, q)
    assert not torch.equal(finals[1][0], model[0].weight)


@pytest.mark.parametrize("given", ["model", "compiled"])
def test_a_compiled_model_steps_as_the_eager_one_without_recompiling_each_step(given):
    """``torch.compile(model)``, given to LocoProp or only called in the closure: LocoProp finds the model's
    layers, and its capture hooks are not compiled (a graph break each), so the
    model's graphs are compiled in the first step only (compiled hooks were compiled again every step, up to
    dynamo's recompile limit), and the steps equal the eager model's."""
    torch.manual_seed(0)
    model = small_autoencoder()
    eager = copy.deepcopy(model)
    graphs = []

    def counting_backend(gm, example_inputs):  # a torch.compile backend that runs the graph as it is
        graphs.append(gm)
        return gm.forward
    compiled = torch.compile(model, backend=counting_backend)
    opt = locoprop.LocoProp(model if given == "model" else compiled, output_transfer="sigmoid", lr=1e-2)
    opt_eager = locoprop.LocoProp(eager, output_transfer="sigmoid", lr=1e-2)
    assert [lay.name for lay in opt.layers] == [lay.name for lay in opt_eager.layers]
    x = torch.rand(32, 20)
    counts = []
    for _ in range(12):
        loss = opt.step(lambda: bce_sum_mean(compiled(x), x))
        loss_eager = opt_eager.step(lambda: bce_sum_mean(eager(x), x))
        assert torch.allclose(loss, loss_eager, rtol=1e-6)
        counts.append(len(graphs))
    assert counts[0] > 0 and counts == [counts[0]] * len(counts), counts  # nothing compiled after the first step
    for p, q in zip(model.parameters(), eager.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)


def test_a_ddp_model_is_refused_with_the_fix():
    """DDP reduces parameter gradients, which LocoProp's backward pass (to the pre-activations) never makes:
    the error names model.module and LocoProp's own distributed modes."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(small_autoencoder())
        with pytest.raises(ValueError, match="DistributedDataParallel.*model.module.*distributed='data'"):
            locoprop.LocoProp(ddp, output_transfer="sigmoid")
    finally:
        dist.destroy_process_group()


def test_a_data_parallel_model_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"nn.DataParallel model; .*copies.*pass model.module.*distributed='data'"):
        locoprop.LocoProp(torch.nn.DataParallel(small_autoencoder()), output_transfer="sigmoid")


def test_a_step_called_under_no_grad_is_the_same_step():
    torch.manual_seed(0)
    x = torch.rand(16, 20, dtype=torch.float64)
    base = small_autoencoder(torch.float64)
    models = [copy.deepcopy(base) for _ in range(2)]
    opts = [locoprop.LocoProp(m, lr=1e-2, local_steps=3, output_transfer="sigmoid") for m in models]
    opts[0].step(lambda: bce_sum_mean(models[0](x), x))
    with torch.no_grad():  # as a training loop wrapped in no_grad would call it
        opts[1].step(lambda: bce_sum_mean(models[1](x), x))
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
    assert not torch.equal(base[0].weight, models[0][0].weight)


def test_frozen_layers_are_left_alone_and_the_rest_steps_as_without_them():
    """A layer whose parameters do not require grad keeps its weights bit for bit; the other layers take the
    same step as a LocoProp given only them (``layers=``), the frozen layer's gradient still flowing through."""
    torch.manual_seed(0)
    x = torch.rand(16, 20, dtype=torch.float64)
    base = small_autoencoder(torch.float64)
    frozen_model, listed_model = copy.deepcopy(base), copy.deepcopy(base)
    frozen_model[2].requires_grad_(False)
    opt = locoprop.LocoProp(frozen_model, lr=1e-2, local_steps=3, output_transfer="sigmoid")
    assert [g["name"] for g in opt.param_groups] == ["0", "3", "5"]
    assert [lay.name for lay in opt.frozen_layers] == ["2"] and "frozen" in repr(opt)
    m = listed_model
    with pytest.warns(UserWarning, match=r"left to another optimizer.*: \['2.weight', '2.bias'\]"):
        listed = locoprop.LocoProp(m, lr=1e-2, local_steps=3,
                                   layers=[(m[0], "tanh"), (m[3], "tanh"), (m[5], "sigmoid")])
    for _ in range(2):
        opt.step(lambda: bce_sum_mean(frozen_model(x), x))
        listed.step(lambda: bce_sum_mean(listed_model(x), x))
    for name in ("weight", "bias"):
        assert torch.equal(getattr(frozen_model[2], name), getattr(base[2], name))
    for i in (0, 3, 5):
        assert not torch.equal(frozen_model[i].weight, base[i].weight)
        assert torch.equal(frozen_model[i].weight, listed_model[i].weight)
        assert torch.equal(frozen_model[i].bias, listed_model[i].bias)


def test_frozen_layers_that_cannot_be_honoured_are_refused_by_name():
    model = small_autoencoder()
    model[3].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"layer '3': its weight has requires_grad=False"):
        locoprop.LocoProp(model, output_transfer="sigmoid")
    model = small_autoencoder()
    model[3].requires_grad_(False)
    with pytest.raises(ValueError, match=r"layer '3': listed in layers="):
        locoprop.LocoProp(model, layers=[(model[0], "tanh"), (model[3], "tanh")])
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="every layer LocoProp could train is frozen"):
        locoprop.LocoProp(model, output_transfer="sigmoid")


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_freezing_or_unfreezing_after_construction_is_an_error_that_changes_nothing(change):
    torch.manual_seed(0)
    x = torch.rand(16, 20)
    model = small_autoencoder()
    if change == "unfreeze":
        model[3].requires_grad_(False)
    opt = locoprop.LocoProp(model, lr=1e-2, local_steps=2, output_transfer="sigmoid")
    opt.step(lambda: bce_sum_mean(model(x), x))
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    model[3].requires_grad_(change == "unfreeze")
    with pytest.raises(ValueError, match="layer '3'.*make a new LocoProp"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
    assert repr(opt.state_dict()) == repr(state)


def test_add_param_group_is_refused_and_changes_nothing():
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, output_transfer="sigmoid")
    groups = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(ValueError, match="add_param_group: LocoProp's parameter groups are its layers"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert [list(g["params"]) for g in opt.param_groups] == groups


def test_a_state_dict_from_another_model_or_inner_optimizer_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    x = torch.rand(16, 20)

    def stepped(model, inner):
        opt = locoprop.LocoProp(model, inner=inner, local_steps=2, output_transfer="sigmoid")
        opt.step(lambda: bce_sum_mean(model(x), x))
        return opt
    opt = stepped(small_autoencoder(), "adam")
    before = repr(opt.state_dict())
    narrower = torch.nn.Sequential(torch.nn.Linear(20, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6),
                                   torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 20))
    with pytest.raises(ValueError, match=r"layer '0' weight: its inner state 'exp_avg' has shape \(12, 20\), the "
                                         r"parameter has \(16, 20\)"):
        opt.load_state_dict(stepped(narrower, "adam").state_dict())
    with pytest.raises(ValueError, match="inner optimizer state is locoprop.inner.TFRMSprop's, this optimizer's "
                                         "inner optimizer is torch.optim.adam.Adam"):
        opt.load_state_dict(stepped(small_autoencoder(), "tf_rmsprop").state_dict())
    assert repr(opt.state_dict()) == before
    opt.load_state_dict(stepped(small_autoencoder(), "adam").state_dict())  # the same kinds load


def test_adapted_parametrized_or_tied_layers_are_refused_by_name_and_left_alone_when_frozen():
    from torch.nn.utils.parametrizations import weight_norm

    model = small_autoencoder()
    model[3] = weight_norm(model[3])
    with pytest.raises(ValueError, match=r"layer '3': its parameters are parametrized"):
        locoprop.LocoProp(model, output_transfer="sigmoid")
    model[3].requires_grad_(False)
    opt = locoprop.LocoProp(model, output_transfer="sigmoid")
    assert [lay.name for lay in opt.frozen_layers] == ["3"]
    class LowRankAdapted(torch.nn.Linear):  # a LoRA-style layer: its output is not x Wᵀ + b
        def __init__(self, n, d):
            super().__init__(n, d)
            self.down, self.up = torch.nn.Parameter(torch.randn(n, 2)), torch.nn.Parameter(torch.zeros(2, d))

        def forward(self, x):
            return super().forward(x) + x @ self.down @ self.up
    model = small_autoencoder()
    model[3] = LowRankAdapted(6, 16)
    with pytest.raises(ValueError, match=r"layer '3': LowRankAdapted subclasses nn.Linear with a forward of its own"):
        locoprop.LocoProp(model, output_transfer="sigmoid")
    model[3].requires_grad_(False)
    assert [lay.name for lay in locoprop.LocoProp(model, output_transfer="sigmoid").frozen_layers] == ["3"]
    first, second = torch.nn.Linear(20, 16), torch.nn.Linear(20, 16)
    second.weight = first.weight
    tied = torch.nn.Sequential(first, torch.nn.Tanh(), torch.nn.Linear(16, 20), torch.nn.Tanh(), second)
    with pytest.raises(ValueError, match=r"layer '4': its weight is also a parameter of layer '0' \(tied weights\)"):
        locoprop.LocoProp(tied, output_transfer="sigmoid")


def _normalised_autoencoder():
    """A LayerNorm before the autoencoder: parameters outside LocoProp's layers."""
    return torch.nn.Sequential(torch.nn.LayerNorm(20), *small_autoencoder()).double()


def _backward_grads(model, x):
    model = copy.deepcopy(model)
    bce_sum_mean(model(x), x).backward()
    return [p.grad for p in model[0].parameters()]


def test_other_parameters_get_the_gradient_loss_backward_gives_and_it_accumulates():
    torch.manual_seed(0)
    xs = [torch.rand(16, 20, dtype=torch.float64) for _ in range(2)]
    model = _normalised_autoencoder()
    with pytest.warns(UserWarning, match=r"accumulates their gradients into .grad \(other_grads=True\): "
                                         r"\['0.weight', '0.bias'\]"):
        opt = locoprop.LocoProp(model, lr=1e-2, local_steps=3, output_transfer="sigmoid")
    first = _backward_grads(model, xs[0])
    opt.step(lambda: bce_sum_mean(model(xs[0]), xs[0]))
    for p, g in zip(model[0].parameters(), first):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for lay in opt.layers for p in lay.params)
    second = _backward_grads(model, xs[1])  # at the weights after the first step; not zeroed: it adds up
    opt.step(lambda: bce_sum_mean(model(xs[1]), xs[1]))
    for p, g, h in zip(model[0].parameters(), first, second):
        torch.testing.assert_close(p.grad, g + h, rtol=1e-12, atol=1e-14)
    assert all(torch.count_nonzero(g) > 0 for g in second)


def test_other_parameters_train_beside_locoprop_with_their_own_optimizer():
    torch.manual_seed(0)
    x = torch.rand(64, 20, dtype=torch.float64)
    model = _normalised_autoencoder()
    with pytest.warns(UserWarning, match="left to another optimizer"):
        opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=2.0, local_steps=3, output_transfer="sigmoid")
    norm_opt = torch.optim.Adam(model[0].parameters(), lr=1e-2)
    start = [p.detach().clone() for p in model[0].parameters()]
    losses = []
    for _ in range(20):
        norm_opt.zero_grad()
        losses.append(float(opt.step(lambda: bce_sum_mean(model(x), x))))
        norm_opt.step()
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, q) for p, q in zip(model[0].parameters(), start))


def test_other_grads_false_or_a_step_that_raises_leaves_their_grad_alone():
    torch.manual_seed(0)
    x = torch.rand(16, 20, dtype=torch.float64)
    model = _normalised_autoencoder()
    with pytest.warns(UserWarning, match=r"their .grad is left alone \(other_grads=False\)"):
        opt = locoprop.LocoProp(model, lr=1e-2, local_steps=2, output_transfer="sigmoid", other_grads=False)
    opt.step(lambda: bce_sum_mean(model(x), x))
    assert all(p.grad is None for p in model.parameters())
    model, x = model.float(), x.float()
    with pytest.warns(UserWarning):
        opt = locoprop.LocoProp(model, lr=1e-2, local_steps=2, output_transfer="sigmoid")
    for g in opt.param_groups:
        g["activation_lr"] = 1e300  # the local update overflows: the step is undone
    with pytest.raises(locoprop.DivergenceError, match="undone"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_model_and_optimizer_takes_the_same_steps_on_its_own_weights(how):
    import pickle

    torch.manual_seed(0)
    xs = [torch.rand(16, 20) for _ in range(4)]
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, lr=1e-2, local_steps=3, output_transfer="sigmoid", backend="fused")
    opt.register_step_post_hook(lambda *args: None)  # left out of copies, as torch.optim leaves its hooks out
    _run(model, opt, xs[:2])
    twin, twin_opt = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert twin_opt.model is twin and not twin_opt._optimizer_step_post_hooks
    assert [id(p) for p in twin_opt._params()] == [id(p) for p in twin.parameters()]
    _run(model, opt, xs[2:])
    _run(twin, twin_opt, xs[2:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q) and p is not q
    assert repr(opt.state_dict()) == repr(twin_opt.state_dict())


@pytest.mark.parametrize("variant", ["M", "post-S"])
def test_gradient_checkpointing_takes_the_same_steps_and_the_reentrant_kind_is_named(variant):
    """``torch.utils.checkpoint`` (``use_reentrant=False``) recomputes the block's activations in the backward
    pass; the layers' outputs stay in the loss's graph, so the steps are those without checkpointing (float64,
    1e-12, four steps of T = 5).  The reentrant kind runs the block without autograd: named, nothing changes."""
    from torch.utils.checkpoint import checkpoint

    class Net(torch.nn.Module):
        def __init__(self, mode):
            super().__init__()
            torch.manual_seed(0)
            self.block = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Tanh(), torch.nn.Linear(16, 12),
                                              torch.nn.Softplus())
            self.out = torch.nn.Linear(12, 20)
            self.mode = mode

        def forward(self, x):
            if self.mode is None:
                return self.out(self.block(x))
            return self.out(checkpoint(self.block, x, use_reentrant=self.mode == "reentrant"))

    x = torch.rand(16, 20, dtype=torch.float64)
    models = {}
    for mode in (None, "non-reentrant", "reentrant"):
        model = Net(mode).double()
        opt = locoprop.LocoProp(model, variant=variant, lr=1e-2, local_steps=5,
                                layers=[(model.block[0], model.block[1]), (model.block[2], model.block[3]),
                                        (model.out, "sigmoid")])
        if mode == "reentrant":
            before = copy.deepcopy(model.state_dict())
            with pytest.raises(RuntimeError, match="layer 'block.0' ran 1 times .* use_reentrant=False"):
                opt.step(lambda: bce_sum_mean(model(x.requires_grad_(True)), x.detach()))
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
            continue
        for _ in range(4):
            opt.step(lambda: bce_sum_mean(model(x), x))
        models[mode] = model
    for p, q in zip(models[None].parameters(), models["non-reentrant"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert not torch.equal(models[None].out.weight, Net(None).double().out.weight)


def test_a_lazy_layer_is_refused_until_a_forward_pass_initializes_it():
    model = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.Tanh(), torch.nn.Linear(8, 20))
    with pytest.raises(ValueError, match="layer '0': its parameters are not initialized yet .*LazyLinear"):
        locoprop.LocoProp(model, output_transfer="sigmoid")
    x = torch.rand(4, 20)
    model(x)
    opt = locoprop.LocoProp(model, output_transfer="sigmoid", lr=1e-2)
    start = model[0].weight.detach().clone()
    opt.step(lambda: bce_sum_mean(model(x), x))
    assert not torch.equal(model[0].weight, start)
