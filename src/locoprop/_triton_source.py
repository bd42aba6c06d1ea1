"""The Triton kernels of :mod:`locoprop.triton_kernels` (their source; import that module, not this one).

:mod:`locoprop.triton_kernels` loads this file as a module of its own once for the GPU and, for the tests,
once under Triton's interpreter: Triton decides between the two when it decorates a kernel.
"""

import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # an old Triton: the residual kernel is not made, the update kernel still is
    libdevice = None


# Triton makes an integer argument equal to 1 a compile-time constant: the sizes and block counts are not
# specialised, so that the two branches' values keep one type (a bias of one element, say) and one compiled
# kernel serves every layer.
@triton.jit(do_not_specialize=["n0", "blocks0", "n1"])
def tf_rmsprop_pair(w0, g0, ms0, m0, n0, blocks0, w1, g1, ms1, m1, n1, lr, alpha, one_minus_alpha, momentum,
                    eps, s0, s1, BLOCK: tl.constexpr, CHANGE: tl.constexpr):
    """Two tensors (a layer's weights and bias) in one launch: programs ``[0, blocks0)`` update the first,
    the rest the second; ``η_k`` is read from the 0-d tensor ``lr``.  With ``CHANGE``, each tensor's change
    from its start ``s`` (``w - s``, the new ``w``) then goes into its gradient ``g``, which the update has
    consumed: the next iteration's update form reads it there (``s0``, ``s1`` are not read without it)."""
    pid = tl.program_id(0)
    if pid < blocks0:
        w, g, ms, m, n, s, block = w0, g0, ms0, m0, n0, s0, pid
    else:
        w, g, ms, m, n, s, block = w1, g1, ms1, m1, n1, s1, pid - blocks0
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    grad = tl.load(g + offsets, mask=inside, other=0.0)
    weight = _tf_rmsprop_tile(w + offsets, ms + offsets, m + offsets, grad, inside, tl.load(lr), alpha,
                              one_minus_alpha, momentum, eps)
    if CHANGE:
        tl.store(g + offsets, weight - tl.load(s + offsets, mask=inside, other=0.0), mask=inside)


# The kernels call only Triton's built-in operations and jitted functions of this module: the interpreter runs
# triton.language's own jitted helpers (tl.zeros, tl.sum, ...) only when Triton was imported with it on.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _transfer(a, kind, slope, LIBDEVICE: tl.constexpr):
    """``f(a)``: ``kind`` 0 identity, 1 tanh, 2 sigmoid, 3 leaky ReLU of negative slope ``slope`` (ReLU: 0;
    ``β a`` below 0, the bits of ``-(β · -a)``, as :class:`~locoprop.transfer.LeakyReLU` computes it).
    ``LIBDEVICE``: CUDA's accurate ``tanhf`` and ``expf`` (on a GPU); Triton's interpreter has no libdevice and
    evaluates tanh from ``exp`` instead (its Taylor series near 0, where ``1 - e^{-2|a|}`` would cancel)."""
    if kind == 1:
        if LIBDEVICE:
            a = libdevice.tanh(a)
        else:
            e = tl.exp(-2.0 * tl.abs(a))
            a2 = a * a
            series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * 62.0 / 2835.0))))
            far = tl.where(a < 0.0, -1.0, 1.0) * tl.div_rn(1.0 - e, 1.0 + e)
            a = tl.where(tl.abs(a) < 0.25, series, far)
    elif kind == 2:
        if LIBDEVICE:
            a = tl.div_rn(1.0, 1.0 + libdevice.exp(-a))
        else:
            a = tl.div_rn(1.0, 1.0 + tl.exp(-a))
    elif kind == 3:
        a = tl.where(a > 0.0, a, a * slope)
    return a


@triton.jit(do_not_specialize=["rows", "cols"])
def residual_column_sums(pre, target, sums, shift, base, rows, cols, slope, TRANSFER: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr, BASE: tl.constexpr, LIBDEVICE: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``δ = f(â) - y`` in place in ``pre`` (``rows x cols``, row-major), each program one tile of ``BLOCK_R``
    rows and ``BLOCK_C`` columns; with a bias, each tile's column sums go to row ``program_id(1)`` of ``sums``
    (one row per block of rows), which the caller then sums over its rows, in a fixed order (no atomics: the
    same sums from run to run); with one block of rows ``sums`` is the bias gradient itself.  With ``BASE``,
    ``â`` is ``pre`` plus ``base`` (a matrix of ``pre``'s shape: the update form's ``a₀``, added to the product
    ``x (W - W₀)ᵀ``), then with ``SHIFT`` plus ``shift`` (one value a column, added to every row, as the update
    form adds the bias's change ``b - b₀``), in that order; each program reads its columns of ``shift``
    before it writes its sums, so ``shift`` may be ``sums`` itself.  ``TRANSFER``: 0
    identity, 1 tanh, 2 sigmoid, 3 leaky ReLU of negative slope ``slope`` (:func:`_transfer`)."""
    columns = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_columns = columns < cols
    offsets = r[:, None] * cols + columns[None, :]
    inside = (r[:, None] < rows) & in_columns[None, :]
    a = tl.load(pre + offsets, mask=inside, other=0.0)
    if BASE:
        a = a + tl.load(base + offsets, mask=inside, other=0.0)
    if SHIFT:
        a = a + tl.load(shift + columns, mask=in_columns, other=0.0)[None, :]
    a = _transfer(a, TRANSFER, slope, LIBDEVICE)
    delta = a - tl.load(target + offsets, mask=inside, other=0.0)
    tl.store(pre + offsets, delta, mask=inside)
    if HAS_BIAS:
        tl.store(sums + tl.program_id(1) * cols + columns, tl.reduce(tl.where(inside, delta, 0.0), 0, _add),
                 mask=in_columns)


# -- the grouped solve: one launch per phase of a local iteration for every layer -------------------------------
# Each layer is one row of an int64 table (``triton_kernels.GROUPED_COLUMNS`` names the columns): the addresses
# of its tensors, its sizes and where its programs start in each launch's grid.  A program finds its layer by
# the row whose start it has passed (the layers are few), then works on one tile of that layer.
@triton.jit
def _row_of(layers, n_layers, pid, START: tl.constexpr, WIDTH: tl.constexpr):
    row = 0
    for m in range(1, n_layers):
        row += (pid >= tl.load(layers + m * WIDTH + START)).to(tl.int32)
    return layers + row * WIDTH


@triton.jit
def _slope(row):
    """The layer's negative slope (a leaky ReLU's), kept in the table as its float32 bits."""
    return tl.load(row + 24).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _layer_tile(layers, n_layers, START: tl.constexpr, COLUMNS: tl.constexpr, BLOCK_A: tl.constexpr,
                BLOCK_B: tl.constexpr):
    """This program's layer and tile: the layer's row of the table (its programs start at column ``START``), its
    rows, inputs and outputs, and the tile's indices along the matrix's two dimensions (``BLOCK_A`` and
    ``BLOCK_B`` of them; the matrix has as many columns as the table's column ``COLUMNS`` says) and the first
    of the latter."""
    pid = tl.program_id(0)
    row = _row_of(layers, n_layers, pid, START, 25)
    tile = pid - tl.load(row + START).to(tl.int32)
    column_blocks = (tl.load(row + COLUMNS).to(tl.int32) + BLOCK_B - 1) // BLOCK_B
    first_b = (tile % column_blocks) * BLOCK_B
    return (row, tl.load(row + 12).to(tl.int32), tl.load(row + 13).to(tl.int32), tl.load(row + 14).to(tl.int32),
            (tile // column_blocks) * BLOCK_A + tl.arange(0, BLOCK_A), first_b + tl.arange(0, BLOCK_B), first_b)


@triton.jit
def _address(row, column: tl.constexpr):
    return tl.load(row + column).to(tl.pointer_type(tl.float32))


@triton.jit
def _rounded_to_bfloat16(a):
    """``a`` rounded to the nearest bfloat16 (ties to even), as a float32: from its bits, for the interpreter,
    whose conversion to bfloat16 truncates."""
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _product(a, b, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in float32: operands in float32 (0), TF32 (1) or bfloat16 (2; 3 the interpreter's:
    the operands rounded to bfloat16 in float32, whose products are exact in float32 as bfloat16's are), or
    float32 emulated by three TF32 products on the tensor cores (4: each operand split into a TF32 part and the
    TF32 part of its rest, the product of the two rests left out)."""
    if PRECISION == 4:
        return tl.dot(a, b, input_precision="tf32x3", out_dtype=tl.float32)
    elif PRECISION == 3:
        return tl.dot(_rounded_to_bfloat16(a), _rounded_to_bfloat16(b), input_precision="ieee", out_dtype=tl.float32)
    elif PRECISION == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PRECISION == 1:
        return tl.dot(a, b, input_precision="tf32", out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision="ieee", out_dtype=tl.float32)


@triton.jit(do_not_specialize=["n_layers", "k"])
def grouped_residual(layers, n_layers, k, UPDATE_FORM: tl.constexpr, PRECISION: tl.constexpr,
                     LIBDEVICE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Iteration ``k``'s residual of every layer in one launch: each program one ``BLOCK_M x BLOCK_N`` tile of a
    layer's ``δ = f(â) - y`` (paper Eq. 2; the squared pre-activation loss's ``â - a`` with ``f`` the identity,
    Eq. 3), with ``â = x Wᵀ + b`` computed in the tile (its product accumulated in float32 over ``BLOCK_K``
    columns of ``x`` at a time) or, with ``UPDATE_FORM``, ``a₀ + x (W - W₀)ᵀ + (b - b₀)``: the change is
    taken in float32 before the product rounds it.  Layers whose ``T`` is at most ``k`` are skipped.  At ``k = 0``
    only the layers that kept their output ``ŷ = f(â₀)`` in place of their first residual compute it, as
    ``ŷ - y`` (no product); the others' is in their residual buffer already."""
    row, rows, n_in, n_out, r, c, _ = _layer_tile(layers, n_layers, 20, 14, BLOCK_M, BLOCK_N)
    if k >= tl.load(row + 18):
        return
    in_r = r < rows
    in_c = c < n_out
    if k == 0:
        if tl.load(row + 23) != 0:
            inside = in_r[:, None] & in_c[None, :]
            offsets = r[:, None] * n_out + c[None, :]
            post = tl.load(_address(row, 22) + offsets, mask=inside, other=0.0)
            tl.store(_address(row, 7) + offsets, post - tl.load(_address(row, 6) + offsets, mask=inside, other=0.0),
                     mask=inside)
        return
    x = _address(row, 0)
    w = _address(row, 1)
    w0 = _address(row, 3)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for start in range(0, n_in, BLOCK_K):
        j = start + tl.arange(0, BLOCK_K)
        in_j = j < n_in
        xs = tl.load(x + r[:, None] * n_in + j[None, :], mask=in_r[:, None] & in_j[None, :], other=0.0)
        inside_w = in_c[:, None] & in_j[None, :]
        ws = tl.load(w + c[:, None] * n_in + j[None, :], mask=inside_w, other=0.0)
        if UPDATE_FORM:
            ws = ws - tl.load(w0 + c[:, None] * n_in + j[None, :], mask=inside_w, other=0.0)
        acc += _product(xs, tl.trans(ws), PRECISION)
    inside = in_r[:, None] & in_c[None, :]
    offsets = r[:, None] * n_out + c[None, :]
    if UPDATE_FORM:
        acc = tl.load(_address(row, 5) + offsets, mask=inside, other=0.0) + acc
    in_bias = c < tl.where(tl.load(row + 15) != 0, n_out, 0)  # no column without a bias
    bias = tl.load(_address(row, 2) + c, mask=in_bias, other=0.0)
    if UPDATE_FORM:
        bias = bias - tl.load(_address(row, 4) + c, mask=in_bias, other=0.0)
    acc = acc + bias[None, :]
    f = _transfer(acc, tl.load(row + 16), _slope(row), LIBDEVICE)
    delta = f - tl.load(_address(row, 6) + offsets, mask=inside, other=0.0)
    tl.store(_address(row, 7) + offsets, delta, mask=inside)


@triton.jit(do_not_specialize=["n_layers", "k"])
def grouped_gradient_update(layers, n_layers, k, rates, alpha, one_minus_alpha, momentum, eps,
                            PRECISION: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """Iteration ``k``'s local gradient and TF-RMSProp update of every layer in one launch: each program one
    ``BLOCK_O x BLOCK_I`` tile of a layer's weight gradient ``δᵀx`` (summed in float32 over ``BLOCK_K`` rows of
    the batch at a time; the programs of the first column of tiles also sum ``δ`` over the rows, the bias
    gradient ``Σδ``), kept in registers and applied at once: ``ms ← α ms + (1-α) g²``,
    ``m ← μ m + η_k g/√(ms+ε)``, ``w ← w - m`` (paper Sec. 3.3, reference notes, step 6; the rounding of
    :func:`tf_rmsprop_pair`), ``η_k`` read from ``rates`` at the layer's offset plus ``k``.  Neither gradient
    is written to memory."""
    row, rows, n_in, n_out, o, i, first_i = _layer_tile(layers, n_layers, 21, 13, BLOCK_O, BLOCK_I)
    if k >= tl.load(row + 18):
        return
    in_o = o < n_out
    in_i = i < n_in
    sums_bias = (first_i == 0) & (tl.load(row + 15) != 0)  # the first column of tiles
    x = _address(row, 0)
    delta = _address(row, 7)
    acc = tl.full((BLOCK_O, BLOCK_I), 0.0, tl.float32)
    bias_grad = tl.full((BLOCK_O,), 0.0, tl.float32)
    for start in range(0, rows, BLOCK_K):
        b = start + tl.arange(0, BLOCK_K)
        in_b = b < rows
        ds = tl.load(delta + b[:, None] * n_out + o[None, :], mask=in_b[:, None] & in_o[None, :], other=0.0)
        xs = tl.load(x + b[:, None] * n_in + i[None, :], mask=in_b[:, None] & in_i[None, :], other=0.0)
        acc += _product(tl.trans(ds), xs, PRECISION)
        if sums_bias:
            bias_grad += tl.reduce(ds, 0, _add)
    lr = tl.load(rates + tl.load(row + 19) + k)
    inside = in_o[:, None] & in_i[None, :]
    offsets = o[:, None] * n_in + i[None, :]
    _tf_rmsprop_tile(_address(row, 1) + offsets, _address(row, 8) + offsets, _address(row, 9) + offsets, acc,
                     inside, lr, alpha, one_minus_alpha, momentum, eps)
    if sums_bias:
        _tf_rmsprop_tile(_address(row, 2) + o, _address(row, 10) + o, _address(row, 11) + o, bias_grad, in_o, lr,
                         alpha, one_minus_alpha, momentum, eps)


@triton.jit
def _tf_rmsprop_tile(w, ms, m, grad, inside, lr, alpha, one_minus_alpha, momentum, eps):
    """TF-RMSProp's update of the elements ``inside`` of ``w`` (pointers ``w``, ``ms``, ``m``) from ``grad``:
    ``ms ← α ms + (1-α) g²``, ``m ← μ m + η g/√(ms+ε)``, ``w ← w - m``; returns the new ``w``."""
    square = tl.load(ms, mask=inside, other=0.0) * alpha + one_minus_alpha * grad * grad
    step = tl.load(m, mask=inside, other=0.0) * momentum + tl.div_rn(grad, tl.sqrt_rn(square + eps)) * lr
    tl.store(ms, square, mask=inside)
    tl.store(m, step, mask=inside)
    weight = tl.load(w, mask=inside, other=0.0) - step
    tl.store(w, weight, mask=inside)
    return weight


KERNELS = {"tf_rmsprop_pair": tf_rmsprop_pair, "grouped_gradient_update": grouped_gradient_update}
if libdevice is not None:
    KERNELS["residual_column_sums"] = residual_column_sums
    KERNELS["grouped_residual"] = grouped_residual
