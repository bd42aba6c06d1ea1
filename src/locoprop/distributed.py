r"""LocoProp on ``torch.distributed``: two exact ways to split a step over ranks (issue 6).

A LocoProp step (paper Algorithms 1-4) is one forward and backward pass, then
``T`` local iterations in which every layer ``m`` minimises its own local
problem with its input ``ŷ_{m-1}`` and target held fixed -- "for each layer
``m ∈ [M]`` in parallel do" (Algorithms 1-4; Sec. 1: "embarrassingly
parallelizable across layers").  Distribution is a layer *around* the solver:
the optimizer calls a distributor at three points of its step and the solvers
do not know about ranks.

* :class:`DataParallelDistributor` (``distributed="data"``): every rank holds
  every layer and a shard of the global batch.  The local gradient of a layer,
  ``δᵀx̃`` summed over the batch (paper Eq. 2 / reference notes step 4), is a
  sum over examples, so summing the ranks' partial sums (one bucketed
  all-reduce per local iteration) gives the single-device local gradient of
  the global batch exactly.  Costs ``T`` all-reduces of the parameters per step.
* :class:`LayerShardedDistributor` (``distributed="layers"``): after the
  forward and backward pass each layer's rows (its input ``ŷ_{m-1}`` and
  ``∇_{â_m} L``) are gathered on the rank that owns the layer; that rank
  builds the layer's target and runs its ``T`` local iterations on the global
  batch with no further communication, then broadcasts the new weights.
  Costs one gather of ``b · Σ(n_m + d_m)`` activations and one broadcast of the
  parameters per step, independent of ``T``.  Layers are assigned to ranks to
  balance their products per local iteration (:func:`assign_layers`).

Both give the single-device update on the global batch, up to the order of
floating-point sums.  Every collective goes through a :class:`Communicator`,
which counts the bytes it moves (:class:`CommStats`) and turns a failed or
timed-out collective into a :class:`DistributedError` naming the rank(s) that
stopped answering.

Typical use, one process per rank (``torchrun`` sets the environment)::

    torch.distributed.init_process_group("gloo", timeout=timedelta(minutes=10))
    opt = locoprop.LocoProp(model, "M", lr=1e-5, activation_lr=10, distributed="layers")
    for xb in my_slice_of_every_global_batch:
        opt.step(lambda: loss_fn(model(xb), xb))   # returns the global batch's loss
"""

from __future__ import annotations

import abc
import contextlib
import math
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as Fn

from .layers import LayerBatch
from .solvers import InnerView

__all__ = [
    "DistributedConfig", "DataParallelConfig", "LayerShardedConfig", "DistributedError", "CommStats",
    "Communicator", "Distributor", "DataParallelDistributor", "LayerShardedDistributor", "assign_layers",
    "layer_costs", "distribute", "make_distributor", "batch_shard", "init_from_environment", "MODES",
]

#: ``distributed=`` names.
MODES = ("data", "layers")
_LOSS_REDUCTIONS = ("mean", "sum")


class DistributedError(RuntimeError):
    """A collective failed: a rank died, hung past the timeout, or the ranks disagree.

    The message names the rank(s) that stopped answering.  The process group
    cannot be used afterwards; relaunch the job (``torchrun ... --resume``
    continues from the last checkpoint).
    """


# -- configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistributedConfig:
    """Settings shared by both modes.

    Args:
        loss_reduction: how the closure's loss treats its rank's rows:
            ``"mean"`` (a mean over them, like every ``reduction="mean"`` torch
            loss and the paper's autoencoder loss; the global loss is then the
            mean over the global batch and each rank's ``∇_â L`` is scaled by
            ``b_rank / b_global``) or ``"sum"`` (no scaling).
        probe_timeout_s: after a collective fails, each peer is probed for at
            most this long to tell a dead rank from a busy one.
    """

    loss_reduction: str = "mean"
    probe_timeout_s: float = 10.0

    def validate(self) -> None:
        if self.loss_reduction not in _LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction: expected one of {_LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        if not (isinstance(self.probe_timeout_s, (int, float)) and self.probe_timeout_s > 0):
            raise ValueError(f"probe_timeout_s: expected a number of seconds > 0, got {self.probe_timeout_s!r}")


@dataclass(frozen=True)
class DataParallelConfig(DistributedConfig):
    """Exact data parallelism (``distributed="data"``).

    Args:
        bucket_cap_mb: the local gradients of one local iteration are
            flattened into buckets of at most this many MiB, each all-reduced
            asynchronously (as ``DistributedDataParallel``'s ``bucket_cap_mb``).
    """

    bucket_cap_mb: float = 25.0

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.bucket_cap_mb, (int, float)) and self.bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb: expected a number > 0, got {self.bucket_cap_mb!r}")


@dataclass(frozen=True)
class LayerShardedConfig(DistributedConfig):
    """Layer sharding (``distributed="layers"``).

    Args:
        assignment: ``assignment[m]`` is the rank (in the process group) that
            solves layer ``m``; ``None`` balances :func:`layer_costs` with
            :func:`assign_layers`.
    """

    assignment: tuple[int, ...] | None = None

    def validate(self) -> None:
        super().validate()
        if self.assignment is not None and not all(
                isinstance(r, int) and not isinstance(r, bool) for r in self.assignment):
            raise ValueError(f"assignment: expected a sequence of integer ranks, got {self.assignment!r}")


# -- communication ----------------------------------------------------------------------------------
@dataclass
class CommStats:
    """What this rank passed to collectives, by operation.

    ``payload_bytes``: bytes of the tensors this rank hands to the collective
    (its contribution; for ``gather`` the padded rows it sends).
    ``recv_bytes``: bytes this rank must receive under the bandwidth-optimal
    algorithm of each collective (a lower bound independent of the backend):
    all-reduce ``2(N-1)/N · S`` (ring), all-gather ``(N-1) · S``, gather
    ``(N-1) · S`` on the destination, broadcast ``S`` on every other rank.
    Summed over ranks, ``recv_bytes`` is the traffic between ranks.
    ``seconds``: wall time spent inside the calls (launch and wait), which
    includes waiting for slower ranks.
    """

    calls: dict = field(default_factory=dict)
    payload_bytes: dict = field(default_factory=dict)
    recv_bytes: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def record(self, op: str, payload: float, recv: float) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        self.payload_bytes[op] = self.payload_bytes.get(op, 0) + int(payload)
        self.recv_bytes[op] = self.recv_bytes.get(op, 0) + int(round(recv))

    def add_time(self, op: str, seconds: float) -> None:
        self.seconds[op] = self.seconds.get(op, 0.0) + seconds

    def reset(self) -> None:
        self.calls.clear()
        self.payload_bytes.clear()
        self.recv_bytes.clear()
        self.seconds.clear()

    @property
    def total_payload_bytes(self) -> int:
        return sum(self.payload_bytes.values())

    @property
    def total_recv_bytes(self) -> int:
        return sum(self.recv_bytes.values())

    def as_dict(self) -> dict:
        return {"calls": dict(self.calls), "payload_bytes": dict(self.payload_bytes),
                "recv_bytes": dict(self.recv_bytes), "seconds": dict(self.seconds)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:limit]


def _group_timeout(group) -> float | None:
    """The timeout the process group was created with, in seconds (best effort)."""
    try:
        backend = group._get_backend(torch.device("cpu"))
        return backend.options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 - private API; the value is only used in messages
        return None


class Communicator:
    """The collectives of one process group, counted and guarded.

    Every call records its bytes in :attr:`stats`.  A collective that raises
    (a peer's connection closed, or the group's timeout passed) is diagnosed:
    this rank probes every peer, in a fixed pairwise order, over a separate
    gloo group, and raises :class:`DistributedError` naming the ranks whose
    connection is closed (gone) and those that did not answer within
    ``probe_timeout_s``.  Use :meth:`for_group` to share one per group.

    It holds only weak references to the process groups (c10d's registry owns
    them): a group object that outlives ``destroy_process_group`` and is freed
    at interpreter exit makes gloo abort the process.
    """

    _cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, group=None, probe_timeout_s: float = 10.0) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group: torch.distributed is not initialized; call "
                             "torch.distributed.init_process_group first (torchrun sets the environment it reads)")
        group = group if group is not None else dist.group.WORLD
        self._group = weakref.ref(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("process_group: this process is not a member of the given process group")
        self.world_size = dist.get_world_size(group)
        self.global_ranks = dist.get_process_group_ranks(group)
        self.probe_timeout_s = float(probe_timeout_s)
        self.timeout_s = _group_timeout(group)
        self.stats = CommStats()
        self._monitor = lambda: None
        if self.world_size > 1:
            self._monitor = weakref.ref(dist.new_group(ranks=self.global_ranks, backend="gloo",
                                                       timeout=timedelta(seconds=self.probe_timeout_s),
                                                       use_local_synchronization=True))

    @property
    def group(self):
        """The process group (a :class:`DistributedError` once it is destroyed)."""
        group = self._group()
        if group is None:
            raise DistributedError(f"rank {self.rank}: the process group was destroyed")
        return group

    @classmethod
    def for_group(cls, group=None, probe_timeout_s: float = 10.0) -> "Communicator":
        """The communicator of ``group`` (default: the world), created on first use (a collective)."""
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group: torch.distributed is not initialized; call "
                             "torch.distributed.init_process_group first (torchrun sets the environment it reads)")
        key = group if group is not None else dist.group.WORLD
        comm = cls._cache.get(key)
        if comm is None:
            comm = cls._cache[key] = cls(key, probe_timeout_s)
        return comm

    # -- guarding ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, what: str, op: str | None = None):
        """Turn a failed collective inside the block into a :class:`DistributedError` naming the ranks;
        add the block's wall time to ``stats.seconds[op]``."""
        t0 = time.perf_counter()
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as exc:  # DistBackendError and gloo's errors are RuntimeErrors
            raise self._diagnose(what, exc) from exc
        finally:
            if op is not None:
                self.stats.add_time(op, time.perf_counter() - t0)

    def _probe_peers(self) -> tuple[list[int], list[int]]:
        """Exchange a token with every peer; pairs in lexicographic order, so the probes cannot deadlock."""
        gone, silent = [], []
        wait = timedelta(seconds=self.probe_timeout_s)
        monitor = self._monitor()
        for q in range(self.world_size):
            if q == self.rank:
                continue
            peer = self.global_ranks[q]
            out = torch.tensor([self.rank], dtype=torch.int64)
            back = torch.zeros(1, dtype=torch.int64)
            try:
                send = dist.isend(out, dst=peer, group=monitor)
                recv = dist.irecv(back, src=peer, group=monitor)
                recv.wait(timeout=wait)
                send.wait(timeout=wait)
            except RuntimeError as exc:
                text = str(exc).lower()
                (gone if ("closed" in text or "reset" in text or "refused" in text or "broken pipe" in text)
                 else silent).append(q)
        return gone, silent

    def _diagnose(self, what: str, exc: BaseException) -> DistributedError:
        head = f"rank {self.rank} of {self.world_size}: {what} failed"
        if self.world_size == 1 or self._monitor() is None:
            return DistributedError(f"{head}: {_first_line(exc)}")
        gone, silent = self._probe_peers()
        parts = []
        if gone:
            parts.append(f"rank(s) {gone} are gone (connection closed: the process exited or was killed)")
        if silent:
            parts.append(f"rank(s) {silent} did not answer within {self.probe_timeout_s:g} s (hung, or still "
                         "waiting in another collective)")
        if not parts:
            parts.append("every peer still answers")
        limit = f" after the group's timeout of {self.timeout_s:g} s" if self.timeout_s else ""
        return DistributedError(
            f"{head}{limit if 'timed out' in str(exc).lower() else ''}; {'; '.join(parts)}. The job cannot "
            f"continue: relaunch it (torchrun ... --resume continues from the last checkpoint). "
            f"[backend: {_first_line(exc)}]"
        )

    # -- collectives ------------------------------------------------------------------------------
    def _global(self, group_rank: int) -> int:
        return self.global_ranks[group_rank]

    def all_reduce(self, tensor: torch.Tensor, what: str, async_op: bool = False):
        n = self.world_size
        self.stats.record("all_reduce", _nbytes(tensor), 2 * (n - 1) / n * _nbytes(tensor))
        with self.guard(f"all_reduce ({what})", "all_reduce"):
            return dist.all_reduce(tensor, group=self.group, async_op=async_op)

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor, what: str) -> None:
        self.stats.record("all_gather", _nbytes(tensor), (self.world_size - 1) * _nbytes(tensor))
        with self.guard(f"all_gather ({what})", "all_gather"):
            dist.all_gather(outputs, tensor, group=self.group)

    def gather(self, tensor: torch.Tensor, gather_list, dst: int, what: str, async_op: bool = False):
        recv = (self.world_size - 1) * _nbytes(tensor) if self.rank == dst else 0
        self.stats.record("gather", _nbytes(tensor), recv)
        with self.guard(f"gather to rank {dst} ({what})", "gather"):
            return dist.gather(tensor, gather_list if self.rank == dst else None, dst=self._global(dst),
                               group=self.group, async_op=async_op)

    def broadcast(self, tensor: torch.Tensor, src: int, what: str, async_op: bool = False):
        self.stats.record("broadcast", _nbytes(tensor), 0 if self.rank == src else _nbytes(tensor))
        with self.guard(f"broadcast from rank {src} ({what})", "broadcast"):
            return dist.broadcast(tensor, src=self._global(src), group=self.group, async_op=async_op)

    def wait(self, works: Sequence, what: str) -> None:
        """Wait for asynchronous collectives; ``what`` starts with their operation's name."""
        with self.guard(what, what.split(" ")[0]):
            for w in works:
                if w is not None:
                    w.wait()

    def all_gather_object(self, obj, what: str) -> list:
        out = [None] * self.world_size
        self.stats.record("all_gather_object", 0, 0)
        with self.guard(f"all_gather_object ({what})", "all_gather_object"):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj, src: int, what: str):
        box = [obj if self.rank == src else None]
        self.stats.record("broadcast_object", 0, 0)
        with self.guard(f"broadcast_object from rank {src} ({what})", "broadcast_object"):
            dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def barrier(self, what: str) -> None:
        with self.guard(f"barrier ({what})"):
            dist.barrier(group=self.group)


# -- layer assignment -------------------------------------------------------------------------------
def layer_costs(optimizer) -> list[float]:
    """Multiply-adds per example of each layer's ``T`` local iterations: ``2 T_m (n_m + 1) d_m``.

    Each local iteration of layer ``m`` computes its pre-activation ``x W̃ᵀ``
    and its local gradient ``δᵀx`` (reference notes, step 4): two products of
    ``(n_m + 1) d_m`` multiply-adds per example.
    """
    costs = []
    for lay, group in zip(optimizer.layers, optimizer.param_groups):
        w = lay.linear.weight
        n1 = w.shape[1] + (1 if lay.linear.bias is not None else 0)
        costs.append(2.0 * int(group["local_steps"]) * n1 * w.shape[0])
    return costs


def assign_layers(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment: the costliest unassigned layer goes to the least-loaded rank.

    Deterministic (ties: lower layer index, then lower rank), so every rank
    computes the same assignment.  Its makespan is at most 4/3 of the optimum.
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for m in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[m] = r
        load[r] += costs[m]
    return owner


# -- distributors -----------------------------------------------------------------------------------
def _rows_not_whole(batch: LayerBatch) -> str | None:
    """Why ``batch``'s rows are not a whole number of examples of ``rows_per_example`` rows each, or ``None``."""
    rows, per = batch.inputs.shape[0], batch.rows_per_example
    if per > 0 and rows % per == 0:
        return None
    if per == 0:  # LayerBatch.stack: micro-batches whose examples have different numbers of rows
        return (f"layer {batch.layer.name!r}: the step's micro-batches have different numbers of rows per example "
                "(sequences of different lengths); distributed LocoProp counts a shard's examples by them: give "
                "every micro-batch of a step the same shape but the first dimension")
    return (f"layer {batch.layer.name!r}: {rows} rows of {per} per example; distributed LocoProp counts a shard's "
            "examples by the first dimension of each layer's input (the batch; a shared layer's calls each on "
            "the whole shard)")


class Distributor(abc.ABC):
    """Base class: the hooks of :meth:`locoprop.LocoProp.step` and the state hooks.

    1. :meth:`reduce_loss` after the forward pass: the global batch's loss and
       every rank's row count (one all-gather of two numbers);
    2. :meth:`reduce_other_grads` after the backward pass, where the model has
       trainable parameters outside LocoProp's layers (``other_grads``): their
       global gradient (one all-reduce);
    3. :meth:`exchange` after the backward pass: scale ``∇ L`` to the global
       loss and move rows where the mode needs them;
    4. :meth:`solve` instead of ``solver.solve``.
    """

    mode = ""

    def __init__(self, optimizer, config: DistributedConfig, process_group=None) -> None:
        config.validate()
        self.config = config
        self.optimizer = optimizer
        self.layers = optimizer.layers
        self.comm = Communicator.for_group(process_group, config.probe_timeout_s)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.counts: list[int] | None = None  # rows of every rank in the current step
        self._scale = 1.0
        params = [p for lay in self.layers for p in lay.params]
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"distributed: every layer must have one dtype and device, got {sorted(map(str, dtypes))} "
                             f"on {sorted(map(str, devices))}")
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self._check_supported()
        self._check_same_everywhere()
        self._broadcast_from(0, params, "initial parameters")

    @property
    def stats(self) -> CommStats:
        return self.comm.stats

    # -- construction -----------------------------------------------------------------------------
    def _check_supported(self) -> None:
        pass

    def _signature(self) -> list[float]:
        sig = [float(MODES.index(self.mode)), float(len(self.layers)), float(self.world_size)]
        sig.append(float(sum(p.numel() for lay in self.layers for p in lay.params)))
        sig.append(float(sum((m + 1) * p.numel() for m, lay in enumerate(self.layers) for p in lay.params)))
        sig.append(float(sum((m + 1) * int(g["local_steps"]) for m, g in enumerate(self.optimizer.param_groups))))
        sig.append(float(_LOSS_REDUCTIONS.index(self.config.loss_reduction)))
        sig.append(self._assignment_checksum())
        return sig  # a fixed length on every rank and mode: all_gather needs equal sizes

    def _assignment_checksum(self) -> float:
        return 0.0

    def _check_same_everywhere(self) -> None:
        mine = torch.tensor(self._signature(), dtype=torch.float64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        self.comm.all_gather(every, mine, "LocoProp settings check")
        names = ["mode", "number of layers", "world size", "parameters", "layer shapes", "local_steps",
                 "loss_reduction", "layer assignment"]
        for r, sig in enumerate(every):
            differ = [n for n, a, b in zip(names, sig.tolist(), mine.tolist()) if a != b]
            if differ:
                raise ValueError(f"distributed: rank {r} built a different LocoProp than rank {self.rank} "
                                 f"({', '.join(differ)} differ); every rank must construct the same model and "
                                 "optimizer with the same distributed mode")

    def _broadcast_from(self, src: int, params: list[torch.Tensor], what: str, async_op: bool = False):
        """Broadcast ``params`` (flattened into one buffer) from ``src``; returns a finisher."""
        numels = [p.numel() for p in params]
        if self.rank == src:
            flat = torch.cat([p.detach().reshape(-1) for p in params])
        else:
            flat = torch.empty(sum(numels), dtype=self.dtype, device=self.device)
        work = self.comm.broadcast(flat, src, what, async_op=async_op)

        def finish():
            if self.rank != src:
                with torch.no_grad():
                    for p, chunk in zip(params, flat.split(numels)):
                        p.copy_(chunk.view_as(p))

        if async_op:
            return work, finish
        finish()
        return None, None

    # -- step hooks -------------------------------------------------------------------------------
    def reduce_loss(self, loss: torch.Tensor, batches: list[LayerBatch]) -> torch.Tensor:
        """The loss of the global batch (identical on every rank); records every rank's row count (examples where
        the first layer is a convolution, whose rows are its positions)."""
        idle = next((m for m, b in enumerate(batches) if b is None), -1)  # a layer that did not run on this rank
        present = [b for b in batches if b is not None]
        problem = self._uneven_rows(present) if idle < 0 else None
        rows = present[0].inputs.shape[0] // max(present[0].rows_per_example, 1)
        mine = torch.tensor([float(rows), float(loss.detach()), float(problem is not None), float(idle)],
                            dtype=torch.float64, device=loss.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        self.comm.all_gather(every, mine, "loss and row counts")
        table = torch.stack(every).cpu().tolist()
        not_run = [(r, int(row[3])) for r, row in enumerate(table) if row[3] >= 0]
        if not_run:  # every rank raises, none waits in a later collective
            rank, m = not_run[0]
            raise ValueError(f"layer {self.layers[m].name!r} did not run on rank {rank} in this step; distributed "
                             "LocoProp solves each layer's one local problem over every rank's rows, so every layer "
                             "runs on every rank in each step (freeze a layer that is not used)")
        flagged = [r for r, row in enumerate(table) if row[2]]
        if flagged:
            raise ValueError(problem or f"rank {flagged[0]}: its layers' rows are not whole examples (see its error)")
        table = [row[:2] for row in table]
        self.counts = [int(c) for c, _ in table]
        total = sum(self.counts)
        if total == 0:
            raise ValueError("closure: the global batch is empty on every rank")
        if self.config.loss_reduction == "mean":
            value = sum(c * v for c, v in table if c > 0) / total  # an empty shard's mean is 0/0
            self._scale = rows / total
        else:
            value = sum(v for c, v in table)
            self._scale = 1.0
        return torch.tensor(value, dtype=loss.dtype, device=loss.device)

    def reduce_other_grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The global batch's gradients of the model's parameters outside LocoProp's layers (``other_grads``):
        each rank's scaled as the layers' (``_scale_gradients``), summed over the ranks in one all-reduce (new
        tensors; autograd's are left as they are)."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self._scale != 1.0:
            flat.mul_(self._scale)
        self.comm.all_reduce(flat, "gradients of the other parameters")
        return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]

    def _uneven_rows(self, batches: list[LayerBatch]) -> str | None:
        """Why this rank's rows cannot be counted as examples (rows per example as :class:`LayerBatch` counts
        them), or ``None``: the first layer's rows are a whole number of examples."""
        return _rows_not_whole(batches[0])

    def _scale_gradients(self, batches: list[LayerBatch]) -> None:
        """``∇_â L_rank → (b_rank / b) ∇_â L_rank``: the rows of the global loss's gradient."""
        if self._scale == 1.0:
            return
        for b in batches:
            b.grad_pre.mul_(self._scale)
            if b.grad_post is not None:
                b.grad_post.mul_(self._scale)

    @abc.abstractmethod
    def exchange(self, batches: list[LayerBatch]) -> list[LayerBatch | None]:
        """Move the rows each rank needs; ``None`` for the layers this rank does not solve."""

    @abc.abstractmethod
    def solve(self, solver, problems, local_loss, regularizer, inner) -> None:
        """Run ``solver`` on ``problems`` with this mode's communication."""

    def local_inner(self, inner):
        """The inner optimizer as this rank's solve sees it (the groups of the layers it solves)."""
        return inner

    # -- state hooks ------------------------------------------------------------------------------
    def inner_state_dict(self, local: dict) -> dict:
        """The inner optimizer's full state (a collective in the layer-sharded mode)."""
        return local

    def after_load_state_dict(self) -> None:
        pass

    def describe(self) -> dict:
        return {"mode": self.mode, "world_size": self.world_size, "rank": self.rank,
                "backend": str(dist.get_backend(self.comm.group))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank {self.rank} of {self.world_size}, {self.config})"


class DataParallelDistributor(Distributor):
    """Exact data parallelism: one bucketed all-reduce of the local gradients per local iteration.

    Every local problem's gradient is a sum over the batch rows,
    ``∇_W̃ = Σ_i δ_i x̃_iᵀ`` (paper Eqs. 2, 3, 7; reference notes step 4), so
    ``Σ_rank`` of the ranks' partial sums is the global batch's gradient.
    Targets are row-wise (Sec. 2: ``â - γ∇_â L``, ``f(â) - γ∇_â L``, ...), so
    with ``∇_â L`` scaled to the global loss they equal the single-device
    rows.  A regularizer's gradient (Eqs. 3, 7: ``c ΔW``) is the same on every
    rank and must be added once: the ranks other than 0 subtract it before
    the all-reduce.

    Not supported (a clear error at construction): natural-gradient targets
    and the Fisher regularizer (their ``D`` and ``A`` are statistics of the
    whole batch, App. D) and the closed-form solver; use
    ``distributed="layers"``, which solves each layer on the global batch.
    """

    mode = "data"

    def __init__(self, optimizer, config: DataParallelConfig | None = None, process_group=None) -> None:
        self._buckets: dict = {}
        super().__init__(optimizer, config or DataParallelConfig(), process_group)

    def _check_supported(self) -> None:
        from .regularizers import FisherProximity
        from .targets import NaturalGradientTarget

        v = self.optimizer.variant
        fix = "; use distributed='layers', which solves each layer on the whole global batch"
        if v.solver != "iterative":
            raise ValueError(f"distributed='data': solver {v.solver!r} is not supported (its solve is not a sum "
                             f"over examples){fix}")
        if isinstance(v.target, NaturalGradientTarget):
            raise ValueError("distributed='data': natural-gradient targets are not supported (the Fisher D of "
                             f"Prop. 1 is a statistic of the whole batch){fix}")
        if isinstance(v.regularizer, FisherProximity):
            raise ValueError("distributed='data': the Fisher regularizer is not supported (its D and A are "
                             f"statistics of the whole batch){fix}")
        if not hasattr(self.optimizer.solver, "reduce_grads"):
            raise ValueError(f"distributed='data': solver {type(self.optimizer.solver).__name__} has no "
                             f"reduce_grads hook{fix}")

    def exchange(self, batches):
        self._scale_gradients(batches)
        return batches

    def _bucket_layout(self, params: list[torch.Tensor]):
        key = tuple(id(p) for p in params)
        layout = self._buckets.get(key)
        if layout is None:
            cap = max(1, int(self.config.bucket_cap_mb * 2**20) // params[0].element_size())
            layout, current, size = [], [], 0
            for p in params:
                if current and size + p.numel() > cap:
                    layout.append(current)
                    current, size = [], 0
                current.append(p)
                size += p.numel()
            layout.append(current)
            layout = [(torch.empty(sum(p.numel() for p in b), dtype=self.dtype, device=self.device), b)
                      for b in layout]
            self._buckets[key] = layout
        return layout

    def _all_reduce_sum(self, keys: list[torch.Tensor], tensors: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Sum ``tensors`` (``tensors[i]`` shaped as ``keys[i]``) over the ranks in buckets laid out by ``keys``
        (persistent tensors: the parameters, or the fast solver's gradient buffers); the sums by ``id`` of
        their key, as views of the buckets."""
        layout = self._bucket_layout(keys)
        values = {id(k): t for k, t in zip(keys, tensors)}
        works = []
        for flat, bucket in layout:
            torch.cat([values[id(k)].reshape(-1) for k in bucket], out=flat)
            works.append(self.comm.all_reduce(flat, "local gradients", async_op=True))
        self.comm.wait(works, "all_reduce (local gradients)")
        return {id(k): chunk.view_as(k) for flat, bucket in layout
                for k, chunk in zip(bucket, flat.split([k.numel() for k in bucket]))}

    def _reduce_buffers(self, grads: list[torch.Tensor]) -> None:
        """The fast solver's hook: its gradient buffers summed over the ranks, in place (its proximity term is
        added after the sum)."""
        sums = self._all_reduce_sum(grads, grads)
        for g in grads:
            g.copy_(sums[id(g)])

    def _reduce_grads(self, problems, regularizer) -> None:
        """All-reduce (sum) every active layer's local gradient, bucketed; called once per local iteration."""
        if self.rank != 0:  # the regularizer's gradient is identical on every rank: keep rank 0's only
            for problem in problems:
                if problem.anchor is None or problem.params[0].grad is None:
                    continue
                delta = [p - a for p, a in zip(problem.params, problem.anchor)]
                extra = regularizer.grad(problem.batch, delta, problem.group["lr"])
                if extra is not None:
                    for p, e in zip(problem.params, extra):
                        p.grad = p.grad - e
        params = [p for problem in problems for p in problem.params if p.grad is not None]
        if not params:
            return
        sums = self._all_reduce_sum(params, [p.grad for p in params])
        for p in params:
            p.grad = sums[id(p)]

    def solve(self, solver, problems, local_loss, regularizer, inner) -> None:
        if getattr(solver, "name", "") == "fused":  # the fast solver sums its own gradient buffers
            solver.reduce_local_gradients = self._reduce_buffers
            try:
                solver.solve(problems, local_loss, regularizer, inner)
            finally:
                solver.reduce_local_gradients = None
            return
        previous = solver.reduce_grads

        def hook(probs):
            self._reduce_grads(probs, regularizer)
            if previous is not None:
                previous(probs)

        solver.reduce_grads = hook
        try:
            solver.solve(problems, local_loss, regularizer, inner)
        finally:
            solver.reduce_grads = previous


class LayerShardedDistributor(Distributor):
    """Layer sharding: each layer's rows gathered on its owner, solved there, weights broadcast.

    After the forward and backward pass, the owner of layer ``m`` receives
    every rank's rows of ``ŷ_{m-1}`` and ``∇_{â_m} L`` (and ``∇_{ŷ_m} L`` or
    sampled gradients when the variant needs them), in rank order -- the
    global batch -- recomputes ``â_m = ŷ_{m-1} W_mᵀ + b_m`` instead of receiving
    it, builds the target and solves the local problem exactly as one device
    would ("for each layer ``m ∈ [M]`` in parallel", Algorithms 1-4), with no
    communication inside the ``T`` local iterations.  Then each owner
    broadcasts its layers' new weights.  The inner optimizer's state of a layer
    lives on its owner only; :meth:`inner_state_dict` gathers it.

    Every variant is supported, closed form (Eqs. 4, 15) and natural-gradient
    targets (Prop. 1) included, since the owner holds the whole global batch;
    with a *sampled* Fisher each rank draws its rows' labels from its own
    generator, so the samples differ from a single-process run.
    """

    mode = "layers"

    def __init__(self, optimizer, config: LayerShardedConfig | None = None, process_group=None) -> None:
        config = config or LayerShardedConfig()
        config.validate()
        self.costs = layer_costs(optimizer)
        # the world size is needed for the assignment; the Communicator is shared, so this is no extra collective
        world = Communicator.for_group(process_group, config.probe_timeout_s).world_size
        if config.assignment is None:
            self.assignment = assign_layers(self.costs, world)
        else:
            a = list(config.assignment)
            if len(a) != len(optimizer.layers) or any(not 0 <= r < world for r in a):
                raise ValueError(f"assignment: expected {len(optimizer.layers)} ranks in [0, {world}), got {a}")
            self.assignment = a
        self.owned = [[m for m, r in enumerate(self.assignment) if r == k] for k in range(world)]
        super().__init__(optimizer, config, process_group)
        self.mine = self.owned[self.rank]
        v = optimizer.variant
        self.fields = ["inputs", "grad_pre"]
        if v.needs_grad_post:
            self.fields.append("grad_post")
        if v.needs_sampled_grad:
            self.fields.append("grad_pre_sampled")
        inner = optimizer.inner
        self._param_index: dict[int, list[int]] = {}
        if inner is not None:
            if len(inner.param_groups) != len(self.layers):
                raise ValueError("distributed='layers': the inner optimizer needs one parameter group per layer")
            i = 0
            for m, g in enumerate(inner.param_groups):
                self._param_index[m] = list(range(i, i + len(g["params"])))
                i += len(g["params"])
        self.after_load_state_dict()

    def _assignment_checksum(self) -> float:
        return float(sum((m + 1) * (r + 1) for m, r in enumerate(self.assignment)))

    def load(self) -> list[float]:
        """Cost (multiply-adds per example per step) of the layers each rank solves."""
        return [sum(self.costs[m] for m in layers) for layers in self.owned]

    def _widths(self, m: int) -> list[int]:
        lin = self.layers[m].linear
        n, d = lin.weight.shape[1], lin.weight.shape[0]
        return [n if f == "inputs" else d for f in self.fields]

    def _uneven_rows(self, batches: list[LayerBatch]) -> str | None:
        """Every layer's rows are the first layer's examples, so that the gather sends one row per example."""
        shapes = [(b.inputs.shape[0], b.rows_per_example) for b in batches]
        if all(per > 0 and rows == shapes[0][0] // shapes[0][1] * per for rows, per in shapes):
            return None
        mixed = next((b for b, (_, per) in zip(batches, shapes) if per == 0), None)
        if mixed is not None:
            return _rows_not_whole(mixed)
        told = ", ".join(f"{b.layer.name!r} {rows} rows of {per}" for b, (rows, per) in zip(batches, shapes))
        return (f"the layers' rows are not the same examples ({told} per example); distributed='layers' gathers "
                "each layer's rows one example at a time, counting a shard's examples by the first dimension of "
                "each layer's input (the batch; a shared layer's calls each on the whole shard)")

    def exchange(self, batches):
        """Each field travels as one row per example (a convolution's rows of one example side by side), so that
        layers with different rows per example share one gather and the shards' row counts."""
        self._scale_gradients(batches)
        counts = self.counts
        rows_max = max(counts)
        works, received = [], {}
        for owner, layers in enumerate(self.owned):
            if not layers:
                continue
            mine = torch.cat([getattr(batches[m], f).reshape(counts[self.rank], w * batches[m].rows_per_example)
                              for m in layers for f, w in zip(self.fields, self._widths(m))], 1)
            if mine.shape[0] < rows_max:  # gather needs equal shapes: pad with zero rows
                mine = torch.cat([mine, mine.new_zeros(rows_max - mine.shape[0], mine.shape[1])], 0)
            mine = mine.contiguous()
            slots = None
            if owner == self.rank:
                slots = [torch.empty_like(mine) for _ in range(self.world_size)]
                received[owner] = slots
            works.append(self.comm.gather(mine, slots, owner, "layer inputs and gradients", async_op=True))
        self.comm.wait(works, "gather (layer inputs and gradients)")
        out: list[LayerBatch | None] = [None] * len(batches)
        if self.mine:
            slots = received[self.rank]
            full = torch.cat([s[:c] for s, c in zip(slots, counts)], 0)
            widths = [w * batches[m].rows_per_example for m in self.mine for w in self._widths(m)]
            pieces = iter(full.split(widths, 1))
            for m in self.mine:
                values = {f: piece.reshape(-1, w) for f, w, piece in zip(self.fields, self._widths(m), pieces)}
                lay = self.layers[m]
                with torch.no_grad():
                    pre = Fn.linear(values["inputs"], lay.linear.weight, lay.linear.bias)
                out[m] = LayerBatch(layer=lay, inputs=values["inputs"], pre=pre, grad_pre=values["grad_pre"],
                                    grad_post=values.get("grad_post"),
                                    grad_pre_sampled=values.get("grad_pre_sampled"))
        return out

    def local_inner(self, inner):
        return InnerView(inner, self.mine) if inner is not None else None

    def solve(self, solver, problems, local_loss, regularizer, inner) -> None:
        mine = [p for p in problems if p is not None]
        if mine:  # the inner optimizer's view of this rank's layers steps only theirs (InnerView)
            solver.solve(mine, local_loss, regularizer, self.local_inner(inner))
        works, finishers = [], []
        for owner, layers in enumerate(self.owned):
            if layers:
                params = [p for m in layers for p in self.layers[m].params]
                w, fin = self._broadcast_from(owner, params, "new weights", async_op=True)
                works.append(w)
                finishers.append(fin)
        self.comm.wait(works, "broadcast (new weights)")
        for fin in finishers:
            fin()

    def inner_state_dict(self, local: dict) -> dict:
        mine = {i for m in self.mine for i in self._param_index.get(m, [])}
        own = {i: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
               for i, s in local["state"].items() if i in mine}
        merged: dict = {}
        for part in self.comm.all_gather_object(own, "inner optimizer state"):
            merged.update(part)
        return {"state": dict(sorted(merged.items())), "param_groups": local["param_groups"]}

    def after_load_state_dict(self) -> None:
        """Keep the inner state of this rank's layers only (a loaded state dict holds every layer's)."""
        inner = self.optimizer.inner
        if inner is None:
            return
        for m, lay in enumerate(self.layers):
            if m not in self.mine:
                for p in lay.params:
                    inner.state.pop(p, None)

    def describe(self) -> dict:
        return {**super().describe(), "assignment": list(self.assignment), "load": self.load()}


# -- construction -----------------------------------------------------------------------------------
def make_distributor(optimizer, distributed="data", process_group=None) -> Distributor:
    """A distributor from ``"data"``, ``"layers"`` or a config object (construction is a collective)."""
    if distributed is None or distributed == "data":
        return DataParallelDistributor(optimizer, DataParallelConfig(), process_group)
    if distributed == "layers":
        return LayerShardedDistributor(optimizer, LayerShardedConfig(), process_group)
    if isinstance(distributed, DataParallelConfig):
        return DataParallelDistributor(optimizer, distributed, process_group)
    if isinstance(distributed, LayerShardedConfig):
        return LayerShardedDistributor(optimizer, distributed, process_group)
    raise ValueError(f"distributed: expected one of {MODES}, a DataParallelConfig or a LayerShardedConfig, "
                     f"got {distributed!r}")


def distribute(optimizer, distributed="data", process_group=None) -> Distributor:
    """Make an existing :class:`~locoprop.LocoProp` distributed (as ``LocoProp(..., distributed=...)``).

    Call it on every rank, before the first step; parameters are broadcast
    from rank 0 of the group.  Returns the distributor (``optimizer.distributor``).
    """
    from .optimizer import LocoProp

    if not isinstance(optimizer, LocoProp):
        raise TypeError(f"optimizer: expected a locoprop.LocoProp, got {type(optimizer).__name__}")
    if getattr(optimizer, "distributor", None) is not None:
        raise ValueError("optimizer: it is already distributed")
    optimizer.distributor = make_distributor(optimizer, distributed, process_group)
    return optimizer.distributor


# -- launching helpers (used by the harness) --------------------------------------------------------
def batch_shard(index: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of one global batch: the ``rank``-th of ``world_size`` contiguous, near-equal parts.

    Concatenated in rank order the parts are the global batch, which is the
    order the layer-sharded mode gathers them in.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
    return torch.tensor_split(index, world_size)[rank]


def init_from_environment(backend: str, timeout_s: float, option: str = "distributed") -> bool:
    """``init_process_group`` from torchrun's environment (``env://``); ``False`` if one was already initialized."""
    if not dist.is_available():
        raise ValueError(f"{option}: this PyTorch build has no torch.distributed")
    if dist.is_initialized():
        return False
    import os

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"{option}: no torch.distributed environment ({', '.join(missing)} unset); launch with "
                         "`torchrun --nproc_per_node N -m locoprop train ...`")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"dist_timeout: expected a number of seconds > 0, got {timeout_s!r}")
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=float(timeout_s)))
    return True
