"""Named LocoProp variants: each is a target, a local loss, a regularizer and a solver.

The paper frames every update as these three components (Sec. 2, "loss,
target, regularizer"); a variant is nothing but a named combination.

| name (aliases) | target | local loss | solver | paper |
| --- | --- | --- | --- | --- |
| ``S`` (``locoprop-s``) | GD | squared, pre | iterative | Alg. 1 |
| ``M`` (``locoprop-m``) | MD | matching | iterative | Alg. 2 |
| ``post-S`` (``post-locoprop-s``, ``pocoprop-s``) | post-GD | squared, post | iterative | Alg. 3, Eq. 16 |
| ``poco-M`` (``pocoprop-m``) | dual-MD | dual matching | iterative | Alg. 4, Eq. 18 |
| ``S-natural`` | natural gradient | squared, pre | iterative | Prop. 1 |
| ``S-closed`` | GD | squared, pre | closed form | Eq. 4 solved, Sec. 2.1 |
| ``S-natural-closed`` | natural gradient | squared, pre | closed form | Eq. 15 |

The closed-form variants use ``L2Proximity(coef=None)`` (``c = 1/η``, the
paper's regularizer); the iterative ones ``L2Proximity(0)`` (the reference
notebook's implicit regularization).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .losses import DualMatchingLoss, LocalLoss, MatchingLoss, SquaredPostLoss, SquaredPreLoss
from .regularizers import L1Proximity, L2Proximity, Regularizer
from .targets import DualMDTarget, GDTarget, MDTarget, NaturalGradientTarget, PostGDTarget, Target

__all__ = ["Variant", "VARIANTS", "get_variant", "SOLVERS"]

SOLVERS = ("iterative", "closed_form")


@dataclass(frozen=True)
class Variant:
    """A named combination of the three components and a solver."""

    name: str
    target: Target
    local_loss: LocalLoss
    regularizer: Regularizer
    solver: str = "iterative"

    @property
    def needs_transfer(self) -> bool:
        return self.target.needs_transfer or self.local_loss.needs_transfer

    @property
    def needs_grad_post(self) -> bool:
        return self.target.needs_grad_post

    @property
    def needs_sampled_grad(self) -> bool:
        return getattr(self.target, "needs_sampled_grad", False) or getattr(
            self.regularizer, "needs_sampled_grad", False
        )

    def validate(self) -> None:
        """Check that the components fit together; errors name the argument."""
        if self.target.domain != self.local_loss.domain:
            raise ValueError(
                f"target {self.target!r} gives {self.target.domain}-activation targets but local_loss "
                f"{self.local_loss!r} takes {self.local_loss.domain}-activation targets"
            )
        if self.solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {SOLVERS}, got {self.solver!r}")
        if self.solver == "closed_form":
            if not isinstance(self.local_loss, SquaredPreLoss):
                raise ValueError(
                    "solver='closed_form' solves the squared pre-activation loss (LocoProp-S, Eq. 4); "
                    f"local_loss is {self.local_loss!r}"
                )
            if not isinstance(self.regularizer, L2Proximity) or self.regularizer.coef == 0.0:
                raise ValueError(
                    "solver='closed_form' needs regularizer=L2Proximity(coef>0 or None for 1/lr); "
                    f"got {self.regularizer!r}"
                )

    def with_components(self, target=None, local_loss=None, regularizer=None, solver=None) -> "Variant":
        """This variant with the given components replaced (``None`` keeps the variant's)."""
        changes = {k: v for k, v in dict(target=target, local_loss=local_loss, regularizer=regularizer,
                                         solver=solver).items() if v is not None}
        return replace(self, **changes) if changes else self


def _variants() -> dict[str, Variant]:
    return {
        "S": Variant("LocoProp-S", GDTarget(), SquaredPreLoss(), L2Proximity(0.0)),
        "M": Variant("LocoProp-M", MDTarget(), MatchingLoss(), L2Proximity(0.0)),
        "post-S": Variant("Post-LocoProp-S", PostGDTarget(), SquaredPostLoss(), L2Proximity(0.0)),
        "poco-M": Variant("PocoProp-M", DualMDTarget(), DualMatchingLoss(), L2Proximity(0.0)),
        "S-natural": Variant("LocoProp-S (natural-gradient targets)", NaturalGradientTarget(), SquaredPreLoss(),
                             L2Proximity(0.0)),
        "S-closed": Variant("LocoProp-S (closed form)", GDTarget(), SquaredPreLoss(), L2Proximity(None),
                            "closed_form"),
        "S-natural-closed": Variant("LocoProp-S (natural-gradient targets, closed form, Eq. 15)",
                                    NaturalGradientTarget(), SquaredPreLoss(), L2Proximity(None), "closed_form"),
    }


VARIANTS: dict[str, Variant] = _variants()

_ALIASES = {
    "s": "S", "locoprop-s": "S", "locoprop_s": "S",
    "m": "M", "locoprop-m": "M", "locoprop_m": "M",
    "post-s": "post-S", "post-locoprop-s": "post-S", "pocoprop-s": "post-S",
    "poco-m": "poco-M", "pocoprop-m": "poco-M",
    "s-natural": "S-natural", "locoprop-s-natural": "S-natural",
    "s-closed": "S-closed", "locoprop-s-closed": "S-closed",
    "s-natural-closed": "S-natural-closed",
}


def get_variant(name: str | Variant) -> Variant:
    """A variant by name (case-insensitive, aliases in the module docstring)."""
    if isinstance(name, Variant):
        return name
    key = _ALIASES.get(str(name).lower(), name)
    if key not in VARIANTS:
        raise ValueError(f"variant: unknown variant {name!r}; valid names are {sorted(VARIANTS)}")
    return VARIANTS[key]


def make_regularizer(spec, coef=None) -> Regularizer:
    """A regularizer from a name (``"l2"``, ``"l1"``, ``"fisher"``) or an instance."""
    from .regularizers import FisherProximity

    if isinstance(spec, Regularizer):
        return spec
    if spec == "l2":
        return L2Proximity(0.0 if coef is None else coef)
    if spec == "l2-paper":
        return L2Proximity(None)
    if spec == "l1":
        return L1Proximity(1.0 if coef is None else coef)
    if spec == "fisher":
        return FisherProximity(1.0 if coef is None else coef)
    raise ValueError(f"regularizer: expected 'l2', 'l2-paper', 'l1', 'fisher' or a Regularizer, got {spec!r}")
