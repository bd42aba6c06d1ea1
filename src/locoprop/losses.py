r"""Local losses: how far a layer's output is from its target (paper Sec. 2, App. E).

Each local loss gives its value (summed over the batch) and, in closed form,
its gradient with respect to the layer's pre-activation ``â``.  The solver
turns that into the weight gradient ``δᵀ x`` (and ``Σ δ`` for the bias), so no
autograd runs inside the local iterations (reference notes, step 4).

| loss | value | ``∇_â`` | paper |
| --- | --- | --- | --- |
| :class:`SquaredPreLoss` | ``½‖â - a‖²`` | ``â - a`` | Eq. 3 |
| :class:`MatchingLoss` | ``D_F(â, f⁻¹(y))`` | ``f(â) - y`` | Eqs. 2, 7 |
| :class:`SquaredPostLoss` | ``½‖f(â) - y‖²`` | ``J_f(â)ᵀ(f(â) - y)`` | Eqs. 16, 17 |
| :class:`DualMatchingLoss` | ``D_{F*}(f(â), f(a)) = D_F(a, â)`` | ``J_f(â)ᵀ(â - a)`` | Eqs. 18, 19 |
"""

from __future__ import annotations

import torch

from .transfer import TransferFunction, is_new_tensor

__all__ = ["LocalLoss", "SquaredPreLoss", "MatchingLoss", "SquaredPostLoss", "DualMatchingLoss"]


class LocalLoss:
    """Base class.

    Class attributes:
        domain: the target domain it takes (``"pre"`` or ``"post"``).
        needs_transfer: uses the layer's transfer function, which must then
            be a known non-decreasing function (Table 2).
    """

    domain = "pre"
    needs_transfer = False
    #: The gradient is a function of ``f(â)`` and the target alone (:meth:`grad_from_post`), so that a problem can
    #: keep the layer's output ``ŷ = f(â)`` in place of ``â`` (:class:`~locoprop.layers.LayerCapture`'s
    #: ``shares_post``).
    reads_pre_only_through_f = False

    def value(self, pre: torch.Tensor, target: torch.Tensor, transfer: TransferFunction) -> torch.Tensor:
        """Loss summed over the batch."""
        raise TypeError(f"{type(self).__name__} must implement value")

    def grad(self, pre: torch.Tensor, target: torch.Tensor, transfer: TransferFunction) -> torch.Tensor:
        """Gradient of :meth:`value` with respect to ``pre``, in closed form."""
        raise TypeError(f"{type(self).__name__} must implement grad")

    def grad_(self, pre: torch.Tensor, target: torch.Tensor, transfer: TransferFunction) -> torch.Tensor:
        """:meth:`grad`, free to overwrite ``pre`` with it (the fast solver's scratch buffer)."""
        return self.grad(pre, target, transfer)

    def grad_from_post(self, post: torch.Tensor, target: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """:meth:`grad` at the ``â`` with ``f(â) = post`` (into ``out`` where given), for losses that
        :attr:`reads_pre_only_through_f`."""
        raise TypeError(f"{type(self).__name__}: its gradient needs the pre-activation, not only f(â)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SquaredPreLoss(LocalLoss):
    """``½‖â - a‖²`` against a pre-activation target (Eq. 3, LocoProp-S)."""

    domain = "pre"

    def value(self, pre, target, transfer=None):
        return 0.5 * ((pre - target) ** 2).sum()

    def grad(self, pre, target, transfer=None):
        return pre - target

    def grad_(self, pre, target, transfer=None):
        return pre.sub_(target)


class MatchingLoss(LocalLoss):
    """Matching loss of ``f`` against a post-activation target (Eq. 7, LocoProp-M).

    Its gradient is ``f(â) - y`` (Eq. 2) for any Table 2 function.  The value
    is :meth:`~locoprop.transfer.TransferFunction.matching_loss` (finite even
    when ``y`` leaves the range of ``f``).
    """

    domain = "post"
    needs_transfer = True
    reads_pre_only_through_f = True

    def value(self, pre, target, transfer):
        return transfer.matching_loss(pre, target).sum()

    def grad_from_post(self, post, target, out=None):
        return torch.sub(post, target, out=out)

    def grad(self, pre, target, transfer):
        out = transfer.f(pre)  # one activation set, not two, where f(â) is a new tensor
        return out.sub_(target) if is_new_tensor(out, pre) else out - target

    def grad_(self, pre, target, transfer):
        return transfer.f_(pre).sub_(target)


class SquaredPostLoss(LocalLoss):
    """``½‖f(â) - y‖²`` against a post-activation target (Eq. 16, Post-LocoProp-S)."""

    domain = "post"
    needs_transfer = True

    def value(self, pre, target, transfer):
        return 0.5 * ((transfer.f(pre) - target) ** 2).sum()

    def grad(self, pre, target, transfer):
        return transfer.jacobian_t_vec(pre, transfer.f(pre) - target)


class DualMatchingLoss(LocalLoss):
    """Dual matching loss ``D_{F*}(f(â), f(a)) = D_F(a, â)`` (Eq. 18, PocoProp-M).

    Evaluated on pre-activations by Bregman duality (Property II), so it is
    defined for every target ``a``.
    """

    domain = "pre"
    needs_transfer = True

    def value(self, pre, target, transfer):
        return transfer.bregman(target, pre).sum()

    def grad(self, pre, target, transfer):
        return transfer.jacobian_t_vec(pre, pre - target)
