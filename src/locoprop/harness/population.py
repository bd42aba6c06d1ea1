r"""Many trials in one process: a population of autoencoders stacked along a leading dimension.

Why: on a GPU one standard autoencoder at batch 1000 leaves much of the chip
idle (its products, timed alone at their shapes, run at about a quarter of the
chip's FP32 rate: ``results/perf/``), and processes sharing one GPU take turns
on it rather than running side by side.  A population of ``K`` members, each
with its own hyper-parameters, does every matrix product of all members as one
batched product (``torch.baddbmm``), so ``K`` trials of a study cost far less
than ``K`` times one.  ``locoprop tune --population K`` runs a study's trials
that way (:func:`locoprop.harness.tune.run_population_study`).

What a member computes is what one ``locoprop train`` run with its settings
computes, only batched: the same initial weights (the study's seed), the same
batches in the same order, the notebook's schedule, and for

* LocoProp-S and LocoProp-M (Algorithms 1 and 2, the iterative solver, the
  inner TF-RMSProp, no proximity term: the variants as the harness builds
  them): one forward and backward pass, the targets of the variant's own
  :class:`~locoprop.targets.Target` object with a ``γ`` per member, then
  ``T`` local iterations with the local loss's own closed-form gradient
  (:meth:`~locoprop.losses.LocalLoss.grad`), ``η_k = η max(1 - k/T, 0.25)``
  and TF-RMSProp (:class:`locoprop.inner.TFRMSprop`'s recurrence with
  ``β1, β2, ε`` per member);
* the first-order baselines (``sgd``, ``momentum``, ``nesterov``, ``adam``,
  ``rmsprop``, ``adagrad``): the BackProp gradient and the recurrence of the
  harness's optimizer (:class:`torch.optim.SGD`, :class:`torch.optim.Adam`,
  :class:`torch.optim.Adagrad`, :class:`locoprop.inner.TFRMSprop`, with the
  harness's defaults), each hyper-parameter a column of ``K`` values.

Why its own update rules rather than :mod:`torch.optim` or ``torch.func.vmap``
over single runs: an optimizer's hyper-parameters are one number per
parameter group, where each member's slice of a stacked tensor needs its own,
and LocoProp's step (forward hooks, ``autograd.grad`` on captured
pre-activations, in-place inner state, CUDA streams) does not run under
``vmap``.  Each rule below is the few lines of its optimizer's recurrence, and
the tests hold it to the optimizer itself.

``tests/harness/test_population.py`` holds every member equal to a separate
run through :class:`locoprop.LocoProp` or the harness's optimizer of the same name.  Members are
independent: nothing mixes them (a diverged member's NaNs stay in its own
slices), and members that end (pruned, early exit, diverged) are dropped from
the stack, so the rest run faster.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
from torch import nn

from locoprop.fused import compile_once
from locoprop.precision import matmul_precision, products_precision
from locoprop.layers import discover_layers
from locoprop.transfer import TransferFunction
from locoprop.variants import get_variant

from .data import load_dataset
from .models import OUTPUT_TRANSFER, build_autoencoder
from .optimizers import LOCOPROP_VARIANTS
from .train import (CONFIG, METRICS, RunResult, TrainConfig, _epoch_permutation, _sync, early_exit_reason,
                    run_record)

__all__ = ["POPULATION_OPTIMIZERS", "PER_MEMBER", "Member", "Population", "member_of", "shared_settings",
           "check_population_config", "train_population"]

#: The optimizers a population can train (``locoprop tune --population``).
POPULATION_OPTIMIZERS = ("locoprop-s", "locoprop-m", "sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad")
#: The settings each member of a population has for itself; it shares all others.  ``seed``: its initial
#: weights and its order of the batches (``locoprop train --seeds``).
PER_MEMBER = ("lr", "beta1", "beta2", "eps", "activation_lr", "early_exit", "seed")


@dataclass(frozen=True)
class Member:
    """One member's hyper-parameters (the paper's names; ``None``: its optimizer's default)."""

    lr: float
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    activation_lr: float = 1.0


def member_of(cfg: TrainConfig) -> Member:
    """The hyper-parameters of one run's settings."""
    return Member(lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, activation_lr=cfg.activation_lr)


#: Settings a population must leave at their defaults (what it does not implement).  It ignores ``rollback``,
#: ``check_finite``, ``solve_order``, ``solve_in_backward``, ``triton_elementwise``, ``cuda_graph`` and
#: ``dist_timeout``, which choose how a single run computes, not what (a population notices a diverged member
#: from its batch losses);
#: ``compile_elementwise`` compiles its updates (:class:`Population`'s ``compile_update``).
_UNSUPPORTED = {"inner": "tf_rmsprop", "weight_decay": 0.0, "distributed": None}


def shared_settings(cfg: TrainConfig) -> dict:
    """The settings of ``cfg`` that every member of a population shares (all but :data:`PER_MEMBER`)."""
    return {k: v for k, v in asdict(cfg).items() if k not in PER_MEMBER}


def check_population_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming the setting when ``cfg`` asks for what a population does not compute."""
    cfg.validate()
    if cfg.optimizer not in POPULATION_OPTIMIZERS:
        raise ValueError(f"optimizer: a population trains {list(POPULATION_OPTIMIZERS)}, not {cfg.optimizer!r}")
    for name, default in _UNSUPPORTED.items():
        if getattr(cfg, name) != default:
            raise ValueError(f"{name}: a population runs {name}={default!r} only, got {getattr(cfg, name)!r}")
    if cfg.precision not in ("auto", "fp32", "tf32"):
        raise ValueError(f"precision: a population runs auto, fp32 or tf32 local products, got {cfg.precision!r}")


# ---------------------------------------------------------------------------------------------------
# Update rules with hyper-parameters per member: each follows its single-run optimizer's recurrence
# ---------------------------------------------------------------------------------------------------


def _tf_rmsprop_(p, g, ms, mom, lr, beta1, beta2, beta2_complement, eps) -> None:
    ms.mul_(beta2).addcmul_(g, g * beta2_complement)
    mom.mul_(beta1).add_(g.div((ms + eps).sqrt()).mul_(lr))
    p.sub_(mom)


def _sgd_(p, g, lr) -> None:
    p.sub_(g * lr)


def _momentum_(p, g, buf, lr, beta1) -> None:
    buf.mul_(beta1).add_(g)  # from 0: torch's first buffer, the gradient itself
    p.sub_(buf * lr)


def _nesterov_(p, g, buf, lr, beta1) -> None:
    buf.mul_(beta1).add_(g)
    p.sub_(g.add(buf * beta1) * lr)


def _adam_(p, g, m, v, lr, beta1_complement, beta2, beta2_complement, eps, correction1, correction2_sqrt) -> None:
    m.lerp_(g, beta1_complement)
    v.mul_(beta2).addcmul_(g, g * beta2_complement)
    denom = (v.sqrt() / correction2_sqrt).add_(eps)
    p.sub_(m / denom * (lr / correction1))


def _adagrad_(p, g, total, lr, eps) -> None:
    total.addcmul_(g, g)
    p.sub_(g / total.sqrt().add_(eps) * lr)


class _Rule:
    """An optimizer's update of stacked parameters ``(K, ...)``, every hyper-parameter a ``(K, 1, 1)`` column.

    ``kernel(p, g, *state, lr, *columns)`` is one tensor's update (a module-level function, so that
    ``compile=True`` compiles it once for every shape: one fused pass over the tensors instead of one
    per operation); ``defaults`` fill the settings a member leaves ``None`` (the single-run optimizer's
    defaults); ``hyper`` names the settings it reads, ``columns`` the tensors it passes (the settings and
    what :meth:`begin_step` derives from them).  ``state`` holds one list of tensors per parameter.
    """

    defaults: dict = {}
    hyper: tuple = ()
    kernel = None
    slots = 0  # state tensors per parameter, zeros unless init_state says otherwise

    def __init__(self, members: Sequence[Member], params: Sequence[torch.Tensor], compile: bool = False) -> None:
        k, ref = len(members), params[0]
        self.columns: dict[str, torch.Tensor] = {}
        for name in self.hyper:
            values = [getattr(m, name) if getattr(m, name) is not None else self.defaults[name] for m in members]
            self.columns[name] = torch.tensor(values, dtype=ref.dtype, device=ref.device).reshape(k, 1, 1)
        self.derive()
        self.steps = 0
        self.state = [self.init_state(p) for p in params]
        self.update_tensor = compile_once(type(self).kernel) if compile else type(self).kernel

    def derive(self) -> None:
        """Columns made once from the settings (``1 - β``, say)."""

    def init_state(self, p: torch.Tensor) -> list:
        return [torch.zeros_like(p) for _ in range(self.slots)]

    def begin_step(self) -> None:
        self.steps += 1

    def args(self) -> list:
        return list(self.columns.values())

    def update(self, indices: Sequence[int], params, grads, lr: torch.Tensor) -> None:
        args = self.args()
        for i, p, g in zip(indices, params, grads):
            self.update_tensor(p, g, *self.state[i], lr, *args)

    def keep(self, index: torch.Tensor) -> None:
        self.columns = {n: c.index_select(0, index) for n, c in self.columns.items()}
        self.state = [[t.index_select(0, index) for t in st] for st in self.state]


class _TFRMSprop(_Rule):
    """:class:`locoprop.inner.TFRMSprop` (the paper's RMSProp and LocoProp's inner optimizer)."""

    defaults = {"beta1": 0.0, "beta2": 0.9, "eps": 1e-10}  # TF-1's momentum, decay, epsilon
    hyper = ("beta1", "beta2", "eps")
    kernel = _tf_rmsprop_

    def derive(self):
        c = self.columns
        self.columns = {"beta1": c["beta1"], "beta2": c["beta2"], "beta2_complement": 1.0 - c["beta2"],
                        "eps": c["eps"]}

    def init_state(self, p):
        return [torch.ones_like(p), torch.zeros_like(p)]  # mean square from 1.0, momentum from 0


class _SGD(_Rule):
    """:class:`torch.optim.SGD` without momentum."""

    kernel = _sgd_


class _Momentum(_Rule):
    """:class:`torch.optim.SGD` with momentum β1 (the harness's ``momentum``)."""

    defaults = {"beta1": 0.9}
    hyper = ("beta1",)
    kernel = _momentum_
    slots = 1


class _Nesterov(_Momentum):
    """:class:`torch.optim.SGD` with Nesterov momentum β1 (the harness's ``nesterov``)."""

    kernel = _nesterov_


class _Adam(_Rule):
    """:class:`torch.optim.Adam` (bias-corrected moments)."""

    defaults = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    hyper = ("beta1", "beta2", "eps")
    kernel = _adam_
    slots = 2

    def derive(self):
        c = self.columns
        self.beta1, self.beta2 = c["beta1"], c["beta2"]
        self.columns = {"beta1_complement": 1.0 - c["beta1"], "beta2": c["beta2"],
                        "beta2_complement": 1.0 - c["beta2"], "eps": c["eps"]}

    def args(self):
        correction1 = 1.0 - self.beta1 ** self.steps
        correction2_sqrt = (1.0 - self.beta2 ** self.steps).sqrt()
        return super().args() + [correction1, correction2_sqrt]

    def keep(self, index):
        super().keep(index)
        self.beta1, self.beta2 = self.beta1.index_select(0, index), self.beta2.index_select(0, index)


class _Adagrad(_Rule):
    """:class:`torch.optim.Adagrad` with the harness's initial accumulator (TF-1's 0.1)."""

    defaults = {"eps": 1e-10}
    hyper = ("eps",)
    kernel = _adagrad_

    def init_state(self, p):
        return [torch.full_like(p, 0.1)]


#: The update rule of each optimizer a population trains (LocoProp: its inner TF-RMSProp).
_RULES = {
    "sgd": _SGD,
    "momentum": _Momentum,
    "nesterov": _Nesterov,
    "adam": _Adam,
    "rmsprop": _TFRMSprop,
    "adagrad": _Adagrad,
    "locoprop-s": _TFRMSprop,
    "locoprop-m": _TFRMSprop,
}


@dataclass
class _StackedLayer:
    weight: torch.Tensor  # (K, in, out): each member's nn.Linear weight, transposed
    bias: torch.Tensor  # (K, 1, out)
    transfer: TransferFunction  # the layer's transfer function as LocoProp pairs it
    activation: bool  # whether the model applies it (the code and output layers are linear in the model)


class Population:
    """``K`` copies of one ``nn.Sequential`` autoencoder, each trained by ``optimizer`` with its own settings.

    Args:
        model: the model every member starts from (built with the study's seed), or one model per member
            (of one architecture: members with their own seeds).
        optimizer: one of :data:`POPULATION_OPTIMIZERS`.
        members: each member's hyper-parameters.
        local_steps: ``T`` (LocoProp only).
        precision: ``"tf32"``: the local products in TF32 on CUDA (LocoProp's ``precision``; on the CPU the
            same as ``"fp32"``).
        compile_update: each tensor's update through ``torch.compile`` (:func:`locoprop.fused.compile_once`):
            one fused pass over the stacked tensors instead of one per operation, which matters on a GPU,
            where a population's updates read and write ``K`` times one run's weights and state.  Equal to
            the eager update up to rounding; the first step compiles.

    ``step(x, factor)`` takes one step of every member on batch ``x`` at
    learning rate ``lr * factor`` (the schedule) and returns each member's
    batch loss, shape ``(K,)``.
    """

    def __init__(self, model: nn.Module | Sequence[nn.Module], optimizer: str, members: Sequence[Member], *,
                 local_steps: int = 10, precision: str = "fp32", compile_update: bool = False) -> None:
        if optimizer not in POPULATION_OPTIMIZERS:
            raise ValueError(f"optimizer: a population trains {list(POPULATION_OPTIMIZERS)}, got {optimizer!r}")
        if not members:
            raise ValueError("members: a population needs at least one member")
        locoprop = optimizer in LOCOPROP_VARIANTS
        if locoprop and int(local_steps) < 1:
            raise ValueError(f"local_steps: expected an integer >= 1, got {local_steps}")
        if precision not in ("auto", "fp32", "tf32") or (precision == "tf32" and not locoprop):
            raise ValueError(f"precision: a population of {optimizer} runs "
                             f"{'auto, fp32 or tf32 local' if locoprop else 'auto or fp32'} products, "
                             f"got {precision!r}")
        self.precision = precision
        self.optimizer = optimizer
        self.local_steps = int(local_steps)
        self.variant = get_variant(LOCOPROP_VARIANTS[optimizer]) if locoprop else None
        k = len(members)
        models = list(model) if isinstance(model, (list, tuple)) else [model]
        if len(models) not in (1, k):
            raise ValueError(f"model: one model, or one per member ({k}), got {len(models)}")
        model = models[0]
        found = discover_layers(model, output_transfer=OUTPUT_TRANSFER)
        known = {id(m) for lay in found for m in (lay.module, lay.transfer_module) if m is not None}
        other = [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if m is not model
                 and id(m) not in known and not isinstance(m, nn.Sequential)]
        if other or any(lay.linear.bias is None or lay.transfer is None for lay in found):
            raise ValueError(f"model: a population stacks Linear layers with biases and their transfer functions "
                             f"(the harness's autoencoders), not {other or 'a Linear without a bias'}")
        linears = [[m for m in each.modules() if isinstance(m, nn.Linear)] for each in models]
        shapes = [[tuple(lin.weight.shape) for lin in each] for each in linears]
        if any(sh != shapes[0] for sh in shapes):
            raise ValueError(f"model: the members' models differ in their Linear layers: {shapes}")
        self.layers: list[_StackedLayer] = []
        for i, layer in enumerate(found):
            if len(models) == 1:
                w = layer.linear.weight.detach().t().unsqueeze(0).repeat(k, 1, 1).contiguous()
                b = layer.linear.bias.detach().reshape(1, 1, -1).repeat(k, 1, 1).contiguous()
            else:
                w = torch.stack([each[i].weight.detach().t() for each in linears]).contiguous()
                b = torch.stack([each[i].bias.detach().reshape(1, -1) for each in linears]).contiguous()
            # the model applies the transfer function where it has its module (the output's sigmoid is the loss's)
            self.layers.append(_StackedLayer(w, b, layer.transfer, layer.transfer_module is not None))
        dev, dt = self.layers[0].weight.device, self.layers[0].weight.dtype

        def column(values) -> torch.Tensor:
            return torch.tensor(values, dtype=dt, device=dev).reshape(k, 1, 1)

        self.lr = column([m.lr for m in members])
        self.gamma = column([m.activation_lr for m in members])
        self.rule = _RULES[optimizer](members, self.params(), compile=compile_update)
        self.members = list(members)

    @property
    def size(self) -> int:
        return len(self.members)

    def params(self) -> list[torch.Tensor]:
        return [t for lay in self.layers for t in (lay.weight, lay.bias)]

    # -- the model -------------------------------------------------------------------------------
    @staticmethod
    def _linear(x: torch.Tensor, layer: _StackedLayer) -> torch.Tensor:
        """``x W + b`` of every member; ``x`` is ``(b, in)`` (shared) or ``(K, b, in)``."""
        if x.dim() == 2:
            x = x.expand(layer.weight.shape[0], *x.shape)
        return torch.baddbmm(layer.bias, x, layer.weight)

    def forward(self, x: torch.Tensor, keep: list | None = None) -> torch.Tensor:
        """Every member's logits, ``(K, b, 784)``; with ``keep``, each layer's ``(input, pre-activation)``."""
        h = x
        for layer in self.layers:
            pre = self._linear(h, layer)
            if keep is not None:
                keep.append((h, pre))
            h = layer.transfer.f(pre) if layer.activation else pre
        return h

    @staticmethod
    def member_losses(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The paper's loss of each member (sum over pixels, mean over the batch), shape ``(K,)``; ``x`` is
        the batch every member reads, ``(b, 784)``, or each member's own, ``(K, b, 784)``."""
        target = x.expand_as(logits)
        per = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return per.sum(dim=(1, 2)) / x.shape[-2]

    @torch.no_grad()
    def evaluate(self, data: torch.Tensor, chunk: int = 10000) -> list[float]:
        """Each member's loss over a whole split (as :func:`locoprop.harness.train.evaluate`)."""
        chunk = max(1, min(chunk, (10000 * 8) // max(self.size, 1)))
        total = torch.zeros(self.size, dtype=torch.float64, device=data.device)
        for i in range(0, data.shape[0], chunk):
            x = data[i:i + chunk]
            total += self.member_losses(self.forward(x), x).double() * x.shape[0]
        return (total / data.shape[0]).tolist()

    # -- the step --------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        """One step of every member on the batch ``x`` (``(b, 784)`` for all, or ``(K, b, 784)``: each
        member's own); returns each member's batch loss (before the step)."""
        params = self.params()
        for p in params:
            p.requires_grad_(True)
        kept: list = []
        with torch.enable_grad():
            losses = self.member_losses(self.forward(x, keep=kept), x)
            wanted = params if self.variant is None else [pre for _, pre in kept]  # BackProp: the weights
            grads = torch.autograd.grad(losses.sum(), wanted)  # members are independent: each gets its own
        for p in params:
            p.requires_grad_(False)
        lr = self.lr * factor
        with torch.no_grad():
            self.rule.begin_step()
            if self.variant is None:
                self.rule.update(range(len(params)), params, grads, lr)
            else:
                self._locoprop(kept, grads, lr)
        return losses.detach()

    def _locoprop(self, kept, grads, lr: torch.Tensor) -> None:
        """LocoProp's targets and ``T`` local iterations of every layer (Algorithms 1 and 2)."""
        target_of, loss = self.variant.target, self.variant.local_loss
        problems = []
        for layer, (h, pre), g in zip(self.layers, kept, grads):
            pre = pre.detach()
            batch = SimpleNamespace(pre=pre, post=None, grad_pre=g, transfer=layer.transfer)  # (a LayerBatch)
            target = target_of(batch, self.gamma)
            if h.dim() == 2:
                h = h.expand(self.size, *h.shape)
            problems.append((layer, h.detach(), target, loss.grad(pre, target, layer.transfer)))
        # the local products as LocoProp's: TF32 for "tf32" (and "auto" where PyTorch allows it), else float32
        with matmul_precision(products_precision(self.precision, self.layers[0].weight.is_cuda)):
            self._local_iterations(problems, loss, lr)

    def _local_iterations(self, problems, loss, lr: torch.Tensor) -> None:
        """Iteration ``k`` of every layer: ``δ`` (the first from the forward pass), ``δᵀx``, ``Σδ``, TF-RMSProp
        at ``η_k = η max(1 - k/T, 0.25)`` (reference notes, steps 4 and 5)."""
        T = self.local_steps
        for k in range(T):
            lr_k = lr * max(1.0 - k / T, 0.25)
            for i, (layer, h, target, first) in enumerate(problems):
                delta = first if k == 0 else loss.grad(self._linear(h, layer), target, layer.transfer)
                grad_w = torch.bmm(h.transpose(1, 2), delta)
                grad_b = delta.sum(dim=1, keepdim=True)
                self.rule.update((2 * i, 2 * i + 1), (layer.weight, layer.bias), (grad_w, grad_b), lr_k)

    # -- membership ------------------------------------------------------------------------------
    def keep(self, which: Sequence[int]) -> None:
        """Keep only the members at the indices ``which`` (in that order); the others are dropped."""
        index = torch.as_tensor(list(which), dtype=torch.long, device=self.lr.device)
        for lay in self.layers:
            lay.weight = lay.weight.index_select(0, index)
            lay.bias = lay.bias.index_select(0, index)
        for name in ("lr", "gamma"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.rule.keep(index)
        self.members = [self.members[j] for j in which]

    def member_model(self, j: int, model: nn.Module) -> nn.Module:
        """Copy member ``j``'s weights into ``model`` (a module of the population's architecture)."""
        linears = [m for m in model if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for lin, lay in zip(linears, self.layers):
                lin.weight.copy_(lay.weight[j].t())
                lin.bias.copy_(lay.bias[j].reshape(-1))
        return model


def train_population(configs: Sequence[TrainConfig], outs: Sequence[str | Path], *, progress: bool = False,
                     log: Callable[[str], None] = print,
                     on_epoch: Callable[[int, dict], str | None] | None = None,
                     on_end: Callable[[int, RunResult], None] | None = None) -> list[RunResult]:
    """Train the runs ``configs`` (one per member) as one population, each into its folder of ``outs``.

    The configurations must agree on every setting but :data:`PER_MEMBER` (the tuned ones and
    ``early_exit``): a population shares its model, data, batches and schedule.  Each folder gets what
    :func:`~locoprop.harness.train.train` writes (``config.json``, ``metrics.jsonl``; no checkpoint: a stopped
    population is not resumed, each run starts again).  ``wall_time`` is the population's (every member's
    record says so under ``population`` in ``config.json``).  ``on_epoch(j, record)`` is called for member
    ``j`` after each epoch; a string it returns stops that member as ``"pruned"``.  ``on_end(j, result)`` is
    called as soon as member ``j``'s run ends (its folder complete), while the others may go on.  Returns
    each member's :class:`~locoprop.harness.train.RunResult`, in the order of ``configs``.
    """
    if not configs or len(configs) != len(outs):
        raise ValueError(f"configs, outs: expected one folder per configuration, got {len(configs)} and {len(outs)}")
    for cfg in configs:
        check_population_config(cfg)
    shared = shared_settings(configs[0])
    for j, cfg in enumerate(configs):
        differ = sorted(k for k, v in shared_settings(cfg).items() if v != shared[k])
        if differ:
            raise ValueError(f"configs[{j}]: differs from configs[0] in {differ}; a population shares every "
                             f"setting but {', '.join(PER_MEMBER)}")
    outs = [Path(o) for o in outs]
    for out in outs:
        if (out / METRICS).exists():
            raise FileExistsError(f"{out}: a run is already there; choose another folder")
    cfg0 = configs[0]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg0.device == "auto" else cfg0.device)
    dtype = getattr(torch, cfg0.dtype)
    data = load_dataset(cfg0.dataset, cfg0.data_dir, device=device, dtype=dtype, limit_train=cfg0.limit_train,
                        limit_test=cfg0.limit_test, seed=cfg0.seed)
    seeds = [cfg.seed for cfg in configs]
    if data.synthetic and len(set(seeds)) > 1:
        raise ValueError(f"seed: the members' seeds {sorted(set(seeds))} would each generate other data "
                         f"({data.source}); a population shares its data")
    models = {}
    for seed in dict.fromkeys(seeds):  # as train(): the seed, then the model
        torch.manual_seed(seed)
        models[seed] = build_autoencoder(cfg0.model, cfg0.activation, input_dim=data.train.shape[1], dtype=dtype,
                                         device=device)
    model = models[cfg0.seed]
    pop = Population([models[seed] for seed in seeds] if len(models) > 1 else model, cfg0.optimizer,
                     [member_of(c) for c in configs], local_steps=cfg0.local_steps, precision=cfg0.precision,
                     compile_update=cfg0.compile_elementwise)
    k = len(configs)
    for j, (cfg, out) in enumerate(zip(configs, outs)):
        out.mkdir(parents=True, exist_ok=True)
        record = run_record(cfg, data, device, model)
        record["population"] = {"size": k, "member": j, "note": "trained with other members in one process "
                                "(locoprop.harness.population); wall_time is the whole population's"}
        (out / CONFIG).write_text(json.dumps(record, indent=2) + "\n")

    def write(j: int, rec: dict) -> None:
        with (outs[j] / METRICS).open("a") as fh:
            fh.write(json.dumps(rec) + "\n")

    train_losses, test_losses = pop.evaluate(data.train), pop.evaluate(data.test)
    for j in range(k):
        write(j, {"epoch": 0, "train_loss": train_losses[j], "test_loss": test_losses[j], "wall_time": 0.0,
                  "lr": 0.0, "step": 0})
    results: list[RunResult | None] = [None] * k

    def ended(j: int, result: RunResult) -> None:
        results[j] = result
        if result.status != "finished":
            write(j, {"event": result.status, "reason": result.reason})
        if on_end is not None:
            on_end(j, result)

    last: list[tuple[float, float] | None] = [None] * k
    best = [math.inf] * k
    alive = list(range(k))  # alive[i]: the run of the population's i-th member
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a harness dependency
        tqdm = None
    n = data.train.shape[0]
    batches = math.ceil(n / cfg0.batch_size)
    wall, step = 0.0, 0
    for epoch in range(cfg0.epochs):
        factor = cfg0.schedule_factor(epoch)
        perms = {seed: _epoch_permutation(n, seed, epoch).to(device) for seed in dict.fromkeys(seeds)}
        order = torch.stack([perms[seeds[j]] for j in alive]) if len(perms) > 1 else None  # each member's own
        bar = tqdm(total=batches, desc=f"{k} x {cfg0.optimizer} epoch {epoch + 1}/{cfg0.epochs}", leave=False,
                   disable=not progress) if tqdm else None
        _sync(device)
        t0 = time.perf_counter()
        running = torch.zeros(pop.size, dtype=torch.float64, device=device)
        for i in range(batches):
            rows = slice(i * cfg0.batch_size, (i + 1) * cfg0.batch_size)
            xb = data.train[perms[cfg0.seed][rows]] if order is None else data.train[order[:, rows]]
            running += (pop.step(xb, factor).double() - running) / (i + 1)
            step += 1
            if bar is not None:
                bar.update(1)
        _sync(device)
        wall += time.perf_counter() - t0
        if bar is not None:
            bar.close()
        train_losses, test_losses = pop.evaluate(data.train), pop.evaluate(data.test)
        batch_losses = running.tolist()
        keep = []
        for i, j in enumerate(alive):
            cfg, train_loss, test_loss = configs[j], train_losses[i], test_losses[i]
            if not math.isfinite(batch_losses[i]):
                end = ("diverged", f"batch loss is {batch_losses[i]}")
            elif not math.isfinite(train_loss):
                end = ("diverged", f"train loss is {train_loss}")
            else:  # as train(): record the epoch, then the notebook's rules, then the pruner
                best[j] = min(best[j], train_loss)
                rec = {"epoch": epoch + 1, "train_loss": train_loss, "test_loss": test_loss, "wall_time": wall,
                       "lr": cfg.lr * factor, "step": step, "batch_loss": batch_losses[i]}
                write(j, rec)
                last[j] = (train_loss, test_loss)
                why = early_exit_reason(train_loss, best[j], epoch + 1) if cfg.early_exit else None
                pruned = on_epoch(j, rec) if on_epoch is not None and not why else None
                end = ("early-exit", why) if why else ("pruned", pruned) if pruned else None
            if end is None:
                keep.append(i)
                continue
            status, why = end
            done = epoch if status == "diverged" else epoch + 1  # a diverged epoch is not recorded
            ended(j, RunResult(outs[j], status, done, *(last[j] or (None, None)), f"epoch {epoch + 1}: {why}"))
        log(f"epoch {epoch + 1}/{cfg0.epochs}: {len(keep)} of {k} runs go on; best train "
            f"{min((train_losses[i] for i in keep), default=math.nan):.4f}  {wall:.1f}s")
        if not keep:
            break
        if len(keep) < pop.size:
            pop.keep(keep)
            alive = [alive[i] for i in keep]
    for j in alive:
        if results[j] is None:
            ended(j, RunResult(outs[j], "finished", cfg0.epochs, *last[j]))
    return results
