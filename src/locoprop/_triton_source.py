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
    square = tl.load(ms + offsets, mask=inside, other=0.0) * alpha + one_minus_alpha * grad * grad
    step = tl.load(m + offsets, mask=inside, other=0.0) * momentum + \
        tl.div_rn(grad, tl.sqrt_rn(square + eps)) * tl.load(lr)
    tl.store(ms + offsets, square, mask=inside)
    tl.store(m + offsets, step, mask=inside)
    weight = tl.load(w + offsets, mask=inside, other=0.0) - step
    tl.store(w + offsets, weight, mask=inside)
    if CHANGE:
        tl.store(g + offsets, weight - tl.load(s + offsets, mask=inside, other=0.0), mask=inside)


# The kernels call only Triton's built-in operations and jitted functions of this module: the interpreter runs
# triton.language's own jitted helpers (tl.zeros, tl.sum, ...) only when Triton was imported with it on.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit(do_not_specialize=["rows", "cols"])
def residual_column_sums(pre, target, sums, shift, base, rows, cols, TRANSFER: tl.constexpr,
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
    identity, 1 tanh, 2 sigmoid.  ``LIBDEVICE``: CUDA's accurate ``tanhf`` and ``expf`` (on a GPU); Triton's
    interpreter has no libdevice and evaluates tanh from ``exp`` instead (its Taylor series near 0, where
    ``1 - e^{-2|a|}`` would cancel)."""
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
    if TRANSFER == 1:
        if LIBDEVICE:
            a = libdevice.tanh(a)
        else:
            e = tl.exp(-2.0 * tl.abs(a))
            a2 = a * a
            series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * 62.0 / 2835.0))))
            far = tl.where(a < 0.0, -1.0, 1.0) * tl.div_rn(1.0 - e, 1.0 + e)
            a = tl.where(tl.abs(a) < 0.25, series, far)
    elif TRANSFER == 2:
        if LIBDEVICE:
            a = tl.div_rn(1.0, 1.0 + libdevice.exp(-a))
        else:
            a = tl.div_rn(1.0, 1.0 + tl.exp(-a))
    delta = a - tl.load(target + offsets, mask=inside, other=0.0)
    tl.store(pre + offsets, delta, mask=inside)
    if HAS_BIAS:
        tl.store(sums + tl.program_id(1) * cols + columns, tl.reduce(tl.where(inside, delta, 0.0), 0, _add),
                 mask=in_columns)


KERNELS = {"tf_rmsprop_pair": tf_rmsprop_pair}
if libdevice is not None:
    KERNELS["residual_column_sums"] = residual_column_sums
