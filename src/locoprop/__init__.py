"""LocoProp: enhancing BackProp via local loss optimization (Amid, Anil, Warmuth, AISTATS 2022).

The optimizer is :class:`LocoProp`; its components live in
:mod:`locoprop.transfer` (Table 2), :mod:`locoprop.targets`,
:mod:`locoprop.losses`, :mod:`locoprop.regularizers` (Sec. 2, App. E),
:mod:`locoprop.variants` (named combinations), :mod:`locoprop.layers` (layer
discovery), :mod:`locoprop.solvers` (local iterations, closed form),
:mod:`locoprop.fused` (the fast layer-parallel solver: CUDA streams and graphs,
reduced-precision products), :mod:`locoprop.inner` (inner optimizers) and :mod:`locoprop.rollback` (the copy
that undoes a diverged step or layer).  The experiment harness is
:mod:`locoprop.harness`.
"""

from .errors import DivergenceError
from .inner import INNER_OPTIMIZERS, TFRMSprop
from .layers import Layer, check_solvable_layers, discover_layers, split_frozen_layers
from .losses import DualMatchingLoss, LocalLoss, MatchingLoss, SquaredPostLoss, SquaredPreLoss
from .fused import FusedIterativeSolver
from .optimizer import CapturedStep, LocoProp
from .regularizers import FisherProximity, L1Proximity, L2Proximity, Regularizer
from .targets import (DualMDTarget, GDTarget, GradientStepTarget, MDTarget, NaturalGradientTarget, PostGDTarget,
                      Target)
from .transfer import TRANSFER_FUNCTIONS, TransferFunction, get_transfer, register_transfer
from .variants import VARIANTS, Variant, get_variant

__version__ = "0.1.0"

__all__ = [
    "LocoProp", "CapturedStep", "FusedIterativeSolver", "DivergenceError", "TFRMSprop", "INNER_OPTIMIZERS",
    "Layer", "discover_layers", "split_frozen_layers", "check_solvable_layers",
    "LocalLoss", "SquaredPreLoss", "MatchingLoss", "SquaredPostLoss", "DualMatchingLoss",
    "Regularizer", "L2Proximity", "L1Proximity", "FisherProximity",
    "Target", "GradientStepTarget", "GDTarget", "MDTarget", "NaturalGradientTarget", "PostGDTarget", "DualMDTarget",
    "TransferFunction", "TRANSFER_FUNCTIONS", "get_transfer", "register_transfer",
    "Variant", "VARIANTS", "get_variant",
]
