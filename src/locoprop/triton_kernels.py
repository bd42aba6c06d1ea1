r"""One Triton kernel per layer for the fast solver's inner-optimizer update on CUDA (issue 5: fusion).

The multi-tensor update of :class:`~locoprop.update_rules.TFRMSpropRule`
issues nine kernels per local iteration, each one pass over the weights,
their gradient and the two state tensors:
``ms ← α ms + (1-α) g²``, ``m ← μ m + η_k g/√(ms+ε)``, ``w ← w - m``
(paper Sec. 3.3 and reference notes, step 6: the TF-style RMSProp that solves
each local problem).  In the default layer-major order on CUDA those are nine
launches per layer and iteration, 720 of the 1543 kernels of a LocoProp-M
T = 10 step of the standard autoencoder (``results/kernel-counts/``).  The
kernel here does the whole recurrence of one layer (its weights and its
bias) in one launch and one pass over each tensor: it reads ``g``, ``ms``,
``m``, ``w`` once and writes ``ms``, ``m``, ``w`` once.  ``η_k`` is read from
the solver's learning-rate table on the device, so a captured CUDA graph
follows schedules without recapture; division and square root round to
nearest (``div_rn``, ``sqrt_rn``), as PyTorch's own kernels do, so the result
differs from the multi-tensor update only where the compiler contracts a
multiply and an add (a few units in the last place).

Unlike ``compile_elementwise`` (Inductor, which compiles several programs
on the first step, seconds on a fresh machine), this is one small kernel
that Triton compiles in well under a second and caches on disk.  Triton
comes with PyTorch's CUDA builds on Linux; where it is missing, or its
compilation fails, the solver keeps the multi-tensor update (with a warning
in the latter case).  On the CPU the kernel runs only under Triton's
interpreter (``TRITON_INTERPRET=1``, for the tests).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = ["available", "interpreting", "suits", "disable", "disabled_because", "tf_rmsprop_update_", "compile_for",
           "TF_RMSPROP_PAIR_SIGNATURE"]

#: Elements of one tensor a program updates.
BLOCK = 1024


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, on CPU tensors too)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # not installed, or a broken install: the multi-tensor update stays
        return False
    return True


_DISABLED: list[str] = []  # why the kernels were turned off in this process (a failed compilation)


def disable(reason: str) -> None:
    """Turn the kernels off for the rest of the process (after a failure: the multi-tensor update stays)."""
    _DISABLED.append(reason)


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
def _kernels(interpreted: bool):
    """The jitted kernels (made on first use; for the interpreter or for the GPU, which Triton decides when it
    decorates a function)."""
    with _interpreter(interpreted):
        return _define_kernels()


def _define_kernels() -> dict:
    import triton
    import triton.language as tl

    # Triton makes an integer argument equal to 1 a compile-time constant: the sizes and block counts are not
    # specialised, so that the two branches' values keep one type (a bias of one element, say) and one compiled
    # kernel serves every layer.
    @triton.jit(do_not_specialize=["n0", "blocks0", "n1"])
    def tf_rmsprop_pair(w0, g0, ms0, m0, n0, blocks0, w1, g1, ms1, m1, n1, lr, alpha, one_minus_alpha, momentum,
                        eps, BLOCK: tl.constexpr):
        """Two tensors (a layer's weights and bias) in one launch: programs ``[0, blocks0)`` update the first,
        the rest the second; ``η_k`` is read from the 0-d tensor ``lr``."""
        pid = tl.program_id(0)
        if pid < blocks0:
            w, g, ms, m, n, block = w0, g0, ms0, m0, n0, pid
        else:
            w, g, ms, m, n, block = w1, g1, ms1, m1, n1, pid - blocks0
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        grad = tl.load(g + offsets, mask=inside, other=0.0)
        square = tl.load(ms + offsets, mask=inside, other=0.0) * alpha + one_minus_alpha * grad * grad
        step = tl.load(m + offsets, mask=inside, other=0.0) * momentum + \
            tl.div_rn(grad, tl.sqrt_rn(square + eps)) * tl.load(lr)
        tl.store(ms + offsets, square, mask=inside)
        tl.store(m + offsets, step, mask=inside)
        tl.store(w + offsets, tl.load(w + offsets, mask=inside, other=0.0) - step, mask=inside)

    return {"tf_rmsprop_pair": tf_rmsprop_pair}


#: The argument types of :func:`tf_rmsprop_update_`'s kernel, for :func:`compile_for`.
TF_RMSPROP_PAIR_SIGNATURE = {**{name: "*fp32" for name in ("w0", "g0", "ms0", "m0")}, "n0": "i32", "blocks0": "i32",
                             **{name: "*fp32" for name in ("w1", "g1", "ms1", "m1")}, "n1": "i32", "lr": "*fp32",
                             **{name: "fp32" for name in ("alpha", "one_minus_alpha", "momentum", "eps")},
                             "BLOCK": "constexpr"}


def compile_for(arch: int, warp_size: int = 32):
    """The TF-RMSProp kernel compiled ahead of time for the CUDA architecture ``arch`` (``90``: Hopper, the
    H100 and H200), on any machine, no GPU needed (Triton brings its own ``ptxas``): what a first launch on
    such a GPU compiles, for checks and for timing the compilation (``asm["ptx"]``, ``asm["cubin"]``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernels(False)["tf_rmsprop_pair"]
    source = ASTSource(fn=kernel, signature=TF_RMSPROP_PAIR_SIGNATURE, constexprs={"BLOCK": BLOCK})
    return triton.compile(source, target=GPUTarget("cuda", arch, warp_size))


def suits(tensors: list[torch.Tensor], lr: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors with the rate ``lr`` (a 0-d tensor): all float32, contiguous and
    on ``lr``'s device, and that device one the kernels run on (:func:`available`)."""
    device = lr.device
    return (available(device) and lr.dtype == torch.float32
            and all(t.is_contiguous() and t.dtype == torch.float32 and t.device == device for t in tensors))


def tf_rmsprop_update_(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[list[torch.Tensor]],
                       lr: torch.Tensor, alpha: float, momentum: float, eps: float) -> None:
    """One TF-RMSProp update of one or two tensors (a layer's weights and bias) in one launch, with
    ``states[i] = [ms, m]`` and the rate in the 0-d device tensor ``lr``.  The tensors must :func:`suit <suits>`
    the kernel."""
    if not 1 <= len(params) <= 2:
        raise ValueError(f"tf_rmsprop_update_: expected one or two tensors, got {len(params)}")
    first = (params[0].detach(), grads[0], *states[0])
    second = (params[1].detach(), grads[1], *states[1]) if len(params) == 2 else first
    n0 = first[0].numel()
    n1 = second[0].numel() if len(params) == 2 else 0
    blocks0 = -(-n0 // BLOCK)
    blocks = blocks0 + -(-n1 // BLOCK)
    if blocks == 0:
        return
    pair = _kernels(interpreting())["tf_rmsprop_pair"]
    hyper = (float(alpha), 1.0 - float(alpha), float(momentum), float(eps))
    with torch.cuda.device(lr.device) if lr.device.type == "cuda" else contextlib.nullcontext():
        pair[(blocks,)](*first, n0, blocks0, *second, n1, lr, *hyper, BLOCK=BLOCK)
