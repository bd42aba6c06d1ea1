"""LocoProp on torch.distributed (issue 6), with real gloo processes on 127.0.0.1.

The tests start this file as a script (``python test_distributed.py SCENARIO
DIR``), once per rank, with the torchrun environment variables set; each
rank writes what it saw into ``DIR`` and the test compares it with a
single-process run in the pytest process.  ``torchrun`` itself runs the CLI in
:func:`test_resume_on_a_different_number_of_ranks_continues_the_loss_curve`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve()
TIMEOUT_S = 30  # the process groups' timeout in the workers
TORCHRUN = Path(sys.executable).with_name("torchrun")

# -- the problems: a small MLP of several transfer functions, float64 ----------------------------
WIDTHS = (12, 10, 9, 8, 7, 12)
ROWS = 151          # global batches of 50, 50, 50, 1: uneven shards on 3 ranks, then empty ones
BATCH = 50
CASES = {
    # name: (distributed, variant, extra LocoProp kwargs)
    "data-M": ("data", "M", dict(local_steps=5)),
    "data-S-l2": ("data", "S", dict(local_steps=4, regularizer="l2-paper", inner="adam", lr=1e-2)),
    "data-post-S": ("data", "post-S", dict(local_steps=3, inner="momentum")),
    "layers-M": ("layers", "M", dict(local_steps=5)),
    "layers-natural-closed": ("layers", "S-natural-closed", dict(lr=0.5)),
    "layers-poco-M": ("layers", "poco-M", dict(local_steps=3)),
    # the fast solver: each rank sums its gradient buffers over the ranks in every local iteration, then adds the
    # proximity term (l2-paper: an anchor); or each owner solves its layers (one process: the fast solver)
    "data-M-fused": ("data", "M", dict(local_steps=5, backend="fused")),
    "data-S-l2-fused-adam": ("data", "S", dict(local_steps=4, regularizer="l2-paper", inner="adam", lr=1e-2,
                                               backend="fused")),
    "layers-M-fused": ("layers", "M", dict(local_steps=5, backend="fused")),
    "layers-M-fused-adam": ("layers", "M", dict(local_steps=4, backend="fused", inner="adam", lr=1e-2,
                                                solve_order="iteration-major")),
    # a LayerNorm before the MLP: parameters outside LocoProp's layers, whose gradients the step accumulates
    # (other_grads), summed over the ranks; never zeroed here, so they add up over the steps
    "data-M-input-norm": ("data", "M", dict(local_steps=3, input_norm=True)),
    "layers-M-input-norm": ("layers", "M", dict(local_steps=3, input_norm=True)),
    # a convolution (each example a 3 x 4 image): its local problem's rows are patches, one per example and position
    "data-M-conv": ("data", "M", dict(local_steps=3, conv=True)),
    "layers-S-conv": ("layers", "S", dict(local_steps=3, conv=True)),
    # a Linear layer on a sequence (each example 3 positions of 4 features), then one on the flattened example:
    # 3 rows per example, then 1
    "data-M-seq": ("data", "M", dict(local_steps=3, seq=True)),
    "layers-M-seq": ("layers", "M", dict(local_steps=3, seq=True)),
    # one Linear layer called twice (shared weights): one local problem over the rows of both calls
    "data-M-shared": ("data", "M", dict(local_steps=3, shared=True)),
    "layers-post-S-shared": ("layers", "post-S", dict(local_steps=3, shared=True)),
    # a transposed convolution (each example a 3 x 2 x 2 code): its matrix a copy of the kernel, committed after
    # the step on every rank
    "data-M-tconv": ("data", "M", dict(local_steps=3, tconv=True)),
    "layers-M-tconv": ("layers", "M", dict(local_steps=3, tconv=True)),
    # a convolution of 2 groups: two layers of one module, whose output both read
    "data-post-S-groups": ("data", "post-S", dict(local_steps=3, groups=True)),
    "layers-S-groups": ("layers", "S", dict(local_steps=3, groups=True)),
    # an nn.TransformerEncoderLayer (each example 3 positions of 4 features): torch.fx keeps it whole, and its
    # feed-forward layers are paired at the first step, alike on every rank; its attention's projections are layers
    # (found in the autograd graph); its norms: other_grads
    "data-M-block": ("data", "M", dict(local_steps=3, block=True)),
    "layers-post-S-block": ("layers", "post-S", dict(local_steps=3, block=True)),
    # each rank's shard taken in micro-batches (step([closure, ...])): the step of the whole global batch
    "data-M-micro": ("data", "M", dict(local_steps=3, input_norm=True, micro=True)),
    "layers-M-fused-micro": ("layers", "M", dict(local_steps=3, backend="fused", seq=True, micro=True)),
}


#: The cases' keywords that choose the model, not LocoProp's arguments.
SHAPES = ("input_norm", "conv", "seq", "shared", "tconv", "groups", "block")


def _model(input_norm: bool = False, conv: bool = False, seq: bool = False, shared: bool = False,
           tconv: bool = False, groups: bool = False, block: bool = False) -> nn.Sequential:
    torch.manual_seed(1)
    if block:
        return nn.Sequential(nn.Unflatten(1, (3, 4)),
                             nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True), nn.Flatten(),
                             nn.Linear(12, WIDTHS[-1])).double()
    if groups:
        return nn.Sequential(nn.Unflatten(1, (2, 2, 3)), nn.Conv2d(2, 4, 2, groups=2, padding=1), nn.Tanh(),
                             nn.Flatten(), nn.Linear(4 * 3 * 4, WIDTHS[-1])).double()
    if tconv:
        return nn.Sequential(nn.Unflatten(1, (3, 2, 2)), nn.ConvTranspose2d(3, 2, 2, stride=2), nn.Tanh(),
                             nn.ConvTranspose2d(2, 2, 3, padding=1), nn.Softplus(), nn.Flatten(),
                             nn.Linear(2 * 4 * 4, WIDTHS[-1])).double()
    if shared:
        twice = nn.Linear(WIDTHS[0], WIDTHS[0])
        return nn.Sequential(twice, nn.Tanh(), nn.Linear(WIDTHS[0], WIDTHS[0]), nn.Softplus(), twice, nn.Tanh(),
                             nn.Linear(WIDTHS[0], WIDTHS[-1])).double()
    if seq:
        return nn.Sequential(nn.Unflatten(1, (3, 4)), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(),
                             nn.Flatten(), nn.Linear(12, WIDTHS[-1])).double()
    if conv:
        return nn.Sequential(nn.Unflatten(1, (1, 3, 4)), nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(),
                             nn.Conv2d(3, 2, 2), nn.Softplus(), nn.Flatten(), nn.Linear(12, WIDTHS[-1])).double()
    acts = [nn.Tanh(), nn.Softplus(), nn.LeakyReLU(0.1), nn.ELU(0.7)]
    mods: list[nn.Module] = [nn.LayerNorm(WIDTHS[0])] if input_norm else []
    for i in range(len(WIDTHS) - 1):
        mods.append(nn.Linear(WIDTHS[i], WIDTHS[i + 1]))
        if i < len(WIDTHS) - 2:
            mods.append(acts[i % len(acts)])
    return nn.Sequential(*mods).double()


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(ROWS, WIDTHS[0], generator=g, dtype=torch.float64)


def _loss(logits, x):
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def _run_case(name: str, rank: int = 0, world: int = 1, distributed: bool = False):
    """Several steps of one case; returns (model, optimizer, losses).  One process: the whole global batch."""
    import locoprop
    from locoprop.distributed import batch_shard

    mode, variant, kw = CASES[name]
    kw = dict(kw)
    kw.setdefault("lr", 5e-2)
    model = _model(**{k: kw.pop(k) for k in SHAPES if k in kw})
    micro = kw.pop("micro", False)
    opt = locoprop.LocoProp(model, variant, activation_lr=0.5, output_transfer="sigmoid", **kw,
                            **(dict(distributed=mode) if distributed else {}))
    x = _data()
    losses = []
    for i in range(0, ROWS, BATCH):
        index = torch.arange(i, min(i + BATCH, ROWS))
        xb = x[batch_shard(index, rank, world)] if distributed else x[index]
        if micro and distributed:  # micro-batches of 7 rows and the rest; each loss a share of the shard's mean
            closures = [lambda part=part, n=len(xb): _loss(model(part), part) * len(part) / n for part in xb.split(7)]
            losses.append(float(opt.step(closures)))
        else:
            losses.append(float(opt.step(lambda: _loss(model(xb), xb))))
    return model, opt, losses


# -- the worker side -----------------------------------------------------------------------------
def _worker(scenario: str, out: Path) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    if scenario == "match":
        import locoprop

        errors = {}
        for variant in ("S-closed", "S-natural"):  # not supported in the data-parallel mode: every rank says so
            try:
                locoprop.LocoProp(_model(), variant, output_transfer="sigmoid", distributed="data")
            except ValueError as exc:
                errors[variant] = str(exc)
        try:  # ranks that disagree on the mode
            locoprop.LocoProp(_model(), "M", output_transfer="sigmoid", distributed="data" if rank == 0 else "layers")
        except ValueError as exc:
            errors["mismatch"] = str(exc)
        from locoprop.distributed import batch_shard

        shared = _model(shared=True)  # its shared layer called once more, on one example: not whole examples
        opt = locoprop.LocoProp(shared, "M", output_transfer="sigmoid", distributed="layers")
        xb = _data()[batch_shard(torch.arange(BATCH), rank, world)]
        try:
            opt.step(lambda: _loss(shared(xb), xb) + shared[0](xb[:1]).sum())
        except ValueError as exc:
            errors["uneven"] = str(exc)
        for mode in ("data", "layers"):  # the last layers do not run on rank 1: every rank refuses the step
            model = _model()
            opt = locoprop.LocoProp(model, "M", output_transfer="sigmoid", distributed=mode)
            start = [p.detach().clone() for p in model.parameters()]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # rank 1's "did not run"
                    opt.step(lambda: _loss(model(xb), xb) if rank != 1 else model[:2](xb).square().sum())
            except ValueError as exc:
                errors[f"idle-{mode}"] = str(exc)
            errors[f"idle-{mode}-unchanged"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), start))
        for mode in ("data", "layers"):  # micro-batches of sequences of 3 and 2 positions: examples uncounted
            model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4)).double()
            opt = locoprop.LocoProp(model, "M", output_transfer="sigmoid", distributed=mode)
            start = [p.detach().clone() for p in model.parameters()]
            seqs = [xb.reshape(len(xb), 3, 4), xb[:, :8].reshape(len(xb), 2, 4)]
            try:
                opt.step([lambda s=s: _loss(model(s), s) for s in seqs])
            except ValueError as exc:
                errors[f"lengths-{mode}"] = str(exc)
            errors[f"lengths-{mode}-unchanged"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), start))
        for mode in ("data", "layers"):  # check_finite="layer": the first layer diverges, undone alone on every rank
            model = _model()
            opt = locoprop.LocoProp(model, "M", output_transfer="sigmoid", distributed=mode, check_finite="layer")
            opt.step(lambda: _loss(model(xb), xb))
            start = [p.detach().clone() for p in model.parameters()]
            opt.param_groups[0]["activation_lr"] = float("inf")  # its targets are infinite: its update is not finite
            try:
                opt.step(lambda: _loss(model(xb), xb))
                errors[f"layer-{mode}"] = "no error"
            except locoprop.DivergenceError as exc:
                errors[f"layer-{mode}"] = str(exc)
            now, first = list(model.parameters()), len(opt.param_groups[0]["params"])
            errors[f"layer-{mode}-first-unchanged"] = all(torch.equal(p, q) for p, q in zip(now[:first], start))
            errors[f"layer-{mode}-rest-moved"] = all(not torch.equal(p, q)
                                                     for p, q in zip(now[first:], start[first:]))
            errors[f"layer-{mode}-sums"] = [float(p.sum()) for p in now]  # alike on every rank
        (out / f"errors-rank{rank}.json").write_text(json.dumps(errors))
        for name in CASES:
            model, opt, losses = _run_case(name, rank, world, distributed=True)
            state = opt.state_dict()  # a collective in the layer-sharded mode
            torch.save({"params": [p.detach() for p in model.parameters()], "losses": losses, "state": state,
                        "grads": [p.grad for p in model.parameters() if p.grad is not None],
                        "assignment": getattr(opt.distributor, "assignment", None), "solver": opt.last_solver},
                       out / f"{name}-rank{rank}.pt")
    elif scenario.startswith("kill-"):
        import locoprop
        from locoprop.distributed import DistributedError, batch_shard

        mode, victim = scenario.split("-")[1], int(scenario.split("-")[2])
        model = _model()
        opt = locoprop.LocoProp(model, "M", lr=1e-2, local_steps=3, output_transfer="sigmoid", distributed=mode)
        x = _data()
        t0 = time.monotonic()
        try:
            for step in range(50):
                xb = x[batch_shard(torch.arange(BATCH), rank, world)]
                if step == 2 and rank == victim:
                    os._exit(9)  # a rank dies without a word
                opt.step(lambda: _loss(model(xb), xb))
            message = "no error"
        except DistributedError as exc:
            message = str(exc)
        (out / f"rank{rank}.json").write_text(json.dumps({"message": message, "seconds": time.monotonic() - t0}))
        sys.stdout.flush()
        os._exit(0)  # the group is broken: skip its teardown
    elif scenario == "train-2-epochs":
        from locoprop.harness.train import TrainConfig, train

        cfg = TrainConfig(**json.loads(os.environ["LOCOPROP_TEST_CFG"]))
        train(cfg, out, progress=False, log=lambda s: None, stop_after_epochs=2)
    dist.barrier()
    dist.destroy_process_group()


# -- the test side -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int, **extra) -> dict:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _launch(scenario: str, world: int, out: Path, timeout: float = 90, **extra) -> list[int]:
    """Start ``world`` ranks of this file as a script; wait for all; return their exit codes."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE), scenario, str(out)], env=_env(r, world, port, **extra),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(stdout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if scenario == "match" or scenario.startswith("train"):
        assert codes == [0] * world, "\n".join(f"--- rank {r} (exit {c})\n{log[-3000:]}"
                                               for r, (c, log) in enumerate(zip(codes, logs)))
    return codes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _check_states(got, want, label: str) -> None:
    assert got["state"].keys() == want["state"].keys(), label
    for i, s in want["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1:
                assert _rel(got["state"][i][k], v) < 1e-5, f"{label}: inner state {i}.{k}"


def _check_match(world: int, tmp_path: Path) -> None:
    from locoprop.distributed import batch_shard

    _launch("match", world, tmp_path)
    for r in range(world):
        errors = json.loads((tmp_path / f"errors-rank{r}.json").read_text())
        assert "distributed='data': solver 'closed_form' is not supported" in errors["S-closed"]
        assert "distributed='data': natural-gradient targets are not supported" in errors["S-natural"]
        assert "built a different LocoProp" in errors["mismatch"] and "mode" in errors["mismatch"]
        n = len(batch_shard(torch.arange(BATCH), r, world))  # the shared layer's rows: twice n, then one
        assert f"'0' {2 * n + 1} rows of 3, '2' {n} rows of 1" in errors["uneven"], errors
        for mode in ("data", "layers"):
            assert "layer '2' did not run on rank 1 in this step" in errors[f"idle-{mode}"], errors
            assert errors[f"idle-{mode}-unchanged"], mode
            assert "different numbers of rows per example" in errors[f"lengths-{mode}"], errors
            assert errors[f"lengths-{mode}-unchanged"], mode
            assert "layer(s) ['0'] is not finite; those layers were undone" in errors[f"layer-{mode}"], errors
            assert errors[f"layer-{mode}-first-unchanged"] and errors[f"layer-{mode}-rest-moved"], mode
            first = json.loads((tmp_path / "errors-rank0.json").read_text())
            assert errors[f"layer-{mode}-sums"] == first[f"layer-{mode}-sums"], (r, mode)
    for name in CASES:
        model, opt, losses = _run_case(name)
        want = [p.detach() for p in model.parameters()]
        want_state = opt.state_dict()
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(world)]
        for r, got in enumerate(ranks):
            for i, (g, w) in enumerate(zip(got["params"], want)):
                assert _rel(g, w) < 1e-5, f"{name}, rank {r}, parameter {i}: relative error {_rel(g, w):.2e}"
            assert got["losses"] == [pytest_approx(v) for v in losses], f"{name}, rank {r}: step losses"
            want_grads = [p.grad for p in model.parameters() if p.grad is not None]
            others = 2 if CASES[name][2].get("input_norm") else 4 if CASES[name][2].get("block") else 0
            assert len(got["grads"]) == len(want_grads) == others, name
            for i, (g, w) in enumerate(zip(got["grads"], want_grads)):
                assert _rel(g, w) < 1e-9, f"{name}, rank {r}, gradient {i}: relative error {_rel(g, w):.2e}"
            _check_states(got["state"], want_state, f"{name}, rank {r}")
        if CASES[name][0] == "layers":
            assert sorted(set(ranks[0]["assignment"])) == list(range(world)), "every rank owns a layer"
        fused = CASES[name][2].get("backend") == "fused"
        if fused:
            assert opt.last_solver == "fused"
        assert all((got["solver"] == "fused") == fused for got in ranks), (name, [g["solver"] for g in ranks])
        # the updates moved the weights: the comparison is not vacuous
        extra = CASES[name][2]
        shape = {k: v for k, v in extra.items() if k in SHAPES}
        before = torch.cat([p.detach().reshape(-1) for p in _model(**shape).parameters()])
        assert _rel(torch.cat([w.reshape(-1) for w in want]), before) > 1e-2, name


def pytest_approx(v):
    import pytest

    return pytest.approx(v, rel=1e-9, abs=1e-12)


def test_two_ranks_match_one_process_in_both_modes(tmp_path):
    _check_match(2, tmp_path)


def test_three_ranks_match_one_process_in_both_modes(tmp_path):
    _check_match(3, tmp_path)


def _check_kill(mode: str, world: int, victim: int, tmp_path: Path) -> None:
    t0 = time.monotonic()
    codes = _launch(f"kill-{mode}-{victim}", world, tmp_path, timeout=TIMEOUT_S + 30)
    elapsed = time.monotonic() - t0
    assert codes[victim] == 9
    assert elapsed < TIMEOUT_S + 20, f"the job took {elapsed:.0f} s to stop"
    for r in range(world):
        if r == victim:
            continue
        assert codes[r] == 0, f"rank {r} did not end cleanly"
        rec = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert f"rank(s) [{victim}] are gone" in rec["message"], rec["message"]
        assert rec["seconds"] < TIMEOUT_S, rec


def test_a_killed_rank_stops_the_job_with_its_name_data_parallel(tmp_path):
    _check_kill("data", 3, 1, tmp_path)


def test_a_killed_rank_stops_the_job_with_its_name_layer_sharded(tmp_path):
    _check_kill("layers", 2, 0, tmp_path)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip() and "event" not in json.loads(line)]


def test_resume_on_a_different_number_of_ranks_continues_the_loss_curve(tmp_path):
    """2 ranks (train(), layer-sharded) stop after epoch 2; torchrun with 3 ranks (data-parallel) resumes via the
    CLI; every epoch's losses equal an uninterrupted single-process run."""
    from locoprop.harness.train import TrainConfig, train

    settings = dict(dataset="mnist", model="tiny", epochs=4, warmup_epochs=1, batch_size=50, limit_train=200,
                    limit_test=100, device="cpu", dtype="float64", lr=1e-3, activation_lr=1.0, local_steps=3)
    ref = tmp_path / "single"
    train(TrainConfig(**settings), ref, progress=False, log=lambda s: None)

    run = tmp_path / "multi"
    _launch("train-2-epochs", 2, run, LOCOPROP_TEST_CFG=json.dumps({**settings, "distributed": "layers",
                                                                   "dist_timeout": TIMEOUT_S}))
    assert [r["epoch"] for r in _metrics(run)] == [0, 1, 2]
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "3", "--max-restarts", "0", "-m", "locoprop", "train",
           "--out", str(run), "--resume", "--no-progress", "--distributed", "data", "--dist-timeout", str(TIMEOUT_S)]
    for k, v in settings.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("finished:") == 1, "only rank 0 reports"
    got, want = _metrics(run), _metrics(ref)
    assert [r["epoch"] for r in got] == [0, 1, 2, 3, 4]
    for g, w in zip(got, want):
        for key in ("train_loss", "test_loss"):
            assert abs(g[key] - w[key]) <= 1e-7 * abs(w[key]), (g["epoch"], key, g[key], w[key])
    config = json.loads((run / "config.json").read_text())
    assert config["distributed"]["world_size"] == 3 and config["distributed"]["mode"] == "data"


def test_bad_distributed_arguments_are_named():
    import pytest

    import locoprop
    from locoprop.distributed import assign_layers, batch_shard

    model = _model()
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialized"):
        locoprop.LocoProp(model, "M", output_transfer="sigmoid", distributed="layers")
    with pytest.raises(ValueError, match="distributed: expected one of"):
        from locoprop.distributed import make_distributor

        make_distributor(locoprop.LocoProp(model, "M", output_transfer="sigmoid"), "pipeline")
    assert assign_layers([8, 8, 5, 5, 1, 1], 2) in ([0, 1, 1, 0, 0, 1], [0, 1, 0, 1, 0, 1])
    loads = [0, 0]
    for c, r in zip([8, 8, 5, 5, 1, 1], assign_layers([8, 8, 5, 5, 1, 1], 2)):
        loads[r] += c
    assert loads == [14, 14]
    from locoprop.harness.cli import main as cli_main
    from locoprop.harness.train import TrainConfig

    with pytest.raises(ValueError, match="distributed: expected data or layers"):
        TrainConfig(distributed="pipeline").validate()
    with pytest.raises(ValueError, match="distributed: only the LocoProp optimizers"):
        TrainConfig(optimizer="adam", distributed="data").validate()
    with pytest.raises(ValueError, match="dist_timeout"):
        TrainConfig(dist_timeout=0).validate()
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    try:
        with pytest.raises(ValueError, match="launch with `torchrun"):
            from locoprop.harness.train import train

            train(TrainConfig(model="tiny", epochs=2, warmup_epochs=1, distributed="data"), Path("/nonexistent/x"))
        assert cli_main(["train", "--model", "tiny", "--distributed", "layers", "--out", "/nonexistent/x"]) == 2
    finally:
        os.environ.update(env)
    parts = [batch_shard(torch.arange(10), r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), torch.arange(10)) and [len(p) for p in parts] == [4, 3, 3]
    with pytest.raises(ValueError, match="rank: expected"):
        batch_shard(torch.arange(10), 3, 3)


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
