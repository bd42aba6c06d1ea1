"""Inner optimizers for the local iterations (paper Sec. 3.3, Fig. 3c).

Each LocoProp layer solves its local problem with a first-order optimizer.
The paper's results use TensorFlow-1's RMSProp with momentum, whose semantics
differ from :class:`torch.optim.RMSprop` (reference notes, "The inner
optimizer"); :class:`TFRMSprop` implements it.  Every other inner optimizer is
taken from :mod:`torch.optim` by name, with hyper-parameters under torch's own
names.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

__all__ = ["TFRMSprop", "INNER_OPTIMIZERS", "make_inner_optimizer"]


class TFRMSprop(Optimizer):
    r"""TensorFlow-1 ``RMSPropOptimizer`` with momentum (the paper's optimizer).

    For each parameter ``w`` with gradient ``g``::

        ms  = alpha * ms + (1 - alpha) * g**2          # ms starts at 1.0, not 0
        mom = momentum * mom + lr * g / sqrt(ms + eps)  # eps inside the root
        w   = w - mom

    ``alpha`` is TensorFlow's ``decay`` (the paper's beta2), ``momentum`` its
    beta1.  Defaults are TensorFlow's (``decay=0.9, momentum=0, eps=1e-10``).
    ``foreach=True`` (the default) updates every tensor with multi-tensor
    kernels; ``foreach=False`` is the readable single-tensor reference.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        alpha: float = 0.9,
        momentum: float = 0.0,
        eps: float = 1e-10,
        foreach: bool | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"TFRMSprop: lr must be >= 0, got {lr}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"TFRMSprop: alpha (the decay of the mean square) must be in [0, 1), got {alpha}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"TFRMSprop: momentum must be in [0, 1), got {momentum}")
        if not eps >= 0.0:
            raise ValueError(f"TFRMSprop: eps must be >= 0, got {eps}")
        defaults = dict(lr=lr, alpha=alpha, momentum=momentum, eps=eps, foreach=foreach)
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["mean_square"] = torch.ones_like(p, memory_format=torch.preserve_format)
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One update of every parameter with a gradient (the recurrence in the class docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, squares, buffers = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("TFRMSprop does not support sparse gradients")
                state = self._init_state(p)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                squares.append(state["mean_square"])
                buffers.append(state["momentum_buffer"])
            if not params:
                continue
            lr, alpha, mom, eps = group["lr"], group["alpha"], group["momentum"], group["eps"]
            if group["foreach"] is not False:
                torch._foreach_mul_(squares, alpha)
                torch._foreach_addcmul_(squares, grads, grads, value=1.0 - alpha)
                denom = torch._foreach_add(squares, eps)
                torch._foreach_sqrt_(denom)
                steps = torch._foreach_mul(grads, lr)  # (lr g) / denom, rounded as locoprop.fused does
                torch._foreach_mul_(buffers, mom)
                torch._foreach_addcdiv_(buffers, steps, denom)
                torch._foreach_sub_(params, buffers)
            else:
                for p, g, ms, buf in zip(params, grads, squares, buffers):
                    ms.mul_(alpha).addcmul_(g, g, value=1.0 - alpha)
                    buf.mul_(mom).addcdiv_(g * lr, (ms + eps).sqrt())
                    p.sub_(buf)
        return loss


def _sgd(params, lr, **kw):
    return torch.optim.SGD(params, lr=lr, **kw)


def _momentum(params, lr, **kw):
    kw.setdefault("momentum", 0.9)
    return torch.optim.SGD(params, lr=lr, **kw)


def _nesterov(params, lr, **kw):
    kw.setdefault("momentum", 0.9)
    kw.setdefault("nesterov", True)
    return torch.optim.SGD(params, lr=lr, **kw)


#: Inner optimizers by name.  ``momentum`` and ``nesterov`` are
#: :class:`torch.optim.SGD` with ``momentum=0.9`` unless ``inner_kwargs`` says
#: otherwise.
INNER_OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "nesterov": _nesterov,
    "adam": lambda params, lr, **kw: torch.optim.Adam(params, lr=lr, **kw),
    "adamw": lambda params, lr, **kw: torch.optim.AdamW(params, lr=lr, **kw),
    "rmsprop": lambda params, lr, **kw: torch.optim.RMSprop(params, lr=lr, **kw),
    "adagrad": lambda params, lr, **kw: torch.optim.Adagrad(params, lr=lr, **kw),
    "tf_rmsprop": lambda params, lr, **kw: TFRMSprop(params, lr=lr, **kw),
}


def make_inner_optimizer(inner, params, lr: float, inner_kwargs: dict | None = None) -> Optimizer:
    """Build the inner optimizer over ``params``.

    ``inner`` is a name of :data:`INNER_OPTIMIZERS` or any
    :class:`torch.optim.Optimizer` subclass, built as ``inner(params, lr=lr,
    **inner_kwargs)``.  Errors name the argument and list the valid choices.
    """
    kwargs = dict(inner_kwargs or {})
    if "lr" in kwargs:
        raise ValueError("inner_kwargs: do not pass 'lr'; the local learning rate is LocoProp's 'lr'")
    if isinstance(inner, str):
        key = inner.lower().replace("-", "_")
        if key not in INNER_OPTIMIZERS:
            raise ValueError(
                f"inner: unknown inner optimizer {inner!r}; valid names are "
                f"{sorted(INNER_OPTIMIZERS)} or a torch.optim.Optimizer subclass"
            )
        factory = INNER_OPTIMIZERS[key]
    elif isinstance(inner, type) and issubclass(inner, Optimizer):
        factory = inner
    else:
        raise TypeError(
            f"inner: expected a name in {sorted(INNER_OPTIMIZERS)} or a torch.optim.Optimizer "
            f"subclass, got {inner!r}"
        )
    try:
        return factory(params, lr=lr, **kwargs)
    except TypeError as exc:
        raise TypeError(f"inner_kwargs {kwargs} are not accepted by inner optimizer {inner!r}: {exc}") from exc
