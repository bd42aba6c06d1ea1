"""The grouped order of the fast solver (``solve_order="grouped"``): iteration ``k`` of every layer in two Triton
launches, on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``).

On CUDA, where it is meant to run, ``tests/cuda/test_fused_cuda.py`` runs it against the reference loop; here the
kernels are checked against PyTorch's operations and the solver against its layer-major order, and both kernels
are compiled for the A100's and the H100/H200's architectures.
"""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import locoprop
from locoprop import triton_kernels
from locoprop.fused import FusedIterativeSolver
from locoprop.transfer import LeakyReLU

from conftest import bce_sum_mean, small_autoencoder

pytest.importorskip("triton", reason="Triton has no wheel for this platform (the test extra installs it on Linux "
                                     "x86_64)")


ALPHA, MOMENTUM, EPS = 0.9, 0.5, 1e-7
TRANSFERS = [lambda a, slope: a, lambda a, slope: torch.tanh(a), lambda a, slope: torch.sigmoid(a),
             lambda a, slope: LeakyReLU(slope).f(a)]  # the kernels' transfer codes 0, 1, 2, 3


def _layer(gen, rows, n_in, n_out, transfer, bias=True, steps=3, offset=0, form=False, device="cpu"):
    W = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
    b = torch.randn(n_out, generator=gen) if bias else None
    state = [torch.rand(n_out, n_in, generator=gen), 0.01 * torch.randn(n_out, n_in, generator=gen)]
    bias_state = [torch.rand(n_out, generator=gen), 0.01 * torch.randn(n_out, generator=gen)] if bias else None
    start = None
    if form:  # a₀, W₀, b₀: the update form's start, near the weights
        start = (torch.randn(rows, n_out, generator=gen), W + 0.01 * torch.randn(W.shape, generator=gen),
                 b + 0.01 * torch.randn(n_out, generator=gen) if bias else None)
    layer = triton_kernels.GroupedLayer(torch.randn(rows, n_in, generator=gen), W, b, state, bias_state,
                                        torch.rand(rows, n_out, generator=gen), torch.empty(rows, n_out), transfer,
                                        steps, offset, start)
    return layer if device == "cpu" else triton_kernels.GroupedLayer(*[  # the same values on the device
        t.to(device) if torch.is_tensor(t) else [u.to(device) for u in t] if isinstance(t, list) else
        tuple(u if u is None else u.to(device) for u in t) if isinstance(t, tuple) else t for t in layer])


def _rounded(precision):
    """What the kernels' products round their operands to (TF32 is float32 on the CPU)."""
    return (lambda t: t.bfloat16().float()) if precision == "bf16" else (lambda t: t)


def _expected_residual(lay, r):
    W, b = lay.weight, lay.bias
    if lay.start is None:
        pre = r(lay.x) @ r(W).T + (b if b is not None else 0.0)
    else:
        a0, W0, b0 = lay.start
        pre = a0 + r(lay.x) @ r(W - W0).T + (b - b0 if b is not None else 0.0)
    return TRANSFERS[lay.transfer](pre, lay.slope) - lay.target


def _expected_update(lay, r, lr):
    """TF-RMSProp's update of the weights and the bias from ``δᵀx`` and ``Σδ`` (``[(w, ms, m), ...]``)."""
    out = []
    grads = [r(lay.residual).T @ r(lay.x)] + ([lay.residual.sum(0)] if lay.bias is not None else [])
    for p, (ms, m), g in zip((lay.weight, lay.bias), (lay.weight_state, lay.bias_state or [None, None]), grads):
        ms = ms * ALPHA + (1 - ALPHA) * g * g
        m = m * MOMENTUM + g / torch.sqrt(ms + EPS) * lr
        out.append((p - m, ms, m))
    return out


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "tf32x3"])
@pytest.mark.parametrize("form", [False, True])
def test_grouped_kernels_are_the_residual_and_the_tf_rmsprop_update_of_every_layer(interpreted, precision, form):
    """Four layers of sizes that leave partial tiles, in one launch each: a tanh layer with a bias, a sigmoid
    one without, an identity one whose ``T = 1`` is spent at ``k = 1``, and a leaky ReLU layer (slope 0.1) of
    several tiles in each dimension of its weights.  The residual launch writes each
    layer's ``f(â) - y`` (plain or in the update form ``a₀ + x (W - W₀)ᵀ + (b - b₀)``, the products' operands
    rounded as the precision says), the update launch applies TF-RMSProp to the weights and bias from ``δᵀx``
    and ``Σδ`` at each layer's own rate, both within float32 rounding of PyTorch's operations; the spent
    layer is left as it was."""
    gen = torch.Generator().manual_seed(0)
    layers = [_layer(gen, 70, 50, 33, 1, offset=0, form=form), _layer(gen, 70, 33, 17, 2, bias=False, offset=4,
                                                                       form=form),
              _layer(gen, 70, 17, 5, 0, steps=1, offset=8, form=form),
              _layer(gen, 70, 130, 70, 3, offset=12, form=form)._replace(slope=0.1)]
    spent = [t.clone() for t in (layers[2].weight, layers[2].bias, layers[2].residual.fill_(7.0))]
    tiles = check_grouped_kernels(layers, precision, form, tolerance=1e-5, residual_max_abs=1e-5)
    assert tiles == (2 * 1 + 2 * 1 + 2 * 1 + 2 * 2, 1 * 1 + 1 * 1 + 1 * 1 + 2 * 3)
    assert all(torch.equal(a, b) for a, b in zip((layers[2].weight, layers[2].bias, layers[2].residual), spent))


def check_grouped_kernels(layers, precision: str, form: bool, tolerance: float, residual_max_abs: float | None = None,
                          k: int = 1) -> tuple[int, int]:
    """Iteration ``k``'s residual launch, then its update launch, over ``layers`` (whose rates lie at
    ``rate_offset`` in ``linspace(0.1, 1.6, 16)``): each layer whose ``T`` is not spent has its residual and its
    weights, bias and TF-RMSProp state within ``tolerance`` (relative) of PyTorch's operations on the same
    operands (rounded to bfloat16 first for bf16), and each residual within ``residual_max_abs`` of them element
    by element where given.  Returns the two launches' numbers of programs (tiles)."""
    assert triton_kernels.grouped_suits(layers)
    flat, residual_tiles, update_tiles = triton_kernels.grouped_table(layers)
    assert len(flat) == len(layers) * len(triton_kernels.GROUPED_COLUMNS)
    device = layers[0].x.device
    table = torch.tensor(flat, dtype=torch.int64, device=device)
    rates = torch.linspace(0.1, 1.6, 16, device=device)
    r = _rounded(precision)
    live = [lay for lay in layers if k < lay.steps]
    expected = [_expected_residual(lay, r) for lay in live]
    triton_kernels.grouped_residual_(table, len(layers), residual_tiles, k, form, precision)
    for lay, want in zip(live, expected):
        assert ((lay.residual - want).norm() / want.norm()).item() < tolerance
        assert residual_max_abs is None or (lay.residual - want).abs().max().item() < residual_max_abs
    expected = [_expected_update(lay, r, rates[lay.rate_offset + k]) for lay in live]
    triton_kernels.grouped_gradient_update_(table, len(layers), update_tiles, k, rates, ALPHA, MOMENTUM, EPS,
                                            precision)
    for lay, want in zip(live, expected):
        tensors = [(lay.weight, *lay.weight_state)] + ([(lay.bias, *lay.bias_state)] if lay.bias is not None else [])
        for got, wanted in zip(tensors, want):
            for a, b in zip(got, wanted):
                assert ((a - b).norm() / b.norm()).item() < tolerance
    return residual_tiles, update_tiles


def test_grouped_residual_at_iteration_0_is_the_kept_outputs_minus_their_targets(interpreted):
    """At ``k = 0`` the residual launch computes no product: a layer that gives its output ``ŷ`` gets ``ŷ - y``
    (Eq. 2), a layer that does not keeps the first residual its buffer holds."""
    gen = torch.Generator().manual_seed(2)
    given = _layer(gen, 70, 50, 33, 1)
    kept = _layer(gen, 70, 33, 17, 1)._replace(output=torch.rand(70, 17, generator=gen))
    given.residual.copy_(torch.randn(70, 33, generator=gen))
    first = given.residual.clone()
    flat, residual_tiles, _ = triton_kernels.grouped_table([given, kept])
    triton_kernels.grouped_residual_(torch.tensor(flat, dtype=torch.int64), 2, residual_tiles, 0, False, "fp32")
    assert torch.equal(given.residual, first)
    assert torch.equal(kept.residual, kept.output - kept.target)


def test_grouped_kernels_take_only_float32_contiguous_layers_all_or_none_in_the_update_form(interpreted):
    gen = torch.Generator().manual_seed(1)
    plain, form = _layer(gen, 8, 6, 4, 1), _layer(gen, 8, 4, 3, 1, form=True)
    assert triton_kernels.grouped_suits([plain]) and triton_kernels.grouped_suits([form])
    assert not triton_kernels.grouped_suits([plain, form])
    assert not triton_kernels.grouped_suits([plain._replace(x=plain.x.T.contiguous().T)])  # not contiguous
    assert not triton_kernels.grouped_suits([plain._replace(weight=plain.weight.double())])
    assert not triton_kernels.grouped_suits([plain._replace(target=plain.target[:, :3].contiguous())])
    assert not triton_kernels.grouped_suits([plain._replace(output=plain.target.T)])
    assert not triton_kernels.grouped_suits([])


def _train(order, steps=4, local_steps=3, variant="M", fp32_products="ieee", model=None, **kwargs):
    torch.manual_seed(0)
    model = small_autoencoder() if model is None else model
    opt = locoprop.LocoProp(model, variant=variant, lr=1e-2, activation_lr=1.0, local_steps=local_steps,
                            inner=kwargs.pop("inner", "tf_rmsprop"),
                            inner_kwargs=kwargs.pop("inner_kwargs", {"momentum": 0.9, "alpha": 0.9, "eps": 1e-8}),
                            output_transfer="sigmoid", backend="fused", solve_order=order, **kwargs)
    opt.fused_solver.grouped_fp32_products = fp32_products
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(16, 20, generator=gen)
        opt.step(lambda: bce_sum_mean(model(x), x))
    return model, opt


def _count_grouped_launches(monkeypatch):
    launches = []
    for name in ("grouped_residual_", "grouped_gradient_update_"):
        launch = getattr(triton_kernels, name)

        def counted(*args, launch=launch, name=name, **kwargs):
            launches.append((name, args[3]))  # the iteration k
            return launch(*args, **kwargs)
        monkeypatch.setattr(triton_kernels, name, counted)
    return launches


def _max_rel(model_a, model_b):
    return max(((p - q).norm() / p.norm()).item() for p, q in zip(model_a.parameters(), model_b.parameters()))


@pytest.mark.parametrize("variant", ["M", "S"])
def test_grouped_order_equals_the_layer_major_order_in_two_launches_an_iteration(interpreted, monkeypatch, variant):
    """LocoProp-M (tanh, identity and sigmoid layers: their matching losses) and LocoProp-S (the squared
    pre-activation loss), four steps of ``T = 3``: the weights within 1e-5 of the layer-major order's (issue 5's
    tolerance; the products sum in another order) and the inner state within 1e-4; every solve is a residual and
    an update launch for each iteration, for all layers at once (at ``k = 0`` the residual ``ŷ - y`` of
    LocoProp-M's tanh layers, which keep their output; LocoProp-S's first residuals are given: no launch), and
    no gradient buffer is made."""
    ref_model, ref = _train("layer-major", variant=variant, triton_elementwise=False)
    launches = _count_grouped_launches(monkeypatch)
    model, opt = _train("grouped", variant=variant, triton_elementwise=True)
    solve = [(name, k) for k in (0, 1, 2) for name in ("grouped_residual_", "grouped_gradient_update_")]
    assert launches == (solve if variant == "M" else solve[1:]) * 4
    assert opt.fused_solver.solve_order == "grouped"
    assert not any(key[0] in ("grad", "grad-shared") for key in opt.fused_solver._buffers)
    assert _max_rel(ref_model, model) < 1e-5
    for p, q in zip(ref_model.parameters(), model.parameters()):
        for key in ("mean_square", "momentum_buffer"):
            a, b = ref.inner.state[p][key], opt.inner.state[q][key]
            assert ((a - b).norm() / a.norm()).item() < 1e-4


def test_grouped_order_and_the_layer_major_kernels_take_relu_and_leaky_relu_layers(interpreted, monkeypatch):
    """LocoProp-M on an MLP of ReLU and leaky ReLU layers (the residual kernels' code 3 with each layer's slope):
    the grouped order and the layer-major order with the Triton kernels both within 1e-5 of the layer-major
    order with PyTorch's operations over four steps, with no fallback."""
    def relu_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12),
                                   torch.nn.LeakyReLU(0.1), torch.nn.Linear(12, 20))

    residuals = []
    residual = triton_kernels.residual_

    def counted(pre, target, bias_grad, transfer, **kwargs):
        residuals.append((transfer, kwargs.get("slope", 0.0)))
        return residual(pre, target, bias_grad, transfer, **kwargs)
    monkeypatch.setattr(triton_kernels, "residual_", counted)
    models = {}
    for name, order, triton in [("torch", "layer-major", False), ("kernels", "layer-major", True),
                                ("grouped", "grouped", True)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            models[name], opt = _train(order, model=relu_model(), triton_elementwise=triton)
        assert opt.fused_solver.solve_order == order
    assert {3} <= {t for t, _ in residuals} and (3, 0.1) in residuals and (3, 0.0) in residuals
    assert _max_rel(models["torch"], models["kernels"]) < 1e-5
    assert _max_rel(models["torch"], models["grouped"]) < 1e-5


def test_grouped_order_in_bf16_rounds_the_products_operands_in_the_update_form(interpreted):
    """bf16 local products: the grouped order keeps the update form (the start ``a₀, W₀, b₀`` kept by the step) and
    lands within 1e-3 of the layer-major bf16 solve (which on the CPU also rounds each product's result to bf16)
    and of the FP32 one, and not on the FP32 one: its operands were rounded."""
    fp32, _ = _train("grouped", triton_elementwise=True)
    grouped, opt = _train("grouped", triton_elementwise=True, precision="bf16")
    layer_major, _ = _train("layer-major", triton_elementwise=False, precision="bf16")
    assert opt.fused_solver.rounds_products(cuda=False)
    assert _max_rel(layer_major, grouped) < 1e-3 and _max_rel(fp32, grouped) < 1e-3
    assert _max_rel(fp32, grouped) > 1e-7


def test_grouped_order_falls_back_to_the_layer_major_order_with_a_warning_once(interpreted):
    """Where the grouped kernels cannot run (torch's Adam as the inner optimizer; on the CPU without
    ``triton_elementwise=True``), each solve runs in the layer-major order, the same steps to the bit, and one
    warning names why."""
    for kwargs, why in [({"inner": "adam", "inner_kwargs": {}, "triton_elementwise": True},
                         "its update is TF-RMSProp's, not AdamRule's"),
                        ({}, "the Triton kernels do not run on cpu .triton_elementwise=None.")]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, opt = _train("grouped", **kwargs)
        messages = [str(w.message) for w in caught if "grouped" in str(w.message)]
        assert len(messages) == 1 and re.search(f"order='grouped' cannot run here \\({why}\\); these solves run "
                                                "in the layer-major order", messages[0]), messages
        assert opt.fused_solver.solve_order == "layer-major"
        ref_model, _ = _train("layer-major", **kwargs)
        assert all(torch.equal(p, q) for p, q in zip(ref_model.parameters(), model.parameters()))


def test_a_grouped_kernel_that_fails_to_compile_leaves_the_step_to_the_layer_major_order(interpreted, monkeypatch):
    """A compilation that fails (before anything ran): required (``triton_elementwise=True``), the step raises an
    error naming ``triton_elementwise`` and leaves the weights and inner state as they were; otherwise (the
    kernels allowed, as on CUDA by default) a warning, the grouped kernels off for the process (the other
    kernels on), and this and later solves in the layer-major order, the same steps to the bit as that
    order's, with a warning that says why."""
    model, opt = _train("grouped", steps=1, triton_elementwise=True)
    before = ([p.clone() for p in model.parameters()],
              [t.clone() for st in opt.inner.state.values() for t in st.values() if torch.is_tensor(t)])

    def fails(*args, **kwargs):
        raise RuntimeError("no kernel for this device")
    monkeypatch.setattr(triton_kernels, "grouped_compile", fails)
    x = torch.rand(16, 20)
    with pytest.raises(RuntimeError, match="triton_elementwise: the grouped kernel failed .RuntimeError: no kernel"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    after = [t for st in opt.inner.state.values() for t in st.values() if torch.is_tensor(t)]
    assert all(torch.equal(a, b) for a, b in zip(before[1], after))

    monkeypatch.setattr(FusedIterativeSolver, "uses_triton", lambda self, device: True)  # as on CUDA by default
    monkeypatch.setattr(triton_kernels, "_GROUPED_DISABLED", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt = _train("grouped", triton_elementwise=None)
    messages = [str(w.message) for w in caught]
    assert any("the grouped kernel failed (RuntimeError: no kernel for this device); the layer-major order runs in "
               "place of the grouped one from now on" in m for m in messages), messages
    assert any("order='grouped' cannot run here (the grouped kernels failed in this process (RuntimeError: no "
               "kernel for this device))" in m for m in messages), messages
    assert triton_kernels.grouped_disabled_because() == "RuntimeError: no kernel for this device"
    assert triton_kernels.disabled_because() is None and triton_kernels.available(torch.device("cpu"))
    ref_model, _ = _train("layer-major", triton_elementwise=None)  # the layer-major order's Triton kernels
    assert all(torch.equal(p, q) for p, q in zip(ref_model.parameters(), model.parameters()))


def test_grouped_tables_are_made_once_per_layout(interpreted):
    """The kernels' table of a set of layers is kept by its contents: a training loop whose tensors recur at the
    same addresses makes it once."""
    solver = FusedIterativeSolver(order="grouped")
    flat = list(range(24))
    table = solver._grouped_device_table(flat, torch.device("cpu"))
    assert table.tolist() == flat and solver._grouped_device_table(list(flat), torch.device("cpu")) is table
    assert solver._grouped_device_table(flat[::-1], torch.device("cpu")) is not table


def test_grouped_order_checks_how_it_computes_float32_products(interpreted):
    """``grouped_fp32_products``: "ieee" or "tf32x3" (on the CPU the interpreter's products are float32's either
    way: the same steps to the bit; with bf16 products it plays no part); anything else is refused with an error
    that names it, before the solve changes anything."""
    ieee, _ = _train("grouped", triton_elementwise=True)
    model, opt = _train("grouped", triton_elementwise=True, fp32_products="tf32x3")
    assert all(torch.equal(p, q) for p, q in zip(ieee.parameters(), model.parameters()))
    bf16, _ = _train("grouped", triton_elementwise=True, precision="bf16")  # not FP32: the setting plays no part
    also, _ = _train("grouped", triton_elementwise=True, precision="bf16", fp32_products="tf32x3")
    assert all(torch.equal(p, q) for p, q in zip(bf16.parameters(), also.parameters()))
    opt.fused_solver.grouped_fp32_products = "fast"
    before = [p.clone() for p in model.parameters()]
    x = torch.rand(16, 20)
    with pytest.raises(ValueError, match="grouped_fp32_products: expected 'ieee' or 'tf32x3', got 'fast'"):
        opt.step(lambda: bce_sum_mean(model(x), x))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


_COMPILE_SCRIPT = """
import json, sys
from locoprop import triton_kernels
arch = int(sys.argv[1])
out = {}
for kernel in ("grouped_residual", "grouped_gradient_update"):
    for precision in ("fp32", "tf32", "bf16", "tf32x3"):
        for form in ((False, True) if kernel == "grouped_residual" and precision in ("fp32", "tf32") else (False,)):
            compiled = triton_kernels.compile_for(arch, kernel, change=form, precision=precision)
            assert len(compiled.asm["cubin"]) > 0
            out[f"{kernel}-{precision}{'-form' if form else ''}"] = compiled.asm["ptx"]
json.dump(out, sys.stdout)
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_grouped_kernels_compile_with_tensor_core_products_for_tf32_and_bf16_and_rounded_division(arch):
    """Both kernels as a GPU compiles them (not the interpreter's reading), for the A100's and the H100/H200's
    architectures: TF32 and bf16 products on the tensor cores (``mma``; Hopper's ``wgmma``), FP32 products in
    float32 on the CUDA cores (no tensor-core instruction: IEEE products), the update's division and square root
    rounded to nearest, tanh CUDA's accurate one, and no atomics (the same sums from run to run).  FP32 emulated
    by three TF32 products (``"tf32x3"``) is on the tensor cores too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ptx = json.loads(done.stdout)
    for name, text in ptx.items():
        assert f".target sm_{arch}" in text and "atom." not in text and "tanh.approx" not in text, name
        tensor_cores = re.search(r"\bw?gmma\b|\bmma\.sync", text) is not None
        assert tensor_cores == ("-fp32" not in name), name
        if "-tf32" in name:
            assert "tf32" in text, name
        if "-bf16" in name:
            assert "bf16" in text, name
        if name.startswith("grouped_gradient_update"):
            assert re.search(r"div\.rn(\.ftz)?\.f32", text) and re.search(r"sqrt\.rn(\.ftz)?\.f32", text), name
            assert "div.full" not in text and "sqrt.approx" not in text, name
    if arch == 90:
        assert "wgmma" in ptx["grouped_residual-tf32"] and "wgmma" in ptx["grouped_gradient_update-bf16"]


def test_a_retired_staging_is_let_go_after_a_wait_for_its_device(monkeypatch):
    """``GroupedStaging.retire`` (what a captured step dropped with its graph calls, from a finaliser) makes no
    CUDA call; the retired stagings are let go when the next staging is made, after one wait for each of their
    devices (stand-ins for the CUDA calls here; tests/cuda runs the real ones)."""
    from types import SimpleNamespace

    from locoprop.fused import GroupedStaging

    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    monkeypatch.setattr(GroupedStaging, "_retired", [])
    for device in ("cuda:0", "cuda:1", "cuda:0"):
        GroupedStaging.retire(SimpleNamespace(device=device))
    GroupedStaging.retire(None)
    assert waits == [] and len(GroupedStaging._retired) == 3
    GroupedStaging._let_retired_go()
    assert sorted(waits) == ["cuda:0", "cuda:1"] and GroupedStaging._retired == []
    GroupedStaging._let_retired_go()
    assert len(waits) == 2
