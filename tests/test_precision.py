"""The local products' precision against PyTorch's float32 matrix-product setting (locoprop.precision).

PyTorch says whether float32 CUDA products may use TF32 in two ways, ``allow_tf32`` and (since 2.9)
``fp32_precision``, and reading the old one after the new one was set raises.  These tests set PyTorch's global
settings (they hold on the CPU too, without a GPU) and restore them."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import locoprop
from locoprop.fused import FusedIterativeSolver
from locoprop.optimizer import CapturedStep
from locoprop.precision import (PRECISIONS, cuda_matmul_tf32, float32_products, matmul_precision, products_precision,
                                set_cuda_matmul_tf32)

CUDA, ONEDNN = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul


@pytest.fixture(autouse=True)
def _restore_settings():
    before = CUDA.fp32_precision, ONEDNN.fp32_precision
    yield
    torch.set_float32_matmul_precision("highest")  # the legacy setting back to its default first
    CUDA.fp32_precision, ONEDNN.fp32_precision = before
    assert CUDA.allow_tf32 is False  # readable: no mix of the two ways left behind


def test_a_tf32_solve_works_where_the_process_set_tf32_the_new_way():
    """The bug this module fixed: ``precision="tf32"`` read ``allow_tf32``, which raises once
    ``fp32_precision`` was set."""
    CUDA.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new"):
        CUDA.allow_tf32  # noqa: B018  (what the library no longer reads)
    for precision, inside in (("tf32", True), ("fp32", False), ("bf16", True), ("auto", True)):
        with matmul_precision(precision):
            assert cuda_matmul_tf32() is inside, precision
        assert CUDA.fp32_precision == "tf32", precision
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6))
    opt = locoprop.LocoProp(model, precision="tf32", local_steps=2, output_transfer="linear")
    x = torch.randn(8, 6)
    opt.step(lambda: ((model(x) - x) ** 2).sum())
    assert CUDA.fp32_precision == "tf32"


@pytest.mark.parametrize("how", ["legacy", "new", "float32_matmul_precision"])
def test_the_setting_is_read_and_restored_whichever_way_the_process_set_it(how):
    if how == "legacy":
        CUDA.allow_tf32 = True
    elif how == "new":
        CUDA.fp32_precision = "tf32"
    else:
        torch.set_float32_matmul_precision("high")
    assert cuda_matmul_tf32()
    assert products_precision("auto", cuda=True) == "tf32"
    assert products_precision("auto", cuda=False) == "fp32"  # TF32 is a CUDA mode
    with float32_products(False):
        assert not cuda_matmul_tf32()
        assert ONEDNN.fp32_precision == "ieee"
        with float32_products(True):
            assert cuda_matmul_tf32()
        assert not cuda_matmul_tf32()
    assert cuda_matmul_tf32()
    if how != "new":  # the old way still reads as it was set
        assert CUDA.allow_tf32 is True


@pytest.mark.parametrize("setting", ["highest", "high", "medium"])
@pytest.mark.parametrize("tf32", [False, True])
def test_inside_the_two_settings_agree_and_outside_each_is_as_it_was(setting, tf32):
    """The context moves PyTorch's older setting with the newer one (torch.compile, among others, reads
    ``allow_tf32``, which raises where the two disagree), and restores both: "medium" stays "medium"."""
    torch.set_float32_matmul_precision(setting)
    before = CUDA.fp32_precision, ONEDNN.fp32_precision, torch.get_float32_matmul_precision()
    with float32_products(tf32):
        assert CUDA.allow_tf32 is tf32 and cuda_matmul_tf32() is tf32
        torch.get_float32_matmul_precision()  # readable
        if not tf32:
            assert ONEDNN.fp32_precision == "ieee"
    assert (CUDA.fp32_precision, ONEDNN.fp32_precision, torch.get_float32_matmul_precision()) == before


def test_with_pytorchs_defaults_float32_writes_nothing():
    """Where the setting already says float32 the context leaves it alone (no write: the newer setting stays
    "none", which a write would make "ieee")."""
    assert CUDA.fp32_precision == "none"
    with float32_products(False):
        assert CUDA.fp32_precision == "none"


class _OlderCuBLAS:
    """``torch.backends.cuda.matmul`` of a PyTorch before 2.9: ``allow_tf32`` a view of the one older setting."""

    @property
    def allow_tf32(self):
        return torch.get_float32_matmul_precision() != "highest"

    @allow_tf32.setter
    def allow_tf32(self, value):
        torch.set_float32_matmul_precision("high" if value else "highest")


def test_on_an_older_pytorch_medium_stays_medium(monkeypatch):
    """Without ``fp32_precision`` the context sets ``allow_tf32`` and restores the older setting itself, since
    ``allow_tf32 = True`` would turn "medium" into "high"."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", _OlderCuBLAS())
    torch.set_float32_matmul_precision("medium")
    assert cuda_matmul_tf32()
    with float32_products(False):
        assert not cuda_matmul_tf32()
    assert torch.get_float32_matmul_precision() == "medium"
    set_cuda_matmul_tf32(False)
    assert torch.get_float32_matmul_precision() == "highest"


def test_without_tf32_auto_is_float32_and_the_other_settings_are_themselves():
    assert not cuda_matmul_tf32()
    assert [products_precision(p, cuda=True) for p in PRECISIONS] == ["fp32", "fp32", "tf32", "bf16"]
    assert [products_precision(p, cuda=False) for p in PRECISIONS] == ["fp32", "fp32", "fp32", "bf16"]
    set_cuda_matmul_tf32(True)
    assert [products_precision(p, cuda=True) for p in PRECISIONS] == ["tf32", "fp32", "tf32", "bf16"]
    set_cuda_matmul_tf32(False)
    assert not cuda_matmul_tf32()


def test_the_fast_solver_takes_the_update_form_where_auto_resolves_to_tf32():
    """``"auto"`` on CUDA where PyTorch allows TF32 is ``"tf32"``: the products round, so LocoProp keeps the
    forward pass's ``â`` for the update form; ``"fp32"`` never rounds."""
    auto, fp32 = FusedIterativeSolver(), FusedIterativeSolver("fp32")
    assert auto.precision == "auto"
    assert not auto.rounds_products(cuda=True) and not fp32.rounds_products(cuda=True)
    torch.set_float32_matmul_precision("high")
    assert auto.rounds_products(cuda=True) and auto.products_precision(cuda=True) == "tf32"
    assert not auto.rounds_products(cuda=False) and not fp32.rounds_products(cuda=True)


def test_the_update_form_is_kept_only_for_the_fast_solver():
    """Where ``"auto"`` resolves to TF32 the problems keep the forward pass's ``â`` and weights for the fast
    solver's update form; not where the readable loop solves (``backend="reference"``, or a regularizer the
    fast solver lacks), whose products have no update form."""
    def model():
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6))
    fast = locoprop.LocoProp(model(), local_steps=2, output_transfer="linear")
    reference = locoprop.LocoProp(model(), local_steps=2, output_transfer="linear", backend="reference")
    l1 = locoprop.LocoProp(model(), local_steps=2, output_transfer="linear", regularizer=locoprop.L1Proximity(0.1))
    set_cuda_matmul_tf32(True)
    assert [o._rounds_products(cuda=True) for o in (fast, reference, l1)] == [True, False, False]
    assert not fast._rounds_products(cuda=False)
    set_cuda_matmul_tf32(False)
    assert not fast._rounds_products(cuda=True)


class _ProductSettings(TorchDispatchMode):
    """Whether TF32 was allowed at each matrix product, and whether oneDNN's were float32."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "baddbmm"):
            self.seen.append((cuda_matmul_tf32(), ONEDNN.fp32_precision))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_the_local_products_run_in_float32_whatever_the_global_setting(backend, precision):
    """With PyTorch's setting at "medium" (TF32 on CUDA, oneDNN's float32 products in bfloat16), the forward and
    backward pass run as it says and the local products of either solver in float32 (``"auto"`` on the CPU is
    float32 too), the setting as it was after the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6))
    x = torch.randn(8, 6)
    opt = locoprop.LocoProp(model, precision=precision, backend=backend, local_steps=3, solve_in_backward=False,
                            output_transfer="linear")
    torch.set_float32_matmul_precision("medium")
    seen = _ProductSettings()
    with seen:
        opt.step(lambda: ((model(x) - x) ** 2).sum())
    forward_backward, local = (True, "bf16"), (False, "ieee")
    assert seen.seen[0] == forward_backward  # the closure's first product: PyTorch's setting
    assert set(seen.seen) == {forward_backward, local}
    assert seen.seen.count(local) >= 2 * (2 * 3 - 1)  # both layers' local iterations (the first needs one product)
    assert (cuda_matmul_tf32(), ONEDNN.fp32_precision) == forward_backward
    assert opt.last_solver == ("reference" if backend == "reference" else "fused")


def test_a_captured_step_is_captured_again_when_the_setting_changes():
    """The whole-step graph holds the forward and backward pass (and ``"auto"``'s local products) as PyTorch's
    setting was at its capture: its key changes with the setting, so a replay never runs the other one."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6))
    opt = locoprop.LocoProp(model, local_steps=2, output_transfer="linear")
    step = object.__new__(CapturedStep)  # its key alone (a capture needs CUDA)
    step.optimizer, step._model_params = opt, None
    before = step._hyper_key()
    set_cuda_matmul_tf32(True)
    assert step._hyper_key() != before
    set_cuda_matmul_tf32(False)
    assert step._hyper_key() == before
    opt.fused_solver.precision = "fp32"
    assert step._hyper_key() != before


def test_reduced_precision_on_the_readable_loop_is_refused_and_settings_change_between_steps():
    """``backend="reference"`` with ``"tf32"`` or ``"bf16"`` took the readable loop's float32 products without a
    word; now it is refused, at construction and when either setting changes later, which leaves both as they
    were.  A change that the fast solver allows reaches it."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6))
    with pytest.raises(ValueError, match=r"backend='reference', precision='bf16': the readable loop"):
        locoprop.LocoProp(model, backend="reference", precision="bf16", output_transfer="linear")
    opt = locoprop.LocoProp(model, backend="reference", output_transfer="linear")
    with pytest.raises(ValueError, match=r"backend='reference', precision='tf32'"):
        opt.precision = "tf32"
    assert (opt.backend, opt.precision, opt.fused_solver.precision) == ("reference", "auto", "auto")
    opt.backend = "fused"
    opt.precision = "bf16"
    assert (opt.backend, opt.precision, opt.fused_solver.precision) == ("fused", "bf16", "bf16")
    with pytest.raises(ValueError, match=r"backend='reference', precision='bf16'"):
        opt.backend = "reference"
    with pytest.raises(ValueError, match="backend: expected one of"):
        opt.backend = "cuda"
    assert opt.backend == "fused"
    closed = locoprop.LocoProp(model, variant="S-closed", output_transfer="linear")
    with pytest.raises(ValueError, match="the fast solver runs local iterations"):
        closed.precision = "bf16"
    assert closed.precision == "auto"


def test_a_captured_step_warms_up_again_when_a_setting_changes(monkeypatch):
    """``graphed_step`` captures after eager warm-up steps (a capture must not compile or load a kernel); when a
    setting of its key changes (here PyTorch's TF32 setting, under which ``"auto"`` makes other products), it
    warms up again before capturing anew.  Run on the CPU: the CUDA streams stand in as no-ops and the capture
    as one eager step body with a replay that does nothing (as ``benchmarks/host_overhead.py`` does)."""
    import contextlib

    import locoprop.optimizer as optimizer_module

    class _Stream:
        def wait_stream(self, other):
            pass

    class _Graph:
        def replay(self):
            pass
    monkeypatch.setattr(optimizer_module, "graph_side_stream", lambda device: _Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args, **kwargs: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6))
    opt = locoprop.LocoProp(model, local_steps=2, output_transfer="linear", check_finite=False)
    x = torch.randn(4, 6)
    step = object.__new__(CapturedStep)  # __init__ refuses a CPU model; the attributes it sets:
    step.optimizer, step.closure, step.warmup, step.calls = opt, lambda: ((model(x) - x) ** 2).sum(), 2, 0
    step.other_grads, step.last_mode, step._model_params, step._rule = [], "", None, None
    step.graph, step._key, step._copies, step._warmed = None, None, (), None
    step._static_table, step._grouped_staging, step._staging_finalizer = None, None, None

    def capture(hyper, table):
        loss, problems = opt._step_body([step.closure])
        opt.fused_solver.prepare_capture(table, opt.param_groups, table.dtype, table.device)
        step._static_table = opt.fused_solver.static_table
        step.graph, step._key, step.flag = _Graph(), step._graph_key(hyper, table), torch.tensor(True)
        step.loss, step.problems = loss.detach(), problems
    step._capture = capture
    modes = []
    for tf32 in (False, False, False, False, True, True, True, True, False, False, False):
        set_cuda_matmul_tf32(tf32)
        step()
        modes.append(step.last_mode)
    assert modes == ["eager", "eager", "capture", "replay", "eager", "eager", "capture", "replay", "eager", "eager",
                     "capture"], modes


def test_precision_names_what_it_takes():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6))
    with pytest.raises(ValueError, match=r"precision: expected one of \('auto', 'fp32', 'tf32', 'bf16'\)"):
        locoprop.LocoProp(model, precision="fp16", output_transfer="linear")
    assert locoprop.LocoProp(model, output_transfer="linear").precision == "auto"
