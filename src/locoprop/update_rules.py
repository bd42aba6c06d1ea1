r"""Inner-optimizer updates on tensors, for the fast solver (:mod:`locoprop.fused`).

The fast solver does not call the inner optimizer's ``step``: it applies the
same recurrence itself, to the inner optimizer's own state tensors, so that
``state_dict``, checkpoints and the reference loop stay interchangeable
(paper Sec. 3.3: each layer's local problem is solved by a first-order
optimizer; reference notes, steps 5-6).  An :class:`UpdateRule` is that
recurrence, written over several layers' tensors at once with multi-tensor
(``torch._foreach_*``) operations:

========================  ======================================================  ==========================
inner optimizer           rule                                                    per-iteration scalars
========================  ======================================================  ==========================
``TFRMSprop``             :class:`TFRMSpropRule` (the paper's)                    ``η_k``
``torch.optim.SGD``       :class:`SGDRule` (momentum, Nesterov, weight decay)      ``η_k``
``torch.optim.Adam(W)``   :class:`AdamRule` (coupled or decoupled weight decay)    ``η_k``, ``η_k/c1``, ``√c2``, ``1-η_k λ``
``torch.optim.RMSprop``   :class:`RMSpropRule` (momentum, centered, weight decay)  ``η_k``
``torch.optim.Adagrad``   :class:`AdagradRule` (lr decay, weight decay)            ``η_k``, ``η_k/(1+(t-1)d)``
========================  ======================================================  ==========================

Everything that changes from one local iteration to the next (the local
learning rate ``η_k = η max(1 - k/T, 0.25)``, Adam's bias corrections at step
``t``, Adagrad's decayed rate) is a *per-iteration scalar*: the host computes
it for every layer and iteration (:meth:`UpdateRule.iteration_scalars`) into
the solver's table, and the update reads it from there as a 0-d device
tensor, so a captured CUDA graph follows learning-rate schedules and step
counts without recapture.  The hyper-parameters that do not change
(:meth:`UpdateRule.hyper`) are baked into a captured graph.

What a rule does not implement (AMSGrad, ``maximize``, dampening, the
optimizers' own ``capturable``/``fused``/``differentiable`` modes, other
optimizers) :func:`update_rule_for` names, and :class:`~locoprop.LocoProp`
then runs the reference loop (``backend="auto"``) or raises (``"fused"``).
"""

from __future__ import annotations

import functools
import types

import torch
from torch.optim import Optimizer

from .inner import TFRMSprop

__all__ = ["UpdateRule", "TFRMSpropRule", "SGDRule", "AdamRule", "RMSpropRule", "AdagradRule", "update_rule_for"]


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives a new ``step`` counter (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class UpdateRule:
    """One inner optimizer's update, applied to layers' tensors with per-iteration scalars per layer.

    ``state(p)`` returns (creating it like the optimizer would) the state
    tensors of parameter ``p`` in the optimizer's own ``state`` dict;
    ``update_layers`` overwrites the gradients (they are the solver's scratch
    buffers).  :attr:`scalars` is the number of per-iteration scalars the
    update reads: the first is always the local learning rate ``η_k``, the
    others are :meth:`iteration_scalars`.
    """

    scalars = 1

    def __init__(self, inner: Optimizer) -> None:
        self.inner = inner

    def _group(self) -> dict:
        return self.inner.param_groups[0]

    def hyper(self) -> tuple:
        """Hyper-parameters baked into a captured graph (a change makes a new capture)."""
        return ()

    def branches(self) -> tuple:
        """The conditions on :meth:`hyper` that decide which operations an update runs (weight decay or not,
        momentum or not), decided here on the host as Python bools and passed after :meth:`hyper` to the
        compiled kernels, which never compare a float: torch.compile specialises a float that a branch
        compares, one compilation per value."""
        return ()

    def kernel_hyper(self) -> tuple:
        """The hyper-parameters :attr:`tensor_kernel` reads (:meth:`hyper` unless a rule derives some on the host:
        torch.compile before PyTorch 2.13 specialises a float that reaches the program only inside an
        expression such as ``1 - β1``, one compilation per value)."""
        return self.hyper()

    def state(self, p: torch.Tensor) -> list[torch.Tensor]:
        raise TypeError(f"{type(self).__name__} must implement state")

    def steps_taken(self, p: torch.Tensor) -> int:
        """Updates the inner optimizer has counted for ``p`` (its ``step`` state; 0 before the first)."""
        step = self.inner.state.get(p, {}).get("step")
        return 0 if step is None else int(float(step))

    def iteration_scalars(self, params: list[torch.Tensor], rates: list[float], fresh: bool) -> list[list[float]]:
        """The per-iteration scalars after ``η_k``, one list per scalar, for a layer whose local learning rates
        are ``rates`` (``rates[k] = η_k``).  ``fresh``: the inner state is reset before this step (its
        step counter starts at 0)."""
        return []

    def table_key(self, groups: list[dict], fresh: bool) -> tuple | None:
        """What :meth:`iteration_scalars` reads beyond the groups' learning rates, for
        :meth:`~locoprop.fused.FusedIterativeSolver.host_table` to reuse a table while it is unchanged:
        ``()`` for a rule without per-iteration scalars; ``None`` (compute the table every step) for one with
        them, unless it overrides this method (Adam's bias corrections change at every step anyway)."""
        return () if type(self).iteration_scalars is UpdateRule.iteration_scalars else None

    def update_layers(self, layers: list[tuple]) -> None:
        """One update of several layers, ``layers[i] = (params, grads, states, scalars)`` with ``scalars`` a
        tuple of 0-d tensors (``η_k`` first): what does not depend on the scalars as one multi-tensor
        operation over every layer's tensors (elementwise, so the result is that of updating each layer
        alone, to the bit)."""
        raise TypeError(f"{type(self).__name__} must implement update_layers")

    #: ``kernel(p, g, state, scalars, hyper)``: one tensor's update, for :meth:`update_layers_compiled`.
    tensor_kernel = None

    def update_layers_compiled(self, layers: list[tuple]) -> None:
        """:meth:`update_layers` as one compiled program (:func:`each_tensor` of :attr:`tensor_kernel`): one
        pass over each tensor instead of one per operation (equal up to rounding: fused multiply-adds).  It
        sees flat plain tensors (not parameters, whose shapes torch.compile would specialise on), so one
        compilation serves every layer of the same number of tensors."""
        from .fused import compile_once

        params, grads, states = [p.detach() for p in _flat(layers, 0)], _flat(layers, 1), _flat(layers, 2)
        if not all(t.is_contiguous() for t in params + grads + [s for st in states for s in st]):
            return self.update_layers(layers)
        scalars = [sc for lay_params, _, _, sc in layers for _ in lay_params]
        compile_once(each_tensor(type(self).tensor_kernel))(
            [p.view(-1) for p in params], [g.view(-1) for g in grads], [[s.view(-1) for s in st] for st in states],
            scalars, self.kernel_hyper() + self.branches())

    def update_layer_compiled_with_change(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                                          states: list[list[torch.Tensor]], scalars: tuple,
                                          starts: list[torch.Tensor] | None,
                                          change_dtypes: list[torch.dtype]) -> list[torch.Tensor] | None:
        """One layer's update as one compiled program (:func:`each_tensor_with_change` of :attr:`tensor_kernel`)
        that reads each gradient in its parameter's dtype as it reads it (a bfloat16 product's result, without a
        float32 copy of it first) and, with ``starts`` (one tensor per parameter), returns each parameter's change
        ``p - start`` in ``change_dtypes[i]`` from the same pass: what the update form's next product reads
        (the fast solver's bf16 products on the CPU, :meth:`FusedIterativeSolver._bf16_chain_compiled
        <locoprop.fused.FusedIterativeSolver._bf16_chain_compiled>`).  Every tensor must be contiguous (the
        program sees flat views, as :meth:`update_layers_compiled`'s does); ``None`` without ``starts``."""
        from .fused import compile_once

        params = [p.detach() for p in params]
        flat_starts = [s.view(-1) for s in starts] if starts is not None else [None] * len(params)
        changes = compile_once(each_tensor_with_change(type(self).tensor_kernel))(
            [p.view(-1) for p in params], [g.view(-1) for g in grads], [[s.view(-1) for s in st] for st in states],
            [scalars] * len(params), self.kernel_hyper() + self.branches(), flat_starts, list(change_dtypes))
        return [c.view(p.shape) for c, p in zip(changes, params)] if starts is not None else None

    def update_layers_triton(self, layers: list[tuple], strict: bool = False, starts: list | None = None) -> bool:
        """:meth:`update_layers` with one Triton kernel launch per layer (:mod:`locoprop.triton_kernels`) where
        this rule has a kernel and every tensor suits it; ``False``, having changed nothing, where not (the
        caller then runs :meth:`update_layers`).  ``starts``: for each entry of ``layers``, ``None`` or one
        tensor per parameter; after the update each such parameter's change from it (``p - start``) is in
        its gradient tensor (the update form's next pre-activation reads it there)."""
        return False

    def count_steps(self, p: torch.Tensor, steps: int) -> None:
        """Host-side bookkeeping after ``steps`` updates of ``p``: the optimizer's ``step`` counter, where it
        keeps one."""
        st = self.inner.state.get(p)
        if st is not None and "step" in st:
            st["step"] += steps


class StepCounters:
    """The inner optimizer's per-parameter ``step`` counters advanced by one tensor operation a step.

    ``torch.optim`` (and :class:`~locoprop.inner.TFRMSprop`) keep each counter
    as a 0-d tensor, and adding to each of them is one tensor operation per
    parameter (16 for the standard autoencoder): host time that a captured
    step's replay (whose finite check reads a flag back) waits behind
    (``benchmarks/host_overhead.py``).  :meth:`advance` makes the counters
    views of one vector (same values, dtype and device, so ``state_dict``,
    checkpoints and the reference path see 0-d tensors as before) and then
    adds each parameter's number of local iterations to that vector in one
    ``add_``.  Where a counter is no longer the view it was made as
    (``load_state_dict``, a reset, a rollback that dropped a new state), the
    vector is made again from the counters' current values.
    """

    def __init__(self) -> None:
        self._views: list[torch.Tensor] = []
        self._vector: torch.Tensor | None = None
        self._increments: torch.Tensor | int = 0
        self._steps: list[int] = []

    def advance(self, rule: UpdateRule, params: list[torch.Tensor], steps: list[int]) -> None:
        """``rule.count_steps(p, steps[i])`` for ``p = params[i]``: the base rule's count
        (``state[p]["step"] += steps[i]``) as one addition to the shared vector; a rule that counts otherwise,
        or counters that are not all 0-d tensors of one kind, one parameter at a time."""
        if type(rule).count_steps is UpdateRule.count_steps and self._shared(rule, params, steps):
            self._vector.add_(self._increments)
            return
        for p, n in zip(params, steps):
            rule.count_steps(p, n)

    def _shared(self, rule: UpdateRule, params: list[torch.Tensor], steps: list[int]) -> bool:
        """Whether the counters of ``params`` are the vector's views, made so now where they can be."""
        states = [rule.inner.state.get(p) for p in params]
        counters = [None if st is None else st.get("step") for st in states]
        if len(counters) == len(self._views) and steps == self._steps and all(
                c is v for c, v in zip(counters, self._views)):
            return True
        return self._share(states, counters, steps)

    def _share(self, states: list, counters: list, steps: list[int]) -> bool:
        self._views, self._vector, self._steps = [], None, []
        if not counters or any(not torch.is_tensor(c) or c.dim() != 0 for c in counters):
            return False
        first = counters[0]
        if any(c.dtype != first.dtype or c.device != first.device or c.requires_grad for c in counters):
            return False
        self._vector = torch.stack([c.detach() for c in counters])
        self._views = list(self._vector.unbind(0))
        for st, view in zip(states, self._views):
            st["step"] = view
        self._steps = list(steps)
        self._increments = steps[0] if len(set(steps)) == 1 else torch.tensor(steps, dtype=first.dtype,
                                                                               device=first.device)
        return True


def _flat(layers: list[tuple], part: int) -> list:
    """Part ``part`` of every entry of an :meth:`UpdateRule.update_layers` list, concatenated: ``0`` the
    parameters, ``1`` the gradients, ``2`` the per-parameter state lists."""
    return [t for lay in layers for t in lay[part]]


#: At most this many pieces of a tensor share one workspace (:meth:`TFRMSpropRule.update_layers`); a tensor that
#: would need more gets a new tensor for its denominators, as without a workspace.
WORKSPACE_PIECES = 4


def _workspace_views(workspaces: list | None, *aligned: list[torch.Tensor]) -> list | None:
    """Flat views of ``workspaces[i]`` for the tensors ``aligned[0][i], aligned[1][i], ...`` (of one shape,
    updated together), each ``None`` where the workspace cannot serve them (another dtype or device, not
    contiguous, or smaller than ``1/WORKSPACE_PIECES`` of them); ``None`` where none can serve."""
    if workspaces is None:
        return None
    views = []
    for space, tensors in zip(workspaces, zip(*aligned)):
        t = tensors[0]
        fits = space is not None and space.dtype == t.dtype and space.device == t.device \
            and space.is_contiguous() and space.numel() * WORKSPACE_PIECES >= t.numel() \
            and all(u.is_contiguous() for u in tensors)
        views.append(space.view(-1) if fits else None)
    return views if any(v is not None for v in views) else None


def _pieces(*tensors: torch.Tensor, space: torch.Tensor | None):
    """``tensors`` (of one shape) cut into pieces of at most ``space.numel()`` elements, each with a view of
    ``space`` of its size: ``(piece of each tensor..., view)``; the whole tensors and a new tensor where
    ``space`` is ``None``."""
    if space is None:
        yield (*tensors, torch.empty_like(tensors[0]))
        return
    flat = [t.view(-1) for t in tensors]
    n, size = flat[0].numel(), space.numel()
    for start in range(0, n, size):
        end = min(start + size, n)
        yield (*(t[start:end] for t in flat), space[:end - start])


def _scale_each_layer(tensors: list, layers: list[tuple], which: int, op=torch._foreach_mul_) -> None:
    """Multiply (or ``op``: divide, ...) the tensors of each entry of ``layers`` (a list aligned with their
    parameters) by that entry's scalar ``which``."""
    start = 0
    for params, _, _, scalars in layers:
        n = len(params)
        op(tensors[start:start + n], scalars[which])
        start += n


# One tensor's update of each rule, the same recurrence as its update_layers (for torch.compile, which fuses it
# into one pass over the tensors): kernel(p, g, state, scalars, hyper) with the rule's state list, per-iteration
# scalars (0-d tensors, η_k first) and hyper-parameters (Python numbers, symbolic in the compiled program, so that
# a tuning worker's trials with new β1, β2, ... reuse one compilation).  The kernels multiply by them rather than
# pass them as an operator's scalar argument (lerp_'s weight, addcmul_'s value), which this test suite's process
# has seen torch.compile specialise on (a guard on 1 - α: one compilation per value, at most 8); they branch
# only on the bools of the rule's branches(), after the hyper-parameters, never on a float (UpdateRule.branches).
# Each float must also reach at least one tensor operation by itself: torch.compile in PyTorch 2.11 keeps a float
# symbolic only then, and specialises one that appears only inside an expression such as 1 - β1 (Adam's β1, seen
# on the H200 of session 18: one compilation per β1; PyTorch 2.13 keeps it symbolic).  So Adam's kernel takes
# 1 - β1 from the host (AdamRule.kernel_hyper).
def _tf_rmsprop_tensor_(p, g, state, scalars, hyper) -> None:
    (ms, m), lr, (alpha, mom, eps) = state, scalars[0], hyper
    ms.mul_(alpha).add_(g * g * (1.0 - alpha))  # not addcmul_(value=...): see the note above
    m.mul_(mom).add_(lr * g / (ms + eps).sqrt())  # (η g)/√(ms+ε), as TFRMSpropRule.update_layers rounds it
    p.sub_(m)


def _sgd_tensor_(p, g, state, scalars, hyper) -> None:
    lr, (mom, nesterov, decay, decays) = scalars[0], hyper
    if decays:
        g = g + decay * p
    if state:
        (buf,) = state
        buf.mul_(mom).add_(g)
        g = g + mom * buf if nesterov else buf
    p.sub_(g * lr)


def _adam_tensor_(p, g, state, scalars, hyper) -> None:
    (m, v), (_, step_size, correction2_sqrt, shrink), (one_minus_beta1, beta2, eps, decay, decoupled, decays) = \
        state, scalars, hyper
    if decays:
        if decoupled:
            p.mul_(shrink)
        else:
            g = g + decay * p
    m.add_((g - m) * one_minus_beta1)  # lerp_ (see the note above); 1 - β1 from the host (AdamRule.kernel_hyper)
    v.mul_(beta2).add_(g * g * (1.0 - beta2))
    p.sub_(m / (v.sqrt() / correction2_sqrt + eps) * step_size)


def _rmsprop_tensor_(p, g, state, scalars, hyper) -> None:
    lr, (alpha, eps, mom, centered, decay, decays, has_momentum) = scalars[0], hyper
    square = state[0]
    if decays:
        g = g + decay * p
    square.mul_(alpha).add_(g * g * (1.0 - alpha))
    if centered:
        average = state[-1]
        average.add_((g - average) * (1.0 - alpha))  # lerp_ (see _adam_tensor_)
        denom = (square - average * average).sqrt() + eps
    else:
        denom = square.sqrt() + eps
    if has_momentum:
        buf = state[1]
        buf.mul_(mom).add_(g / denom)
        p.sub_(buf * lr)
    else:
        p.sub_(g / denom * lr)


def _adagrad_tensor_(p, g, state, scalars, hyper) -> None:
    (total,), rate, (eps, decay, _, decays) = state, scalars[1], hyper
    if decays:
        g = g + decay * p
    total.addcmul_(g, g)
    p.sub_(g / (total.sqrt() + eps) * rate)


@functools.cache
def each_tensor(kernel):
    """``kernel`` over lists of tensors: one program for all the tensors of an update (what
    :meth:`UpdateRule.update_layers_compiled` compiles), named after the kernel (``_adam_tensors_``).

    Each kernel's loop is a function with its own code object: torch.compile keeps its compilations per
    code object (at most ``recompile_limit``, 8), so the rules' loops must not share one."""
    def update(params, grads, states, scalars, hyper) -> None:
        for p, g, st, sc in zip(params, grads, states, scalars):
            kernel(p, g, st, sc, hyper)
    return _renamed(update, kernel.__name__.replace("_tensor_", "_tensors_"))


def _renamed(loop, name: str):
    """``loop`` as a function named ``name`` with a code object of its own (torch.compile keeps its
    compilations per code object: see :func:`each_tensor`)."""
    renamed = types.FunctionType(loop.__code__.replace(co_name=name), loop.__globals__, name, None,
                                 loop.__closure__)
    renamed.__qualname__ = name
    return renamed


@functools.cache
def each_tensor_with_change(kernel):
    """``kernel`` over one layer's tensors, each gradient converted to its parameter's dtype as it is read (a bf16
    product's result to float32), and each parameter's
    change ``p - start`` after the update returned in ``dtypes[i]`` where ``starts[i]`` is given (what
    :meth:`UpdateRule.update_layer_compiled_with_change` compiles: the update form's weight change, rounded to
    bf16 for the next product, made in the pass that updates the weights), named after the kernel
    (``_tf_rmsprop_tensors_with_change_``; a code object of its own, as :func:`each_tensor` says why)."""
    def update(params, grads, states, scalars, hyper, starts, dtypes):
        changes = []
        for p, g, st, sc, start, dtype in zip(params, grads, states, scalars, starts, dtypes):
            kernel(p, g.to(p.dtype), st, sc, hyper)
            if start is not None:
                changes.append((p - start).to(dtype))
        return changes
    return _renamed(update, kernel.__name__.replace("_tensor_", "_tensors_with_change_"))


_tf_rmsprop_tensors_ = each_tensor(_tf_rmsprop_tensor_)


class TFRMSpropRule(UpdateRule):
    """:class:`~locoprop.inner.TFRMSprop`: ``ms ← α ms + (1-α) g²``, ``m ← μ m + η g/√(ms+ε)``, ``w ← w - m``."""

    tensor_kernel = staticmethod(_tf_rmsprop_tensor_)

    def hyper(self):
        g = self._group()
        return float(g["alpha"]), float(g["momentum"]), float(g["eps"])

    def state(self, p):
        s = self.inner._init_state(p)
        return [s["mean_square"], s["momentum_buffer"]]

    def update_layers(self, layers, workspaces=None):
        """See :meth:`UpdateRule.update_layers`.  ``workspaces``: one tensor per parameter (in the order of
        ``layers``) that holds nothing needed during the update, or ``None``.  The denominators ``√(ms+ε)``
        are then computed into it, in at most :data:`WORKSPACE_PIECES` pieces, instead of into a new tensor
        of each parameter's size: the same operations on each element, so the same bits (the fast solver
        passes each layer's residual buffer ``δ``, free once ``δᵀx`` is made, on the CPU)."""
        alpha, mom, eps = self.hyper()
        params, grads, states = _flat(layers, 0), _flat(layers, 1), _flat(layers, 2)
        squares = [s[0] for s in states]
        buffers = [s[1] for s in states]
        torch._foreach_mul_(squares, alpha)
        torch._foreach_addcmul_(squares, grads, grads, value=1.0 - alpha)
        spaces = _workspace_views(workspaces, squares, grads, buffers)
        if spaces is None:
            denom = torch._foreach_add(squares, eps)
            torch._foreach_sqrt_(denom)
        _scale_each_layer(grads, layers, 0)  # each layer's own η_k
        torch._foreach_mul_(buffers, mom)  # as TFRMSprop does (also for mom = 0: same rounding, same NaN)
        if spaces is None:
            torch._foreach_addcdiv_(buffers, grads, denom)  # m + (η g)/√(ms+ε): the division and the sum in one pass
        else:
            for square, grad, buffer, space in zip(squares, grads, buffers, spaces):
                for sq, g, buf, d in _pieces(square, grad, buffer, space=space):
                    buf.addcdiv_(g, torch.add(sq, eps, out=d).sqrt_())
        torch._foreach_sub_(params, buffers)

    def update_layers_triton(self, layers, strict=False, starts=None):
        """One launch per layer (weights and bias) instead of eight multi-tensor operations
        (:func:`locoprop.triton_kernels.tf_rmsprop_update_`; with ``starts``, the same launch writes each
        weight's change into its gradient).  Where a launch fails (Triton cannot compile the kernel for this
        device, say), the layers not yet updated get :meth:`update_layers` (and their changes by
        ``torch.sub``), the kernels are turned off for the process and a warning says why; with ``strict`` the
        error is raised instead."""
        from . import triton_kernels

        starts = [None] * len(layers) if starts is None else starts
        pairs = [(params[i:i + 2], grads[i:i + 2], states[i:i + 2], scalars, None if start is None else start[i:i + 2])
                 for (params, grads, states, scalars), start in zip(layers, starts) for i in range(0, len(params), 2)]
        if not all(triton_kernels.suits([p.detach() for p in params] + list(grads) + [s for st in states for s in st],
                                        scalars[0]) for params, grads, states, scalars, _ in pairs):
            return False
        alpha, mom, eps = self.hyper()

        def changes(params, grads, start):  # what the kernel writes with starts, where it did not
            for p, g, origin in zip(params, grads, start or []):
                torch.sub(p.detach(), origin, out=g)
        for done, (params, grads, states, scalars, start) in enumerate(pairs):
            in_kernel = start is not None and triton_kernels.suits(start, scalars[0])  # else torch.sub after it
            if not triton_kernels.launch_or_fall_back("TF-RMSProp", lambda: triton_kernels.tf_rmsprop_update_(
                    params, grads, states, scalars[0], alpha, mom, eps, **({"starts": start} if in_kernel else {})),
                    strict):
                rest = pairs[done:]
                self.update_layers([pair[:4] for pair in rest])
                for params, grads, _, _, start in rest:
                    changes(params, grads, start)
                break
            if not in_kernel:
                changes(params, grads, start)
        return True


class SGDRule(UpdateRule):
    """:class:`torch.optim.SGD` (``dampening=0``): ``g ← g + λ w``, ``m ← μ m + g``, ``w ← w - η m``
    (Nesterov: ``w ← w - η (g + μ m)``)."""

    tensor_kernel = staticmethod(_sgd_tensor_)

    def hyper(self):
        g = self._group()
        return float(g["momentum"]), bool(g["nesterov"]), float(g["weight_decay"])

    def branches(self):
        return (self.hyper()[2] != 0.0,)

    def state(self, p):
        if float(self._group()["momentum"]) == 0.0:
            return []
        s = self.inner.state[p]
        if s.get("momentum_buffer") is None:  # torch starts it at the first gradient: same as 0·μ + g
            s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [s["momentum_buffer"]]

    def update_layers(self, layers):
        mom, nesterov, decay = self.hyper()
        params, grads = _flat(layers, 0), _flat(layers, 1)
        if decay != 0.0:
            torch._foreach_add_(grads, params, alpha=decay)
        if mom != 0.0:
            buffers = [s[0] for s in _flat(layers, 2)]
            torch._foreach_mul_(buffers, mom)
            torch._foreach_add_(buffers, grads)
            if nesterov:
                torch._foreach_add_(grads, buffers, alpha=mom)
            else:
                torch._foreach_copy_(grads, buffers)
        _scale_each_layer(grads, layers, 0)
        torch._foreach_sub_(params, grads)


class AdamRule(UpdateRule):
    r""":class:`torch.optim.Adam` and :class:`torch.optim.AdamW` (``amsgrad=False``).

    At step ``t`` with local learning rate ``η_k``: ``g ← g + λ w`` (Adam's
    coupled weight decay) or ``w ← (1 - η_k λ) w`` (AdamW's decoupled one),
    ``m ← m + (1-β1)(g - m)``, ``v ← β2 v + (1-β2) g²``,
    ``w ← w - (η_k / c1) m / (√v / √c2 + ε)`` with ``c1 = 1 - β1^t``,
    ``c2 = 1 - β2^t``: torch's own recurrence, with the step-dependent
    factors ``η_k/c1``, ``√c2`` and ``1 - η_k λ`` as per-iteration scalars.
    """

    scalars = 4
    tensor_kernel = staticmethod(_adam_tensor_)

    def hyper(self):
        g = self._group()
        beta1, beta2 = g["betas"]
        return (float(beta1), float(beta2), float(g["eps"]), float(g["weight_decay"]),
                bool(g.get("decoupled_weight_decay", False)))

    def kernel_hyper(self):
        beta1, *rest = self.hyper()
        return (1.0 - beta1, *rest)

    def branches(self):
        return (self.hyper()[3] != 0.0,)

    def state(self, p):
        s = self.inner.state[p]
        if not s:  # as Adam's own lazy initialisation
            s["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [s["exp_avg"], s["exp_avg_sq"]]

    def iteration_scalars(self, params, rates, fresh):
        beta1, beta2, _, decay, decoupled = self.hyper()
        t0 = 0 if fresh else self.steps_taken(params[0])
        ts = [t0 + k + 1 for k in range(len(rates))]
        return [[lr / (1.0 - beta1 ** t) for lr, t in zip(rates, ts)],
                [(1.0 - beta2 ** t) ** 0.5 for t in ts],
                [1.0 - lr * decay if decoupled else 1.0 for lr in rates]]

    def update_layers(self, layers):
        beta1, beta2, eps, decay, decoupled = self.hyper()
        params, grads, states = _flat(layers, 0), _flat(layers, 1), _flat(layers, 2)
        means, squares = [s[0] for s in states], [s[1] for s in states]
        if decay != 0.0:
            if decoupled:
                _scale_each_layer(params, layers, 3)
            else:
                torch._foreach_add_(grads, params, alpha=decay)
        torch._foreach_lerp_(means, grads, 1.0 - beta1)
        torch._foreach_mul_(squares, beta2)
        torch._foreach_addcmul_(squares, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(squares)
        _scale_each_layer(denom, layers, 2, torch._foreach_div_)  # √v / √c2 of each layer's step
        torch._foreach_add_(denom, eps)
        torch._foreach_copy_(grads, means)  # the gradients are spent: the step goes in their buffers
        torch._foreach_div_(grads, denom)
        _scale_each_layer(grads, layers, 1)
        torch._foreach_sub_(params, grads)


class RMSpropRule(UpdateRule):
    r""":class:`torch.optim.RMSprop`: ``g ← g + λ w``, ``v ← α v + (1-α) g²``, ``d = √v + ε`` (centered:
    ``ḡ ← ḡ + (1-α)(g - ḡ)``, ``d = √(v - ḡ²) + ε``), then ``b ← μ b + g/d``, ``w ← w - η_k b`` with momentum
    ``μ > 0``, else ``w ← w - η_k g/d``.  (The mean square starts at 0 and ``ε`` is outside the root: not
    the paper's TF-RMSProp, :class:`TFRMSpropRule`.)"""

    tensor_kernel = staticmethod(_rmsprop_tensor_)

    def hyper(self):
        g = self._group()
        return float(g["alpha"]), float(g["eps"]), float(g["momentum"]), bool(g["centered"]), float(g["weight_decay"])

    def branches(self):
        _, _, mom, _, decay = self.hyper()
        return decay != 0.0, mom > 0

    def state(self, p):
        alpha, eps, mom, centered, _ = self.hyper()
        s = self.inner.state[p]
        if not s:  # as RMSprop's own lazy initialisation
            s["step"] = torch.zeros((), dtype=_scalar_dtype())
            s["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if mom > 0:
                s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if centered:
                s["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [s[k] for k in ("square_avg", "momentum_buffer", "grad_avg") if k in s]

    def update_layers(self, layers):
        alpha, eps, mom, centered, decay = self.hyper()
        params, grads, states = _flat(layers, 0), _flat(layers, 1), _flat(layers, 2)
        if decay != 0.0:
            torch._foreach_add_(grads, params, alpha=decay)
        squares = [s[0] for s in states]
        torch._foreach_mul_(squares, alpha)
        torch._foreach_addcmul_(squares, grads, grads, value=1.0 - alpha)
        if centered:
            averages = [s[-1] for s in states]  # the last: after the momentum buffer, if any
            torch._foreach_lerp_(averages, grads, 1.0 - alpha)
            denom = torch._foreach_addcmul(squares, averages, averages, value=-1)
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(squares)
        torch._foreach_add_(denom, eps)
        if mom > 0:
            buffers = [s[1] for s in states]
            torch._foreach_mul_(buffers, mom)
            torch._foreach_addcdiv_(buffers, grads, denom)
            torch._foreach_copy_(grads, buffers)
        else:
            torch._foreach_div_(grads, denom)
        _scale_each_layer(grads, layers, 0)
        torch._foreach_sub_(params, grads)


class AdagradRule(UpdateRule):
    r""":class:`torch.optim.Adagrad`: ``g ← g + λ w``, ``s ← s + g²``, ``w ← w - η_k/(1 + (t-1) d) · g/(√s + ε)``
    at step ``t`` with learning-rate decay ``d`` (the decayed rate is a per-iteration scalar)."""

    scalars = 2
    tensor_kernel = staticmethod(_adagrad_tensor_)

    def hyper(self):
        g = self._group()
        return float(g["eps"]), float(g["weight_decay"]), float(g["lr_decay"])

    def branches(self):
        return (self.hyper()[1] != 0.0,)

    def state(self, p):
        s = self.inner.state[p]
        if not s:  # Adagrad initialises its state when it is built; this is for a state cleared since
            value = float(self._group()["initial_accumulator_value"])
            s["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            s["sum"] = torch.full_like(p, value, memory_format=torch.preserve_format)
        return [s["sum"]]

    def iteration_scalars(self, params, rates, fresh):
        _, _, lr_decay = self.hyper()
        t0 = 0 if fresh else self.steps_taken(params[0])
        return [[lr / (1.0 + (t0 + k) * lr_decay) for k, lr in enumerate(rates)]]

    def update_layers(self, layers):
        eps, decay, _ = self.hyper()
        params, grads, states = _flat(layers, 0), _flat(layers, 1), _flat(layers, 2)
        if decay != 0.0:
            torch._foreach_add_(grads, params, alpha=decay)
        sums = [s[0] for s in states]
        torch._foreach_addcmul_(sums, grads, grads, value=1)
        denom = torch._foreach_sqrt(sums)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(grads, denom)
        _scale_each_layer(grads, layers, 1)
        torch._foreach_sub_(params, grads)


def _unsupported_modes(g: dict, *keys: str) -> str | None:
    on = [k for k in ("maximize", "capturable", "differentiable", "fused", *keys) if g.get(k)]
    return ", ".join(on) if on else None


def update_rule_for(inner: Optimizer | None) -> tuple[UpdateRule | None, str | None]:
    """The :class:`UpdateRule` of ``inner``, or ``(None, reason)``."""
    if inner is None:
        return None, "no inner optimizer"
    groups = inner.param_groups
    if not isinstance(inner, Optimizer):  # a view of some layers' groups (layer sharding): the optimizer's rule
        inner = inner.inner
    first = groups[0]
    if any(g.get(k) != first.get(k) for g in groups for k in g if k not in ("params", "lr")):
        return None, "inner optimizer groups differ in hyper-parameters other than lr"
    name = type(inner).__name__
    if type(inner) is TFRMSprop:
        return TFRMSpropRule(inner), None
    rules = {torch.optim.SGD: (SGDRule, ("dampening",)), torch.optim.Adam: (AdamRule, ("amsgrad",)),
             torch.optim.AdamW: (AdamRule, ("amsgrad",)), torch.optim.RMSprop: (RMSpropRule, ()),
             torch.optim.Adagrad: (AdagradRule, ())}
    if type(inner) not in rules:
        return None, (f"inner optimizer {name} (the fast path implements TFRMSprop, SGD, Adam, AdamW, RMSprop "
                      "and Adagrad)")
    rule, extra = rules[type(inner)]
    modes = _unsupported_modes(first, *extra)
    if modes:
        return None, f"inner optimizer {name} with {modes}"
    return rule(inner), None
