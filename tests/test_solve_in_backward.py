"""``LocoProp(solve_in_backward=True)`` (the CPU's default): each layer's local problem is built and solved during
the backward pass, as soon as the pass has multiplied the layer's gradient by its weights, from the output layer
down.  The same steps to the bit as solving every layer after the pass; each layer's target freed before the next
layer's is made; a step it cannot take that way (micro-batches, no finite check, ...) solves after the pass."""

import copy
import types
import warnings
import weakref

import pytest
import torch
from torch import nn

import locoprop
from conftest import bce_sum_mean, mixed_mlp, small_autoencoder
from test_errors import _assert_unchanged, _snapshot


class _Normed(nn.Module):
    """A LayerNorm (another optimizer's parameters) and a bias-free layer (solved after the pass)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 6, bias=False))
        self.norm = nn.LayerNorm(6)
        self.dec = nn.Sequential(nn.Linear(6, 12), nn.Softplus(), nn.Linear(12, 20))

    def forward(self, x):
        return self.dec(self.norm(self.enc(x)))


class _Attention(nn.Module):
    """A self-attention (its output projection solved during the pass, the packed input projections after it)
    between two Linear layers over sequences of 4 positions."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(32, 20)

    def forward(self, x):
        h = torch.tanh(self.inp(x.view(-1, 4, 5)))
        return self.out(self.att(h, h, h, need_weights=False)[0].flatten(1))


def _shared_weights():  # one Linear called twice: solved after the pass
    twice = nn.Linear(12, 12)
    return nn.Sequential(nn.Linear(20, 12), nn.Tanh(), twice, nn.Tanh(), twice, nn.Tanh(), nn.Linear(12, 20))


def _convolutions():  # a convolution's matrix: solved after the pass; the Linear head during it
    return nn.Sequential(nn.Unflatten(1, (1, 4, 5)), nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(60, 20))


class _TwoHeads(nn.Module):
    """Two Linear layers back to back (the second's input gradient goes to the first's node) and two heads
    reading the same features (both solved as the node their input's gradient goes to starts, once)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 12), nn.Linear(12, 10), nn.Tanh())
        self.head_a, self.head_b = nn.Linear(10, 20), nn.Linear(10, 20)

    def forward(self, x):
        h = self.body(x)
        return self.head_a(h) + 0.5 * self.head_b(h)


MODELS = {"autoencoder": small_autoencoder, "mixed": lambda: mixed_mlp(widths=(20, 10, 9, 8, 7, 20)),
          "normed": _Normed, "attention": _Attention, "shared": _shared_weights, "convolutions": _convolutions,
          "two-heads": _TwoHeads}


def _steps(build, solve_in_backward, steps=3, **kwargs):
    torch.manual_seed(0)
    model = build().double()
    settings = dict(lr=1e-2, activation_lr=3.0, local_steps=3, output_transfer="sigmoid",
                    inner_kwargs={"momentum": 0.9, "alpha": 0.9, "eps": 1e-8})
    settings.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LayerNorm is left to another optimizer
        opt = locoprop.LocoProp(model, solve_in_backward=solve_in_backward, **settings)
    during = []  # the layers whose problems were built while a backward pass ran
    problem = opt._problem

    def building(b, group, saved=None, **kw):
        if torch._C._current_graph_task_id() != -1:
            during.append(group["name"])
        return problem(b, group, saved, **kw)
    opt._problem = building
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.rand(16, 20, generator=gen, dtype=torch.float64)
        losses.append(float(opt.step(lambda: bce_sum_mean(model(x), x))))
        for p in opt.other_parameters():  # another optimizer's step would follow; keep the gradients apart
            p.grad = None
    return model, opt, losses, during


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("name", list(MODELS))
def test_solving_in_the_backward_pass_takes_the_same_steps_to_the_bit(name, backend):
    """Weights, inner state and losses equal those of the step that solves every layer after the backward pass,
    to the bit, on models where every layer is solved during the pass and where some are solved after it (a
    bias-free layer, a shared layer, a convolution, an attention's input projections), with another optimizer's
    parameters in the model (a LayerNorm: their gradients equal too)."""
    build = MODELS[name]
    m_in, o_in, l_in, during = _steps(build, True, backend=backend)
    m_after, o_after, l_after, none = _steps(build, False, backend=backend)
    assert o_in._solves_in_backward([None], False) and not none
    assert during  # (from the output layers down: test_which_layers_are_solved_during_the_pass)
    assert o_in.last_solver == o_after.last_solver == ("fused" if backend == "fused" else "reference")
    assert l_in == l_after
    for p, q in zip(m_in.parameters(), m_after.parameters()):
        assert torch.equal(p, q)
        if p in o_in.inner.state:
            s, t = o_in.inner.state[p], o_after.inner.state[q]
            assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)


def test_which_layers_are_solved_during_the_pass():
    """Layers with a bias whose weights enter the node that takes their gradient are solved during the pass, the
    output layer first; a bias-free layer, a shared layer's calls, a convolution's matrix are solved after it."""
    for name, expected in [("autoencoder", ["5", "3", "2", "0"]), ("normed", ["dec.2", "dec.0", "enc.0"]),
                           ("shared", ["6", "0"]), ("convolutions", ["4"]), ("attention", ["out", "att.out_proj"]),
                           ("two-heads", ["head_a", "head_b", "body.1", "body.0"])]:
        *_, during = _steps(MODELS[name], True, steps=1)
        assert during == expected, name


def test_each_layers_target_is_freed_before_the_next_one_is_made():
    """During the backward pass a layer's target, first residual and solve buffers are let go once it is
    solved: when a layer's problem is built, no earlier layer's target is alive (after the pass all of them
    are built first and held through the solve)."""
    for solve_in_backward in (True, False):
        torch.manual_seed(0)
        model = small_autoencoder()
        opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=3.0, local_steps=2, output_transfer="sigmoid",
                                solve_in_backward=solve_in_backward)
        targets, alive = [], []
        problem = opt._problem

        def building(b, group, saved=None, **kw):
            alive.append(sum(t() is not None for t in targets))
            made = problem(b, group, saved, **kw)
            targets.append(weakref.ref(made.target))
            return made
        opt._problem = building
        x = torch.rand(32, 20)
        opt.step(lambda: bce_sum_mean(model(x), x))
        assert alive == ([0, 0, 0, 0] if solve_in_backward else [0, 1, 2, 3]), solve_in_backward
        assert all(t() is None for t in targets)


@pytest.mark.parametrize("settings", [
    dict(check_finite=False), dict(retain_problems=True), dict(solve_order="iteration-major", backend="fused"),
    dict(reset_inner_state=True), dict(variant="S", solver="closed_form", regularizer=locoprop.L2Proximity(1.0)),
    dict(variant="post-S"),
    dict(solve_in_backward=False)])
def test_steps_it_cannot_take_that_way_solve_after_the_pass(settings):
    """No finite check (nothing would undo the layers solved before one that raises), problems kept for
    inspection, the iteration-major order, a reset inner state, a closed form, a target from ``∇_ŷ L``, or
    ``solve_in_backward=False``: every layer solved after the pass; so are micro-batches."""
    torch.manual_seed(0)
    model = small_autoencoder()
    settings = dict(settings)
    variant = settings.pop("variant", "M")
    opt = locoprop.LocoProp(model, variant=variant, lr=1e-2, output_transfer="sigmoid", **settings)
    x = torch.rand(8, 20)
    closures = [lambda: bce_sum_mean(model(x), x)]
    assert not opt._solves_in_backward(closures, False)
    assert locoprop.LocoProp(small_autoencoder(), output_transfer="sigmoid")._solves_in_backward(closures, False)
    assert not locoprop.LocoProp(small_autoencoder(), output_transfer="sigmoid")._solves_in_backward(
        closures * 2, False)  # micro-batches: each layer's problem holds all of them
    opt.step(closures[0])


def test_a_weight_the_pass_still_needs_is_named_and_the_step_undone():
    """A loss that multiplies by a layer's weights before that layer's own product (so that the backward pass
    needs them after solving the layer) stops with a RuntimeError naming solve_in_backward=False, weights and
    inner state as they were; with it the step is taken."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 8))
    x = torch.rand(16, 8)

    def closure():
        z = model[0](x)
        extra = (z @ model[2].weight.T).pow(2).sum()  # made before model[2]'s input: its backward runs after
        return bce_sum_mean(model[2](model[1](z)), x) + 1e-3 * extra
    opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid")
    opt.step(lambda: bce_sum_mean(model(x), x))
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"layers solved: \['2'\].*solve_in_backward=False"):
        opt.step(closure)
    _assert_unchanged(model, opt, snap)
    opt.solve_in_backward = False
    assert torch.isfinite(opt.step(closure))


def test_the_pass_lets_go_of_a_layers_gradient_before_its_solve():
    """A layer whose input takes a gradient is solved as the node that gradient goes to starts, when the
    backward pass no longer holds the gradient it handed the layer's own node (``∇_â L``, which it holds through
    that node's hooks): once the layer's problem is made from it, nothing else holds its storage, so the solve
    does not hold it beside its copies and buffers.  (The first layer, whose input is the data, is solved as
    its own node ends.)  Counted by the storage's references (a private PyTorch function)."""
    def holders(t):  # references to t's storage besides t, its base (a view holds it) and the storage object asked
        storage = t.untyped_storage()
        return torch._C._storage_Use_Count(storage._cdata) - 2 - t._is_view()

    base = torch.empty(5, 2)
    assert holders(base) == holders(base.view(10)) == 0
    torch.manual_seed(0)
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=3.0, local_steps=2, output_transfer="sigmoid")
    held, problem = {}, opt._problem

    def building(b, group, saved=None, **kw):
        gradient = b.grad_pre
        made = problem(b, group, saved, **kw)
        held[group["name"]] = holders(gradient)
        return made
    opt._problem = building
    x = torch.rand(32, 20)
    opt.step(lambda: bce_sum_mean(model(x), x))
    assert len(held) == len(opt.layers) and all(held[layer.name] == 0 for layer in opt.layers[1:]), held


def test_a_layer_is_solved_once_every_use_of_its_input_is_done():
    """A layer is solved as the node its input's gradient goes to starts, which the backward pass runs once every
    use of that input is done: a loss that also multiplies the layer's input by its weights (whose backward
    needs them) takes the step the after-pass solve takes, to the bit, the layer still solved during the pass."""
    def closure_of(model, x):
        def closure():
            h = model[1](model[0](x))
            extra = (h @ model[2].weight.T).pow(2).sum()  # made before model[2]'s product: its backward runs after
            return bce_sum_mean(model[2](h), x) + 1e-3 * extra
        return closure
    runs = []
    for solve_in_backward in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 8))
        x = torch.rand(16, 8)
        opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid", solve_in_backward=solve_in_backward)
        during, problem = [], opt._problem

        def building(b, group, saved=None, **kw):
            if torch._C._current_graph_task_id() != -1:
                during.append(group["name"])
            return problem(b, group, saved, **kw)
        opt._problem = building
        losses = [float(opt.step(closure_of(model, x))) for _ in range(3)]
        runs.append((model, losses, during))
    (m_in, l_in, during), (m_after, l_after, none) = runs
    assert during == ["2", "0"] * 3 and not none
    assert l_in == l_after and all(torch.equal(p, q) for p, q in zip(m_in.parameters(), m_after.parameters()))


def test_a_layer_that_raises_during_the_pass_undoes_the_layers_before_it():
    """A local problem that fails after other layers were solved during the pass (here a target of the wrong
    shape for the first layer only) leaves every layer's weights and inner state as they were."""
    class Bad(locoprop.MDTarget):
        def __call__(self, batch, gamma):
            target = super().__call__(batch, gamma)
            return target[:, :-1] if batch.layer.name == "0" else target

    torch.manual_seed(0)
    model = small_autoencoder()
    x = torch.rand(16, 20)
    opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid")
    opt.step(lambda: bce_sum_mean(model(x), x))
    opt.variant = opt.variant.with_components(Bad(), None, None, None)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match="layer '0': target"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    _assert_unchanged(model, opt, snap)


def test_the_rollback_copies_each_layer_just_before_its_solve():
    """With ``check_finite`` a step that solves in the backward pass copies a layer's weights and inner state
    just before its solve, as its problem is made (after its target and first residual), so that the copies
    held are those of the layers solved before it and its own (not every layer's from the step's start); the
    last step's copies are let go
    before the forward pass.  A local update that is not finite in the last layer solved (the first layer, a NaN
    in its target) undoes every layer, those solved before it included, to the bit."""
    class NaNFirst(locoprop.MDTarget):
        def __call__(self, batch, gamma):
            target = super().__call__(batch, gamma)
            return target * float("nan") if batch.layer.name == "0" else target

    torch.manual_seed(0)
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=3.0, local_steps=2, output_transfer="sigmoid")
    held, in_forward, problem = [], [], opt._problem

    def building(b, group, saved=None, **kw):
        before = [id(p) for p in opt._rollback._params]
        made = problem(b, group, saved, **kw)
        held.append((before, [id(p) for p in opt._rollback._params], [id(p) for p in group["params"]]))
        return made
    opt._problem = building
    x = torch.rand(32, 20)

    def closure():
        in_forward.append(len(opt._rollback._buffers))
        return bce_sum_mean(model(x), x)
    for _ in range(2):  # the second step with the inner state the first one made
        held.clear()
        opt.step(closure)
        assert len(held) == len(opt.param_groups)
        solved = []
        for copied_before, copied, params in held:
            assert copied_before == solved  # its own copy is taken as its problem is made, after its target
            solved += params
            assert copied == solved
    assert in_forward == [0, 0] and opt._rollback._buffers  # kept until the next step starts
    snap = _snapshot(model, opt)
    opt.variant = opt.variant.with_components(NaNFirst(), None, None, None)
    with pytest.raises(locoprop.DivergenceError, match=r"layer\(s\) \['0'\]"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    _assert_unchanged(model, opt, snap)


def test_the_option_is_checked():
    with pytest.raises(TypeError, match="solve_in_backward: expected None, True, False or .overlap."):
        locoprop.LocoProp(small_autoencoder(), output_transfer="sigmoid", solve_in_backward="yes")


def test_a_solved_step_copies_and_pickles():
    """The option travels with ``copy.deepcopy`` and the copy takes the same steps."""
    torch.manual_seed(0)
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid", solve_in_backward=False)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.solve_in_backward is False
    x = torch.rand(8, 20)
    opt.step(lambda: bce_sum_mean(model(x), x))
    opt2.step(lambda: bce_sum_mean(model2(x), x))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_a_transfer_that_keeps_its_output_lets_the_pre_activation_go_in_the_forward_pass():
    """Where a transfer module's backward keeps its output (tanh, sigmoid, ReLU), LocoProp-M keeps that output
    from the moment the module returns it, so the pre-activation is freed during the forward pass as BackProp
    frees it; one whose backward keeps its input (Softplus, LeakyReLU) keeps it until the pass ends, as autograd
    does.  An output of the first kind changed in place is named (the backward pass would refuse it too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 8))
    opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid")
    refs, alive = {}, {}
    for i in (0, 2):
        model[i].register_forward_hook(lambda mod, inp, out, i=i: refs.__setitem__(i, weakref.ref(out)))
    model[4].register_forward_hook(lambda *a: alive.update({i: r() is not None for i, r in refs.items()}))
    x = torch.rand(4, 8)
    opt.step(lambda: bce_sum_mean(model(x), x))
    assert alive == {0: False, 2: True}  # at the last layer's call, before the forward pass has ended

    def doubled():
        h = model[1](model[0](x))
        h.mul_(2.0)
        return bce_sum_mean(model[4](model[3](model[2](h))), x)
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"layer '0': the output of its Tanh was changed in place"):
        opt.step(doubled)
    _assert_unchanged(model, opt, snap)


def test_without_the_finite_check_it_is_asked_for_and_takes_the_same_steps():
    """``check_finite=False`` solves after the pass unless ``solve_in_backward=True``; then the steps are the
    same to the bit, a non-finite loss is read before the pass (the step not taken, nothing changed), and an
    error after some layers were solved keeps their update, with a warning naming them."""
    auto = locoprop.LocoProp(small_autoencoder(), output_transfer="sigmoid", check_finite=False)
    assert not auto._solves_in_backward([None], False)
    m_in, o_in, l_in, during = _steps(small_autoencoder, True, check_finite=False)
    m_after, _, l_after, none = _steps(small_autoencoder, False, check_finite=False)
    assert o_in._solves_in_backward([None], False) and during and not none and l_in == l_after
    assert all(torch.equal(p, q) for p, q in zip(m_in.parameters(), m_after.parameters()))

    x = torch.rand(16, 20, dtype=torch.float64)
    snap = _snapshot(m_in, o_in)
    with pytest.raises(locoprop.DivergenceError, match="loss is nan; the step was not taken"):
        o_in.step(lambda: bce_sum_mean(m_in(x), x) * float("nan"))
    _assert_unchanged(m_in, o_in, snap)

    class Bad(locoprop.MDTarget):
        def __call__(self, batch, gamma):
            target = super().__call__(batch, gamma)
            return target[:, :-1] if batch.layer.name == "0" else target
    o_in.variant = o_in.variant.with_components(Bad(), None, None, None)
    before = [p.detach().clone() for p in m_in.parameters()]
    with pytest.warns(UserWarning, match=r"layers \['5', '3', '2'\], solved before the error"):
        with pytest.raises(ValueError, match="layer '0': target"):
            o_in.step(lambda: bce_sum_mean(m_in(x), x))
    changed = [not torch.equal(p, q) for p, q in zip(m_in.parameters(), before)]
    assert changed == [False, False, True, True, True, True, True, True]  # layer 0 (weight, bias) as it was


def test_the_fast_solver_solves_each_layer_eagerly_during_the_pass():
    """During the pass each call of the fast solver holds one layer's problem, new at every call: it asks for
    the solve to be launched eagerly (``graph=False``: on CUDA a graph per call would be captured and let go at
    the next); after the pass the one call leaves that to the solver (captured on CUDA)."""
    for solve_in_backward, expected in ((True, [{"graph": False}] * 4), (False, [{}])):
        torch.manual_seed(0)
        model = small_autoencoder()
        opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid", backend="fused",
                                solve_in_backward=solve_in_backward)
        calls, solve = [], opt.fused_solver.solve

        def recording(problems, *args, **kwargs):
            calls.append(kwargs)
            return solve(problems, *args, **kwargs)
        opt.fused_solver.solve = recording
        x = torch.rand(8, 20)
        opt.step(lambda: bce_sum_mean(model(x), x))
        assert calls == expected and opt.last_solver == "fused", solve_in_backward


def test_off_the_cpu_only_when_asked_for():
    """By default only a step on the CPU solves in the pass (on CUDA the default step captures the solve of
    every layer at once); ``solve_in_backward=True`` asks for it on another device too, the layers on one."""
    opt = locoprop.LocoProp(small_autoencoder(), output_transfer="sigmoid")
    meta = [torch.empty(1, device="meta")]
    opt._params = lambda: meta
    assert not opt._solves_in_backward([None], False)
    opt.solve_in_backward = True
    assert opt._solves_in_backward([None], False)
    opt._params = lambda: meta + [torch.empty(1)]  # layers on two kinds of device
    assert not opt._solves_in_backward([None], False)


def test_a_copy_of_every_layer_before_the_pass_serves_as_well():
    """Where the copy goes to host memory (``rollback="host"`` on CUDA) every layer is copied before the forward
    pass (:meth:`locoprop.rollback.Rollback.save`) and each solve during the pass waits for it: forced here on the CPU, the
    steps are the layer-by-layer copy's to the bit, the copy is held through the forward pass, and a NaN in
    the last layer solved undoes every layer to the bit."""
    class NaNFirst(locoprop.MDTarget):
        def __call__(self, batch, gamma):
            target = super().__call__(batch, gamma)
            return target * float("nan") if batch.layer.name == "0" else target

    results = []
    for whole in (False, True):
        torch.manual_seed(0)
        model = small_autoencoder().double()
        opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=3.0, local_steps=3, output_transfer="sigmoid")
        if whole:
            opt._rollback.copies_layer_by_layer = lambda device: False
        in_forward, waits, wait = [], [], opt._rollback.wait
        opt._rollback.wait = lambda: (waits.append(1), wait())
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.rand(16, 20, generator=gen, dtype=torch.float64)

            def closure():
                in_forward.append(len(opt._rollback._buffers))
                return bce_sum_mean(model(x), x)
            opt.step(closure)
        n_params = len(list(model.parameters()))  # the weights; from the second step their inner state too
        n_state = sum(torch.is_tensor(v) for st in opt.inner.state.values() for v in st.values())
        assert in_forward == ([n_params] + [n_params + n_state] * 2 if whole else [0] * 3)
        assert len(waits) == (3 * len(opt.param_groups) if whole else 0)  # before each layer's solve
        results.append([p.detach().clone() for p in model.parameters()])
        snap = _snapshot(model, opt)
        opt.variant = opt.variant.with_components(NaNFirst(), None, None, None)
        with pytest.raises(locoprop.DivergenceError, match=r"layer\(s\) \['0'\]"):
            opt.step(lambda: bce_sum_mean(model(x), x))
        _assert_unchanged(model, opt, snap)
    assert all(torch.equal(p, q) for p, q in zip(*results))


def _overlapping(monkeypatch, opt):
    """``opt`` taking the path of ``solve_in_backward="overlap"`` on the CPU (no streams there: each solve
    runs at once), recording the fast solver's calls' keyword arguments and its joins."""
    monkeypatch.setattr(opt, "_overlaps_backward", lambda: True)
    calls, joins, solve, join = [], [], opt.fused_solver.solve, opt.fused_solver.join_streams

    def recording(problems, *args, **kwargs):
        calls.append(kwargs)
        return solve(problems, *args, **kwargs)

    def joining():
        joins.append(len(calls))
        return join()
    monkeypatch.setattr(opt.fused_solver, "solve", recording)
    monkeypatch.setattr(opt.fused_solver, "join_streams", joining)
    return calls, joins


@pytest.mark.parametrize("streams, overlaps", [(True, True), (2, True), (False, False), (0, False)])
def test_overlap_needs_layer_streams(monkeypatch, streams, overlaps):
    """On CUDA (the parameters' device, faked) "overlap" runs the chains on layer streams: not with
    ``layer_streams`` ``False`` or ``0``, which both mean none."""
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, output_transfer="sigmoid", solve_in_backward="overlap", layer_streams=streams)
    monkeypatch.setattr(opt, "_params", lambda: [types.SimpleNamespace(is_cuda=True)])
    assert opt._overlaps_backward() is overlaps


def test_overlap_on_the_cpu_is_solving_in_the_pass():
    """``solve_in_backward="overlap"`` needs CUDA streams: on the CPU it steps as ``True`` does, to the bit, and
    a captured step solves in the pass only with it (``_overlaps_backward``: the fast solver on CUDA)."""
    runs = []
    for setting in (True, "overlap"):
        torch.manual_seed(0)
        model = small_autoencoder()
        opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid", backend="fused", solve_in_backward=setting)
        assert not opt._overlaps_backward() and not opt._solves_in_backward([None], True)
        x = torch.rand(8, 20)
        for _ in range(3):
            opt.step(lambda: bce_sum_mean(model(x), x))
        runs.append(model)
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in runs)))


@pytest.mark.parametrize("check, precision", [(True, "fp32"), (False, "fp32"), (True, "bf16")])
def test_the_overlap_path_puts_each_layer_on_its_stream_and_joins_after_the_pass(monkeypatch, check, precision):
    """The path of ``"overlap"`` (forced on the CPU, where the solver runs each call at once): each layer solved
    in the pass asks for its layer stream (the costliest layers on streams of their own, as ``stream_plan``
    shares them out), the streams are joined once, after the pass, and the steps are those of solving in the
    pass on the pass's stream, to the bit."""
    runs = []
    for overlap in (False, True):
        torch.manual_seed(0)
        model = small_autoencoder()
        with warnings.catch_warnings():  # bf16 on a CPU without bf16 instructions warns
            warnings.simplefilter("ignore")
            opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid", backend="fused",
                                    solve_in_backward=True, check_finite=check, precision=precision)
        calls, joins = _overlapping(monkeypatch, opt) if overlap else ([], [])
        x = torch.rand(8, 20)
        for _ in range(2):
            opt.step(lambda: bce_sum_mean(model(x), x))
        runs.append(model)
    layers = len(opt.param_groups)
    assert joins == [layers, 2 * layers]  # once a step, after every layer's solve
    streams = [c.pop("on_stream") for c in calls]
    assert all(c == {"graph": False} for c in calls)
    costs = [int(g["local_steps"]) * g["params"][0].numel() for g in opt.param_groups]
    where = opt.fused_solver.stream_assignment(costs, layers)
    assert sorted(where) == list(range(layers))  # each on a stream of its own
    assert streams == [where[m] for m in reversed(range(layers))] * 2  # solved from the output layer down
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in runs)))


def test_the_overlap_path_checks_each_layer_once_the_pass_is_done(monkeypatch):
    """``check_finite="layer"`` on the path of ``"overlap"``: the layers run on their streams during the pass, so
    each is checked once they are joined; a layer whose targets overflow is undone alone, its copy and every
    other layer's held until then, and the others keep the update of a finite step, to the bit."""
    torch.manual_seed(0)
    model = small_autoencoder()
    x = torch.rand(16, 20)
    opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid", backend="fused", check_finite="layer")
    opt.step(lambda: bce_sum_mean(model(x), x))
    twin_model, twin = copy.deepcopy((model, opt))
    _, joins = _overlapping(monkeypatch, opt)
    held, release = [], opt._rollback.release
    monkeypatch.setattr(opt._rollback, "release", lambda params: (held.append(len(opt._rollback._params)),
                                                                 release(params)))
    bad = 2
    before = [p.detach().clone() for p in opt.param_groups[bad]["params"]]
    opt.param_groups[bad]["activation_lr"] = 1e300
    name = opt.param_groups[bad]["name"]
    with pytest.raises(locoprop.DivergenceError, match=rf"layer\(s\) \['{name}'\].*undone, the others kept"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    twin.step(lambda: bce_sum_mean(twin_model(x), x))
    assert len(joins) == 1 and held == [2 * len(opt.param_groups)]  # every layer's copy, let go after the pass
    for m, (group, twin_group) in enumerate(zip(opt.param_groups, twin.param_groups)):
        expected = before if m == bad else twin_group["params"]
        assert all(torch.equal(p, q) for p, q in zip(group["params"], expected, strict=True)), m
