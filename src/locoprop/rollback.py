"""The copy that undoes a step: the weights and the inner optimizer's state from before the local solve.

:class:`~locoprop.LocoProp`'s ``check_finite`` keeps it (``rollback="device"`` or ``"host"``): the whole step is
undone when its update is not finite (``check_finite=True``), or each layer whose own update is not finite
(``check_finite="layer"``).  A step that solves its layers during the backward pass copies each layer just
before its solve (:meth:`Rollback.save_layer`) and, with ``check_finite="layer"``, lets the copy go once the
layer's update is checked (:meth:`Rollback.release`).  docs/performance.md (Memory) measures what it holds.
"""

from __future__ import annotations

import copy

import torch
from torch.optim import Optimizer

__all__ = ["Rollback"]


class Rollback:
    """Copies of the weights and the inner optimizer's state taken before the solve (``check_finite``).

    The device tensors are copied into buffers kept from step to step (no
    allocation after the first step): on the same device with one
    multi-tensor copy (``where="device"``), or, for CUDA tensors with
    ``where="host"``, into pinned host memory by asynchronous copies on a side
    stream, which the solve waits for (:meth:`wait`).  Host tensors and
    numbers (step counters) are copied on the host.  :meth:`restore` writes
    them back in place (the tensors keep their storage, so captured CUDA
    graphs stay valid) and drops state entries created during the step.
    A step that solves its layers one at a time during the backward pass
    copies each layer just before its solve instead (:meth:`save_layer`),
    into tensors of that step alone.
    """

    def __init__(self, where: str = "device") -> None:
        self.where = where
        self._tensors: list[torch.Tensor] = []
        self._buffers: list[torch.Tensor] = []
        self._owners: list[torch.Tensor] = []  # the parameter each of ``_tensors`` belongs to (itself or its state)
        self._host: list[tuple[torch.Tensor, dict, str, object]] = []  # (parameter, its state, key, copy)
        self._keys: dict[torch.Tensor, list[str]] = {}
        self._params: list[torch.Tensor] = []
        self._stream = None  # the side stream of the device-to-host copies
        self._pending = False

    @staticmethod
    def _state(params: list[torch.Tensor], inner: Optimizer | None, host: bool) -> tuple[list, list, dict, list]:
        """What a copy of ``params`` covers: the device tensors (the weights, then their inner state's tensors on
        the weights' device), the parameter each of them belongs to, each parameter's state keys, and
        (``host``) copies of the other state entries, each with its parameter."""
        device = params[0].device
        tensors, owners, keys, hosts = list(params), list(params), {}, []
        if inner is not None:
            for p in params:
                if p not in inner.state:
                    continue
                st = inner.state[p]
                keys[p] = list(st)
                for k, v in st.items():
                    if torch.is_tensor(v) and v.device == device:
                        tensors.append(v)
                        owners.append(p)
                    elif host:
                        hosts.append((p, st, k, v.clone() if torch.is_tensor(v) else copy.deepcopy(v)))
        return tensors, owners, keys, hosts

    def copies_to_host(self, device: torch.device) -> bool:
        """Whether the copies of tensors on ``device`` go to pinned host memory (``where="host"``, CUDA)."""
        return self.where == "host" and device.type == "cuda"

    def copies_layer_by_layer(self, device: torch.device) -> bool:
        """Whether a step that solves its layers during the backward pass copies each just before its solve
        (:meth:`save_layer`: copies on the device, held from there to the step's end) rather than every
        layer before the forward pass (:meth:`save`: to host memory, which costs the device nothing)."""
        return not self.copies_to_host(device)

    def save(self, params: list[torch.Tensor], inner: Optimizer | None, host: bool = True) -> None:
        device = params[0].device
        tensors, owners, keys, hosts = self._state(params, inner, host)
        to_host = self.copies_to_host(device)
        home = torch.device("cpu") if to_host else device
        if len(self._buffers) != len(tensors) or any(b.shape != t.shape or b.dtype != t.dtype or b.device != home
                                                     for b, t in zip(self._buffers, tensors)):
            self._buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) if to_host else torch.empty_like(t)
                             for t in tensors]
        with torch.no_grad():
            if to_host:
                main = torch.cuda.current_stream(device)
                if self._stream is None or self._stream.device != device:
                    self._stream = torch.cuda.Stream(device)
                self._stream.wait_stream(main)
                with torch.cuda.stream(self._stream):
                    for b, t in zip(self._buffers, tensors):
                        b.copy_(t, non_blocking=True)
                self._pending = True
            else:
                torch._foreach_copy_(self._buffers, tensors)
        self._tensors, self._owners, self._keys, self._params = tensors, owners, keys, list(params)
        if host:
            self._host = hosts

    def begin_layer_by_layer(self) -> None:
        """Start a step that copies each layer just before its solve changes it (:meth:`save_layer`), with no
        copy yet: the copies of the step before (or the buffers :meth:`save` fills) are let go, before the
        step's forward pass, which takes their memory again.  Let go at the end of a step instead, that memory
        goes back to the system (the C allocator returns a large free block at the top of its heap) and the
        next forward pass faults its pages in again: about a tenth more time for a batch-100 step with the
        readable loop on this project's 2-core machine (docs/performance.md, Memory)."""
        self._tensors, self._buffers, self._owners, self._keys, self._params, self._host = [], [], [], {}, [], []
        self._pending = False

    def save_layer(self, params: list[torch.Tensor], inner: Optimizer | None) -> None:
        """Add to this step's copies those of one layer's weights and inner state, taken now, before its solve
        changes them (a step that solves its layers one at a time during the backward pass,
        :meth:`LocoProp._backward_solving`): the step holds the copies of the layers solved so far, not of
        every layer from its start."""
        tensors, owners, keys, hosts = self._state(params, inner, host=True)
        with torch.no_grad():
            self._buffers.extend(t.clone() for t in tensors)
        self._tensors.extend(tensors)
        self._owners.extend(owners)
        self._keys.update(keys)
        self._params.extend(params)
        self._host.extend(hosts)

    def release(self, params: list[torch.Tensor]) -> None:
        """Let go of this step's copies of ``params`` and their inner state (``check_finite="layer"``, once a
        layer's update is found finite): a later :meth:`restore` leaves them as they are."""
        ids = {id(p) for p in params}
        kept = [i for i, o in enumerate(self._owners) if id(o) not in ids]
        self._tensors = [self._tensors[i] for i in kept]
        self._buffers = [self._buffers[i] for i in kept]
        self._owners = [self._owners[i] for i in kept]
        self._params = [p for p in self._params if id(p) not in ids]
        self._keys = {p: k for p, k in self._keys.items() if id(p) not in ids}
        self._host = [h for h in self._host if id(h[0]) not in ids]

    def held(self) -> tuple:
        """This step's copies and what they belong to, for :meth:`hold` (a captured step keeps those its graph
        writes, since an eager step in between takes copies of its own)."""
        return self._tensors, self._buffers, self._owners, self._keys, self._params, self._host

    def hold(self, held: tuple) -> None:
        """Take :meth:`held`'s copies back as this step's (the replay of a graph refreshed them)."""
        self._tensors, self._buffers, self._owners, self._keys, self._params, self._host = held
        self._pending = False

    def copies_of(self, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The copies of ``params`` taken in this step, where they are kept on the parameters' device (read
        them, never write them); None otherwise."""
        copies = {id(t): b for t, b in zip(self._tensors, self._buffers) if b.device == t.device}
        try:
            return [copies[id(p)] for p in params]
        except KeyError:
            return None

    def wait(self) -> None:
        """Make the current stream wait for the device-to-host copies (before anything changes the weights)."""
        if self._pending:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
            self._pending = False

    def restore(self, inner: Optimizer | None, host: bool = True, only: list[torch.Tensor] | None = None) -> None:
        """Write the copies back: of every parameter copied in this step, or of those in ``only`` (the layers
        ``check_finite="layer"`` undoes), with their inner state."""
        self.wait()
        ids = None if only is None else {id(p) for p in only}
        pairs = [(t, b) for t, b, o in zip(self._tensors, self._buffers, self._owners) if ids is None or id(o) in ids]
        with torch.no_grad():
            if pairs and pairs[0][1].device != pairs[0][0].device:
                for t, b in pairs:  # from pinned host memory
                    t.copy_(b)
            elif pairs:  # none where a step copying layer by layer failed before its first solve
                torch._foreach_copy_([t for t, _ in pairs], [b for _, b in pairs])
        if inner is None:
            return
        for p in self._params:
            if ids is not None and id(p) not in ids:
                continue
            if p not in self._keys:
                inner.state.pop(p, None)
                continue
            st = inner.state[p]
            for k in [k for k in st if k not in self._keys[p]]:
                del st[k]
        if host:
            for p, st, k, v in self._host:
                if ids is not None and id(p) not in ids:
                    continue
                if torch.is_tensor(v) and torch.is_tensor(st.get(k)):
                    st[k].copy_(v)
                else:
                    st[k] = v
