r"""Transfer functions and their matching losses (paper Sec. 2.2 and Table 2).

A transfer function ``f`` is an elementwise non-decreasing map applied to a
layer's pre-activation ``a``.  Its *convex integral* ``F`` (with ``f = ∇F``)
induces the Bregman divergence (Eq. 5)::

    D_F(â, a) = F(â) - F(a) - f(a)ᵀ (â - a)

which is the *matching loss* of ``f`` (Eq. 1).  Every transfer function here
provides ``f``, ``F``, ``D_F``, the Jacobian-transpose product ``J_f(a)ᵀ v``
(Eqs. 17 and 19), the inverse ``f⁻¹`` where it exists, and the Fenchel
conjugate ``F*`` (Property II), used to report the matching loss from a
post-activation target ``y`` as ``F(â) - yᵀâ + F*(y)`` (equal to
``D_F(â, f⁻¹(y))`` whenever ``y`` lies in the range of ``f``).

All functions act on the last dimension; ``F``, ``F*`` and ``D_F`` return one
value per row (summed over the last dimension).

To add a transfer function, subclass :class:`TransferFunction`, implement
``f``, ``F`` and (if it has one) ``inverse``/``conjugate``, and call
:func:`register_transfer`.  See ``docs/components.md``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as Fn

__all__ = [
    "TransferFunction",
    "Step",
    "Linear",
    "LeakyReLU",
    "ReLU",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "Arctan",
    "Softplus",
    "ELU",
    "ClampedLinear",
    "Scaled",
    "Softsign",
    "LogSigmoid",
    "MONOTONE_MODULES",
    "TRANSFER_FUNCTIONS",
    "register_transfer",
    "get_transfer",
    "NoInverseError",
    "is_new_tensor",
]


def is_new_tensor(out: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``out``, computed from ``source`` (``f(a)``, say), is a tensor of its own that may be written
    in place: no memory shared with ``source`` (the identity returns ``source`` itself) and no autograd
    history (an in-place change would spoil a backward pass through it)."""
    return not out.requires_grad and out.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()


class NoInverseError(ValueError):
    """Raised by :meth:`TransferFunction.inverse` when ``f`` is not invertible."""


class TransferFunction:
    """An elementwise non-decreasing transfer function ``f = ∇F`` (Table 2).

    Attributes:
        name: registry name.
        strictly_increasing: ``D_F(â, a) = 0`` only if ``â = a`` (Property III).
        elementwise: ``f`` acts on each coordinate alone (all but softmax).
        range: ``(low, high)`` of ``f`` (closed ends where attained).
    """

    name: str = "transfer"
    strictly_increasing: bool = True
    elementwise: bool = True
    range: tuple[float, float] = (-math.inf, math.inf)

    # -- the three functions of Table 2 -------------------------------------------------
    def f(self, a: torch.Tensor) -> torch.Tensor:
        """The transfer function ``f(a)``."""
        raise TypeError(f"{type(self).__name__} does not define f")

    def f_(self, a: torch.Tensor) -> torch.Tensor:
        """``f(a)`` written into ``a`` (the fast solver's scratch buffers); returns ``a``."""
        return a.copy_(self.f(a))

    def quick(self) -> "TransferFunction":
        """This function with an in-place :meth:`f_` by the quickest route PyTorch has on the CPU, to within
        a few float32 ulps of the range's scale rather than of ``f(a)`` itself: for local iterations whose
        products round much more than that (the fast solver's bf16 products on the CPU,
        :attr:`locoprop.fused.FusedIterativeSolver.quick_transfers`).  ``self`` where none is quicker."""
        return self

    def F(self, a: torch.Tensor) -> torch.Tensor:  # noqa: N802 - the paper's name
        """The convex integral ``F(a)`` (Table 2), summed over the last dimension."""
        raise TypeError(f"{type(self).__name__} does not define F")

    def bregman(self, a_hat: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Matching loss ``D_F(â, a) = F(â) - F(a) - f(a)ᵀ(â - a)`` (Eq. 5), per row."""
        return self.F(a_hat) - self.F(a) - (self.f(a) * (a_hat - a)).sum(-1)

    # -- derivatives ----------------------------------------------------------------------
    def derivative(self, a: torch.Tensor) -> torch.Tensor:
        """Elementwise ``f'(a)`` (the diagonal of the Jacobian)."""
        a = a.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.f(a).sum(), a)
        return g

    def jacobian_t_vec(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``J_f(a)ᵀ v`` row by row (used by Eqs. 17 and 19)."""
        return self.derivative(a) * v

    def pullback_to_post(self, a: torch.Tensor, grad_pre: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
        """A ``g_y`` with ``J_f(a)ᵀ g_y = grad_pre`` (gradient w.r.t. the post-activation).

        Used only when the post-activation is not a tensor of the model (the last
        layer, whose transfer function lives inside the loss).  Where
        ``f'(a) = 0`` the pre-activation gradient is zero and so is the result.
        """
        d = self.derivative(a)
        safe = torch.where(d.abs() > eps, d, torch.ones_like(d))
        return torch.where(d.abs() > eps, grad_pre / safe, torch.zeros_like(grad_pre))

    # -- inverse and conjugate -------------------------------------------------------------
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``f⁻¹(y)``; raises :class:`NoInverseError` when ``f`` is not invertible."""
        raise NoInverseError(f"transfer function {self.name!r} has no inverse (it is not strictly increasing)")

    def clamp_to_range(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` clamped into the range of ``f`` (open ends kept a hair inside)."""
        lo, hi = self.range
        tiny = torch.finfo(y.dtype).eps if y.is_floating_point() else 1e-7
        if math.isfinite(lo):
            lo_c = lo if self._closed_low else lo + tiny * max(1.0, abs(lo))
            y = y.clamp(min=lo_c)
        if math.isfinite(hi):
            hi_c = hi if self._closed_high else hi - tiny * max(1.0, abs(hi))
            y = y.clamp(max=hi_c)
        return y

    _closed_low = False
    _closed_high = False

    def conjugate(self, y: torch.Tensor) -> torch.Tensor:
        """Fenchel conjugate ``F*(y) = sup_a yᵀa - F(a)`` (Property II), per row.

        Evaluated at ``y`` clamped into the range of ``f`` (see
        :meth:`matching_loss`).  The default uses ``a = f⁻¹(y)``.
        """
        y = self.clamp_to_range(y)
        a = self.inverse(y)
        return (y * a).sum(-1) - self.F(a)

    def matching_loss(self, a_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Matching loss against a post-activation target ``y`` (Eqs. 1, 5, 7), per row.

        ``F(â) - yᵀâ + F*(y)``, which equals ``D_F(â, f⁻¹(y))`` when ``y`` is in
        the range of ``f``.  An MD target can leave the range (a tanh target
        outside (-1, 1)); ``D_F`` is then +∞ in theory, and the constant
        ``F*(y)`` is evaluated at ``y`` clamped into the range, so the value
        stays finite and its gradient ``f(â) - y`` (Eq. 2) is exact.
        """
        return self.F(a_hat) - (y * a_hat).sum(-1) + self.conjugate(y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _xlogy_sum(y: torch.Tensor) -> torch.Tensor:
    return torch.xlogy(y, y).sum(-1)


class Step(TransferFunction):
    """Step function ``f(a) = (1 + sign a)/2``, ``F(a) = Σ max(a, 0)`` (Table 2)."""

    name = "step"
    strictly_increasing = False
    range = (0.0, 1.0)
    _closed_low = _closed_high = True

    def f(self, a):
        return 0.5 * (1.0 + torch.sign(a))

    def F(self, a):
        return a.clamp(min=0).sum(-1)

    def derivative(self, a):
        return torch.zeros_like(a)

    def conjugate(self, y):
        # F*(y) = 0 on [0, 1]: sup_a (y a - max(a, 0)) is attained at a = 0.
        return torch.zeros(y.shape[:-1], dtype=y.dtype, device=y.device)


class Linear(TransferFunction):
    """Identity ``f(a) = a``, ``F(a) = ½‖a‖²``; ``D_F`` is the squared loss (Table 2)."""

    name = "linear"

    def f(self, a):
        return a

    def f_(self, a):
        return a

    def F(self, a):
        return 0.5 * (a * a).sum(-1)

    def derivative(self, a):
        return torch.ones_like(a)

    def inverse(self, y):
        return y

    def conjugate(self, y):
        return 0.5 * (y * y).sum(-1)


class LeakyReLU(TransferFunction):
    """``f(a) = max(a, 0) - β max(-a, 0)``, ``F(a) = ½ Σ a f(a)`` (Table 2), ``β ≥ 0``."""

    name = "leaky_relu"

    def __init__(self, negative_slope: float = 0.01) -> None:
        if negative_slope < 0:
            raise ValueError(f"negative_slope must be >= 0 for a non-decreasing transfer function, got {negative_slope}")
        self.beta = float(negative_slope)
        self.strictly_increasing = self.beta > 0
        self.range = (-math.inf, math.inf) if self.beta > 0 else (0.0, math.inf)
        self._closed_low = self.beta == 0

    def f(self, a):
        return a.clamp(min=0) - self.beta * (-a).clamp(min=0)

    def F(self, a):
        return 0.5 * (a * self.f(a)).sum(-1)

    def derivative(self, a):
        return torch.where(a > 0, torch.ones_like(a), torch.full_like(a, self.beta))

    def inverse(self, y):
        if self.beta == 0:
            return super().inverse(y)
        return torch.where(y >= 0, y, y / self.beta)

    def conjugate(self, y):
        y = self.clamp_to_range(y)
        pos = 0.5 * y.clamp(min=0) ** 2
        neg = 0.5 * y.clamp(max=0) ** 2 / self.beta if self.beta > 0 else torch.zeros_like(y)
        return (pos + neg).sum(-1)

    def __repr__(self):
        return f"{type(self).__name__}(negative_slope={self.beta})"


class ReLU(LeakyReLU):
    """``f(a) = max(a, 0)``: leaky ReLU with ``β = 0``; non-decreasing, not strictly (Fig. 2b)."""

    name = "relu"

    def __init__(self) -> None:
        super().__init__(0.0)

    def __repr__(self):
        return "ReLU()"


class Sigmoid(TransferFunction):
    """``f(a) = 1/(1 + e^{-a})``, ``F(a) = Σ a + log(1 + e^{-a}) = Σ softplus(a)`` (Table 2).

    Its matching loss against ``y ∈ [0, 1]`` is the logistic loss minus the
    entropy of ``y``: with binary ``y`` exactly sigmoid cross-entropy.
    """

    name = "sigmoid"
    range = (0.0, 1.0)
    _closed_low = _closed_high = True  # F* is finite on [0, 1]

    def f(self, a):
        return torch.sigmoid(a)

    def f_(self, a):
        return a.sigmoid_()

    def F(self, a):
        return Fn.softplus(a).sum(-1)

    def derivative(self, a):
        s = torch.sigmoid(a)
        return s * (1 - s)

    def inverse(self, y):
        return torch.logit(y)

    def conjugate(self, y):
        y = self.clamp_to_range(y)
        return (torch.xlogy(y, y) + torch.xlogy(1 - y, 1 - y)).sum(-1)


class Softmax(TransferFunction):
    """``f(a) = exp(a)/Σ exp(a)``, ``F(a) = log Σ exp(a)`` (Table 2); not elementwise.

    ``f⁻¹(y) = log y - mean(log y)`` (Sec. 2.2.1); ``F*(y) = Σ y log y`` on the simplex.
    """

    name = "softmax"
    elementwise = False
    range = (0.0, 1.0)
    _closed_low = _closed_high = True

    def f(self, a):
        return torch.softmax(a, dim=-1)

    def F(self, a):
        return torch.logsumexp(a, dim=-1)

    def derivative(self, a):
        raise TypeError("softmax is not elementwise: use jacobian_t_vec")

    def jacobian_t_vec(self, a, v):
        y = torch.softmax(a, dim=-1)
        return y * (v - (y * v).sum(-1, keepdim=True))

    def pullback_to_post(self, a, grad_pre, eps: float = 1e-12):
        # J = diag(y) - y yᵀ; for a softmax output gradient (rows summing to 0),
        # g_y = grad_pre / y solves Jᵀ g_y = grad_pre.
        y = torch.softmax(a, dim=-1)
        return grad_pre / y.clamp(min=eps)

    def inverse(self, y):
        logy = torch.log(y)
        return logy - logy.mean(-1, keepdim=True)

    def conjugate(self, y):
        return _xlogy_sum(self.clamp_to_range(y))


class Tanh(TransferFunction):
    """``f(a) = tanh a``, ``F(a) = Σ log cosh a`` (Table 2)."""

    name = "tanh"
    range = (-1.0, 1.0)
    _closed_low = _closed_high = True  # F*(±1) = log 2 is finite

    def f(self, a):
        return torch.tanh(a)

    def f_(self, a):
        return a.tanh_()

    def F(self, a):
        # log cosh a = |a| + log1p(exp(-2|a|)) - log 2, stable for large |a|.
        x = a.abs()
        return (x + torch.log1p(torch.exp(-2 * x)) - math.log(2.0)).sum(-1)

    def derivative(self, a):
        return 1 - torch.tanh(a) ** 2

    def inverse(self, y):
        return torch.atanh(y)

    def conjugate(self, y):
        # F*(y) = y atanh y + ½ log(1 - y²) = ½[(1+y) log(1+y) + (1-y) log(1-y)].
        y = self.clamp_to_range(y)
        return 0.5 * (torch.xlogy(1 + y, 1 + y) + torch.xlogy(1 - y, 1 - y)).sum(-1)

    def quick(self):
        return TanhViaSigmoid()


class TanhViaSigmoid(Tanh):
    """``tanh``, its in-place :meth:`f_` (the local iterations' ``f(â)``) evaluated as ``2σ(2a) - 1``.

    PyTorch's CPU ``tanh`` is not vectorized (its ``sigmoid`` is), and T = 10 local iterations of the standard
    autoencoder at batch 1000 evaluate it for 35 million values a step (``results/interleaved-time/``: the bf16
    step with and without it, ``-exacttanh``).  The logistic form's error is absolute, within 2e-7 (1.5
    float32 ulps of 1, where ``tanh``'s is half an ulp of its value), and ``δ = f(â) - y`` is a difference of two
    activations: one step of the MNIST autoencoder moves by 1.9e-6 of itself in FP32, and lands as far from
    the FP32 step in bf16 as with ``torch.tanh`` (``results/precision-error/``, modes ``fp32-quick-tanh`` and
    ``bf16-exact-tanh``).  :meth:`Tanh.quick` gives it; ``f``, and so targets, losses and the reference loop,
    stay ``torch.tanh``."""

    def f_(self, a):
        return a.mul_(2).sigmoid_().mul_(2).sub_(1)

    def quick(self):
        return self


class Arctan(TransferFunction):
    """``f(a) = arctan a``, ``F(a) = Σ a arctan a - log √(1 + a²)`` (Table 2)."""

    name = "arctan"
    range = (-math.pi / 2, math.pi / 2)

    def f(self, a):
        return torch.atan(a)

    def F(self, a):
        return (a * torch.atan(a) - 0.5 * torch.log1p(a * a)).sum(-1)

    def derivative(self, a):
        return 1 / (1 + a * a)

    def inverse(self, y):
        return torch.tan(y)

    def conjugate(self, y):
        # F*(y) = -log cos y on (-π/2, π/2).
        return -torch.log(torch.cos(self.clamp_to_range(y))).sum(-1)


# Bernoulli numbers B_0..B_20 (B_1 = -1/2) for the dilogarithm series below.
_BERNOULLI = [1.0, -0.5, 1 / 6, 0.0, -1 / 30, 0.0, 1 / 42, 0.0, -1 / 30, 0.0, 5 / 66, 0.0,
              -691 / 2730, 0.0, 7 / 6, 0.0, -3617 / 510, 0.0, 43867 / 798, 0.0, -174611 / 330]
_BERNOULLI_SERIES = [(k, b / math.factorial(k + 1)) for k, b in enumerate(_BERNOULLI) if b != 0.0]


def _dilog_neg(u: torch.Tensor) -> torch.Tensor:
    """``Li₂(-u)`` for ``u ∈ [0, 1]``, by the Bernoulli series in ``w = -log(1 + u)``.

    ``Li₂(z) = Σ_k B_k w^{k+1}/(k+1)!`` with ``w = -log(1 - z)``; here
    ``|w| ≤ log 2``, so 21 terms reach double precision.
    """
    w = -torch.log1p(u)
    out = torch.zeros_like(w)
    for k, c in _BERNOULLI_SERIES:
        out = out + c * w ** (k + 1)
    return out


class Softplus(TransferFunction):
    """``f(a) = log(1 + e^a)``, ``F(a) = -Σ Li₂(-e^a)`` (Table 2, Spence's function).

    ``F`` is computed from the Bernoulli series of the dilogarithm, with the
    inversion ``Li₂(-e^a) = -π²/6 - a²/2 - Li₂(-e^{-a})`` for ``a > 0``.
    """

    name = "softplus"
    range = (0.0, math.inf)

    def f(self, a):
        return Fn.softplus(a)

    def F(self, a):
        # two branches on clamped inputs, so that autograd is exact at a = 0 too
        pos = a.clamp(min=0)
        upper = math.pi ** 2 / 6 + 0.5 * pos * pos + _dilog_neg(torch.exp(-pos))
        lower = -_dilog_neg(torch.exp(a.clamp(max=0)))
        return torch.where(a > 0, upper, lower).sum(-1)

    def derivative(self, a):
        return torch.sigmoid(a)

    def inverse(self, y):
        # log(e^y - 1), stable for large y as y + log(1 - e^{-y}).
        return y + torch.log(-torch.expm1(-y))


class ELU(TransferFunction):
    """``f(a) = a`` for ``a ≥ 0``, ``β(e^a - 1)`` otherwise; ``F`` of Table 2, ``β ≥ 0``."""

    name = "elu"

    def __init__(self, alpha: float = 1.0) -> None:
        if alpha < 0:
            raise ValueError(f"alpha (β) must be >= 0 for a non-decreasing transfer function, got {alpha}")
        self.beta = float(alpha)
        self.strictly_increasing = self.beta > 0
        self.range = (-self.beta, math.inf)
        self._closed_low = self.beta == 0

    def f(self, a):
        return torch.where(a >= 0, a, self.beta * torch.expm1(a.clamp(max=0)))

    def F(self, a):
        neg = a.clamp(max=0)
        return torch.where(a >= 0, 0.5 * a * a, self.beta * (torch.expm1(neg) - neg)).sum(-1)

    def derivative(self, a):
        return torch.where(a >= 0, torch.ones_like(a), self.beta * torch.exp(a.clamp(max=0)))

    def inverse(self, y):
        if self.beta == 0:
            return super().inverse(y)
        return torch.where(y >= 0, y, torch.log1p((y / self.beta).clamp(max=0)))

    def conjugate(self, y):
        y = self.clamp_to_range(y)
        if self.beta == 0:
            return 0.5 * (y.clamp(min=0) ** 2).sum(-1)
        neg = y.clamp(max=0)
        neg_part = (neg + self.beta) * torch.log1p(neg / self.beta) - neg
        return torch.where(y >= 0, 0.5 * y * y, neg_part).sum(-1)

    def __repr__(self):
        return f"ELU(alpha={self.beta})"


# -- beyond Table 2: the other monotone activations of torch.nn ------------------------------------
class ClampedLinear(TransferFunction):
    """``f(a) = clamp(k a + c, low, high)``: ``nn.Hardtanh`` (``k = 1, c = 0``), ``nn.ReLU6`` (``[0, 6]``),
    ``nn.Hardsigmoid`` (``k = 1/6, c = 1/2``, ``[0, 1]``).  Non-decreasing, constant outside the ramp (no
    inverse, like ReLU).

    With ``u = k a + c`` and ``ū = clamp(u, low, high)``: ``F(a) = Σ (ū u - ū²/2) / k`` (the integral of the
    clamp, ``F' = f``) and, on ``[low, high]``, ``F*(y) = Σ (y²/2 - c y) / k`` (the supremum is at ``u = y``).
    """

    name = "hardtanh"
    strictly_increasing = False
    _closed_low = _closed_high = True

    def __init__(self, low: float = -1.0, high: float = 1.0, slope: float = 1.0, offset: float = 0.0,
                 name: str | None = None) -> None:
        if not low < high:
            raise ValueError(f"low must be below high, got low={low}, high={high}")
        if not slope > 0:
            raise ValueError(f"slope must be > 0 for a non-decreasing transfer function, got {slope}")
        self.low, self.high, self.slope, self.offset = float(low), float(high), float(slope), float(offset)
        self.range = (self.low, self.high)
        if name is not None:
            self.name = name

    def _u(self, a):
        return a * self.slope + self.offset if (self.slope, self.offset) != (1.0, 0.0) else a

    def f(self, a):
        return self._u(a).clamp(self.low, self.high)

    def F(self, a):
        u = self._u(a)
        ramp = u.clamp(self.low, self.high)
        return ((ramp * u - 0.5 * ramp * ramp) / self.slope).sum(-1)

    def derivative(self, a):
        u = self._u(a)
        return torch.where((u > self.low) & (u < self.high), torch.full_like(a, self.slope), torch.zeros_like(a))

    def conjugate(self, y):
        y = self.clamp_to_range(y)
        return ((0.5 * y * y - self.offset * y) / self.slope).sum(-1)

    def __repr__(self):
        return (f"{type(self).__name__}({self.name!r}, low={self.low}, high={self.high}, slope={self.slope}, "
                f"offset={self.offset})")


class Scaled(TransferFunction):
    """``f(a) = s g(a / r)`` for a transfer function ``g`` and ``s, r > 0``: ``nn.SELU`` (``s = λ, r = 1``,
    ``g`` = ELU(α)), ``nn.CELU(α)`` (``s = r = α``, ``g`` = ELU(1)), ``nn.Softplus(β)`` (``s = r = 1/β``).

    ``F(a) = s r G(a/r)`` (so ``F' = f``), ``F*(y) = s r G*(y/s)``, ``f⁻¹(y) = r g⁻¹(y/s)``,
    ``f'(a) = (s/r) g'(a/r)``; the range is ``g``'s times ``s``.
    """

    def __init__(self, base: TransferFunction, out_scale: float, in_scale: float, name: str,
                 label: str | None = None) -> None:
        if not (out_scale > 0 and in_scale > 0):
            raise ValueError(f"{name}: the scales must be > 0, got out_scale={out_scale}, in_scale={in_scale}")
        if not base.elementwise:
            raise ValueError(f"{name}: the scaled transfer function must be elementwise, got {base!r}")
        self.base, self.out_scale, self.in_scale = base, float(out_scale), float(in_scale)
        self.name, self.label = name, label or f"{name}()"
        self.strictly_increasing = base.strictly_increasing
        self.range = (base.range[0] * self.out_scale, base.range[1] * self.out_scale)
        self._closed_low, self._closed_high = base._closed_low, base._closed_high

    def f(self, a):
        return self.out_scale * self.base.f(a / self.in_scale)

    def F(self, a):
        return self.out_scale * self.in_scale * self.base.F(a / self.in_scale)

    def derivative(self, a):
        return (self.out_scale / self.in_scale) * self.base.derivative(a / self.in_scale)

    def inverse(self, y):
        return self.in_scale * self.base.inverse(y / self.out_scale)

    def conjugate(self, y):
        return self.out_scale * self.in_scale * self.base.conjugate(self.clamp_to_range(y) / self.out_scale)

    def __repr__(self):
        return self.label


class Softsign(TransferFunction):
    """``f(a) = a / (1 + |a|)`` (``nn.Softsign``), ``F(a) = Σ |a| - log(1 + |a|)``, ``f⁻¹(y) = y / (1 - |y|)``."""

    name = "softsign"
    range = (-1.0, 1.0)

    def f(self, a):
        return a / (1 + a.abs())

    def F(self, a):
        m = a.abs()
        return (m - torch.log1p(m)).sum(-1)

    def derivative(self, a):
        return (1 + a.abs()).reciprocal().square()

    def inverse(self, y):
        return y / (1 - y.abs())


class LogSigmoid(TransferFunction):
    """``f(a) = log σ(a) = -softplus(-a)`` (``nn.LogSigmoid``), ``F(a) = F_softplus(-a)`` (Table 2's softplus
    integral, reflected), ``f⁻¹(y) = -log(e^{-y} - 1)``, range ``(-∞, 0)``."""

    name = "logsigmoid"
    range = (-math.inf, 0.0)

    def f(self, a):
        return Fn.logsigmoid(a)

    def F(self, a):
        return Softplus().F(-a)

    def derivative(self, a):
        return torch.sigmoid(-a)

    def inverse(self, y):
        return -torch.log(torch.expm1(-y))


#: SELU's constants (Klambauer et al. 2017), as ``torch.nn.SELU`` uses them.
SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def selu() -> Scaled:
    """``nn.SELU``: ``λ ELU_α``."""
    return Scaled(ELU(SELU_ALPHA), SELU_SCALE, 1.0, "selu", "SELU()")


def celu(alpha: float = 1.0) -> Scaled:
    """``nn.CELU(α)``: ``α ELU₁(a/α)``."""
    return Scaled(ELU(1.0), alpha, alpha, "celu", f"CELU(alpha={float(alpha)})")


def scaled_softplus(beta: float = 1.0) -> TransferFunction:
    """``nn.Softplus(β)``: ``softplus(β a) / β`` (Table 2's softplus itself for ``β = 1``)."""
    if beta == 1:
        return Softplus()
    return Scaled(Softplus(), 1.0 / beta, 1.0 / beta, "softplus", f"Softplus(beta={float(beta)})")


#: Transfer functions by name; values build a fresh instance (with default
#: parameters) when called.
TRANSFER_FUNCTIONS: dict[str, Callable[[], TransferFunction]] = {
    "step": Step,
    "linear": Linear,
    "identity": Linear,
    "leaky_relu": LeakyReLU,
    "relu": ReLU,
    "sigmoid": Sigmoid,
    "softmax": Softmax,
    "tanh": Tanh,
    "arctan": Arctan,
    "softplus": Softplus,
    "elu": ELU,
    "hardtanh": ClampedLinear,
    "relu6": lambda: ClampedLinear(0.0, 6.0, name="relu6"),
    "hardsigmoid": lambda: ClampedLinear(0.0, 1.0, 1.0 / 6.0, 0.5, name="hardsigmoid"),
    "selu": selu,
    "celu": celu,
    "softsign": Softsign,
    "logsigmoid": LogSigmoid,
}


def register_transfer(name: str, factory: Callable[[], TransferFunction]) -> None:
    """Make ``factory`` available under ``name`` for layer specs and ``output_transfer``."""
    TRANSFER_FUNCTIONS[name.lower()] = factory


def get_transfer(spec) -> TransferFunction:
    """Resolve a transfer function from a name, an instance, or an ``nn`` module.

    Raises ``ValueError`` naming the valid choices when ``spec`` is unknown.
    """
    if isinstance(spec, TransferFunction):
        return spec
    if spec is None:
        return Linear()
    if isinstance(spec, str):
        key = spec.lower().replace("-", "_")
        if key not in TRANSFER_FUNCTIONS:
            raise ValueError(f"unknown transfer function {spec!r}; valid names are {sorted(TRANSFER_FUNCTIONS)}")
        return TRANSFER_FUNCTIONS[key]()
    from_module = transfer_from_module(spec)
    if from_module is None:
        raise ValueError(
            f"{type(spec).__name__} is not a known monotone transfer function; valid modules are "
            f"{MONOTONE_MODULES}; "
            f"valid names are {sorted(TRANSFER_FUNCTIONS)}"
        )
    return from_module


def _from_modules() -> tuple:
    """``(module class, its transfer function from the module)``, a subclass before its base class."""
    nn = torch.nn
    return (
        (nn.Tanh, lambda m: Tanh()),
        (nn.ReLU, lambda m: ReLU()),
        (nn.LeakyReLU, lambda m: LeakyReLU(m.negative_slope)),
        (nn.Sigmoid, lambda m: Sigmoid()),
        (nn.Softmax, lambda m: Softmax() if m.dim in (-1, 1, None) else None),  # over the features only
        (nn.Softplus, lambda m: scaled_softplus(m.beta)),
        (nn.ELU, lambda m: ELU(m.alpha)),
        (nn.Identity, lambda m: Linear()),
        (nn.ReLU6, lambda m: ClampedLinear(m.min_val, m.max_val, name="relu6")),
        (nn.Hardtanh, lambda m: ClampedLinear(m.min_val, m.max_val)),
        (nn.Hardsigmoid, lambda m: get_transfer("hardsigmoid")),
        (nn.SELU, lambda m: selu()),
        (nn.CELU, lambda m: celu(m.alpha)),
        (nn.Softsign, lambda m: Softsign()),
        (nn.LogSigmoid, lambda m: LogSigmoid()),
    )


#: The activation modules :func:`transfer_from_module` knows, for error messages.
MONOTONE_MODULES = ", ".join(kind.__name__ + ("(dim=-1)" if kind is torch.nn.Softmax else "")
                             for kind, _ in _from_modules())


def transfer_from_module(module) -> TransferFunction | None:
    """The transfer function an ``nn`` activation module computes, or ``None``."""
    for kind, make in _from_modules():
        if isinstance(module, kind):
            return make(module)
    return None
