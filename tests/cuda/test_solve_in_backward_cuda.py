"""``solve_in_backward=True`` on CUDA: each layer's local problem solved eagerly by the fast solver during the
backward pass, on the pass's stream (the default CUDA step solves every layer after the pass, captured).  The
same steps as the captured solve, a diverged step undone with the copy on the device or in host memory, and a
lower peak."""

import gc

import pytest
import torch

import locoprop
from test_errors import _assert_unchanged, _snapshot
from test_fused_cuda import DEV, _batches, _loss, _model, _opt, _rel


class _NaNFirst(locoprop.MDTarget):
    """A NaN target for layer '0', the last one the pass solves: every layer before it is already updated."""

    def __call__(self, batch, gamma):
        target = super().__call__(batch, gamma)
        return target * float("nan") if batch.layer.name == "0" else target


@pytest.mark.parametrize("settings", [dict(rollback="device"), dict(rollback="host"), dict(check_finite=False)])
def test_solving_in_the_pass_on_cuda_equals_the_captured_solve(settings):
    """Six steps solved during the pass, each layer eagerly (no graph captured), within 1e-5 of the default
    step, which solves every layer after the pass in a CUDA graph on the layer streams."""
    in_model, after_model = _model(), _model()
    during = _opt(in_model, solve_in_backward=True, **settings)
    after = _opt(after_model)  # backend auto: fused, streams, CUDA graph
    for x in _batches(6):
        assert during._solves_in_backward([None], False)
        during.step(lambda: _loss(in_model(x), x))
        after.step(lambda: _loss(after_model(x), x))
    assert during.last_solver == after.last_solver == "fused"
    assert during.fused_solver.last_mode == "eager" and not during.fused_solver._graphs
    assert after.fused_solver.last_mode.startswith("graph")
    assert _rel(in_model, after_model) < 1e-5


@pytest.mark.parametrize("rollback", ["device", "host"])
@pytest.mark.parametrize("solve_in_backward", [True, "overlap"])
def test_a_diverged_layer_in_the_pass_on_cuda_undoes_every_layer(rollback, solve_in_backward):
    """A NaN target in the last layer solved during the pass: DivergenceError naming it, every layer's weights
    and inner state as they were, whether the copy is taken layer by layer on the device or in host memory,
    and whether the layers are solved on the pass's stream or on their own beside it (``"overlap"``)."""
    model = _model()
    opt = _opt(model, solve_in_backward=solve_in_backward, rollback=rollback)
    x = _batches(1)[0]
    opt.step(lambda: _loss(model(x), x))
    snap = _snapshot(model, opt)
    opt.variant = opt.variant.with_components(_NaNFirst(), None, None, None)
    with pytest.raises(locoprop.DivergenceError, match=r"layer\(s\) \['0'\]"):
        opt.step(lambda: _loss(model(x), x))
    _assert_unchanged(model, opt, snap)


def _peak_mb(settings: dict) -> float:
    """Peak allocated memory of three steps from a clean slate (cuBLAS's workspaces and the cache freed first,
    the memory already allocated subtracted): model, inner state, workspaces, graphs and the steps' tensors."""
    gc.collect()
    torch.cuda.synchronize(DEV)
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(DEV)
    base = torch.cuda.memory_allocated(DEV)
    model = _model()
    opt = _opt(model, **settings)
    for x in _batches(3):
        opt.step(lambda: _loss(model(x), x))
    torch.cuda.synchronize(DEV)
    return (torch.cuda.max_memory_allocated(DEV) - base) / 2 ** 20


def test_solving_in_the_pass_on_cuda_holds_less_at_the_peak():
    """Solving in the pass with the copy in host memory holds less than the default step, which holds every
    layer's target at once, the copy on the device and a cuBLAS workspace per layer stream."""
    peaks = {name: _peak_mb(settings) for name, settings in (
        ("default", {}), ("in the pass", dict(solve_in_backward=True, rollback="host")))}
    assert peaks["in the pass"] < peaks["default"], peaks


@pytest.mark.parametrize("graphed", [False, True])
@pytest.mark.parametrize("settings", [dict(), dict(check_finite=False), dict(rollback="host"),
                                      dict(check_finite="layer"), dict(layer_streams=2), dict(precision="tf32"),
                                      dict(precision="bf16")])
def test_solving_beside_the_pass_on_layer_streams_equals_the_captured_solve(graphed, settings):
    """``solve_in_backward="overlap"``: each layer's chain on its layer stream, forked as the pass is done with
    its weights and joined when the pass ends, eagerly or inside ``graphed_step``'s one graph; six steps within
    1e-5 of the default step (every layer after the pass, in the same precision: TF32 and bf16 in the update form,
    whose a₀, W₀ and b₀ the side streams read too), and no stream left unjoined."""
    over_model, after_model = _model(), _model()
    over = _opt(over_model, solve_in_backward="overlap", **settings)
    after = _opt(after_model, precision=settings.get("precision", "auto"))
    assert over._overlaps_backward()
    static_x = torch.empty(256, 784, device=DEV)
    step = over.graphed_step(lambda: _loss(over_model(static_x), static_x)) if graphed else None
    for x in _batches(6):
        if graphed:
            static_x.copy_(x)
            step()
        else:
            over.step(lambda: _loss(over_model(x), x))
        after.step(lambda: _loss(after_model(x), x))
    assert not over.fused_solver._forked
    if graphed:
        assert step.last_mode == "replay"
    assert _rel(over_model, after_model) < 1e-5


def test_a_diverged_captured_step_beside_the_pass_is_undone():
    """``"overlap"`` inside ``graphed_step``: a batch of NaNs after the capture, and the step's flag, read after
    the replay, undoes every layer's update from the copies taken in the graph, also after an eager step in
    between (a last, smaller batch, which takes copies of its own)."""
    model = _model()
    opt = _opt(model, solve_in_backward="overlap")
    static_x = _batches(1)[0]
    step = opt.graphed_step(lambda: _loss(model(static_x), static_x))
    for _ in range(3):  # two warm-ups, then the capture
        step()
    assert step.last_mode == "capture"
    half = static_x[:128].clone()
    opt.step(lambda: _loss(model(half), half))
    step()
    snap = _snapshot(model, opt)
    static_x.fill_(float("nan"))
    with pytest.raises(locoprop.DivergenceError):
        step()
    assert step.last_mode == "replay"
    _assert_unchanged(model, opt, snap)
