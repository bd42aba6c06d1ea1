from dataclasses import dataclass, field

import pytest


@dataclass
class NewtonRoots:
    """What the library's coupled Newton root (``compute_power_schur_newton``) did under a test: ``calls`` counts
    its calls (set it to 0 between runs); ``overrides`` replace its keyword arguments (e.g. a tighter
    tolerance) while it still computes the root."""

    calls: int = 0
    overrides: dict = field(default_factory=dict)


@pytest.fixture
def newton_roots(monkeypatch) -> NewtonRoots:
    import pytorch_optimizer.optimizer.utils.preconditioner as pc_module

    roots = NewtonRoots()
    original = pc_module.compute_power_schur_newton

    def counted_newton(*args, **kwargs):
        roots.calls += 1
        return original(*args, **{**kwargs, **roots.overrides})

    monkeypatch.setattr(pc_module, "compute_power_schur_newton", counted_newton)
    return roots
