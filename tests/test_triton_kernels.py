"""The Triton kernels (:mod:`locoprop.triton_kernels`) against PyTorch's operations, on the CPU.

Here the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``: the same kernel source, executed with
NumPy on CPU tensors) and are compiled for GPU architectures without a GPU; on CUDA, where they are the
solver's default, ``tests/cuda`` runs them.  The test extra's Triton (3.9 on the CI), 3.6 and 3.5 pass this file
(the compile tests compile in a process of their own: Triton 3.5's interpreter leaves ``triton.language``
patched in its process).
"""

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import locoprop
from locoprop import triton_kernels
from locoprop.inner import TFRMSprop
from locoprop.transfer import LeakyReLU, ReLU
from locoprop.update_rules import TFRMSpropRule

from conftest import bce_sum_mean, small_autoencoder

# pyproject's test extra installs Triton where it has wheels (Linux x86_64, as on CI); elsewhere this module skips
pytest.importorskip("triton", reason="Triton has no wheel for this platform (the test extra installs it on Linux "
                                     "x86_64)")


def _max_rel(a_tensors, b_tensors):
    return max(((a - b).norm() / a.norm().clamp_min(1e-30)).item() for a, b in zip(a_tensors, b_tensors))


def _layer_tensors(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    states = [[torch.rand(s, generator=gen), torch.randn(s, generator=gen)] for s in shapes]
    return params, grads, states


@pytest.mark.parametrize("shapes", [[(37, 29), (37,)], [(3000,)], [(1030, 2), (1,)], [(1, 1), (1,)]])
def test_kernel_is_the_multi_tensor_tf_rmsprop_update(interpreted, shapes):
    """Several updates of a layer (weights and bias, or weights alone; sizes that leave a partial block) with
    rates read from a table on the device: the kernel's tensors equal the multi-tensor update's to float32
    rounding (the kernel contracts multiply-adds)."""
    params, grads, states = _layer_tensors(shapes)
    ref = copy.deepcopy((params, grads, states))
    rule = TFRMSpropRule(TFRMSprop([torch.zeros(1)], lr=1.0, alpha=0.9, momentum=0.5, eps=1e-8))
    table = torch.tensor([[0.0, 0.3, 0.2, 0.1]])
    for k in range(1, 4):
        lr = table[0, k]
        triton_kernels.tf_rmsprop_update_(params, [g.clone() for g in grads], states, lr, 0.9, 0.5, 1e-8)
        rule.update_layers([(ref[0], [g.clone() for g in ref[1]], ref[2], (lr,))])
    assert _max_rel(params + [s for st in states for s in st], ref[0] + [s for st in ref[2] for s in st]) < 1e-6
    assert not any(torch.equal(a, b) for a, b in zip(params, _layer_tensors(shapes)[0]))  # the kernel did update


def test_kernel_takes_only_float32_contiguous_tensors_on_the_rates_device(interpreted):
    lr = torch.tensor(0.1)
    w = torch.zeros(4, 3)
    assert triton_kernels.suits([w, w.clone()], lr)
    assert not triton_kernels.suits([w.T], lr)  # not contiguous
    assert not triton_kernels.suits([w.double()], lr)
    assert not triton_kernels.suits([w], lr.double())
    with pytest.raises(ValueError, match="one or two tensors"):
        triton_kernels.tf_rmsprop_update_([w] * 3, [w] * 3, [[w, w]] * 3, lr, 0.9, 0.0, 1e-8)


def _train(steps=4, local_steps=3, dtype=torch.float32, solve_order="layer-major", model=None, change_in_update=None,
           **kwargs):
    torch.manual_seed(0)
    model = small_autoencoder(dtype) if model is None else model
    opt = locoprop.LocoProp(model, variant="M", lr=1e-2, activation_lr=1.0, local_steps=local_steps,
                            inner="tf_rmsprop", inner_kwargs={"momentum": 0.9, "alpha": 0.9, "eps": 1e-8},
                            output_transfer="sigmoid", backend="fused", solve_order=solve_order, **kwargs)
    opt.fused_solver.change_in_update = change_in_update
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(16, 20, generator=gen, dtype=dtype)
        opt.step(lambda: bce_sum_mean(model(x), x))
    return model, opt


def _count_launches(monkeypatch, residuals=None):
    """Count the update kernel's launches (the number of tensors of each) and, into ``residuals``, the residual
    kernel's (its transfer code each)."""
    calls = []
    update, residual = triton_kernels.tf_rmsprop_update_, triton_kernels.residual_

    def counted_update(params, *args, **kwargs):
        calls.append(len(params))
        return update(params, *args, **kwargs)

    def counted_residual(pre, target, bias_grad, transfer, **added):
        if residuals is not None:
            residuals.append(transfer)
        return residual(pre, target, bias_grad, transfer, **added)
    monkeypatch.setattr(triton_kernels, "tf_rmsprop_update_", counted_update)
    monkeypatch.setattr(triton_kernels, "residual_", counted_residual)
    return calls


@pytest.mark.parametrize("order", ["layer-major", "iteration-major"])
def test_solver_with_triton_elementwises_equals_the_multi_tensor_solver(interpreted, monkeypatch, order):
    """LocoProp-M on the fast solver, several steps: the weights with ``triton_elementwise=True`` agree with
    ``triton_elementwise=False`` to 1e-5 (issue 5's tolerance), the inner state to 1e-4 (a bias's gradient is a sum
    over the batch that mostly cancels, so the order of that sum, the kernel's own, shows more in its momentum
    than in any weight); every update was one launch per layer, and every iteration after the first computed
    ``δ`` and ``Σδ`` in one launch per layer (tanh, identity and sigmoid layers: the autoencoder has all three)."""
    residuals = []
    calls = _count_launches(monkeypatch, residuals)
    m_ref, o_ref = _train(triton_elementwise=False, solve_order=order)
    assert calls == [] and residuals == []
    m_tri, o_tri = _train(triton_elementwise=True, solve_order=order)
    steps, T, layers = 4, 3, len(o_tri.layers)
    assert calls == [2] * (steps * T * layers)  # weights and bias together
    assert len(residuals) == steps * (T - 1) * layers and set(residuals) == {0, 1, 2}
    for p, q in zip(m_ref.parameters(), m_tri.parameters()):
        assert ((p - q).norm() / p.norm()).item() < 1e-5
        for key in ("mean_square", "momentum_buffer"):
            a, b = o_ref.inner.state[p][key], o_tri.inner.state[q][key]
            assert ((a - b).norm() / a.norm()).item() < 1e-4


def test_auto_uses_triton_on_cuda_only_and_keeps_tensors_it_does_not_take(interpreted, monkeypatch):
    """``triton_elementwise=None`` never runs the interpreter on the CPU; float64 tensors keep the multi-tensor update
    even where the kernel is required (the same weights as without it, to the bit)."""
    calls = _count_launches(monkeypatch)
    _train(steps=1)
    assert calls == []
    m_req, _ = _train(steps=2, dtype=torch.float64, triton_elementwise=True)
    m_off, _ = _train(steps=2, dtype=torch.float64, triton_elementwise=False)
    assert calls == []
    assert all(torch.equal(p, q) for p, q in zip(m_req.parameters(), m_off.parameters()))


def _failing_on_launch(monkeypatch, which):
    """The kernel launcher, failing (before it changes anything, as a compilation error does) at launch
    ``which`` (1-based); the list of launches."""
    launch, calls = triton_kernels.tf_rmsprop_update_, []

    def fails(params, *args, **kwargs):
        calls.append(len(params))
        if len(calls) == which:
            raise RuntimeError("no kernel for this device")
        return launch(params, *args, **kwargs)
    monkeypatch.setattr(triton_kernels, "tf_rmsprop_update_", fails)
    return calls


def test_a_failing_kernel_leaves_the_other_layers_to_the_multi_tensor_update(interpreted, monkeypatch):
    """Three layers in one update (as the iteration-major order issues them) and a kernel that fails on the
    second: the second and third get the multi-tensor update, a warning names triton_elementwise and the failure,
    the kernels stay off for the process, and every tensor is the multi-tensor update's."""
    calls = _failing_on_launch(monkeypatch, 2)
    rule = TFRMSpropRule(TFRMSprop([torch.zeros(1)], lr=1.0, alpha=0.9, momentum=0.5, eps=1e-8))
    rates = torch.tensor([0.1, 0.2, 0.3])
    layers = [(*_layer_tensors([(5, 4), (5,)], seed=m), (rates[m],)) for m in range(3)]
    ref = copy.deepcopy(layers)
    with pytest.warns(RuntimeWarning, match="triton_elementwise: the TF-RMSProp kernel failed .RuntimeError: no kernel "
                                            "for this device.; PyTorch.s operations run in place of the Triton kernels from now on"):
        assert rule.update_layers_triton(layers)
    assert calls == [2, 2]
    assert triton_kernels.disabled_because() == "RuntimeError: no kernel for this device"
    assert not triton_kernels.available(torch.device("cpu"))
    rule.update_layers(ref)
    for (params, _, states, _), (rp, _, rs, _) in zip(layers, ref):
        assert _max_rel(params + [s for st in states for s in st], rp + [s for st in rs for s in st]) < 1e-6


def test_a_required_kernel_that_fails_raises_and_leaves_the_step_undone(interpreted, monkeypatch):
    """``triton_elementwise=True``: a failing kernel raises an error naming triton_elementwise, and the step changes no
    weight and no inner state (the optimizer's rollback)."""
    model, opt = _train(steps=1, triton_elementwise=True)
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _failing_on_launch(monkeypatch, 3)
    x = torch.rand(16, 20)
    with pytest.raises(RuntimeError, match="triton_elementwise: the TF-RMSProp kernel failed .RuntimeError: no kernel"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    after = (model.state_dict(), opt.state_dict())
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    for p, st in before[1]["state"].items():
        assert all(torch.equal(v, after[1]["state"][p][k]) for k, v in st.items() if torch.is_tensor(v))


def test_triton_elementwise_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="triton_elementwise: expected None, True or False, got 'yes'"):
        _train(steps=0, triton_elementwise="yes")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, opt = _train(steps=0, triton_elementwise=True)
    x = torch.rand(16, 20)
    with pytest.raises(RuntimeError, match="triton_elementwise=True: the Triton kernels cannot run on cpu"):
        opt.step(lambda: bce_sum_mean(model(x), x))


#: IEEE round-to-nearest division in PTX (Triton 3.5 flushes subnormals to zero as well: ``.ftz``).
ROUNDED_DIVISION = r"div\.rn(\.ftz)?\.f32"


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_ampere_and_hopper_with_rounded_division_and_root(arch):
    """The kernels as a GPU compiles them at their first launch (not the interpreter's reading of them),
    compiled here for the A100's and the H100/H200's architectures: PTX and a cubin; the update's division and
    square root and the sigmoid's division are the round-to-nearest instructions (as PyTorch's own kernels
    round), tanh is CUDA's accurate ``tanhf`` (libdevice), not the hardware's approximation, and the bias
    sums use no atomics (the same sums from run to run)."""
    ptx = _compiled_ptx(arch)
    for change in ("", "-change"):  # and the variants of the update form (the weights' and the bias's change)
        update = ptx["tf_rmsprop_pair" + change]
        assert re.search(ROUNDED_DIVISION, update) and re.search(r"sqrt\.rn(\.ftz)?\.f32", update)
        assert "div.full" not in update and "sqrt.approx" not in update
        for transfer in (0, 1, 2, 3):
            residual = ptx[f"residual_column_sums-{transfer}{change}"]
            assert "atom." not in residual and "tanh.approx" not in residual and "div.full" not in residual
            assert bool(re.search(ROUNDED_DIVISION, residual)) == (transfer == 2)
    # the change is one more store of the update (a subtraction, no contracted multiply-add)
    stores = [len(re.findall(r"st\.global", ptx["tf_rmsprop_pair" + c])) for c in ("", "-change")]
    assert stores[1] > stores[0]


_COMPILE_SCRIPT = """
import json, sys
from locoprop import triton_kernels
arch = int(sys.argv[1])
out = {}
for change in (False, True):
    suffix = "-change" if change else ""
    for name, kernel, transfer in [("tf_rmsprop_pair", "tf_rmsprop_pair", 1)] + [
            (f"residual_column_sums-{t}", "residual_column_sums", t) for t in (0, 1, 2, 3)]:
        compiled = triton_kernels.compile_for(arch, kernel, transfer, change=change)
        assert len(compiled.asm["cubin"]) > 0, name
        out[name + suffix] = compiled.asm["ptx"]
json.dump(out, sys.stdout)
"""


def _compiled_ptx(arch: int) -> dict[str, str]:
    """The kernels' PTX from :func:`~locoprop.triton_kernels.compile_for`, compiled in a process of its own:
    Triton 3.5's interpreter, which other tests of this file run, leaves ``triton.language`` patched in its
    process, and a compilation after it fails there."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ptx = json.loads(done.stdout)
    assert all(f".target sm_{arch}" in text for text in ptx.values())
    return ptx


@pytest.mark.parametrize("transfer, f, slope", [(0, lambda a: a, 0.0), (1, torch.tanh, 0.0), (2, torch.sigmoid, 0.0),
                                               (3, LeakyReLU(0.1).f, 0.1), (3, ReLU().f, 0.0)])
@pytest.mark.parametrize("shape", [(40, 37), (70, 65), (1, 1), (3, 100), (300, 37), (257, 65)])
@pytest.mark.parametrize("bias", [True, False])
def test_residual_kernel_is_f_minus_target_and_its_column_sums(interpreted, transfer, f, slope, shape, bias):
    """``δ = f(â) - y`` in place and ``Σδ`` over the rows (tiles that do not divide the shape; batches of one
    block of rows and of several, whose tiles' sums are then summed; pre-activations from 1e-4 to 5 in size,
    where the interpreter's tanh switches from its series to ``exp``); a leaky ReLU and ReLU to the bit of
    :class:`~locoprop.transfer.LeakyReLU`'s ``f``."""
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(shape, generator=gen) * torch.logspace(-4, 0.7, shape[1])
    target = torch.rand(shape, generator=gen)
    expected = f(pre) - target
    bias_grad = torch.full(shape[1:], float("nan")) if bias else None
    out = triton_kernels.residual_(pre, target, bias_grad, transfer, slope=slope)
    assert out is pre
    assert torch.allclose(pre, expected, rtol=1e-6, atol=2.5e-7)  # δ of values near 1: two of their last places
    if transfer == 3:
        assert torch.equal(pre, expected)
    if bias:
        assert torch.allclose(bias_grad, expected.sum(0), rtol=1e-5, atol=1e-6)


def test_residual_kernel_covers_the_matching_loss_of_five_transfer_functions_and_the_squared_loss():
    from locoprop.losses import DualMatchingLoss, MatchingLoss, SquaredPostLoss, SquaredPreLoss
    from locoprop.transfer import Linear, Sigmoid, Softmax, Softplus, Tanh

    code = triton_kernels.residual_transfer
    assert [code(MatchingLoss(), t) for t in (Linear(), Tanh(), Sigmoid(), ReLU(), LeakyReLU(0.2))] == [0, 1, 2, 3, 3]
    assert [triton_kernels.residual_slope(t) for t in (Tanh(), ReLU(), LeakyReLU(0.2))] == [0.0, 0.0, 0.2]
    assert code(MatchingLoss(), Softplus()) is None and code(MatchingLoss(), Softmax()) is None
    assert code(SquaredPreLoss(), None) == 0 and code(SquaredPreLoss(), Tanh()) == 0
    assert code(SquaredPostLoss(), Tanh()) is None and code(DualMatchingLoss(), Tanh()) is None


def test_residual_kernel_takes_only_float32_contiguous_matrices_with_one_bias_value_a_column(interpreted):
    pre, target, bias_grad = torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3)
    suits = triton_kernels.residual_suits
    assert suits(pre, target, bias_grad) and suits(pre, target, None)
    assert not suits(pre.T.contiguous().T, target, bias_grad)
    assert not suits(pre, target.double(), bias_grad) and not suits(pre, torch.zeros(4, 2), bias_grad)
    assert not suits(pre, target, torch.zeros(4)) and not suits(pre.reshape(12), target.reshape(12), None)


def test_either_kernel_can_be_left_out(interpreted, monkeypatch):
    """``FusedIterativeSolver.triton_kernels`` (for timing each kernel's share): with ``{"update"}`` only the
    update kernel launches, and the step equals the one with both to the weights' 1e-5."""
    residuals = []
    calls = _count_launches(monkeypatch, residuals)
    m_both, _ = _train(steps=2, triton_elementwise=True)
    both = (len(calls), len(residuals))
    calls.clear()
    residuals.clear()
    m_update, o_update = _train(steps=0, triton_elementwise=True)
    o_update.fused_solver.triton_kernels = frozenset({"update"})
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.rand(16, 20, generator=gen)
        o_update.step(lambda: bce_sum_mean(m_update(x), x))
    assert both[0] > 0 and both[1] > 0
    assert len(calls) == both[0] and residuals == []
    for p, q in zip(m_both.parameters(), m_update.parameters()):
        assert ((p - q).norm() / p.norm()).item() < 1e-5


@pytest.mark.parametrize("shapes", [[(37, 29), (37,)], [(3000,)], [(1030, 2), (1,)]])
def test_update_kernel_writes_each_tensors_change_from_its_start(interpreted, shapes):
    """With ``starts`` the kernel's update is the one without, to the bit, and each gradient then holds its
    tensor's change from its start exactly as ``torch.sub`` makes it after the update (what the update form's
    next pre-activation reads, instead of two subtractions of its own)."""
    params, grads, states = _layer_tensors(shapes)
    starts = [p + torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 1e-3 for p in params]
    plain = copy.deepcopy((params, grads, states))
    lr = torch.tensor(0.3)
    triton_kernels.tf_rmsprop_update_(params, grads, states, lr, 0.9, 0.5, 1e-8, starts=starts)
    triton_kernels.tf_rmsprop_update_(*plain, lr, 0.9, 0.5, 1e-8)
    flat = params + [s for st in states for s in st]
    assert all(torch.equal(a, b) for a, b in zip(flat, plain[0] + [s for st in plain[2] for s in st]))
    assert all(torch.equal(g, torch.sub(p, s)) for g, p, s in zip(grads, params, starts))
    assert not any(torch.equal(g, h) for g, h in zip(grads, plain[1]))
    with pytest.raises(ValueError, match=r"starts of shapes \[\(2, 2\)"):
        triton_kernels.tf_rmsprop_update_(params, grads, states, lr, 0.9, 0.5, 1e-8,
                                          starts=[torch.zeros(2, 2)] * len(params))


@pytest.mark.parametrize("transfer", [0, 1, 2])
@pytest.mark.parametrize("rows", [40, 300])
@pytest.mark.parametrize("aliased", [False, True])
@pytest.mark.parametrize("based", [False, True])
def test_residual_kernel_adds_a0_and_the_bias_change_as_add_does(interpreted, transfer, rows, aliased, based):
    """``residual_(..., shift=, base=)`` is ``pre.add_(base).add_(shift)`` then the kernel without them, to the
    bit: ``δ`` and the column sums, with one block of rows (the kernel writes the sums itself) and several, with
    ``shift`` the bias gradient itself (where the update kernel left the bias's change), with and without
    ``base`` (the update form's ``a₀``)."""
    gen = torch.Generator().manual_seed(transfer)
    pre = torch.randn(rows, 37, generator=gen) * 0.01
    target, shift = torch.rand(rows, 37, generator=gen), torch.randn(37, generator=gen) * 0.1
    base = torch.randn(rows, 37, generator=gen) * 2 if based else None
    expected, expected_sums = pre.clone(), torch.full((37,), float("nan"))
    if based:
        expected.add_(base)
    triton_kernels.residual_(expected.add_(shift), target, expected_sums, transfer)
    bias_grad = shift.clone() if aliased else torch.full((37,), float("nan"))
    out = triton_kernels.residual_(pre, target, bias_grad, transfer, shift=bias_grad if aliased else shift,
                                   **({"base": base} if based else {}))
    assert out is pre and torch.equal(pre, expected) and torch.equal(bias_grad, expected_sums)
    assert triton_kernels.residual_suits(pre, target, bias_grad, base=base)
    assert not triton_kernels.residual_suits(pre, target, bias_grad, base=torch.zeros(rows, 36))


def _with_a_layer_without_bias():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6, bias=False),
                               torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 20))


@pytest.mark.filterwarnings("ignore:precision='bf16'")
@pytest.mark.parametrize("order", ["layer-major", "iteration-major"])
@pytest.mark.parametrize("build", [small_autoencoder, _with_a_layer_without_bias])
def test_the_update_form_reads_the_change_the_kernels_wrote_to_the_bit(interpreted, monkeypatch, order, build):
    """bf16 products, so the update form ``a₀ + x (W - W₀)ᵀ + (b - b₀)``: where the update kernel writes the
    change and the residual kernel adds the bias's (``change_in_update``, by default where both kernels run),
    four steps give the weights and inner state of ``change_in_update=False`` (the subtractions and the addition
    as launches of their own) to the bit, in both orders (the iteration-major one updates every layer in one
    call).  Every update but each layer's last of a step wrote the change, and every residual kernel added
    ``a₀`` and the bias's change to the product."""
    updates, residuals = [], []
    update, residual = triton_kernels.tf_rmsprop_update_, triton_kernels.residual_

    def counted_update(params, *args, starts=None):
        updates.append(starts is not None)
        return update(params, *args, **({} if starts is None else {"starts": starts}))

    def counted_residual(pre, target, bias_grad, transfer, shift=None, base=None, **kwargs):
        residuals.append((base is not None, shift is not None, bias_grad is not None and shift is bias_grad))
        return residual(pre, target, bias_grad, transfer, **{k: v for k, v in (("shift", shift), ("base", base))
                                                              if v is not None}, **kwargs)
    monkeypatch.setattr(triton_kernels, "tf_rmsprop_update_", counted_update)
    monkeypatch.setattr(triton_kernels, "residual_", counted_residual)
    runs = {}
    for change in (False, None):
        updates.clear()
        residuals.clear()
        runs[change] = _train(model=build(), solve_order=order, precision="bf16", triton_elementwise=True,
                              change_in_update=change)
        assert runs[change][1].fused_solver.writes_change(torch.device("cpu")) is (change is None)
    (m_off, o_off), (m_on, o_on) = runs[False], runs[None]
    for p, q in zip(m_off.parameters(), m_on.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(a, o_on.inner.state[q][k]) for k, a in o_off.inner.state[p].items()
                   if torch.is_tensor(a))
    steps, T, layers = 4, 3, len(o_on.layers)
    if order == "layer-major":  # one launch per layer and iteration: all but the last of each chain change
        assert sum(updates) == steps * (T - 1) * layers and len(updates) == steps * T * layers
    else:  # one update call of every layer per iteration: one launch per pair of tensors
        assert sum(updates) == len(updates) * (T - 1) // T
    # the residual kernel (here for the identity and sigmoid layers: the tanh layers' quick route on the CPU has
    # no kernel, and reads the change the update wrote all the same) adds the change of every bias it sees
    assert residuals and all(based and shifted == with_bias for based, shifted, with_bias in residuals)
    assert any(shifted for _, shifted, _ in residuals) and len(residuals) == steps * (T - 1) * 2


def test_a_failing_kernel_still_leaves_each_change_where_the_update_form_reads_it(interpreted, monkeypatch):
    """Three layers in one update with their starts, the kernel failing on the second: the second and third get
    the multi-tensor update and then their changes by ``torch.sub``, so that every gradient holds its weight's
    change from its start after the call, as the launches that ran left theirs."""
    _failing_on_launch(monkeypatch, 2)
    rule = TFRMSpropRule(TFRMSprop([torch.zeros(1)], lr=1.0, alpha=0.9, momentum=0.5, eps=1e-8))
    rates = torch.tensor([0.1, 0.2, 0.3])
    layers = [(*_layer_tensors([(5, 4), (5,)], seed=m), (rates[m],)) for m in range(3)]
    starts = [[p.clone() for p in params] for params, *_ in layers]
    ref = copy.deepcopy(layers)
    with pytest.warns(RuntimeWarning, match="the TF-RMSProp kernel failed"):
        assert rule.update_layers_triton(layers, starts=starts)
    rule.update_layers(ref)
    for (params, grads, states, _), (rp, _, rs, _), start in zip(layers, ref, starts):
        assert _max_rel(params + [s for st in states for s in st], rp + [s for st in rs for s in st]) < 1e-6
        assert all(torch.equal(g, torch.sub(p, s)) for g, p, s in zip(grads, params, start))


def test_a_start_the_kernel_does_not_take_gets_its_change_by_torch_sub(interpreted, monkeypatch):
    """A start the kernel cannot read (not contiguous): the layer keeps its one launch, without the change,
    which ``torch.sub`` then writes; the other layer's change comes from its launch."""
    calls = _count_launches(monkeypatch)
    rule = TFRMSpropRule(TFRMSprop([torch.zeros(1)], lr=1.0, alpha=0.9, momentum=0.5, eps=1e-8))
    rates = torch.tensor([0.1, 0.2])
    layers = [(*_layer_tensors([(5, 4), (5,)], seed=m), (rates[m],)) for m in range(2)]
    starts = [[p.clone() for p in params] for params, *_ in layers]
    starts[1][0] = starts[1][0].T.contiguous().T  # the same values, strided
    assert rule.update_layers_triton(layers, starts=starts)
    assert calls == [2, 2]
    for (params, grads, _, _), start in zip(layers, starts):
        assert all(torch.equal(g, torch.sub(p, s)) for g, p, s in zip(grads, params, start))
