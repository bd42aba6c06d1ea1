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

PyTorch has two ways of saying whether float32 CUDA products may use TF32: ``torch.backends.cuda.matmul.allow_tf32``
and, since 2.9, ``torch.backends.cuda.matmul.fp32_precision``; reading the old one after the new one was set
raises ("mix of the legacy and new APIs").  :func:`cuda_matmul_tf32` and :func:`float32_products` read and set
the new one where this PyTorch has it, so a process that uses either way keeps working.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "cuda_matmul_tf32", "set_cuda_matmul_tf32", "float32_products", "matmul_precision",
           "products_precision"]

#: Precisions of the local matrix products (the first is the default).
PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def _settings() -> list[tuple[object, str]]:
    """PyTorch's float32 matrix-product settings this process has: ``(object, attribute)`` of the CUDA one and,
    where PyTorch has it, oneDNN's (the CPU's)."""
    cuda = torch.backends.cuda.matmul
    found = [(cuda, "fp32_precision" if hasattr(cuda, "fp32_precision") else "allow_tf32")]
    onednn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if onednn is not None and hasattr(onednn, "fp32_precision"):
        found.append((onednn, "fp32_precision"))
    return found


def cuda_matmul_tf32() -> bool:
    """Whether PyTorch lets float32 CUDA matrix products run in TF32 now
    (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which also reflects ``allow_tf32`` and
    ``torch.set_float32_matmul_precision``; ``allow_tf32`` itself on a PyTorch without it)."""
    holder, name = _settings()[0]
    value = getattr(holder, name)
    return value == "tf32" if name == "fp32_precision" else bool(value)


def set_cuda_matmul_tf32(enabled: bool) -> None:
    """Let float32 CUDA matrix products run in TF32 (``True``) or not, from now on, through PyTorch's newer
    setting where it has one (as ``torch.backends.cuda.matmul.allow_tf32 = enabled`` otherwise)."""
    holder, name = _settings()[0]
    setattr(holder, name, bool(enabled) if name == "allow_tf32" else ("tf32" if enabled else "ieee"))


@contextlib.contextmanager
def float32_products(tf32: bool):
    """Inside it, float32 CUDA matrix products run in TF32 (``tf32=True``) or in full float32 (``False``: also
    oneDNN's float32 products on the CPU, which ``torch.set_float32_matmul_precision("medium")`` may let
    round to bfloat16), whatever PyTorch's setting outside; each setting is restored on exit."""
    changed = []
    try:
        for i, (holder, name) in enumerate(_settings()):
            if i > 0 and tf32:  # TF32 is a CUDA mode: the CPU's setting is left alone
                continue
            value = (tf32 if name == "allow_tf32" else ("tf32" if tf32 else "ieee"))
            changed.append((holder, name, getattr(holder, name)))
            setattr(holder, name, value)
        yield
    finally:
        for holder, name, before in reversed(changed):
            setattr(holder, name, before)


def products_precision(precision: str, cuda: bool) -> str:
    """The precision the local products run in for the setting ``precision`` (one of :data:`PRECISIONS`), on
    CUDA (``cuda=True``) or not: ``"auto"`` is ``"tf32"`` on CUDA where PyTorch allows TF32 now
    (:func:`cuda_matmul_tf32`), else ``"fp32"``; any other setting is itself."""
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
