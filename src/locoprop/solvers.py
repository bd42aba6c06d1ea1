r"""Local solvers: minimise every layer's local problem (paper Sec. 2, Algorithms 1-4).

A solver receives one :class:`LocalProblem` per layer (input, target, the
layer's parameters and their values at the start of the step) and changes the
parameters in place.  It knows nothing about how the targets were built.

* :class:`IterativeSolver`: ``T`` local iterations; in iteration ``k`` every
  layer's local gradient ``δᵀx̃`` (closed form, summed over the batch) is
  computed, then one inner-optimizer step updates all layers together, with
  learning rate ``η_k = η max(1 - k/T, 0.25)`` (reference notes, step 5).
* :class:`ClosedFormSolver`: the implicit update of LocoProp-S,
  ``ΔW = -η_e ∇_W L (I + η x̃x̃ᵀ)⁻¹`` (Sec. 2.1; Eq. 15 with natural-gradient
  targets), through the Woodbury identity when the batch is smaller than the
  layer's input width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.optim import Optimizer

from .layers import LayerBatch
from .losses import LocalLoss
from .regularizers import Regularizer

__all__ = ["LocalProblem", "IterativeSolver", "ClosedFormSolver", "local_lr", "local_objective"]


@dataclass
class LocalProblem:
    """One layer's local problem for this step.

    ``residual`` is ``δ`` of the first local iteration, ``∇_â`` of the local
    loss at the forward pass's pre-activation (``f(â) - target`` for
    LocoProp-M, ``â - target`` for LocoProp-S: ``γ ∇_â L``, the BackProp
    gradient, Sec. 2).  :class:`~locoprop.LocoProp` computes it when it builds
    the target, so that the pre-activation itself can be freed before the
    solve; a solver computes it from ``batch.pre`` when it is ``None``, or,
    where the step kept the layer's output ``ŷ = f(â)`` in place of ``â``
    (``batch.pre`` is ``None``: LocoProp-M, :meth:`LocoProp._shares_post
    <locoprop.LocoProp._shares_post>`), from ``batch.post`` as the first
    iteration needs it (``f(â) - y``, Eq. 2), so that no layer holds it
    through the solve.  The fast solver overwrites it (it is that layer's
    scratch buffer) and then sets it to ``None``.
    """

    batch: LayerBatch
    target: torch.Tensor
    params: list[torch.Tensor]
    anchor: list[torch.Tensor] | None = None
    group: dict = field(default_factory=dict)
    residual: torch.Tensor | None = None
    #: The forward pass's pre-activation and the weights it was computed with, kept (by
    #: :class:`~locoprop.LocoProp` with ``precision="tf32"`` or ``"bf16"``) for the fast solver, which then
    #: computes each iteration's pre-activation as this one plus the reduced-precision product of the
    #: weights' change (:mod:`locoprop.fused`, "update form").
    start_pre: torch.Tensor | None = None
    start_params: list[torch.Tensor] | None = None

    def residual_from_output(self, loss: LocalLoss) -> bool:
        """Whether the first residual is computed from the layer's kept output ``ŷ`` (``batch.post``), as the
        first iteration needs it: no residual set, no pre-activation, and a loss that reads ``â`` through
        ``f(â)`` alone."""
        return (self.residual is None and self.batch.pre is None and self.batch.post is not None
                and loss.reads_pre_only_through_f)

    def first_residual(self, loss: LocalLoss) -> torch.Tensor:
        """``residual``, computed from the forward pass's pre-activation, or its kept output, if it is not set."""
        if self.residual is not None:
            return self.residual
        if self.residual_from_output(loss):
            return loss.grad_from_post(self.batch.post, self.target)
        if self.batch.pre is None:
            raise RuntimeError(f"layer {self.batch.layer.name!r}: the local problem has neither its first "
                               "residual nor the pre-activation (it was already solved by the fast solver)")
        return loss.grad(self.batch.pre, self.target, self.batch.transfer)

    def pre_activation(self, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``x W̃ᵀ + b̃`` for the fixed layer input ``x``."""
        params = self.params if params is None else params
        if len(params) == 2:  # as nn.Linear computes it (one product with the bias added in its epilogue)
            return torch.addmm(params[1], self.batch.inputs, params[0].T)
        return self.batch.inputs @ params[0].T


def local_lr(lr: float, k: int, steps: int, decay: bool, min_ratio: float) -> float:
    """``η_k = η max(1 - k/T, min_ratio)`` (reference notes, step 5), or ``η`` without decay."""
    return lr * max(1.0 - k / steps, min_ratio) if decay else lr


def local_objective(problem: LocalProblem, loss: LocalLoss, regularizer: Regularizer,
                    params: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Value of ``loss(W̃) + R(W̃, W)`` at ``params`` (default: the current ones)."""
    params = problem.params if params is None else params
    value = loss.value(problem.pre_activation(params), problem.target, problem.batch.transfer)
    if problem.anchor is not None:
        delta = [p - a for p, a in zip(params, problem.anchor)]
        value = value + regularizer.value(problem.batch, delta, problem.group["lr"])
    return value


def _weight_grads(problem: LocalProblem, loss: LocalLoss, first: bool = False) -> list[torch.Tensor]:
    """``[δᵀx, Σδ]`` with ``δ = ∇_â`` of the local loss (closed form, summed over the batch).

    In the first local iteration the weights are those of the forward pass, so
    ``δ`` is the problem's :attr:`~LocalProblem.residual`, made from the
    forward pass's pre-activation (one product saved).
    """
    if first:
        delta = problem.first_residual(loss)
    else:
        delta = loss.grad(problem.pre_activation(), problem.target, problem.batch.transfer)
    grads = [delta.T @ problem.batch.inputs]
    if len(problem.params) == 2:
        grads.append(delta.sum(0))
    return grads


class IterativeSolver:
    """``T`` local iterations of an inner optimizer, all layers in each (Algorithms 1-4).

    This is the readable reference path: a Python loop over iterations and
    layers, with one multi-tensor inner-optimizer update per iteration.
    """

    name = "iterative"

    def __init__(self, reduce_grads=None) -> None:
        #: Called with the local problems after every iteration's local gradients
        #: are set (``p.grad``) and before the inner update; a distributed
        #: wrapper all-reduces them here.  ``None``: nothing.
        self.reduce_grads = reduce_grads

    def solve(self, problems: list[LocalProblem], loss: LocalLoss, regularizer: Regularizer,
              inner: Optimizer) -> None:
        steps = [int(p.group["local_steps"]) for p in problems]
        inner_groups = inner.param_groups
        for k in range(max(steps)):
            for m, problem in enumerate(problems):
                g = problem.group
                active = k < steps[m]
                inner_groups[m]["lr"] = local_lr(g["lr"], k, steps[m], g["lr_decay"], g["min_lr_ratio"])
                if not active:
                    for p in problem.params:
                        p.grad = None
                    continue
                grads = _weight_grads(problem, loss, first=k == 0)
                if problem.anchor is not None:
                    delta = [p - a for p, a in zip(problem.params, problem.anchor)]
                    extra = regularizer.grad(problem.batch, delta, g["lr"])
                    if extra is not None:
                        grads = [gr + e for gr, e in zip(grads, extra)]
                for p, gr in zip(problem.params, grads):
                    p.grad = gr
            if self.reduce_grads is not None:
                self.reduce_grads(problems)
            inner.step()
            for m, problem in enumerate(problems):
                if k < steps[m] and problem.anchor is not None:
                    regularizer.prox(problem.params, problem.anchor, inner_groups[m]["lr"], problem.group["lr"])
        for problem in problems:
            for p in problem.params:
                p.grad = None


class ClosedFormSolver:
    r"""Exact minimiser of ``½‖x̃Θ̃ - a‖² + (c/2)‖Θ̃ - Θ‖²`` (Eq. 4 solved; Eq. 15).

    ``Θ̃ - Θ = -(x̃ᵀx̃ + cI)⁻¹ x̃ᵀ (x̃Θ - a)``, computed as
    ``-x̃ᵀ (x̃x̃ᵀ + cI)⁻¹ (x̃Θ - a)`` (Woodbury / push-through identity) when the
    batch ``b`` is smaller than the input width ``n + 1``.  With ``c = 1/η``
    this is ``ΔW = -η_e ∇_W L (I + η x̃x̃ᵀ)⁻¹`` for GD targets.
    """

    name = "closed_form"

    def solve(self, problems: list[LocalProblem], loss: LocalLoss, regularizer: Regularizer,
              inner: Optimizer | None = None) -> None:
        for problem in problems:
            c = regularizer.coefficient(problem.group["lr"])
            x = problem.batch.inputs
            has_bias = len(problem.params) == 2
            if has_bias:
                x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
            residual = problem.pre_activation() - problem.target  # (b, d)
            b, n1 = x.shape
            if b < n1:
                K = x @ x.T
                K.diagonal().add_(c)
                step = x.T @ torch.cholesky_solve(residual, torch.linalg.cholesky(K))
            else:
                M = x.T @ x
                M.diagonal().add_(c)
                step = torch.cholesky_solve(x.T @ residual, torch.linalg.cholesky(M))
            step = step.T  # (d, n+1)
            W = problem.params[0]
            W.sub_(step[:, : W.shape[1]])
            if has_bias:
                problem.params[1].sub_(step[:, -1])


class InnerView:
    """The inner optimizer restricted to some layers' groups (same dicts, same state): the layers a rank
    solves (``distributed="layers"``), or those that ran in a step.

    ``step`` runs the whole inner optimizer after taking the gradients of the
    other layers' parameters away (a stale ``.grad`` would move them): every
    ``torch.optim`` optimizer skips a parameter without one.
    """

    def __init__(self, inner, indices: Sequence[int]) -> None:
        self.inner = inner
        self.param_groups = [inner.param_groups[i] for i in indices]
        self.state = inner.state
        mine = set(indices)
        self._others = [p for i, g in enumerate(inner.param_groups) if i not in mine for p in g["params"]]

    def step(self, closure=None):
        for p in self._others:
            p.grad = None
        return self.inner.step(closure)


SOLVER_CLASSES = {"iterative": IterativeSolver, "closed_form": ClosedFormSolver}
