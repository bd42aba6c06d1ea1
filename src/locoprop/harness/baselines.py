"""The paper's baseline optimizers behind one interface (docs/baselines.md).

:func:`build_baseline` turns a name of :data:`BASELINE_NAMES` and the paper's
hyper-parameters ``(eta, beta1, beta2, epsilon)`` (Tables 3 and 4) into a
:class:`ClosureOptimizer`, whose ``step(closure)`` runs the forward pass the
closure defines, the backward pass and the update.

* ``sgd``, ``momentum``, ``nesterov``, ``adam``, ``adagrad``: :mod:`torch.optim`.
* ``rmsprop``: TensorFlow-1 RMSProp with momentum, :class:`locoprop.inner.TFRMSprop`.
* ``shampoo``: :class:`pytorch_optimizer.ScalableShampoo` (a port of the
  authors' own ``distributed_shampoo``), behind a thin adapter whose state dict
  holds tensors only.
* ``kfac``: Kronecker factors from BackPACK's ``KFAC`` extension (gradients
  sampled from the model's predictive distribution), with the moving averages,
  damping, inverses and preconditioning written here in
  :class:`KFACOptimizer`.

``weight_decay`` is decoupled and applied the same way for every name:
``w <- w * (1 - lr * weight_decay)`` before the optimizer's own update.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from locoprop.inner import TFRMSprop

__all__ = [
    "BASELINE_NAMES",
    "SHAMPOO_ROOTS",
    "ClosureOptimizer",
    "check_shampoo_root",
    "KFACOptimizer",
    "build_baseline",
]

#: Every name :func:`build_baseline` accepts.
BASELINE_NAMES = ("sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "shampoo", "kfac")

# Defaults used when the paper's hyper-parameter is not given (``None``).
_MOMENTUM_DEFAULT = 0.9  # momentum / nesterov beta1
_ADAM_DEFAULTS = (0.9, 0.999, 1e-8)  # torch.optim.Adam
_RMSPROP_DEFAULTS = (0.0, 0.9, 1e-10)  # TF-1 RMSPropOptimizer: momentum, decay, epsilon
_ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad
_ADAGRAD_INITIAL_ACCUMULATOR = 0.1  # TF-1 AdagradOptimizer's initial_accumulator_value
_SHAMPOO_DEFAULTS = (0.9, 0.999, 1e-6)  # beta1, beta2, matrix_eps (pytorch_optimizer defaults)
_KFAC_DEFAULTS = (0.0, 0.95, 1e-3)  # momentum, factor moving-average decay, damping
#: How Shampoo computes its inverse p-th roots: the library's coupled Schur-Newton iteration, or an exact
#: symmetric eigendecomposition of the same ridged matrix (:func:`_eigh_inverse_root`).
SHAMPOO_ROOTS = ("newton", "eigh")

_FULL_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"


# ---------------------------------------------------------------------------
# A private random stream (Shampoo's power iteration, K-FAC's sampled targets)
# ---------------------------------------------------------------------------


class _PrivateRNG:
    """A random stream of its own, saved in the optimizer's state dict.

    Inside :meth:`active` the global generators (CPU, and the model's CUDA
    device if any) run from this stream's state; on exit the stream's new state
    is kept and the global generators are put back as they were.  A run
    restored from a state dict so draws exactly the numbers the original run
    would have drawn, and the optimizer leaves the caller's random stream (data
    shuffling, initialisation) untouched.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed = int(seed)
        self.device = device
        self.cpu_state: torch.Tensor | None = None
        self.cuda_state: torch.Tensor | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        devices = [self.device] if cuda else []
        with torch.random.fork_rng(devices=devices):
            if self.cpu_state is None:
                torch.default_generator.manual_seed(self.seed)
                if cuda:
                    with torch.cuda.device(self.device):
                        torch.cuda.manual_seed(self.seed)
            else:
                torch.set_rng_state(self.cpu_state)
                if cuda and self.cuda_state is not None:
                    torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield
            self.cpu_state = torch.get_rng_state()
            if cuda:
                self.cuda_state = torch.cuda.get_rng_state(self.device)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "cpu_state": self.cpu_state, "cuda_state": self.cuda_state}

    def load_state_dict(self, sd: Mapping) -> None:
        self.seed = int(sd["seed"])
        self.cpu_state = None if sd["cpu_state"] is None else sd["cpu_state"].clone()
        self.cuda_state = None if sd.get("cuda_state") is None else sd["cuda_state"].clone()


# ---------------------------------------------------------------------------
# The uniform interface
# ---------------------------------------------------------------------------


class ClosureOptimizer:
    """One interface for every baseline: ``loss = opt.step(closure)``.

    ``closure()`` runs the forward pass and returns the scalar loss without
    calling ``backward``.  :meth:`step` zeroes the gradients, calls the closure
    (with gradients enabled), runs the backward pass (through the wrapped
    optimizer's own ``backward(loss)`` when it has one, as K-FAC does), applies
    the decoupled weight decay, steps the wrapped optimizer and returns
    ``loss.detach()``.

    ``param_groups`` is the wrapped optimizer's list, so setting
    ``group["lr"]`` by hand works; a :mod:`torch.optim.lr_scheduler` scheduler
    must be given :attr:`optimizer` (torch schedulers accept only
    :class:`torch.optim.Optimizer` instances).

    :meth:`state_dict` returns a deep copy holding plain Python values and
    tensors only (loadable with ``torch.load(..., weights_only=True)``);
    :meth:`load_state_dict` restores it exactly, so a restored run continues
    bit-identically on the same device.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        name: str = "custom",
        weight_decay: float = 0.0,
        rng: _PrivateRNG | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.name = name
        self.weight_decay = float(weight_decay)
        self._rng = rng

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        if closure is None or not callable(closure):
            raise TypeError("ClosureOptimizer.step: closure must be a callable returning the scalar loss")
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"ClosureOptimizer.step: closure must return a scalar tensor, got {type(loss).__name__}")
        if not loss.requires_grad:
            raise RuntimeError(
                "ClosureOptimizer.step: the closure's loss does not require grad; the closure must run the "
                "forward pass and must not call backward() or detach the loss"
            )
        ctx = self._rng.active() if self._rng is not None else contextlib.nullcontext()
        with ctx:
            backward = getattr(self.optimizer, "backward", None)
            if callable(backward):
                backward(loss)
            else:
                loss.backward()
            if self.weight_decay:
                self._decay_weights()
            self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def _decay_weights(self) -> None:
        for group in self.optimizer.param_groups:
            factor = 1.0 - group["lr"] * self.weight_decay
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(factor)

    def state_dict(self) -> dict:
        return copy.deepcopy(
            {
                "name": self.name,
                "weight_decay": self.weight_decay,
                "optimizer": self.optimizer.state_dict(),
                "rng": None if self._rng is None else self._rng.state_dict(),
            }
        )

    def load_state_dict(self, sd: Mapping) -> None:
        if sd.get("name") != self.name:
            raise ValueError(f"state dict is for optimizer {sd.get('name')!r}, this one is {self.name!r}")
        sd = copy.deepcopy(dict(sd))
        self.weight_decay = float(sd["weight_decay"])
        self.optimizer.load_state_dict(sd["optimizer"])
        if self._rng is not None and sd.get("rng") is not None:
            self._rng.load_state_dict(sd["rng"])

    def __repr__(self) -> str:
        return f"ClosureOptimizer(name={self.name!r}, weight_decay={self.weight_decay}, optimizer={self.optimizer!r})"


# ---------------------------------------------------------------------------
# Shampoo: pytorch_optimizer.ScalableShampoo with a tensors-only state dict
# ---------------------------------------------------------------------------

_PACKED = "__packed_object__"


@functools.cache
def _make_shampoo_class():
    from pytorch_optimizer import ScalableShampoo

    class _ScalableShampoo(ScalableShampoo):
        """``ScalableShampoo`` whose state dict holds tensors only.

        The library keeps each parameter's Kronecker statistics in
        ``PreConditioner`` and ``Graft`` objects.  :meth:`state_dict` stores
        their tensor attributes as plain dicts; :meth:`load_state_dict` builds
        fresh objects with the library's own ``init_group`` and puts the saved
        tensors back.  With ``root="eigh"`` each ``PreConditioner`` computes
        its roots with :func:`_eigh_inverse_root` instead of the library's
        coupled Newton iteration.  Nothing else differs from the library class.
        """

        def state_dict(self) -> dict:
            sd = super().state_dict()
            state = {}
            for key, pstate in sd["state"].items():
                state[key] = {k: (_pack_object(v) if _is_library_object(v) else v) for k, v in pstate.items()}
            return {**sd, "state": state}

        def load_state_dict(self, state_dict: Mapping) -> None:
            packed_state = state_dict["state"]
            plain = {
                key: {k: v for k, v in pstate.items() if not _is_packed(v)} for key, pstate in packed_state.items()
            }
            super().load_state_dict({**state_dict, "state": plain})
            index = 0
            for group in self.param_groups:
                for p in group["params"]:
                    objects = {k: v for k, v in packed_state.get(index, {}).items() if _is_packed(v)}
                    if objects:
                        fresh = self._fresh_state(p, group)
                        self.state[p] = fresh
                        for k, data in objects.items():
                            obj = fresh[k]
                            if type(obj).__name__ != data[_PACKED]:
                                raise ValueError(
                                    f"shampoo state dict: {k!r} holds a {data[_PACKED]}, the library builds a "
                                    f"{type(obj).__name__}"
                                )
                            for attr, value in data.items():
                                if attr != _PACKED:
                                    setattr(obj, attr, copy.deepcopy(value))
                    index += 1

        def __init__(self, params: Any, *, root: str = "newton", **kwargs: Any) -> None:
            self.root = root  # "newton" (the library's) or "eigh" (SHAMPOO_ROOTS)
            super().__init__(params, **kwargs)

        def init_group(self, group: dict, **kwargs) -> None:
            super().init_group(group, **kwargs)
            if self.root == "eigh":
                for p in group["params"]:
                    pre_conditioner = self.state[p].get("pre_conditioner") if p in self.state else None
                    if pre_conditioner is not None and "compute_pre_conditioners" not in vars(pre_conditioner):
                        # an instance attribute, not a subclass: the state dict's class names stay the library's,
                        # so a checkpoint resumes with either root
                        pre_conditioner.compute_pre_conditioners = functools.partial(
                            _eigh_pre_conditioners, pre_conditioner)

        def _fresh_state(self, p: torch.Tensor, group: dict) -> dict:
            """The library's own per-parameter state objects for ``p``."""
            loaded = self.state.pop(p, {})
            old_grad = p.grad
            p.grad = torch.zeros_like(p)
            try:
                self.init_group({**group, "params": [p]})
            finally:
                p.grad = old_grad
            fresh = self.state.pop(p)
            return {**fresh, **loaded}

    return _ScalableShampoo


def _eigh_inverse_root(matrix: torch.Tensor, p: int, ridge_epsilon: float) -> torch.Tensor:
    """``(S + ridge_epsilon * lambda_max(S) I)^(-1/p)`` for symmetric PSD ``S`` (or a batch), in float64.

    The regularised inverse p-th root that ``pytorch_optimizer``'s ``compute_power_schur_newton`` approximates
    (ridge relative to the largest eigenvalue, which it estimates by power iteration), computed exactly from
    one symmetric eigendecomposition. Eigenvalues below 0 (rounding) count as 0.
    """
    m64 = matrix.to(torch.float64)
    m64 = 0.5 * (m64 + m64.mT)
    evals, evecs = torch.linalg.eigh(m64)
    largest = evals.amax(dim=-1, keepdim=True).clamp_min(1e-16)
    evals = evals.clamp_min(0.0) + ridge_epsilon * largest
    return ((evecs * evals.pow(-1.0 / p).unsqueeze(-2)) @ evecs.mT).to(matrix.dtype)


def _eigh_pre_conditioners(pre_conditioner: Any) -> None:
    """``PreConditioner.compute_pre_conditioners`` with :func:`_eigh_inverse_root` for every statistic."""
    p, eps = pre_conditioner.exponent_for_pre_conditioner, pre_conditioner.matrix_eps
    stats = pre_conditioner.statistics
    if isinstance(stats, torch.Tensor):  # the library stacks statistics of one shape
        pre_conditioner.pre_conditioners = _eigh_inverse_root(stats, p, eps)
    else:
        pre_conditioner.pre_conditioners = [_eigh_inverse_root(s, p, eps) for s in stats]


def _is_library_object(value: Any) -> bool:
    return not isinstance(value, (torch.Tensor, int, float, bool, str, list, tuple, dict, type(None))) and hasattr(
        value, "__dict__"
    )


def _is_packed(value: Any) -> bool:
    return isinstance(value, dict) and _PACKED in value


def _pack_object(obj: Any) -> dict:
    """The tensor attributes (tensors, lists of tensors) of a library object."""
    out: dict[str, Any] = {_PACKED: type(obj).__name__}
    for attr, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[attr] = value
        elif isinstance(value, list) and all(isinstance(v, torch.Tensor) for v in value):
            out[attr] = list(value)
    return out


# ---------------------------------------------------------------------------
# K-FAC: BackPACK's sampled Kronecker factors + the preconditioning here
# ---------------------------------------------------------------------------


def _make_kfac_extension(mc_samples: int):
    """BackPACK's ``KFAC`` extension with the loss-module rules this harness needs.

    Two gaps in BackPACK 1.7.1 are filled here, with as little code as possible:

    * its ``BCEWithLogitsLoss`` rule accepts only 0/1 targets and one output
      per example, and its mean reduction divides by the batch size only.
      Sampling from the predictive distribution never reads the targets, and
      independent Bernoulli outputs need nothing more, so the checks are
      relaxed (default ``weight``/``pos_weight`` and 2-D inputs are still
      required) and the mean divides by the number of elements, as torch does;
    * BackPACK assumes ``backward`` is called on the loss module's output
      itself (it warns otherwise).  The paper's loss is that output divided by
      the batch size, so the sampled square root of the loss Hessian is
      multiplied by ``sqrt(d loss / d output)``: the factors then belong to
      the loss the closure returns, whatever constant it scaled the module's
      output by.
    """
    from backpack.core.derivatives.bcewithlogitsloss import BCELossWithLogitsDerivatives
    from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
    from backpack.core.derivatives.mseloss import MSELossDerivatives
    from backpack.extensions import KFAC
    from backpack.extensions.secondorder.hbp.losses import HBPLoss

    class _BCEWithLogitsDerivatives(BCELossWithLogitsDerivatives):
        # NotImplementedError is BackPACK's own signal for an unsupported module configuration.
        def _verify_support(self, module: nn.BCEWithLogitsLoss) -> None:
            self._check_is_default(module)
            if module.input0.dim() != 2:
                raise NotImplementedError("K-FAC: BCEWithLogitsLoss needs 2-D logits [batch, outputs]")

        def _check_input_dims(self, module: nn.BCEWithLogitsLoss) -> None:
            if module.input0.dim() != 2:
                raise NotImplementedError("K-FAC: BCEWithLogitsLoss needs 2-D logits [batch, outputs]")

        @staticmethod
        def _get_mean_normalization(input: torch.Tensor) -> int:
            return input.numel()

    class _ScaledLoss(HBPLoss):
        def backpropagate(self, ext, module, g_inp, g_out, backproped):
            scale = g_out[0].detach()
            if scale.numel() != 1 or not bool(scale >= 0):
                raise RuntimeError(
                    "K-FAC: the closure's loss must be a non-negative multiple of the loss module's output "
                    f"(d loss / d output = {scale})"
                )
            # g_out=None: the scale is applied here, not flagged by BackPACK as a modified loss.
            sqrt_hessian = super().backpropagate(ext, module, g_inp, None, backproped)
            return sqrt_hessian * scale.sqrt()

    ext = KFAC(mc_samples=mc_samples)
    for cls, derivatives in (
        (nn.BCEWithLogitsLoss, _BCEWithLogitsDerivatives()),
        (nn.MSELoss, MSELossDerivatives()),
        (nn.CrossEntropyLoss, CrossEntropyLossDerivatives()),
    ):
        ext.set_module_extension(cls, _ScaledLoss(derivatives=derivatives), overwrite=True)
    return ext


_KFAC_LOSSES = (nn.BCEWithLogitsLoss, nn.MSELoss, nn.CrossEntropyLoss)


def _spd_inverse(matrix: torch.Tensor, floor: float) -> torch.Tensor:
    """Inverse of a damped factor ``matrix`` (symmetric, eigenvalues >= ``floor`` in exact arithmetic), in float64."""
    m64 = matrix.to(torch.float64)
    m64 = 0.5 * (m64 + m64.T)
    chol, info = torch.linalg.cholesky_ex(m64)
    if int(info) == 0:
        inv = torch.cholesky_inverse(chol)
    else:  # rounding made it indefinite (tiny damping): clamp the spectrum at the damping
        evals, evecs = torch.linalg.eigh(m64)
        inv = (evecs / evals.clamp_min(max(floor, torch.finfo(torch.float64).tiny))) @ evecs.T
    return inv.to(matrix.dtype)


class KFACOptimizer(Optimizer):
    r"""K-FAC for MLPs of :class:`torch.nn.Linear` layers, statistics from BackPACK.

    For each Linear layer with weight ``W`` (``out x in``) and bias ``b``:

    * ``D`` (``out x out``): BackPACK's ``KFAC(mc_samples)`` output factor,
      the second moment of the gradients w.r.t. the layer's pre-activations
      with targets sampled from the model's predictive distribution (Kunstner
      et al. 2019), scaled to the closure's loss;
    * ``A`` (``(in+1) x (in+1)``): BackPACK's input factor ``E[x x^T]``
      bordered by the input mean ``E[x]`` and a 1 (the bias as an extra input
      column of ones); without a bias, BackPACK's ``E[x x^T]``.

    Each step: ``A`` and ``D`` are moving averages with decay ``stat_decay``
    (started from the first batch's factors); every ``inverse_every`` steps
    (at steps 0, k, 2k, ...) the damped inverses are recomputed with the
    factored Tikhonov damping of Martens & Grosse (2015, Sec. 6.3):
    ``(A + pi sqrt(damping) I)^{-1}`` and ``(D + sqrt(damping)/pi I)^{-1}``,
    ``pi = sqrt((tr A / dim A) / (tr D / dim D))`` (``pi = 1`` when
    ``pi_damping`` is false).  The update is ``U = D^{-1} [G | g_b] A^{-1}``,
    with heavy-ball momentum ``v = momentum v + U`` when ``momentum > 0``, and
    ``[W | b] -= lr U``.  With ``kl_clip`` every ``U`` is first scaled by
    ``nu = min(1, sqrt(kl_clip / (lr^2 sum_layers <U, [G | g_b]>)))``, which
    bounds the step's predicted change of the model's distribution (the KL
    clipping of Ba, Grosse & Martens 2017, Sec. 4, also the default of the
    ``kfac-pytorch`` library); ``None`` (default) applies none.

    Call :meth:`backward` (not ``loss.backward()``) before :meth:`step`;
    :class:`ClosureOptimizer` does.  The model's leaf modules and the loss
    module are extended by BackPACK in place.  ``loss_fn`` must be, or hold
    exactly one submodule that is, an ``nn.BCEWithLogitsLoss``, ``nn.MSELoss``
    or ``nn.CrossEntropyLoss`` (exact classes); the closure's loss must be that
    module's output times any non-negative constant (for the paper's loss:
    ``BCEWithLogitsLoss(reduction="sum")(logits, x) / batch_size``).  The
    model's leaves must be chained directly (no functional ops between them),
    as in an ``nn.Sequential`` of Linear layers and activations.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float,
        *,
        momentum: float = _KFAC_DEFAULTS[0],
        stat_decay: float = _KFAC_DEFAULTS[1],
        damping: float = _KFAC_DEFAULTS[2],
        inverse_every: int = 1,
        mc_samples: int = 1,
        pi_damping: bool = True,
        kl_clip: float | None = None,
    ) -> None:
        from backpack import extend

        if not isinstance(loss_fn, nn.Module):
            raise ValueError(f"kfac: loss_fn must be an nn.Module, got {type(loss_fn).__name__}")
        loss_modules = [m for m in loss_fn.modules() if type(m) in _KFAC_LOSSES]
        if len(loss_modules) != 1:
            raise ValueError(
                f"kfac: loss_fn must be, or hold exactly one submodule that is, one of "
                f"{[c.__name__ for c in _KFAC_LOSSES]} (BackPACK's K-FAC needs a loss module it knows); got "
                f"{type(loss_fn).__name__}. For the paper's loss use nn.BCEWithLogitsLoss(reduction='sum') and "
                f"divide its output by the batch size in the closure (or in a wrapper module's forward)"
            )
        loss_module = loss_modules[0]
        if isinstance(loss_module, nn.BCEWithLogitsLoss) and (
            loss_module.weight is not None or loss_module.pos_weight is not None
        ):
            raise ValueError("kfac: BCEWithLogitsLoss with weight or pos_weight is not supported")
        if not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"kfac: mc_samples must be an integer >= 1, got {mc_samples!r}")
        if not damping > 0:
            raise ValueError(f"kfac: damping must be > 0, got {damping}")
        if not 0.0 <= stat_decay < 1.0:
            raise ValueError(f"kfac: stat_decay must be in [0, 1), got {stat_decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"kfac: momentum must be in [0, 1), got {momentum}")
        if kl_clip is not None and not (isinstance(kl_clip, (int, float)) and math.isfinite(kl_clip) and kl_clip > 0):
            raise ValueError(f"kfac: kl_clip must be a finite number > 0 or None, got {kl_clip!r}")

        layers = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"kfac: only nn.Linear layers may hold trainable parameters, found {type(module).__name__}"
                )
            layers.append(module)
        if not layers:
            raise ValueError("kfac: the model has no trainable nn.Linear layer")
        params = [p for layer in layers for p in layer.parameters() if p.requires_grad]

        defaults = dict(lr=lr, momentum=momentum, stat_decay=stat_decay, damping=damping)
        super().__init__(params, defaults)
        self.inverse_every = int(inverse_every)
        self.mc_samples = mc_samples
        self.pi_damping = bool(pi_damping)
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self._layers = layers
        self._input_means: dict[nn.Module, torch.Tensor] = {}

        # Extend the leaves, not the containers: BackPACK passes its quantities from
        # module to module through the tensors, so any container works as long as
        # the leaves are chained directly.
        for module in model.modules():
            if next(module.children(), None) is None:
                extend(module)
        extend(loss_module)
        self._ext = _make_kfac_extension(mc_samples)

    def _collect(self, module: nn.Module) -> None:
        """BackPACK extension hook: keep each Linear layer's input mean."""
        if isinstance(module, nn.Linear) and module.bias is not None and hasattr(module, "input0"):
            x = module.input0.detach()
            self._input_means[module] = x.reshape(-1, x.shape[-1]).mean(0)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with BackPACK's K-FAC extension active."""
        from backpack import backpack

        self._input_means = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FULL_HOOK_WARNING)
            with backpack(self._ext, extension_hook=self._collect):
                loss.backward()

    def _batch_factors(self, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        factors = getattr(layer.weight, "kfac", None)
        if factors is None or len(factors) != 2:
            raise RuntimeError(
                "kfac: no Kronecker factors on the Linear weights; run the backward pass through "
                "KFACOptimizer.backward (ClosureOptimizer.step does) and make sure the closure's loss is "
                "computed by the loss_fn module given to the optimizer"
            )
        d, a = factors
        if layer.bias is not None:
            m = self._input_means[layer].to(a.dtype)
            n = a.shape[0]
            aug = a.new_empty(n + 1, n + 1)
            aug[:n, :n] = a
            aug[:n, n] = m
            aug[n, :n] = m
            aug[n, n] = 1.0
            a = aug
        return d.detach(), a.detach()

    @torch.no_grad()
    def _compute_inverses(self, state: dict, group: dict) -> None:
        a, d = state["A"], state["D"]
        root = math.sqrt(group["damping"])
        pi = 1.0
        if self.pi_damping:
            ta = float(torch.trace(a)) / a.shape[0]
            td = float(torch.trace(d)) / d.shape[0]
            if ta > 0 and td > 0 and math.isfinite(ta) and math.isfinite(td):
                pi = math.sqrt(ta / td)
        eye_a = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        eye_d = torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
        state["A_inv"] = _spd_inverse(a + (pi * root) * eye_a, pi * root)
        state["D_inv"] = _spd_inverse(d + (root / pi) * eye_d, root / pi)
        state["num_inversions"] += 1

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.backward(loss)
        group = self.param_groups[0]
        lr, momentum, decay = group["lr"], group["momentum"], group["stat_decay"]
        updates = []  # (layer, preconditioned update, gradient)
        for layer in self._layers:
            w, b = layer.weight, layer.bias
            if w.grad is None:
                continue
            d_batch, a_batch = self._batch_factors(layer)
            state = self.state[w]
            if not state:
                state["step"] = 0
                state["num_inversions"] = 0
                state["A"] = a_batch.clone()
                state["D"] = d_batch.clone()
            else:
                state["A"].mul_(decay).add_(a_batch, alpha=1.0 - decay)
                state["D"].mul_(decay).add_(d_batch, alpha=1.0 - decay)
            if state["step"] % self.inverse_every == 0:
                self._compute_inverses(state, group)
            has_bias = b is not None
            grad = w.grad
            if has_bias:
                g_b = b.grad if b.grad is not None else torch.zeros_like(b)
                grad = torch.cat([grad, g_b.unsqueeze(1)], dim=1)
            updates.append((layer, state["D_inv"] @ grad @ state["A_inv"], grad))
        scale = 1.0
        if self.kl_clip is not None and updates:
            vg = sum(float(torch.sum(u * g)) for _, u, g in updates) * lr * lr
            if vg > 0 and math.isfinite(vg):
                scale = min(1.0, math.sqrt(self.kl_clip / vg))
        for layer, update, _ in updates:
            w, b = layer.weight, layer.bias
            state = self.state[w]
            has_bias = b is not None
            if scale != 1.0:
                update = update * scale
            if momentum > 0:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(momentum).add_(update)
                update = buf
            if has_bias:
                w.add_(update[:, :-1], alpha=-lr)
                b.add_(update[:, -1], alpha=-lr)
            else:
                w.add_(update, alpha=-lr)
            state["step"] += 1
        self._input_means = {}
        return loss


# ---------------------------------------------------------------------------
# The factory
# ---------------------------------------------------------------------------


def check_shampoo_root(root: str, optimizer: str) -> None:
    """Raise ``ValueError`` naming ``shampoo_root`` unless ``root`` is one of :data:`SHAMPOO_ROOTS` and, when it is
    not the default ``"newton"``, ``optimizer`` is ``shampoo``."""
    if root not in SHAMPOO_ROOTS:
        raise ValueError(f"shampoo_root: expected {' or '.join(SHAMPOO_ROOTS)}, got {root!r}")
    if root != "newton" and optimizer != "shampoo":
        raise ValueError(f"shampoo_root: {root!r} applies to shampoo only, not {optimizer!r}")


def _check_beta(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _pick(value: float | None, default: float) -> float:
    return default if value is None else float(value)


def build_baseline(
    name: str,
    model: nn.Module,
    loss_fn: nn.Module,
    *,
    lr: float,
    beta1: float | None = None,
    beta2: float | None = None,
    eps: float | None = None,
    inverse_every: int = 1,
    damping: float | None = None,
    weight_decay: float = 0.0,
    kl_clip: float | None = None,
    shampoo_root: str = "newton",
    options: Mapping[str, Any] | None = None,
) -> ClosureOptimizer:
    """Build the baseline optimizer ``name`` over ``model``'s trainable parameters.

    The hyper-parameters are the paper's (Tables 3 and 4): ``lr`` is eta,
    ``beta1`` the momentum, ``beta2`` the second-moment / statistics decay,
    ``eps`` the epsilon; ``None`` takes the documented default, and one that
    does not apply to ``name`` is ignored (docs/baselines.md has the table).
    ``inverse_every`` is the paper's "@k" for ``shampoo`` and ``kfac``;
    ``damping`` is K-FAC's / Shampoo's matrix damping (``eps`` when ``None``);
    ``kl_clip`` K-FAC's KL clipping (:class:`KFACOptimizer`; an error for
    other names).
    ``shampoo_root`` is how Shampoo computes its inverse p-th roots
    (:data:`SHAMPOO_ROOTS`): ``"newton"``, the library's coupled Schur-Newton
    iteration, or ``"eigh"``, an exact eigendecomposition of the same ridged
    statistics (several times faster on a CPU; an error for other names).
    ``weight_decay`` is decoupled: ``w <- w (1 - lr weight_decay)`` each step.
    ``loss_fn`` is only used by ``kfac`` (BackPACK extends it; the closure must
    compute its loss with it).  ``options`` are extra keyword arguments for
    the underlying constructor (``torch.optim`` class, ``ScalableShampoo`` or
    :class:`KFACOptimizer`), overriding the mapping above.
    """
    if not isinstance(name, str) or name.lower() not in BASELINE_NAMES:
        raise ValueError(f"name: unknown baseline {name!r}; valid names are {', '.join(BASELINE_NAMES)}")
    name = name.lower()
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(inverse_every, bool) or not isinstance(inverse_every, int) or inverse_every < 1:
        raise ValueError(f"inverse_every must be an integer >= 1, got {inverse_every!r}")
    _check_beta("beta1", beta1)
    _check_beta("beta2", beta2)
    if eps is not None and not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if damping is not None and not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if kl_clip is not None and name != "kfac":
        raise ValueError(f"kl_clip applies to kfac only, not {name!r}")
    check_shampoo_root(shampoo_root, name)
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a mapping of keyword arguments, got {type(options).__name__}")
    extra = dict(options or {})

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    lr = float(lr)
    rng = None

    if name == "sgd":
        kw = dict(lr=lr, momentum=0.0)
        opt: Optimizer = torch.optim.SGD(params, **(kw | extra))
    elif name in ("momentum", "nesterov"):
        kw = dict(lr=lr, momentum=_pick(beta1, _MOMENTUM_DEFAULT), nesterov=name == "nesterov")
        opt = torch.optim.SGD(params, **(kw | extra))
    elif name == "adam":
        b1, b2, e = _ADAM_DEFAULTS
        kw = dict(lr=lr, betas=(_pick(beta1, b1), _pick(beta2, b2)), eps=_pick(eps, e))
        opt = torch.optim.Adam(params, **(kw | extra))
    elif name == "rmsprop":
        m, d, e = _RMSPROP_DEFAULTS
        kw = dict(lr=lr, alpha=_pick(beta2, d), momentum=_pick(beta1, m), eps=_pick(eps, e))
        opt = TFRMSprop(params, **(kw | extra))
    elif name == "adagrad":
        kw = dict(lr=lr, eps=_pick(eps, _ADAGRAD_EPS), initial_accumulator_value=_ADAGRAD_INITIAL_ACCUMULATOR)
        opt = torch.optim.Adagrad(params, **(kw | extra))
    elif name == "shampoo":
        from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

        b1, b2, e = _SHAMPOO_DEFAULTS
        kw = dict(
            lr=lr,
            betas=(_pick(beta1, b1), _pick(beta2, b2)),
            matrix_eps=damping if damping is not None else _pick(eps, e),
            preconditioning_compute_steps=inverse_every,
            start_preconditioning_step=inverse_every,
            statistics_compute_steps=1,
            graft_type=LayerWiseGrafting.RMSPROP,
            shape_interpretation=False,
            weight_decay=0.0,
        )
        opt = _make_shampoo_class()(params, root=shampoo_root, **(kw | extra))
        rng = _PrivateRNG(_seed(), params[0].device)
    else:  # kfac
        m, d, e = _KFAC_DEFAULTS
        kw = dict(
            momentum=_pick(beta1, m),
            stat_decay=_pick(beta2, d),
            damping=damping if damping is not None else _pick(eps, e),
            inverse_every=inverse_every,
            kl_clip=kl_clip,
        )
        opt = KFACOptimizer(model, loss_fn, lr, **(kw | extra))
        rng = _PrivateRNG(_seed(), params[0].device)
    return ClosureOptimizer(opt, name=name, weight_decay=weight_decay, rng=rng)


def _seed() -> int:
    """Seed of an optimizer's private random stream: follows ``torch.manual_seed``, draws nothing."""
    return (torch.initial_seed() + 0x5EED) % (2**63)
