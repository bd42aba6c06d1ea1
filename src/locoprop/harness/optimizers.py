"""Every optimizer of the paper by name, behind one interface: ``step(closure) -> loss``.

LocoProp variants come from :class:`locoprop.LocoProp` (used as any user
would); first-order methods, Shampoo and K-FAC from
:mod:`locoprop.harness.baselines`.  Hyper-parameters use the paper's names
(Tables 3-5): ``lr`` (η), ``beta1``, ``beta2``, ``eps``, ``activation_lr``
(γ), ``local_steps`` (T), ``inverse_every`` (the "@k" of Shampoo and K-FAC).
"""

from __future__ import annotations

from torch import nn

import locoprop

from .baselines import BASELINE_NAMES, build_baseline
from .models import OUTPUT_TRANSFER

__all__ = ["LOCOPROP_VARIANTS", "OPTIMIZER_NAMES", "build_optimizer", "inner_kwargs_for", "is_locoprop"]

#: Harness names of the LocoProp variants (see :data:`locoprop.VARIANTS`).
LOCOPROP_VARIANTS = {
    "locoprop-s": "S",
    "locoprop-m": "M",
    "post-locoprop-s": "post-S",
    "pocoprop-m": "poco-M",
    "locoprop-s-natural": "S-natural",
    "locoprop-s-closed": "S-closed",
    "locoprop-s-natural-closed": "S-natural-closed",
}
OPTIMIZER_NAMES = tuple(BASELINE_NAMES) + tuple(LOCOPROP_VARIANTS)


def is_locoprop(name: str) -> bool:
    return name in LOCOPROP_VARIANTS


def inner_kwargs_for(inner: str, beta1: float | None, beta2: float | None, eps: float | None) -> dict:
    """Map the paper's (β1, β2, ε) onto the inner optimizer's torch.optim names."""
    kw: dict = {}
    if inner in ("tf_rmsprop", "rmsprop"):  # both name them momentum, alpha (the decay), eps
        if beta1 is not None:
            kw["momentum"] = beta1
        if beta2 is not None:
            kw["alpha"] = beta2
        if eps is not None:
            kw["eps"] = eps
    elif inner in ("adam", "adamw"):
        if beta1 is not None or beta2 is not None:
            kw["betas"] = (0.9 if beta1 is None else beta1, 0.999 if beta2 is None else beta2)
        if eps is not None:
            kw["eps"] = eps
    elif inner in ("momentum", "nesterov"):
        if beta1 is not None:
            kw["momentum"] = beta1
    elif inner == "adagrad":
        if eps is not None:
            kw["eps"] = eps
    return kw


def build_optimizer(name: str, model: nn.Module, loss_fn: nn.Module, *, lr: float, beta1: float | None = None,
                    beta2: float | None = None, eps: float | None = None, activation_lr: float = 1.0,
                    local_steps: int = 10, inner: str = "tf_rmsprop", inverse_every: int = 1,
                    damping: float | None = None, precision: str = "fp32", kl_clip: float | None = None,
                    rollback: str = "device", check_finite: bool | str = True, compile_elementwise: bool = False,
                    triton_elementwise: bool | None = None, solve_order: str = "layer-major",
                    solve_in_backward: bool | str | None = None, shampoo_root: str = "newton"):
    """An optimizer with ``step(closure)``, ``param_groups`` and ``state_dict``.

    ``precision``, ``rollback``, ``check_finite``, ``compile_elementwise``, ``triton_elementwise``,
    ``solve_order`` and ``solve_in_backward`` are :class:`locoprop.LocoProp`'s arguments of the same names
    (LocoProp optimizers only);
    ``kl_clip`` and ``shampoo_root`` are :func:`~locoprop.harness.baselines.build_baseline`'s (K-FAC and Shampoo only).

    Raises ``ValueError`` naming ``optimizer`` and the valid names when ``name`` is unknown.
    """
    if name in LOCOPROP_VARIANTS:
        return locoprop.LocoProp(
            model, variant=LOCOPROP_VARIANTS[name], lr=lr, activation_lr=activation_lr, local_steps=local_steps,
            inner=inner, inner_kwargs=inner_kwargs_for(inner, beta1, beta2, eps), output_transfer=OUTPUT_TRANSFER,
            precision=precision, rollback=rollback, check_finite=check_finite, compile_elementwise=compile_elementwise,
            triton_elementwise=triton_elementwise, solve_order=solve_order, solve_in_backward=solve_in_backward,
        )
    if name in BASELINE_NAMES:
        return build_baseline(name, model, loss_fn, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                              inverse_every=inverse_every, damping=damping, kl_clip=kl_clip,
                              shampoo_root=shampoo_root)
    raise ValueError(f"optimizer: unknown optimizer {name!r}; valid names are {list(OPTIMIZER_NAMES)}")
