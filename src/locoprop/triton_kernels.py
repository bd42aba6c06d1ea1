r"""Triton kernels for the fast solver's elementwise work on CUDA (issue 5: fusion).

Two kernels (their source: :mod:`locoprop._triton_source`), each one launch per layer and local iteration:

* **the inner-optimizer update.**  The multi-tensor update of
  :class:`~locoprop.update_rules.TFRMSpropRule` issues eight kernels per layer
  and iteration in the default layer-major order, each one pass over the
  weights, their gradient or the two state tensors:
  ``ms ← α ms + (1-α) g²``, ``m ← μ m + η_k g/√(ms+ε)``, ``w ← w - m``
  (paper Sec. 3.3 and reference notes, step 6: the TF-style RMSProp that
  solves each local problem); 720 of the 1543 kernels of a LocoProp-M T = 10
  step of the standard autoencoder on an H200.  :func:`tf_rmsprop_update_`
  does the recurrence of one layer (weights and bias) in one launch, reading
  ``g``, ``ms``, ``m``, ``w`` once and writing ``ms``, ``m``, ``w`` once;
  ``η_k`` is read from the solver's learning-rate table on the device, so a
  captured CUDA graph follows schedules without recapture.  Where the next
  iteration computes its pre-activation in the update form
  ``a₀ + x (W - W₀)ᵀ + (b - b₀)`` (TF32 and bf16 products), the same launch
  writes the change ``W - W₀``, ``b - b₀`` into the gradients it consumed,
  where that form reads it: two launches fewer per iteration;
* **the residual.**  :func:`residual_` computes iteration ``k``'s
  ``δ = f(â) - y`` in place and its column sums ``Σδ`` (the bias gradient)
  in one launch over tiles of the whole matrix (and, for a batch of more than
  ``BLOCK_ROWS`` rows, one sum of the tiles' sums) where PyTorch issues three
  (``f``, the difference, the sum):
  the matching loss's gradient (Eq. 2) for tanh, the sigmoid, the
  identity, ReLU and the leaky ReLU (session 32), and the squared
  pre-activation loss's (Eq. 3).  In the update
  form it reads ``â`` as the product ``x (W - W₀)ᵀ`` plus ``a₀`` plus the
  bias's change ``b - b₀``: two launches fewer (the product's own copy of
  ``a₀`` into its output, and the bias's addition).

Division and square root round to nearest (``div_rn``, ``sqrt_rn``) and tanh
and ``exp`` are CUDA's accurate ``libdevice`` functions, as in PyTorch's own
kernels, so the results differ from PyTorch's operations only where the
compiler contracts a multiply and an add and in the order of the column sums.

Unlike ``compile_elementwise`` (Inductor, which compiles several programs on
the first step, seconds on a fresh machine), these are two small kernels that
Triton compiles in a fraction of a second and caches on disk
(``results/triton-compile/``).  Triton comes with PyTorch's CUDA builds on
Linux; where it is missing, or a compilation fails, the solver keeps
PyTorch's operations (with a warning in the latter case).  On the CPU the
kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``, for the
tests), which has no ``libdevice``: there tanh is computed from ``exp``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
import struct
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["available", "interpreting", "suits", "disable", "disabled_because", "launch_or_fall_back",
           "tf_rmsprop_update_", "residual_transfer", "residual_slope", "residual_suits", "residual_", "compile_for",
           "SIGNATURES", "GroupedLayer", "GROUPED_COLUMNS", "grouped_suits", "grouped_table", "grouped_residual_",
           "grouped_gradient_update_", "grouped_compile", "disable_grouped", "grouped_disabled_because"]

#: Elements of one tensor a program of the update kernel updates.
BLOCK = 1024
#: Rows and columns of the tile a program of the residual kernel works on (a batch of at most ``BLOCK_ROWS``
#: rows is one block: its column sums go straight into the bias gradient).
BLOCK_ROWS, BLOCK_COLUMNS = 128, 32


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, on CPU tensors too)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # not installed, or a broken install: PyTorch's operations stay
        return False
    return True


_DISABLED: list[str] = []  # why the kernels were turned off in this process (a failed compilation)


def disable(reason: str) -> None:
    """Turn the kernels off for the rest of the process (after a failure: PyTorch's operations stay)."""
    _DISABLED.append(reason)


def launch_or_fall_back(what: str, launch, strict: bool, turn_off=None,
                        instead: str = "PyTorch's operations run in place of the Triton kernels") -> bool:
    """``launch()`` (one kernel launch); ``True`` if it ran.  Where it raises (Triton compiles a kernel before
    launching it, so the kernel has changed nothing): with ``strict`` (``triton_elementwise=True``) a
    ``RuntimeError`` naming ``triton_elementwise``; otherwise what failed is turned off for the process
    (``turn_off(reason)``; default :func:`disable`, every kernel), a ``RuntimeWarning`` says why and what runs
    ``instead``, and ``False``: the caller runs that."""
    try:
        launch()
    except Exception as exc:
        message = f"triton_elementwise: the {what} kernel failed ({type(exc).__name__}: {exc})"
        if strict:
            raise RuntimeError(message) from exc
        (turn_off or disable)(f"{type(exc).__name__}: {exc}")
        warnings.warn(message + f"; {instead} from now on", RuntimeWarning, stacklevel=4)
        return False
    return True


def disabled_because() -> str | None:
    """Why :func:`disable` turned the kernels off (``None``: it did not)."""
    return _DISABLED[0] if _DISABLED else None


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: CUDA with Triton installed, or any device under the
    interpreter, unless turned off by :func:`disable`."""
    if _DISABLED or not _triton_importable():
        return False
    return interpreting() or torch.device(device).type == "cuda"


@contextlib.contextmanager
def _interpreter(on: bool):
    """``TRITON_INTERPRET`` set to ``on`` inside (Triton reads it when it decorates a kernel), restored after."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


@functools.cache
def _kernels(interpreted: bool) -> dict:
    """The jitted kernels by name (:mod:`locoprop._triton_source`, loaded on first use as a module of its own
    for the interpreter or for the GPU, which Triton decides when it decorates a function)."""
    path = Path(__file__).with_name("_triton_source.py")
    name = f"locoprop._triton_source_{'interpreted' if interpreted else 'gpu'}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with _interpreter(interpreted):
        spec.loader.exec_module(module)
    return module.KERNELS


#: Each kernel's argument types, for :func:`compile_for`.
SIGNATURES = {
    "tf_rmsprop_pair": {**{name: "*fp32" for name in ("w0", "g0", "ms0", "m0")}, "n0": "i32", "blocks0": "i32",
                        **{name: "*fp32" for name in ("w1", "g1", "ms1", "m1")}, "n1": "i32", "lr": "*fp32",
                        **{name: "fp32" for name in ("alpha", "one_minus_alpha", "momentum", "eps")},
                        "s0": "*fp32", "s1": "*fp32", "BLOCK": "constexpr", "CHANGE": "constexpr"},
    "residual_column_sums": {"pre": "*fp32", "target": "*fp32", "sums": "*fp32", "shift": "*fp32", "base": "*fp32",
                             "rows": "i32", "cols": "i32", "slope": "fp32",
                             **{name: "constexpr" for name in ("TRANSFER", "HAS_BIAS", "SHIFT", "BASE", "LIBDEVICE",
                                                               "BLOCK_R", "BLOCK_C")}},
    "grouped_residual": {"layers": "*i64", "n_layers": "i32", "k": "i32",
                         **{name: "constexpr" for name in ("UPDATE_FORM", "PRECISION", "LIBDEVICE", "BLOCK_M",
                                                           "BLOCK_N", "BLOCK_K")}},
    "grouped_gradient_update": {"layers": "*i64", "n_layers": "i32", "k": "i32", "rates": "*fp32",
                                **{name: "fp32" for name in ("alpha", "one_minus_alpha", "momentum", "eps")},
                                **{name: "constexpr" for name in ("PRECISION", "BLOCK_O", "BLOCK_I", "BLOCK_K")}},
}


#: Compiler options of every launch and ahead-of-time compilation: fused multiply-adds allowed (Triton's default
#: up to 3.9, which says it will change in 3.10; pinned here so that the kernels' rounding, and what the tests and
#: benchmarks measured, do not change with the Triton version).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def compile_for(arch: int, kernel: str = "tf_rmsprop_pair", transfer: int = 1, warp_size: int = 32,
                change: bool = False, precision: str = "fp32"):
    """``kernel`` (``"tf_rmsprop_pair"``, ``"residual_column_sums"`` for the transfer code ``transfer``, with a
    bias, or one of the grouped solve's, ``"grouped_residual"`` and ``"grouped_gradient_update"``, with its
    products in ``precision``) compiled ahead of time for the CUDA architecture ``arch`` (``90``: Hopper, the
    H100 and H200), on any machine, no GPU needed (Triton brings its own ``ptxas``): what a first launch on
    such a GPU compiles, for checks and for timing the compilation (``asm["ptx"]``, ``asm["cubin"]``).
    ``change``: the variant the update form runs (the update writing the weights' change, the residual adding
    ``a₀`` and the bias's change)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernel == "tf_rmsprop_pair":
        constants = {"BLOCK": BLOCK, "CHANGE": change}
    elif kernel == "residual_column_sums":
        constants = {"TRANSFER": transfer, "HAS_BIAS": True, "SHIFT": change, "BASE": change, "LIBDEVICE": True,
                     "BLOCK_R": BLOCK_ROWS, "BLOCK_C": BLOCK_COLUMNS}
    elif kernel == "grouped_residual":
        constants = {"UPDATE_FORM": change, "PRECISION": GROUPED_PRECISIONS[precision], "LIBDEVICE": True,
                     **dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), GROUPED_RESIDUAL_BLOCKS))}
    else:
        constants = {"PRECISION": GROUPED_PRECISIONS[precision],
                     **dict(zip(("BLOCK_O", "BLOCK_I", "BLOCK_K"), GROUPED_UPDATE_BLOCKS))}
    source = ASTSource(fn=_kernels(False)[kernel], signature=SIGNATURES[kernel], constexprs=constants)
    options = {**COMPILE_OPTIONS, **(GROUPED_LAUNCH_OPTIONS if kernel.startswith("grouped") else {})}
    return triton.compile(source, target=GPUTarget("cuda", arch, warp_size), options=options)


def _float32_contiguous_on(device: torch.device, tensors: list[torch.Tensor]) -> bool:
    """Whether ``device`` is one the kernels run on (:func:`available`) and every tensor a contiguous float32
    tensor on it of fewer than 2³¹ elements (what the kernels' pointers and 32-bit offsets assume)."""
    return available(device) and all(t.is_contiguous() and t.dtype == torch.float32 and t.device == device
                                     and t.numel() < 2 ** 31 for t in tensors)


def _on(device: torch.device):
    """Launches inside it go to ``device`` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def suits(tensors: list[torch.Tensor], lr: torch.Tensor) -> bool:
    """Whether the update kernel takes these tensors with the rate ``lr`` (a 0-d tensor): all float32,
    contiguous and on ``lr``'s device, one the kernels run on."""
    return _float32_contiguous_on(lr.device, [lr, *tensors])


def tf_rmsprop_update_(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[list[torch.Tensor]],
                       lr: torch.Tensor, alpha: float, momentum: float, eps: float,
                       starts: list[torch.Tensor] | None = None) -> None:
    """One TF-RMSProp update of one or two tensors (a layer's weights and bias) in one launch, with
    ``states[i] = [ms, m]`` and the rate in the 0-d device tensor ``lr``; with ``starts`` (a tensor shaped as
    each of ``params``), each tensor's change ``params[i] - starts[i]`` after the update is then written into
    ``grads[i]``.  The tensors must :func:`suit <suits>` the kernel."""
    if not 1 <= len(params) <= 2:
        raise ValueError(f"tf_rmsprop_update_: expected one or two tensors, got {len(params)}")
    if starts is not None and [s.shape for s in starts] != [p.shape for p in params]:
        raise ValueError(f"tf_rmsprop_update_: starts of shapes {[tuple(s.shape) for s in starts]}, expected "
                         f"{[tuple(p.shape) for p in params]}")
    first = (params[0].detach(), grads[0], *states[0])
    second = (params[1].detach(), grads[1], *states[1]) if len(params) == 2 else first
    origins = [first[0], second[0]] if starts is None else [starts[0], starts[-1]]  # not read without starts
    n0 = first[0].numel()
    n1 = second[0].numel() if len(params) == 2 else 0
    blocks0 = -(-n0 // BLOCK)
    blocks = blocks0 + -(-n1 // BLOCK)
    if blocks == 0:
        return
    pair = _kernels(interpreting())["tf_rmsprop_pair"]
    hyper = (float(alpha), 1.0 - float(alpha), float(momentum), float(eps))
    with _on(lr.device):
        pair[(blocks,)](*first, n0, blocks0, *second, n1, lr, *hyper, *origins, BLOCK=BLOCK, CHANGE=starts is not None,
                        **COMPILE_OPTIONS)


def residual_transfer(loss, transfer) -> int | None:
    """The residual kernel's code for this local loss and transfer function: the matching loss's ``f(â) - y``
    (paper Eq. 2) with ``f`` the identity (0), tanh (1), the sigmoid (2) or a leaky ReLU or ReLU (3; its slope:
    :func:`residual_slope`), or the squared pre-activation loss's ``â - a`` (Eq. 3; 0); ``None`` where the kernel
    does not compute it (the loss's own ``grad_`` then does).  It depends on the two classes only (asked once per
    layer and iteration: decided once per pair)."""
    return _residual_transfer_of(type(loss), type(transfer))


def residual_slope(transfer) -> float:
    """The negative slope the residual kernel's leaky ReLU (code 3) takes for ``transfer`` (0 for the others)."""
    from .transfer import LeakyReLU

    return float(transfer.beta) if isinstance(transfer, LeakyReLU) else 0.0


@functools.cache
def _residual_transfer_of(loss_class: type, transfer_class: type) -> int | None:
    from .losses import MatchingLoss, SquaredPreLoss
    from .transfer import LeakyReLU, Linear, ReLU, Sigmoid, Tanh

    if loss_class is SquaredPreLoss:
        return 0
    if loss_class is MatchingLoss:
        return {Linear: 0, Tanh: 1, Sigmoid: 2, LeakyReLU: 3, ReLU: 3}.get(transfer_class)
    return None


def residual_suits(pre: torch.Tensor, target: torch.Tensor, bias_grad: torch.Tensor | None,
                   base: torch.Tensor | None = None) -> bool:
    """Whether the residual kernel takes these tensors: float32, contiguous, one device it runs on, ``pre``,
    ``target`` (and ``base``) of one 2-d shape, ``bias_grad`` one value per column."""
    tensors = [pre, target] + [t for t in (bias_grad, base) if t is not None]
    return (_float32_contiguous_on(pre.device, tensors) and "residual_column_sums" in _kernels(interpreting())
            and pre.dim() == 2 and target.shape == pre.shape and (base is None or base.shape == pre.shape)
            and (bias_grad is None or bias_grad.shape == pre.shape[1:]))


def residual_(pre: torch.Tensor, target: torch.Tensor, bias_grad: torch.Tensor | None, transfer: int,
              shift: torch.Tensor | None = None, base: torch.Tensor | None = None, slope: float = 0.0) -> torch.Tensor:
    """``δ = f(pre) - target`` in place in ``pre`` and, with ``bias_grad``, ``Σδ`` over the rows into it
    (``transfer``: :func:`residual_transfer`'s code; ``slope``: a leaky ReLU's, :func:`residual_slope`): one launch
    over tiles of the whole matrix, and, where the batch has more than ``BLOCK_ROWS`` rows, a sum of the tiles'
    column sums (``torch.sum``: in a fixed order). With ``base`` (a matrix shaped as ``pre``) and ``shift`` (one
    value a column), ``f((pre + base) + shift) - target``, each sum rounded as ``pre.add_(base).add_(shift)`` rounds
    it: the update form's ``a₀`` added to its product ``x (W - W₀)ᵀ``, and its bias change; ``shift`` may be
    ``bias_grad`` itself (where the update kernel wrote the bias's change).  The tensors must :func:`suit
    <residual_suits>` the kernel.  Returns ``pre`` (now ``δ``)."""
    rows, cols = pre.shape
    if pre.numel() == 0:
        if bias_grad is not None:
            bias_grad.zero_()
        return pre
    row_blocks = -(-rows // BLOCK_ROWS)
    sums = pre if bias_grad is None else bias_grad if row_blocks == 1 else \
        torch.empty(row_blocks, cols, dtype=torch.float32, device=pre.device)
    interpreted = interpreting()
    kernel = _kernels(interpreted)["residual_column_sums"]
    with _on(pre.device):
        kernel[(-(-cols // BLOCK_COLUMNS), row_blocks)](pre, target, sums, pre if shift is None else shift,
                                                        pre if base is None else base, rows, cols, float(slope),
                                                        TRANSFER=transfer, HAS_BIAS=bias_grad is not None,
                                                        SHIFT=shift is not None, BASE=base is not None,
                                                        LIBDEVICE=not interpreted,
                                                        BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLUMNS, **COMPILE_OPTIONS)
    if bias_grad is not None and row_blocks > 1:
        torch.sum(sums, 0, out=bias_grad)
    return pre


# -- the grouped solve (``FusedIterativeSolver(order="grouped")``) ---------------------------------------------
#: The columns of a layer's row in the grouped kernels' int64 table (``_triton_source.grouped_residual`` reads
#: them by position): its tensors' addresses, then its sizes and where its programs start in each grid.
GROUPED_COLUMNS = ("x", "weight", "bias", "weight_start", "bias_start", "pre_start", "target", "residual",
                   "weight_mean_square", "weight_momentum", "bias_mean_square", "bias_momentum",
                   "rows", "inputs", "outputs", "has_bias", "transfer", "update_form", "steps", "rate_offset",
                   "residual_tiles_start", "update_tiles_start", "output", "has_output", "negative_slope_bits")
#: The grouped kernels' product precisions (their ``PRECISION`` code): ``"tf32x3"`` is float32 emulated by three
#: TF32 products (``FusedIterativeSolver.grouped_fp32_products``).
GROUPED_PRECISIONS = {"fp32": 0, "tf32": 1, "bf16": 2, "tf32x3": 4}
#: Tiles of the grouped residual (rows, columns of ``δ``, columns of ``x`` summed at a time) and of the grouped
#: update (rows and columns of ``W``, rows of the batch summed at a time).
GROUPED_RESIDUAL_BLOCKS = (64, 64, 32)
GROUPED_UPDATE_BLOCKS = (64, 64, 32)
#: Triton's launch options of both grouped kernels (``num_warps``, ``num_stages``).  Eight warps, not Triton's four:
#: compiled for Hopper with four, the kernels use all 255 registers a thread may have and the update kernel spills
#: 248 to 392 bytes a thread to the stack; with eight none spills (``results/grouped-tiles-sm90/``, compiled ahead of
#: time without a GPU).  These and the tiles above are yet to be timed on a GPU (``benchmarks/grouped_tiles.py``).
GROUPED_LAUNCH_OPTIONS: dict = {"num_warps": 8}


class GroupedLayer(NamedTuple):
    """One layer's tensors for the grouped kernels (all float32, contiguous, on one device): its input ``x``
    ``(b, n_in)``, weights ``(n_out, n_in)`` and bias ``(n_out,)`` or ``None``, their TF-RMSProp states
    ``[ms, m]``, the target ``y`` ``(b, n_out)``, the residual buffer ``δ`` (``(b, n_out)``, holding ``δ₀`` before
    iteration 0), the transfer code (:func:`residual_transfer`), ``T``, the layer's offset in the rate table
    (``η_k`` at ``offset + k``), for the update form ``(a₀, W₀, b₀)``, the layer's output ``ŷ = f(â₀)`` where
    its first residual is to be computed from it, as ``ŷ - y``, at iteration 0 (else ``residual`` holds it), and
    a leaky ReLU's negative slope (:func:`residual_slope`)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_state: list
    bias_state: list | None
    target: torch.Tensor
    residual: torch.Tensor
    transfer: int
    steps: int
    rate_offset: int
    start: tuple | None = None
    output: torch.Tensor | None = None
    slope: float = 0.0


def grouped_suits(layers: list[GroupedLayer]) -> bool:
    """Whether the grouped kernels take these layers: the kernels :func:`available` on their device (with
    libdevice's ``tanh``), every tensor :func:`suits <suits>` them, the shapes agree, and either every layer or
    none is in the update form."""
    if not layers or "grouped_residual" not in _kernels(interpreting()):
        return False
    device = layers[0].weight.device
    if len({lay.start is None for lay in layers}) > 1:
        return False
    for lay in layers:
        tensors = [lay.x, lay.weight.detach(), lay.target, lay.residual, *lay.weight_state]
        tensors += [lay.bias.detach(), *lay.bias_state] if lay.bias is not None else []
        tensors += [t for t in lay.start if t is not None] if lay.start is not None else []
        tensors += [lay.output] if lay.output is not None else []
        if not _float32_contiguous_on(device, tensors) or lay.weight.dim() != 2 or lay.x.dim() != 2:
            return False
        (n_out, n_in), rows = lay.weight.shape, lay.x.shape[0]
        if lay.x.shape[1] != n_in or lay.target.shape != (rows, n_out) or lay.residual.shape != (rows, n_out):
            return False
        if lay.bias is not None and lay.bias.shape != (n_out,):
            return False
        if lay.output is not None and lay.output.shape != (rows, n_out):
            return False
        if lay.start is not None and (lay.start[0].shape != (rows, n_out) or lay.start[1].shape != lay.weight.shape
                                      or (lay.bias is not None and lay.start[2].shape != lay.bias.shape)):
            return False
    return True


def grouped_table(layers: list[GroupedLayer]) -> tuple[list[int], int, int]:
    """The grouped kernels' table of ``layers`` (one row of :data:`GROUPED_COLUMNS` per layer, flattened) and the
    number of programs of the residual launch and of the update launch."""
    (bm, bn, _), (bo, bi, _) = GROUPED_RESIDUAL_BLOCKS, GROUPED_UPDATE_BLOCKS
    flat, residual_tiles, update_tiles = [], 0, 0
    for lay in layers:
        (n_out, n_in), rows = lay.weight.shape, lay.x.shape[0]
        weight = lay.weight.detach()
        bias = lay.bias.detach() if lay.bias is not None else weight  # never read without a bias
        bias_state = lay.bias_state if lay.bias is not None else lay.weight_state
        start = lay.start if lay.start is not None else (lay.target, weight, bias)  # never read without
        row = [lay.x, weight, bias, start[1], start[2] if lay.bias is not None else bias, start[0], lay.target,
               lay.residual, *lay.weight_state, *bias_state]
        flat += [t.data_ptr() for t in row]
        flat += [rows, n_in, n_out, int(lay.bias is not None), lay.transfer, int(lay.start is not None), lay.steps,
                 lay.rate_offset, residual_tiles, update_tiles,
                 (lay.output if lay.output is not None else lay.target).data_ptr(), int(lay.output is not None),
                 struct.unpack("<i", struct.pack("<f", lay.slope))[0]]
        residual_tiles += -(-rows // bm) * -(-n_out // bn)
        update_tiles += -(-n_out // bo) * -(-n_in // bi)
    return flat, residual_tiles, update_tiles


def _grouped_precision(precision: str, interpreted: bool) -> int:
    """The grouped kernels' ``PRECISION`` code: under the interpreter, whose conversion to bfloat16 truncates,
    bf16's operands are rounded from their bits instead."""
    return 3 if precision == "bf16" and interpreted else GROUPED_PRECISIONS[precision]


def grouped_residual_(table: torch.Tensor, n_layers: int, tiles: int, k: int, update_form: bool,
                      precision: str) -> None:
    """Iteration ``k``'s ``δ = f(â) - y`` of every layer of ``table`` (:func:`grouped_table`, on the layers'
    device) into their residual buffers: one launch of ``tiles`` programs (at ``k = 0``, ``ŷ - y`` of the layers
    that give their output)."""
    interpreted = interpreting()
    bm, bn, bk = GROUPED_RESIDUAL_BLOCKS
    with _on(table.device):
        _kernels(interpreted)["grouped_residual"][(tiles,)](
            table, n_layers, k, UPDATE_FORM=update_form, PRECISION=_grouped_precision(precision, interpreted),
            LIBDEVICE=not interpreted, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **COMPILE_OPTIONS, **GROUPED_LAUNCH_OPTIONS)


def grouped_gradient_update_(table: torch.Tensor, n_layers: int, tiles: int, k: int, rates: torch.Tensor,
                             alpha: float, momentum: float, eps: float, precision: str) -> None:
    """Iteration ``k``'s gradients ``δᵀx``, ``Σδ`` and TF-RMSProp update of every layer of ``table``: one launch
    of ``tiles`` programs; ``rates``: the float32 table ``η_k`` is read from (each layer's ``rate_offset``)."""
    bo, bi, bk = GROUPED_UPDATE_BLOCKS
    interpreted = interpreting()
    with _on(table.device):
        _kernels(interpreted)["grouped_gradient_update"][(tiles,)](
            table, n_layers, k, rates, float(alpha), 1.0 - float(alpha), float(momentum), float(eps),
            PRECISION=_grouped_precision(precision, interpreted), BLOCK_O=bo, BLOCK_I=bi, BLOCK_K=bk, **COMPILE_OPTIONS,
            **GROUPED_LAUNCH_OPTIONS)


_GROUPED_DISABLED: list[str] = []  # why the grouped kernels were turned off in this process (a failed compilation)


def disable_grouped(reason: str) -> None:
    """Turn the grouped kernels off for the rest of the process (the other kernels stay: a failure of these two
    does not say the others fail)."""
    _GROUPED_DISABLED.append(reason)


def grouped_disabled_because() -> str | None:
    """Why :func:`disable_grouped` turned the grouped kernels off (``None``: it did not)."""
    return _GROUPED_DISABLED[0] if _GROUPED_DISABLED else None


def grouped_compile(table: torch.Tensor, rates: torch.Tensor, update_form: bool, precision: str) -> None:
    """Compile both grouped kernels for these arguments without running them (Triton's ``warmup``), so that a
    compilation that fails does so before the solve has changed anything (nothing to do under the interpreter)."""
    if interpreting():
        return
    (bm, bn, bk), (bo, bi, bk2) = GROUPED_RESIDUAL_BLOCKS, GROUPED_UPDATE_BLOCKS
    key = (table.device, update_form, precision, GROUPED_RESIDUAL_BLOCKS, GROUPED_UPDATE_BLOCKS,
           tuple(sorted(GROUPED_LAUNCH_OPTIONS.items())))
    if key in _GROUPED_COMPILED:  # (Triton would find them in its cache, at a cost of the host's time each call)
        return
    code = _grouped_precision(precision, False)
    kernels = _kernels(False)
    with _on(table.device):
        kernels["grouped_residual"].warmup(table, 1, 1, UPDATE_FORM=update_form, PRECISION=code, LIBDEVICE=True,
                                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, grid=(1,), **COMPILE_OPTIONS,
                                           **GROUPED_LAUNCH_OPTIONS)
        kernels["grouped_gradient_update"].warmup(table, 1, 1, rates, 0.9, 0.1, 0.0, 1e-7, PRECISION=code,
                                                  BLOCK_O=bo, BLOCK_I=bi, BLOCK_K=bk2, grid=(1,),
                                                  **COMPILE_OPTIONS, **GROUPED_LAUNCH_OPTIONS)
    _GROUPED_COMPILED.add(key)


_GROUPED_COMPILED: set = set()  # what grouped_compile has compiled in this process
