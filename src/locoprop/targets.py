r"""Targets: where each layer's output should move (paper Sec. 2, App. D and E).

A target is built once per step from the forward and backward pass, with the
activation step size ``γ`` (``activation_lr``).  Its ``domain`` says whether it
lives on pre-activations ``a`` or post-activations ``y``; a local loss must
take targets of the same domain.

| target | formula | paper |
| --- | --- | --- |
| :class:`GDTarget` | ``a = â - γ ∇_â L`` | Sec. 2.1, Alg. 1 |
| :class:`MDTarget` | ``y = f(â) - γ ∇_â L`` | Sec. 2.2.3, Alg. 2 |
| :class:`NaturalGradientTarget` | ``a = â - γ D⁻¹ ∇_â L`` | Prop. 1, Eq. 15 |
| :class:`PostGDTarget` | ``y = ŷ - γ ∇_ŷ L`` | App. E.1, Alg. 3 |
| :class:`DualMDTarget` | ``a = â - γ ∇_ŷ L`` | App. E.2, Alg. 4 |

To add a target, subclass :class:`Target` and implement :meth:`Target.__call__`, or, for a step
``base - γ ∇`` along one of the batch's gradients, :class:`GradientStepTarget` and its ``base``.
"""

from __future__ import annotations

import torch

from .layers import LayerBatch
from .transfer import is_new_tensor

__all__ = [
    "Target",
    "GradientStepTarget",
    "GDTarget",
    "MDTarget",
    "NaturalGradientTarget",
    "PostGDTarget",
    "DualMDTarget",
    "pre_activation_fisher",
]


class Target:
    """Base class: ``target(batch, gamma) -> tensor`` of the layer's output shape.

    Class attributes:
        domain: ``"pre"`` or ``"post"``.
        needs_transfer: the formula evaluates ``f``.
        needs_grad_post: the formula needs ``∇_ŷ L``.
        needs_sampled_grad: the formula needs gradients on sampled labels.
    """

    domain = "pre"
    needs_transfer = False
    needs_grad_post = False
    needs_sampled_grad = False
    #: The target reads ``â`` only through ``f(â)``: it takes the layer's output ``ŷ`` where a problem keeps that
    #: in place of ``â`` (``batch.pre`` is then ``None``; :class:`~locoprop.layers.LayerCapture`'s ``shares_post``)
    #: or beside it (``post_beside_pre``).
    reads_pre_only_through_f = False

    def __call__(self, batch: LayerBatch, gamma: float) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must implement __call__")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GradientStepTarget(Target):
    """A target one step ``γ`` along a gradient of the loss from a base point, ``base - γ ∇``: the four
    targets of the paper's Algorithms 1-4.  Subclasses name the ``gradient`` (a :class:`LayerBatch`
    attribute) and the :meth:`base`."""

    gradient = "grad_pre"

    def base(self, batch: LayerBatch) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must implement base")

    def __call__(self, batch, gamma):
        base, step = self.base(batch), gamma * getattr(batch, self.gradient)
        # the target is written into a tensor the step made anyway: the base where it is a new tensor (f(â)),
        # else γ∇ (the base is â, or the layer's output ŷ that the next layer reads); one activation of the layer
        # less while the problems are built (docs/performance.md, Memory), the same numbers either way
        if batch.pre is not None and base is not batch.post and is_new_tensor(base, batch.pre):
            return base.sub_(step)
        if step.shape == base.shape and step.dtype == base.dtype and is_new_tensor(step, base):
            return torch.sub(base, step, out=step)
        return base - step


class GDTarget(GradientStepTarget):
    """Gradient-descent target on pre-activations, ``a = â - γ ∇_â L`` (Sec. 2.1)."""

    domain = "pre"

    def base(self, batch):
        return batch.pre


class MDTarget(GradientStepTarget):
    """Mirror-descent target on post-activations, ``y = f(â) - γ ∇_â L`` (Sec. 2.2.3)."""

    domain = "post"
    needs_transfer = True
    reads_pre_only_through_f = True

    def base(self, batch):  # ŷ = f(â) itself where the problem kept the layer's output, instead of â or beside it
        return batch.post if batch.post is not None else batch.transfer.f(batch.pre)


class PostGDTarget(GradientStepTarget):
    """Post-GD target, ``y = ŷ - γ ∇_ŷ L`` (App. E.1, Algorithm 3)."""

    domain = "post"
    needs_transfer = True
    needs_grad_post = True
    gradient = "grad_post"

    def base(self, batch):
        return batch.transfer.f(batch.pre)


class DualMDTarget(GradientStepTarget):
    """Dual-MD target, ``a = â - γ ∇_ŷ L`` (App. E.2, Algorithm 4)."""

    domain = "pre"
    needs_transfer = True
    needs_grad_post = True
    gradient = "grad_post"

    def base(self, batch):
        return batch.pre


def pre_activation_fisher(batch: LayerBatch, fisher: str, damping: float) -> torch.Tensor:
    r"""The Fisher ``D`` of the pre-activations (App. D), damped: ``D + λI``.

    ``D = (1/b) Σ_i g_i g_iᵀ`` over the per-example gradients ``g_i``:

    * ``"empirical"``: ``g_i = b ∇_{â_i} L``, the per-example gradient of a
      loss that is a mean over the batch (every torch loss with
      ``reduction="mean"`` and the paper's autoencoder loss);
    * ``"sampled"``: ``g_i`` from labels sampled from the model's predictive
      distribution (the true Fisher, as K-FAC uses; the optimizer draws them).
    """
    b = batch.batch_size
    if fisher == "empirical":
        g = batch.grad_pre * b
    elif fisher == "sampled":
        if batch.grad_pre_sampled is None:
            raise RuntimeError(f"layer {batch.layer.name!r}: sampled gradients were not computed")
        g = batch.grad_pre_sampled
    else:
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}")
    d = g.shape[1]
    D = g.T @ g / b
    return D + damping * torch.eye(d, dtype=D.dtype, device=D.device)


class NaturalGradientTarget(Target):
    r"""Natural-gradient target on pre-activations, ``a = â - γ D⁻¹ ∇_â L`` (Prop. 1).

    ``D`` is the Fisher of the pre-activations (:func:`pre_activation_fisher`),
    damped by ``damping``.  With the squared local loss solved in closed form
    this is Eq. 15, the K-FAC update (Eq. 14).
    """

    domain = "pre"

    def __init__(self, damping: float = 1e-3, fisher: str = "empirical") -> None:
        if not damping > 0:
            raise ValueError(f"NaturalGradientTarget: damping must be > 0, got {damping}")
        if fisher not in ("empirical", "sampled"):
            raise ValueError(f"NaturalGradientTarget: fisher must be 'empirical' or 'sampled', got {fisher!r}")
        self.damping = float(damping)
        self.fisher = fisher
        self.needs_sampled_grad = fisher == "sampled"

    def __call__(self, batch, gamma):
        D = pre_activation_fisher(batch, self.fisher, self.damping)
        L = torch.linalg.cholesky(D)
        # rows: D⁻¹ g_i, i.e. (D⁻¹ Gᵀ)ᵀ = G D⁻¹ (D symmetric)
        nat = torch.cholesky_solve(batch.grad_pre.T, L).T
        return batch.pre - gamma * nat

    def __repr__(self):
        return f"NaturalGradientTarget(damping={self.damping}, fisher={self.fisher!r})"
