"""Exceptions raised by the optimizer."""

__all__ = ["DivergenceError"]


class DivergenceError(FloatingPointError):
    """A step met a NaN or infinite loss or local update.

    The step was undone: every weight and every inner-optimizer state is
    exactly as it was before the step.  With ``check_finite="layer"`` only
    the layers the message names were undone (each exactly as before the
    step); the others kept their update.
    """
