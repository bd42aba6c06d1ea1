"""The fast layer-parallel solver (:mod:`locoprop.fused`) against the reference loop, on the CPU.

The CUDA graph and stream paths are checked by ``tests/cuda`` on a machine with a GPU.
"""

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

import locoprop
from locoprop.fused import FusedIterativeSolver

from conftest import bce_sum_mean, small_autoencoder


def _run(backend, steps=5, dtype=torch.float32, variant="M", inner="tf_rmsprop", inner_kwargs=None,
         regularizer=None, precision="fp32", local_steps=5, lr=1e-2, activation_lr=1.0, solve_order="layer-major",
         per_layer=False, solve_in_backward=True):
    torch.manual_seed(0)
    model = small_autoencoder(dtype)
    opt = locoprop.LocoProp(model, variant=variant, lr=lr, activation_lr=activation_lr, local_steps=local_steps,
                            inner=inner, inner_kwargs=inner_kwargs or {}, output_transfer="sigmoid",
                            regularizer=regularizer, backend=backend, precision=precision, solve_order=solve_order,
                            solve_in_backward=solve_in_backward)
    if per_layer:  # layers with their own learning rates and numbers of local iterations
        opt.param_groups[1]["lr"] *= 3.0
        opt.param_groups[2]["local_steps"] = 2
        opt.param_groups[3]["local_steps"] = local_steps + 2
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.rand(32, 20, generator=gen, dtype=dtype)
        losses.append(float(opt.step(lambda: bce_sum_mean(model(x), x))))
    return model, opt, losses


def _max_rel(a_tensors, b_tensors):
    return max(((a - b).norm() / a.norm().clamp_min(1e-30)).item() for a, b in zip(a_tensors, b_tensors))


@pytest.mark.parametrize("kwargs", [
    dict(variant="M"),
    dict(variant="S"),
    dict(variant="post-S"),
    dict(variant="poco-M"),
    dict(variant="M", regularizer="l2-paper"),
    dict(variant="M", inner_kwargs={"momentum": 0.9, "alpha": 0.95, "eps": 1e-8}),
])
def test_fused_equals_reference_in_float32(kwargs):
    """Several steps of T = 5 local iterations: weights and inner state agree to 1e-5 (issue 5)."""
    m_ref, o_ref, _ = _run("reference", **kwargs)
    m_fast, o_fast, _ = _run("fused", **kwargs)
    assert o_ref.last_solver == "reference" and o_fast.last_solver == "fused"
    assert _max_rel(list(m_ref.parameters()), list(m_fast.parameters())) < 1e-5
    for p, q in zip(m_ref.parameters(), m_fast.parameters()):
        s_ref, s_fast = o_ref.inner.state[p], o_fast.inner.state[q]
        assert s_ref.keys() == s_fast.keys()
        assert torch.equal(s_ref["step"], s_fast["step"])  # T counted per step, as inner.step() does
        assert _max_rel([s_ref["mean_square"]], [s_fast["mean_square"]]) < 1e-5


@pytest.mark.parametrize("inner", ["sgd", "momentum", "nesterov"])
def test_fused_equals_reference_in_float64_for_sgd_rules(inner):
    m_ref, _, _ = _run("reference", dtype=torch.float64, inner=inner, lr=1e-3)
    m_fast, _, _ = _run("fused", dtype=torch.float64, inner=inner, lr=1e-3)
    assert _max_rel(list(m_ref.parameters()), list(m_fast.parameters())) < 1e-12


#: Every inner optimizer the fast solver implements besides TF-RMSProp, with settings that exercise each branch.
TORCH_INNER = [
    ("sgd", {"weight_decay": 0.1}),
    ("nesterov", {"weight_decay": 0.1}),
    ("adam", {}),
    ("adam", {"betas": (0.8, 0.95), "weight_decay": 0.1, "eps": 1e-6}),
    ("adamw", {}),
    ("adamw", {"weight_decay": 0.5}),
    ("rmsprop", {}),
    ("rmsprop", {"momentum": 0.9, "weight_decay": 0.1}),
    ("rmsprop", {"centered": True, "alpha": 0.9}),
    ("rmsprop", {"centered": True, "momentum": 0.5}),
    ("adagrad", {}),
    ("adagrad", {"lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.1}),
]


def _assert_same_state(o_ref, o_fast, m_ref, m_fast, tol):
    for p, q in zip(m_ref.parameters(), m_fast.parameters()):
        s_ref, s_fast = o_ref.inner.state[p], o_fast.inner.state[q]
        assert s_ref.keys() == s_fast.keys()
        for key in s_ref:
            if key == "step":
                assert s_ref[key].dtype == s_fast[key].dtype and torch.equal(s_ref[key], s_fast[key])
            elif torch.is_tensor(s_ref[key]):
                assert _max_rel([s_ref[key]], [s_fast[key]]) < tol, key


@pytest.mark.parametrize("inner, inner_kwargs", TORCH_INNER)
@pytest.mark.parametrize("order", ["layer-major", "iteration-major"])
def test_fused_equals_reference_in_float64_for_torch_inner_optimizers(inner, inner_kwargs, order):
    """Adam(W), RMSprop, Adagrad and SGD with weight decay: the fast solver's update rule is torch's
    recurrence (weights and every state tensor within 1e-12 in float64, step counters equal), also with
    per-layer learning rates and numbers of iterations, whose step counters then differ from layer to layer
    (Adam's bias corrections and Adagrad's decay are per layer)."""
    kwargs = dict(dtype=torch.float64, inner=inner, inner_kwargs=inner_kwargs, lr=1e-3, per_layer=True)
    m_ref, o_ref, _ = _run("reference", **kwargs)
    m_fast, o_fast, _ = _run("fused", solve_order=order, **kwargs)
    assert o_ref.last_solver == "reference" and o_fast.last_solver == "fused"
    assert _max_rel(list(m_ref.parameters()), list(m_fast.parameters())) < 1e-12
    _assert_same_state(o_ref, o_fast, m_ref, m_fast, 1e-12)


@pytest.mark.parametrize("inner, inner_kwargs", [("adam", {}), ("rmsprop", {"momentum": 0.9}), ("adagrad", {})])
def test_fused_equals_reference_in_float32_for_torch_inner_optimizers(inner, inner_kwargs):
    """Issue 5's test at float32: the weights within 1e-5 relative over several steps (the moments, which
    follow rounding differences of the weights, within 1e-4)."""
    m_ref, o_ref, _ = _run("reference", inner=inner, inner_kwargs=inner_kwargs, lr=1e-3)
    m_fast, o_fast, _ = _run("fused", inner=inner, inner_kwargs=inner_kwargs, lr=1e-3)
    assert _max_rel(list(m_ref.parameters()), list(m_fast.parameters())) < 1e-5
    _assert_same_state(o_ref, o_fast, m_ref, m_fast, 1e-4)


def test_adam_bias_correction_follows_the_step_counter_and_a_reset_state():
    """The bias corrections come from the inner state's step counter: loading a state saved after some
    steps continues exactly as the reference loop does, and ``reset_inner_state`` starts every step at 1."""
    for reset in (False, True):
        runs = []
        for backend in ("reference", "fused"):
            torch.manual_seed(0)
            model = small_autoencoder(torch.float64)
            opt = locoprop.LocoProp(model, lr=1e-3, local_steps=3, inner="adam", output_transfer="sigmoid",
                                    backend=backend, reset_inner_state=reset)
            gen = torch.Generator().manual_seed(1)
            for _ in range(4):
                x = torch.rand(16, 20, generator=gen, dtype=torch.float64)
                opt.step(lambda: bce_sum_mean(model(x), x))
            runs.append((model, opt))
        (m_ref, o_ref), (m_fast, o_fast) = runs
        assert _max_rel(list(m_ref.parameters()), list(m_fast.parameters())) < 1e-12
        steps = {float(st["step"]) for st in o_fast.inner.state.values()}
        assert steps == ({3.0} if reset else {12.0})
    # the captured whole step builds its table before the state is reset inside the graph: ``fresh``
    solver, rule = o_fast.fused_solver, locoprop.fused.update_rule_for(o_fast.inner)[0]
    reg = o_fast.variant.regularizer
    after_steps = solver.table_for(o_fast.param_groups, reg, False, rule)
    fresh = solver.table_for(o_fast.param_groups, reg, False, rule, fresh=True)
    o_fast.inner.state.clear()
    assert torch.equal(fresh, solver.table_for(o_fast.param_groups, reg, False, rule))
    assert not torch.equal(fresh, after_steps)
    assert fresh.shape == (len(o_fast.param_groups), 4 * 3 + 1)  # η_k, η_k/c1, √c2, 1 - η_k λ; then c


@pytest.mark.parametrize("inner", ["adam", "rmsprop"])
def test_first_fused_step_divergence_with_torch_inner_optimizers_removes_their_state(inner):
    torch.manual_seed(0)
    model = small_autoencoder()
    before = [p.detach().clone() for p in model.parameters()]
    opt = locoprop.LocoProp(model, output_transfer="sigmoid", backend="fused", inner=inner, activation_lr=1e300)
    x = torch.rand(16, 20)
    with pytest.raises(locoprop.DivergenceError):
        opt.step(lambda: bce_sum_mean(model(x), x))
    assert len(opt.inner.state) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("inner, lr", [("tf_rmsprop", 1e-2), ("adamw", 1e-3)])
def test_fused_and_reference_state_dicts_are_interchangeable(inner, lr):
    """A state saved by the fast solver continues on the reference loop (Adam's step counters too)."""
    model, opt, _ = _run("fused", steps=2, inner=inner, lr=lr)
    ref_model = copy.deepcopy(model)
    ref_opt = locoprop.LocoProp(ref_model, variant="M", lr=lr, local_steps=5, inner=inner, output_transfer="sigmoid",
                                backend="reference")
    ref_opt.load_state_dict(opt.state_dict())
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.rand(32, 20, generator=gen)
        opt.step(lambda: bce_sum_mean(model(x), x))
        ref_opt.step(lambda: bce_sum_mean(ref_model(x), x))
    assert ref_opt.last_solver == "reference" and opt.last_solver == "fused"
    assert _max_rel(list(ref_model.parameters()), list(model.parameters())) < 1e-5


def test_precisions_on_the_cpu():
    """bf16 operands change the result a little, not much; TF32 is a CUDA mode and leaves the CPU exact."""
    m32, _, l32 = _run("fused")
    m16, _, l16 = _run("fused", precision="bf16")
    mtf, _, _ = _run("fused", precision="tf32")
    d16 = _max_rel(list(m32.parameters()), list(m16.parameters()))
    assert 0 < d16 < 1e-2
    assert abs(l16[-1] - l32[-1]) / l32[-1] < 1e-2
    assert all(torch.equal(a, b) for a, b in zip(m32.parameters(), mtf.parameters()))


def test_bf16_update_form_rounds_only_the_change_of_the_pre_activation():
    """``a₀ + x (W - W₀)ᵀ + (b - b₀)`` with the change's product in bf16: its error is a small fraction of the
    change, where a plain bf16 product's error (relative to the activation) is larger than the change."""
    g = torch.Generator().manual_seed(0)
    x, W0, b0 = torch.rand(64, 50, generator=g), torch.randn(30, 50, generator=g), torch.randn(30, generator=g)
    W, b = W0 + 1e-3 * torch.randn(30, 50, generator=g), b0 + 1e-3 * torch.randn(30, generator=g)
    exact = (x.double() @ W.double().T + b.double())
    change = (x.double() @ (W - W0).double().T + (b - b0).double()).norm()
    solver = FusedIterativeSolver(precision="bf16")
    a0 = torch.addmm(b0, x, W0.T)
    pre, _ = solver._products(x, (a0, [W0, b0]))
    plain, _ = solver._products(x)
    for products, bound in ((pre, "update"), (plain, "plain")):
        out = torch.empty(64, 30)
        products(W, b, out)
        err = (out.double() - exact).norm() / change
        assert (err < 1e-2) if bound == "update" else (err > 1.0), (bound, err.item())


def test_bf16_steps_with_a_small_gamma_stay_near_float32():
    """With a small γ the residual ``f(a) - y`` is small beside ``a``: one bf16 step lands an order of magnitude
    closer to the float32 step in the update form than with plain bf16 products (benchmarks/precision_error.py
    measures the same on MNIST)."""
    def step(precision, plain=False, monkeypatch=None):
        torch.manual_seed(0)
        model = small_autoencoder()
        opt = locoprop.LocoProp(model, lr=1e-3, activation_lr=0.1, local_steps=5, output_transfer="sigmoid",
                                backend="fused", precision=precision)
        if plain:  # the solver without the step's starting pre-activations: plain bf16 products
            opt.fused_solver.rounds_products = lambda cuda: False
        x = torch.rand(64, 20, generator=torch.Generator().manual_seed(1))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt.step(lambda: bce_sum_mean(model(x), x))
        return torch.cat([p.detach().flatten() for p in model.parameters()]) - before

    ref, update, plain = step("fp32"), step("bf16"), step("bf16", plain=True)
    err_update, err_plain = ((update - ref).norm() / ref.norm()).item(), ((plain - ref).norm() / ref.norm()).item()
    assert 0 < err_update < err_plain / 10, (err_update, err_plain)


def test_a_bf16_product_plus_a_float32_term_rounds_as_one_mixed_dtype_addition():
    """On the CPU the bf16 product's result (bf16) is copied to float32, then the float32 term added: the same
    numbers to the bit as ``torch.add(term, product)``, plain and in the update form, also where the output
    buffer is the term itself."""
    g = torch.Generator().manual_seed(0)
    x, W0, b0 = torch.rand(64, 50, generator=g), torch.randn(30, 50, generator=g), torch.randn(30, generator=g)
    W, b = W0 + 1e-3 * torch.randn(30, 50, generator=g), b0 + 1e-3 * torch.randn(30, generator=g)
    solver = FusedIterativeSolver(precision="bf16")
    xr = x.to(torch.bfloat16)
    plain, _ = solver._products(x)
    assert torch.equal(plain(W, b, torch.empty(64, 30)), torch.add(b, xr @ W.to(torch.bfloat16).T))
    a0 = torch.addmm(b0, x, W0.T)
    update, _ = solver._products(x, (a0, [W0, b0]))
    expected = torch.add(a0, xr @ (W - W0).to(torch.bfloat16).T).add_(b - b0)
    assert torch.equal(update(W, b, torch.empty(64, 30)), expected)
    update_into_a0, _ = solver._products(x, (a0, [W0, b0]))
    assert torch.equal(update_into_a0(W, b, a0), expected)


def test_bf16_iterations_on_the_cpu_evaluate_tanh_the_quick_way_and_land_as_near_float32():
    """The fast solver's bf16 iterations on the CPU evaluate ``f(â)`` by ``TransferFunction.quick`` (tanh as
    ``2σ(2a) - 1``) unless told not to, compiled or not (the compiler's own ``tanh`` is slower:
    ``results/cpu-residual-kernels/``); FP32 keeps ``torch.tanh``.  One step lands as near the float32 step
    either way: its error is the products'."""
    from locoprop.transfer import TanhViaSigmoid

    cpu = torch.device("cpu")
    assert FusedIterativeSolver(precision="bf16").uses_quick_transfers(cpu)
    assert not FusedIterativeSolver(precision="bf16").uses_quick_transfers(torch.device("cuda"))
    assert FusedIterativeSolver(precision="bf16", compile_elementwise=True).uses_quick_transfers(cpu)
    assert not FusedIterativeSolver().uses_quick_transfers(cpu)
    calls = []
    quick_f_ = TanhViaSigmoid.f_

    def counted(self, a):
        calls.append(a.shape)
        return quick_f_(self, a)

    def step(precision, quick=None):
        torch.manual_seed(0)
        model = small_autoencoder()
        opt = locoprop.LocoProp(model, lr=1e-3, activation_lr=0.1, local_steps=5, output_transfer="sigmoid",
                                backend="fused", precision=precision)
        opt.fused_solver.quick_transfers = quick
        x = torch.rand(64, 20, generator=torch.Generator().manual_seed(1))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TanhViaSigmoid, "f_", counted)
            opt.step(lambda: bce_sum_mean(model(x), x))
        return torch.cat([p.detach().flatten() for p in model.parameters()]) - before, len(calls)

    (ref, n_fp32), (quick, n_quick), (exact, n_exact) = step("fp32"), step("bf16"), step("bf16", quick=False)
    assert n_fp32 == n_exact == 0 and n_quick == 2 * 4  # two tanh layers, iterations 1 to 4 (0 reads δ₀)
    err_quick, err_exact = ((quick - ref).norm() / ref.norm()).item(), ((exact - ref).norm() / ref.norm()).item()
    assert not torch.equal(quick, exact)
    assert 0 < err_quick < 1.5 * err_exact, (err_quick, err_exact)


def test_backend_auto_uses_the_reference_loop_on_the_cpu():
    _, opt, _ = _run("auto", steps=1)
    assert opt.last_solver == "reference"
    _, opt, _ = _run("auto", steps=1, precision="bf16")  # only the fast solver has precisions
    assert opt.last_solver == "fused"


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="fused", inner="adam", inner_kwargs={"amsgrad": True}), "inner optimizer Adam with amsgrad"),
    (dict(backend="fused", inner="sgd", inner_kwargs={"momentum": 0.9, "dampening": 0.5}), "SGD with dampening"),
    (dict(backend="fused", inner=torch.optim.Adamax), "inner optimizer Adamax"),
    (dict(precision="bf16", regularizer="l1"), "regularizer L1Proximity"),
    (dict(backend="fused", variant="S-closed"), "solver 'closed_form'"),
    (dict(backend="gpu"), "backend: expected one of"),
    (dict(precision="fp16"), "precision: expected one of"),
])
def test_unsupported_fast_paths_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        locoprop.LocoProp(small_autoencoder(), output_transfer="sigmoid", **kwargs)


def test_auto_falls_back_for_components_the_fast_solver_lacks():
    assert FusedIterativeSolver.unsupported(locoprop.L1Proximity(1.0), None) == "no inner optimizer"
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, output_transfer="sigmoid", inner="adam")  # auto: no error
    x = torch.rand(8, 20)
    opt.step(lambda: bce_sum_mean(model(x), x))
    assert opt.last_solver == "reference"


def test_first_fused_step_divergence_removes_the_state_it_created():
    torch.manual_seed(0)
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, output_transfer="sigmoid", backend="fused", activation_lr=1e300)
    x = torch.rand(16, 20)
    with pytest.raises(locoprop.DivergenceError):
        opt.step(lambda: bce_sum_mean(model(x), x))
    assert len(opt.inner.state) == 0


def test_graphed_step_needs_cuda():
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, output_transfer="sigmoid")
    x = torch.rand(8, 20)
    with pytest.raises(ValueError, match="graphed_step: needs the model on a CUDA device"):
        opt.graphed_step(lambda: bce_sum_mean(model(x), x))


def test_fused_is_bitwise_the_reference_with_tf_rmsprop_on_the_cpu():
    """Same products (addmm as nn.Linear), same update arithmetic: not merely close, identical."""
    m_ref, _, l_ref = _run("reference", inner_kwargs={"momentum": 0.9, "alpha": 0.9, "eps": 1e-8})
    m_fast, _, l_fast = _run("fused", inner_kwargs={"momentum": 0.9, "alpha": 0.9, "eps": 1e-8})
    assert l_ref == l_fast
    assert all(torch.equal(p, q) for p, q in zip(m_ref.parameters(), m_fast.parameters()))


def _states_equal(o_a, o_b, m_a, m_b):
    for p, q in zip(m_a.parameters(), m_b.parameters()):
        s_a, s_b = o_a.inner.state[p], o_b.inner.state[q]
        assert s_a.keys() == s_b.keys()
        assert all(torch.equal(s_a[k], s_b[k]) for k in s_a), [k for k in s_a if not torch.equal(s_a[k], s_b[k])]


@pytest.mark.parametrize("kwargs", [
    dict(variant="M", inner_kwargs={"momentum": 0.9, "alpha": 0.9, "eps": 1e-8}),
    dict(variant="S"),
    dict(variant="post-S"),
    dict(variant="M", regularizer="l2-paper"),
    dict(variant="M", precision="bf16"),
    dict(variant="M", inner="momentum", lr=1e-3),
    dict(variant="M", inner="nesterov", lr=1e-3),
    dict(variant="M", inner="sgd", lr=1e-3),
    dict(variant="M", per_layer=True),
    dict(variant="M", inner="adamw", inner_kwargs={"weight_decay": 0.1}, lr=1e-3, per_layer=True),
    dict(variant="M", inner="rmsprop", inner_kwargs={"momentum": 0.9, "centered": True}, lr=1e-3),
    dict(variant="M", inner="adagrad", inner_kwargs={"lr_decay": 0.05}, lr=1e-3, per_layer=True),
])
def test_iteration_major_order_is_bitwise_the_layer_major_order(kwargs):
    """Iteration k of every layer, then one multi-tensor update of all layers (issue 5's first lead): the same
    elementwise arithmetic as each layer's own chain, so the same weights and inner state to the bit."""
    m_lay, o_lay, l_lay = _run("fused", **kwargs)
    m_it, o_it, l_it = _run("fused", solve_order="iteration-major", **kwargs)
    assert o_it.fused_solver.order == "iteration-major" and o_it.last_solver == "fused"
    assert l_lay == l_it
    assert all(torch.equal(p, q) for p, q in zip(m_lay.parameters(), m_it.parameters()))
    _states_equal(o_lay, o_it, m_lay, m_it)


def test_iteration_major_order_is_bitwise_the_reference_with_per_layer_settings():
    """Layers with their own η and their own T (the inner loop stops early for some): as the reference loop."""
    kw = dict(inner_kwargs={"momentum": 0.9, "alpha": 0.9, "eps": 1e-8}, per_layer=True)
    m_ref, o_ref, l_ref = _run("reference", **kw)
    m_it, o_it, l_it = _run("fused", solve_order="iteration-major", **kw)
    assert o_ref.last_solver == "reference"
    assert l_ref == l_it
    assert all(torch.equal(p, q) for p, q in zip(m_ref.parameters(), m_it.parameters()))
    _states_equal(o_ref, o_it, m_ref, m_it)
    assert int(o_it.inner.state[o_it.param_groups[3]["params"][0]]["step"]) == 5 * 7  # its own T = 7, 5 steps


@pytest.mark.parametrize("order", ["layer-major", "iteration-major"])
def test_solve_orders_issue_the_work_in_their_order(monkeypatch, order):
    """Layer-major: each layer's gradient and update alternate through its T iterations; iteration-major:
    every layer's gradient of iteration k, then one update of all layers."""
    torch.manual_seed(0)
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, lr=1e-2, local_steps=2, output_transfer="sigmoid", backend="fused",
                            solve_order=order, solve_in_backward=False)  # every layer in one solve
    solver, calls = opt.fused_solver, []
    gradient, update = solver._local_gradient, solver._update
    monkeypatch.setattr(solver, "_local_gradient", lambda c, k, *a, **kw: (calls.append(("g", c.index, k)),
                                                                            gradient(c, k, *a, **kw)))
    monkeypatch.setattr(solver, "_update", lambda chains, rule, table, k: (
        calls.append(("u", tuple(c.index for c in chains), k)), update(chains, rule, table, k)))
    x = torch.rand(8, 20)
    opt.step(lambda: bce_sum_mean(model(x), x))
    layers = range(4)
    if order == "layer-major":
        expected = [c for m in layers for k in range(2) for c in (("g", m, k), ("u", (m,), k))]
    else:
        expected = [c for k in range(2) for c in [("g", m, k) for m in layers] + [("u", tuple(layers), k)]]
    assert calls == expected


def test_solve_order_is_checked_by_name():
    with pytest.raises(ValueError, match="solve_order: expected one of"):
        locoprop.LocoProp(small_autoencoder(), output_transfer="sigmoid", solve_order="rows")
    with pytest.raises(ValueError, match="order: expected one of"):
        FusedIterativeSolver(order="rows")


def test_layer_streams_share_the_layers_out_by_cost():
    solver = FusedIterativeSolver(layer_streams=3)
    assert [solver.stream_count(n) for n in (1, 2, 3, 8)] == [0, 2, 3, 3]
    assert FusedIterativeSolver(layer_streams=True).stream_count(8) == 8
    assert FusedIterativeSolver(layer_streams=False).stream_count(8) == 0
    # longest-processing-time: the two large layers apart, the small ones filling the lighter stream
    where = FusedIterativeSolver.stream_assignment([8.0, 1.0, 8.0, 1.0, 2.0], 2)
    assert where[0] != where[2]
    loads = [sum(c for c, s in zip([8.0, 1.0, 8.0, 1.0, 2.0], where) if s == k) for k in range(2)]
    assert sorted(loads) == [10.0, 10.0]
    with pytest.raises(ValueError, match="layer_streams"):
        FusedIterativeSolver(layer_streams=-1)
    opt = locoprop.LocoProp(small_autoencoder(), output_transfer="sigmoid", layer_streams=2)
    assert opt.fused_solver.layer_streams == 2


def _gradient_buffers(solver):
    """The solver's gradient buffers: ``(shared ones by stream, per-parameter ones)``."""
    shared = {k[1]: b for k, b in solver._buffers.items() if k[0] == "grad-shared"}
    return shared, [b for k, b in solver._buffers.items() if k[0] == "grad"]


def _padded(params, alignment=64):
    return sum(-(-p.numel() // alignment) * alignment for p in params)


def test_layers_solved_one_after_another_share_one_gradient_buffer():
    """Without layer streams (the CPU) each layer's chain has finished before the next one starts, so every
    layer's local gradient is written into one buffer the size of the largest layer's (each parameter's view
    aligned to 64 elements), and the steps are still the reference loop's, to the bit
    (``test_fused_is_bitwise_the_reference_with_tf_rmsprop_on_the_cpu``).  The iteration-major order holds
    every layer's gradients of an iteration at once: one buffer per parameter, none aliasing another."""
    kw = dict(inner_kwargs={"momentum": 0.9, "alpha": 0.9, "eps": 1e-8}, per_layer=True)
    m_ref, _, l_ref = _run("reference", **kw)
    model, opt, losses = _run("fused", **kw)
    assert losses == l_ref and all(torch.equal(p, q) for p, q in zip(m_ref.parameters(), model.parameters()))
    shared, own = _gradient_buffers(opt.fused_solver)
    assert own == [] and list(shared) == [0]
    assert shared[0].numel() == max(_padded(g["params"]) for g in opt.param_groups) < _padded(model.parameters())
    assert opt.fused_solver.buffers_version == 1  # made once, at the first step

    model, opt, _ = _run("fused", solve_order="iteration-major", **kw)
    shared, own = _gradient_buffers(opt.fused_solver)
    params = list(model.parameters())
    assert shared == {} and len(own) == len(params)
    assert sorted(tuple(b.shape) for b in own) == sorted(tuple(p.shape) for p in params)  # made in solving order
    spans = sorted((b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in own)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_a_shared_gradient_buffer_follows_the_layers_of_each_stream():
    """Layers on one stream share its buffer; a layer alone on its stream keeps a buffer per parameter (as with
    one stream per layer, the CUDA default); a larger layer on a stream grows its buffer and counts a growth in
    ``buffers_version`` (a captured step replaying the old buffer captures again); a smaller one reuses it."""
    torch.manual_seed(0)
    model = small_autoencoder()
    x = torch.rand(32, 20)
    opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=5.0, local_steps=3, output_transfer="sigmoid",
                            backend="fused", retain_problems=True)
    opt.step(lambda: bce_sum_mean(model(x), x))
    solver, problems = opt.fused_solver, opt.last_problems
    rule = locoprop.fused.update_rule_for(opt.inner)[0]
    layers = solver._layers(problems, rule, [0, 1, 1, 2])
    shared, own = _gradient_buffers(solver)
    assert set(shared) == {0, 1}  # 0: the step's own, every layer on the current stream (the CPU)
    assert shared[1].numel() == max(_padded(problems[m].params) for m in (1, 2))
    for m in (1, 2):  # stream 1's two layers: views of one buffer, each weight's at its start
        assert all(g.untyped_storage().data_ptr() == shared[1].untyped_storage().data_ptr()
                   for g in layers[m].grads)
        assert layers[m].grads[0].data_ptr() == shared[1].data_ptr()
        assert (layers[m].grads[1].data_ptr() - shared[1].data_ptr()) % 256 == 0  # 64 float32 elements
        assert layers[m].grads[1].is_contiguous()
    for m in (0, 3):  # alone on their streams (as with one stream per layer, the CUDA default): their own
        assert [g.shape for g in layers[m].grads] == [p.shape for p in problems[m].params]
        assert all(g.untyped_storage().data_ptr() != shared[1].untyped_storage().data_ptr() for g in layers[m].grads)
    version = solver.buffers_version
    solver._layers(problems, rule, [0, 1, 1, 1])  # the larger last layer joins stream 1: its buffer grows
    assert solver.buffers_version == version + 1
    assert _gradient_buffers(solver)[0][1].numel() == max(_padded(problems[m].params) for m in (1, 2, 3))
    again = solver._layers(problems[1:3], rule, [1, 1])  # smaller layers: the buffer as it is
    assert solver.buffers_version == version + 1
    assert all(g.untyped_storage().data_ptr() == _gradient_buffers(solver)[0][1].untyped_storage().data_ptr()
               for lay in again for g in lay.grads)
    assert solver._layers(problems[1:3], rule, [1, 1])[0].grads is again[0].grads  # the same views, kept
    assert all(held[0] is _gradient_buffers(solver)[0][s] for (s, _), held in solver._shared_views.items())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
@pytest.mark.parametrize("order", ["layer-major", "iteration-major"])
def test_compiled_elementwise_agrees_with_the_eager_fast_solver(order):
    """compile_elementwise (torch.compile of δ + Σδ and of the TF-RMSProp update) equals the eager update up to
    rounding over a few steps (fused multiply-adds change the last bits)."""
    models, opts = _eager_and_compiled(order)
    from locoprop import fused, update_rules

    assert {update_rules._tf_rmsprop_tensors_, fused._residual_and_bias_grad_} <= set(fused._COMPILED)  # compiled
    s0, s1 = opts[0].inner.state, opts[1].inner.state
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(s1[q]["momentum_buffer"], s0[p]["momentum_buffer"], rtol=1e-5, atol=1e-7)


def _eager_and_compiled(order="layer-major", **kwargs):
    """Three steps of the eager and the compiled fast solver from the same start; their weights agree up to
    rounding, and the steps moved them."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 12))
    x = torch.rand(32, 12)
    models, opts = [], []
    settings = dict(lr=1e-2, inner_kwargs={"momentum": 0.9, "alpha": 0.9, "eps": 1e-8})
    settings.update(kwargs)
    for compiled in (False, True):
        model = copy.deepcopy(base)
        opt = locoprop.LocoProp(model, activation_lr=10.0, local_steps=4, output_transfer="sigmoid",
                                backend="fused", solve_order=order, **settings)
        opt.fused_solver.compile_elementwise = compiled
        models.append(model)
        opts.append(opt)
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.step(lambda: bce_sum_mean(model(x), x))
    for p, q, p0 in zip(models[0].parameters(), models[1].parameters(), base.parameters()):
        assert not torch.equal(p, p0)  # the steps moved the weights
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    return models, opts


@pytest.mark.parametrize("inner, inner_kwargs, kernel", [
    ("sgd", {"weight_decay": 0.1}, "_sgd_tensors_"),
    ("nesterov", {"weight_decay": 0.1}, "_sgd_tensors_"),
    ("adam", {"weight_decay": 0.1}, "_adam_tensors_"),
    ("adamw", {"weight_decay": 0.5}, "_adam_tensors_"),
    ("rmsprop", {"momentum": 0.9, "centered": True, "weight_decay": 0.1}, "_rmsprop_tensors_"),
    ("rmsprop", {}, "_rmsprop_tensors_"),
    ("adagrad", {"lr_decay": 0.05, "weight_decay": 0.1}, "_adagrad_tensors_"),
])
def test_compiled_updates_of_torch_inner_optimizers_agree_with_their_eager_updates(inner, inner_kwargs, kernel):
    """Each update rule's one-tensor kernel (compile_elementwise) is its multi-tensor update's recurrence."""
    models, opts = _eager_and_compiled(inner=inner, inner_kwargs=inner_kwargs, lr=1e-3)
    from locoprop import fused

    assert kernel in {fn.__name__ for fn in fused._COMPILED}
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        s0, s1 = opts[0].inner.state[p], opts[1].inner.state[q]
        assert s0.keys() == s1.keys()
        for key in s0:  # relative to each tensor's norm (centered RMSprop's √(v - ḡ²) amplifies rounding)
            assert _max_rel([s0[key]], [s1[key]]) < 1e-4, key


def _bf16_eager_and_compiled(inner="tf_rmsprop", inner_kwargs=None, precision="bf16", dtype=torch.float32,
                             **kwargs):
    """Three steps of the fast solver with bf16 local products on the CPU, eagerly and with compile_elementwise,
    from the same start; the compiled chain (:meth:`FusedIterativeSolver._bf16_chain_compiled`) counted."""
    from locoprop import fused

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 12)).to(dtype)
    x = torch.rand(48, 12, dtype=dtype)
    models, opts, chains = [], [], []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=10.0, local_steps=4, output_transfer="sigmoid",
                                backend="fused", precision=precision, compile_elementwise=compiled, inner=inner,
                                inner_kwargs=inner_kwargs or {}, **kwargs)
        calls = []
        compiled_chain = opt.fused_solver._bf16_chain_compiled

        def counted(*args, calls=calls, chain=compiled_chain):
            calls.append(1)
            return chain(*args)
        opt.fused_solver._bf16_chain_compiled = counted
        for _ in range(3):
            opt.step(lambda: bce_sum_mean(model(x), x))
        models.append(model)
        opts.append(opt)
        chains.append(len(calls))
    assert not fused.bf16_product_has_float32_output(torch.device("cpu"))
    return base, models, opts, chains


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
@pytest.mark.parametrize("inner, inner_kwargs, dtype", [
    ("tf_rmsprop", {"momentum": 0.9, "alpha": 0.9, "eps": 1e-8}, torch.float32),
    ("adam", {"weight_decay": 0.1}, torch.float32),
    ("tf_rmsprop", {"momentum": 0.9, "alpha": 0.9, "eps": 1e-8}, torch.float64)])
def test_compiled_bf16_chain_on_the_cpu_agrees_with_the_eager_bf16_chain(inner, inner_kwargs, dtype):
    """With bf16 products on the CPU, compile_elementwise runs each layer's chain as two compiled programs an
    iteration that read the products' bf16 results as they are (``δ`` with ``Σδ``; the update, which also
    returns the next product's bf16 weight change): the same products, rounded the same way, as the eager
    chain, whose weights and inner state it matches up to the rounding of the elementwise work (and the rare
    bf16 rounding of ``δ`` that this flips), three steps on, also for a float64 model (its gradients and bias
    changes kept in float64).  Every layer of every step ran it; the eager solver never did."""
    from locoprop import fused

    base, models, opts, chains = _bf16_eager_and_compiled(inner, inner_kwargs, dtype=dtype)
    assert chains == [0, 3 * 3]
    assert {"_bf16_residual_", f"_{'tf_rmsprop' if inner == 'tf_rmsprop' else inner}_tensors_with_change_"} <= {
        fn.__name__ for fn in fused._COMPILED}
    for p, q, p0 in zip(models[0].parameters(), models[1].parameters(), base.parameters()):
        moved = (p - p0).norm()
        assert moved > 0
        assert (q - p).norm() < 1e-3 * moved, ((q - p).norm(), moved)
        s0, s1 = opts[0].inner.state[p], opts[1].inner.state[q]
        for key in s0:
            if key != "step":
                assert _max_rel([s0[key]], [s1[key]]) < 1e-2, key
            else:
                assert torch.equal(torch.as_tensor(s0[key]), torch.as_tensor(s1[key]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_update_with_change_reads_each_gradient_in_its_parameters_dtype(dtype):
    """``update_layer_compiled_with_change`` (the compiled bf16 chain's update): a bf16 weight gradient and a bias
    gradient of the parameters' dtype give the eager TF-RMSProp update of the same gradients in that dtype (a
    float64 bias gradient is not rounded to float32 on the way), and the changes ``p - start`` come back in
    the dtypes asked, equal to the parameters' change after the update."""
    from locoprop.inner import TFRMSprop
    from locoprop.update_rules import TFRMSpropRule

    torch.manual_seed(0)
    params = [torch.randn(5, 7, dtype=dtype), torch.randn(5, dtype=dtype)]
    grads = [torch.randn(5, 7).to(torch.bfloat16), torch.randn(5, dtype=dtype)]
    starts = [p.clone() for p in params]
    results = []
    for compiled in (False, True):
        ps = [p.clone() for p in params]
        rule = TFRMSpropRule(TFRMSprop(ps, lr=0.1, momentum=0.9, alpha=0.9, eps=1e-8))
        states = [rule.state(p) for p in ps]
        for st in states:
            st[0].fill_(0.5)
        lr = torch.tensor(0.01, dtype=dtype)
        if compiled:
            changes = rule.update_layer_compiled_with_change(ps, grads, states, (lr,), starts,
                                                             [torch.bfloat16, dtype])
            assert [c.dtype for c in changes] == [torch.bfloat16, dtype]
            assert torch.equal(changes[0], (ps[0] - starts[0]).to(torch.bfloat16))
            assert torch.equal(changes[1], ps[1] - starts[1])
        else:
            rule.update_layers([(ps, [g.to(dtype, copy=True) for g in grads], states, (lr,))])  # (scales them)
        results.append(ps)
    for eager, compiled in zip(*results):
        assert not torch.equal(eager, params[0]) if eager.dim() == 2 else not torch.equal(eager, params[1])
        torch.testing.assert_close(compiled, eager, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_bf16_chain_is_left_to_the_eager_chain_where_it_does_not_apply():
    """A proximity term (LocoProp's L2 regularizer), float32 products or non-contiguous inner state: the chain
    runs eagerly (:meth:`FusedIterativeSolver.compiles_bf16_epilogues`), each layer once per step."""
    from locoprop.regularizers import L2Proximity

    *_, chains = _bf16_eager_and_compiled(regularizer=L2Proximity(0.5))
    assert chains == [0, 0]
    *_, chains = _bf16_eager_and_compiled(precision="fp32")
    assert chains == [0, 0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 12))
    x = torch.rand(16, 12)
    opt = locoprop.LocoProp(model, lr=1e-2, local_steps=2, output_transfer="sigmoid", backend="fused",
                            precision="bf16", compile_elementwise=True)
    opt.step(lambda: bce_sum_mean(model(x), x))
    state = opt.inner.state[model[0].weight]
    state["mean_square"] = state["mean_square"].t().contiguous().t()  # the same values, not contiguous
    seen = []
    decide = opt.fused_solver.compiles_bf16_epilogues
    opt.fused_solver.compiles_bf16_epilogues = lambda c, rule: seen.append(decide(c, rule)) or seen[-1]
    before = model[0].weight.detach().clone()
    opt.step(lambda: bce_sum_mean(model(x), x))
    assert seen == [False, True] or seen == [True, False]  # the first layer eagerly, the second compiled
    assert not torch.equal(model[0].weight, before)


class _FakeGraph:
    """Stands in for a CUDA graph on the CPU: replaying runs the captured solve on the tensors that lie where
    the capture read them (for a zero-copy graph: this step's own inputs, which must be at those addresses)."""

    def __init__(self, solver, layers, inputs, loss, rule, table, zero_copy):
        self.solver, self.layers, self.loss, self.rule, self.zero_copy = solver, layers, loss, rule, zero_copy
        self.where = self.addresses(inputs, table)
        self.static = None if zero_copy else (inputs, table)  # the static copies stay alive with the graph

    @staticmethod
    def addresses(inputs, table):
        return [table.data_ptr()] + [t.data_ptr() for x, d, y, a, _, start, post in inputs
                                     for t in [x, d, y] + list(a or []) + ([start[0], *start[1]] if start else [])
                                     + ([post] if post is not None else [])]

    def replay(self):
        inputs, table = self.static or (self.solver.step_inputs, self.solver.step_table)
        assert self.addresses(inputs, table) == self.where, "a graph replayed where its inputs are not"
        self.solver._run(self.layers, inputs, self.loss, self.rule, table, None)


class _FakeStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, other):
        pass


def _fake_cuda_graphs(monkeypatch, solver):
    """Route the fast solver's CUDA-graph logic through _FakeGraph on the CPU."""
    import contextlib

    from locoprop import fused

    monkeypatch.setattr(solver, "_graphs_for", lambda device: True)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(fused, "_GRAPH_STREAMS", {})  # the side stream made here is a stand-in too
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    original = solver._solve_graphed

    def spy(problems, layers, inputs, loss, rule, table, stream_of):
        solver.step_inputs, solver.step_table = inputs, table
        try:
            return original(problems, layers, inputs, loss, rule, table, stream_of)
        finally:  # hold nothing of this step (the caching allocator may hand its memory to the next one)
            solver.step_inputs = solver.step_table = None

    def capture(layers, inputs, loss, rule, table, stream_of):
        graph = _FakeGraph(solver, layers, inputs, loss, rule, table, zero_copy=inputs is solver.step_inputs)
        graph.replay()  # as the real capture: recorded, then replayed once for this step
        return graph

    monkeypatch.setattr(solver, "_solve_graphed", spy)
    monkeypatch.setattr(solver, "_capture", capture)


def _eager_and_graphed(monkeypatch, max_graphs, first_backend="fused", **kwargs):
    """``(models, optimizers)``: two copies of one small model with LocoProp, the first solved eagerly by
    ``first_backend``, the second by the fast solver through the stand-in CUDA graphs."""
    torch.manual_seed(0)
    base = small_autoencoder()
    models, opts = [], []
    # every layer in one solve, as on CUDA (the CPU's default solves each during the backward pass)
    settings = dict(inner_kwargs={"momentum": 0.9, "alpha": 0.9, "eps": 1e-8}, solve_in_backward=False)
    settings.update(kwargs)
    for backend in (first_backend, "graphed"):
        model = copy.deepcopy(base)
        opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=5.0, local_steps=3, output_transfer="sigmoid",
                                backend="fused" if backend == "graphed" else backend, **settings)
        if backend == "graphed":
            opt.fused_solver.max_zero_copy_graphs = max_graphs
            _fake_cuda_graphs(monkeypatch, opt.fused_solver)
        models.append(model)
        opts.append(opt)
    return models, opts


@pytest.mark.parametrize("max_graphs, inner", [(4, "tf_rmsprop"), (0, "tf_rmsprop"), (0, "adam"), (4, "bf16"),
                                               (0, "bf16")])
def test_solve_graphs_replay_only_where_the_inputs_lie_and_equal_the_eager_solver(monkeypatch, max_graphs, inner):
    """The selection logic of the captured solve (zero-copy graphs keyed by the inputs' addresses, the copying
    graph as the fallback), run on the CPU with a stand-in graph: bit for bit the eager fast solver; with
    Adam, whose bias corrections change every step, through the per-iteration table; with bf16 products, whose
    update form reads the step's starting pre-activations and weights too."""
    kwargs = {"tf_rmsprop": {}, "adam": dict(inner="adam", inner_kwargs={}), "bf16": dict(precision="bf16")}[inner]
    models, opts = _eager_and_graphed(monkeypatch, max_graphs, **kwargs)
    xs = [torch.rand(32, 20) for _ in range(7)]
    modes = []
    for i, x in enumerate(xs):
        if i == 4:
            for opt in opts:
                for g in opt.param_groups:
                    g["lr"] *= 0.5  # reaches the graphs through the persistent learning-rate table
        for model, opt in zip(models, opts):
            opt.step(lambda: bce_sum_mean(model(x), x))
        modes.append(opts[1].fused_solver.last_mode)
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(p, q), (i, modes)
    assert modes[0] == "eager" and "graph-capture" not in modes[:1]
    if max_graphs == 0:
        assert modes[1:3] == ["graph-capture-copy", "graph-replay-copy"] and set(modes[3:]) == {"graph-replay-copy"}
    else:  # the CPU allocator rarely hands a step's tensors the same addresses: captures, then the copying graph
        assert modes[1] == "graph-capture" and 1 <= modes.count("graph-capture") <= max_graphs
        assert set(modes[2:]) <= {"graph-capture", "graph-replay", "graph-capture-copy", "graph-replay-copy"}


def test_zero_copy_graphs_are_replayed_where_the_inputs_recur(monkeypatch):
    """Inputs refilled in place (recurring addresses) replay the zero-copy graph; inputs elsewhere get a graph of
    their own; each call equals the eager solve of the same inputs from the same weights and state."""
    torch.manual_seed(0)
    model = small_autoencoder()
    x0 = torch.rand(32, 20)
    opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=5.0, local_steps=3, output_transfer="sigmoid",
                            backend="fused", retain_problems=True)
    opt.step(lambda: bce_sum_mean(model(x0), x0))  # creates the inner state; keeps the problems
    solver, problems, loss = opt.fused_solver, opt.last_problems, opt.variant.local_loss
    rule = locoprop.fused.update_rule_for(opt.inner)[0]
    layers = solver._layers(problems, rule, None)
    table = solver.table_for(opt.param_groups, opt.variant.regularizer, False).float()
    shapes = [(pr.batch.inputs.shape, pr.batch.pre.shape, pr.batch.transfer) for pr in problems]
    persistent = [(torch.empty(a), torch.empty(b), torch.empty(b), None, t, None, None) for a, b, t in shapes]
    elsewhere = [(torch.empty(a), torch.empty(b), torch.empty(b), None, t, None, None) for a, b, t in shapes]
    _fake_cuda_graphs(monkeypatch, solver)
    state = [s for lay in layers for st in lay.states for s in st] + [p for lay in layers for p in lay.params]
    modes = []
    for i, where in enumerate([persistent] * 4 + [elsewhere, persistent, elsewhere]):
        data = [(torch.rand(a), torch.randn(b) * 0.1, torch.rand(b)) for a, b, _ in shapes]
        for (x, d, y, _, _, _, _), (dx, dd, dy) in zip(where, data):
            x.copy_(dx), d.copy_(dd), y.copy_(dy)
        before = [t.clone() for t in state]
        with torch.no_grad():
            solver._solve_graphed(problems, layers, where, loss, rule, table, None)
        modes.append(solver.last_mode)
        graphed = [t.clone() for t in state]
        with torch.no_grad():  # the same solve, eagerly, from the same weights and state
            for t, b in zip(state, before):
                t.copy_(b)
            fresh = [(dx.clone(), dd.clone(), dy.clone(), None, tr, None, None)
                     for (dx, dd, dy), (_, _, tr) in zip(data, shapes)]
            solver._run(layers, fresh, loss, rule, table, None)
        assert all(torch.equal(a, b) for a, b in zip(state, graphed)), (i, modes)
    assert modes == ["eager", "graph-capture", "graph-replay", "graph-replay", "graph-capture", "graph-replay",
                     "graph-replay"], modes


def test_layers_sharing_learning_rates_are_grouped_from_the_table():
    table = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.5, 2.0], [3.0, 1.5, 0.0], [1.0, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert FusedIterativeSolver.rate_groups(table) == ((0, 1, 3), (2,), (4,))  # the last column is c, not η_k


def test_captured_step_reads_the_table_rows_of_the_layers_that_ran():
    """graphed_step prepares one table row per parameter group; where a layer did not run in the captured
    forward pass, the solve reads the other layers' rows (a copy made inside the graph, from the table each
    replay refills) with their own shared rates.  Device session 18 saw the capture fail there (the table had a
    row too many)."""
    from types import SimpleNamespace

    groups = [{"name": "trunk"}, {"name": "idle head"}, {"name": "head"}]
    table = torch.tensor([[1.0, 0.5, 0.0], [2.0, 1.0, 0.0], [1.0, 0.5, 0.0]], dtype=torch.float64)
    solver = FusedIterativeSolver(order="iteration-major")
    solver.prepare_capture(table, groups, torch.float32, torch.device("cpu"))
    assert solver.shared_rates == ((0, 2), (1,))
    ran = [SimpleNamespace(group=groups[0]), SimpleNamespace(group=groups[2])]
    rows = solver._captured_table(ran)
    assert torch.equal(rows, table[[0, 2]].float()) and solver.shared_rates == ((0, 1),)
    solver.static_table.mul_(2)  # a replay refills the table: a copy made inside the graph reads it again
    assert torch.equal(solver._captured_table(ran), 2 * table[[0, 2]].float())
    every = [SimpleNamespace(group=g) for g in groups]
    assert solver._captured_table(every) is solver.static_table  # all layers ran: the table itself
    with pytest.raises(RuntimeError, match="learning-rate table must be prepared"):
        solver._captured_table([SimpleNamespace(group={"name": "not prepared"})])


def test_captures_collect_garbage_first_and_pause_the_collector(monkeypatch):
    """A dead reference cycle holding a CUDA graph is collected before a capture, never during it (destroying a
    graph while a stream captures invalidates the capture: device session 18), and the collector is on again
    after the capture, also one that raised."""
    import gc

    from locoprop import fused

    seen = []

    class Graph:  # stands in for a CUDA graph in a dead cycle
        def __del__(self):
            seen.append(("destroyed", gc.isenabled()))

    @contextlib.contextmanager
    def fake_capture(graph, **kwargs):
        seen.append(("capture", gc.isenabled(), kwargs))
        yield

    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    cycle = [Graph()]
    cycle.append(cycle)
    del cycle
    assert gc.isenabled()
    with fused.capturing_graph(object(), stream="side"):
        seen.append(("inside", gc.isenabled()))
    assert seen == [("destroyed", True), ("capture", False, {"stream": "side"}), ("inside", False)]
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="capture failed"):
        with fused.capturing_graph(object()):
            raise RuntimeError("capture failed")
    assert gc.isenabled()


def test_iteration_major_graphs_follow_a_layer_whose_learning_rate_changes(monkeypatch):
    """Captured iteration-major solves scale the gradients of layers with the same η_k by one multiply: when
    one layer's learning rate moves away from the others' (and back) the solve is captured anew, and the
    weights stay those of the reference loop to the bit."""
    models, opts = _eager_and_graphed(monkeypatch, 0, "reference", solve_order="iteration-major")
    modes, groups = [], []
    for i in range(9):
        x = torch.rand(32, 20)
        for opt in opts:
            if i in (3, 6):
                opt.param_groups[2]["lr"] *= 2.0 if i == 3 else 0.5
        for model, opt in zip(models, opts):
            opt.step(lambda: bce_sum_mean(model(x), x))
        modes.append(opts[1].fused_solver.last_mode)
        groups.append(opts[1].fused_solver.shared_rates)
        assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters())), (i, modes)
    assert groups[:3] == [((0, 1, 2, 3),)] * 3 and groups[3:6] == [((0, 1, 3), (2,))] * 3, groups
    assert groups[6:] == [((0, 1, 2, 3),)] * 3, groups
    assert modes == ["eager", "graph-capture-copy", "graph-replay-copy"] * 3, modes


def test_layer_major_graphs_are_kept_when_one_layers_learning_rate_changes(monkeypatch):
    """The layer-major order updates one layer at a time, so the groups of shared learning rates are no part of
    its graphs: a layer's rate moving away from the others' is replayed, not captured anew."""
    models, opts = _eager_and_graphed(monkeypatch, 0, "reference")
    modes = []
    for i in range(6):
        x = torch.rand(32, 20)
        if i == 3:
            for opt in opts:
                opt.param_groups[2]["lr"] *= 2.0
        for model, opt in zip(models, opts):
            opt.step(lambda: bce_sum_mean(model(x), x))
        modes.append(opts[1].fused_solver.last_mode)
        assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters())), (i, modes)
    assert opts[1].fused_solver.shared_rates is None
    assert modes == ["eager", "graph-capture-copy"] + ["graph-replay-copy"] * 4, modes


def test_a_new_solve_order_is_captured_anew_and_stays_bitwise_the_other(monkeypatch):
    """The captured solves are specific to the order of work: switching it between steps warms up and captures
    again (never replays the other order's graph), and the weights stay those of the layer-major order."""
    models, opts = _eager_and_graphed(monkeypatch, 0)  # the copying graph: replayed whatever the addresses
    modes = []
    for i in range(6):
        x = torch.rand(32, 20)
        if i == 3:
            opts[1].fused_solver.order = "iteration-major"
        for model, opt in zip(models, opts):
            opt.step(lambda: bce_sum_mean(model(x), x))
        modes.append(opts[1].fused_solver.last_mode)
        assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters())), (i, modes)
    assert modes == ["eager", "graph-capture-copy", "graph-replay-copy"] * 2, modes


@pytest.mark.parametrize("precision, update_kernel", [("fp32", "_tf_rmsprop_tensors_"),
                                                     ("bf16", "_tf_rmsprop_tensors_with_change_")])
def test_a_failed_compilation_names_the_option_and_leaves_the_model_untouched(monkeypatch, precision, update_kernel):
    """An exception inside the solve (here torch.compile failing after some layers were already updated)
    restores the weights and inner state from check_finite's copy, and a compile failure names
    compile_elementwise; also in the CPU's compiled bf16 chain."""
    import torch._dynamo.exc

    from locoprop import fused

    class CompileError(torch._dynamo.exc.TorchDynamoException):
        pass

    calls, fail_after = [], [None]

    def fake_compile(fn, **kwargs):
        def kernel(*args):
            calls.append(fn.__name__)
            if fail_after[0] is not None and len(calls) > fail_after[0]:  # then "the compiler" fails
                raise CompileError("no C++ compiler")
            return fn(*args)
        return kernel

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(fused, "_COMPILED", {})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 12))
    x = torch.rand(32, 12)
    opt = locoprop.LocoProp(model, lr=1e-2, activation_lr=10.0, local_steps=4, output_transfer="sigmoid",
                            backend="fused", compile_elementwise=True, precision=precision)
    opt.step(lambda: bce_sum_mean(model(x), x))  # a step that works, so the inner state exists
    calls.clear()
    fail_after[0] = 3  # three kernels of the next step run (and change weights), the fourth fails
    before = copy.deepcopy(model.state_dict())
    inner_before = copy.deepcopy(opt.inner.state_dict())
    with pytest.raises(RuntimeError, match="compile_elementwise: torch.compile of .* failed .*no C\\+\\+ compiler"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    assert len(calls) == 4 and update_kernel in calls[:3]  # weights changed before the failure
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, s in opt.inner.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(inner_before["state"][p][k])), (p, k)


def _train_settings(settings, x):
    """One step of a small model for each ``(inner, inner_kwargs)`` of ``settings``, with compile_elementwise."""
    for inner, kwargs in settings:
        model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 12))
        opt = locoprop.LocoProp(model, lr=1e-3, local_steps=2, output_transfer="sigmoid", backend="fused",
                                inner=inner, inner_kwargs=kwargs, compile_elementwise=True)
        opt.step(lambda: bce_sum_mean(model(x), x))


class _UncomparableFloat(float):
    """A hyper-parameter that refuses to be compared or tested for truth: what a branch on it would need."""

    def _refuse(self, *args):
        raise AssertionError(f"a compiled update kernel branched on the float hyper-parameter {float(self)!r}")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = _refuse
    __hash__ = float.__hash__


def test_compiled_update_kernels_never_branch_on_a_float(monkeypatch):
    """The kernels of compile_elementwise take the rule's branches (bools decided on the host) after its
    hyper-parameters and never compare a float one: PyTorch 2.11's torch.compile answers such a branch (weight
    decay ``!= 0``) by specialising every float of the program, one compilation per β1, β2, ε (seen on an H200,
    results/gpu-h200-session12).  Each kernel runs here eagerly with floats that cannot be compared."""
    from locoprop import fused

    seen = []

    def uncompiled(fn):
        if not fn.__name__.endswith("_tensors_"):  # the residual kernels: no hyper-parameters
            return fn

        def call(params, grads, states, scalars, hyper):
            seen.append((fn.__name__, tuple(type(h).__name__ for h in hyper)))
            return fn(params, grads, states, scalars,
                      tuple(_UncomparableFloat(h) if type(h) is float else h for h in hyper))
        return call

    monkeypatch.setattr(fused, "compile_once", uncompiled)
    torch.manual_seed(0)
    _train_settings([("tf_rmsprop", {})]
                    + [(inner, kwargs) for inner in ("sgd", "nesterov", "rmsprop", "adagrad", "adam", "adamw")
                       for kwargs in ({}, {"weight_decay": 0.1})]
                    + [("rmsprop", {"momentum": 0.9}), ("rmsprop", {"momentum": 0.9, "centered": True})],
                    torch.rand(16, 12))
    assert {name for name, _ in seen} == {"_tf_rmsprop_tensors_", "_sgd_tensors_", "_rmsprop_tensors_",
                                          "_adagrad_tensors_", "_adam_tensors_"}
    assert all("bool" in types for name, types in seen if name != "_tf_rmsprop_tensors_"), seen


def test_compiled_updates_serve_many_settings_in_one_process():
    """A tuning worker trains trial after trial in one process: with compile_elementwise, new values of the
    inner optimizers' hyper-parameters are symbolic in the compiled updates (no compilation per value:
    torch.compile's limit is 8 per function), and rules of different optimizers compile apart."""
    from torch._dynamo.utils import counters

    from locoprop import fused

    torch._dynamo.reset()  # this process's earlier compilations out of the count
    counters.clear()
    torch.manual_seed(0)
    x = torch.rand(16, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no kernel may reach the recompile limit
        _train_settings([("tf_rmsprop", {"momentum": 0.5 + 0.04 * i, "alpha": 0.9 - 0.01 * i,
                                         "eps": 1e-8 * (i + 1)}) for i in range(10)], x)
        _train_settings([("adam", {"betas": (0.9 - 0.01 * i, 0.99 - 0.001 * i), "eps": 1e-8 * (i + 1)})
                         for i in range(10)], x)
        graphs = counters["stats"]["unique_graphs"]
        # δ of the tanh and of the linear layer, each update rule once, and at most one recompilation each
        assert graphs <= 6, dict(counters["stats"])
        _train_settings([(inner, kwargs) for inner in ("sgd", "nesterov", "rmsprop", "adagrad", "adamw")
                         for kwargs in ({}, {"weight_decay": 0.1})]
                        + [("rmsprop", {"momentum": 0.9, "centered": True})], x)
    assert {"_tf_rmsprop_tensors_", "_adam_tensors_", "_sgd_tensors_", "_rmsprop_tensors_",
            "_adagrad_tensors_"} <= {fn.__name__ for fn in fused._COMPILED}


def test_a_kernel_at_the_recompile_limit_runs_uncompiled_with_a_warning(monkeypatch):
    """Past torch.compile's recompile limit (here 1) the update runs eagerly, the same arithmetic."""
    from locoprop import fused

    torch._dynamo.reset()
    monkeypatch.setattr(fused, "_UNCOMPILED", set())
    x = torch.rand(16, 12)
    with torch._dynamo.config.patch(recompile_limit=1), \
            pytest.warns(RuntimeWarning, match="compile_elementwise: _(adam|residual).* recompile limit"):
        _train_settings([("adam", {"weight_decay": 0.1 * i, "amsgrad": False}) for i in range(2)]
                        + [("adamw", {})], x)  # decay 0 / non-zero / decoupled: three variants of the kernel
    assert fused._UNCOMPILED
    torch._dynamo.reset()


def test_one_graph_side_stream_per_device(monkeypatch):
    """``graph_side_stream``: every warm-up and capture of a device shares one stream (made once; cuBLAS keeps
    a workspace per stream), another device gets its own (stand-in streams on the CPU; the CUDA test
    ``test_warm_ups_and_captures_share_one_side_stream`` checks the real ones)."""
    from locoprop import fused

    made = []

    class Made(_FakeStream):
        def __init__(self, *a, **k):
            made.append(k.get("device"))

    monkeypatch.setattr(torch.cuda, "Stream", Made)
    monkeypatch.setattr(fused, "_GRAPH_STREAMS", {})
    first = fused.graph_side_stream(torch.device("cpu"))
    assert fused.graph_side_stream("cpu") is first and len(made) == 1
    assert fused.graph_side_stream("meta") is not first and len(made) == 2


def test_the_table_is_made_again_only_when_what_it_is_computed_from_changes():
    """A step reuses the last table while the groups' learning-rate settings, the L2 coefficient and the update
    rule's :meth:`~locoprop.update_rules.UpdateRule.table_key` are unchanged (no Python arithmetic, no device
    copy); any change makes it anew, equal to :meth:`FusedIterativeSolver.table_for`.  Adam's bias corrections
    change with its step counter, so its table is made at every step."""
    model, opt, _ = _run("fused", steps=1, local_steps=3)
    solver, groups, anchored = opt.fused_solver, opt.param_groups, opt._needs_anchor()
    rule = locoprop.fused.update_rule_for(opt.inner)[0]
    reg = opt.variant.regularizer

    def table():
        return solver.host_table(groups, reg, anchored, rule)
    first = table()
    assert table() is first and torch.equal(first, solver.table_for(groups, reg, anchored, rule))
    changes = [("lr", 2e-2), ("local_steps", 4), ("lr_decay", False), ("min_lr_ratio", 0.5)]
    for key, value in changes:
        before = table()
        groups[1][key] = value
        after = table()
        assert after is not before and torch.equal(after, solver.table_for(groups, reg, anchored, rule)), key
        assert table() is after
    assert float(solver.host_table(groups, reg, True, rule)[1, -1]) == 0.0  # the L2 coefficient c of Eq. 7
    reg.coef = None  # c = 1/η
    with_anchor = solver.host_table(groups, reg, True, rule)
    assert float(with_anchor[1, -1]) == 1 / 2e-2 and solver.host_table(groups, reg, True, rule) is with_anchor
    reg.coef = 3.0  # a fixed c
    assert torch.equal(solver.host_table(groups, reg, True, rule)[:, -1], torch.full((len(groups),), 3.0,
                                                                                      dtype=torch.float64))

    current = table()
    dst = torch.full(current.shape, -1.0)
    assert torch.equal(solver.upload_table(dst, current), current.float())
    dst.fill_(-1.0)  # written behind its back: the same host table is not copied again
    assert torch.equal(solver.upload_table(dst, current), torch.full(current.shape, -1.0))
    groups[0]["lr"] = 5e-3
    assert torch.equal(solver.upload_table(dst, table()), table().float())
    other = torch.full(current.shape, -1.0)  # another buffer (a new shape's, say): copied into
    assert torch.equal(solver.upload_table(other, table()), table().float())
    assert torch.equal(solver.upload_table(dst, current, "static"), current.float())  # one entry per role:
    other.fill_(-1.0)  # the eager role still knows that `other` holds this table, and does not copy again
    assert torch.equal(solver.upload_table(other, table()), torch.full(current.shape, -1.0))

    _, adam, _ = _run("fused", steps=1, inner="adam", inner_kwargs={}, lr=1e-3)
    adam_rule = locoprop.fused.update_rule_for(adam.inner)[0]
    a = adam.fused_solver.host_table(adam.param_groups, adam.variant.regularizer, False, adam_rule)
    assert adam_rule.table_key(adam.param_groups, False) is None
    assert adam.fused_solver.host_table(adam.param_groups, adam.variant.regularizer, False, adam_rule) is not a


def test_a_step_that_solves_each_layer_alone_keeps_each_layers_table():
    """Solved during the backward pass, each layer's solve asks for a table of its own row: with learning rates
    that differ by layer, every layer's table is made once and copied once into a buffer of its own, then kept
    from step to step while the settings stay; a changed rate makes that layer's table again."""
    torch.manual_seed(0)
    model = small_autoencoder()
    opt = locoprop.LocoProp(model, lr=1e-2, output_transfer="sigmoid", backend="fused", solve_in_backward=True)
    for m, g in enumerate(opt.param_groups):
        g["lr"] = 1e-2 * (m + 1)
    made, table_for = [], opt.fused_solver.table_for
    opt.fused_solver.table_for = lambda groups, *args: (made.append([g["name"] for g in groups]),
                                                        table_for(groups, *args))[1]
    held = []
    for _ in range(3):
        x = torch.rand(8, 20)
        opt.step(lambda: bce_sum_mean(model(x), x))
        held.append({role: id(host) for role, (_, host) in opt.fused_solver._uploaded.items()})
    names = [g["name"] for g in opt.param_groups]
    assert sorted(made) == sorted([n] for n in names) and held[0] == held[1] == held[2]
    assert set(held[0]) == {("eager", (n,)) for n in names}
    opt.param_groups[1]["lr"] = 0.5
    x = torch.rand(8, 20)
    opt.step(lambda: bce_sum_mean(model(x), x))
    assert made[len(names):] == [[names[1]]]


@pytest.mark.parametrize("inner, inner_kwargs", [("tf_rmsprop", {}), ("adam", {}), ("sgd", {"momentum": 0.9})])
def test_step_counters_are_advanced_together_and_stay_the_inner_optimizers_own(inner, inner_kwargs, tmp_path):
    """The fast solver advances the inner optimizer's per-parameter step counters as views of one vector (one
    addition a step): each stays a 0-d tensor of the optimizer's state and counts the layer's own local
    iterations, also after ``load_state_dict`` replaced them, through a checkpoint read with
    ``weights_only=True``, and on the reference loop after the fast solver."""
    lr = 1e-2 if inner == "tf_rmsprop" else 1e-3
    model, opt, _ = _run("fused", steps=3, inner=inner, inner_kwargs=inner_kwargs, lr=lr, per_layer=True)
    _, ref, _ = _run("reference", steps=3, inner=inner, inner_kwargs=inner_kwargs, lr=lr, per_layer=True)

    def counters(o):
        return [o.inner.state[p].get("step") for g in o.param_groups for p in g["params"]]
    fast = counters(opt)
    if inner == "sgd":  # torch's SGD keeps no counter: nothing to advance
        assert fast == [None] * len(fast) and counters(ref) == fast
        return
    assert all(c.dim() == 0 for c in fast) and [float(c) for c in fast] == [float(c) for c in counters(ref)]
    assert len({c.untyped_storage().data_ptr() for c in fast}) == 1  # one vector
    assert [float(c) for c in fast] == [3.0 * g["local_steps"] for g in opt.param_groups for _ in g["params"]]
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    opt.load_state_dict(torch.load(path, weights_only=True))  # new counter tensors: made views again
    x = torch.rand(32, 20)
    opt.step(lambda: bce_sum_mean(model(x), x))
    assert [float(c) for c in counters(opt)] == [4.0 * g["local_steps"] for g in opt.param_groups
                                                 for _ in g["params"]]
    opt.backend = "reference"
    opt.step(lambda: bce_sum_mean(model(x), x))
    assert [float(c) for c in counters(opt)] == [5.0 * g["local_steps"] for g in opt.param_groups
                                                 for _ in g["params"]]
    saved = torch.load(path, weights_only=True)["inner"]["state"]
    assert [float(saved[i]["step"]) for i in sorted(saved)] == [3.0 * g["local_steps"] for g in opt.param_groups
                                                            for _ in g["params"]]


def test_a_captured_steps_key_follows_every_setting_but_the_learning_rates():
    """What a captured step is specific to (``CapturedStep._hyper_key``, computed before every replay, kept
    cheap): a change of a group's or the inner optimizer's setting, of the optimizer's flags or of which other
    parameters train captures anew; a learning rate does not (the graph reads it from the table)."""
    from locoprop.optimizer import CapturedStep

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 20))
    with pytest.warns(UserWarning, match="left to another optimizer"):
        opt = locoprop.LocoProp(model, output_transfer="sigmoid", backend="fused")
    step = CapturedStep.__new__(CapturedStep)  # its key only: the step itself needs CUDA
    step.optimizer, step._model_params = opt, None
    key = step._hyper_key()
    opt.param_groups[0]["lr"] *= 2
    opt.inner.param_groups[1]["lr"] *= 2
    assert step._hyper_key() == key
    changes = [lambda: opt.param_groups[1].__setitem__("local_steps", 7),
               lambda: opt.inner.param_groups[0].__setitem__("momentum", 0.5),
               lambda: setattr(opt, "check_finite", False),
               lambda: setattr(opt.fused_solver, "order", "grouped"),
               lambda: setattr(opt.fused_solver, "grouped_fp32_products", "tf32x3"),
               lambda: model[2].weight.requires_grad_(False)]
    for change in changes:
        change()
        assert step._hyper_key() != key
        key = step._hyper_key()


def test_a_changed_table_reaches_a_cuda_table_through_one_pinned_buffer_per_role(monkeypatch):
    """On CUDA a changed table is converted into a pinned buffer kept per role and copied from it without a
    wait for the stream; before the buffer is written again the host waits for the event recorded after the
    last copy from it.  Run here with stand-ins for pinned memory and CUDA events (the CUDA tests run the
    real ones: Adam's table changes at every captured step)."""
    events, real_empty = [], torch.empty

    class Event:
        def __init__(self):
            self.log = []
            events.append(self)

        def record(self, stream):
            self.log.append("recorded")

        def synchronize(self):
            self.log.append("waited")

    class CudaTable(torch.Tensor):  # a CPU tensor the solver takes for a CUDA one
        is_cuda = True

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "stream")
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    solver = FusedIterativeSolver()
    dst = torch.zeros(2, 3).as_subclass(CudaTable)
    first, second = torch.rand(2, 3, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64)
    solver.upload_table(dst, first, "static")
    buffer = solver._staging["static"][0]
    assert torch.equal(dst, first.float()) and buffer.dtype == torch.float32
    assert [e.log for e in events] == [["recorded"]]
    solver.upload_table(dst, first, "static")  # unchanged: no copy, no wait
    assert len(events) == 1
    solver.upload_table(dst, second, "static")
    assert torch.equal(dst, second.float()) and solver._staging["static"][0] is buffer
    assert [e.log for e in events] == [["recorded", "waited"], ["recorded"]]  # waited for the first copy's read
    wider = torch.zeros(2, 4).as_subclass(CudaTable)
    solver.upload_table(wider, torch.rand(2, 4, dtype=torch.float64), "static")  # a new shape: a new buffer
    assert solver._staging["static"][0] is not buffer and solver._staging["static"][0].shape == (2, 4)
    assert [e.log for e in events][1:] == [["recorded"], ["recorded"]]  # nothing to wait for in a new buffer


def test_bf16_on_a_cpu_without_fast_bf16_products_warns_and_fp32_does_not(monkeypatch):
    """Where PyTorch has no fast bf16 products on the CPU (AVX2 alone: 126 times slower than float32 in
    session 13), ``precision="bf16"`` warns that FP32 is faster; it still runs.  On a CPU that has them, and
    for FP32 anywhere, no warning."""
    from locoprop import fused

    model = small_autoencoder()
    monkeypatch.setattr(fused, "cpu_has_fast_bf16_products", lambda: False)
    with pytest.warns(UserWarning, match="precision='bf16' on this CPU.*precision='fp32' is faster"):
        opt = locoprop.LocoProp(model, output_transfer="sigmoid", precision="bf16")
    x = torch.rand(8, 20)
    opt.step(lambda: bce_sum_mean(model(x), x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        locoprop.LocoProp(model, output_transfer="sigmoid")
        monkeypatch.setattr(fused, "cpu_has_fast_bf16_products", lambda: True)
        locoprop.LocoProp(model, output_transfer="sigmoid", precision="bf16")
    monkeypatch.undo()
    assert isinstance(fused.cpu_has_fast_bf16_products(), bool)


@pytest.mark.parametrize("space", [1.0, 0.5, 0.37, 0.26, 0.1, "float64", "strided", None])
def test_tf_rmsprop_denominators_in_a_workspace_are_the_same_bits(space):
    """TF-RMSProp's multi-tensor update with its denominators ``√(ms+ε)`` computed into a workspace (the
    layer's residual buffer, on the CPU) in one piece or up to four (sizes that cut rows and SIMD widths
    unevenly) takes the same steps, to the bit, as with new tensors; where a workspace cannot serve a tensor
    (smaller than a quarter of it, another dtype, not contiguous) that tensor's denominators are a new tensor
    and the update is the same."""
    from locoprop.inner import TFRMSprop
    from locoprop.update_rules import TFRMSpropRule

    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 29), (37,)]

    def layer():
        return ([torch.randn(s, generator=gen) for s in shapes],
                [[torch.rand(s, generator=gen), torch.randn(s, generator=gen)] for s in shapes])
    params, states = layer()
    ref_params, ref_states = copy.deepcopy((params, states))
    rule = TFRMSpropRule(TFRMSprop([torch.zeros(1)], lr=1.0, alpha=0.9, momentum=0.5, eps=1e-8))
    n = 37 * 29
    if space == "float64":
        work = torch.full((n,), 7.0, dtype=torch.float64)
    elif space == "strided":
        work = torch.full((2 * n,), 7.0)[::2]
    elif space is not None:
        work = torch.full((int(n * space) + 1,), 7.0)
    for k in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        lr = torch.tensor(0.1 / (k + 1))
        rule.update_layers([(params, [g.clone() for g in grads], states, (lr,))],
                           None if space is None else [work, work])
        rule.update_layers([(ref_params, [g.clone() for g in grads], ref_states, (lr,))])
    assert all(torch.equal(a, b) for a, b in zip(params + sum(states, []), ref_params + sum(ref_states, [])))
    used = space is not None and not isinstance(space, str)  # at 0.1 by the bias only (the weights' would
    assert used == (space is not None and not bool((work == 7.0).all())), space  # take 10 pieces: a new tensor)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("check_finite", [False, "layer", True])
def test_a_cpu_step_makes_no_float32_tensor_of_a_weights_size_but_its_copies(precision, check_finite):
    """In the local iterations on the CPU neither TF-RMSProp's denominators nor the update form's weight change
    ``W - W₀`` (bf16) is a new weight-sized float32 tensor: they go into the residual and the gradient buffers.
    The step's only such tensors are check_finite's copies of the weights and inner state (3 per weight) and,
    in bf16, the start weights of the update form where no copy serves as them (check_finite=False)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NewWeightSized(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() == 37 * 20 \
                        and t.untyped_storage().data_ptr() not in inputs:
                    self.made.append(str(func))
            return out

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 37), nn.Tanh(), nn.Linear(37, 20))
    opt = locoprop.LocoProp(model, output_transfer="sigmoid", backend="fused", precision=precision, local_steps=5,
                            check_finite=check_finite, lr=1e-2, activation_lr=1.0)
    x = torch.rand(64, 20)
    opt.step(lambda: bce_sum_mean(model(x), x))  # the inner state is made
    mode = NewWeightSized()
    with mode:
        opt.step(lambda: bce_sum_mean(model(x), x))
    copies = 0 if check_finite is False else 3 * 2
    starts = 2 if precision == "bf16" and check_finite is False else 0
    assert sorted(mode.made) == sorted(["aten.clone.default"] * (copies + starts)), mode.made
