r"""``LocoProp``: the whole update family as a :class:`torch.optim.Optimizer`.

One step (paper Algorithms 1-4, reference notes "LocoProp step"):

1. the closure runs one forward pass; hooks record each layer's input
   ``ŷ_{m-1}`` and pre-activation ``â_m`` (:mod:`locoprop.layers`);
2. one backward pass gives ``∇_{â_m} L`` (and ``∇_{ŷ_m} L`` where a target
   needs it);
3. every layer's target is built with the activation step size ``γ``
   (:mod:`locoprop.targets`);
4. the solver minimises every layer's local loss plus regularizer
   (:mod:`locoprop.solvers`), with the inner optimizer's state kept from step
   to step.

Each layer is one parameter group (``param_groups[m]``, with ``name``,
``lr`` = ``η``, ``activation_lr`` = ``γ``, ``local_steps`` = ``T``), so
``torch.optim.lr_scheduler`` schedulers drive the local learning rate.

With ``distributed=`` / ``process_group=`` a distributor of
:mod:`locoprop.distributed` is called at three points of the step (global
loss, gradient scaling and row exchange, solve); the rest is unchanged.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.optim import Optimizer

from .errors import DivergenceError
from .inner import make_inner_optimizer
from .layers import Layer, LayerBatch, LayerCapture, discover_layers
from .solvers import SOLVER_CLASSES, LocalProblem, local_objective
from .variants import Variant, get_variant, make_regularizer

__all__ = ["LocoProp"]


def _positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a positive number, got {value!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


class LocoProp(Optimizer):
    r"""LocoProp optimizer (Amid, Anil, Warmuth, AISTATS 2022).

    Args:
        model: the network.  An ``nn.Sequential`` is searched for its
            ``nn.Linear`` layers and the transfer function after each; any
            other module needs ``layers``.
        variant: a name of :data:`locoprop.VARIANTS` (``"M"``, ``"S"``,
            ``"post-S"``, ``"poco-M"``, ``"S-natural"``, ``"S-closed"``,
            ``"S-natural-closed"``) or a :class:`~locoprop.variants.Variant`.
        lr: the local learning rate ``η`` (paper Eqs. 3, 7).
        activation_lr: the activation step size ``γ`` of the targets.
        local_steps: ``T``, local iterations per step (paper default 10).
        inner: the inner optimizer: ``"sgd"``, ``"momentum"``, ``"nesterov"``,
            ``"adam"``, ``"rmsprop"``, ``"adagrad"``, ``"tf_rmsprop"`` (the
            paper's) or a ``torch.optim.Optimizer`` subclass.
        inner_kwargs: its hyper-parameters under torch.optim's names
            (``tf_rmsprop`` takes ``momentum``, ``alpha``, ``eps``).
        output_transfer: transfer function of the last layer implied by the
            loss: ``"sigmoid"`` (BCE with logits), ``"softmax"``
            (cross-entropy), ``"linear"`` (MSE), ...
        layers: explicit ``(nn.Linear, transfer)`` pairs for models that are
            not ``nn.Sequential``.
        target, local_loss, regularizer, solver: override one component of
            the variant (objects of :mod:`locoprop.targets`,
            :mod:`locoprop.losses`, :mod:`locoprop.regularizers`; ``regularizer``
            also takes ``"l2"``, ``"l2-paper"``, ``"l1"``, ``"fisher"``;
            ``solver`` ``"iterative"`` or ``"closed_form"``).
        lr_decay: decay the local learning rate inside the ``T`` iterations,
            ``η_k = η max(1 - k/T, min_lr_ratio)`` (reference notes, step 5).
        min_lr_ratio: the floor of that decay (0.25 in the paper).
        reset_inner_state: clear the inner optimizer's state at every step
            (default ``False``: it persists from batch to batch, as in the paper).
        check_finite: undo a step whose local update is NaN or infinite and
            raise :class:`~locoprop.DivergenceError` (costs one copy of the
            weights and inner state per step).
        retain_problems: keep the last step's local problems (inputs and
            targets) for :meth:`local_objective`.
        distributed: split each step over the ranks of ``process_group``
            (:mod:`locoprop.distributed`): ``"data"`` (exact data parallelism,
            the default when only ``process_group`` is given), ``"layers"``
            (layer sharding) or a ``DataParallelConfig`` /
            ``LayerShardedConfig``.  ``None`` with no ``process_group``: one
            process.  Construction is then a collective (every rank calls it;
            parameters are broadcast from rank 0) and each rank's closure runs
            on its shard of the global batch.
        process_group: the ``torch.distributed`` group (default: the world
            group when ``distributed`` is given).
    """

    def __init__(
        self,
        model: nn.Module,
        variant: str | Variant = "M",
        lr: float = 1e-3,
        activation_lr: float = 1.0,
        local_steps: int = 10,
        inner="tf_rmsprop",
        inner_kwargs: dict | None = None,
        output_transfer=None,
        layers: Sequence[tuple[nn.Module, object]] | None = None,
        target=None,
        local_loss=None,
        regularizer=None,
        solver: str | None = None,
        lr_decay: bool = True,
        min_lr_ratio: float = 0.25,
        reset_inner_state: bool = False,
        check_finite: bool = True,
        retain_problems: bool = False,
        distributed=None,
        process_group=None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        lr = _positive("lr", lr)
        activation_lr = _positive("activation_lr", activation_lr)
        if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
            raise ValueError(f"local_steps: expected an integer >= 1, got {local_steps!r}")
        if not 0.0 <= float(min_lr_ratio) <= 1.0:
            raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {min_lr_ratio!r}")

        base = get_variant(variant)
        if regularizer is not None:
            regularizer = make_regularizer(regularizer)
        self.variant: Variant = base.with_components(target, local_loss, regularizer, solver)
        self.variant.validate()

        self.layers: list[Layer] = discover_layers(model, layers, output_transfer)
        self._check_layers(output_transfer)
        if self.variant.needs_sampled_grad:
            self._sampler = _output_sampler(self.layers[-1])

        defaults = dict(lr=lr, activation_lr=activation_lr, local_steps=local_steps, lr_decay=bool(lr_decay),
                        min_lr_ratio=float(min_lr_ratio))
        groups = [dict(params=lay.params, name=lay.name) for lay in self.layers]
        super().__init__(groups, defaults)

        self.model = model
        self.solver = SOLVER_CLASSES[self.variant.solver]()
        self.inner_spec = inner
        self.inner_kwargs = dict(inner_kwargs or {})
        self.inner: Optimizer | None = None
        if self.variant.solver == "iterative":
            self.inner = make_inner_optimizer(inner, [{"params": lay.params} for lay in self.layers], lr,
                                              self.inner_kwargs)
        self.reset_inner_state = bool(reset_inner_state)
        self.check_finite = bool(check_finite)
        self.retain_problems = bool(retain_problems)
        self.last_problems: list[LocalProblem] | None = None

        covered = {id(p) for lay in self.layers for p in lay.params}
        others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if others:
            warnings.warn(
                f"LocoProp updates only the Linear layers it found; these parameters are left to another "
                f"optimizer: {others[:5]}{' ...' if len(others) > 5 else ''}",
                stacklevel=2,
            )
        self.distributor = None
        if distributed is not None or process_group is not None:
            from .distributed import make_distributor

            self.distributor = make_distributor(self, distributed, process_group)

    # -- construction checks ------------------------------------------------------------------
    def _check_layers(self, output_transfer) -> None:
        v = self.variant
        for lay in self.layers:
            if v.needs_transfer and lay.transfer is None:
                raise ValueError(
                    f"layer {lay.name!r}: the module after it ({lay.transfer_desc}) is not a monotone "
                    f"transfer function, which {v.name} needs (its matching loss or target uses f); "
                    "valid: Tanh, ReLU, LeakyReLU, Sigmoid, Softmax, Softplus, ELU, Identity, or pass "
                    "layers=[(linear, 'arctan'), ...]"
                )
        if (v.needs_transfer and output_transfer is None and self.layers[-1].transfer_desc == "none"):
            warnings.warn(
                f"{v.name}: the last layer {self.layers[-1].name!r} is taken as linear; pass "
                "output_transfer='sigmoid' (BCE with logits), 'softmax' (cross-entropy) or 'linear' (MSE) "
                "to match the loss",
                stacklevel=3,
            )

    # -- the step -------------------------------------------------------------------------------
    def _capture(self, closure: Callable[[], torch.Tensor]):
        with LayerCapture(self.layers, capture_post=self.variant.needs_grad_post) as cap:
            with torch.enable_grad():
                loss = closure()
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"closure: must return the loss as a scalar tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"closure: must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError("closure: the returned loss does not depend on the model's parameters "
                             "(was it computed under torch.no_grad or detached?)")
        batches = cap.check()
        return loss.reshape(()), batches

    def _gradients(self, loss: torch.Tensor, batches: list[LayerBatch]) -> None:
        wants = [b.pre for b in batches]
        posts = [b for b in batches if self.variant.needs_grad_post and b.post is not None]
        wants += [b.post for b in posts]
        try:
            grads = torch.autograd.grad(loss, wants, allow_unused=True,
                                        retain_graph=self.variant.needs_sampled_grad)
        except RuntimeError as exc:
            if "backward through the graph a second time" in str(exc) or "freed" in str(exc):
                raise RuntimeError("closure: return the loss without calling backward(); LocoProp runs "
                                   "the backward pass itself") from exc
            raise
        n = len(batches)
        for b, g in zip(batches, grads[:n]):
            b.grad_pre = torch.zeros_like(b.pre) if g is None else g
        for b, g in zip(posts, grads[n:]):
            b.grad_post = torch.zeros_like(b.post) if g is None else g
        if self.variant.needs_sampled_grad:
            sampled = self._sampler(batches[-1].pre)
            gs = torch.autograd.grad(sampled, [b.pre for b in batches], allow_unused=True)
            for b, g in zip(batches, gs):
                b.grad_pre_sampled = torch.zeros_like(b.pre) if g is None else g
        for b in batches:  # flatten leading dimensions, detach
            d = b.pre.shape[-1]
            b.pre = b.pre.detach().reshape(-1, d)
            b.grad_pre = b.grad_pre.detach().reshape(-1, d)
            if b.grad_pre_sampled is not None:
                b.grad_pre_sampled = b.grad_pre_sampled.detach().reshape(-1, d)
            if self.variant.needs_grad_post:
                if b.grad_post is None:  # transfer inside the loss, or given by name
                    b.grad_post = b.transfer.pullback_to_post(b.pre, b.grad_pre)
                else:
                    b.grad_post = b.grad_post.detach().reshape(-1, d)
            b.post = None

    def _problems(self, batches: list[LayerBatch]) -> list[LocalProblem]:
        v = self.variant
        problems = []
        needs_anchor = v.regularizer.needs_anchor and v.solver == "iterative"
        for m, (b, group) in enumerate(zip(batches, self.param_groups)):
            if b is None:  # layer-sharded: another rank solves this layer
                problems.append(None)
                continue
            with torch.no_grad():
                target = v.target(b, group["activation_lr"])
            if target.shape != b.pre.shape:
                raise ValueError(
                    f"layer {b.layer.name!r}: target {v.target!r} has shape {tuple(target.shape)}, expected "
                    f"the pre-activation shape {tuple(b.pre.shape)}"
                )
            v.regularizer.prepare(b)
            params = group["params"]
            anchor = [p.detach().clone() for p in params] if needs_anchor else None
            problems.append(LocalProblem(b, target, params, anchor, group))
        return problems

    def _snapshot(self):
        params = [p for g in self.param_groups for p in g["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = None
        if self.inner is not None:
            saved_state = {p: copy.deepcopy(self.inner.state[p]) for p in params if p in self.inner.state}
        return params, saved_params, saved_state

    def _restore(self, snapshot) -> None:
        params, saved_params, saved_state = snapshot
        with torch.no_grad():
            for p, s in zip(params, saved_params):
                p.copy_(s)
        if self.inner is not None:
            for p in params:
                self.inner.state.pop(p, None)
                if p in saved_state:
                    self.inner.state[p] = saved_state[p]

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One LocoProp step; ``closure()`` runs the forward pass and returns the scalar loss.

        The closure must not call ``backward()``.  Returns the loss (detached),
        measured before the update.  Raises :class:`~locoprop.DivergenceError`
        and leaves weights and inner state untouched when the loss or the
        local update is not finite.
        """
        if closure is None:
            raise ValueError("closure: LocoProp.step needs a closure that runs the forward pass and returns "
                             "the loss (LocoProp needs the layer inputs of the current batch)")
        loss, batches = self._capture(closure)
        reported = loss if self.distributor is None else self.distributor.reduce_loss(loss, batches)
        if not torch.isfinite(reported.detach()).all():  # the global loss: every rank decides alike
            raise DivergenceError(f"the closure's loss is {reported.item()}; the step was not taken")
        self._gradients(loss, batches)
        if self.distributor is not None:
            batches = self.distributor.exchange(batches)
        problems = self._problems(batches)
        if self.inner is not None and self.reset_inner_state:
            self.inner.state.clear()
        snapshot = self._snapshot() if self.check_finite else None
        with torch.no_grad():
            if self.distributor is None:
                self.solver.solve(problems, self.variant.local_loss, self.variant.regularizer, self.inner)
            else:
                self.distributor.solve(self.solver, problems, self.variant.local_loss, self.variant.regularizer,
                                       self.inner)
        if snapshot is not None:
            bad = [p for p in snapshot[0] if not torch.isfinite(p).all()]
            if bad:
                self._restore(snapshot)
                names = sorted({g["name"] for g in self.param_groups for p in g["params"]
                                if any(p is q for q in bad)})
                raise DivergenceError(
                    f"the local update of layer(s) {names} is not finite; the step was undone (lower lr or "
                    "activation_lr)"
                )
        self.last_problems = problems if self.retain_problems else None
        for g in self.param_groups:
            g["step"] = g.get("step", 0) + 1
        return reported.detach()

    # -- introspection --------------------------------------------------------------------------
    def local_objective(self, layer: int, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The last step's local objective of layer ``layer`` at ``params`` (needs ``retain_problems``)."""
        if self.last_problems is None:
            raise RuntimeError("local_objective: construct LocoProp(..., retain_problems=True) and take a step first")
        problem = self.last_problems[layer]
        if problem is None:
            raise RuntimeError(f"local_objective: layer {layer} is solved by rank "
                               f"{self.distributor.assignment[layer]} (distributed='layers'); call it there")
        if problem.anchor is None:
            problem.anchor = [p.detach().clone() for p in problem.params]
        return local_objective(problem, self.variant.local_loss, self.variant.regularizer, params)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Optimizer state, including the inner optimizer's (round-trips exactly).

        Distributed, it is the same on every rank and loads on any number of
        ranks; with ``distributed="layers"`` it is a collective (call it on
        every rank), since each layer's inner state lives on its owner.
        """
        sd = super().state_dict()
        sd["inner"] = self.inner.state_dict() if self.inner is not None else None
        if self.distributor is not None and sd["inner"] is not None:
            sd["inner"] = self.distributor.inner_state_dict(sd["inner"])
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` output; checks the layer structure first and changes nothing on error."""
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError("state_dict: expected a dict made by LocoProp.state_dict()")
        sd = dict(state_dict)
        inner_sd = sd.pop("inner", None)
        if (inner_sd is None) != (self.inner is None):
            raise ValueError("state_dict: it was saved with a different solver (inner optimizer state "
                             f"{'missing' if inner_sd is None else 'present'})")
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError(f"state_dict: it has {len(sd['param_groups'])} layers, this optimizer has "
                             f"{len(self.param_groups)}")
        for i, (g_saved, g_self) in enumerate(zip(sd["param_groups"], self.param_groups)):
            if len(g_saved["params"]) != len(g_self["params"]):
                raise ValueError(f"state_dict: layer {i} ({g_self['name']}) has a different number of parameters")
        if self.inner is not None:
            inner_backup = copy.deepcopy(self.inner.state_dict())
            self.inner.load_state_dict(inner_sd)
            try:
                super().load_state_dict(sd)
            except Exception:
                self.inner.load_state_dict(inner_backup)
                raise
        else:
            super().load_state_dict(sd)
        if self.distributor is not None:
            self.distributor.after_load_state_dict()

    def __repr__(self) -> str:
        lines = [f"LocoProp({self.variant.name}: target={self.variant.target!r}, local_loss="
                 f"{self.variant.local_loss!r}, regularizer={self.variant.regularizer!r}, solver={self.variant.solver!r},"
                 f" inner={self.inner_spec!r}"]
        for lay, g in zip(self.layers, self.param_groups):
            lines.append(f"  {lay.name}: {tuple(lay.linear.weight.shape)} -> {lay.transfer!r}  lr={g['lr']}, "
                         f"activation_lr={g['activation_lr']}, local_steps={g['local_steps']}")
        if self.distributor is not None:
            lines.append(f"  distributed: {self.distributor!r}")
        return "\n".join(lines) + "\n)"


def _output_sampler(last: Layer) -> Callable[[torch.Tensor], torch.Tensor]:
    """Loss on labels drawn from the model's predictive distribution (sampled Fisher).

    The output distribution follows the last transfer function: Bernoulli for
    sigmoid, categorical for softmax, unit Gaussian for linear.  The loss is
    summed over the batch, so its per-example gradients are the ``g_i`` of
    :func:`~locoprop.targets.pre_activation_fisher`.
    """
    name = last.transfer.name if last.transfer is not None else None

    def sigmoid(logits):
        with torch.no_grad():
            y = torch.bernoulli(torch.sigmoid(logits))
        return Fn.binary_cross_entropy_with_logits(logits, y, reduction="sum")

    def softmax(logits):
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), 1).squeeze(-1)
        return Fn.cross_entropy(logits.reshape(-1, logits.shape[-1]), y, reduction="sum")

    def linear(logits):
        with torch.no_grad():
            y = logits + torch.randn_like(logits)
        return 0.5 * ((logits - y) ** 2).sum()

    samplers = {"sigmoid": sigmoid, "softmax": softmax, "linear": linear}
    if name not in samplers:
        raise ValueError(f"fisher='sampled' needs output_transfer in {sorted(samplers)} (the model's predictive "
                         f"distribution), got {name!r}")
    return samplers[name]
