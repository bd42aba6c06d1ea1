r"""Regularizers: what keeps a layer's new weights near the old (paper Sec. 2, App. E.3).

The local problem of every variant is ``loss(W̃) + R(W̃, W)`` (Sec. 2).  The
weights are handled as one matrix ``Θ = [W, b]`` per layer (bias folded in,
footnote 1), and ``ΔΘ = Θ̃ - Θ`` is the change since the start of the step.

| regularizer | ``R`` | applied as | paper |
| --- | --- | --- | --- |
| :class:`L2Proximity` | ``(c/2)‖ΔΘ‖²`` | gradient ``c ΔΘ`` | Eqs. 3, 7 with ``c = 1/η`` |
| :class:`L1Proximity` | ``c‖ΔΘ‖₁`` | proximal step (soft threshold) | App. E.3 |
| :class:`FisherProximity` | ``(c/2) vec(ΔΘ)ᵀ (D ⊗ A) vec(ΔΘ)`` | gradient ``c D ΔΘ A`` | App. E.3, Eq. 12 |

``L2Proximity(coef=0)`` is what Algorithms 1 and 2 and the authors' notebook
run: no explicit term, the new weights stay near the old because the ``T``
local steps start there and their learning rate decays.  ``coef=None`` ties
``c = 1/η`` to the local learning rate, the paper's ``1/(2η)‖W̃ - W‖²``; with
SGD at learning rate ``η`` its iteration is then exactly the fixed-point
iteration of Eq. 4 / Eq. 8.
"""

from __future__ import annotations

import torch

from .layers import LayerBatch
from .targets import pre_activation_fisher

__all__ = ["Regularizer", "L2Proximity", "L1Proximity", "FisherProximity"]


class Regularizer:
    """Base class.

    ``needs_anchor``: the solver must keep ``Θ`` from the start of the step.
    ``prepare`` runs once per step (after targets are built) and may store
    per-layer statistics in ``batch.extras``.
    """

    needs_anchor = True

    def coefficient(self, lr: float) -> float:
        """The strength ``c`` for local learning rate ``lr`` (0: no gradient term)."""
        return 0.0

    def prepare(self, batch: LayerBatch) -> None:
        """Per-step statistics (e.g. Fisher factors) stored in ``batch.extras``."""

    def grad(self, batch: LayerBatch, delta: list[torch.Tensor], lr: float) -> list[torch.Tensor] | None:
        """Gradients added to the local gradients of ``[W, b]`` (``None``: nothing)."""
        return None

    def value(self, batch: LayerBatch, delta: list[torch.Tensor], lr: float) -> torch.Tensor:
        """``R`` at the change ``delta = [ΔW, Δb]`` since the start of the step."""
        return delta[0].new_zeros(())

    def prox(self, params: list[torch.Tensor], anchor: list[torch.Tensor], step_lr: float, lr: float) -> None:
        """Proximal step after each inner update (in place)."""


class L2Proximity(Regularizer):
    """``(c/2)‖Θ̃ - Θ‖²`` (Eqs. 3 and 7).

    Args:
        coef: ``c``.  ``0`` (the default): the implicit regularization of
            Algorithms 1-2 and the reference notebook.  ``None``: ``c = 1/η``,
            the paper's tie to the local learning rate.
    """

    def __init__(self, coef: float | None = 0.0) -> None:
        if coef is not None and not coef >= 0:
            raise ValueError(f"L2Proximity: coef must be >= 0 or None (meaning 1/lr), got {coef}")
        self.coef = coef
        self.needs_anchor = coef != 0.0

    def coefficient(self, lr: float) -> float:
        return 1.0 / lr if self.coef is None else float(self.coef)

    def grad(self, batch, delta, lr):
        c = self.coefficient(lr)
        if c == 0.0:
            return None
        return [c * d for d in delta]

    def value(self, batch, delta, lr):
        c = self.coefficient(lr)
        return 0.5 * c * sum((d * d).sum() for d in delta)

    def __repr__(self):
        return f"L2Proximity(coef={'1/lr' if self.coef is None else self.coef})"


class L1Proximity(Regularizer):
    """``c‖Θ̃ - Θ‖₁`` for sparse updates (App. E.3), as a proximal step.

    After each inner update with step size ``η_k`` the change is
    soft-thresholded: ``ΔΘ ← sign(ΔΘ) max(|ΔΘ| - η_k c, 0)``.  This is the
    exact proximal-gradient step for SGD; for adaptive inner optimizers the
    threshold ignores their per-coordinate scaling.
    """

    def __init__(self, coef: float) -> None:
        if not coef > 0:
            raise ValueError(f"L1Proximity: coef must be > 0, got {coef}")
        self.coef = float(coef)

    def value(self, batch, delta, lr):
        return self.coef * sum(d.abs().sum() for d in delta)

    def prox(self, params, anchor, step_lr, lr):
        thr = step_lr * self.coef
        for p, p0 in zip(params, anchor):
            d = p - p0
            p.copy_(p0 + torch.sign(d) * (d.abs() - thr).clamp(min=0))

    def __repr__(self):
        return f"L1Proximity(coef={self.coef})"


class FisherProximity(Regularizer):
    r"""Local Fisher-Mahalanobis distance ``(c/2) vec(ΔΘ)ᵀ F vec(ΔΘ)`` (App. E.3).

    ``F`` is the Kronecker-factored Fisher of the layer (App. D):
    ``F ≈ D ⊗ A`` with ``D`` the damped Fisher of the pre-activations
    (:func:`~locoprop.targets.pre_activation_fisher`) and
    ``A = (1/b) Σ x̃ x̃ᵀ`` the second moment of the layer input (with a 1 for
    the bias).  Its gradient is ``c D ΔW̃ A`` in ``[W, b]`` layout.
    """

    def __init__(self, coef: float = 1.0, damping: float = 1e-3, fisher: str = "empirical") -> None:
        if not coef > 0:
            raise ValueError(f"FisherProximity: coef must be > 0, got {coef}")
        if not damping > 0:
            raise ValueError(f"FisherProximity: damping must be > 0, got {damping}")
        self.coef, self.damping, self.fisher = float(coef), float(damping), fisher
        self.needs_sampled_grad = fisher == "sampled"

    def prepare(self, batch):
        x = batch.inputs
        if batch.layer.linear.bias is not None:
            x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        batch.extras["fisher_D"] = pre_activation_fisher(batch, self.fisher, self.damping)
        batch.extras["fisher_A"] = x.T @ x / x.shape[0]

    def _joined(self, batch, delta):
        dW = delta[0]
        if len(delta) == 2:
            dW = torch.cat([dW, delta[1][:, None]], 1)
        return dW

    def grad(self, batch, delta, lr):
        D, A = batch.extras["fisher_D"], batch.extras["fisher_A"]
        g = self.coef * (D @ self._joined(batch, delta) @ A)
        return [g[:, :-1], g[:, -1]] if len(delta) == 2 else [g]

    def value(self, batch, delta, lr):
        D, A = batch.extras["fisher_D"], batch.extras["fisher_A"]
        dW = self._joined(batch, delta)
        return 0.5 * self.coef * (dW * (D @ dW @ A)).sum()

    def __repr__(self):
        return f"FisherProximity(coef={self.coef}, damping={self.damping}, fisher={self.fisher!r})"
