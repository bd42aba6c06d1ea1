"""Transfer functions of Table 2: F' = f, Bregman divergence properties (Sec. 2.2.1), inverses, conjugates."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import spence

from locoprop.transfer import TRANSFER_FUNCTIONS, NoInverseError, Softplus, get_transfer, transfer_from_module

NAMES = sorted(set(TRANSFER_FUNCTIONS) - {"identity"})
floats = st.floats(min_value=-8.0, max_value=8.0, allow_nan=False, allow_infinity=False)
vectors = st.lists(floats, min_size=4, max_size=4)


def _t(values):
    return torch.tensor(values, dtype=torch.float64).reshape(1, -1)


# where f is not differentiable (F' = f still holds there; autograd's choice of a one-sided derivative need not)
KINKS = {"step": (0.0,), "relu": (0.0,), "leaky_relu": (0.0,), "elu": (0.0,), "selu": (0.0,), "hardtanh": (-1.0, 1.0),
         "relu6": (0.0, 6.0), "hardsigmoid": (-3.0, 3.0)}


def _away_from_kinks(name, a):
    return all(bool(((a - k).abs() > 1e-3).all()) for k in KINKS.get(name, ()))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(a=vectors)
def test_F_prime_is_f(name, a):
    """F' = f by central finite differences (Table 2)."""
    t = get_transfer(name)
    a = _t(a)
    if not _away_from_kinks(name, a):
        return
    h = 1e-6
    eye = torch.eye(a.shape[1], dtype=a.dtype)
    fd = torch.stack([(t.F(a + h * eye[i]) - t.F(a - h * eye[i])) / (2 * h) for i in range(a.shape[1])], -1)
    torch.testing.assert_close(fd, t.f(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(a_hat=vectors, a=vectors)
def test_bregman_divergence_properties(name, a_hat, a):
    """D_F ≥ 0, D_F(a, a) = 0 and ∇_â D_F(â, a) = f(â) - f(a) by autograd (Eqs. 2, 5)."""
    t = get_transfer(name)
    a_hat, a = _t(a_hat), _t(a)
    assert (t.bregman(a_hat, a) >= -1e-9).all()
    torch.testing.assert_close(t.bregman(a, a), torch.zeros(1, dtype=a.dtype), atol=1e-9, rtol=0)
    if not _away_from_kinks(name, a_hat):
        return
    x = a_hat.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(t.bregman(x, a).sum(), x)
    torch.testing.assert_close(g, t.f(a_hat) - t.f(a), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in NAMES if get_transfer(n).strictly_increasing])
@settings(max_examples=40, deadline=None)
@given(a=st.lists(st.floats(min_value=-4.0, max_value=4.0), min_size=4, max_size=4), shift=vectors)
def test_inverse_and_matching_loss_from_post_target(name, a, shift):
    """f⁻¹(f(a)) = a, and F(â) - yᵀâ + F*(y) = D_F(â, f⁻¹(y)) for y in the range (Property II)."""
    t = get_transfer(name)
    a, a_hat = _t(a), _t(a) + 0.3 * _t(shift)
    y = t.f(a)
    if name == "softmax":
        torch.testing.assert_close(t.f(t.inverse(y)), y)
    else:
        torch.testing.assert_close(t.inverse(y), a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t.matching_loss(a_hat, y), t.bregman(a_hat, t.inverse(y)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(a=vectors, y_from=vectors)
def test_fenchel_young(name, a, y_from):
    """F(a) + F*(f(a)) = aᵀf(a), and F(a) + F*(y) ≥ aᵀy for any y in the range of f (Property II): checks the
    conjugates of the functions without an inverse too."""
    t = get_transfer(name)
    a = _t(a)
    torch.testing.assert_close(t.F(a) + t.conjugate(t.f(a)), (a * t.f(a)).sum(-1), rtol=1e-7, atol=1e-7)
    y = t.f(_t(y_from))
    assert (t.F(a) + t.conjugate(y) >= (a * y).sum(-1) - 1e-7 * (1 + (a * y).abs().sum())).all()


@pytest.mark.parametrize("module", [torch.nn.Hardtanh(-2.0, 3.0), torch.nn.ReLU6(), torch.nn.Hardsigmoid(),
                                    torch.nn.SELU(), torch.nn.CELU(0.5), torch.nn.Softsign(), torch.nn.LogSigmoid(),
                                    torch.nn.Softplus(beta=2.5), torch.nn.ELU(0.3), torch.nn.LeakyReLU(0.2)],
                         ids=repr)
def test_activation_modules_are_the_transfer_functions_they_compute(module):
    """Each monotone activation module of torch.nn maps to a transfer function with the module's ``f`` and
    whose ``F`` integrates it (the F' = f test above covers the registered defaults)."""
    t = transfer_from_module(module)
    a = torch.linspace(-9, 9, 723, dtype=torch.float64).reshape(3, -1)
    torch.testing.assert_close(t.f(a), module(a), rtol=1e-12, atol=1e-12)
    h, b = 1e-6, torch.linspace(-7.9, 7.9, 37, dtype=torch.float64).reshape(-1, 1)
    torch.testing.assert_close((t.F(b + h) - t.F(b - h)) / (2 * h), t.f(b).flatten(), rtol=1e-6, atol=1e-6)


def test_non_monotone_activations_are_not_transfer_functions():
    for module in (torch.nn.GELU(), torch.nn.SiLU(), torch.nn.Mish(), torch.nn.Hardswish()):
        assert transfer_from_module(module) is None
    with pytest.raises(ValueError, match="GELU is not a known monotone transfer function; valid modules are Tanh"):
        get_transfer(torch.nn.GELU())


@pytest.mark.parametrize("name", ["step", "relu", "relu6", "hardtanh", "hardsigmoid"])
def test_non_strict_functions_have_no_inverse(name):
    with pytest.raises(NoInverseError, match=name):
        get_transfer(name).inverse(torch.ones(1, 3))


@pytest.mark.parametrize("name", NAMES)
def test_matching_loss_is_finite_when_target_leaves_the_range(name):
    """An MD target can leave the range of f; the reported value stays finite, its gradient is f(â) - y."""
    t = get_transfer(name)
    a_hat = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = t.f(a_hat.detach()) + 3.0 * torch.randn(5, 4, dtype=torch.float64)  # often outside the range
    value = t.matching_loss(a_hat, y)
    assert torch.isfinite(value).all()
    (g,) = torch.autograd.grad(value.sum(), a_hat)
    torch.testing.assert_close(g, t.f(a_hat.detach()) - y)


def test_softplus_integral_matches_scipy_dilogarithm():
    """F(a) = -Li₂(-e^a), Li₂(z) = spence(1 - z)."""
    a = torch.linspace(-40, 40, 801, dtype=torch.float64).reshape(-1, 1)
    expected = torch.tensor([-spence(1 + math.exp(v)) for v in a.flatten().tolist()], dtype=torch.float64)
    torch.testing.assert_close(Softplus().F(a), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_jacobian_transpose_product_matches_autograd(name):
    t = get_transfer(name)
    a = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, 5, dtype=torch.float64)
    (expected,) = torch.autograd.grad(t.f(a), a, v)
    torch.testing.assert_close(t.jacobian_t_vec(a.detach(), v), expected)


def test_unknown_transfer_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid names"):
        get_transfer("gelu")


def test_the_quick_tanh_is_within_two_float32_ulps_of_one_everywhere():
    """``Tanh.quick()`` evaluates ``f_`` as ``2σ(2a) - 1``: an absolute error below 2e-7 against ``tanh`` in
    float64, over the whole line (its ends, zero and the smallest numbers included), NaN kept; ``f`` itself
    stays ``torch.tanh``, and every other function is its own quick form."""
    from locoprop.transfer import Tanh, TanhViaSigmoid

    quick = get_transfer("tanh").quick()
    assert isinstance(quick, TanhViaSigmoid) and quick.name == "tanh" and quick.quick() is quick
    a = torch.cat([torch.linspace(-20, 20, 200_001), torch.logspace(-40, 2, 2001), -torch.logspace(-40, 2, 2001),
                   torch.tensor([0.0, -0.0, 1e30, -1e30, math.inf, -math.inf])])
    exact = torch.tanh(a.double())
    got = quick.f_(a.clone())
    assert (got.double() - exact).abs().max().item() < 2e-7
    assert (got.abs() <= 1).all()
    assert torch.isnan(quick.f_(torch.tensor([math.nan]))).all()
    assert torch.equal(quick.f(a), torch.tanh(a)) and torch.equal(Tanh().f_(a.clone()), torch.tanh(a))
    for name in TRANSFER_FUNCTIONS:
        if name != "tanh":
            t = get_transfer(name)
            assert t.quick() is t, name
