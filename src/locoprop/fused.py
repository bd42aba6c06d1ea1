r"""Fast local solver: every layer's ``T`` local iterations as one layer-parallel program.

The reference :class:`~locoprop.solvers.IterativeSolver` loops over
iterations, then layers, in Python and calls the inner optimizer's ``step``
once per iteration.  Each layer's local problem is independent of every other
layer's (paper Sec. 3.4, "embarrassingly parallel"), so this solver instead
runs each layer's whole chain of ``T`` iterations (Algorithms 1-4, reference
notes steps 4-5) as one unit:

* the local gradient ``δᵀx̃`` and ``Σδ`` are written into persistent buffers
  (no allocation per iteration), one for all the layers whose chains run one
  after another on a stream (the CPU, ``layer_streams=False`` or fewer
  streams than layers), sized by the largest of them; ``δ`` of the first
  iteration is the problem's
  :attr:`~locoprop.solvers.LocalProblem.residual` (made from the forward
  pass's pre-activation, which is freed before the solve), and later
  iterations compute the pre-activation and ``δ`` in place in that same
  tensor.  Where LocoProp-M kept a layer's output ``ŷ = f(â)`` instead of
  ``â`` and of the residual (:meth:`LocoProp._shares_post
  <locoprop.LocoProp._shares_post>`), the first iteration computes
  ``δ = ŷ - y`` (Eq. 2) into a scratch buffer, one for the layers whose
  chains run one after another on a stream (:meth:`FusedIterativeSolver._scratch`);
* the inner-optimizer update is done here, on the inner optimizer's own state
  tensors (so ``state_dict``, checkpoints and the reference path stay
  interchangeable), with the local learning rates
  ``η_k = η max(1 - k/T, 0.25)`` read from a device tensor, so nothing returns
  to the host inside a step;
* ``order="iteration-major"`` instead runs iteration ``k`` of every layer
  (each layer's products on its stream), then one multi-tensor
  inner-optimizer update of all layers, then iteration ``k + 1``: the same
  arithmetic in fewer kernels (issue 5's first lead);
* ``order="grouped"`` (CUDA, experimental) runs iteration ``k`` of every
  layer as two Triton launches in all: one computes every layer's ``δ`` tile
  by tile, the product ``x Wᵀ`` in the tile and ``f(â) - y`` applied to it
  before it leaves the registers, the other every layer's ``δᵀx`` and ``Σδ``
  tile by tile, applying TF-RMSProp's update to each tile of the weights as
  it is summed, so the local gradients are never written to memory
  (:func:`locoprop.triton_kernels.grouped_residual_`, issue 5's leads of
  one kernel for all layers and of fused elementwise chains): ``2T``
  launches per solve where the other orders issue hundreds;
* on CUDA each layer's chain is issued on its own stream, so small layers run
  beside large ones, and the whole solve is captured in a CUDA graph and
  replayed on later steps (static shapes; a new shape, dtype or parameter
  storage makes a new capture).  A graph reads the step's own inputs, targets
  and residuals where they lie: PyTorch's caching allocator gives a training
  loop's tensors the same few addresses step after step, so a handful of
  graphs (one per recurring layout, sharing one memory pool) cover it without
  copying anything; only when the inputs keep moving does one more graph read
  static copies of them;
* ``precision="tf32"`` or ``"bf16"`` runs the local products in TF32 or with
  bfloat16 operands, accumulating in float32 (on CUDA a bf16 product writes
  its float32 result straight into the float32 buffer,
  ``torch.mm(..., out_dtype=torch.float32)``; on the CPU, whose bf16 product
  has no float32 output in PyTorch, the result is rounded to bf16 once).  The
  residual, the gradients' sums and the inner optimizer's state stay in
  float32.  The pre-activation is computed in the *update form*
  ``a₀ + x (W - W₀)ᵀ + (b - b₀)``: ``a₀`` is the forward pass's float32
  pre-activation and ``W₀, b₀`` the weights it was made with (the rollback's
  copy where it lies on the device), so only the product of the weights'
  change is rounded.  A plain reduced-precision product ``x Wᵀ`` errs by
  about 2⁻⁹ of the activation (bf16), and the residual ``f(a) - y`` that
  the iterations follow is a small difference of two such numbers when γ is
  small: with the notebook's γ = 10 one plain bf16 step of the MNIST
  autoencoder lands 3.8% from the float32 step, the update form 0.05%,
  what the weight gradient's bf16 product alone costs
  (``benchmarks/precision_error.py``, ``results/precision-error/``).  It
  keeps one more activation set (``a₀``) for the solve.  TF32 is a CUDA
  mode: on the CPU ``"tf32"`` computes in float32, as ``"fp32"`` does.

It supports the inner optimizers whose update it implements
(:mod:`locoprop.update_rules`: :class:`~locoprop.inner.TFRMSprop`, and
:class:`torch.optim.SGD`, ``Adam``, ``AdamW``, ``RMSprop`` and ``Adagrad``
with torch's own recurrences) and the
:class:`~locoprop.regularizers.L2Proximity` regularizer;
:meth:`FusedIterativeSolver.unsupported` names what else makes
:class:`~locoprop.LocoProp` fall back to the reference path.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import warnings
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from . import triton_kernels
from .losses import LocalLoss
from .precision import PRECISIONS, matmul_precision, products_precision
from .regularizers import L2Proximity, Regularizer
from .solvers import LocalProblem, local_lr
from .update_rules import (AdagradRule, AdamRule, RMSpropRule, SGDRule, StepCounters, TFRMSpropRule,  # noqa: F401
                           UpdateRule, update_rule_for)

__all__ = ["PRECISIONS", "SOLVE_ORDERS", "matmul_precision", "compile_once", "FusedIterativeSolver", "UpdateRule",
           "TFRMSpropRule", "SGDRule", "AdamRule", "RMSpropRule", "AdagradRule", "update_rule_for",
           "cpu_has_fast_bf16_products"]

SOLVE_ORDERS = ("layer-major", "iteration-major", "grouped")


def _residual_and_bias_grad_(loss, pre, target, transfer, bias_grad):
    """``δ`` of a local iteration in place in ``pre`` and, with a bias, ``Σδ`` into ``bias_grad`` (for
    ``torch.compile``, which fuses the transfer function, the difference and the column sum)."""
    delta = loss.grad_(pre, target, transfer)
    if bias_grad is not None:
        bias_grad.copy_(delta.sum(0))
    return delta


def _bf16_residual_(loss, product, start_pre, bias_change, target, transfer):
    """Iteration ``k ≥ 1``'s ``δ`` in the update form from the bf16 product ``x (W - W₀)ᵀ`` as the CPU's bf16
    product writes it: ``a₀ + product + (b - b₀)`` in float32 (the same two roundings as the eager path's
    float32 copy of the product and its two additions), ``f``, minus the target (Eq. 2's gradient).  Returns
    ``δ`` rounded to bf16, the operand of ``δᵀx``, and, with a bias, ``Σδ`` of the float32 ``δ`` (else
    ``None``): for ``torch.compile``, one pass over the product, ``a₀`` and the target."""
    pre = product.float() + start_pre
    if bias_change is not None:
        pre = pre + bias_change
    delta = loss.grad_(pre, target, transfer)
    return delta.to(torch.bfloat16), delta.sum(0) if bias_change is not None else None


def _has_float32_output_mm() -> bool:
    schemas = torch._C._jit_get_schemas_for_operator("aten::mm")
    return any(getattr(s, "overload_name", "") == "dtype_out" for s in schemas)


_MM_OUT_DTYPE = _has_float32_output_mm()


def bf16_product_has_float32_output(device: torch.device) -> bool:
    """Whether a bfloat16 matrix product on ``device`` can write its float32 accumulator out unrounded
    (``torch.mm(a, b, out_dtype=torch.float32)``: on CUDA where PyTorch has that overload; not on the CPU)."""
    return _MM_OUT_DTYPE and device.type == "cuda"


def cpu_has_fast_bf16_products() -> bool:
    """Whether PyTorch's CPU kernels multiply bfloat16 matrices at a useful rate on this machine (oneDNN's bf16
    path: AVX512 or native bf16 instructions, ``torch.ops.mkldnn._is_mkldnn_bf16_supported``).  Where not (a
    CPU with AVX2 alone), a bf16 product ran 126 times slower than a float32 one in session 13
    (``results/perf/cpu-x86_64-2threads-2026-11-28-session13-avx2.json``).  ``True`` where PyTorch cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


_COMPILED: dict = {}


_UNCOMPILED: set = set()  # kernels that reached torch.compile's recompile limit: they run eagerly from then on
_RECOMPILE_LIMIT_HIT = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())


def compile_once(fn):
    """``torch.compile(fn)`` (shapes dynamic: one compilation serves every layer), made once per process.

    A kernel compiled ``torch._dynamo.config.recompile_limit`` times already (a process that trains many
    models or settings one after another) runs uncompiled from then on, with a warning: the same
    arithmetic, rounded as the eager update rounds it.  Any other failure (no compiler for this device,
    say) is raised as a ``RuntimeError`` that names the option ``compile_elementwise``."""
    if fn not in _COMPILED:
        kernel = torch.compile(fn, dynamic=True, fullgraph=True)

        @functools.wraps(fn)
        def call(*args):
            if fn in _UNCOMPILED:
                return fn(*args)
            try:
                return kernel(*args)
            except _RECOMPILE_LIMIT_HIT:  # raised before the kernel ran: nothing was changed
                _UNCOMPILED.add(fn)
                warnings.warn(f"compile_elementwise: {fn.__name__} reached torch.compile's recompile limit "
                              f"({torch._dynamo.config.recompile_limit}: new shapes or settings in one process); "
                              "it runs uncompiled from now on", RuntimeWarning, stacklevel=2)
                return fn(*args)
            except torch._dynamo.exc.TorchDynamoException as exc:  # compile errors, not the kernel's own
                raise RuntimeError(f"compile_elementwise: torch.compile of {fn.__name__} failed "
                                   f"({type(exc).__name__}: {exc}); use compile_elementwise=False") from exc
        _COMPILED[fn] = call
    return _COMPILED[fn]


# ---------------------------------------------------------------------------------------------------------------
# the solver
# ---------------------------------------------------------------------------------------------------------------
_STREAMS: dict = {}  # device -> the streams of every solver on it (cuBLAS workspaces are per stream)


def _shared_streams(device: torch.device, n: int) -> list:
    pool = _STREAMS.setdefault(str(device), [])
    while len(pool) < n:
        pool.append(torch.cuda.Stream(device=device))
    return pool[:n]


_GRAPH_STREAMS: dict = {}  # device -> the side stream of its CUDA graphs' warm-ups and captures


def graph_side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The one side stream per device on which LocoProp warms up and captures its CUDA graphs (the warm-up
    off the current stream, as capture requires).  One for every warm-up and capture of the process, not a
    new stream each time nor ``torch.cuda.graph``'s own capture stream beside it: cuBLAS keeps a workspace
    for every stream it has run on (32 MiB on Hopper) for as long as the process lives."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _GRAPH_STREAMS.get(str(device))
    if stream is None:
        stream = _GRAPH_STREAMS[str(device)] = torch.cuda.Stream(device=device)
    return stream


@contextlib.contextmanager
def capturing_graph(graph: "torch.cuda.CUDAGraph", **kwargs):
    """``torch.cuda.graph(graph, **kwargs)`` with Python's garbage collector run before the capture and paused
    during it.  A dead reference cycle that holds a CUDA graph (an earlier optimizer's, a failed step's
    traceback) can otherwise be collected mid-capture: destroying a graph while a stream captures is not
    permitted, and it invalidates the capture (seen on the H200 of session 18: "operation failed due to a
    previous error during capture" after "operation not permitted when stream is capturing (function reset)").
    Recent PyTorch no longer collects before a capture unless ``torch.compiler.config.force_cudagraph_gc``."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, **kwargs):
            yield
    finally:
        if enabled:
            gc.enable()


def _aligned_offsets(numels: list[int], alignment: int = 64) -> list[int]:
    """Where each of tensors of ``numels`` elements starts in one flat buffer, each start a multiple of
    ``alignment`` elements, and, last, the buffer's length."""
    offsets, at = [], 0
    for n in numels:
        offsets.append(at)
        at += -(-n // alignment) * alignment
    return offsets + [at]


@dataclass
class _Layer:
    """One layer's tensors for the fused chain (persistent across steps)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: list[list[torch.Tensor]]
    steps: int


@dataclass
class _Chain:
    """One layer's local problem during one solve: its tensors, inputs and product functions."""

    layer: _Layer
    index: int  # the layer's row in the learning-rate table
    scratch: torch.Tensor  # the first residual δ₀, then each iteration's pre-activation and δ, in place
    target: torch.Tensor
    anchor: list[torch.Tensor] | None
    transfer: object
    pre: object  # pre(W, b, out, free): the pre-activation x W̃ᵀ + b̃ into out (free: the gradient buffers)
    wgrad: object  # wgrad(δ, out): δᵀx into out
    post: torch.Tensor | None = None  # ŷ = f(â₀) where δ₀ is computed from it into scratch (not yet there)
    #: The update form's starting weights ``[W₀, b₀]`` and pre-activation ``a₀`` where ``pre`` is the solver's
    #: own update form (it then takes ``ready`` and ``fold``: :meth:`FusedIterativeSolver._products`), else
    #: ``None``.
    start_params: list[torch.Tensor] | None = None
    start_pre: torch.Tensor | None = None
    #: Whether the last update wrote the weights' change ``W - W₀``, ``b - b₀`` into the gradient buffers
    #: (:meth:`FusedIterativeSolver.writes_change`), for the next ``pre`` to read.
    change_ready: bool = False


def _tensors_of(inputs) -> list[torch.Tensor]:
    """The tensors of :meth:`FusedIterativeSolver._run`'s ``inputs`` (``x``, the scratch or first residual, the
    target, the anchor, the update form's start, the kept output)."""
    out = []
    for x, delta, target, anchor, _, start, post in inputs:
        out += [x, delta, target] + list(anchor or []) + ([post] if post is not None else [])
        out += [start[0], *start[1]] if start is not None else []
    return out


class GroupedStaging:
    """Pinned host memory that the CUDA graphs of one owner (the solver's own captured solves, or one captured whole
    step) copy the grouped kernels' tables from at each replay (:meth:`FusedIterativeSolver._grouped_device_table`):
    made outside a capture (pinning memory during one is not permitted), each table a slice of its own, never
    written again while its graphs live.  ``held``: those tables' device tensors (memory of the graphs' pools).
    :meth:`release` lets both go, after waiting for the device: a replay still in flight may read them.  An owner
    dropped without :meth:`release` (a captured step no longer referenced) retires its staging (:meth:`retire`):
    the buffers are let go when the next staging is made, outside any capture, after waiting for the device."""

    ELEMENTS = 1 << 13
    #: Stagings retired by owners that are gone, kept until a wait for the device (:meth:`_let_retired_go`).
    _retired: list = []

    def __init__(self, device: torch.device) -> None:
        self._let_retired_go()
        self.device = device
        self.buffers = [torch.empty(self.ELEMENTS, dtype=torch.int64, pin_memory=True)]
        self.used = 0  # elements of the last buffer in use
        self.held: list[torch.Tensor] = []

    @classmethod
    def _let_retired_go(cls) -> None:
        if cls._retired:
            for device in {staging.device for staging in cls._retired}:
                torch.cuda.synchronize(device)
            cls._retired.clear()

    @staticmethod
    def retire(staging: "GroupedStaging | None") -> None:
        """Keep ``staging`` until a wait for the device (no CUDA call here: this may run in a finaliser)."""
        if staging is not None:
            GroupedStaging._retired.append(staging)

    def reserve(self, n: int) -> None:
        """Outside a capture: room for ``n`` more elements (another pinned buffer where the last lacks it)."""
        if self.used + n > self.buffers[-1].numel():
            self.buffers.append(torch.empty(max(self.ELEMENTS, n), dtype=torch.int64, pin_memory=True))
            self.used = 0

    def table(self, host: torch.Tensor) -> torch.Tensor:
        """Inside a capture: a device tensor of the graph, filled in the graph by a copy from a slice of pinned
        memory (kept by :meth:`reserve` before the capture) that holds ``host``."""
        n = host.numel()
        buffer = self.buffers[-1]
        if self.used + n > buffer.numel():
            raise RuntimeError("FusedIterativeSolver: order='grouped' has no pinned staging memory left for the "
                               f"tables of this CUDA graph ({buffer.numel() - self.used} of {n} elements)")
        view = buffer[self.used:self.used + n]
        view.copy_(host)
        self.used += n
        table = torch.empty(n, dtype=torch.int64, device=self.device)
        table.copy_(view, non_blocking=True)
        self.held.append(table)
        return table

    def release(self) -> None:
        """Outside a capture, once the graphs that read this staging are gone: its memory may be written again."""
        if self.used or len(self.buffers) > 1:
            torch.cuda.synchronize(self.device)
        self.buffers, self.used, self.held = self.buffers[:1], 0, []


class _CapturedSolve:
    """A CUDA graph of the whole solve with the static inputs it reads."""

    def __init__(self, static: list[dict], graph) -> None:
        self.static = static
        self.graph = graph


class FusedIterativeSolver:
    """Layer-parallel local iterations on persistent buffers (see the module docstring).

    Args:
        precision: ``"auto"`` (default: TF32 on CUDA where PyTorch's float32
            matrix-product setting allows it, else float32), ``"fp32"``
            (float32 whatever that setting), ``"tf32"`` or ``"bf16"`` for the
            local matrix products (:mod:`locoprop.precision`).
        cuda_graph: on CUDA, capture the solve in a CUDA graph after one eager
            warm-up step with the same shapes and replay it afterwards
            (:attr:`max_zero_copy_graphs`).
        layer_streams: on CUDA, run the layers' chains side by side on streams:
            ``True`` one stream per layer, an integer ``n`` at most ``n``
            streams (layers shared out by their product cost), ``False`` none.
            The streams come from one pool per device shared by every solver
            (cuBLAS keeps a workspace per stream: 32 MiB on Hopper).
        compile_elementwise: fuse the elementwise work of an iteration with
            ``torch.compile`` (experimental, off by default): ``δ`` with the
            bias gradient ``Σδ`` in one kernel, and the TF-RMSProp update in
            one pass over each tensor instead of eight.  With bf16 products on
            the CPU (no float32 output there) each layer's chain runs as two
            compiled programs an iteration that read the products' bf16
            results as they are, the update also making the next product's
            bf16 weight change (:meth:`_bf16_chain_compiled`).  It compiles on
            the first step (tens of seconds) and agrees with the eager update
            up to rounding (fused multiply-adds).
        triton_elementwise: the elementwise work of each layer and iteration as
            Triton kernels (:mod:`locoprop.triton_kernels`): the inner
            optimizer's update in one launch instead of eight multi-tensor
            operations (TF-RMSProp, the paper's inner optimizer; the other
            rules keep their multi-tensor update), and ``δ`` with ``Σδ`` in
            one launch instead of three (the matching loss of tanh, the
            sigmoid, the identity, ReLU and the leaky ReLU, and the squared
            loss).  ``None``
            (default): on CUDA where Triton is installed, falling back to
            PyTorch's operations with a warning if a kernel fails to compile;
            ``True``: required (an error where they cannot run; on the CPU
            they run under ``TRITON_INTERPRET=1`` only); ``False``: never.
            ``compile_elementwise`` takes precedence.
        order: ``"layer-major"`` (default): each layer's ``T`` iterations
            run as one chain, the chains side by side on the layer streams;
            ``"iteration-major"``: iteration ``k`` of every layer, then one
            multi-tensor inner-optimizer update of all layers (eight kernels
            for TF-RMSProp, its ``η_k`` multiply once per group of layers
            that share their learning rates, where the layer-major order
            issues eight per layer), then iteration ``k+1``
            (issue 5's first lead; the products of an iteration still run on
            the layer streams).  Both give the same result, to the bit on the
            CPU.  ``"grouped"`` (experimental): iteration ``k`` of every layer
            in two Triton launches, the products inside the kernels with the
            residual and the update applied to their tiles
            (:meth:`_run_grouped`; TF-RMSProp, the residuals the residual
            kernel computes, no proximity term, Triton available:
            ``triton_elementwise``).  Where it cannot run, the solve runs in
            the layer-major order, with a warning naming why, once per
            reason.  The same result as the others up to float32 rounding
            (the products sum in another order).
    """

    name = "fused"
    TABLES_KEPT = 32

    def __init__(self, precision: str = "auto", cuda_graph: bool = True, layer_streams: bool | int = True,
                 compile_elementwise: bool = False, order: str = "layer-major",
                 triton_elementwise: bool | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        if order not in SOLVE_ORDERS:
            raise ValueError(f"order: expected one of {SOLVE_ORDERS}, got {order!r}")
        self.order = order
        self.precision = precision
        self.cuda_graph = bool(cuda_graph)
        self.compile_elementwise = bool(compile_elementwise)
        if triton_elementwise not in (None, True, False):
            raise ValueError(f"triton_elementwise: expected None, True or False, got {triton_elementwise!r}")
        self.triton_elementwise: bool | None = triton_elementwise
        #: Which Triton kernels run where :meth:`uses_triton`: ``"update"`` and ``"residual"`` (a benchmark
        #: leaves one out to time the other's share).
        self.triton_kernels: frozenset[str] = frozenset({"update", "residual"})
        #: Whether the local iterations evaluate ``f(â)`` in place by :meth:`TransferFunction.quick
        #: <locoprop.transfer.TransferFunction.quick>`'s route (``tanh`` as ``2σ(2a) - 1``): ``None`` (default)
        #: where the products round to bf16 on the CPU (PyTorch's CPU ``tanh`` is not vectorized, its ``sigmoid``
        #: is; with ``compile_elementwise`` too: the compiler's vectorized ``tanh``, accurate to 1 ulp, made the
        #: compiled residual of a 1000 x 1000 layer 1.7 times as long on this project's 2-core CPU,
        #: ``results/cpu-residual-kernels/``).
        self.quick_transfers: bool | None = None
        #: Whether TF-RMSProp's multi-tensor update computes its denominators ``√(ms+ε)`` into each layer's
        #: residual buffer ``δ`` (free once ``δᵀx`` is made) instead of new tensors of the weights' size
        #: (:meth:`~locoprop.update_rules.TFRMSpropRule.update_layers`: the same bits, one weight-sized
        #: tensor less at the step's peak): ``None`` (default) on the CPU, where a multi-tensor operation is a
        #: loop over its tensors anyway; on CUDA it would be several launches per tensor instead of one
        #: (and the Triton update kernel, the CUDA default, makes no such tensor).
        self.denominators_in_residual: bool | None = None
        #: Whether, in the update form ``a₀ + x (W - W₀)ᵀ + (b - b₀)`` (TF32 and bf16 products), the Triton
        #: update kernel also writes the weights' change ``W - W₀``, ``b - b₀`` into the gradient buffers it
        #: consumed, and the residual kernel adds ``a₀`` and the bias's change to the product as it reads it,
        #: instead of four launches of their own per layer and iteration (two subtractions, the product's copy
        #: of ``a₀`` into its output, the bias's addition): ``None`` (default) wherever both Triton kernels run
        #: (:meth:`writes_change`); the same roundings either way.
        self.change_in_update: bool | None = None
        #: How the grouped order (``order="grouped"``) computes float32 products (``precision`` ``"fp32"``, or
        #: ``"auto"`` without TF32): ``"ieee"`` (default), float32 products on the CUDA cores, or ``"tf32x3"``,
        #: float32 emulated on the tensor cores by three TF32 products (each operand a TF32 part plus the TF32
        #: part of its rest; experimental: whether it is faster, and how close to IEEE products it lands, are
        #: for a GPU to measure).
        self.grouped_fp32_products = "ieee"
        if isinstance(layer_streams, bool):
            self.layer_streams: bool | int = layer_streams
        elif isinstance(layer_streams, int) and layer_streams >= 0:
            self.layer_streams = layer_streams
        else:
            raise ValueError(f"layer_streams: expected True, False or an integer >= 0, got {layer_streams!r}")
        self._buffers: dict = {}  # persistent gradient buffers and the learning-rate table
        #: Counts the growths of the shared gradient buffers (:meth:`_layers`): a graph captured before one
        #: wrote into the buffer it replaced (:class:`~locoprop.CapturedStep` captures again).
        self.buffers_version = 0
        self._shared_views: dict = {}  # (stream, the layer's parameter ids) -> (shared buffer, the layer's views)
        #: Zero-copy graphs of the solve, by where the step's inputs live (the caching allocator usually
        #: hands a training loop's tensors the same addresses again: one graph per recurring layout).
        #: Once this many are captured and the inputs are somewhere else again, one more graph is
        #: captured that reads static copies of the inputs (copied every step, more memory).
        self.max_zero_copy_graphs = 4
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._copying: _CapturedSolve | None = None
        self._graph_key: tuple | None = None
        self._pool = None
        self._warm = False
        #: The learning-rate table read inside a capture of the whole step (:class:`~locoprop.CapturedStep`),
        #: one row per parameter group, and its host copy (:meth:`prepare_capture`).
        self.static_table: torch.Tensor | None = None
        self._static_host_table: torch.Tensor | None = None
        self._static_rows: dict[int, int] = {}  # id(parameter group) -> its row of static_table
        #: What each of the last few tables was computed from -> the table (:meth:`host_table`): one per set of
        #: layers solved together (every layer; or each alone, solved during the backward pass).
        self._table_memo: dict = {}
        self._uploaded: dict = {}  # role -> (device table, the host table it holds): upload_table
        self._staging: dict = {}  # role -> (pinned buffer, event after the stream read it): upload_table on CUDA
        self._rates_memo: tuple | None = None  # (table, its rate_groups)
        self._step_counters = StepCounters()  # count_steps
        #: Layers that share their learning rates (:meth:`shared_rates_of` this step's table; ``None``: each
        #: layer alone), so that an update of several layers scales their gradients with one multiply.
        self.shared_rates: tuple[tuple[int, ...], ...] | None = None
        #: ``reduce_local_gradients(grads)``: sums the local gradients (``δᵀx``, ``Σδ`` of every active layer)
        #: over the processes, in place, once per local iteration (exact data parallelism, set by
        #: :class:`~locoprop.distributed.DataParallelDistributor`).  With it the solve runs in the
        #: iteration-major order and is not captured in a CUDA graph.
        self.reduce_local_gradients = None
        self._forked: list = []  # layer streams with chains not yet joined (solve's on_stream): join_streams
        #: The order this solve runs in: :attr:`order`, but the layer-major order where ``"grouped"`` cannot run
        #: (:meth:`grouped_unsupported`).
        self.solve_order = "layer-major" if order == "grouped" else order
        self._grouped_tables: dict = {}  # the grouped kernels' device tables by their contents (eager solves)
        self._own_staging: GroupedStaging | None = None  # the tables of the solver's own captured solves
        #: Where the tables of the capture now under way go: the solver's own staging during its captures
        #: (:meth:`_capture`), a new one for each capture of the whole step (:meth:`prepare_capture`, handed to
        #: the captured step, which keeps it as long as its graph: :meth:`take_capture_staging`).
        self.capture_staging: GroupedStaging | None = None
        self._grouped_warned: set = set()
        #: How the last solve ran: "eager", "graph-capture", "graph-replay", "graph-capture-copy",
        #: "graph-replay-copy" (the graph of static copies), "inside-capture".
        self.last_mode = ""

    def __getstate__(self) -> dict:
        """For copies of a :class:`~locoprop.LocoProp`: the configuration; the buffers, CUDA graphs and tables
        are made again on the copy's first step."""
        fresh = FusedIterativeSolver(self.precision, self.cuda_graph, self.layer_streams, self.compile_elementwise,
                                     self.order, self.triton_elementwise).__dict__
        return {**fresh, "triton_kernels": self.triton_kernels, "max_zero_copy_graphs": self.max_zero_copy_graphs,
                "quick_transfers": self.quick_transfers, "denominators_in_residual": self.denominators_in_residual,
                "change_in_update": self.change_in_update, "grouped_fp32_products": self.grouped_fp32_products}

    # -- support -----------------------------------------------------------------------------
    @staticmethod
    def unsupported(regularizer: Regularizer, inner: Optimizer | None, problems=None) -> str | None:
        """Why the fast path cannot run (``None``: it can), from the components and, if given, the problems."""
        _, reason = update_rule_for(inner)
        if reason:
            return reason
        if type(regularizer) is not L2Proximity:
            return f"regularizer {regularizer!r} (the fast path implements L2Proximity)"
        if problems is not None:
            if len(inner.param_groups) != len(problems):
                return "inner optimizer groups do not match the layers"
            for m, (pr, g) in enumerate(zip(problems, inner.param_groups)):
                if pr is None:
                    return "layer-sharded problems"
                if len(g["params"]) != len(pr.params) or any(a is not b for a, b in zip(g["params"], pr.params)):
                    return f"inner optimizer group {m} does not hold layer {m}'s parameters"
        return None

    # -- buffers -------------------------------------------------------------------------------
    def _buffer(self, key, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A persistent contiguous buffer (kept from step to step, remade when its shape, dtype or device
        changes)."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.device != device or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf

    def _shared_buffer(self, slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The flat gradient buffer of the layers whose chains run one after another on stream ``slot``: at
        least ``numel`` elements; it only grows, and each growth counts in :attr:`buffers_version`."""
        key = ("grad-shared", slot, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
            self.buffers_version += 1
            self._shared_views = {k: v for k, v in self._shared_views.items() if k[0] != slot}  # the old buffer's
        return buf

    def shares_gradient_buffers(self) -> bool:
        """Whether the layers whose chains run on one stream (every layer on the CPU or without layer streams)
        share one gradient buffer: in the layer-major order, where a chain's gradients live only in its own
        turn; not in the iteration-major order or with :attr:`reduce_local_gradients`, which hold every
        layer's gradients of an iteration at once."""
        return self.solve_order == "layer-major" and self.reduce_local_gradients is None

    @staticmethod
    def _per_stream(indices, stream_of: list[int] | None) -> dict[int, list[int]]:
        """The layers of ``indices`` by the stream their chains run on (``stream_of``: each layer's stream;
        ``None``: all on the current one, stream 0), in order."""
        per_stream: dict[int, list[int]] = {}
        for m in indices:
            per_stream.setdefault(stream_of[m] if stream_of is not None else 0, []).append(m)
        return per_stream

    def _layers(self, problems, rule: UpdateRule, stream_of: list[int] | None,
                make_grads: bool = True) -> list[_Layer]:
        """Each problem's layer: its parameters, gradient buffers, inner state and ``T``.  Layers that run one
        after another on one stream (``stream_of``: each layer's stream; ``None``: all on the current one) share
        one gradient buffer where :meth:`shares_gradient_buffers` (and their parameters have one dtype), a view
        of it per parameter, each aligned to 64 elements: a solve holds the gradients of the largest layer
        on each stream instead of every layer's (on one stream, 3.0 against 10.8 MiB on the standard
        autoencoder, 30.5 against 101.2 MiB on the wide one).  So does a single layer on the current stream: the
        layers solved one at a time during the backward pass (``LocoProp(solve_in_backward=True)``) share one.
        ``make_grads=False``: none (the grouped order keeps its gradients in registers)."""
        grads: list[list[torch.Tensor]] = [[] for _ in problems]
        for s, members in self._per_stream(range(len(problems)) if make_grads else [], stream_of).items():
            params = [p for m in members for p in problems[m].params]
            alone = len(members) == 1 and stream_of is not None  # a layer with a stream of its own keeps its own
            if alone or not self.shares_gradient_buffers() or len({p.dtype for p in params}) > 1:
                for m in members:
                    grads[m] = [self._buffer(("grad", id(p)), p.shape, p.dtype, p.device) for p in problems[m].params]
                continue
            offsets = {m: _aligned_offsets([p.numel() for p in problems[m].params]) for m in members}
            flat = self._shared_buffer(s, max(o[-1] for o in offsets.values()), params[0].dtype, params[0].device)
            for m in members:  # the views of the last step where the buffer is the same (no tensor work a step)
                key = (s, tuple(id(p) for p in problems[m].params))
                held = self._shared_views.get(key)
                if held is None or held[0] is not flat or any(g.shape != p.shape for g, p in zip(
                        held[1], problems[m].params)):
                    held = (flat, [flat[o:o + p.numel()].view(p.shape) for o, p in zip(offsets[m], problems[m].params)])
                    self._shared_views[key] = held
                grads[m] = held[1]
        return [_Layer(list(pr.params), grads[m], [rule.state(p) for p in pr.params], int(pr.group["local_steps"]))
                for m, pr in enumerate(problems)]

    def _scratch(self, problems, loss: LocalLoss, stream_of: list[int] | None) -> list[torch.Tensor | None]:
        """The scratch buffer of each problem that kept the layer's output ``ŷ`` in place of its first residual
        (``δ₀ = f(â₀) - y`` is computed into it at iteration 0 from ``ŷ``: :meth:`_local_gradient`); ``None``
        for the others, whose first residual is their scratch.  Like the gradient buffers (:meth:`_layers`),
        layers whose chains run one after another on a stream share one: a view of a flat tensor the size of
        the largest layer's, made for this solve, so that a solve holds one layer's ``(b, d)`` on each stream
        beside every layer's input and target, not a first residual per layer."""
        out: list[torch.Tensor | None] = [None] * len(problems)
        wanting = [m for m, pr in enumerate(problems) if pr.residual_from_output(loss)]
        for members in self._per_stream(wanting, stream_of).values():
            targets = [problems[m].target for m in members]
            if len(members) == 1 or not self.shares_gradient_buffers() \
                    or len({(t.dtype, t.device) for t in targets}) > 1:
                for m, t in zip(members, targets):
                    out[m] = torch.empty_like(t, memory_format=torch.contiguous_format)
                continue
            flat = targets[0].new_empty(max(t.numel() for t in targets))
            for m, t in zip(members, targets):
                out[m] = flat[:t.numel()].view(t.shape)
        return out

    @staticmethod
    def table_for(groups: list[dict], regularizer: L2Proximity, anchored: bool, rule: UpdateRule | None = None,
                  fresh: bool = False) -> torch.Tensor:
        """Host tensor of every layer's per-iteration scalars, one row per layer ``m`` (parameter group
        ``groups[m]``): ``table[m, j * width + k]`` is scalar ``j`` of iteration ``k``, ``width`` the largest
        ``T``.  Scalar 0 is the local learning rate ``η_k`` (reference notes, step 5); the others are the
        update rule's (:meth:`~locoprop.update_rules.UpdateRule.iteration_scalars`: Adam's bias corrections,
        for instance; ``fresh``: the inner state is reset before the step).  The last column is the L2
        coefficient ``c`` when the problems keep an anchor (Eqs. 3, 7), else 0."""
        width = max(int(g["local_steps"]) for g in groups)
        rows = []
        for g in groups:
            T = int(g["local_steps"])
            rates = [local_lr(g["lr"], k, T, g["lr_decay"], g["min_lr_ratio"]) for k in range(T)]
            blocks = [rates] + (rule.iteration_scalars(list(g["params"]), rates, fresh) if rule is not None else [])
            row = [v for block in blocks for v in block + [0.0] * (width - T)]
            rows.append(row + [regularizer.coefficient(g["lr"]) if anchored else 0.0])
        return torch.tensor(rows, dtype=torch.float64)

    def host_table(self, groups: list[dict], regularizer: L2Proximity, anchored: bool,
                   rule: UpdateRule | None = None, fresh: bool = False) -> torch.Tensor:
        """:meth:`table_for`, returning the same tensor again while nothing it is computed from has changed
        (each group's ``lr``, ``local_steps``, ``lr_decay`` and ``min_lr_ratio``, the L2 coefficient, and what
        :meth:`~locoprop.update_rules.UpdateRule.table_key` names): a step's host bookkeeping without the
        table's Python arithmetic, and a device copy of it only when it changed (:meth:`upload_table`).  The
        last :attr:`TABLES_KEPT` tables are kept (a step that solves each layer alone asks for one per layer).
        Read the returned tensor; never write into it."""
        rule_key = () if rule is None else rule.table_key(groups, fresh)
        key = None
        if rule_key is not None:
            key = (anchored, rule_key, tuple((g["lr"], g["local_steps"], g["lr_decay"], g["min_lr_ratio"],
                                              regularizer.coefficient(g["lr"]) if anchored else 0.0)
                                             for g in groups))
            if key in self._table_memo:
                return self._table_memo[key]
        table = self.table_for(groups, regularizer, anchored, rule, fresh)
        if key is not None:
            if len(self._table_memo) >= self.TABLES_KEPT:
                del self._table_memo[next(iter(self._table_memo))]  # the oldest
            self._table_memo[key] = table
        return table

    def upload_table(self, dst: torch.Tensor, host: torch.Tensor, role: Hashable = "eager") -> torch.Tensor:
        """``dst.copy_(host)`` unless ``dst`` already holds that host table (:meth:`host_table` returns the
        same tensor while the table is unchanged): on CUDA a copy from pageable host memory waits for the
        stream, so an unchanged table is not copied again, and a changed one goes through pinned memory
        (:meth:`_copy_through_pinned_memory`).  ``role``: which device table this is (the eager solve's
        buffer of a set of layers, the captured step's ``static_table``); only the last of each role is
        remembered."""
        held = self._uploaded.get(role)
        if held is None or held[0] is not dst or held[1] is not host:
            if dst.is_cuda:
                self._copy_through_pinned_memory(dst, host, role)
            else:
                dst.copy_(host)
            self._uploaded[role] = (dst, host)
        return dst

    def _copy_through_pinned_memory(self, dst: torch.Tensor, host: torch.Tensor, role: Hashable) -> None:
        """``dst.copy_(host)`` for a CUDA ``dst`` without waiting for the stream (a table that changes at every
        step: a learning-rate schedule per step, Adam's bias corrections): ``host`` is converted into a pinned
        buffer kept per role, which the stream reads asynchronously; before the buffer is written again the
        host waits for the stream to have read it (one step back, long done unless the host ran ahead)."""
        buffer, read = self._staging.get(role, (None, None))
        if buffer is None or buffer.shape != host.shape or buffer.dtype != dst.dtype:
            buffer, read = torch.empty(host.shape, dtype=dst.dtype, pin_memory=True), None
        if read is not None:
            read.synchronize()
        buffer.copy_(host)
        dst.copy_(buffer, non_blocking=True)
        read = torch.cuda.Event()
        read.record(torch.cuda.current_stream(dst.device))
        self._staging[role] = (buffer, read)

    @staticmethod
    def iteration_scalars_of(table: torch.Tensor, m: int, k: int, count: int) -> tuple[torch.Tensor, ...]:
        """The ``count`` scalars of iteration ``k`` of layer ``m`` in a :meth:`table_for` table, as 0-d views
        (on the device, nothing read back)."""
        width = (table.shape[1] - 1) // count
        return tuple(table[m, j * width + k] for j in range(count))

    @staticmethod
    def rate_groups(table: torch.Tensor) -> tuple[tuple[int, ...], ...]:
        """Layers whose rows of the table (:meth:`table_for`) have the same scalars (``η_k`` and the update
        rule's) in every iteration, in groups by first layer: an update of several layers scales a group's
        tensors with one multi-tensor multiply."""
        groups: dict[tuple, list[int]] = {}
        for m, row in enumerate(table[:, :-1].tolist()):
            groups.setdefault(tuple(row), []).append(m)
        return tuple(tuple(g) for g in groups.values())

    def shared_rates_of(self, table: torch.Tensor) -> tuple[tuple[int, ...], ...] | None:
        """:meth:`rate_groups` where the order of work uses them (iteration-major: one update of all layers),
        ``None`` where it does not (layer-major updates one layer at a time), so that a layer-major graph is
        not captured again when the groups change."""
        if self.order != "iteration-major":
            return None
        if self._rates_memo is None or self._rates_memo[0] is not table:  # host_table's tables recur
            self._rates_memo = (table, self.rate_groups(table))
        return self._rates_memo[1]

    def release_graph(self) -> None:
        """Drop the captured solves (their memory returns to the allocator)."""
        self._graphs = {}
        self._copying = None
        self._graph_key = None
        self._pool = None
        if self._own_staging is not None:  # the graphs that read it are gone: its slices may be written again
            self._own_staging.release()

    # -- the local iterations of one layer ----------------------------------------------------------
    def _products(self, x: torch.Tensor, start=None):
        """``(pre(W, b, out, free), grad(δ, out))`` in the chosen precision, writing into ``out``.

        With ``start = (a₀, [W₀, b₀])`` (the forward pass's pre-activation and its weights, which
        :class:`~locoprop.LocoProp` keeps where the products round, :meth:`rounds_products`), ``pre`` is the
        *update form* ``a₀ + x (W - W₀)ᵀ + (b - b₀)``: only the product of the weights' change is rounded, so
        its error is relative to the change and not to the activation (see the module docstring).  The
        change is written into ``free`` (tensors shaped as ``W`` and ``b`` that hold nothing needed now: the
        layer's gradient buffers, which the last update consumed and the next ``δᵀx`` overwrites) rather
        than a new weight-sized tensor at every iteration (on the wide autoencoder 30.5 MiB)."""
        bf16 = self.precision == "bf16"
        xr = x.to(torch.bfloat16) if bf16 else x  # TF32 (CUDA): the product rounds its operands itself
        unrounded = bf16 and bf16_product_has_float32_output(x.device)

        def product(a, b, out, plus=None):
            """``plus + a @ b`` into the float32 ``out`` (one pass where the library allows it); a bf16
            result is rounded once where PyTorch has no float32 output for it (the CPU)."""
            if not bf16:
                return torch.mm(a, b, out=out) if plus is None else torch.addmm(plus, a, b, out=out)
            if unrounded:
                torch.mm(a, b, out_dtype=torch.float32, out=out)
                return out if plus is None else out.add_(plus)
            if plus is None:
                return out.copy_(a @ b)
            if plus.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
                return torch.add(plus, a @ b, out=out)
            # the float32 copy, then a float32 sum: the same rounding (the bf16 result is exact in float32)
            # in two passes that take less time on the CPU than one mixed-dtype addition
            return out.copy_(a @ b).add_(plus)

        def wgrad(delta, out):
            product((delta.to(torch.bfloat16) if bf16 else delta).T, xr, out)

        if start is not None:
            a0, (W0, *b0) = start

            def pre(W, b, out, free=(None, None), ready=False, fold=False):
                """``ready``: ``free`` already holds the change (the update wrote it); ``fold``: only the
                product ``x (W - W₀)ᵀ`` into ``out``, ``a₀`` and the bias's change (left in ``free[-1]``) for
                the caller to add (the residual kernel adds them as it reads the product)."""
                change = free[0] if ready else torch.sub(W, W0, out=free[0])
                product(xr, (change.to(torch.bfloat16) if bf16 else change).T, out, plus=None if fold else a0)
                if b is None:
                    return out
                bias_change = free[-1] if ready else torch.sub(b, b0[0], out=free[-1])
                return out if fold else out.add_(bias_change)
            pre.takes_change = True
        else:  # plain: x Wᵀ + b, the bias in the product's epilogue (fp32, TF32) or in the same pass (bf16)
            def pre(W, b, out, free=None):
                return product(xr, (W.to(torch.bfloat16) if bf16 else W).T, out, plus=b)
        pre.rounded_input = xr if bf16 else None  # the bf16 x, for _bf16_chain_compiled
        return pre, wgrad

    def products_precision(self, cuda: bool) -> str:
        """The precision the local products run in now, on CUDA (``cuda=True``) or not: :attr:`precision`, with
        ``"auto"`` resolved by PyTorch's float32 matrix-product setting
        (:func:`locoprop.precision.products_precision`)."""
        return products_precision(self.precision, cuda)

    def rounds_products(self, cuda: bool) -> bool:
        """Whether the local products round their operands: bf16 anywhere, TF32 on CUDA only (also ``"auto"``
        where PyTorch allows TF32 now)."""
        precision = self.products_precision(cuda)
        return precision == "bf16" or (precision == "tf32" and cuda)

    def uses_quick_transfers(self, device: torch.device) -> bool:
        """Whether the local iterations on ``device`` evaluate ``f(â)`` by the quick route
        (:attr:`quick_transfers`)."""
        if self.quick_transfers is not None:
            return self.quick_transfers
        return self.precision == "bf16" and device.type == "cpu"

    def uses_denominators_in_residual(self, device: torch.device) -> bool:
        """Whether TF-RMSProp's multi-tensor update on ``device`` computes its denominators into the layers'
        residual buffers (:attr:`denominators_in_residual`)."""
        if self.denominators_in_residual is not None:
            return self.denominators_in_residual
        return torch.device(device).type == "cpu"

    def writes_change(self, device: torch.device) -> bool:
        """Whether the update form's weight change is written by the Triton update kernel, and ``a₀`` and the
        bias's change added by the residual kernel, on ``device`` (:attr:`change_in_update`): where both
        kernels run."""
        if self.change_in_update is not None:
            return self.change_in_update
        return self.triton_kernels >= {"update", "residual"} and not self.compile_elementwise and \
            self.uses_triton(device)

    def _open_chain(self, lay: _Layer, m: int, x, delta, target, anchor, transfer, start=None, post=None) -> _Chain:
        pre, wgrad = self._products(x, start)
        if transfer is not None and self.uses_quick_transfers(x.device):
            transfer = transfer.quick()
        own_form = start is not None and getattr(pre, "takes_change", False)  # (a benchmark may replace _products)
        return _Chain(lay, m, delta, target, anchor, transfer, pre, wgrad, post,
                      start_params=list(start[1]) if own_form else None, start_pre=start[0] if own_form else None)

    def _local_gradient(self, c: _Chain, k: int, loss: LocalLoss, table: torch.Tensor, proximity: bool = True) -> None:
        """Iteration ``k``'s local gradient of one layer into its gradient buffers: ``δᵀx``, ``Σδ`` and, with
        an anchor and ``proximity``, ``+ c (Θ̃ - Θ)`` (Algorithms 1/2, inner loop; reference notes, step 4).

        Iteration 0 uses the problem's first residual, which is the layer's
        scratch buffer (or is computed into it from the layer's output ``ŷ``
        where the problem kept that instead: ``f(â₀) - y``, Eq. 2); later ones
        compute the pre-activation and then ``δ`` in place in it.
        """
        lay = c.layer
        W = lay.params[0]
        b = lay.params[1] if len(lay.params) == 2 else None
        bias_grad = lay.grads[1] if b is not None else None
        if k == 0:
            delta = self._first_residual(c, loss, bias_grad)
        elif self.compile_elementwise:
            delta = compile_once(_residual_and_bias_grad_)(loss, self._pre(c, W, b), c.target, c.transfer, bias_grad)
        elif self._triton_residual(c, loss, W, b, bias_grad):
            delta = c.scratch
        else:
            delta = loss.grad_(self._pre(c, W, b), c.target, c.transfer)
            if b is not None:
                torch.sum(delta, 0, out=bias_grad)
        c.wgrad(delta, lay.grads[0])
        if proximity:
            self._add_proximity(c, table, k)

    @staticmethod
    def _first_residual(c: _Chain, loss: LocalLoss, bias_grad: torch.Tensor | None) -> torch.Tensor:
        """Iteration 0's ``δ``: the problem's first residual, which is the layer's scratch buffer, or, where the
        problem kept the layer's output ``ŷ`` instead, ``f(â₀) - y`` computed into it from ``ŷ`` (Eq. 2); with a
        bias, ``Σδ`` into ``bias_grad``."""
        delta = c.scratch if c.post is None else loss.grad_from_post(c.post, c.target, out=c.scratch)
        if bias_grad is not None:
            torch.sum(delta, 0, out=bias_grad)
        return delta

    @staticmethod
    def _pre(c: _Chain, W, b, fold: bool = False) -> torch.Tensor:
        """Iteration ``k ≥ 1``'s pre-activation of ``c`` into its scratch buffer (``c.pre``), in the solver's own
        update form reading the weights' change from the gradient buffers where the last update wrote it there
        (:attr:`_Chain.change_ready`); ``fold``: only the product ``x (W - W₀)ᵀ``, without ``a₀`` and the bias's
        change, which is left in the bias's gradient buffer (update form only)."""
        if c.start_params is None:
            return c.pre(W, b, c.scratch, c.layer.grads)
        ready, c.change_ready = c.change_ready, False
        return c.pre(W, b, c.scratch, c.layer.grads, ready=ready, fold=fold)

    def _triton_residual(self, c: _Chain, loss: LocalLoss, W, b, bias_grad) -> bool:
        """Iteration ``k ≥ 1``'s pre-activation into ``c.scratch``, then ``δ`` and ``Σδ`` in one Triton launch
        (:func:`locoprop.triton_kernels.residual_`) where :meth:`uses_triton` and the kernel computes this loss
        and transfer function; ``False`` where not, or where the kernel failed (the kernels are then off:
        :func:`~locoprop.triton_kernels.launch_or_fall_back`)."""
        kind = triton_kernels.residual_transfer(loss, c.transfer)
        if kind is None or "residual" not in self.triton_kernels or not self.uses_triton(c.scratch.device):
            return False
        # the update form's a₀ and b - b₀ added by the kernel where it takes a₀ too (one check on that path)
        base = c.start_pre if c.start_params is not None and self.writes_change(c.scratch.device) else None
        if not triton_kernels.residual_suits(c.scratch, c.target, bias_grad, base=base):
            if base is None or not triton_kernels.residual_suits(c.scratch, c.target, bias_grad):
                return False
            base = None
        fold = base is not None
        # where the kernel fails, before it ran, the caller computes the pre-activation again (from the weights)
        pre = self._pre(c, W, b, fold=fold)
        added = {"base": c.start_pre, **({"shift": bias_grad} if b is not None else {})} if fold else {}
        if kind == 3:  # a leaky ReLU's slope
            added["slope"] = triton_kernels.residual_slope(c.transfer)
        return triton_kernels.launch_or_fall_back("residual", lambda: triton_kernels.residual_(
            pre, c.target, bias_grad, kind, **added), strict=self.triton_elementwise is True)

    @staticmethod
    def _add_proximity(c: _Chain, table: torch.Tensor, k: int) -> None:
        """With an anchor, the L2 proximity's gradient ``+ c (Θ̃ - Θ)`` (Eqs. 3, 7) into the layer's gradients at
        iteration ``k``, rounded as the reference loop rounds it (``(Θ̃ - Θ) c``, then the sum): nothing at
        ``k = 0``, where the weights are still the anchor (the step's starting weights) and the term is zero."""
        if c.anchor is None or k == 0:
            return
        coefficient = table[c.index, -1]
        for gr, p, a in zip(c.layer.grads, c.layer.params, c.anchor):
            gr.add_(torch.sub(p, a).mul_(coefficient))

    def uses_triton(self, device: torch.device) -> bool:
        """Whether the elementwise work (the update, ``δ`` and ``Σδ``) runs as Triton kernels on ``device``
        (:attr:`triton_elementwise`); raises where they are required and cannot run."""
        if self.triton_elementwise is False:
            return False
        if self.triton_elementwise is None:
            return torch.device(device).type == "cuda" and triton_kernels.available(device)
        if not triton_kernels.available(device):
            raise RuntimeError(f"triton_elementwise=True: the Triton kernels cannot run on {device} (they need CUDA and "
                               "Triton installed, or TRITON_INTERPRET=1; turned off after a failure: "
                               f"{triton_kernels.disabled_because() or 'no'}); use triton_elementwise=None or False")
        return True

    def _update(self, chains: list[_Chain], rule: UpdateRule, table: torch.Tensor, k: int) -> None:
        """Iteration ``k``'s inner-optimizer update of the layers of ``chains`` (``η_k`` and the rule's other
        scalars of each layer from ``table``): one multi-tensor update over all of them, or, with
        ``compile_elementwise``, one compiled program (one pass per tensor), or, with :meth:`uses_triton`, one
        Triton kernel per layer."""
        if len(chains) == 1 or self.shared_rates is None:
            groups = [[c] for c in chains]
        else:
            by_index = {c.index: c for c in chains}
            groups = [members for group in self.shared_rates if (members := [by_index[m] for m in group
                                                                             if m in by_index])]
        layers = [([p for c in members for p in c.layer.params],  # (params, grads, states, scalars) of each group
                   [g for c in members for g in c.layer.grads],
                   [st for c in members for st in c.layer.states],
                   self.iteration_scalars_of(table, members[0].index, k, rule.scalars))
                  for members in groups]
        # the update form's change W - W₀ for the next iteration: written by the update kernel where it runs
        starts = [[s for c in members for s in c.start_params]
                  if all(c.start_params is not None and k + 1 < c.layer.steps for c in members) else None
                  for members in groups] if self.writes_change(table.device) else None
        if self.compile_elementwise and rule.tensor_kernel is not None:
            rule.update_layers_compiled(layers)
        elif "update" in self.triton_kernels and self.uses_triton(table.device) and rule.update_layers_triton(
                layers, strict=self.triton_elementwise is True, starts=starts):
            for members, start in zip(groups, starts or [None] * len(groups)):
                for c in members:
                    c.change_ready = start is not None  # read by the next iteration's _pre
        else:
            if isinstance(rule, TFRMSpropRule) and self.uses_denominators_in_residual(table.device):
                rule.update_layers(layers, [c.scratch for members in groups for c in members  # each δ, free now
                                            for _ in c.layer.params])
            else:
                rule.update_layers(layers)

    def _chain(self, c: _Chain, loss: LocalLoss, rule: UpdateRule, table: torch.Tensor) -> None:
        """All ``T`` local iterations of one layer, one after another (layer-major)."""
        if self.compiles_bf16_epilogues(c, rule):
            return self._bf16_chain_compiled(c, loss, rule, table)
        for k in range(c.layer.steps):
            self._local_gradient(c, k, loss, table)
            self._update([c], rule, table, k)

    def compiles_bf16_epilogues(self, c: _Chain, rule: UpdateRule) -> bool:
        """Whether :meth:`_bf16_chain_compiled` runs ``c``'s chain: ``compile_elementwise``, bf16 products with no
        float32 output (the CPU: :func:`bf16_product_has_float32_output`) in the solver's own update form, an
        update rule with a one-tensor kernel, no proximity term, no local gradients summed over processes, and
        contiguous weights, states and starting weights (the compiled update sees flat views)."""
        lay = c.layer
        return self.compile_elementwise and self.precision == "bf16" and c.start_params is not None \
            and c.anchor is None and rule.tensor_kernel is not None and self.reduce_local_gradients is None \
            and getattr(c.pre, "rounded_input", None) is not None \
            and not bf16_product_has_float32_output(c.scratch.device) \
            and all(t.is_contiguous() for t in [*lay.params, *c.start_params, *(s for st in lay.states for s in st)])

    def _bf16_chain_compiled(self, c: _Chain, loss: LocalLoss, rule: UpdateRule, table: torch.Tensor) -> None:
        """All ``T`` local iterations of one layer (Algorithm 1's inner loop in the update form) where the bf16
        products have no float32 output (the CPU), the elementwise work of an iteration in two compiled
        programs that read each product's bf16 result as it is, instead of a float32 copy of it first and a
        pass per operation (:meth:`compiles_bf16_epilogues`):

        * ``δ = f(a₀ + x (W - W₀)ᵀ + (b - b₀)) - y`` with ``Σδ`` and ``δ`` rounded to bf16 for ``δᵀx``
          (:func:`_bf16_residual_`);
        * the inner optimizer's update of the weights and bias from ``δᵀx`` (bf16) and ``Σδ``, which also
          returns the weights' change ``W - W₀`` rounded to bf16 (and the bias's in its own dtype) for the next
          iteration's product (:meth:`~locoprop.update_rules.UpdateRule.update_layer_compiled_with_change`).

        The products and their roundings are the eager path's; the elementwise arithmetic agrees with it up to
        float32 rounding (fused multiply-adds)."""
        lay = c.layer
        xr, a0 = c.pre.rounded_input, c.start_pre
        has_bias = len(lay.params) == 2
        residual = compile_once(_bf16_residual_)
        dtypes = [torch.bfloat16] + [b.dtype for b in lay.params[1:]]  # the bias's change as the eager form adds it
        changes = None
        for k in range(lay.steps):
            if k == 0:
                bias_grad = lay.grads[1] if has_bias else None
                delta = self._first_residual(c, loss, bias_grad).to(torch.bfloat16)
            else:
                delta, bias_grad = residual(loss, xr @ changes[0].T, a0, changes[1] if has_bias else None, c.target,
                                            c.transfer)
            grads = [delta.T @ xr] + ([bias_grad] if has_bias else [])
            starts = c.start_params if k + 1 < lay.steps else None
            changes = rule.update_layer_compiled_with_change(
                lay.params, grads, lay.states, self.iteration_scalars_of(table, c.index, k, rule.scalars), starts,
                dtypes)

    def stream_plan(self, problems, use_streams: bool) -> list[int] | None:
        """Each layer's stream in the pool (:meth:`stream_assignment` of the layers' product costs, ``T`` times
        rows times weights), or ``None`` where every chain runs on the current stream."""
        n = self.stream_count(len(problems)) if use_streams else 0
        if not n:
            return None
        return self.stream_assignment([int(pr.group["local_steps"]) * pr.batch.inputs.shape[0] * pr.params[0].numel()
                                       for pr in problems], n)

    def stream_count(self, n_layers: int) -> int:
        """Streams the chains of ``n_layers`` layers run on (0: all on the current stream)."""
        cap = n_layers if self.layer_streams is True else int(self.layer_streams)
        n = min(n_layers, cap)
        return n if n > 1 else 0

    @staticmethod
    def stream_assignment(costs: list[float], n: int) -> list[int]:
        """Stream of each layer: the costliest first, each to the least-loaded stream (LPT scheduling)."""
        load, where = [0.0] * n, [0] * len(costs)
        for m in sorted(range(len(costs)), key=lambda i: -costs[i]):
            s = min(range(n), key=load.__getitem__)
            where[m], load[s] = s, load[s] + costs[m]
        return where

    def _each_layer(self, indices, work, streams: list, where: list[int], join: bool = True) -> None:
        """``work(m)`` for every layer ``m`` of ``indices``: in order on the current stream, or each on its
        layer's stream (``streams[where[m]]``), forked from and joined back to the current stream (``join=False``:
        left to :meth:`join_streams`)."""
        if not streams:
            for m in indices:
                work(m)
            return
        main = torch.cuda.current_stream()
        used = [streams[s] for s in sorted({where[m] for m in indices})]
        for s in used:
            s.wait_stream(main)
        for m in indices:
            with torch.cuda.stream(streams[where[m]]):
                work(m)
        if not join:
            self._forked += [s for s in used if s not in self._forked]
            return
        for s in used:
            main.wait_stream(s)

    def join_streams(self) -> None:
        """Make the current stream wait for the chains :meth:`solve` left running on layer streams
        (``on_stream``)."""
        if self._forked:
            main = torch.cuda.current_stream(self._forked[0].device)
            for s in self._forked:
                main.wait_stream(s)
        self._forked = []

    def _run(self, layers: list[_Layer], inputs, loss, rule, table, stream_of: list[int] | None,
             join: bool = True) -> None:
        """All layers' local iterations; ``inputs[m] = (x, scratch, target, anchor, transfer, start, post)``
        (``scratch``: the first residual, or where ``post`` is given the buffer it is computed into), layer
        ``m`` on stream ``stream_of[m]`` of the pool (:meth:`stream_plan`; ``None``: all on the current stream).

        ``"layer-major"``: each layer's whole chain of iterations on its
        stream.  ``"iteration-major"``: iteration ``k`` of every layer (its
        products on the layer's stream), then one multi-tensor update of all
        layers, then iteration ``k + 1``: fewer, larger kernels, a join per
        iteration.
        """
        if self.solve_order == "grouped":
            if self._run_grouped(layers, inputs, loss, rule, table):
                return
            self.solve_order = "layer-major"  # the kernels failed before they ran: this solve as the default's
            for lay in layers:
                lay.grads = [self._buffer(("grad", id(p)), p.shape, p.dtype, p.device) for p in lay.params]
            stream_of = None
        with matmul_precision(self.products_precision(table.device.type == "cuda")):
            streams = _shared_streams(torch.cuda.current_stream().device, max(stream_of) + 1) if stream_of else []
            reduce = self.reduce_local_gradients
            if self.solve_order == "layer-major" and reduce is None:  # a chain's working tensors live only in its turn
                self._each_layer(range(len(layers)), lambda m: self._chain(
                    self._open_chain(layers[m], m, *inputs[m]), loss, rule, table), streams, stream_of, join)
                return
            chains = [self._open_chain(lay, m, *inp) for m, (lay, inp) in enumerate(zip(layers, inputs))]
            for k in range(max(lay.steps for lay in layers)):
                active = [c for c in chains if k < c.layer.steps]
                self._each_layer([c.index for c in active], lambda m: self._local_gradient(
                    chains[m], k, loss, table, proximity=reduce is None), streams, stream_of)
                if reduce is not None:  # the sums over the processes' rows, then the (shared) proximity term
                    reduce([g for c in active for g in c.layer.grads])
                    for c in active:
                        self._add_proximity(c, table, k)
                self._update(active, rule, table, k)

    # -- the grouped order ---------------------------------------------------------------------------
    def grouped_unsupported(self, problems, loss: LocalLoss, rule: UpdateRule, device: torch.device) -> str | None:
        """Why ``order="grouped"`` cannot solve these problems (``None``: it can, as far as the components say;
        :func:`locoprop.triton_kernels.grouped_suits` then checks the tensors)."""
        if not isinstance(rule, TFRMSpropRule):
            return f"its update is TF-RMSProp's, not {type(rule).__name__}'s"
        if self.compile_elementwise:
            return "compile_elementwise=True"
        if self.reduce_local_gradients is not None:
            return "local gradients summed over processes"
        if triton_kernels.grouped_disabled_because():
            return f"the grouped kernels failed in this process ({triton_kernels.grouped_disabled_because()})"
        if not self.uses_triton(device):
            off = triton_kernels.disabled_because()
            return (f"the Triton kernels do not run on {device} (triton_elementwise={self.triton_elementwise!r}"
                    + (f"; turned off after a failure: {off})" if off else ")"))
        for m, pr in enumerate(problems):
            if pr.anchor is not None:
                return f"layer {m} has a proximity term (L2Proximity with c > 0)"
            if triton_kernels.residual_transfer(loss, pr.batch.transfer) is None:
                return f"layer {m}: the kernels do not compute {loss!r} with {pr.batch.transfer!r}"
        return None

    def _order_for(self, problems, loss: LocalLoss, rule: UpdateRule, device: torch.device) -> str:
        """The order this solve runs in: :attr:`order`, or the layer-major order where the grouped order cannot
        run (with a warning, once per reason)."""
        if self.order != "grouped":
            return self.order
        reason = self.grouped_unsupported(problems, loss, rule, device)
        if reason is None:
            return "grouped"
        self._warn_grouped(reason)
        return "layer-major"

    def _warn_grouped(self, reason: str) -> None:
        if reason not in self._grouped_warned:
            self._grouped_warned.add(reason)
            warnings.warn(f"FusedIterativeSolver: order='grouped' cannot run here ({reason}); these solves run in "
                          "the layer-major order", RuntimeWarning, stacklevel=5)

    def take_capture_staging(self) -> GroupedStaging | None:
        """After a capture of the whole step: the staging its graph reads (``None`` where it made none), which
        the caller keeps as long as the graph; the solver forgets it."""
        staging, self.capture_staging = self.capture_staging, None
        return staging

    def _grouped_device_table(self, flat: list[int], device: torch.device) -> torch.Tensor:
        """The grouped kernels' table (:func:`~locoprop.triton_kernels.grouped_table`) on ``device``.  Eagerly, the
        same tensor again for the same contents (a training loop's tensors recur at a few addresses).  Inside a
        CUDA graph capture, a device tensor of the graph filled by a copy in the graph from a slice of pinned host
        memory kept for the graph's owner (:class:`GroupedStaging`, :attr:`capture_staging`): each replay copies
        it anew, a few hundred bytes (the graph's activations lie where only the capture knows)."""
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            if self.capture_staging is None:
                raise RuntimeError("FusedIterativeSolver: order='grouped' inside a CUDA graph capture needs pinned "
                                   "staging memory made before it (LocoProp.graphed_step prepares it)")
            return self.capture_staging.table(torch.tensor(flat, dtype=torch.int64))
        key = (device, tuple(flat))
        table = self._grouped_tables.get(key)
        if table is None:  # a host tensor only for a table not made before
            host = torch.tensor(flat, dtype=torch.int64)
            table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
            if len(self._grouped_tables) >= self.TABLES_KEPT:
                del self._grouped_tables[next(iter(self._grouped_tables))]
            self._grouped_tables[key] = table
        elif device.type == "cuda":  # made on another stream, perhaps (a warm-up's)
            table.record_stream(torch.cuda.current_stream(device))
        return table

    def _run_grouped(self, layers: list[_Layer], inputs, loss: LocalLoss, rule: TFRMSpropRule,
                     table: torch.Tensor) -> bool:
        """Every layer's ``T`` local iterations in ``2T`` launches (``order="grouped"``, Algorithms 1-4 with
        TF-RMSProp as the inner optimizer): for each ``k`` every layer's ``δ``
        (:func:`~locoprop.triton_kernels.grouped_residual_`; at ``k = 0`` the first residual ``ŷ - y`` (Eq. 2)
        of the layers whose problem kept their output ``ŷ``, the others' being given; no launch where none did)
        and every layer's gradient and update (:func:`~locoprop.triton_kernels.grouped_gradient_update_`).
        ``False`` where the kernels do not take these tensors or failed to compile (before anything ran; the
        grouped kernels, not the others, turned off for the process, with a warning, unless
        ``triton_elementwise=True``, which raises)."""
        if self.grouped_fp32_products not in ("ieee", "tf32x3"):
            raise ValueError(f"grouped_fp32_products: expected 'ieee' or 'tf32x3', got {self.grouped_fp32_products!r}")
        precision = self.products_precision(table.device.type == "cuda")
        if precision == "fp32" and self.grouped_fp32_products == "tf32x3":
            precision = "tf32x3"
        group = []
        for m, (lay, (x, delta, target, anchor, transfer, start, post)) in enumerate(zip(layers, inputs)):
            W = lay.params[0]
            b = lay.params[1] if len(lay.params) == 2 else None
            form = None if start is None else (start[0], start[1][0], start[1][1] if b is not None else None)
            group.append(triton_kernels.GroupedLayer(
                x, W, b, lay.states[0], lay.states[1] if b is not None else None, target, delta,
                triton_kernels.residual_transfer(loss, transfer), lay.steps, m * table.stride(0), form, post,
                triton_kernels.residual_slope(transfer)))
        if table.dtype != torch.float32 or not table.is_contiguous() or not triton_kernels.grouped_suits(group):
            self._warn_grouped("tensors the kernels do not take (float32, contiguous, 2-d weights)")
            return False
        flat, residual_tiles, update_tiles = triton_kernels.grouped_table(group)
        kernels = self._grouped_device_table(flat, table.device)
        update_form = group[0].start is not None
        alpha, momentum, eps = rule.hyper()

        def update(k):
            triton_kernels.grouped_gradient_update_(kernels, len(group), update_tiles, k, table, alpha, momentum,
                                                    eps, precision)

        def residual(k):
            triton_kernels.grouped_residual_(kernels, len(group), residual_tiles, k, update_form, precision)
        strict = self.triton_elementwise is True
        if not triton_kernels.launch_or_fall_back("grouped", lambda: triton_kernels.grouped_compile(
                kernels, table, update_form, precision), strict, turn_off=triton_kernels.disable_grouped,
                instead="the layer-major order runs in place of the grouped one"):
            return False
        for k in range(max(lay.steps for lay in layers)):
            if k > 0 or any(lay.output is not None for lay in group):  # k = 0: δ₀ = ŷ - y where ŷ was kept
                residual(k)
            update(k)
        return True

    # -- the solver interface ---------------------------------------------------------------------
    def solve(self, problems: list[LocalProblem], loss: LocalLoss, regularizer: Regularizer,
              inner: Optimizer, graph: bool = True, on_stream: int | None = None) -> None:
        """Every layer's ``T`` local iterations (Algorithms 1-4) on ``problems``.  ``graph=False``: launched
        eagerly even where solves are captured in CUDA graphs (:attr:`cuda_graph`): for a caller whose
        problems change at every call, as those of a step that solves one layer at a time during the backward
        pass (:meth:`LocoProp._backward_solving <locoprop.LocoProp._backward_solving>`), which would otherwise
        capture a graph per call and let it go at the next.  ``on_stream`` (CUDA, with ``graph=False``): the
        chains run on that stream of the pool, forked from the current stream and left running (the caller
        joins them with :meth:`join_streams`); every tensor they read that the solve did not make is kept for
        that stream (``record_stream``), so that its memory is not handed out again before they are done."""
        reason = self.unsupported(regularizer, inner, problems)
        if reason:
            raise ValueError(f"FusedIterativeSolver: cannot solve these problems: {reason}")
        rule, _ = update_rule_for(inner)
        param = problems[0].params[0]
        cuda = param.device.type == "cuda"
        self.solve_order = self._order_for(problems, loss, rule, param.device)
        grouped = self.solve_order == "grouped"
        on_stream = on_stream if cuda and not graph and not grouped else None
        stream_of = None if grouped else self.stream_plan(problems, cuda) if on_stream is None else \
            [on_stream] * len(problems)
        layers = self._layers(problems, rule, stream_of, make_grads=not grouped)
        capturing = cuda and torch.cuda.is_current_stream_capturing()
        if capturing:
            table = self._captured_table(problems)
        else:  # into a persistent device tensor, so that captured graphs find it where they read it
            host = self.host_table([pr.group for pr in problems], regularizer, problems[0].anchor is not None,
                                   rule)
            layers_of = tuple(pr.group.get("name", id(pr.group)) for pr in problems)  # a table and buffer each
            table = self.upload_table(self._buffer(("table", layers_of), host.shape, param.dtype, param.device),
                                      host, ("eager", layers_of))
            self.shared_rates = self.shared_rates_of(host)
        scratch = self._scratch(problems, loss, stream_of)
        inputs = [(pr.batch.inputs, pr.first_residual(loss) if s is None else s, pr.target, pr.anchor,
                   pr.batch.transfer, (pr.start_pre, pr.start_params) if pr.start_pre is not None else None,
                   None if s is None else pr.batch.post)
                  for pr, s in zip(problems, scratch)]
        for pr in problems:  # each residual is now its layer's scratch buffer: overwritten by the solve
            pr.residual = None
        if on_stream is not None:
            side = _shared_streams(torch.cuda.current_stream().device, on_stream + 1)[on_stream]  # as _run's
            for t in _tensors_of(inputs) + [table]:
                t.record_stream(side)
        if capturing or not graph or not self._graphs_for(param.device):
            self.last_mode = "inside-capture" if capturing else "eager"
            self._run(layers, inputs, loss, rule, table, stream_of, **({} if on_stream is None else {"join": False}))
        else:
            self._solve_graphed(problems, layers, inputs, loss, rule, table, stream_of)

    def prepare_capture(self, table: torch.Tensor, groups: list[dict], dtype: torch.dtype,
                        device: torch.device) -> None:
        """Before a capture of the whole step: the device table it reads (``table``, :meth:`table_for` of
        every parameter group ``groups``, refilled before each replay)."""
        self.static_table = self.upload_table(torch.empty(table.shape, dtype=dtype, device=device), table, "static")
        # the tables of this capture's grouped solves: memory of its own, kept by the captured step with its graph
        self.capture_staging = GroupedStaging(device) if self.order == "grouped" and device.type == "cuda" else None
        if self.capture_staging is not None:  # one solve of every layer after the pass
            self.capture_staging.reserve(len(triton_kernels.GROUPED_COLUMNS) * len(groups))
        self._static_host_table = table
        self._static_rows = {id(g): m for m, g in enumerate(groups)}
        self.shared_rates = self.shared_rates_of(table)

    def _captured_table(self, problems: list[LocalProblem]) -> torch.Tensor:
        """Inside a capture of the whole step: the table rows of ``problems``' groups.  Where some layer did not
        run in the captured forward pass, a copy of the running layers' rows, made inside the graph (it reads
        the static table, which each replay refills), and their shared rates."""
        rows = [self._static_rows.get(id(pr.group)) for pr in problems]
        if self.static_table is None or None in rows:
            raise RuntimeError("FusedIterativeSolver: inside a CUDA graph capture the learning-rate table must "
                               "be prepared first (use LocoProp.graphed_step)")
        if rows == list(range(self.static_table.shape[0])):
            return self.static_table
        self.shared_rates = self.shared_rates_of(self._static_host_table[rows])
        return torch.stack([self.static_table[m] for m in rows])

    def count_steps(self, problems, inner, rule: UpdateRule | None = None) -> None:
        """Host-side bookkeeping of one solve, done by the caller once the step is kept (the inner
        optimizer's step counters); ``rule``: ``inner``'s update rule, where the caller has it."""
        if rule is None:
            rule, _ = update_rule_for(inner)
        params, steps = [], []
        for pr in problems:
            if pr is None:  # layer-sharded: another rank solved this layer
                continue
            params += pr.params
            steps += [int(pr.group["local_steps"])] * len(pr.params)
        self._step_counters.advance(rule, params, steps)

    # -- CUDA graph ----------------------------------------------------------------------------------
    def _graphs_for(self, device: torch.device) -> bool:
        """Whether solves on ``device`` are captured in CUDA graphs."""
        return device.type == "cuda" and self.cuda_graph and self.reduce_local_gradients is None

    def _key(self, layers, inputs, loss, rule, table) -> tuple:
        """What a captured solve is specific to, apart from where this step's inputs live."""
        parts = [type(loss).__name__, rule.hyper(), self.products_precision(table.device.type == "cuda"),
                 self.compile_elementwise, self.solve_order, self.grouped_fp32_products,
                 self.uses_triton(table.device) and self.triton_kernels, self.writes_change(table.device),
                 self.shared_rates, tuple(table.shape)]
        for lay, (x, delta, target, anchor, transfer, start, post) in zip(layers, inputs):
            parts.append((lay.steps, tuple(x.shape), tuple(delta.shape), tuple(target.shape), x.dtype, target.dtype,
                          anchor is not None, start is not None, post is not None, repr(transfer),
                          tuple(t.data_ptr() for t in lay.params + lay.grads + [s for st in lay.states for s in st])))
        return tuple(parts)

    @staticmethod
    def _where(inputs, table) -> tuple:
        """Addresses and strides of this step's inputs (a zero-copy graph replays only where they match)."""
        tensors = [table]
        for x, delta, target, anchor, _, start, post in inputs:
            tensors += [x, delta, target] + (list(anchor) if anchor is not None else [])
            tensors += [post] if post is not None else []
            tensors += [start[0], *start[1]] if start is not None else []
        return tuple((t.data_ptr(), t.stride()) for t in tensors)

    def _capture(self, layers, inputs, loss, rule, table, stream_of) -> torch.cuda.CUDAGraph | None:
        """Capture the solve reading ``inputs`` and ``table`` where they are, and replay it once (this step);
        ``None`` if capture failed: nothing ran, and from then on the solver runs eagerly."""
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool for all graphs: never replayed concurrently
        device = layers[0].params[0].device
        if self.solve_order == "grouped":
            if self._own_staging is not None and self._own_staging.device != device:  # the model moved
                self._own_staging.release()
                self._own_staging = None
            if self._own_staging is None:
                self._own_staging = GroupedStaging(device)
            self._own_staging.reserve(len(triton_kernels.GROUPED_COLUMNS) * len(layers))  # this graph's table
        self.capture_staging = self._own_staging
        try:
            with capturing_graph(graph, pool=self._pool, stream=graph_side_stream(device)):
                self._run(layers, inputs, loss, rule, table, stream_of)
        except Exception as exc:  # capture failed: nothing ran; solve eagerly and stop trying
            self.capture_staging = None
            self.release_graph()
            self.cuda_graph = False
            warnings.warn(f"FusedIterativeSolver: CUDA graph capture failed ({exc}); running eagerly", stacklevel=4)
            return None
        self.capture_staging = None
        graph.replay()  # capture records, it does not run: this is the step
        return graph

    def _solve_graphed(self, problems, layers, inputs, loss, rule, table, stream_of) -> None:
        """Replay a captured solve (see :attr:`max_zero_copy_graphs`), capturing one first if needed."""
        key = self._key(layers, inputs, loss, rule, table)
        if key != self._graph_key:  # new shapes, parameters or hyper-parameters: forget the old graphs
            self.release_graph()
            self._graph_key, self._warm = key, False
        where = self._where(inputs, table)
        if where in self._graphs:
            self._graphs[where].replay()
            self.last_mode = "graph-replay"
            return
        if self._copying is not None:
            cap = self._copying
            cap.static[0]["table"].copy_(table)
            for st, (x, delta, target, anchor, _, start, post) in zip(cap.static[1:], inputs):
                st["x"].copy_(x)
                if post is None:  # else δ₀ is computed in the graph from the copy of post
                    st["delta"].copy_(delta)
                else:
                    st["post"].copy_(post)
                st["target"].copy_(target)
                if anchor is not None:
                    torch._foreach_copy_(st["anchor"], anchor)
                if start is not None:
                    torch._foreach_copy_(st["start"], [start[0], *start[1]])
            cap.graph.replay()
            self.last_mode = "graph-replay-copy"
            return
        if not self._warm:  # warm-up: eager, on a side stream (as CUDA graph capture requires)
            self._warm = True
            side = graph_side_stream(layers[0].params[0].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run(layers, inputs, loss, rule, table, stream_of)
            torch.cuda.current_stream().wait_stream(side)
            self.last_mode = "eager"
            return
        static, graph_inputs, graph_table = None, inputs, table
        if len(self._graphs) >= self.max_zero_copy_graphs:  # the inputs keep moving: a graph of static copies
            static = [{"table": table.clone()}]
            graph_inputs = []
            for x, delta, target, anchor, transfer, start, post in inputs:
                st = {"x": x.clone(), "delta": delta.clone(), "target": target.clone(),
                      "post": post.clone() if post is not None else None,
                      "anchor": [a.clone() for a in anchor] if anchor is not None else None,
                      "start": [t.clone() for t in (start[0], *start[1])] if start is not None else None}
                static.append(st)
                graph_inputs.append((st["x"], st["delta"], st["target"], st["anchor"], transfer,
                                     (st["start"][0], st["start"][1:]) if start is not None else None, st["post"]))
            graph_table = static[0]["table"]
        graph = self._capture(layers, graph_inputs, loss, rule, graph_table, stream_of)
        if graph is None:  # capture failed: this solve runs eagerly, and so do the later ones
            self._run(layers, inputs, loss, rule, table, stream_of)
            self.last_mode = "eager"
        elif static is None:
            self._graphs[where] = graph
            self.last_mode = "graph-capture"
        else:
            self._copying = _CapturedSolve(static, graph)
            self.last_mode = "graph-capture-copy"
