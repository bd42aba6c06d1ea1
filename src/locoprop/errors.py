"""Exceptions raised by the optimizer."""

__all__ = ["DivergenceError"]


class DivergenceError(FloatingPointError):
    """A step met a NaN or infinite loss or local update.

    The step was undone: every weight and every inner-optimizer state is
    exactly as it was before the step.
    """
