"""Step time, peak memory and the matrix-product floor of every optimizer (issue: a LocoProp step at the
speed of its matrix products; paper Table 1 and Sec. 3.4).

For each (model, batch size, optimizer, T) it times the median of many steps after warm-up (CUDA events
on a GPU, ``time.perf_counter`` on the CPU), records the peak memory (``torch.cuda.max_memory_allocated``
on a GPU; on the CPU the peak resident set of a fresh process running only that configuration, minus the
process's resident set before the optimizer's first step; and, on the CPU, ``peak_tensor_mb``: the peak
of the tensors alive during one more step, from PyTorch's profiler memory timeline, which counts what
the step allocates and every tensor it touches, exactly, where the resident set also holds allocator
slack), and computes the FLOP floor from the layer shapes and the matrix-product rate measured on the
same machine:

* BackProp: 3 products per layer (forward, backward to the input, backward to the weights);
* LocoProp with T local iterations: those 3 plus 2 per layer per local iteration (at the rate of the
  local precision: fp32, tf32 or bf16).

The forward and backward products are priced at the FP32 rate, except in TF32 rows, whose floor is the issue's
TF32 floor ("with TF32 allowed"): every product at the TF32 rate (``floor_pass_precision``; until session 30 a TF32
row priced the pass at the FP32 rate, ``floor_ms_pass_fp32``, and ran it in FP32).

``shape_floor_ms`` is a second floor: the same products, each timed alone at its own shape and precision
(:func:`shape_floor`) and summed, since small products run below the large-square rate; a step that runs
layers side by side on streams can beat it.

Modes: BackProp with SGD, Adam and TF-RMSProp runs ``eager``, ``compiled`` (forward, backward and update
through ``torch.compile``) and, on a GPU, ``graph`` (forward, backward and update captured in one CUDA
graph, Adam with ``capturable=True``: the fair comparison for a graph-captured LocoProp step); Shampoo
runs ``eager`` (the library's Newton roots) and ``eager-eigh`` (``shampoo_root="eigh"``).  LocoProp
runs ``reference`` (the readable loop), ``fused`` (what ``LocoProp`` does by default on CUDA: the
layer-parallel solver with its solve captured in a CUDA graph)
and, on a GPU, ``graphed`` (:meth:`locoprop.LocoProp.graphed_step`, the whole step in one graph);
``-nocheck`` is the same with ``check_finite=False`` (no rollback copies: the memory they cost), ``-host``
with ``rollback="host"`` (the copies in pinned host memory, made during the forward and backward passes),
``-sN`` with at most N layer streams (``-s0``: none), ``-compiled`` with ``compile_elementwise``, ``-iter``
with ``solve_order="iteration-major"`` (iteration k of every layer, then one multi-tensor update),
``-recompute`` (LocoProp-M keeping each layer's pre-activation and first residual, as before session 21,
instead of its transfer module's output: what the kept outputs save), ``-afterbackward`` (every layer
solved after the backward pass, as before session 22, instead of each during it where the step allows:
``solve_in_backward``, what that saves), ``-inbackward`` (solved during it also without the finite check, and
on CUDA, each layer's solve launched eagerly on the pass's stream: ``solve_in_backward=True``), ``-wholecopy``
(solving during the backward pass, ``check_finite``'s copy of every layer taken before the forward pass into
buffers kept between steps, as before session 23, instead of each layer's just before its solve),
``-layercheck`` (``check_finite="layer"``: each layer's update checked as its solve ends and its copy let go,
where the layers are solved during the backward pass: one layer's copy at a time),
``-freeatend`` (those layer-by-layer copies let go when their step ends rather than when the next one starts:
what that costs in time; not in the plan), ``-nograph`` (with ``fused``: the
solve launched eagerly, not captured; not in the plan, for ``benchmarks/step_profile.py``), ``-plain``
(TF32 and bf16: plain products ``x Wᵀ`` instead of the update form ``a₀ + x (W - W₀)ᵀ + (b - b₀)``, to time
what that form costs), ``-recomputef`` (bf16, TF32 on CUDA: ``f(â)`` evaluated again for the target and the
first residual, as before session 25, instead of read from the layer's output kept beside ``â``) and
``-exacttanh`` (bf16 on the CPU: the local iterations' tanh by ``torch.tanh``, as before session 25, instead of
``2σ(2a) - 1``) and ``-localtf32`` (TF32 on CUDA: TF32 in the local products alone, the forward and backward
pass in FP32, as the TF32 rows of sessions 10 to 30 were; a TF32 row without it runs the whole step with TF32
allowed, the issue's TF32 goal, and so does BackProp's ``graph`` row in TF32), ``-nochange`` (TF32 and bf16 on
CUDA: the update form's weight change ``W - W₀``, ``b - b₀`` by three launches of its own per layer and
iteration, as before session 30, instead of written by the Triton update kernel and the bias's added by the
residual kernel) and ``-overlap`` (CUDA: ``solve_in_backward="overlap"``, each layer's chain on its layer stream
as soon as the backward pass is done with its weights, beside the rest of the pass; with ``graphed``, inside its
one graph) and ``-grouped`` (CUDA: ``solve_order="grouped"``, iteration k of every layer in two Triton launches,
the products inside the kernels with the residual and the update applied to their tiles; ``-grouped-tf32x3``: its
FP32 products emulated by three TF32 products on the tensor cores). On a GPU each configuration starts with cuBLAS's workspaces freed, so its peak counts the workspaces of the
streams it uses (one per stream: 32 MiB on Hopper; ``cublas_workspace_mb`` and ``streams`` in the
record, ``peak_mem_mb_without_workspaces``).  The peak is split too: ``peak_mem_mb_warmup`` (the warm-up calls: eager
steps and, for ``graphed``, the CUDA graph's capture), ``peak_mem_mb_steady`` (the timed calls),
``mem_mb_held_after`` (allocated after them: model, optimizer state, graph buffers) and ``memory_by_pool``
(the caching allocator's memory by pool and stream, :func:`memory_by_pool`: which of it the graphs' private
pools and the layer streams hold).  The compiled modes run after all others, so that their
first compilation does not use up a ``--deadline-s`` meant for the rest.

It writes ``results/perf/DEVICE-DATE.json`` (a list of records with ``device``, ``model``, ``optimizer``,
``local_steps``, ``batch_size``, ``step_ms_median``, ``peak_mem_mb``, ``floor_ms``, ...) and prints a table.

    python benchmarks/step_time.py --models standard --batch-sizes 100 1000
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from locoprop.fused import capturing_graph, graph_side_stream
from locoprop.precision import float32_products, set_cuda_matmul_tf32
from locoprop.harness.models import AutoencoderLoss, build_autoencoder
from locoprop.harness.optimizers import build_optimizer
from locoprop.harness.records import processor, write_records

# (harness name, settings); LocoProp entries are expanded over --local-steps.
OPTIMIZERS = {
    "sgd": dict(lr=1e-3),
    "adam": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8),
    "rmsprop": dict(lr=1e-3, beta1=0.9, beta2=0.9, eps=1e-8),
    "locoprop-s": dict(lr=1e-4, activation_lr=10.0, beta1=0.9, beta2=0.9, eps=1e-8),
    "locoprop-m": dict(lr=1e-4, activation_lr=10.0, beta1=0.9, beta2=0.9, eps=1e-8),
    "shampoo": dict(lr=1e-3, beta1=0.9),
    "kfac": dict(lr=1e-3, beta1=0.9, damping=1e-2),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def matmul_rate(device: torch.device, dtype=torch.float32, n: int | None = None, reps: int = 10,
                min_s: float = 0.5) -> float:
    """Measured FLOP/s of a large square matrix product on ``device`` (4096² on a GPU; on the CPU 2048² in
    float32 and 1024² in bfloat16, which a CPU without bf16 instructions multiplies hundreds of times slower):
    up to ``reps`` products after the warm-up, fewer once ``min_s`` seconds have passed."""
    cuda = device.type == "cuda"
    n = n or (4096 if cuda else 2048 if dtype == torch.float32 else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3 if cuda else 1):
        a @ b
    sync(device)
    done, t0 = 0, time.perf_counter()
    while done < reps and (done == 0 or time.perf_counter() - t0 < min_s):
        a @ b
        sync(device)
        done += 1
    return 2 * n ** 3 * done / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn, device: torch.device, warmup: int, reps: int, after_warmup=None):
    """``(milliseconds of each of the last reps calls, the last call's result)`` of ``warmup + reps`` calls of
    ``fn()``, each timed alone (CUDA events and a synchronize on a GPU, ``time.perf_counter`` on the CPU);
    ``after_warmup()``, if given, runs between the warm-up calls and the timed ones."""
    times, result = [], None
    for i in range(warmup + reps):
        if i == warmup and after_warmup is not None:
            after_warmup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            result = fn()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return times, result


def _time_ms(fn, device: torch.device, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` after 3 warm-up calls."""
    return statistics.median(timed_calls(fn, device, 3, reps)[0])


def shape_floor(model: torch.nn.Module, batch: int, precision: str, device: torch.device) -> dict:
    """The floor from the products' own shapes: each product of one step timed alone, one after another.

    ``{"backprop_ms": ..., "iteration_ms": ...}``: the 3 products per layer of the forward and backward pass
    (FP32; TF32 for ``precision="tf32"``, whose rows allow TF32 in the whole step), and the 2 per layer of one
    local iteration (pre-activation ``x Wᵀ + b`` and weight gradient
    ``δᵀ x``) in ``precision``.  Where the large-square rate of :func:`matmul_rate` overstates what the
    layers' small products reach, this is the fairer floor; layer streams can beat it by running products
    side by side."""
    backprop = iteration = 0.0
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        x = torch.randn(batch, m.in_features, device=device)
        g = torch.randn(batch, m.out_features, device=device)
        W = torch.randn(m.out_features, m.in_features, device=device)
        bias = torch.randn(m.out_features, device=device)
        with float32_products(precision == "tf32"):  # a TF32 row's whole step runs with TF32 allowed
            backprop += _time_ms(lambda: torch.addmm(bias, x, W.T), device)  # forward
            backprop += _time_ms(lambda: g @ W, device)  # backward to the input
            backprop += _time_ms(lambda: g.T @ x, device)  # backward to the weights
        xl, gl, Wl = x.to(dtype), g.to(dtype), W.to(dtype)
        with float32_products(precision == "tf32"):
            iteration += _time_ms(lambda: xl @ Wl.T, device) + _time_ms(lambda: gl.T @ xl, device)
    return {"backprop_ms": backprop, "iteration_ms": iteration}


def product_flops(model: torch.nn.Module, batch: int, local_steps: int, locoprop: bool) -> float:
    """FLOPs of the matrix products of one step (see the module docstring)."""
    flops = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            one = 2.0 * batch * m.in_features * m.out_features
            flops += 3 * one + (2 * local_steps * one if locoprop else 0.0)
    return flops


def _backprop_optimizer(name: str, params, kwargs: dict, capturable: bool = False) -> torch.optim.Optimizer:
    """The torch optimizer of a BackProp baseline (TF-RMSProp from :mod:`locoprop.inner`, as the harness uses)."""
    from locoprop.inner import TFRMSprop

    if name == "sgd":
        return torch.optim.SGD(params, lr=kwargs["lr"])
    if name == "adam":
        return torch.optim.Adam(params, lr=kwargs["lr"], betas=(kwargs["beta1"], kwargs["beta2"]), eps=kwargs["eps"],
                                capturable=capturable, foreach=True)
    if name == "rmsprop":
        return TFRMSprop(params, lr=kwargs["lr"], momentum=kwargs["beta1"], alpha=kwargs["beta2"], eps=kwargs["eps"])
    raise ValueError(f"no graphed or compiled BackProp step for {name!r}")


def _graphed_backprop(model, loss_fn, name: str, kwargs: dict, x: torch.Tensor):
    """BackProp + a torch optimizer with forward, backward and update captured in one CUDA graph."""
    opt = _backprop_optimizer(name, list(model.parameters()), kwargs, capturable=True)

    def body():
        loss = loss_fn(model(x), x)
        loss.backward()
        opt.step()
        return loss

    side = graph_side_stream(x.device)  # LocoProp's own: the same cuBLAS workspaces on both sides
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with capturing_graph(graph, stream=side):
        static_loss = body()

    def step():
        graph.replay()
        return static_loss
    return step


def _compiled_backprop(model, loss_fn, name: str, kwargs: dict, x: torch.Tensor):
    """BackProp + a torch optimizer with ``torch.compile``: the forward pass (and through AOTAutograd its
    backward) and the optimizer's update each compiled, the way PyTorch's tutorials compile a training
    step.  The first calls compile (the benchmark's warm-up steps)."""
    opt = _backprop_optimizer(name, list(model.parameters()), kwargs)
    forward = torch.compile(lambda: loss_fn(model(x), x))
    update = torch.compile(opt.step)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        update()
        return loss.detach()
    return step


#: Mode flags that choose the inner optimizer (the default is TF-RMSProp): ``reference-adam``, ``graphed-adam``...
INNER_FLAGS = {"adam": "adam", "adagrad": "adagrad", "torchrmsprop": "rmsprop"}


def build_step(spec: dict, model, loss_fn, x):
    """A zero-argument callable that runs one step of the configuration in ``spec``."""
    name, mode = spec["optimizer"], spec["mode"]
    kwargs = dict(OPTIMIZERS[name])
    if name.startswith("locoprop"):
        kwargs["local_steps"] = spec["local_steps"]
        kwargs["precision"] = spec["precision"]
        mode, *flags = mode.split("-")
        inner = [INNER_FLAGS[f] for f in flags if f in INNER_FLAGS]
        if inner:  # another inner optimizer than TF-RMSProp, with the configuration's β1, β2, ε
            kwargs["inner"] = inner[0]
        kwargs["rollback"] = "host" if "host" in flags else "device"  # the rollback copies in pinned host memory
        kwargs["compile_elementwise"] = "compiled" in flags  # δ + Σδ and the update fused by torch.compile
        opt = build_optimizer(name, model, loss_fn, **kwargs)
        for flag in flags:
            if flag == "nocheck":  # without check_finite's rollback copies (memory)
                opt.check_finite = False
            elif flag == "recompute":  # LocoProp-M keeps â and δ₀, not the layers' outputs (before session 21)
                opt._shares_post = lambda: False
            elif flag == "recomputef":  # f(â) evaluated again for the target and first residual where the products
                opt._reads_post_beside_pre = lambda: False  # round, not read from ŷ (before session 25)
            elif flag == "exacttanh":  # the local iterations' tanh by torch.tanh on the CPU in bf16 (before session 25)
                opt.fused_solver.quick_transfers = False
            elif flag == "afterbackward":  # every layer solved after the backward pass (before session 22)
                opt.solve_in_backward = False
            elif flag == "inbackward":  # layers solved during the backward pass also without check_finite
                opt.solve_in_backward = True
            elif flag == "wholecopy":  # check_finite's copy of every layer before the forward pass (session 22)
                opt._rollback.copies_layer_by_layer = lambda device: False  # the path of rollback="host" on CUDA
            elif flag == "layercheck":  # each layer undone alone if its update is not finite; copies let go
                opt.check_finite = "layer"
            elif flag == "freeatend":  # the layer-by-layer copies let go when their step ends, not the next starts
                pass
            elif flag == "newdenominators":  # TF-RMSProp's denominators as new tensors (before session 29)
                opt.fused_solver.denominators_in_residual = False
            elif flag == "nochange":  # the update form's W - W₀, b - b₀ by launches of their own (before session 30)
                opt.fused_solver.change_in_update = False
            elif flag == "overlap":  # each layer solved in the pass on its layer stream, beside the pass's rest
                opt.solve_in_backward = "overlap"
            elif flag.startswith("s") and flag[1:].isdigit():  # at most N layer streams (s0: none)
                opt.fused_solver.layer_streams = int(flag[1:]) or False
            elif flag == "iter":  # iteration k of every layer, then one multi-tensor update (solve_order)
                opt.fused_solver.order = "iteration-major"
            elif flag == "grouped":  # iteration k of every layer in two Triton launches (solve_order, session 32)
                opt.fused_solver.order = "grouped"
            elif flag == "tf32x3":  # the grouped order's float32 products as three TF32 products (tensor cores)
                opt.fused_solver.grouped_fp32_products = "tf32x3"
            elif flag == "nograph":  # the fast solver launched eagerly (a profile sees every kernel)
                opt.fused_solver.cuda_graph = False
            elif flag == "plain":  # reduced-precision products x Wᵀ, not the update form (what that form costs)
                opt.fused_solver.rounds_products = lambda cuda: False
            elif flag == "notriton":  # PyTorch's operations, not the Triton kernels (triton_elementwise=False)
                opt.fused_solver.triton_elementwise = False
            elif flag == "tritonupdate":  # the Triton update kernel only; δ and Σδ by PyTorch's operations
                opt.fused_solver.triton_kernels = frozenset({"update"})
            elif flag == "localtf32":  # TF32 in the local products only (measure: the pass in FP32)
                pass
            elif flag not in ("host", "compiled", *INNER_FLAGS):
                raise ValueError(f"unknown mode flag {flag!r}")
        opt.backend = {"reference": "reference", "fused": "fused", "graphed": "auto"}[mode]
        if mode == "graphed":
            return opt.graphed_step(lambda: loss_fn(model(x), x))  # a CapturedStep: has .optimizer

        def step():
            loss = opt.step(lambda: loss_fn(model(x), x))
            if "freeatend" in flags:
                opt._rollback.begin_layer_by_layer()  # lets this step's copies go
            return loss
        step.optimizer = opt
        return step
    if mode == "graph":
        return _graphed_backprop(model, loss_fn, name, kwargs, x)
    if mode == "compiled":
        return _compiled_backprop(model, loss_fn, name, kwargs, x)
    if mode == "eager-eigh":  # Shampoo with the exact eigendecomposition roots (shampoo_root="eigh")
        kwargs["shampoo_root"] = "eigh"
    elif mode != "eager":
        raise ValueError(f"unknown mode {mode!r} for {name}")
    opt = build_optimizer(name, model, loss_fn, **kwargs)
    return lambda: opt.step(lambda: loss_fn(model(x), x))


def elementwise_kind(solver, device: torch.device) -> str:
    """How the fast solver ran its elementwise work (the update, ``δ`` and ``Σδ``): ``compiled``
    (compile_elementwise), ``triton`` (triton_elementwise's kernels), ``triton:grouped`` (the grouped order's two
    kernels an iteration, products inside them; ``-tf32x3`` with its FP32 products on the tensor cores) or
    ``torch`` (PyTorch's operations)."""
    if solver.compile_elementwise:
        return "compiled"
    if solver.solve_order == "grouped":  # the order the last solve ran in (a fallback says layer-major)
        return "triton:grouped" + ("-tf32x3" if solver.grouped_fp32_products == "tf32x3" else "")
    if not solver.uses_triton(device):
        return "torch"
    kernels = sorted(solver.triton_kernels)
    return "triton" if kernels == ["residual", "update"] else "triton:" + ",".join(kernels)


def free_cublas_workspaces(device: torch.device) -> None:
    """Return cuBLAS's per-stream workspaces (and the cached blocks) to the device."""
    torch.cuda.synchronize(device)
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()


def cublas_workspace_mb(device: torch.device) -> float:
    """Memory cuBLAS takes for its workspace on a stream (it keeps one per stream), measured."""
    free_cublas_workspaces(device)
    a = torch.ones(64, 64, device=device)
    before = torch.cuda.memory_allocated(device)
    c = a @ a
    torch.cuda.synchronize(device)
    return (torch.cuda.memory_allocated(device) - before - c.numel() * c.element_size()) / 2 ** 20


def memory_by_pool(segments: list[dict]) -> list[dict]:
    """The CUDA caching allocator's memory by pool and stream, from ``torch.cuda.memory_snapshot()``'s segments:
    the default pool (per stream: a block freed on one stream is not reused on another) and each CUDA graph's
    private pool, which keeps what the captured step allocated.  One row per (pool, stream) with its
    segments, reserved and allocated MiB, largest first."""
    rows: dict = {}
    for seg in segments:
        pool = tuple(seg.get("segment_pool_id") or (0, 0))
        key = ("default" if pool == (0, 0) else f"graph pool {pool[0]},{pool[1]}", seg.get("stream", 0))
        row = rows.setdefault(key, {"pool": key[0], "stream": key[1], "segments": 0, "reserved_mb": 0.0,
                                    "allocated_mb": 0.0})
        row["segments"] += 1
        row["reserved_mb"] += seg["total_size"] / 2 ** 20
        row["allocated_mb"] += seg["allocated_size"] / 2 ** 20
    return sorted(rows.values(), key=lambda r: -r["reserved_mb"])


def peak_tensor_bytes(step) -> int:
    """Peak bytes of the CPU tensors alive during ``step()`` (allocated by it or touched by it), from the
    profiler's memory timeline (``torch.profiler._memory_profiler``, a private API: a benchmark tool)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return max(sum(s) for s in sizes) if sizes else 0


def measure(spec: dict) -> dict:
    """Run one configuration (in its own process on the CPU) and return its record."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cuda":  # FP32 means FP32; a TF32 row's whole step with TF32 allowed, as the TF32
        # goal is stated ("with TF32 allowed"), unless -localtf32 (the local products alone: sessions 10 to 30)
        set_cuda_matmul_tf32(spec["precision"] == "tf32" and "localtf32" not in spec["mode"].split("-"))
        gc.collect()
        free_cublas_workspaces(device)  # each configuration pays for the workspaces of its streams
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = build_autoencoder(spec["model"], "tanh", device=device)
    loss_fn = AutoencoderLoss()
    x = torch.rand(spec["batch_size"], 784, device=device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = build_step(spec, model, loss_fn, x)
    warmup_peak = []

    def between():  # the warm-up's peak (eager steps, CUDA graph capture), then the steady steps' own
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            warmup_peak.append((torch.cuda.max_memory_allocated(device) - base) / 2 ** 20)
            torch.cuda.reset_peak_memory_stats(device)

    times, loss = timed_calls(step, device, spec["warmup"], spec["steps"], between)
    if not math.isfinite(float(loss)):
        raise RuntimeError(f"the loss is {float(loss)}")
    tensors = None
    extra = {}
    if device.type == "cuda":
        steady = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        peak = max(warmup_peak + [steady])
        solver = getattr(getattr(step, "optimizer", None), "fused_solver", None)
        layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        streams = 1 + (solver.stream_count(layers) if solver is not None and spec["mode"] != "reference"
                       and solver.solve_order != "grouped" else 0)  # the grouped order: the current stream alone
        extra = {"streams": streams, "elementwise": elementwise_kind(solver, device) if solver is not None else None,
                 "cublas_workspace_mb": spec["workspace_mb"],
                 "peak_mem_mb_without_workspaces": peak - streams * spec["workspace_mb"],
                 "peak_mem_mb_warmup": warmup_peak[0] if warmup_peak else None, "peak_mem_mb_steady": steady,
                 "mem_mb_held_after": (torch.cuda.memory_allocated(device) - base) / 2 ** 20,
                 "memory_by_pool": memory_by_pool(torch.cuda.memory_snapshot())}
    else:  # ru_maxrss is in KiB on Linux
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        tensors = peak_tensor_bytes(step) / 2 ** 20
    locoprop = spec["optimizer"].startswith("locoprop")
    T = spec["local_steps"] or 0
    bp_flops = product_flops(model, spec["batch_size"], 0, False)
    local_flops = product_flops(model, spec["batch_size"], T, locoprop) - bp_flops
    rates = spec["rates"]
    # the floors: FP32 prices every product at the FP32 rate, TF32 ("with TF32 allowed") every product at
    # the TF32 rate; bf16 the forward and backward pass at the FP32 rate (the model's own products)
    pass_precision = "tf32" if spec["precision"] == "tf32" else "fp32"
    floor = bp_flops / rates[pass_precision] + local_flops / rates[spec["precision"]]
    if pass_precision == "tf32":  # the floor of sessions 10 to 30's TF32 rows: the pass at the FP32 rate
        extra["floor_ms_pass_fp32"] = (bp_flops / rates["fp32"] + local_flops / rates["tf32"]) * 1e3
    shapes = spec.get("shape_floor")
    if shapes is not None:
        extra["shape_floor_ms"] = shapes["backprop_ms"] + (T * shapes["iteration_ms"] if locoprop else 0.0)
    return {
        "device": spec["device_name"], "model": spec["model"], "optimizer": spec["optimizer"],
        "local_steps": spec["local_steps"], "batch_size": spec["batch_size"], "mode": spec["mode"],
        "precision": spec["precision"],
        "step_ms_median": statistics.median(times), "step_ms_min": min(times), "steps_timed": len(times),
        "peak_mem_mb": peak, "peak_mem_kind": "cuda max_memory_allocated during the steps (model, data, state, "
        "graphs)" if device.type == "cuda" else "CPU peak RSS growth of a fresh process during the steps",
        "peak_tensor_mb": tensors, **extra,
        "product_gflop": (bp_flops + local_flops) / 1e9, "floor_ms": floor * 1e3,
        "floor_pass_precision": pass_precision,
    }


def plan(device: torch.device, models, batches, optimizers, local_steps, precisions) -> list[dict]:
    """The configurations, most important first: (model, batch, optimizer, T, mode, precision)."""
    cuda = device.type == "cuda"
    out, late = [], []  # late: the compiled modes, after every model (their first compilation is slow)
    for model in models:
        for batch in batches:
            for opt in optimizers:
                if opt.startswith("locoprop"):
                    for T in local_steps:
                        modes = ["fused", "graphed"] if cuda else ["fused"]
                        if T == max(local_steps):
                            modes = ["reference"] + modes
                        for mode in modes:
                            out.append((model, batch, opt, T, mode, "fp32"))
                        if opt == "locoprop-m" and T == max(local_steps):
                            fast = "graphed" if cuda else "fused"
                            out.append((model, batch, opt, T, f"{fast}-iter", "fp32"))
                            out.append((model, batch, opt, T, f"{fast}-nocheck", "fp32"))
                            out.append((model, batch, opt, T, f"{fast}-nocheck-recompute", "fp32"))
                            if cuda:  # solved in the pass: each layer eagerly (a captured step solves after it)
                                for flags in ("inbackward", "inbackward-host", "nocheck-inbackward",
                                              "inbackward-layercheck"):
                                    out.append((model, batch, opt, T, f"fused-{flags}", "fp32"))
                            else:  # and the copy taken layer by layer, where layers are solved in the pass
                                for flags in ("afterbackward", "nocheck-inbackward", "wholecopy", "layercheck"):
                                    out.append((model, batch, opt, T, f"fused-{flags}", "fp32"))
                                out.append((model, batch, opt, T, "reference-layercheck", "fp32"))  # the default loop
                            out.append((model, batch, opt, T, f"{fast}-iter-nocheck", "fp32"))
                            for inner in ("adam", "adagrad"):  # the fast path of torch's inner optimizers
                                out.append((model, batch, opt, T, f"reference-{inner}", "fp32"))
                                out.append((model, batch, opt, T, f"{fast}-{inner}", "fp32"))
                                late.append((model, batch, opt, T, f"{fast}-{inner}-compiled", "fp32"))
                            late.append((model, batch, opt, T, f"{fast}-compiled", "fp32"))
                            late.append((model, batch, opt, T, f"{fast}-iter-compiled", "fp32"))
                            if cuda:
                                for flags in ("notriton", "tritonupdate", "iter-notriton", "iter-s0", "host", "s0", "s2", "s4",
                                              "host-s2", "host-s0", "host-s0-recompute", "overlap", "overlap-nocheck",
                                              "grouped", "grouped-nocheck", "grouped-tf32x3"):
                                    out.append((model, batch, opt, T, f"graphed-{flags}", "fp32"))
                                late.append((model, batch, opt, T, "graphed-compiled-s2", "fp32"))
                            for prec in precisions:
                                if prec != "fp32":
                                    out.append((model, batch, opt, T, fast, prec))
                                    out.append((model, batch, opt, T, f"{fast}-plain", prec))
                                    if cuda:  # the weights' change by launches of their own, not the kernels
                                        out.append((model, batch, opt, T, f"{fast}-nochange", prec))
                                    if cuda and prec == "tf32":  # the forward and backward pass in FP32
                                        out.append((model, batch, opt, T, f"{fast}-localtf32", prec))
                                    if cuda:  # two Triton launches per local iteration for all layers
                                        out.append((model, batch, opt, T, f"{fast}-grouped", prec))
                                    out.append((model, batch, opt, T, f"{fast}-recomputef", prec))
                                    if not cuda:  # all layers' problems at once, with f(â) read or evaluated
                                        for flags in ("afterbackward", "afterbackward-recomputef"):
                                            out.append((model, batch, opt, T, f"fused-{flags}", prec))
                                        out.append((model, batch, opt, T, "fused-layercheck", prec))  # one copy
                                        if prec == "bf16":
                                            out.append((model, batch, opt, T, "fused-exacttanh", prec))
                                    out.append((model, batch, opt, T, f"{fast}-iter", prec))
                                    late.append((model, batch, opt, T, f"{fast}-compiled", prec))
                                    late.append((model, batch, opt, T, f"{fast}-iter-compiled", prec))
                elif opt in ("sgd", "adam", "rmsprop"):
                    for mode in (["eager", "graph"] if cuda else ["eager"]):
                        out.append((model, batch, opt, 0, mode, "fp32"))
                    if cuda and "tf32" in precisions:  # the whole BackProp step with TF32 allowed
                        out.append((model, batch, opt, 0, "graph", "tf32"))
                    late.append((model, batch, opt, 0, "compiled", "fp32"))
                else:
                    for mode in (["eager", "eager-eigh"] if opt == "shampoo" else ["eager"]):
                        out.append((model, batch, opt, 0, mode, "fp32"))
    return out + late


def select_modes(configs: list[tuple], modes: list[str] | None) -> list[tuple]:
    """The configurations of :func:`plan` whose mode is one of ``modes`` (all of them for ``None``); an unknown
    mode is a ``ValueError`` naming ``--modes`` and the modes the plan has."""
    if not modes:
        return configs
    known = sorted({c[4] for c in configs})
    unknown = [m for m in modes if m not in known]
    if unknown:
        raise ValueError(f"--modes: {unknown} are not in this plan; its modes are {known}")
    return [c for c in configs if c[4] in modes]


def select_precisions(configs: list[tuple], precisions: list[str]) -> list[tuple]:
    """The configurations of :func:`plan` in one of ``precisions``: LocoProp's FP32 rows only where ``fp32`` is
    asked for (the FP32 BackProp baselines, the yardstick of every ratio, stay)."""
    return [c for c in configs if c[5] in precisions or (not c[2].startswith("locoprop") and c[5] == "fp32")]


def _worker(spec, queue):
    try:
        queue.put(measure(spec))
    except Exception as exc:  # report, do not hide
        queue.put({"error": f"{type(exc).__name__}: {exc}", **{k: spec[k] for k in (
            "model", "optimizer", "batch_size", "local_steps", "mode", "precision")}})


def write_results(out: Path, meta: dict, records: list[dict]) -> None:
    """Add the ratios to each record (to the BackProp + RMSProp step, eager and compiled, and to the BackProp +
    Adam memory, of the same model, batch and repetition) and write ``{"meta", "records"}`` to ``out``
    atomically."""
    ok = [r for r in records if "error" not in r and "skipped" not in r]

    def key_of(r):  # ratios compare configurations of the same model, batch and repetition
        return r["model"], r["batch_size"], r.get("repeat", 0)

    base = {key_of(r): r for r in ok if r["optimizer"] == "rmsprop" and r["mode"] == "eager"}
    compiled = {key_of(r): r for r in ok if r["optimizer"] == "rmsprop" and r["mode"] == "compiled"}
    adam = {key_of(r): r for r in ok if r["optimizer"] == "adam" and r["mode"] == "eager"}
    for r in ok:
        r["ratio_to_floor"] = r["step_ms_median"] / r["floor_ms"]
        if r.get("shape_floor_ms"):
            r["ratio_to_shape_floor"] = r["step_ms_median"] / r["shape_floor_ms"]
        key = key_of(r)
        if key in base:
            r["ratio_to_rmsprop"] = r["step_ms_median"] / base[key]["step_ms_median"]
        if key in compiled:
            r["ratio_to_rmsprop_compiled"] = r["step_ms_median"] / compiled[key]["step_ms_median"]
        if key in adam and adam[key]["peak_mem_mb"] > 0:
            r["mem_ratio_to_adam"] = r["peak_mem_mb"] / adam[key]["peak_mem_mb"]
        if key in adam and r.get("peak_tensor_mb") and adam[key].get("peak_tensor_mb"):
            r["tensor_mem_ratio_to_adam"] = r["peak_tensor_mb"] / adam[key]["peak_tensor_mb"]
    write_records(out, meta, records)


def arguments() -> argparse.ArgumentParser:
    """The command line (``benchmarks/device_call.sh``'s commands are checked against it by a test)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["standard"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[100, 1000])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    p.add_argument("--local-steps", nargs="+", type=int, default=[1, 5, 10])
    p.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"],
                   help="LocoProp-M at the largest T is also timed in these local-product precisions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole plan this many times, one pass after another (records carry 'repeat'; "
                        "ratios compare rows of the same pass), to see the run-to-run variation")
    p.add_argument("--modes", nargs="+", default=None,
                   help="time only these modes of the plan (e.g. eager graph graphed graphed-iter); default all")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no new configuration after this many seconds (the rest are listed as skipped)")
    p.add_argument("--out", default=None, help="JSON file (default results/perf/DEVICE-DATE.json)")
    return p


def main(argv=None) -> int:
    p = arguments()
    args = p.parse_args(argv)

    started = time.perf_counter()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        set_cuda_matmul_tf32(False)
    rates = {"fp32": matmul_rate(device)}
    if device.type == "cuda":
        with float32_products(True):
            rates["tf32"] = matmul_rate(device)
    else:
        rates["tf32"] = rates["fp32"]  # TF32 is a CUDA mode: the CPU computes FP32
    rates["bf16"] = matmul_rate(device, torch.bfloat16)
    workspace_mb = cublas_workspace_mb(device) if device.type == "cuda" else 0.0
    name = device_name(device)
    date = datetime.date.today().isoformat()
    out = Path(args.out or f"results/perf/{name.replace(' ', '-')}-{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python"] + sys.argv), "date": date, "device": name, "processor": processor(),
            "torch": torch.__version__,
            "matmul_tflops": {k: v / 1e12 for k, v in rates.items()}, "threads": args.threads,
            "floor": "products of forward+backward (3 per layer) at the fp32 rate plus 2 per layer per local "
                     "iteration at the rate of the local precision; rates measured here on 4096^2 products",
            "shape_floor": "the same products, each timed alone at its own shape and precision, summed"}
    print(json.dumps({"meta": meta}), flush=True)
    records = []
    ctx = mp.get_context("spawn")
    floors: dict = {}  # (model, batch, precision) -> shape_floor(...)
    configs = plan(device, args.models, args.batch_sizes, args.optimizers, args.local_steps, args.precisions)
    try:
        configs = select_precisions(select_modes(configs, args.modes), args.precisions)
    except ValueError as exc:
        p.error(str(exc))
    for repeat, (model, batch, opt, T, mode, prec) in [(i, c) for i in range(args.repeat) for c in configs]:
        if (model, batch, prec) not in floors and not (args.deadline_s is not None and
                                                       time.perf_counter() - started > args.deadline_s):
            floors[model, batch, prec] = shape_floor(build_autoencoder(model, "tanh", device=device), batch, prec,
                                                     device)
        spec = dict(device=args.device, device_name=name, model=model, batch_size=batch, optimizer=opt,
                    local_steps=T, mode=mode, precision=prec, steps=args.steps, warmup=args.warmup, rates=rates,
                    threads=args.threads, workspace_mb=workspace_mb, shape_floor=floors.get((model, batch, prec)))
        if args.deadline_s is not None and time.perf_counter() - started > args.deadline_s:
            rec = {"skipped": f"deadline of {args.deadline_s} s", **{k: spec[k] for k in (
                "model", "optimizer", "batch_size", "local_steps", "mode", "precision")}}
        elif device.type == "cpu":  # a fresh process per configuration, for its peak RSS
            q = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(spec, q))
            proc.start()
            rec = q.get()
            proc.join()
        else:
            try:
                rec = measure(spec)
            except Exception as exc:  # report, do not hide
                rec = {"error": f"{type(exc).__name__}: {exc}", **{k: spec[k] for k in (
                    "model", "optimizer", "batch_size", "local_steps", "mode", "precision")}}
        if args.repeat > 1:
            rec["repeat"] = repeat
        records.append(rec)
        print(json.dumps(rec), flush=True)
        write_results(out, meta, records)  # after every record, so that a command killed at its limit keeps them
    write_results(out, meta, records)
    print(f"\n{name}; product rates (TFLOP/s): " + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in rates.items())
          + f"; written {out}\n")
    print(f"{'model':9} {'batch':>5} {'optimizer':11} {'T':>2} {'mode':9} {'prec':5} {'step ms':>9} {'floor ms':>9} "
          f"{'x floor':>7} {'x rmsprop':>9} {'peak MB':>8} {'x adam':>6} {'tensor MB':>9} {'x adam':>6} "
          f"{'shape floor':>11} {'x shape':>7}")
    for r in records:
        head = f"{r['model']:9} {r['batch_size']:>5} {r['optimizer']:11} {r['local_steps']:>2} {r['mode']:9} " \
               f"{r['precision']:5}"
        if "error" in r or "skipped" in r:
            print(f"{head} {r.get('error') or 'skipped: ' + r['skipped']}")
            continue
        print(f"{head} {r['step_ms_median']:9.2f} {r['floor_ms']:9.2f} {r['ratio_to_floor']:7.2f} "
              f"{r.get('ratio_to_rmsprop', 0):9.2f} {r['peak_mem_mb']:8.1f} {r.get('mem_ratio_to_adam', 0):6.2f} "
              f"{r.get('peak_tensor_mb') or 0:9.1f} {r.get('tensor_mem_ratio_to_adam', 0):6.2f} "
              f"{r.get('shape_floor_ms') or 0:11.2f} {r.get('ratio_to_shape_floor', 0):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
