"""Layer discovery and capture: which ``nn.Linear`` (or convolution, or attention projection) pairs with which
transfer function.

LocoProp splits a network into layers ``â_m = W_m ŷ_{m-1}``, ``ŷ_m = f_m(â_m)``
(paper Sec. 1.2, biases folded into ``W_m``).  This module finds those pairs
(:func:`discover_layers`) and, during the one forward and backward pass of a
step, records each layer's input ``ŷ_{m-1}``, pre-activation ``â_m`` and the
loss gradients (:class:`LayerCapture`).  It knows nothing about the update.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as Fn
from torch import nn

from .transfer import Linear as LinearTransfer
from .transfer import TransferFunction, get_transfer, transfer_from_module

__all__ = ["Layer", "LayerBatch", "ConvMatrix", "ConvTransposeMatrix", "discover_layers", "split_frozen_layers",
           "check_solvable_layers", "LayerCapture", "pair_from_autograd", "set_output_transfer"]


def _share_storage(shared) -> None:
    """Each ``(parameter, view_of_the_model's_tensor)`` pair: the parameter on the view again where the model's
    tensor moved (``model.to(...)``, a copy of the model), so that updating it updates the model."""
    for mine, part in shared:
        view = part()
        if mine.data_ptr() != view.data_ptr() or mine.device != view.device or mine.dtype != view.dtype:
            mine.data = view


class ConvMatrix:
    """A ``nn.Conv1d`` or ``nn.Conv2d`` as the matrix of its local problem (Sec. 1.2, Eq. 2, applied at every
    output position).

    A convolution is a linear map of each input patch: with the patches of
    ``ŷ`` as rows (``F.unfold``: ``C_in·kh·kw`` columns, channel-major, one row
    per example and output position; a 1-d convolution as a 2-d one of height
    1), ``â = patches · Wᵀ + b`` where ``W`` is the kernel as a
    ``(C_out, C_in·kh·kw)`` matrix.  ``weight`` is that matrix, a parameter of
    its own sharing the kernel's storage (the local solve and the inner
    optimizer update it in place, so the kernel moves with it); ``bias`` is the
    convolution's.  Only zero padding.

    A convolution of ``groups=G`` maps each group of ``C_in/G`` input channels
    to its ``C_out/G`` output channels alone: ``G`` independent linear maps,
    so ``G`` layers (``group`` ``g``), each with the patches of its input
    channels as rows, its output channels as the pre-activation, and its
    slice of the kernel (and bias) as matrix, sharing their storage.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, group: int = 0) -> None:
        self.conv, self.group = conv, group
        self.dims = 1 if isinstance(conv, nn.Conv1d) else 2
        self.out_features, self.in_features = conv.out_channels // conv.groups, conv.weight[0].numel()
        self.weight = nn.Parameter(self._kernel_part(), requires_grad=conv.weight.requires_grad)
        self.bias = conv.bias if conv.groups == 1 or conv.bias is None else nn.Parameter(
            self._bias_part(), requires_grad=conv.bias.requires_grad)

    def _outputs(self) -> slice:
        """This group's output channels."""
        return slice(self.group * self.out_features, (self.group + 1) * self.out_features)

    def _kernel_part(self) -> torch.Tensor:
        """The group's rows of the kernel as its matrix, a view of the kernel's storage."""
        return self.conv.weight.detach()[self._outputs()].view(self.out_features, -1)

    def _bias_part(self) -> torch.Tensor:
        return self.conv.bias.detach()[self._outputs()]

    def _as_2d(self, values, height: int) -> tuple[int, ...]:
        """A 1-d convolution's kernel size, stride, dilation or padding as a 2-d one's, over an input of height
        1 (``height``: the value along it, 1 or, for the padding, 0)."""
        return (height, *values) if self.dims == 1 else tuple(values)

    def padding(self) -> tuple[int, ...]:
        """The convolution's padding as numbers (``"same"`` resolved; ``F.unfold`` pads evenly)."""
        conv = self.conv
        if conv.padding == "valid":
            return (0,) * self.dims
        if conv.padding == "same":
            return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
        return tuple(conv.padding)

    def sync(self) -> None:
        """Share the kernel's storage again where it moved (``model.to(...)``, a copy of the model)."""
        shared = [(self.weight, self._kernel_part)]
        if self.conv.groups > 1 and self.bias is not None:  # a group's bias is a slice too (else the conv's own)
            shared.append((self.bias, self._bias_part))
        _share_storage(shared)

    def commit(self) -> None:
        """After a step: nothing to do, the kernel shares the matrix's storage."""

    def rows(self, x: torch.Tensor, output: torch.Tensor | None = None) -> torch.Tensor:
        """The input patches as rows, ``(b·positions, C_in·kh·kw)``."""
        conv = self.conv
        if x.dim() == self.dims + 1:  # an unbatched input
            x = x.unsqueeze(0)
        if self.dims == 1:
            x = x.unsqueeze(2)
        if conv.groups > 1:
            channels = conv.in_channels // conv.groups
            x = x[:, self.group * channels:(self.group + 1) * channels]
        patches = Fn.unfold(x, self._as_2d(conv.kernel_size, 1), self._as_2d(conv.dilation, 1),
                            self._as_2d(self.padding(), 0), self._as_2d(conv.stride, 1))
        return patches.transpose(1, 2).reshape(-1, self.in_features)

    def output_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The output ``(b, C_out, *positions)`` (or unbatched) as rows, ``(b·positions, C_out)``."""
        t = t.unsqueeze(0) if t.dim() == self.dims + 1 else t
        if self.conv.groups > 1:
            t = t[:, self._outputs()]
        return t.movedim(1, -1).reshape(-1, self.out_features)

    def rows_per_example(self, output: torch.Tensor) -> int:
        """The output positions of one example."""
        return math.prod(output.shape[-self.dims:])


class ConvTransposeMatrix(ConvMatrix):
    """A ``nn.ConvTranspose1d`` or ``nn.ConvTranspose2d`` as the matrix of its local problem.

    A transposed convolution of stride ``s``, padding ``p`` and dilation ``d``
    is the convolution (stride 1, dilation ``d``) of its input with ``s - 1``
    zeros inserted between neighbours and ``d(k - 1) - p`` zeros around it
    (``output_padding`` more at the end), by the kernel with input and output
    channels swapped and flipped.  So its rows are the patches of that
    spread-out input, and its matrix is ``W[i, o, kh-1-a, kw-1-b]`` at row
    ``o``, column ``(i, a, b)``.  The kernel's memory
    (``(C_in, C_out, kh, kw)``) holds that matrix only permuted and reversed, so
    ``weight`` is a parameter of its own: the kernel is copied into it before
    each step (:meth:`sync`) and back after a step that succeeded
    (:meth:`commit`), and the inner optimizer's state lives on it.  Only
    ``groups=1`` and ``padding <= dilation·(kernel_size - 1)``.
    """

    def __init__(self, conv: nn.ConvTranspose1d | nn.ConvTranspose2d) -> None:
        self.conv, self.group = conv, 0
        self.dims = 1 if isinstance(conv, nn.ConvTranspose1d) else 2
        self.out_features, self.in_features = conv.out_channels, conv.in_channels * math.prod(conv.kernel_size)
        # (groups > 1 has no such matrix: check_solvable_layers refuses it by name)
        self.weight = nn.Parameter(self._matrix(), requires_grad=conv.weight.requires_grad) if conv.groups == 1 \
            else conv.weight
        self.bias = conv.bias

    def _offsets(self) -> tuple[int, ...]:
        """The kernel's offset dimensions (2, 3 for a 2-d one), reversed between kernel and matrix."""
        return tuple(range(2, 2 + self.dims))

    def _matrix(self) -> torch.Tensor:
        kernel = self.conv.weight.detach().flip(self._offsets())
        return kernel.transpose(0, 1).reshape(self.out_features, self.in_features)

    def sync(self) -> None:
        """The kernel's current values into the matrix (where ``model.to(...)`` moved the kernel, a new one on
        its device and dtype)."""
        kernel = self.conv.weight
        if self.weight.device != kernel.device or self.weight.dtype != kernel.dtype:
            self.weight.data = self._matrix()
        else:
            with torch.no_grad():
                self.weight.copy_(self._matrix())

    def commit(self) -> None:
        """The matrix's new values into the kernel."""
        kernel = self.conv.weight
        with torch.no_grad():
            shape = (self.out_features, kernel.shape[0], *kernel.shape[2:])
            kernel.copy_(self.weight.detach().view(shape).transpose(0, 1).flip(self._offsets()))

    def rows(self, x: torch.Tensor, output: torch.Tensor | None = None) -> torch.Tensor:
        """The patches of the spread-out input as rows, ``(b·positions, C_in·kh·kw)``, kernel offsets reversed.
        ``output`` (the layer's output) gives the output padding (``output_size=`` in the forward call)."""
        conv = self.conv
        unbatched = x.dim() == self.dims + 1
        x = x.unsqueeze(0) if unbatched else x
        if self.dims == 1:
            x = x.unsqueeze(2)
        kernel = self._as_2d(conv.kernel_size, 1)
        stride, dilation, padding = self._as_2d(conv.stride, 1), self._as_2d(conv.dilation, 1), self._as_2d(
            conv.padding, 0)
        sizes = x.shape[2:]
        spread = [(n - 1) * s + 1 for n, s in zip(sizes, stride)]
        border = [d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding)]
        if output is None:
            extra = self._as_2d(conv.output_padding, 0)
        else:
            out = output.shape[-self.dims:] if self.dims == 2 else (1, output.shape[-1])
            extra = [o - (n + 2 * e - d * (k - 1)) for o, n, e, d, k in zip(out, spread, border, dilation, kernel)]
        grid = x.new_zeros(*x.shape[:2], *(n + 2 * e + a for n, e, a in zip(spread, border, extra)))
        grid[:, :, border[0]:border[0] + spread[0]:stride[0], border[1]:border[1] + spread[1]:stride[1]] = x
        patches = Fn.unfold(grid, kernel, dilation, 0, 1)  # (b, C_in·kh·kw, positions)
        return patches.transpose(1, 2).reshape(-1, self.in_features)


class AttentionProjection:
    """One projection of an ``nn.MultiheadAttention`` as the matrix of a layer: its query, key or value
    projection (``part`` ``"q"``, ``"k"``, ``"v"``) or its output projection (``"out"``).

    ``nn.MultiheadAttention`` applies its projections with ``F.linear`` on its
    weights inside ``F.multi_head_attention_forward``, never as module calls,
    so no module hook sees them; :class:`LayerCapture` finds their products
    in the autograd graph of the attention's output instead
    (:func:`attention_products`).  Each is a linear map of its input rows
    (Sec. 1.2, Eq. 2): the query projection of the queries, the key and value
    projections of the keys and values, the output projection of the heads'
    concatenated outputs.  The three input projections are three layers, as
    a grouped convolution's groups are, whether the attention packs them in
    one ``in_proj_weight`` (``weight``: a third of its rows, a parameter of
    its own sharing their storage, as :class:`ConvMatrix` does) or keeps
    them apart (``q_proj_weight``, ...; ``kdim``/``vdim`` other than
    ``embed_dim``), their biases thirds of ``in_proj_bias``: so a
    self-attention's one product on the packed weight and a
    cross-attention's products on its parts give the same layers.  Their
    output goes into the attention scores, not into an activation, so the
    layers are linear.  ``add_bias_kv``'s ``bias_k``, ``bias_v`` are left to
    another optimizer.
    """

    PARTS = ("q", "k", "v", "out")

    def __init__(self, attention: nn.MultiheadAttention, part: str) -> None:
        if part not in self.PARTS:
            raise ValueError(f"part: expected one of {self.PARTS}, got {part!r}")
        self.attention, self.part = attention, part
        self.out_features = attention.embed_dim
        self.packed = attention._qkv_same_embed_dim
        if part == "out":
            self.weight, self.bias = attention.out_proj.weight, attention.out_proj.bias
            return
        source = attention.in_proj_weight if self.packed else getattr(attention, f"{part}_proj_weight")
        self.weight = nn.Parameter(self._weight_part(), requires_grad=source.requires_grad) if self.packed \
            else source
        self.bias = None if attention.in_proj_bias is None else nn.Parameter(
            self._bias_part(), requires_grad=attention.in_proj_bias.requires_grad)

    def _rows(self) -> slice:
        """This projection's rows of ``in_proj_weight`` (and ``in_proj_bias``)."""
        index = "qkv".index(self.part)
        return slice(index * self.out_features, (index + 1) * self.out_features)

    def _weight_part(self) -> torch.Tensor:
        return self.attention.in_proj_weight.detach()[self._rows()]

    def _bias_part(self) -> torch.Tensor:
        return self.attention.in_proj_bias.detach()[self._rows()]

    @property
    def model_params(self) -> list[nn.Parameter]:
        """The attention's own parameters this projection is part of (``in_proj_weight``, ``in_proj_bias``, ...)."""
        att = self.attention
        if self.part == "out":
            pair = (att.out_proj.weight, att.out_proj.bias)
        else:
            pair = (att.in_proj_weight if self.packed else getattr(att, f"{self.part}_proj_weight"), att.in_proj_bias)
        return [p for p in pair if p is not None]

    def sync(self) -> None:
        """Share the attention's storage again where it moved (``model.to(...)``, a copy of the model)."""
        if self.part == "out":
            return
        shared = [(self.weight, self._weight_part)] if self.packed else []
        if self.bias is not None:
            shared.append((self.bias, self._bias_part))
        _share_storage(shared)

    def commit(self) -> None:
        """After a step: nothing to do, the attention's parameters share the projections' storage."""


def _weight_source(node) -> tuple[torch.Tensor, int, int] | None:
    """The leaf parameter a product's weight operand (``TBackward0``, the ``F.linear`` transpose) comes from,
    through casts (``torch.autocast``) and splits along the rows (``w.chunk(3)``, ``w.split([E, 2E])``), with
    the parameter's rows the operand holds (first row, number of rows); ``None`` for anything else."""
    if type(node).__name__ != "TBackward0":
        return None
    splits = []  # (sizes of the split's parts, which part), from the operand towards the parameter
    node, index = node.next_functions[0]
    while node is not None and not hasattr(node, "variable"):
        kind = type(node).__name__
        if kind == "SplitBackward0":
            splits.append((int(node._saved_split_size), index))
        elif kind == "SplitWithSizesBackward0":
            splits.append(([int(n) for n in node._saved_split_sizes], index))
        elif kind != "ToCopyBackward0":
            return None
        node, index = node.next_functions[0]
    if node is None:
        return None
    first, rows = 0, node.variable.shape[0]
    for sizes, i in reversed(splits):  # from the parameter outwards
        if isinstance(sizes, int):
            start, size = i * sizes, min(sizes, rows - i * sizes)
        else:
            start, size = sum(sizes[:i]), sizes[i]
        first, rows = first + start, size
    return node.variable, first, rows


#: The products ``F.linear`` leaves in the autograd graph, and the name of the input rows each saves.
_PRODUCT_NODES = {"AddmmBackward0": "_saved_mat1", "MmBackward0": "_saved_self"}


def attention_products(attention: nn.MultiheadAttention, output: torch.Tensor, inputs) -> list[tuple]:
    """The projections' products in one call of ``attention``: ``(part, node, x, columns)`` for each projection
    (:attr:`AttentionProjection.PARTS`) whose product the autograd graph of ``output`` holds, ``x`` the
    product's input rows, ``columns`` the projection's columns of the product's output (a self-attention's one
    product on the packed ``in_proj_weight`` makes ``q``, ``k`` and ``v``).  The walk stops at the call's
    inputs."""
    stop = {t.grad_fn for t in inputs if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    E = attention.embed_dim
    weights = {id(attention.out_proj.weight): "out"}
    if attention._qkv_same_embed_dim:
        weights[id(attention.in_proj_weight)] = "in"
    else:
        weights.update({id(getattr(attention, f"{p}_proj_weight")): p for p in "qkv"})
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            source = _weight_source(child) if child is not None else None
            if source is not None and id(source[0]) in weights and type(node).__name__ in _PRODUCT_NODES:
                x = getattr(node, _PRODUCT_NODES[type(node).__name__])
                which, offset, width = weights[id(source[0])], source[1], source[2]
                if which == "in":  # the packed weight, or a part of it: its rows offset .. offset + width
                    for i, part in enumerate("qkv"):
                        lo, hi = max(offset, i * E), min(offset + width, (i + 1) * E)
                        if lo < hi:
                            found.append((part, node, x, slice(lo - offset, hi - offset)))
                else:
                    found.append((which, node, x, None))
            if child is not None:
                stack.append(child)
    return found


@dataclass
class Layer:
    """One LocoProp layer: a linear map and the transfer function after it.

    ``transfer`` is ``None`` when the module after the linear map is not a
    known monotone transfer function (only squared-loss, pre-activation
    variants accept that).  ``transfer_module`` is the activation module, when
    there is one, so that its output (the post-activation) can be captured.
    ``linear`` is the layer's matrix (``weight``, ``bias``): the ``nn.Linear``
    itself, a :class:`ConvMatrix` for a convolution, or an
    :class:`AttentionProjection`; ``module`` is the model's module (hooked
    during the forward pass; an attention projection's, its attention).  ``pending``: a layer
    inside a block ``torch.fx`` does not trace into (or in a model it cannot
    trace), whose transfer function is read from the autograd graph of the
    first step's loss (:func:`pair_from_autograd`).
    """

    name: str
    linear: nn.Linear | ConvMatrix | AttentionProjection
    transfer: TransferFunction | None
    transfer_module: nn.Module | None = None
    transfer_desc: str = ""
    pending: bool = False

    @property
    def module(self) -> nn.Module:
        """The model's module the layer belongs to (an attention projection's: the ``nn.MultiheadAttention``)."""
        if isinstance(self.linear, ConvMatrix):
            return self.linear.conv
        return self.linear.attention if isinstance(self.linear, AttentionProjection) else self.linear

    @property
    def key(self) -> tuple:
        """What identifies the layer: its module, and an attention projection's part."""
        return (id(self.module), getattr(self.linear, "part", None))

    @property
    def module_params(self) -> list[nn.Parameter]:
        """The model's own parameters of the layer (for a convolution, its kernel, not the matrix view; for an
        attention projection, the attention's parameters it is part of)."""
        if isinstance(self.linear, AttentionProjection):
            return self.linear.model_params
        return [p for p in (self.module.weight, self.module.bias) if p is not None]

    def input_rows(self, x: torch.Tensor, output: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's input as the rows of its local problem, ``(rows, in_features)`` (``output``: the layer's
        output on ``x``, which fixes a transposed convolution's output size)."""
        if isinstance(self.linear, ConvMatrix):
            return self.linear.rows(x, output)
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of the layer's output shape (pre-activation, its gradient) as rows, ``(rows, out_features)``."""
        if isinstance(self.linear, ConvMatrix):
            return self.linear.output_rows(t)
        return t.reshape(-1, t.shape[-1])

    def rows_per_example(self, output: torch.Tensor) -> int:
        """Rows of the local problem per example: a convolution's output positions; for a Linear layer the
        positions between the batch dimension (the first) and the features (the last), 1 for ``(b, d)``."""
        if isinstance(self.linear, ConvMatrix):
            return self.linear.rows_per_example(output)
        return math.prod(output.shape[1:-1])

    def sync(self) -> None:
        """Before a step, for a convolution or an attention projection: its matrix on the model's parameters'
        values (:meth:`ConvMatrix.sync`, :meth:`AttentionProjection.sync`)."""
        if isinstance(self.linear, (ConvMatrix, AttentionProjection)):
            self.linear.sync()

    def commit(self) -> None:
        """After a step that succeeded: the kernel of a transposed convolution takes the matrix's values."""
        if isinstance(self.linear, (ConvMatrix, AttentionProjection)):
            self.linear.commit()

    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        """``("weight", W)`` and, where the layer has one, ``("bias", b)``."""
        return [(n, p) for n, p in (("weight", self.linear.weight), ("bias", self.linear.bias)) if p is not None]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_params]

    def frozen_param_names(self) -> list[str]:
        """The names of its parameters with ``requires_grad=False`` (the model's: a convolution's kernel)."""
        return [n for n, p in zip(("weight", "bias"), self.module_params) if not p.requires_grad]


@dataclass
class LayerBatch:
    """What one forward and backward pass captured for a layer (Algorithms 1-4).

    Attributes:
        inputs: ``ŷ_{m-1}``, shape ``(b, n)``.
        pre: ``â_m``, shape ``(b, d)`` (``None`` once :class:`~locoprop.LocoProp`
            has built the layer's local problem, unless ``retain_problems``:
            the problem keeps the first residual instead, see
            :class:`~locoprop.solvers.LocalProblem`).
        grad_pre: ``∇_{â_m} L``.
        post: ``ŷ_m = f(â_m)`` when captured from the model.  Where
            :class:`LayerCapture` ``shares_post``, the transfer module's
            output, kept in place of ``pre`` (which is ``None`` from the end of
            the forward pass on: ``grad_edge`` gives ``∇_â L``).
        grad_post: ``∇_{ŷ_m} L`` when captured (Algorithms 3, 4).
        grad_pre_sampled: ``∇_{â_m}`` of the loss on labels sampled from the
            model's predictive distribution (for a sampled Fisher, Prop. 1).
        rows_per_example: rows of the local problem for each example (a
            convolution's output positions, 1 for a Linear layer; summed over
            the calls of a layer called more than once).
        calls: for a layer the forward pass called more than once (shared
            weights), one batch per call (its ``pre``, ``post`` and gradients),
            until :class:`~locoprop.LocoProp` stacks their rows into this one;
            ``inputs`` already holds every call's rows.  Empty for one call.
    """

    layer: Layer
    inputs: torch.Tensor
    pre: torch.Tensor | None
    grad_pre: torch.Tensor | None = None
    post: torch.Tensor | None = None
    grad_post: torch.Tensor | None = None
    grad_pre_sampled: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    #: Rows of the local problem per example (a convolution's output positions; 1 for a Linear layer).
    rows_per_example: int = 1
    calls: list["LayerBatch"] = field(default_factory=list)
    #: ``pre._version`` when the layer returned it: a later in-place change of the pre-activation is refused.
    pre_version: int = 0
    #: An attention projection's product in the autograd graph (``GradientEdge``), whose gradient is ``∇_â L``
    #: (``pre`` is then recomputed from the rows, outside the graph), and the projection's columns of it.
    grad_edge: object = None
    grad_columns: slice | None = None
    #: ``post._version`` when the transfer module returned it (:attr:`LayerCapture.shares_post`).
    post_version: int = 0

    @property
    def transfer(self) -> TransferFunction:
        return self.layer.transfer

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[0]

    #: The row tensors that :meth:`stack` concatenates (``None`` in every part, or in none).
    ROW_FIELDS = ("inputs", "pre", "post", "grad_pre", "grad_post", "grad_pre_sampled")

    @classmethod
    def stack(cls, parts: Sequence["LayerBatch"], shared: dict | None = None) -> "LayerBatch | None":
        """One layer's batches of several micro-batches (as rows, after the backward pass) as one batch whose
        rows are theirs in order; ``None`` for none, the batch itself for one.  The parts' tensors are
        released as they are stacked.  ``rows_per_example`` is the parts' when they agree, else 0 (the rows
        are no whole number of examples of one size: micro-batches of different sequence lengths).
        ``shared``: a dict kept over the layers of one step, so that layers whose parts hold the same input
        tensors (an attention's query, key and value projections of a self-attention) share one stacked copy."""
        if len(parts) <= 1:
            return parts[0] if parts else None
        layer = parts[0].layer
        per = {p.rows_per_example for p in parts}
        out = cls(layer=layer, inputs=None, pre=None, rows_per_example=per.pop() if len(per) == 1 else 0)
        for name in cls.ROW_FIELDS:
            values = [getattr(p, name) for p in parts]
            if all(v is None for v in values):
                continue
            if any(v is None for v in values):
                raise RuntimeError(f"layer {layer.name!r}: {name} is missing in some micro-batches")
            # a layer's output that is the next layer's input is stacked once for both
            setattr(out, name, _cat_once(values, shared if name in ("inputs", "post") else None))
            for p in parts:
                setattr(p, name, None)
        return out


def _cat_once(values: list[torch.Tensor], shared: dict | None) -> torch.Tensor:
    """``torch.cat(values)``, made once for the same tensors where ``shared`` is given.  It is keyed by the
    tensors' ids and holds only the results: every tensor looked up was alive, beside every other, before the
    first was stacked, so no two of them share an id, and the parts are freed as soon as no layer needs them."""
    if shared is None:
        return torch.cat(values)
    key = tuple(id(v) for v in values)
    if key not in shared:
        shared[key] = torch.cat(values)
    return shared[key]


def _flatten_sequential(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    # every position, a module listed twice too (named_children gives each module once)
    for name, child in module._modules.items():
        if child is None:
            continue
        qual = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            out.extend(_flatten_sequential(child, qual))
        else:
            out.append((qual, child))
    return out


def _check_not_inplace(name: str, module: nn.Module | None) -> None:
    if module is not None and getattr(module, "inplace", False):
        raise ValueError(
            f"layer {name!r}: the activation {type(module).__name__}(inplace=True) overwrites the "
            "pre-activation LocoProp needs; use inplace=False"
        )


#: The modules LocoProp gives a local problem: linear maps of their input (a convolution: of each patch).
LAYER_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)


def _matrix_of(module: nn.Module) -> nn.Linear | ConvMatrix:
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        return ConvTransposeMatrix(module)
    return ConvMatrix(module) if isinstance(module, (nn.Conv1d, nn.Conv2d)) else module


def _is_activation(module: nn.Module) -> bool:
    """An activation module of ``torch.nn`` or a subclass of one (``torch.nn.modules.activation``: Tanh, GELU,
    PReLU, Softmin, ...; not ``nn.MultiheadAttention``, which lives there too)."""
    import torch.nn.modules.activation as activation

    kinds = tuple(k for k in vars(activation).values() if isinstance(k, type) and issubclass(k, nn.Module)
                  and k.__module__ == activation.__name__ and k is not nn.MultiheadAttention)
    return isinstance(module, kinds)


def _transfer_after(name: str, module: nn.Module, nxt: nn.Module | None) -> Layer:
    """The layer ``module`` with the module that takes its output alone (``None``: nothing, or several) as its
    transfer function: a monotone activation's (Table 2 and :data:`~locoprop.transfer.MONOTONE_MODULES`);
    ``None`` (no transfer function, which variants that use ``f`` refuse) for another activation of ``torch.nn``
    (GELU, SiLU, PReLU, ...); linear before anything else (another layer, a ``Flatten``, a norm, a dropout, a
    block) or nothing, as for an output that goes into any call other than an activation's."""
    _check_not_inplace(name, nxt)
    transfer = transfer_from_module(nxt) if nxt is not None else None
    if transfer is None and (nxt is None or not _is_activation(nxt)):
        return Layer(name, _matrix_of(module), LinearTransfer(), None, "none")
    return Layer(name, _matrix_of(module), transfer, nxt if transfer is not None else None, type(nxt).__name__)


def _has_nested_layers(model: nn.Sequential) -> bool:
    """Whether a block of the (flattened) ``nn.Sequential`` other than a layer holds layers of its own."""
    return any(not isinstance(mod, LAYER_MODULES) and any(isinstance(m, LAYER_MODULES) for m in mod.modules())
               for _, mod in _flatten_sequential(model, ""))


#: Blocks that call the layer modules they hold as functions of their weights (``F.linear(x, out_proj.weight,
#: ...)``), so that the modules' hooks never fire: their projections are layers of their own
#: (:class:`AttentionProjection`), or with ``attention=False`` left to another optimizer.
FUNCTIONAL_LAYER_OWNERS = (nn.MultiheadAttention,)


def _attention_layers(attention: nn.MultiheadAttention, name: str) -> list[tuple[nn.Module, Layer]]:
    """An ``nn.MultiheadAttention``'s four projections as linear layers (``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``: :class:`AttentionProjection`)."""
    prefix = f"{name}." if name else ""
    return [(attention, Layer(f"{prefix}{part}_proj", AttentionProjection(attention, part), LinearTransfer(), None,
                              "none (attention)")) for part in AttentionProjection.PARTS]


def _hidden_layers(block: nn.Module, name: str, attention: bool = True) -> list[tuple[nn.Module, Layer]]:
    """The layer modules inside ``block`` (one ``torch.fx`` does not trace into, such as
    ``nn.TransformerEncoderLayer``, or a whole model it cannot trace), in definition order, each pending: its
    transfer function is read from the first step's autograd graph (:func:`pair_from_autograd`); an
    ``nn.MultiheadAttention``'s projections (linear, :func:`_attention_layers`) at its place.  Left out, for
    another optimizer: the modules inside :data:`FUNCTIONAL_LAYER_OWNERS` (with ``attention=False``, the
    attention's projections too), and subclasses with a forward of their own."""
    inside_owner = {id(m) for owner in block.modules() if isinstance(owner, FUNCTIONAL_LAYER_OWNERS)
                    for m in owner.modules()}
    out = []
    for qual, mod in block.named_modules(prefix=name):
        if attention and isinstance(mod, nn.MultiheadAttention) and type(mod).forward is nn.MultiheadAttention.forward:
            out.extend(_attention_layers(mod, qual))
            continue
        kind = next((k for k in LAYER_MODULES if isinstance(mod, k)), None)
        if kind is None or id(mod) in inside_owner or type(mod).forward is not kind.forward:
            continue
        out.append((mod, Layer(qual, _matrix_of(mod), None, None, "paired at the first step", pending=True)))
    return out


def _holds_layers(module: nn.Module | None) -> bool:
    return (module is not None and not isinstance(module, LAYER_MODULES)
            and any(isinstance(m, LAYER_MODULES) for m in module.modules()))


def _sequential_occurrences(model: nn.Sequential, attention: bool = True) -> list[tuple[nn.Module, Layer]]:
    """Each layer module of the (flattened) ``nn.Sequential`` with the module right after it; the layers inside
    any other block, pending (:func:`_hidden_layers`)."""
    flat = _flatten_sequential(model, "")
    out = []
    for i, (name, mod) in enumerate(flat):
        if isinstance(mod, LAYER_MODULES):
            out.append((mod, _transfer_after(name, mod, flat[i + 1][1] if i + 1 < len(flat) else None)))
        elif _holds_layers(mod):
            out.extend(_hidden_layers(mod, name, attention))
    return out


#: Functions (and tensor methods) of a monotone activation, with their transfer function from the call's
#: arguments; and those of activations that are not monotone (no transfer function: refused where one is needed).
_MONOTONE_FUNCTIONS = {
    "tanh": lambda a: get_transfer("tanh"), "sigmoid": lambda a: get_transfer("sigmoid"),
    "relu": lambda a: get_transfer("relu"), "relu6": lambda a: get_transfer("relu6"),
    "leaky_relu": lambda a: transfer_from_module(nn.LeakyReLU(a.get("negative_slope", 0.01))),
    "elu": lambda a: transfer_from_module(nn.ELU(a.get("alpha", 1.0))),
    "celu": lambda a: transfer_from_module(nn.CELU(a.get("alpha", 1.0))),
    "selu": lambda a: get_transfer("selu"),
    "softplus": lambda a: transfer_from_module(nn.Softplus(a.get("beta", 1.0))),
    "hardtanh": lambda a: transfer_from_module(nn.Hardtanh(a.get("min_val", -1.0), a.get("max_val", 1.0))),
    "hardsigmoid": lambda a: get_transfer("hardsigmoid"), "softsign": lambda a: get_transfer("softsign"),
    "logsigmoid": lambda a: get_transfer("logsigmoid"),
    "log_sigmoid": lambda a: get_transfer("logsigmoid"),  # F.logsigmoid is torch._C._nn.log_sigmoid
    "softmax": lambda a: get_transfer("softmax") if a.get("dim", -1) in (-1, 1, None) else None,
}
_NON_MONOTONE_FUNCTIONS = ("gelu", "silu", "mish", "hardswish")


def _call_arguments(node) -> dict:
    """A traced call's arguments by name, where its signature can be read (keywords only otherwise)."""
    import inspect

    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        return dict(bound.arguments)
    except (TypeError, ValueError):
        return dict(node.kwargs)


def _function_transfer(name: str, node) -> tuple[TransferFunction | None, str] | None:
    """The transfer function of a traced activation call (``torch.tanh``, ``F.elu``, ``x.relu()``) consuming a
    layer's output, ``(None, desc)`` for a non-monotone activation, ``None`` for any other call."""
    kind = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    inplace = kind.endswith("_") and not kind.endswith("__")
    kind = kind.rstrip("_")
    if kind not in _MONOTONE_FUNCTIONS and kind not in _NON_MONOTONE_FUNCTIONS:
        return None
    args = {} if node.op == "call_method" else _call_arguments(node)
    if inplace or args.get("inplace"):
        raise ValueError(f"layer {name!r}: the activation {kind}(inplace=True) overwrites the pre-activation "
                         "LocoProp needs; use the out-of-place call")
    if kind in _NON_MONOTONE_FUNCTIONS:
        return None, kind
    return _MONOTONE_FUNCTIONS[kind](args), kind


def _trace(model: nn.Module):
    """``model``'s forward pass as a ``torch.fx`` graph, or why it cannot be traced (a string)."""
    import torch.fx

    try:
        return torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # data-dependent control flow, an untraceable call, ...
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]


def _traced_occurrences(model: nn.Module, graph, attention: bool = True) -> list[tuple[nn.Module, Layer]]:
    """Each call of a layer module in ``model``'s forward pass, as ``torch.fx`` traced it (``graph``), with what
    takes its output: the module or activation function that alone consumes it (``_transfer_after``; a monotone
    function such as ``torch.tanh`` too), else linear (several consumers, a residual sum, a reshape).  The layers
    inside a block the trace does not enter (a ``torch.nn`` block such as ``nn.TransformerEncoderLayer``) are
    pending, at the block's place (:func:`_hidden_layers`)."""
    modules = dict(model.named_modules())
    out = []
    for node in graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if _holds_layers(module):
            out.extend(_hidden_layers(module, node.target, attention))
        if not isinstance(module, LAYER_MODULES):
            continue
        users = list(node.users)
        user = users[0] if len(users) == 1 else None
        if user is not None and user.op == "call_module":
            out.append((module, _transfer_after(node.target, module, modules[user.target])))
            continue
        called = _function_transfer(node.target, user) if user is not None and user.op in (
            "call_function", "call_method") else None
        if called is None:
            out.append((module, _transfer_after(node.target, module, None)))
        else:
            transfer, kind = called
            out.append((module, Layer(node.target, _matrix_of(module), transfer, None, kind)))
    return out


def _merge_repeated(occurrences: list[tuple[nn.Module, Layer]], where: str) -> list[Layer]:
    """One layer per module: a module that occurs again (shared weights) is one layer called again, and must be
    followed by the same transfer function each time."""
    first: dict[tuple, Layer] = {}
    for _, lay in occurrences:
        if lay.key not in first:
            first[lay.key] = lay
        elif repr(first[lay.key].transfer) != repr(lay.transfer):
            raise ValueError(f"layer {first[lay.key].name!r} appears again in the {where}, followed by "
                             f"{lay.transfer_desc} where it was followed by {first[lay.key].transfer_desc}; a shared "
                             "layer's local problem takes one transfer function (pass layers=[(module, transfer), "
                             "...])")
    return list(first.values())


def discover_layers(
    model: nn.Module,
    layers: Sequence[tuple[nn.Module, object]] | None = None,
    output_transfer=None,
    attention: bool | None = None,
) -> list[Layer]:
    """Pair each ``nn.Linear`` (and ``nn.Conv1d``, ``nn.Conv2d``: linear maps of each input patch,
    :class:`ConvMatrix`; ``nn.ConvTranspose1d``, ``nn.ConvTranspose2d``: :class:`ConvTransposeMatrix`)
    with its transfer function.

    Args:
        model: the network (or ``torch.compile(network)``: its layers are the
            network's).  For an ``nn.Sequential`` (nested ones are
            flattened) every ``nn.Linear`` is a layer and the module right after
            it, if it is a monotone activation
            (:data:`~locoprop.transfer.MONOTONE_MODULES`: Tanh, ReLU, Sigmoid,
            Softplus, ELU, Hardtanh, SELU, ...), is its transfer function; a Linear
            followed by another Linear (or nothing) is linear.  A module
            listed twice (shared weights) is one layer, called twice.  Any
            other model is traced with ``torch.fx``: each call of a layer
            module pairs with what alone consumes its output, by the same
            rule, an activation function (``torch.tanh``, ``F.elu(x,
            alpha)``, ``x.relu()``) counting as its module; a layer whose
            output goes to several places or into any other call (a residual
            sum, a reshape) is linear.  An ``nn.Sequential`` whose blocks hold
            layers of their own is traced too (where tracing fails, it is
            read in order and those layers get ``.grad`` for another
            optimizer, with a warning).
        layers: the explicit ``(linear_module, transfer)``
            pairs, ``transfer`` a name (``"tanh"``), a
            :class:`~locoprop.transfer.TransferFunction` or an activation module.
        output_transfer: the transfer function of the last layer implied by the
            loss (``"sigmoid"`` for BCE-with-logits, ``"softmax"`` for
            cross-entropy, ``"linear"`` for MSE).  ``None`` keeps what the model
            shows (a trailing activation module, or linear).
        attention: an ``nn.MultiheadAttention``'s projections are layers
            (:class:`AttentionProjection`; found without ``layers=``);
            ``False``: they are left to another optimizer.  ``None``
            (default): ``True``, but for a ``torch.compile``'d model, whose
            compiled attention leaves no products in the autograd graph.

    Raises:
        ValueError: no Linear layer, a module that is not ``nn.Linear``, a
            Linear listed twice in ``layers`` (or in an ``nn.Sequential`` or
            the traced forward pass followed by different transfer functions),
            a model that is neither an ``nn.Sequential`` nor traceable, an
            in-place activation, or an unknown transfer name.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("model: a DistributedDataParallel model; LocoProp runs its own backward pass (to the "
                         "layers' pre-activations), which DDP does not reduce: pass model.module, with "
                         "LocoProp(..., distributed='data') for exact data parallelism (or 'layers')")
    if isinstance(model, nn.DataParallel):
        raise ValueError("model: an nn.DataParallel model; its forward pass runs on copies of the layers made for "
                         "each GPU, each on its own device, where LocoProp solves each layer on the layer's own: "
                         "pass model.module, with LocoProp(..., distributed='data') on torch.distributed for data "
                         "parallelism")
    compiled = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    if compiled:  # torch.compile(model): the same modules
        model = model._orig_mod
    if attention is None:
        attention = not compiled
    names = {id(m): n for n, m in model.named_modules()}
    found: list[Layer] = []
    if layers is not None:
        for i, pair in enumerate(layers):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"layers[{i}]: expected a (nn.Linear, transfer) pair, got {pair!r}")
            lin, spec = pair
            if not isinstance(lin, LAYER_MODULES):
                raise ValueError(f"layers[{i}]: expected an nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d or "
                                 "nn.ConvTranspose2d, got "
                                 f"{type(lin).__name__}")
            name = names.get(id(lin), f"layers[{i}]")
            module = spec if isinstance(spec, nn.Module) else None
            _check_not_inplace(name, module)
            try:
                transfer = get_transfer(spec)
            except ValueError as exc:
                raise ValueError(f"layer {name!r}: {exc}") from None
            found.append(Layer(name, _matrix_of(lin), transfer, module,
                               type(spec).__name__ if module else str(spec)))
    else:
        # traced: any model but an nn.Sequential of plain layers and activations; an nn.Sequential is read in
        # order where it need not be traced or tracing fails
        sequential = isinstance(model, nn.Sequential)
        graph = _trace(model) if not sequential or _has_nested_layers(model) else None
        if graph is not None and not isinstance(graph, str):
            found = _merge_repeated(_traced_occurrences(model, graph, attention), "traced forward pass")
        elif sequential:
            found = _merge_repeated(_sequential_occurrences(model, attention), "nn.Sequential")
        else:  # untraceable (shapes read in Python, data-dependent branches): paired at the first step
            found = _merge_repeated(_hidden_layers(model, "", attention), "model")
    if not found:
        raise ValueError(f"model: no nn.Linear or convolution layer found in {type(model).__name__}; "
                         "LocoProp updates those layers")
    seen: set[tuple] = set()
    for lay in found:
        if lay.key in seen:
            raise ValueError(f"layer {lay.name!r} is listed twice")
        seen.add(lay.key)
    found = [part for lay in found for part in _group_layers(lay)]
    if output_transfer is not None:
        try:
            transfer = get_transfer(output_transfer)
        except ValueError as exc:
            raise ValueError(f"output_transfer: {exc}") from None
        if not found[-1].pending:  # else: the layer the first step's forward pass calls last takes it
            set_output_transfer(found[-1], transfer, output_transfer)
    return found


def set_output_transfer(layer: Layer, transfer: TransferFunction, spec) -> None:
    """``layer`` (the output layer) takes the transfer function the loss implies (``output_transfer``)."""
    layer.transfer = transfer
    layer.transfer_module = None  # the transfer lives inside the loss
    layer.transfer_desc = f"{spec} (output_transfer)"
    layer.pending = False


def _group_layers(lay: Layer) -> list[Layer]:
    """A convolution of ``groups=G > 1`` as its ``G`` layers (``name[g]``, :class:`ConvMatrix` ``group=g``), each
    with the layer's transfer function; any other layer as itself."""
    module = lay.module
    if not isinstance(lay.linear, ConvMatrix) or isinstance(lay.linear, ConvTransposeMatrix) or module.groups == 1:
        return [lay]
    if lay.transfer is not None and not lay.transfer.elementwise:
        raise ValueError(f"layer {lay.name!r}: a convolution with groups={module.groups} followed by "
                         f"{lay.transfer_desc}, which mixes the groups' channels; its groups' local problems "
                         "need an elementwise transfer function")
    return [Layer(f"{lay.name}[{g}]", ConvMatrix(module, g), lay.transfer, lay.transfer_module, lay.transfer_desc,
                  lay.pending) for g in range(module.groups)]


def split_frozen_layers(found: Sequence[Layer], explicit: bool) -> tuple[list[Layer], list[Layer]]:
    """Separate the layers to train from the frozen ones (every parameter ``requires_grad=False``).

    As ``torch.optim`` leaves a parameter without a gradient alone, LocoProp
    leaves a frozen layer alone: its weights are not updated and it has no
    local problem (the loss gradient still flows through it to the layers
    below).  Returns ``(trainable, frozen)``.

    Raises:
        ValueError: a layer with some parameters frozen and others not (its
            local problem would move the frozen ones); a frozen layer listed
            in ``layers=`` (``explicit``); every layer frozen.
    """
    trainable, frozen = [], []
    for lay in found:
        names = lay.frozen_param_names()
        if not names:
            trainable.append(lay)
            continue
        if len(names) < len(lay.params):
            raise ValueError(f"layer {lay.name!r}: its {' and '.join(names)} has requires_grad=False and the rest "
                             "of the layer does not; LocoProp solves a layer's weight and bias together: freeze "
                             "both or neither")
        if explicit:
            raise ValueError(f"layer {lay.name!r}: listed in layers= but its parameters have requires_grad=False; "
                             "leave frozen layers out of layers=")
        frozen.append(lay)
    if not trainable:
        raise ValueError("model: every layer LocoProp could train is frozen (requires_grad=False); it has nothing to "
                         "train")
    return trainable, frozen


def check_solvable_layers(layers: Sequence[Layer]) -> None:
    """Each layer computes ``â = ŷWᵀ + b`` with a weight and bias that are leaf parameters of its own: what a
    local problem assumes and solves for (Sec. 1.2, Eq. 2).

    Raises:
        ValueError: naming the layer, for a lazy module not yet initialized,
            a subclass of ``nn.Linear`` (or of a
            convolution) with a forward of its own (a LoRA adapter, a quantised
            layer), a convolution with padding other than zeros, a transposed
            one with ``groups > 1``, a
            parametrized weight or bias (``weight_norm``, ``spectral_norm``:
            the parameter is computed from others) or one shared with another
            layer (tied weights).
    """
    from torch.nn.utils import parametrize

    owner: dict[int, tuple[nn.Module, str]] = {}
    for lay in layers:
        module = lay.module
        # None: an attention projection (AttentionProjection), whose attention has nn.MultiheadAttention's forward
        base = next((kind for kind in LAYER_MODULES if isinstance(module, kind)), None)
        if base is not None and type(module).forward is not base.forward:
            raise ValueError(f"layer {lay.name!r}: {type(module).__name__} subclasses nn.{base.__name__} with a forward "
                             "of its own; LocoProp's local problem needs the layer's output to be x @ weight.T + bias "
                             "(leave it out of layers=, or freeze it)")
        if base is not None and base is not nn.Linear:
            transposed = isinstance(lay.linear, ConvTransposeMatrix)  # (a convolution's groups are its layers)
            if (module.groups != 1 and transposed) or module.padding_mode != "zeros":
                raise ValueError(f"layer {lay.name!r}: {base.__name__} with groups={module.groups}, padding_mode="
                                 f"{module.padding_mode!r}; LocoProp's convolution layers take zero padding, its "
                                 "transposed convolutions groups=1 (freeze the layer to leave it out)")
            if isinstance(lay.linear, ConvTransposeMatrix) and any(
                    p > d * (k - 1) for p, d, k in zip(module.padding, module.dilation, module.kernel_size)):
                raise ValueError(f"layer {lay.name!r}: {base.__name__} with padding={module.padding} above "
                                 "dilation·(kernel_size - 1) crops its output; LocoProp's transposed convolutions "
                                 "take padding <= dilation·(kernel_size - 1)")
            if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
                raise ValueError(f"layer {lay.name!r}: {base.__name__} with padding='same' and an even kernel pads "
                                 "unevenly; give the padding as numbers")
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in lay.module_params):
            raise ValueError(f"layer {lay.name!r}: its parameters are not initialized yet ({type(module).__name__}, "
                             "a lazy module); run one forward pass on a batch before constructing LocoProp, as for "
                             "any torch.optim optimizer")
        if parametrize.is_parametrized(module):
            raise ValueError(f"layer {lay.name!r}: its parameters are parametrized (weight_norm, spectral_norm, ...), "
                             "computed from other tensors; LocoProp solves for the weight itself: remove the "
                             "parametrization (torch.nn.utils.parametrize.remove_parametrizations) or leave the "
                             "layer out of layers=")
        for which, p in zip(("weight", "bias"), lay.module_params):
            if id(p) in owner and owner[id(p)][0] is not module:  # a grouped convolution's layers share a module
                raise ValueError(f"layer {lay.name!r}: its {which} is also a parameter of layer {owner[id(p)][1]!r} "
                                 "(tied weights); LocoProp solves each layer's local problem for weights of its own")
            owner[id(p)] = (module, lay.name)


def _elu_node(node) -> TransferFunction | None:
    """``F.elu`` and ``F.selu`` share one autograd node; its saved scales tell them apart."""
    alpha, scale, input_scale = (float(getattr(node, f"_saved_{a}")) for a in ("alpha", "scale", "input_scale"))
    if scale == 1.0 and input_scale == 1.0:
        return transfer_from_module(nn.ELU(alpha))
    if input_scale == 1.0 and abs(alpha - 1.6732632423543772) < 1e-12 and abs(scale - 1.0507009873554805) < 1e-12:
        return transfer_from_module(nn.SELU())
    return None


def _softmax_node(node, pre: torch.Tensor) -> TransferFunction | None:
    dim = int(node._saved_dim)
    dim = dim - 2 ** 64 if dim >= 2 ** 63 else dim  # saved as an unsigned integer
    return get_transfer("softmax") if dim in (-1, pre.dim() - 1) else None


#: The autograd nodes of monotone activations, with their transfer function from the node's saved arguments and
#: the pre-activation (``None``: an argument no transfer function takes, such as a softmax over the batch).
_MONOTONE_NODES = {
    "TanhBackward0": lambda n, pre: get_transfer("tanh"),
    "SigmoidBackward0": lambda n, pre: get_transfer("sigmoid"),
    "ReluBackward0": lambda n, pre: get_transfer("relu"),
    "AtanBackward0": lambda n, pre: get_transfer("arctan"),
    "LeakyReluBackward0": lambda n, pre: transfer_from_module(nn.LeakyReLU(float(n._saved_negative_slope))),
    "EluBackward0": lambda n, pre: _elu_node(n),
    "CeluBackward0": lambda n, pre: transfer_from_module(nn.CELU(float(n._saved_alpha))),
    "SoftplusBackward0": lambda n, pre: transfer_from_module(nn.Softplus(float(n._saved_beta))),
    "HardtanhBackward0": lambda n, pre: transfer_from_module(
        (nn.ReLU6() if (float(n._saved_min_val), float(n._saved_max_val)) == (0.0, 6.0) else
         nn.Hardtanh(float(n._saved_min_val), float(n._saved_max_val)))),
    "HardsigmoidBackward0": lambda n, pre: get_transfer("hardsigmoid"),
    "LogSigmoidBackward0": lambda n, pre: get_transfer("logsigmoid"),
    "SoftmaxBackward0": _softmax_node,
}
_NON_MONOTONE_NODES = {"GeluBackward0": "gelu", "SiluBackward0": "silu", "MishBackward0": "mish",
                       "HardswishBackward0": "hardswish"}


def _consumers(loss: torch.Tensor) -> dict[tuple[int, int], list]:
    """For each ``(autograd node, output index)`` the loss's backward graph reaches, the nodes that take that
    output: the forward pass's consumers of the tensor it made."""
    consumers: dict[tuple[int, int], list] = {}
    seen = {id(loss.grad_fn): loss.grad_fn}  # holds every node, so that ids stay unique
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        for child, index in node.next_functions:
            if child is None:
                continue
            users = consumers.setdefault((id(child), index), [])
            if all(u is not node for u in users):
                users.append(node)
            if id(child) not in seen:
                seen[id(child)] = child
                stack.append(child)
    return consumers


def pair_from_autograd(layers: Sequence[Layer], calls: Sequence[Sequence[LayerBatch]],
                       loss: torch.Tensor) -> dict[int, tuple[TransferFunction | None, str]]:
    """The transfer function of each pending layer, read from the autograd graph of the first step's ``loss``.

    The rule is discovery's (:func:`discover_layers`), on the operations the
    forward pass ran instead of a trace: the activation that alone takes the
    layer's output (``torch.tanh``, ``F.relu``, an ``nn.ELU``'s ``alpha``,
    ``nn.Softplus``'s ``beta``, a softmax over the features, ...; the nodes
    of :data:`_MONOTONE_NODES`) is its transfer function; a layer whose output
    goes to several operations, or to any other one (a residual sum, a
    dropout, a reshape), is linear; GELU, SiLU, Mish and Hardswish are not
    monotone (``(None, name)``, which variants that use ``f`` refuse); one
    whose output goes into a custom ``torch.autograd.Function`` (or a
    ``torch.compile``'d region) is linear, with a warning.
    Returns ``{index in layers: (transfer, description)}`` for the pending
    layers; ``calls`` are each layer's captured calls
    (:attr:`LayerCapture.calls`), which must agree.

    Raises:
        ValueError: a layer whose calls are followed by different functions.
    """
    consumers = _consumers(loss)
    found: dict[int, tuple[TransferFunction | None, str]] = {}
    opaque: dict[str, str] = {}  # layers whose output goes into a custom autograd Function
    for index, (lay, lay_calls) in enumerate(zip(layers, calls)):
        if not lay.pending:
            continue
        seen: tuple[TransferFunction | None, str] | None = None
        if not lay_calls:  # did not run in this step: paired in the first step that runs it
            continue
        for call in lay_calls:
            pre = call.pre
            users = consumers.get((id(pre.grad_fn), pre.output_nr), []) if pre.grad_fn is not None else []
            user = users[0] if len(users) == 1 else None  # the one operation that takes the output
            kind = type(user).__name__ if user is not None else ""
            if kind in _MONOTONE_NODES:
                transfer = _MONOTONE_NODES[kind](user, pre)
                pair = (transfer, kind.removesuffix("Backward0").lower()) if transfer is not None else (
                    LinearTransfer(), "none")
            elif kind in _NON_MONOTONE_NODES:
                pair = (None, _NON_MONOTONE_NODES[kind])
            elif isinstance(user, torch.autograd.function.BackwardCFunction):
                pair = (LinearTransfer(), "none")
                opaque.setdefault(lay.name, kind)
            else:
                pair = (LinearTransfer(), "none")
            if seen is not None and repr(seen[0]) != repr(pair[0]):
                raise ValueError(f"layer {lay.name!r}: its calls in the forward pass are followed by {seen[1]} and "
                                 f"{pair[1]}; a layer's local problem takes one transfer function (pass "
                                 "layers=[(module, transfer), ...])")
            seen = pair
        transfer = seen[0]
        if (isinstance(lay.linear, ConvMatrix) and lay.module.groups > 1 and transfer is not None
                and not transfer.elementwise):
            raise ValueError(f"layer {lay.name!r}: a convolution with groups={lay.module.groups} followed by "
                             f"{seen[1]}, which mixes the groups' channels; its groups' local problems need an "
                             "elementwise transfer function")
        found[index] = seen
    if opaque:
        import warnings

        warnings.warn(f"layers {opaque} (layer: the node its output goes into): their output goes into a custom "
                      "autograd Function (or a torch.compile'd region), which LocoProp cannot see into; they are "
                      "taken as linear: pass layers=[(module, transfer), ...] to name their transfer functions",
                      stacklevel=5)
    return found


class LayerCapture:
    """Forward hooks that record each layer's input, pre- and post-activation, once per call.

    Use as a context manager around the closure; hooks are removed on exit, so
    the user's model is unchanged outside a step.  A layer the forward pass
    calls several times (shared weights: a siamese network, an unrolled
    recurrent cell, one head on several inputs) has one local problem over the
    rows of every call, each row with its own target: its loss gradient is the
    sum over the calls, so one local SGD iteration is still BackProp's step.
    Calls whose output is outside autograd (under ``torch.no_grad``) are not
    part of the loss and are not recorded.

    ``shares_post`` (LocoProp-M's target and matching loss, which read the
    pre-activation only through ``f(â)``): where a layer's transfer module
    returns a tensor of its own, unchanged when the forward pass ends,
    :meth:`check` keeps that output ``ŷ`` (in a chain, the next layer's
    input, so no memory of its own) and lets the pre-activation go, keeping
    its place in the autograd graph (``grad_edge``) for ``∇_â L``: one
    activation set less through the backward pass and the building of the
    local problems (docs/performance.md, Memory).  An output changed in place
    (an in-place dropout after it, say) is no longer ``f(â)``: that call keeps
    its pre-activation.  ``post_beside_pre`` (the same variants where the
    update form of reduced-precision products needs ``â`` too): each call
    keeps both, its output where it is such a tensor (else ``post`` is
    ``None``), so that ``f(â)`` is read rather than evaluated again.
    """

    def __init__(self, layers: Iterable[Layer], capture_post: bool = False, shares_post: bool = False,
                 post_beside_pre: bool = False) -> None:
        self.layers = list(layers)
        self.capture_post = capture_post or shares_post or post_beside_pre
        self.shares_post = shares_post
        self.post_beside_pre = post_beside_pre
        self.calls: list[list[LayerBatch]] = [[] for _ in self.layers]
        self.untracked = [0] * len(self.layers)  # calls whose output does not require grad
        self.last_called: int | None = None  # the index of the layer the forward pass called last
        self._stacked_inputs: dict = {}  # the calls' inputs stacked once where layers share them (:func:`_cat_once`)
        self._by_pre: dict[int, list[tuple[int, LayerBatch]]] = {}  # a grouped convolution's layers share one
        self._handles: list = []

    @torch.compiler.disable  # in a torch.compile'd model: a graph break, not a compiled hook per step
    def _record_linear_call(self, index: int, module, inputs, output) -> None:
        if not output.requires_grad:
            self.untracked[index] += 1
            return
        layer = self.layers[index]
        batch = LayerBatch(layer=layer, inputs=layer.input_rows(inputs[0].detach(), output), pre=output,
                           rows_per_example=layer.rows_per_example(output), pre_version=output._version)
        self.calls[index].append(batch)
        self.last_called = index
        self._by_pre.setdefault(id(output), []).append((index, batch))

    def _linear_hook(self, index: int):
        """Layer ``index``'s forward hook: :meth:`_record_linear_call`, which ``torch.compiler.disable`` wraps once
        for the class rather than once per layer and step (a wrapper made anew is a few microseconds)."""
        return functools.partial(self._record_linear_call, index)

    @torch.compiler.disable  # as _record_linear_call
    def _record_attention_call(self, parts: dict[str, int], module, args, kwargs, output) -> None:
        """One call of an ``nn.MultiheadAttention`` whose projections are the layers ``parts`` (part: index): each
        projection's rows and ``∇_â``'s place in the graph, from the products :func:`attention_products` finds."""
        inputs = [*args, *(kwargs[k] for k in ("query", "key", "value")[len(args):] if k in kwargs)]
        out = output[0] if isinstance(output, tuple) else output
        if not out.requires_grad:
            for index in parts.values():
                self.untracked[index] += 1
            return
        # rows per example: the length of the sequence a product's rows come from (queries: also the output's)
        lengths = [t.shape[1 if module.batch_first else 0] if t.dim() == 3 else t.shape[0] for t in inputs[:3]]
        length = dict(zip("qkv", lengths), out=lengths[0])
        found = attention_products(module, out, inputs)
        missing = sorted(set(parts) - {part for part, *_ in found}, key=AttentionProjection.PARTS.index)
        if missing:
            names = [self.layers[parts[p]].name for p in missing]
            raise RuntimeError(f"layers {names}: LocoProp did not find their products in the autograd graph of "
                               f"this {type(module).__name__} call (a torch.compile'd attention, or a new "
                               "version of F.multi_head_attention_forward?); pass attention=False to leave "
                               "nn.MultiheadAttention's parameters to another optimizer")
        rows_of: dict[int, torch.Tensor] = {}  # one tensor of rows per product: q, k, v of one share it
        with torch.no_grad():
            for part, node, x, columns in found:
                if part not in parts:
                    continue
                index = parts[part]
                layer = self.layers[index]
                rows = rows_of.setdefault(id(node), x.detach())
                weight, bias = layer.linear.weight, layer.linear.bias
                pre = rows.to(weight.dtype) @ weight.T if bias is None else torch.addmm(
                    bias, rows.to(weight.dtype), weight.T)
                batch = LayerBatch(layer=layer, inputs=rows, pre=pre, rows_per_example=length[part],
                                   grad_edge=torch.autograd.graph.GradientEdge(node, 0), grad_columns=columns)
                self.calls[index].append(batch)
        self.last_called = parts.get("out", self.last_called)

    def _attention_hook(self, parts: dict[str, int]):
        """The forward hook (with keyword arguments) of an ``nn.MultiheadAttention`` whose projections are the
        layers ``parts``: :meth:`_record_attention_call`."""
        return functools.partial(self._record_attention_call, parts)

    @torch.compiler.disable
    def _transfer_hook(self, module, inputs, output):
        pre = inputs[0]
        batches = self._by_pre.get(id(pre), ())
        for index, batch in batches:
            if self.layers[index].transfer_module is not module:
                continue
            batch.post = output
            if isinstance(output, torch.Tensor):
                batch.post_version = output._version
                # autograd keeps ŷ for the transfer's backward, and not â: ŷ now (the class's attribute: reading the
                # node's would unpack it, and under torch.utils.checkpoint recompute the block)
                if self.shares_post and hasattr(type(output.grad_fn), "_saved_result"):
                    self._keep_output(batch)
        if batches and all(batch.pre is None for _, batch in batches):
            del self._by_pre[id(pre)]  # â may be freed now, and its id given to another tensor

    def __enter__(self) -> "LayerCapture":
        hooked_transfers: set[int] = set()
        attentions: dict[int, tuple[nn.Module, dict[str, int]]] = {}
        for i, lay in enumerate(self.layers):
            if isinstance(lay.linear, AttentionProjection):
                attentions.setdefault(id(lay.module), (lay.module, {}))[1][lay.linear.part] = i
                continue
            self._handles.append(lay.module.register_forward_hook(self._linear_hook(i)))
            mod = lay.transfer_module
            if self.capture_post and mod is not None and id(mod) not in hooked_transfers:
                hooked_transfers.add(id(mod))
                self._handles.append(mod.register_forward_hook(self._transfer_hook))
        for module, parts in attentions.values():
            self._handles.append(module.register_forward_hook(self._attention_hook(parts), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._by_pre.clear()

    @staticmethod
    def _output_is_f_of_pre(c: LayerBatch) -> bool:
        """Whether the call's transfer module output ``ŷ`` is ``f(â)`` as it returned it: a tensor of its own, of
        the pre-activation's shape, in the autograd graph, unchanged since."""
        post, pre = c.post, c.pre
        return (isinstance(post, torch.Tensor) and pre is not None and post.requires_grad
                and post.shape == pre.shape and post._version == c.post_version
                and post.untyped_storage().data_ptr() != pre.untyped_storage().data_ptr())

    @staticmethod
    def _keep_output(c: LayerBatch) -> None:
        """:attr:`shares_post`: the call keeps its transfer module's output in place of its pre-activation, where
        that output is a tensor of its own, of the pre-activation's shape, in the autograd graph, and unchanged
        since the module returned it.  Done by :meth:`check` when the forward pass has ended, or already when
        the module returns, where its backward keeps its output (``tanh``, the sigmoid, ReLU: an output changed
        in place afterwards would fail the backward pass anyway): then the pre-activation, which nothing else
        holds, is freed during the forward pass, as BackProp's is."""
        if c.grad_edge is None and LayerCapture._output_is_f_of_pre(c):
            c.grad_edge, c.pre = torch.autograd.graph.get_gradient_edge(c.pre), None

    def check(self) -> list[LayerBatch | None]:
        """One batch per layer (its calls' input rows stacked; ``None`` for a layer the forward pass did not
        call, which the step leaves as it is, as ``torch.optim`` leaves a parameter without a gradient), or a
        ``RuntimeError`` naming a layer whose output never entered autograd, or changed in place."""
        out: list[LayerBatch | None] = []
        for lay, calls, untracked in zip(self.layers, self.calls, self.untracked):
            if not calls and untracked:
                raise RuntimeError(f"layer {lay.name!r} ran {untracked} times in the closure's forward pass, each "
                                   "time outside autograd (under torch.no_grad, or in torch.utils.checkpoint with "
                                   "use_reentrant=True: pass use_reentrant=False); its local problem needs its "
                                   "output in the loss's graph: run it in the closure, or freeze it "
                                   "(requires_grad_(False)) to leave it alone")
            if not calls:
                out.append(None)
                continue
            for c in calls:
                if c.pre is None:  # kept its output when the transfer module returned it (_transfer_hook)
                    if c.post._version != c.post_version:
                        module = type(lay.transfer_module).__name__
                        raise RuntimeError(f"layer {lay.name!r}: the output of its {module} "
                                           "was changed in place after the module returned it (x += ..., an "
                                           "in-place dropout); its backward pass needs that output: use the "
                                           "out-of-place call")
                    continue
                if c.pre._version != c.pre_version:
                    raise RuntimeError(f"layer {lay.name!r}: its output was changed in place after the layer "
                                       "returned it (an in-place activation such as F.relu(x, inplace=True), or "
                                       "x += ...); LocoProp's local problem needs the pre-activation: use the "
                                       "out-of-place call")
            if self.shares_post:
                for c in calls:
                    self._keep_output(c)
            elif self.post_beside_pre and not all(self._output_is_f_of_pre(c) for c in calls):
                for c in calls:  # one local problem over the calls: every call's output, or none
                    c.post = None
            if len(calls) == 1:
                out.append(calls[0])
                continue
            inputs = _cat_once([c.inputs for c in calls], self._stacked_inputs)
            for c in calls:
                c.inputs = None  # the stacked rows hold them
            out.append(LayerBatch(layer=lay, inputs=inputs, pre=None, calls=calls,
                                  rows_per_example=sum(c.rows_per_example for c in calls)))
        return out
