"""The Triton update kernel (:mod:`locoprop.triton_kernels`) against the multi-tensor update, on the CPU.

Here the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``: the same kernel source, executed with
NumPy on CPU tensors); on CUDA, where it is compiled and the solver's default, ``tests/cuda`` checks it.
"""

import copy

import pytest
import torch

import locoprop
from locoprop import triton_kernels
from locoprop.inner import TFRMSprop
from locoprop.update_rules import TFRMSpropRule

from conftest import bce_sum_mean, small_autoencoder

# pyproject's test extra installs Triton where it has wheels (Linux x86_64, as on CI); elsewhere this module skips
pytest.importorskip("triton", reason="Triton has no wheel for this platform (the test extra installs it on Linux "
                                     "x86_64)")


@pytest.fixture
def interpreted(monkeypatch):
    """Triton's interpreter on, the kernels on (a test may turn them off), both undone after the test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_kernels, "_DISABLED", [])
    assert triton_kernels.available(torch.device("cpu"))


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


def _train(steps=4, local_steps=3, dtype=torch.float32, solve_order="layer-major", **kwargs):
    torch.manual_seed(0)
    model = small_autoencoder(dtype)
    opt = locoprop.LocoProp(model, variant="M", lr=1e-2, activation_lr=1.0, local_steps=local_steps,
                            inner="tf_rmsprop", inner_kwargs={"momentum": 0.9, "alpha": 0.9, "eps": 1e-8},
                            output_transfer="sigmoid", backend="fused", solve_order=solve_order, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(16, 20, generator=gen, dtype=dtype)
        opt.step(lambda: bce_sum_mean(model(x), x))
    return model, opt


def _count_launches(monkeypatch):
    calls = []
    launch = triton_kernels.tf_rmsprop_update_

    def counted(params, *args):
        calls.append(len(params))
        return launch(params, *args)
    monkeypatch.setattr(triton_kernels, "tf_rmsprop_update_", counted)
    return calls


@pytest.mark.parametrize("order", ["layer-major", "iteration-major"])
def test_solver_with_triton_updates_equals_the_multi_tensor_solver(interpreted, monkeypatch, order):
    """LocoProp-M on the fast solver, several steps: weights and inner state with ``triton_update=True`` agree
    with ``triton_update=False`` to 1e-5 (issue 5's tolerance), and every update was one launch per layer."""
    calls = _count_launches(monkeypatch)
    m_ref, o_ref = _train(triton_update=False, solve_order=order)
    assert calls == []
    m_tri, o_tri = _train(triton_update=True, solve_order=order)
    layers = len(o_tri.layers)
    assert calls == [2] * (4 * 3 * layers)  # steps x T x layers, weights and bias together
    for p, q in zip(m_ref.parameters(), m_tri.parameters()):
        assert ((p - q).norm() / p.norm()).item() < 1e-5
        for key in ("mean_square", "momentum_buffer"):
            a, b = o_ref.inner.state[p][key], o_tri.inner.state[q][key]
            assert ((a - b).norm() / a.norm()).item() < 1e-5


def test_auto_uses_triton_on_cuda_only_and_keeps_tensors_it_does_not_take(interpreted, monkeypatch):
    """``triton_update=None`` never runs the interpreter on the CPU; float64 tensors keep the multi-tensor update
    even where the kernel is required (the same weights as without it, to the bit)."""
    calls = _count_launches(monkeypatch)
    _train(steps=1)
    assert calls == []
    m_req, _ = _train(steps=2, dtype=torch.float64, triton_update=True)
    m_off, _ = _train(steps=2, dtype=torch.float64, triton_update=False)
    assert calls == []
    assert all(torch.equal(p, q) for p, q in zip(m_req.parameters(), m_off.parameters()))


def _failing_on_launch(monkeypatch, which):
    """The kernel launcher, failing (before it changes anything, as a compilation error does) at launch
    ``which`` (1-based); the list of launches."""
    launch, calls = triton_kernels.tf_rmsprop_update_, []

    def fails(params, *args):
        calls.append(len(params))
        if len(calls) == which:
            raise RuntimeError("no kernel for this device")
        return launch(params, *args)
    monkeypatch.setattr(triton_kernels, "tf_rmsprop_update_", fails)
    return calls


def test_a_failing_kernel_leaves_the_other_layers_to_the_multi_tensor_update(interpreted, monkeypatch):
    """Three layers in one update (as the iteration-major order issues them) and a kernel that fails on the
    second: the second and third get the multi-tensor update, a warning names triton_update and the failure,
    the kernels stay off for the process, and every tensor is the multi-tensor update's."""
    calls = _failing_on_launch(monkeypatch, 2)
    rule = TFRMSpropRule(TFRMSprop([torch.zeros(1)], lr=1.0, alpha=0.9, momentum=0.5, eps=1e-8))
    rates = torch.tensor([0.1, 0.2, 0.3])
    layers = [(*_layer_tensors([(5, 4), (5,)], seed=m), (rates[m],)) for m in range(3)]
    ref = copy.deepcopy(layers)
    with pytest.warns(RuntimeWarning, match="triton_update: the TF-RMSProp kernel failed .RuntimeError: no kernel "
                                            "for this device.; the multi-tensor update runs from now on"):
        assert rule.update_layers_triton(layers)
    assert calls == [2, 2]
    assert triton_kernels.disabled_because() == "RuntimeError: no kernel for this device"
    assert not triton_kernels.available(torch.device("cpu"))
    rule.update_layers(ref)
    for (params, _, states, _), (rp, _, rs, _) in zip(layers, ref):
        assert _max_rel(params + [s for st in states for s in st], rp + [s for st in rs for s in st]) < 1e-6


def test_a_required_kernel_that_fails_raises_and_leaves_the_step_undone(interpreted, monkeypatch):
    """``triton_update=True``: a failing kernel raises an error naming triton_update, and the step changes no
    weight and no inner state (the optimizer's rollback)."""
    model, opt = _train(steps=1, triton_update=True)
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _failing_on_launch(monkeypatch, 3)
    x = torch.rand(16, 20)
    with pytest.raises(RuntimeError, match="triton_update: the TF-RMSProp kernel failed .RuntimeError: no kernel"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    after = (model.state_dict(), opt.state_dict())
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    for p, st in before[1]["state"].items():
        assert all(torch.equal(v, after[1]["state"][p][k]) for k, v in st.items() if torch.is_tensor(v))


def test_triton_update_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="triton_update: expected None, True or False, got 'yes'"):
        _train(steps=0, triton_update="yes")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, opt = _train(steps=0, triton_update=True)
    x = torch.rand(16, 20)
    with pytest.raises(RuntimeError, match="triton_update=True: the Triton kernels cannot run on cpu"):
        opt.step(lambda: bce_sum_mean(model(x), x))


@pytest.mark.parametrize("arch", [80, 90])
def test_kernel_compiles_for_ampere_and_hopper_with_rounded_division_and_root(arch):
    """The kernel as a GPU compiles it at its first launch (not the interpreter's reading of it), compiled here
    for the A100's and the H100/H200's architectures: PTX and a cubin, its division and square root the
    round-to-nearest instructions (as PyTorch's own kernels round)."""
    compiled = triton_kernels.compile_for(arch)
    ptx = compiled.asm["ptx"]
    assert f".target sm_{arch}" in ptx and len(compiled.asm["cubin"]) > 0
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
    assert "div.full" not in ptx and "sqrt.approx" not in ptx
