"""The precision of the local matrix products, and PyTorch's float32 matrix-product setting.

LocoProp's local iterations follow a residual ``f(a) - y`` that is a small difference of two activations, so how
their products round matters more than the forward pass's (``docs/performance.md``, Precision).  The
``precision`` argument of :class:`~locoprop.LocoProp` and :class:`~locoprop.fused.FusedIterativeSolver` says how:

* ``"auto"`` (the default): as PyTorch's float32 matrix-product setting says for the forward pass, read at each
  step: TF32 on CUDA where it allows TF32 (``torch.backends.cuda.matmul.fp32_precision = "tf32"``,
  ``torch.set_float32_matmul_precision("high")``, or the older ``allow_tf32``), and then, on the fast solver,
  in the update form ``a₀ + x (W - W₀)ᵀ + (b - b₀)`` as ``"tf32"`` (only the weights' change is rounded),
  else float32;
* ``"fp32"``: float32 products whatever PyTorch's setting (TF32 off inside the local solve, and oneDNN's
  float32 products in float32 on the CPU);
* ``"tf32"``: TF32 products on CUDA (float32 on the CPU), in the update form;
* ``"bf16"``: bfloat16 operands, float32 accumulation, in the update form.

``"auto"`` is read when a step begins (whether its forward pass keeps what the update form reads) and again where
the step uses it: change PyTorch's setting between steps, not inside a closure (one that turns TF32 on during
its own forward pass leaves that step's local products in TF32 without the update form).
:meth:`~locoprop.LocoProp.graphed_step` captures again when the setting changes between calls.

PyTorch has two ways of saying whether float32 CUDA products may use TF32: ``torch.backends.cuda.matmul.allow_tf32``
and, since 2.9, ``torch.backends.cuda.matmul.fp32_precision``; reading the old one after the new one was set
raises ("mix of the legacy and new APIs").  :func:`cuda_matmul_tf32` reads the new one where this PyTorch has
it, and :func:`float32_products` moves both together and restores both, so a process that uses either way
keeps working, inside the local solve too (``torch.compile`` reads the old one).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "cuda_matmul_tf32", "set_cuda_matmul_tf32", "float32_products", "matmul_precision",
           "products_precision"]

#: Precisions of the local matrix products (the first is the default).
PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def _onednn():
    """oneDNN's float32 matrix-product setting (the CPU's), where this PyTorch has it, else ``None``."""
    onednn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return onednn if onednn is not None and hasattr(onednn, "fp32_precision") else None


def _read(get):
    """``get()``, or ``None`` where it raises: PyTorch's older setting cannot be read once a process has set the
    two settings apart ("mix of the legacy and new APIs")."""
    try:
        return get()
    except RuntimeError:
        return None


def cuda_matmul_tf32() -> bool:
    """Whether PyTorch lets float32 CUDA matrix products run in TF32 now
    (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which also reflects ``allow_tf32`` and
    ``torch.set_float32_matmul_precision``; ``allow_tf32`` itself on a PyTorch without it)."""
    cuda = torch.backends.cuda.matmul
    if not hasattr(cuda, "fp32_precision"):  # PyTorch before 2.9
        return bool(cuda.allow_tf32)
    return cuda.fp32_precision == "tf32"


def set_cuda_matmul_tf32(enabled: bool) -> None:
    """Let float32 CUDA matrix products run in TF32 (``True``) or not, from now on: PyTorch's older setting
    (``allow_tf32``, which moves the newer one with it) where the two agree or the newer one is absent, else
    the newer one alone."""
    cuda = torch.backends.cuda.matmul
    if not hasattr(cuda, "fp32_precision") or _read(lambda: cuda.allow_tf32) is not None:
        cuda.allow_tf32 = bool(enabled)
    if hasattr(cuda, "fp32_precision"):
        cuda.fp32_precision = "tf32" if enabled else "ieee"


@contextlib.contextmanager
def float32_products(tf32: bool):
    """Inside it, float32 CUDA matrix products run in TF32 (``tf32=True``) or in full float32 (``False``: also
    oneDNN's float32 products on the CPU, which ``torch.set_float32_matmul_precision("medium")`` may let
    round to bfloat16), whatever PyTorch's setting outside.  Where the setting already says so it writes
    nothing (with PyTorch's defaults, ``False`` never writes).  Otherwise it moves PyTorch's two settings
    together, so that code inside may read either, and on exit restores each as it was, exactly.  The setting is
    the process's: two threads inside such contexts at once (a model on two GPUs solving in its backward pass)
    may see each other's, though each restores what it found."""
    cuda, onednn = torch.backends.cuda.matmul, _onednn()
    if not hasattr(cuda, "fp32_precision"):  # PyTorch before 2.9: allow_tf32 is a view of the older setting
        if bool(cuda.allow_tf32) == tf32:
            yield
            return
        before = torch.get_float32_matmul_precision()
        cuda.allow_tf32 = tf32
        try:
            yield
        finally:  # (allow_tf32 = its old value would turn "medium" into "high")
            torch.set_float32_matmul_precision(before)
        return
    onednn_float32 = tf32 or onednn is None or onednn.fp32_precision in ("none", "ieee")
    if cuda_matmul_tf32() == tf32 and onednn_float32:
        yield
        return
    saved = [(cuda, cuda.fp32_precision)] + ([(onednn, onednn.fp32_precision)] if onednn is not None else [])
    legacy = _read(torch.get_float32_matmul_precision) if _read(lambda: cuda.allow_tf32) is not None else None
    try:
        if legacy is not None:
            cuda.allow_tf32 = tf32  # the older setting, which moves the newer one with it
        cuda.fp32_precision = "tf32" if tf32 else "ieee"
        if not tf32 and onednn is not None:
            onednn.fp32_precision = "ieee"
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for holder, before in reversed(saved):
            holder.fp32_precision = before


def products_precision(precision: str, cuda: bool) -> str:
    """The precision the local products run in for the setting ``precision`` (one of :data:`PRECISIONS`), on
    CUDA (``cuda=True``) or not: ``"auto"`` is ``"tf32"`` on CUDA where PyTorch allows TF32 now
    (:func:`cuda_matmul_tf32`), else ``"fp32"``; ``"tf32"`` is ``"fp32"`` off CUDA; any other setting is
    itself."""
    if precision == "tf32" and not cuda:  # TF32 is a CUDA mode: float32 on the CPU, whatever oneDNN's setting
        return "fp32"
    if precision != "auto":
        return precision
    return "tf32" if cuda and cuda_matmul_tf32() else "fp32"


@contextlib.contextmanager
def matmul_precision(precision: str):
    """Inside it, matrix products run as the local products of ``precision`` (a resolved one:
    :func:`products_precision`) do: ``"tf32"`` TF32 on CUDA, ``"fp32"`` full float32 (:func:`float32_products`);
    ``"bf16"`` (whose products are bfloat16 by their operands) and ``"auto"`` leave PyTorch's setting as it is."""
    if precision not in ("tf32", "fp32"):
        yield
        return
    with float32_products(precision == "tf32"):
        yield
