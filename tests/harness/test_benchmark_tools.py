"""The result generators in benchmarks/: time to a reference loss, and the perf README."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _module(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(folder: Path, name: str, losses, walls, optimizer="rmsprop", local_steps=10):
    d = folder / name
    d.mkdir(parents=True)
    settings = {"optimizer": optimizer, "model": "standard", "batch_size": 1000, "epochs": len(losses),
                "local_steps": local_steps, "inverse_every": 1}
    (d / "config.json").write_text(json.dumps({"settings": settings, "label": name, "device": "cpu",
                                               "train_examples": 60000}))
    lines = [{"epoch": 0, "train_loss": 500.0, "wall_time": 0.0}]
    lines += [{"epoch": i + 1, "train_loss": v, "wall_time": w} for i, (v, w) in enumerate(zip(losses, walls))]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_time_to_loss_finds_the_first_epoch_at_the_target(tmp_path):
    _run(tmp_path, "ref", [100.0, 60.0, 50.0], [1.0, 2.0, 3.0])
    _run(tmp_path, "fast", [70.0, 49.0, 40.0], [0.5, 1.0, 1.5], optimizer="locoprop-m")
    _run(tmp_path, "never", [90.0, 80.0, 70.0], [1.0, 2.0, 3.0], optimizer="adam")
    perf = tmp_path / "perf.json"
    perf.write_text(json.dumps({"meta": {}, "records": [
        {"model": "standard", "batch_size": 1000, "optimizer": "locoprop-m", "mode": "graphed", "local_steps": 10,
         "precision": "fp32", "step_ms_median": 5.0},
        {"model": "standard", "batch_size": 1000, "optimizer": "rmsprop", "mode": "eager", "step_ms_median": 2.5},
        {"model": "standard", "batch_size": 1000, "optimizer": "rmsprop", "mode": "graph", "step_ms_median": 1.0}]}))
    _module("time_to_loss").main([str(tmp_path), "--reference", "ref", "--runs", "fast", "never", "--alone", "ref",
                                  "fast", "--perf", str(perf), "--out", str(tmp_path / "ttl")])
    rows = {r["run"]: r for r in json.loads((tmp_path / "ttl.json").read_text())["rows"]}
    assert rows["ref"]["epoch"] == 3 and rows["ref"]["wall_s"] == 3.0
    assert rows["ref"]["first_epoch_wall_s"] == 1.0 and rows["fast"]["first_epoch_wall_s"] == 0.5
    assert rows["fast"]["epoch"] == 2 and rows["fast"]["wall_ratio_to_reference"] == 1.0 / 3.0
    assert rows["fast"]["estimate_s"] == rows["fast"]["estimate_captured_s"] == 2 * 60 * 5.0 / 1e3
    assert rows["ref"]["estimate_s"] == 3 * 60 * 2.5 / 1e3  # the harness runs RMSProp eagerly
    assert rows["ref"]["estimate_captured_s"] == 3 * 60 * 1.0 / 1e3  # its captured step
    assert rows["never"]["step_ms_captured"] is None  # no graph row for Adam in this file
    assert rows["never"]["reaches_target"] is False and rows["never"]["epoch"] is None
    assert "| fast |" in (tmp_path / "ttl.md").read_text()
    # --target-epoch: the reference's loss after epoch 2 (60.0) is the target
    _module("time_to_loss").main([str(tmp_path), "--reference", "ref", "--runs", "fast", "never", "--target-epoch",
                                  "2", "--out", str(tmp_path / "at2")])
    result = json.loads((tmp_path / "at2.json").read_text())
    rows = {r["run"]: r for r in result["rows"]}
    assert result["target_loss"] == 60.0 and result["target"] == "train loss of ref after epoch 2"
    assert (rows["ref"]["epoch"], rows["fast"]["epoch"], rows["never"]["epoch"]) == (2, 2, None)
    with pytest.raises(SystemExit):
        _module("time_to_loss").main([str(tmp_path), "--reference", "ref", "--runs", "fast", "--target-epoch", "7",
                                      "--out", str(tmp_path / "at7")])
    # --reference-dir: the reference run of another folder (another device), the runs' epochs against its loss
    other = tmp_path / "other"
    _run(other, "ref", [100.0, 45.0, 40.0], [1.0, 2.0, 3.0])
    _module("time_to_loss").main([str(tmp_path), "--reference", "ref", "--reference-dir", str(other), "--runs",
                                  "fast", "--perf", str(perf), "--out", str(tmp_path / "cross")])
    result = json.loads((tmp_path / "cross.json").read_text())
    rows = {r["run"]: r for r in result["rows"]}
    assert result["target_loss"] == 40.0 and rows["ref"]["epoch"] == 3 and rows["fast"]["epoch"] == 3
    assert rows["fast"]["estimate_s"] == 3 * 60 * 5.0 / 1e3


def test_time_to_loss_takes_the_step_time_of_the_runs_own_mode():
    """A LocoProp run's step time is the benchmark's row of its own settings: ``compile_elementwise``, the
    iteration-major order, the host rollback, torch's inner optimizers and the multi-tensor update each name a
    mode flag."""
    mod = _module("time_to_loss")
    base = {"optimizer": "locoprop-m", "model": "standard", "batch_size": 1000, "local_steps": 10}
    perf = [{**base, "mode": mode, "precision": "fp32", "step_ms_median": ms}
            for mode, ms in (("graphed", 5.0), ("graphed-compiled", 4.0), ("graphed-iter-compiled", 4.5),
                             ("graphed-adam", 5.5), ("graphed-host", 5.2), ("graphed-iter-notriton", 6.0),
                             ("graphed-nocheck", 4.8), ("graphed-iter-nocheck", 4.9))]
    assert mod._step_ms(perf, base) == 5.0
    assert mod._step_ms(perf, {**base, "triton_elementwise": None}) == 5.0
    assert mod._step_ms(perf, {**base, "triton_elementwise": False, "solve_order": "iteration-major"}) == 6.0
    assert mod._step_ms(perf, {**base, "compile_elementwise": True}) == 4.0
    assert mod._step_ms(perf, {**base, "compile_elementwise": True, "solve_order": "iteration-major"}) == 4.5
    assert mod._step_ms(perf, {**base, "inner": "adam"}) == 5.5
    assert mod._step_ms(perf, {**base, "rollback": "host"}) == 5.2
    assert mod._step_ms(perf, {**base, "rollback": "host", "compile_elementwise": True}) is None  # not timed
    assert mod._step_ms(perf, {**base, "check_finite": False}) == 4.8
    assert mod._step_ms(perf, {**base, "check_finite": False, "solve_order": "iteration-major"}) == 4.9
    assert mod._step_ms(perf, {**base, "check_finite": True}) == 5.0


def test_perf_readme_lists_every_record(tmp_path):
    records = [{"model": "standard", "batch_size": 1000, "optimizer": "rmsprop", "local_steps": 0, "mode": "eager",
                "precision": "fp32", "step_ms_median": 2.0, "floor_ms": 1.0, "peak_mem_mb": 60.0,
                "ratio_to_floor": 2.0, "ratio_to_rmsprop": 1.0},
               {"model": "wide", "batch_size": 100, "optimizer": "kfac", "local_steps": 0, "mode": "eager",
                "precision": "fp32", "skipped": "deadline of 5 s"}]
    (tmp_path / "dev-2026-01-01.json").write_text(json.dumps({"meta": {
        "command": "python benchmarks/step_time.py", "date": "2026-01-01", "device": "dev", "torch": "x",
        "threads": 2, "matmul_tflops": {"fp32": 1.0}}, "records": records}))
    _module("perf_readme").main([str(tmp_path), "--note", "a note"])
    text = (tmp_path / "README.md").read_text()
    assert "| standard | 1000 | rmsprop |" in text and "2.00" in text
    assert "1 configurations were not run" in text and "a note" in text


def test_the_issues_tf32_floor_prices_every_product_at_the_tf32_rate():
    """A TF32 record's floor before session 31 priced the forward and backward pass (3 products per layer) at
    the FP32 rate and the 2T local products at the TF32 rate; the issue's TF32 floor prices all at the TF32 rate.
    perf_readme derives it from the record (its product count, else its floor and T), and takes a newer
    record's own floor as it is."""
    mod = _module("perf_readme")
    rates, bp = {"fp32": 50.0, "tf32": 400.0}, 17.0  # GFLOP of the pass; local = 2T/3 of it at T = 10
    old = {"precision": "tf32", "local_steps": 10, "floor_ms": bp / 50.0 + bp * 20 / 3 / 400.0}
    assert mod.tf32_floor_ms(old, rates) == pytest.approx(bp * (1 + 20 / 3) / 400.0, rel=1e-12)
    assert mod.tf32_floor_ms({**old, "product_gflop": 130.0}, rates) == pytest.approx(130.0 / 400.0)
    new = {**old, "floor_ms": 0.3, "floor_pass_precision": "tf32"}
    assert mod.tf32_floor_ms(new, rates) == 0.3
    backprop = {"precision": "tf32", "local_steps": 0, "floor_ms": bp / 50.0}
    assert mod.tf32_floor_ms(backprop, rates) == pytest.approx(bp / 400.0)
    assert mod.tf32_floor_ms({**old, "precision": "fp32"}, rates) is None


def test_step_time_writes_its_records_with_ratios_after_each_one(tmp_path):
    """step_time.py rewrites its JSON after every configuration (a command killed at its time limit keeps what it
    measured), each time with the ratios to the RMSProp step and the Adam memory of the same model and batch."""
    mod = _module("step_time")
    out = tmp_path / "perf.json"
    base = {"model": "standard", "batch_size": 1000, "local_steps": 0, "mode": "eager", "precision": "fp32",
            "floor_ms": 1.0}
    records = [dict(base, optimizer="rmsprop", step_ms_median=2.0, peak_mem_mb=60.0)]
    mod.write_results(out, {"device": "dev"}, records)
    assert json.loads(out.read_text())["records"][0]["ratio_to_rmsprop"] == 1.0
    records += [dict(base, optimizer="adam", step_ms_median=3.0, peak_mem_mb=30.0),
                dict(base, optimizer="locoprop-m", local_steps=10, mode="fused", step_ms_median=8.0,
                     peak_mem_mb=45.0),
                dict(base, optimizer="kfac", skipped="deadline of 5 s")]
    mod.write_results(out, {"device": "dev"}, records)
    written = json.loads(out.read_text())
    assert written["meta"] == {"device": "dev"} and len(written["records"]) == 4
    loco = written["records"][2]
    assert (loco["ratio_to_rmsprop"], loco["ratio_to_floor"], loco["mem_ratio_to_adam"]) == (4.0, 8.0, 1.5)
    assert "ratio_to_rmsprop" not in written["records"][3] and not list(tmp_path.glob("*.tmp"))


def test_peak_tensor_bytes_counts_what_a_step_holds_at_once():
    import torch

    kept = torch.ones(250_000)  # alive before the step and read by it: counted (1 MB)

    def step():
        a = torch.empty(1_000_000)  # 4 MB
        b = kept * 2  # 1 MB
        del a
        c = torch.empty(2_000_000)  # 8 MB, after a is gone
        return b, c

    peak = _module("step_time").peak_tensor_bytes(step)
    assert peak == 1_000_000 + 1_000_000 + 8_000_000  # kept, b and c


def test_gpu_session_enqueues_the_searched_parameters_of_the_best_trial(tmp_path):
    """``gpu_session.py --tune`` starts each study from the best trial of ``--settings-dirs``: the enqueued
    string names exactly the searched parameters, which ``locoprop tune --enqueue`` accepts."""
    import yaml

    from locoprop.harness.tune import _parse_assignments, search_space

    mod = _module("gpu_session")
    best = REPO / "results" / "tuning" / "best-locoprop-m.yaml"
    (tmp_path / "a").mkdir()
    assert mod.enqueued_settings("locoprop-m", [str(tmp_path / "a")]) is None  # no report there
    (tmp_path / "a" / "best-locoprop-m.yaml").write_text(best.read_text())
    text = mod.enqueued_settings("locoprop-m", [str(tmp_path / "b"), str(tmp_path / "a")])
    values = _parse_assignments([text], "--enqueue")
    top = yaml.safe_load(best.read_text())["tuning"]["top"][0]
    assert values == {k: top[k] for k in ("lr", "beta1", "beta2", "eps", "activation_lr")}
    assert set(values) == {f.field for f in search_space("locoprop-m")}


def test_compiled_backprop_step_equals_the_eager_step():
    """The benchmark's ``compiled`` BackProp baseline computes the eager baseline's update (TF-RMSProp)."""
    import torch

    from locoprop.harness.models import AutoencoderLoss, build_autoencoder

    mod = _module("step_time")
    kwargs = mod.OPTIMIZERS["rmsprop"]
    x = torch.rand(32, 784, generator=torch.Generator().manual_seed(0))
    weights = []
    for build in (mod._compiled_backprop, None):
        torch.manual_seed(0)
        model = build_autoencoder("tiny", "tanh")
        if build is None:  # eager: the same optimizer and loop without compilation
            opt = mod._backprop_optimizer("rmsprop", list(model.parameters()), kwargs)
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                AutoencoderLoss()(model(x), x).backward()
                opt.step()
        else:
            step = build(model, AutoencoderLoss(), "rmsprop", kwargs, x)
            for _ in range(3):
                assert torch.isfinite(step())
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in build_autoencoder("tiny", "tanh").parameters()])
    assert not torch.allclose(weights[1], initial)  # the steps moved the weights
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_gpu_session_tune_commands_start_or_continue_a_study(tmp_path):
    """``--tune OPT:TRIALS:EPOCHS:WORKERS``: a new study's workers share one database and stop at TRIALS
    finished trials, the first enqueuing the best known setting; with ``--tune-from`` holding that study's
    database, it continues (TRIALS more per worker, nothing enqueued)."""
    import argparse

    mod = _module("gpu_session")
    args = argparse.Namespace(tune=["rmsprop:6:100:3", "locoprop-m:4"], tune_from=None, startup_trials=5,
                              settings_dirs=["results/tuning"], device="cuda", data_dir="data",
                              tune_set=["locoprop-m:local_steps=5", "shampoo:shampoo_root=eigh"], tune_population=1,
                              tune_enqueue=["locoprop-m:lr=1e-5,activation_lr=10"])
    studies = mod.tune_commands(args, tmp_path, "python3")
    loco = studies[1][3][0]
    enqueued = [loco[i + 1] for i, a in enumerate(loco) if a == "--enqueue"]
    assert enqueued[-1] == "lr=1e-5,activation_lr=10" and len(enqueued) == 2  # after the best known setting
    assert "--population" not in loco
    assert loco[loco.index("--set") + 1] == "local_steps=5" and loco.count("--set") == 1
    assert "--set" not in studies[0][3][0]
    assert [(s[0], s[1].name, s[2], len(s[3])) for s in studies] == [
        ("rmsprop", "standard-mnist-tanh-rmsprop-gpu.db", None, 3),
        ("locoprop-m", "standard-mnist-tanh-locoprop-m-gpu.db", None, 1)]
    rms = studies[0][3]
    assert all(c[c.index("--max-trials") + 1] == "6" and c[c.index("--epochs") + 1] == "100" for c in rms)
    assert "--enqueue" in rms[0] and not any("--enqueue" in c for c in rms[1:])
    assert len({c[c.index("--storage") + 1] for c in rms}) == 1

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "standard-mnist-tanh-rmsprop-gpu.db").write_bytes(b"")
    args.tune_from = str(earlier)
    studies = mod.tune_commands(args, tmp_path, "python3")
    assert studies[0][2] == earlier / "standard-mnist-tanh-rmsprop-gpu.db" and studies[1][2] is None
    assert not any("--max-trials" in c or "--enqueue" in c for c in studies[0][3])
    assert studies[1][3][0].count("--enqueue") == 2
    assert "--max-trials" in studies[1][3][0] and "--enqueue" in studies[1][3][0]
    args.tune_population = 16  # each worker trains 16 trials at a time
    assert all(c[c.index("--population") + 1] == "16" for s in mod.tune_commands(args, tmp_path, "python3")
               for c in s[3])


def test_population_speed_times_populations_beside_one_run(tmp_path):
    """benchmarks/population_speed.py: one record per (optimizer, K) with the population's step, the step per
    trial and one run's step, in its JSON."""
    import json

    mod = _module("population_speed")
    out = tmp_path / "pop.json"
    assert mod.main(["--model", "tiny", "--batch-size", "16", "--sizes", "1", "3", "--steps", "2", "--warmup", "1",
                     "--local-steps", "2", "--device", "cpu", "--updates", "eager", "compiled", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [(r["optimizer"], r["population"], r["updates"]) for r in records] == [
        (opt, k, u) for opt in ("locoprop-m", "rmsprop") for k in (1, 3) for u in ("eager", "compiled")]
    for r in records:
        assert r["trial_step_ms"] == r["step_ms_median"] / r["population"] > 0
        assert r["speedup"] == r["single_step_ms"] / r["trial_step_ms"]
    lines = mod.table(out)
    rows = [ln for ln in lines if ln.startswith("| tiny ")]
    assert len(rows) == 8 and rows[2].split(" | ")[5:7] == ["eager", "3"]  # the updates and K columns
    # a configuration that fails (here: K = 0) is recorded with its error, and the others are still timed
    assert mod.main(["--model", "tiny", "--batch-size", "16", "--sizes", "0", "2", "--steps", "1", "--warmup", "0",
                     "--local-steps", "2", "--device", "cpu", "--optimizers", "rmsprop", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert records[0]["error"].startswith("ValueError: members: a population needs at least one member")
    assert records[1]["population"] == 2 and records[1]["step_ms_median"] > 0
    assert "ValueError: members" in "".join(mod.table(out))

    def failing_run(*args, **kwargs):
        raise RuntimeError("no graph for you")

    mod.single_step = failing_run  # one run's step fails: the populations are timed all the same
    assert mod.main(["--model", "tiny", "--batch-size", "16", "--sizes", "2", "--steps", "1", "--warmup", "0",
                     "--device", "cpu", "--optimizers", "rmsprop", "--out", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert record["step_ms_median"] > 0 and record["single_step_ms"] is None and record["speedup"] is None
    assert mod.table(out)[-2].endswith("|  |  |  |  |")


def test_shampoo_is_timed_with_both_roots(newton_roots):
    """step_time.py times Shampoo with the library's Newton roots (eager) and with shampoo_root="eigh"
    (eager-eigh), and refuses a mode it does not know."""
    import pytest
    import torch

    from locoprop.harness.models import AutoencoderLoss, build_autoencoder

    mod = _module("step_time")
    specs = mod.plan(torch.device("cpu"), ["standard"], [1000], ["shampoo", "kfac"], [10], ["fp32"])
    assert specs == [("standard", 1000, "shampoo", 0, "eager", "fp32"),
                     ("standard", 1000, "shampoo", 0, "eager-eigh", "fp32"),
                     ("standard", 1000, "kfac", 0, "eager", "fp32")]
    x = torch.rand(32, 784, generator=torch.Generator().manual_seed(0))
    for mode in ("eager", "eager-eigh"):
        newton_roots.calls = 0
        step = mod.build_step({"optimizer": "shampoo", "mode": mode}, build_autoencoder("tiny", "tanh"),
                              AutoencoderLoss(), x)
        assert torch.isfinite(step())
        assert (newton_roots.calls > 0) == (mode == "eager")
    with pytest.raises(ValueError, match="unknown mode 'fused' for shampoo"):
        mod.build_step({"optimizer": "shampoo", "mode": "fused"}, build_autoencoder("tiny", "tanh"),
                       AutoencoderLoss(), x)


def test_gpu_session_packs_run_folders_without_checkpoints(tmp_path):
    """What a device call returns is size-limited: ``without_checkpoints`` leaves out finished checkpoints and
    those cut off mid-write by a time limit (``checkpoint.pt.XXXX.tmp``), and keeps metrics and configs."""
    import tarfile

    mod = _module("gpu_session")
    trial = tmp_path / "tuning" / "trials" / "kfac" / "trial-00003"
    trial.mkdir(parents=True)
    for name in ("metrics.jsonl", "config.json", "checkpoint.pt", "checkpoint.pt.k2j1x.tmp"):
        (trial / name).write_text("x")
    (tmp_path / "tuning" / "best-kfac.yaml").write_text("x")
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tuning", arcname="tuning", filter=mod.without_checkpoints)
    with tarfile.open(tmp_path / "t.tar.gz") as tar:
        files = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert files == ["tuning/best-kfac.yaml", "tuning/trials/kfac/trial-00003/config.json",
                     "tuning/trials/kfac/trial-00003/metrics.jsonl"]


def test_paper_ordering_says_where_runs_agree_with_the_paper():
    """benchmarks/paper_ordering.py: each claim of the paper is decided from the runs' final losses, and a claim
    whose runs are missing is 'not shown' rather than decided."""
    mod = _module("paper_ordering")

    def runs(**losses):
        return {role.replace("__", ":").replace("_", "-"): {"train_loss": v} for role, v in losses.items()}

    claims = {c["claim"].split(" (")[0]: c["agrees"] for c in mod.check(runs(
        first_order__rmsprop=53.8, first_order__adam=58.5, locoprop_s=87.4, locoprop_m_T5=56.2, locoprop_m=55.0,
        locoprop_m_T50=54.5, second_order__kfac=120.0), close=0.10)}
    assert claims == {"RMSProp is the best first-order method": True, "LocoProp-M beats LocoProp-S": True,
                      "more local iterations help, up to about T = 10": True,
                      "LocoProp-M is close to Shampoo and K-FAC": False, "LocoProp-M beats RMSProp": False}
    flipped = {c["claim"].split(" (")[0]: c["agrees"] for c in mod.check(runs(
        first_order__rmsprop=60.0, first_order__adam=58.5, locoprop_s=50.0, locoprop_m=55.0, locoprop_m_T50=56.0,
        second_order__shampoo=52.0), close=0.10)}
    assert flipped == {"RMSProp is the best first-order method": False, "LocoProp-M beats LocoProp-S": False,
                       "more local iterations help, up to about T = 10": False,
                       "LocoProp-M is close to Shampoo and K-FAC": True, "LocoProp-M beats RMSProp": True}
    alone = mod.check(runs(first_order__rmsprop=53.8), close=0.10)
    assert [c["agrees"] for c in alone] == [None]


def test_step_time_splits_memory_by_pool_and_runs_a_callback_after_the_warmup():
    """``memory_by_pool`` sums the allocator snapshot's segments per pool (default or a CUDA graph's private
    pool) and stream, largest first; ``timed_calls`` runs ``after_warmup`` once, between warm-up and timing."""
    st = _module("step_time")
    mib = 2 ** 20
    segments = [{"segment_pool_id": (0, 0), "stream": 0, "total_size": 4 * mib, "allocated_size": 3 * mib},
                {"segment_pool_id": (0, 0), "stream": 0, "total_size": 2 * mib, "allocated_size": 0},
                {"segment_pool_id": (0, 0), "stream": 7, "total_size": 2 * mib, "allocated_size": 2 * mib},
                {"segment_pool_id": (1, 3), "stream": 0, "total_size": 20 * mib, "allocated_size": 5 * mib}]
    rows = st.memory_by_pool(segments)
    assert [(r["pool"], r["stream"], r["segments"], r["reserved_mb"], r["allocated_mb"]) for r in rows] == [
        ("graph pool 1,3", 0, 1, 20.0, 5.0), ("default", 0, 2, 6.0, 3.0), ("default", 7, 1, 2.0, 2.0)]
    calls = []
    times, result = st.timed_calls(lambda: calls.append("step") or len(calls), __import__("torch").device("cpu"),
                                   2, 3, after_warmup=lambda: calls.append("between"))
    assert calls == ["step", "step", "between", "step", "step", "step"] and len(times) == 3 and result == 6


def test_step_time_times_the_iteration_major_order_and_selects_modes():
    """The -iter flag builds LocoProp with solve_order="iteration-major"; --modes keeps only the named modes and
    names the plan's modes when one is unknown."""
    import pytest
    import torch

    from locoprop.harness.models import AutoencoderLoss, build_autoencoder

    mod = _module("step_time")
    cuda = mod.plan(torch.device("cuda"), ["standard"], [1000], ["rmsprop", "locoprop-m"], [10], ["fp32", "tf32"])
    chosen = mod.select_modes(cuda, ["eager", "graphed", "graphed-iter", "graphed-iter-compiled"])
    assert [(c[2], c[4], c[5]) for c in chosen] == [
        ("rmsprop", "eager", "fp32"), ("locoprop-m", "graphed", "fp32"), ("locoprop-m", "graphed-iter", "fp32"),
        ("locoprop-m", "graphed", "tf32"), ("locoprop-m", "graphed-iter", "tf32"),
        ("locoprop-m", "graphed-iter-compiled", "fp32"), ("locoprop-m", "graphed-iter-compiled", "tf32")]
    assert mod.select_modes(cuda, None) == cuda
    # --precisions tf32 alone: LocoProp's FP32 rows left out, the (FP32) BackProp baseline kept
    assert [(c[2], c[4], c[5]) for c in mod.select_precisions(chosen, ["tf32"])] == [
        ("rmsprop", "eager", "fp32"), ("locoprop-m", "graphed", "tf32"), ("locoprop-m", "graphed-iter", "tf32"),
        ("locoprop-m", "graphed-iter-compiled", "tf32")]
    assert mod.select_precisions(chosen, ["fp32", "tf32"]) == chosen
    memory_rows = ["eager", "graph", "graphed", "graphed-host", "graphed-s0", "graphed-host-s0"]  # docs/performance.md
    small = mod.plan(torch.device("cuda"), ["standard"], [100], ["adam", "locoprop-m"], [10], ["fp32"])
    assert [c[4] for c in mod.select_modes(small, memory_rows)] == memory_rows
    with pytest.raises(ValueError, match=r"--modes: \['graphed-rows'\] are not in this plan; its modes are"):
        mod.select_modes(cuda, ["graphed-rows"])
    cpu = mod.plan(torch.device("cpu"), ["standard"], [1000], ["locoprop-m"], [10], ["fp32", "bf16"])
    assert {("standard", 1000, "locoprop-m", 10, mode, "bf16") for mode in ("fused-iter", "fused-iter-compiled")} <= set(cpu)
    torch.manual_seed(0)
    model, x = build_autoencoder("tiny", "tanh"), torch.rand(16, 784)
    step = mod.build_step({"optimizer": "locoprop-m", "mode": "fused-iter", "local_steps": 2, "precision": "fp32"},
                          model, AutoencoderLoss(), x)
    assert step.optimizer.fused_solver.order == "iteration-major"
    assert torch.isfinite(step()) and step.optimizer.last_solver == "fused"
    assert ("locoprop-m", "graphed-plain", "tf32") in {(c[2], c[4], c[5]) for c in cuda}
    assert ("locoprop-m", "graphed-plain", "fp32") not in {(c[2], c[4], c[5]) for c in cuda}
    plain = mod.build_step({"optimizer": "locoprop-m", "mode": "fused-plain", "local_steps": 2, "precision": "bf16"},
                           model, AutoencoderLoss(), x)  # bf16 products x Wᵀ, not the update form
    assert not plain.optimizer.fused_solver.rounds_products(False) and torch.isfinite(plain())
    assert {("standard", 1000, "locoprop-m", 10, "fused-layercheck", p) for p in ("fp32", "bf16")} <= set(cpu)
    assert ("locoprop-m", "fused-inbackward-layercheck", "fp32") in {(c[2], c[4], c[5]) for c in cuda}
    layercheck = mod.build_step({"optimizer": "locoprop-m", "mode": "fused-layercheck", "local_steps": 2,
                                 "precision": "fp32"}, model, AutoencoderLoss(), x)
    assert layercheck.optimizer.check_finite == "layer" and torch.isfinite(layercheck())
    allocating = mod.build_step({"optimizer": "locoprop-m", "mode": "fused-newdenominators", "local_steps": 2,
                                 "precision": "fp32"}, model, AutoencoderLoss(), x)
    assert allocating.optimizer.fused_solver.denominators_in_residual is False and torch.isfinite(allocating())
    assert ("locoprop-m", "graphed-nochange", "tf32") in {(c[2], c[4], c[5]) for c in cuda}
    assert not any(c[4].endswith("nochange") for c in cpu)  # the kernels it turns off run on CUDA only
    unchanged = mod.build_step({"optimizer": "locoprop-m", "mode": "fused-nochange", "local_steps": 2,
                                "precision": "bf16"}, model, AutoencoderLoss(), x)
    assert unchanged.optimizer.fused_solver.change_in_update is False and torch.isfinite(unchanged())
    assert {("locoprop-m", f"graphed-{f}", "fp32") for f in ("overlap", "overlap-nocheck")} <= {
        (c[2], c[4], c[5]) for c in cuda}
    overlapping = mod.build_step({"optimizer": "locoprop-m", "mode": "fused-overlap", "local_steps": 2,
                                 "precision": "fp32"}, model, AutoencoderLoss(), x)  # on the CPU: in the pass
    assert overlapping.optimizer.solve_in_backward == "overlap" and torch.isfinite(overlapping())


def test_kernel_count_shows_the_iteration_major_order_issuing_one_update_per_iteration():
    """benchmarks/kernel_count.py counts the operations of one solve: the per-layer work (products, residuals,
    column sums) is the same in both orders; TF-RMSProp's eight multi-tensor operations run once per layer
    and iteration in the layer-major order and once per iteration in the iteration-major order (its η_k
    multiply once for all the layers that share their learning rates, here all).  With the Triton kernels (the
    CUDA default) each layer's update is one launch in either order, and so is each later iteration's δ with
    Σδ (f, the difference and the column sum); the products stay."""
    from torch import nn

    from locoprop.harness.models import build_autoencoder

    mod = _module("kernel_count")
    T = 3
    L = sum(isinstance(m, nn.Linear) for m in build_autoencoder("tiny", "tanh").modules())
    lay = mod.solve_operations("tiny", T, "layer-major", batch_size=8)
    it = mod.solve_operations("tiny", T, "iteration-major", batch_size=8)
    once = ("_foreach_addcmul_", "_foreach_add", "_foreach_sqrt_", "_foreach_addcdiv_", "_foreach_sub_")
    for name in once:
        assert (lay[name], it[name]) == (L * T, T), name
    assert (lay["_foreach_mul_"], it["_foreach_mul_"]) == (3 * L * T, 3 * T)
    assert "_foreach_div_" not in lay and "_foreach_add_" not in lay  # m + (η g)/√(ms+ε) in one addcdiv
    per_layer = {n: c for n, c in lay.items() if not n.startswith("_foreach")}
    assert per_layer == {n: c for n, c in it.items() if not n.startswith("_foreach")}
    assert (per_layer["mm"], per_layer["addmm"], per_layer["sum"]) == (L * T, L * (T - 1), L * T)
    assert sum(lay.values()) - sum(it.values()) == T * (8 * L - 8)
    for order in ("layer-major", "iteration-major"):  # the CUDA default: one launch a layer for each
        tri = mod.solve_operations("tiny", T, order, batch_size=8, elementwise="triton")
        assert tri.pop("triton:tf_rmsprop_pair") == L * T
        assert tri.pop("triton:residual_column_sums") == L * (T - 1)  # a batch of one block of rows: one launch
        residual_ops = per_layer["sum"] - L + sum(c for n, c in per_layer.items() if n in ("tanh_", "sigmoid_", "sub_"))
        assert sum(tri.values()) == sum(per_layer.values()) - residual_ops, order
        assert (tri["mm"], tri["addmm"], tri["sum"]) == (L * T, L * (T - 1), L), order


def test_step_profile_sorts_kernels_by_kind_and_counts_a_step(tmp_path):
    """benchmarks/step_profile.py: kernel names of cuBLAS, CUTLASS, PyTorch and Triton land in their kinds; on
    the CPU it profiles each mode's steps (the iteration-major order issues fewer operations) and writes JSON."""
    mod = _module("step_profile")
    assert mod.kind_of("ampere_sgemm_128x64_tn") == "product"
    assert mod.kind_of("sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x128x32") == "product"
    assert mod.kind_of("void cutlass::Kernel2<cutlass_80_simt_sgemm_128x64_8x5_nt_align1>(Params)") == "product"
    assert mod.kind_of("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>") == "multi-tensor"
    assert mod.kind_of("void at::native::reduce_kernel<512, 1, ReduceOp<float, SumOps<float, float>>>") == "reduction"
    assert mod.kind_of("triton_red_fused_sub_sum_tanh_0") == "reduction"
    assert mod.kind_of("void at::native::vectorized_elementwise_kernel<4, tanh_kernel_cuda>") == "elementwise"
    # the CPU's top-level operations: a bf16 product written a @ b, a Linear's forward; not a product's neighbours
    assert mod.kind_of("aten::matmul") == mod.kind_of("aten::linear") == mod.kind_of("aten::addmm") == "product"
    assert mod.kind_of("aten::mul") == mod.kind_of("aten::_to_copy") == "elementwise"
    out = tmp_path / "profile.json"
    assert mod.main(["--model", "tiny", "--batch-size", "16", "--local-steps", "2", "--modes", "eager", "fused",
                     "fused-iter-nograph", "--warmup", "1", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    records = {r["mode"]: r for r in json.loads(out.read_text())["records"]}
    assert records["eager"]["optimizer"] == "rmsprop" and records["fused"]["optimizer"] == "locoprop-m"
    assert all(r["wall_ms_median"] > 0 and r["kinds"]["product"]["count_per_step"] > 0 for r in records.values())
    assert records["fused-iter-nograph"]["count_per_step"] < records["fused"]["count_per_step"]
    assert records["fused"]["profiler_table"]


def test_population_check_retrains_a_studys_trials_as_populations(tmp_path):
    """benchmarks/population_check.py: every complete trial of a study trained again as a population, with
    the same final train loss (the tiny model, float32), and a refusal to overwrite its database."""
    import json

    import pytest

    from locoprop.harness.cli import main as cli_main

    db = tmp_path / "s.db"
    assert cli_main(["tune", "--dataset", "mnist", "--model", "tiny", "--epochs", "3", "--limit-train", "200",
                     "--limit-test", "100", "--batch-size", "50", "--device", "cpu", "--optimizer", "rmsprop",
                     "--storage", str(db), "--study", "s", "--runs-dir", str(tmp_path / "runs"), "--trials", "8"]) == 0
    mod = _module("population_check")
    args = ["--storage", str(db), "--study", "s", "--population", "3", "--out", str(tmp_path / "check")]
    assert mod.main(args) == 0
    rows = json.loads((tmp_path / "check" / "check.json").read_text())["trials"]
    # eight trials, three at a time: Optuna's default MedianPruner would prune later ones against the first;
    # the check keeps the study's pruner
    assert len(rows) == 8 and all(r["population_state"] == "COMPLETE" for r in rows)
    assert max(r["relative_difference"] for r in rows) < 1e-5
    assert "Largest relative difference" in (tmp_path / "check" / "README.md").read_text()
    with pytest.raises(SystemExit, match="check.db: exists"):
        mod.main(args)


def test_gpu_session_trains_settings_files_beside_the_figures_runs():
    """``--configs NAME=FILE``: a settings YAML (the notebook's defaults) becomes one more run of part 4, with
    the session's device and data folder."""
    mod = _module("gpu_session")
    runs = mod.training_runs(".carrydata/mnist", None, None, "cuda", ("results/tuning",),
                             ["notebook-m=configs/notebook-defaults-locoprop-m.yaml"])
    nb = runs["notebook-m"]
    assert (nb["optimizer"], nb["lr"], nb["activation_lr"], nb["beta1"], nb["beta2"], nb["eps"]) == \
        ("locoprop-m", 1e-5, 10.0, 0.999, 0.9, 1e-5)
    assert (nb["device"], nb["data_dir"], nb["epochs"], nb["_origin"]) == \
        ("cuda", ".carrydata/mnist", 100, "configs/notebook-defaults-locoprop-m.yaml")
    assert "rmsprop" in runs and "locoprop-m" in runs  # the figures' runs are still there
    for prec in ("tf32", "bf16"):  # reduced-precision twins, otherwise the same settings
        assert runs[f"notebook-m-{prec}"] == dict(nb, precision=prec)
    short = mod.training_runs(".carrydata/mnist", 4, 2000, "cpu", ("results/tuning",),
                              ["notebook-m=configs/notebook-defaults-locoprop-m.yaml"])["notebook-m"]
    assert (short["epochs"], short["warmup_epochs"], short["limit_train"]) == (4, 0, 2000)  # a smoke test's
    with pytest.raises(ValueError, match="NAME=FILE"):
        mod.training_runs(".carrydata/mnist", None, None, "cuda", ("results/tuning",), ["no-file"])
    changed = mod.training_runs(".carrydata/mnist", None, None, "cuda", ("results/tuning",), [
        "nb-T5=configs/notebook-defaults-locoprop-m.yaml:local_steps=5,compile_elementwise=true"])["nb-T5"]
    assert changed == dict(nb, local_steps=5, compile_elementwise=True, _origin="configs/notebook-defaults-locoprop-m.yaml")
    for bad in (":local_steps", ":no_such_setting=3"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            mod.training_runs(".carrydata/mnist", None, None, "cuda", ("results/tuning",),
                              ["nb=configs/notebook-defaults-locoprop-m.yaml" + bad])


def test_gpu_session_reads_a_time_limit_per_alone_run():
    """``--alone-limits RUN=SECONDS``: a limit of its own for a slow baseline run alone (Shampoo, K-FAC);
    anything but a positive number of seconds is an error naming the option."""
    mod = _module("gpu_session")
    assert mod.run_limits(["shampoo=45", "kfac=30.5"]) == {"shampoo": 45.0, "kfac": 30.5}
    assert mod.run_limits([]) == {}
    for bad in ["shampoo", "shampoo=", "=45", "kfac=0", "kfac=-3", "kfac=nan", "kfac=soon"]:
        with pytest.raises(ValueError, match="--alone-limits"):
            mod.run_limits([bad])


def test_precision_error_emulates_tf32_operands_in_both_forms():
    """benchmarks/precision_error.py's TF32 emulation rounds float32 to a 10-bit mantissa, to nearest with ties
    away from zero; its modes run through the fast solver, and at a small γ the emulated update form lands far
    nearer the float32 step than emulated plain TF32 products (as for bf16, tests/test_fused.py)."""
    import torch

    from locoprop.harness.models import AutoencoderLoss, build_autoencoder
    from locoprop.harness.optimizers import build_optimizer

    mod = _module("precision_error")
    x = torch.tensor([1.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -11), 1 + 2 ** -12, 3.14159265])
    assert mod._tf32(x).tolist() == [1.0, 1 + 2 ** -10, 1 + 2 ** -9, -(1 + 2 ** -10), 1.0, 3.140625]

    def step(mode):
        precision, output = mod.MODES[mode]
        torch.manual_seed(0)
        model, loss_fn = build_autoencoder("tiny", "tanh"), AutoencoderLoss()
        opt = build_optimizer("locoprop-m", model, loss_fn, lr=1e-3, activation_lr=0.1, local_steps=5,
                              precision=precision, beta1=0.9, beta2=0.999, eps=1e-8)
        batch = torch.rand(64, 784, generator=torch.Generator().manual_seed(1))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        with mod._patched(output):
            opt.step(lambda: loss_fn(model(batch), batch))
        assert opt.last_solver == ("reference" if mode == "fp32" else "fused")
        return torch.cat([p.detach().flatten() for p in model.parameters()]) - before

    ref, update, plain = step("fp32"), step("tf32-emulated"), step("tf32-emulated-plain")
    err_update, err_plain = ((update - ref).norm() / ref.norm()).item(), ((plain - ref).norm() / ref.norm()).item()
    assert 0 < err_update < err_plain / 10, (err_update, err_plain)


def test_write_records_writes_the_json_whole_and_its_readme_from_the_same_records(tmp_path):
    """locoprop.harness.records.write_records: the JSON replaces the previous file whole (no temporary left),
    and the README is made from the records written."""
    import json

    from locoprop.harness.records import write_records

    out = tmp_path / "sub" / "r.json"
    write_records(out, {"date": "d"}, [{"x": 1}])
    assert json.loads(out.read_text()) == {"meta": {"date": "d"}, "records": [{"x": 1}]}
    assert not (tmp_path / "sub" / "README.md").exists()
    path = write_records(out, {"date": "e"}, [{"x": 2}], lambda meta, recs, name: f"{name} {meta['date']} {recs}")
    assert path == out and json.loads(out.read_text())["records"] == [{"x": 2}]
    assert (tmp_path / "sub" / "README.md").read_text() == "r.json e [{'x': 2}]"
    assert sorted(p.name for p in out.parent.iterdir()) == ["README.md", "r.json"]


def test_conv_autoencoder_trains_each_run_writes_after_each_and_resumes_the_rest(tmp_path):
    """benchmarks/conv_autoencoder.py on real MNIST (300 images, 2 epochs): LocoProp-M on convolutions lowers the
    loss; its JSON and README hold every run; --resume trains only the runs it does not hold."""
    mod = _module("conv_autoencoder")
    mnist = REPO.parent / "shared" / "data" / "mnist"
    out = tmp_path / "conv" / "runs.json"
    common = ["--data-dir", str(mnist), "--epochs", "2", "--limit-train", "300", "--batch-size", "100",
              "--threads", "1", "--out", str(out)]
    mod.main(common + ["--runs", "locoprop-m:3e-5", "rmsprop:1e-3"])
    records = json.loads(out.read_text())["records"]
    assert [(r["optimizer"], r["epoch"]) for r in records] == [("locoprop-m", 1), ("locoprop-m", 2),
                                                               ("rmsprop", 1), ("rmsprop", 2)]
    assert records[1]["train_loss"] < records[0]["train_loss"] < 543  # a fresh model scores about 784 ln 2
    readme = (out.parent / "README.md").read_text()
    assert "| locoprop-m | 3e-05 |" in readme and "| rmsprop | 0.001 |" in readme
    mod.main(common + ["--resume", "--runs", "locoprop-m:3e-5", "adam:1e-3"])
    again = json.loads(out.read_text())["records"]
    assert again[:4] == records and [r["optimizer"] for r in again[4:]] == ["adam", "adam"]
    with pytest.raises(SystemExit):  # other settings than the file's
        mod.main(["--data-dir", str(mnist), "--epochs", "3", "--limit-train", "300", "--batch-size", "100",
                  "--out", str(out), "--resume", "--runs", "adam:1e-3"])
    with pytest.raises(SystemExit):  # another decoder than the file's
        mod.main(common + ["--resume", "--decoder", "transposed", "--runs", "adam:1e-3"])


def test_conv_autoencoder_with_a_transposed_convolution_decoder_trains(tmp_path):
    """--decoder transposed: LocoProp-M on transposed convolutions lowers the loss on real MNIST (300 images,
    2 epochs); the README says which decoder."""
    mod = _module("conv_autoencoder")
    out = tmp_path / "runs.json"
    mod.main(["--data-dir", str(REPO.parent / "shared" / "data" / "mnist"), "--epochs", "2", "--limit-train", "300",
              "--batch-size", "100", "--threads", "1", "--out", str(out), "--decoder", "transposed",
              "--runs", "locoprop-m:3e-5"])
    records = json.loads(out.read_text())["records"]
    assert records[1]["train_loss"] < records[0]["train_loss"] < 543
    assert "transposed convolutions (30 -> 32 x 7 x 7" in (tmp_path / "README.md").read_text()


def test_transformer_mnist_trains_locoprop_on_the_blocks_layers_and_resumes(tmp_path):
    """benchmarks/transformer_mnist.py on real MNIST (400 images, 2 epochs): LocoProp-M with the layers inside
    nn.TransformerEncoder paired at the first step (linear1 with its ReLU) lowers the loss below a uniform guess's
    ln 10; --resume trains only the runs the file does not hold."""
    mod = _module("transformer_mnist")
    out = tmp_path / "runs.json"
    common = ["--data-dir", str(REPO.parent / "shared" / "data" / "mnist"), "--epochs", "2", "--limit-train", "400",
              "--batch-size", "100", "--threads", "1", "--out", str(out)]
    mod.main(common + ["--runs", "locoprop-m:1e-3"])
    records = json.loads(out.read_text())["records"]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"] < math.log(10)
    assert records[1]["pairs"]["blocks.layers.1.linear1"] == "relu"
    assert records[1]["pairs"]["head"] == "softmax (output_transfer)"
    readme = (tmp_path / "README.md").read_text()
    assert "| `blocks.layers.0.linear1` | relu |" in readme and "| locoprop-m | 0.001 |" in readme
    mod.main(common + ["--resume", "--runs", "locoprop-m:1e-3", "adam:3e-3", "locoprop-m-attention:1e-3"])
    again = json.loads(out.read_text())["records"]
    assert again[:2] == records and [r["optimizer"] for r in again[2:]] == ["adam", "adam"] + [
        "locoprop-m-attention"] * 2
    attention = again[-1]["pairs"]  # the attention's projections are layers too, linear
    assert attention["blocks.layers.0.self_attn.q_proj"] == "none (attention)" and len(attention) == 6 + 8


def test_micro_batches_measures_the_same_step_in_parts(tmp_path):
    """benchmarks/micro_batches.py on 64 real MNIST images: every K's step is K = 1's (float64), BackProp + Adam's
    peak falls with K, and the README holds a row per configuration."""
    mod = _module("micro_batches")
    out = tmp_path / "results.json"
    mod.main(["--data-dir", str(REPO.parent / "shared" / "data" / "mnist"), "--models", "transformer",
              "--micro-batches", "1", "4", "--batch-size", "64", "--steps", "1", "--threads", "1", "--out", str(out)])
    records = json.loads(out.read_text())["records"]
    assert [(r["optimizer"], r["micro_batches"]) for r in records] == [
        ("locoprop-m", 1), ("locoprop-m", 4), ("locoprop-m-attention", 1), ("locoprop-m-attention", 4),
        ("adam", 1), ("adam", 4)]
    assert all(r["max_rel_diff_to_one"] < 1e-9 for r in records if r["micro_batches"] > 1)
    assert records[5]["peak_tensor_mb"] < records[4]["peak_tensor_mb"]
    readme = (tmp_path / "README.md").read_text()
    assert readme.count("| transformer |") == 6
    with pytest.raises(SystemExit):
        mod.main(["--data-dir", "x", "--micro-batches", "2", "--out", str(out)])  # no K = 1 to compare with


def test_transformer_mnist_gives_the_attention_layers_their_own_gamma():
    """--attention-activation-lr sets the activation step size of the attention's projections' groups only."""
    import argparse

    mod = _module("transformer_mnist")
    args = argparse.Namespace(activation_lr=25.0, attention_activation_lr=2.5, local_steps=5, other_lr=3e-3)
    opt = mod.Optimizers("locoprop-m-attention", mod.RowTransformer(), 1e-3, args).locoprop
    gammas = {lay.name: g["activation_lr"] for lay, g in zip(opt.layers, opt.param_groups)}
    assert gammas["blocks.layers.0.self_attn.q_proj"] == gammas["blocks.layers.1.self_attn.out_proj"] == 2.5
    assert gammas["blocks.layers.0.linear1"] == gammas["embed"] == gammas["head"] == 25.0
    assert sum(g == 2.5 for g in gammas.values()) == 8


def test_against_fp32_reads_the_epochs_that_train_and_the_epoch_times(tmp_path, capsys):
    """The loss table compares epochs 2 to 99 (epoch 100 trains at learning rate 0) and epoch 99; the wall table
    leaves out the first epoch's one-off costs."""
    def run(name, losses, first_epoch_s, epoch_s, folder=tmp_path):
        d = folder / name
        d.mkdir(parents=True)
        walls = [0.0] + [first_epoch_s + epoch_s * i for i in range(len(losses))]
        lines = [{"epoch": e, "train_loss": loss, "wall_time": w, "step": 60 * e}
                 for e, (loss, w) in enumerate(zip([500.0] + losses, walls))]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    fp32 = [100.0 - 0.5 * e for e in range(1, 101)]
    run("fp32", fp32, 3.0, 0.25)
    run("tf32", [v * (1.002 if e == 50 else 1.001) for e, v in enumerate(fp32, 1)], 1.0, 0.2)
    run("elsewhere", [v * 0.999 if e != 100 else v * 0.9 for e, v in enumerate(fp32, 1)], 2.0, 0.5,
        folder=tmp_path / "other")
    _module("against_fp32").main([str(tmp_path), "--fp32", "fp32", "--compare", "tf32",
                                  f"the other one={tmp_path / 'other' / 'elsewhere'}", "--wall", "fp32", "tf32",
                                  "--not-alone", "tf32"])
    out = capsys.readouterr().out
    assert "| tf32 | +0.100% | +0.200% | 50.550 (+0.100%) | 50.500 | +0.100% |" in out
    assert "| the other one | -0.100% | -0.100% | 50.450 (-0.100%) | 50.500 | -10.000% |" in out
    assert "| fp32 | yes | 100 | 0.250 | 4.17 | 3.00 | 50.000 |" in out
    assert "| tf32 | no (shared the device) | 100 | 0.200 | 3.33 | 1.00 | 50.050 |" in out


def test_host_overhead_times_the_captured_steps_own_call_and_writes_its_readme(tmp_path, capsys):
    """benchmarks/host_overhead.py runs the real ``CapturedStep.__call__`` on the CPU, the graph's replay a
    stand-in: every call takes the replay path, and the learning rates and step counters move as a real
    step's would."""
    host = _module("host_overhead")
    out = tmp_path / "host" / "after.json"
    host.main(["--models", "standard", "--calls", "20", "--local-steps", "3", "--label", "after", "--out", str(out),
               "--readme"])
    data = json.loads(out.read_text())
    (record,) = data["records"]
    assert record["model"] == "standard" and record["layers"] == 8 and record["calls"] == 20
    assert 0 < record["host_us_p10"] <= record["host_us_median"] <= record["host_us_p90"]
    assert data["meta"]["label"] == "after" and "host_overhead.py --models standard" in data["meta"]["command"]
    readme = (out.parent / "README.md").read_text()
    assert "`after.json`: after" in readme and f"{record['host_us_median']:.1f}" in readme

    import locoprop
    import torch
    from locoprop.harness.models import AutoencoderLoss, build_autoencoder

    model, loss_fn, x = build_autoencoder("standard"), AutoencoderLoss(), torch.rand(4, 784)
    opt = locoprop.LocoProp(model, local_steps=3, output_transfer="sigmoid", backend="fused")
    step = host.captured_step_on_the_cpu(opt, lambda: loss_fn(model(x), x))
    counters = [opt.inner.state[p]["step"] for p in opt.param_groups[0]["params"]]
    before = [float(c) for c in counters]
    opt.param_groups[0]["lr"] = 0.5
    step()
    assert step.last_mode == "replay" and opt.param_groups[0]["step"] == 1
    assert [float(opt.inner.state[p]["step"]) for p in opt.param_groups[0]["params"]] == [b + 3 for b in before]
    assert float(opt.fused_solver.static_table[0, 0]) == 0.5  # the new learning rate reached the graph's table
    with pytest.raises(SystemExit):
        host.main(["--readme"])
    assert "--readme: needs --out" in capsys.readouterr().err


def test_step_profile_timeline_splits_a_step_into_busy_idle_and_overlapped_time(tmp_path):
    """benchmarks/step_profile.py's timeline: the union of the kernels' intervals on any stream (busy), the gaps
    between them (idle), and the time with n kernels running at once; touching kernels do not overlap."""
    mod = _module("step_profile")
    cover = mod.concurrency([(0.0, 10.0), (5.0, 15.0), (15.0, 20.0), (30.0, 40.0), (32.0, 34.0), (33.0, 35.0)])
    assert cover["span"] == 40.0 and cover["busy"] == 30.0 and cover["idle"] == 10.0
    assert cover["by_running"] == {1: 22.0, 2: 7.0, 3: 1.0}
    assert mod.concurrency([]) == {"span": 0.0, "busy": 0.0, "idle": 0.0, "by_running": {}}
    assert mod._per_step_ms(cover, 2) == {"span": 0.02, "busy": 0.015, "idle": 0.005,
                                          "by_running": {"1": 0.011, "2": 0.0035, "3": 0.0005}}
    out = tmp_path / "profile.json"
    assert mod.main(["--model", "tiny", "--batch-size", "16", "--local-steps", "2", "--modes", "fused",
                     "--warmup", "1", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    line = record["timeline_ms_per_step"]
    assert 0 < line["busy"] <= line["span"] and line["idle"] >= 0
    assert abs(sum(line["by_running"].values()) - line["busy"]) < 1e-9
    assert abs(line["busy"] - record["counted_ms_per_step"]) < 1e-6  # one CPU thread: nothing overlaps


def _device_call_commands():
    """The python commands of ``benchmarks/device_call.sh``, as (script name, argument list), continuation lines
    joined and ``$OUT`` paths left as they are."""
    import shlex

    text = (REPO / "benchmarks" / "device_call.sh").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line.split("#", 1)[0] if not line.lstrip().startswith("python3 -m pip") else "")
        for i, word in enumerate(words):
            if word.startswith("benchmarks/") and word.endswith(".py"):
                argv = words[i + 1:]
                argv = argv[:argv.index(">")] if ">" in argv else argv
                commands.append((Path(word).stem, argv))
    return commands


def test_the_prepared_device_call_asks_only_for_what_the_benchmarks_have():
    """``benchmarks/device_call.sh`` runs on a lent GPU, whose minutes leave no room for a typo: every
    ``step_time.py`` command parses and names modes, optimizers and precisions its plan has (on CUDA unless it
    says ``--device``), every ``step_profile.py`` mode is a LocoProp-M mode of that plan or a BackProp one,
    ``grouped_tiles.py``'s configurations parse, and ``host_overhead.py`` takes its arguments."""
    import torch

    commands = _device_call_commands()
    assert sorted({name for name, _ in commands}) == ["grouped_tiles", "host_overhead", "step_profile", "step_time"]
    step_time = _module("step_time")
    cuda_modes = {c[4] for c in step_time.plan(torch.device("cuda"), ["standard"], [1000], list(step_time.OPTIMIZERS),
                                              [1, 10], ["fp32", "tf32", "bf16"])}
    for name, argv in commands:
        args = _module(name).arguments().parse_args(argv)
        if name == "step_time":
            assert set(args.optimizers) <= set(step_time.OPTIMIZERS), argv
            device = torch.device(args.device if "--device" in argv else "cuda")
            configs = step_time.plan(device, args.models, args.batch_sizes, args.optimizers, args.local_steps,
                                     args.precisions)
            chosen = step_time.select_precisions(step_time.select_modes(configs, args.modes), args.precisions)
            assert {c[4] for c in chosen} == set(args.modes), argv  # each mode has a configuration
            # every precision asked for has LocoProp configurations (BackProp's rows run in FP32 beside a bf16 one)
            assert {c[5] for c in chosen if c[2].startswith("locoprop")} == set(args.precisions), argv
            assert {c[5] for c in chosen} <= set(args.precisions) | {"fp32"}, argv
        elif name == "step_profile":
            assert set(args.modes) <= cuda_modes, argv
        elif name == "grouped_tiles":  # every configuration parses
            assert all(_module(name).parse_config(c) for c in args.configs), argv


def test_step_time_records_which_kernels_and_order_the_solve_ran_in():
    """``step_time.elementwise_kind``: PyTorch's operations on the CPU, the compiled update, and the grouped order
    (with its FP32 products on the tensor cores) where the last solve ran in it, not where it fell back."""
    import torch

    from locoprop.fused import FusedIterativeSolver

    kind, cpu = _module("step_time").elementwise_kind, torch.device("cpu")
    assert kind(FusedIterativeSolver(), cpu) == "torch"
    assert kind(FusedIterativeSolver(compile_elementwise=True), cpu) == "compiled"
    grouped = FusedIterativeSolver(order="grouped")
    assert grouped.solve_order == "layer-major" and kind(grouped, cpu) == "torch"  # no solve in that order yet
    grouped.solve_order = "grouped"  # as a solve that ran in it leaves it
    assert kind(grouped, cpu) == "triton:grouped"
    grouped.grouped_fp32_products = "tf32x3"
    assert kind(grouped, cpu) == "triton:grouped-tf32x3"


def test_grouped_tiles_times_each_tile_configuration_beside_the_layer_major_step(tmp_path, interpreted):
    """benchmarks/grouped_tiles.py (on the CPU, the grouped kernels in Triton's interpreter): one record for the
    layer-major step and one per configuration, in the grouped order with that configuration's tiles and launch
    options (the module's settings restored after each), ratios to the layer-major step, a README beside the
    JSON; a malformed configuration is refused by name before anything runs."""
    from locoprop import triton_kernels

    mod = _module("grouped_tiles")
    with pytest.raises(ValueError, match="--configs '64x48x32,64x64x32,4,3': expected RESIDUAL,UPDATE,WARPS,STAGES"):
        mod.main(["--configs", "64x48x32,64x64x32,4,3", "--device", "cpu"])
    before = (triton_kernels.GROUPED_RESIDUAL_BLOCKS, triton_kernels.GROUPED_UPDATE_BLOCKS,
              triton_kernels.GROUPED_LAUNCH_OPTIONS)
    out = tmp_path / "tiles.json"
    assert mod.main(["--device", "cpu", "--models", "tiny", "--batch-size", "8", "--local-steps", "2",
                     "--precisions", "fp32", "--configs", "32x32x16,16x32x16,2,-", "--warmup", "0", "--steps", "1",
                     "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["order"] for r in records] == ["layer-major", "grouped"]
    assert records[1]["residual_blocks"] == [32, 32, 16] and records[1]["update_blocks"] == [16, 32, 16]
    assert records[1]["launch_options"] == {"num_warps": 2} and records[0]["ratio_to_layer_major"] == 1.0
    assert records[1]["ratio_to_layer_major"] == records[1]["step_ms_median"] / records[0]["step_ms_median"]
    assert (triton_kernels.GROUPED_RESIDUAL_BLOCKS, triton_kernels.GROUPED_UPDATE_BLOCKS,
            triton_kernels.GROUPED_LAUNCH_OPTIONS) == before
    assert "| tiny | fp32 | grouped | [32, 32, 16] |" in (tmp_path / "README.md").read_text()


def test_grouped_tiles_resources_compile_each_kernel_for_hopper_and_read_its_registers_and_spills(tmp_path):
    """``benchmarks/grouped_tiles.py --resources 90`` (no GPU: Triton compiles for the H100/H200 here, in a process
    of its own, as tests/test_triton_kernels.py compiles): both grouped kernels of the default tiles and launch
    options, with their registers, stack and shared memory read from the cubin; with eight warps neither spills
    (the reason for the default, triton_kernels.GROUPED_LAUNCH_OPTIONS)."""
    import os
    import subprocess
    import sys

    from locoprop import triton_kernels

    pytest.importorskip("triton")
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "grouped_tiles.py"), "--resources", "90",
                           "--precisions", "fp32", "--configs", "64x64x32,64x64x32,8,-", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert [r["kernel"] for r in records] == ["grouped_residual", "grouped_gradient_update"]
    assert triton_kernels.GROUPED_LAUNCH_OPTIONS == {"num_warps": 8}
    for r in records:
        assert r["arch"] == 90 and r["num_warps"] == 8 and 0 < r["registers"] <= 255 and r["shared_bytes"] > 0
        assert r["stack_bytes"] == 0, r
    assert "| grouped_gradient_update | fp32 | no | 64x64x32 | 8 |" in (tmp_path / "README.md").read_text()


def test_interleaved_time_times_the_modes_in_turn_and_writes_their_ratios(tmp_path, monkeypatch):
    """benchmarks/interleaved_time.py: each mode built once and warmed up, then one step of each in turn per
    round (the order of the calls shows it), medians and ratios to the first mode in a JSON with its command."""
    mod = _module("interleaved_time")
    step_time = mod._step_time_module()
    build, calls = step_time.build_step, []

    def counting(spec, *args):
        step = build(spec, *args)

        def call():
            calls.append(spec["mode"])
            return step()
        return call
    monkeypatch.setattr(step_time, "build_step", counting)
    monkeypatch.setattr(mod, "_step_time_module", lambda: step_time)
    out = tmp_path / "t.json"
    assert mod.main(["--models", "tiny", "--batch-sizes", "8", "--modes", "fused", "fused-afterbackward",
                     "--local-steps", "2", "--rounds", "3", "--warmup", "1", "--out", str(out)]) == 0
    assert calls == ["fused", "fused-afterbackward"] + ["fused", "fused-afterbackward"] * 3
    data = json.loads(out.read_text())
    assert data["meta"]["command"].startswith("python ") and "--rounds 3" in data["meta"]["command"]
    records = data["records"]
    assert [r["mode"] for r in records] == ["fused", "fused-afterbackward"]
    assert records[0]["ratio_to_first_mode"] == 1.0 and all(r["steps_timed"] == 3 for r in records)
    assert records[1]["ratio_to_first_mode"] == records[1]["step_ms_median"] / records[0]["step_ms_median"]


def test_interleaved_time_times_a_baseline_revision_of_the_library_in_turn(tmp_path, capsys):
    """``--baseline REV``: each LocoProp mode is built a second time from the library of git revision ``REV`` (its
    own package, imported under another name: the optimizer is that version's class) and timed in turn with
    this checkout's; BackProp's modes once; the records and the header name the commits.  A revision git cannot
    read is refused by name before anything runs."""
    import subprocess

    import pytest

    from locoprop.harness.models import AutoencoderLoss, build_autoencoder
    from locoprop.harness.optimizers import build_optimizer

    mod = _module("interleaved_time")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.strip()
    library, commit = mod.library_of("HEAD", tmp_path / "lib")
    assert commit == head and library.__name__ == f"locoprop_{head[:12]}"
    assert not hasattr(library, "harness") and (tmp_path / "lib" / library.__name__ / "fused.py").exists()
    model = build_autoencoder("tiny", "tanh")
    with mod.built_with(library):
        opt = build_optimizer("locoprop-m", model, AutoencoderLoss(), lr=1e-3)
    assert type(opt).__module__ == f"{library.__name__}.optimizer"
    assert type(build_optimizer("locoprop-m", model, AutoencoderLoss(), lr=1e-3)).__module__ == "locoprop.optimizer"
    out = tmp_path / "t.json"
    assert mod.main(["--models", "tiny", "--batch-sizes", "8", "--modes", "rmsprop/eager", "fused",
                     "--baseline", "HEAD", "--local-steps", "2", "--rounds", "2", "--warmup", "1",
                     "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["baseline_commit"] == head and data["meta"]["commit"].startswith(head)
    assert [(r["mode"], r["library"]) for r in data["records"]] == [
        ("rmsprop/eager", "working tree"), ("fused", "working tree"), ("fused", head)]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        mod.main(["--modes", "fused", "--baseline", "no-such-revision", "--out", str(tmp_path / "no.json")])
    assert "--baseline 'no-such-revision'" in capsys.readouterr().err and not (tmp_path / "no.json").exists()


def test_interleaved_time_times_other_optimizers_and_precisions_beside_locoprop(tmp_path):
    """``[OPTIMIZER/]MODE[@PRECISION]``: BackProp + RMSProp and LocoProp-M with bf16 local products timed in turn
    with the FP32 step, each record naming its optimizer and precision; an unknown optimizer or precision is
    refused by name before anything runs."""
    import pytest

    mod = _module("interleaved_time")
    out = tmp_path / "t.json"
    assert mod.main(["--models", "tiny", "--batch-sizes", "8", "--modes", "rmsprop/eager", "fused", "fused@bf16",
                     "--local-steps", "2", "--rounds", "2", "--warmup", "1", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [(r["optimizer"], r["mode"], r["precision"], r["local_steps"]) for r in records] == [
        ("rmsprop", "rmsprop/eager", "fp32", 0), ("locoprop-m", "fused", "fp32", 2),
        ("locoprop-m", "fused@bf16", "bf16", 2)]
    for bad, says in (("adamw/eager", "the optimizer must be one of"), ("fused@fp16", "the precision must be")):
        with pytest.raises(SystemExit):
            mod.main(["--modes", bad, "--out", str(tmp_path / "no.json")])
        with pytest.raises(ValueError, match=says):
            mod.parse_mode(mod._step_time_module(), bad, 10)
    assert not (tmp_path / "no.json").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_cpu_residual_kernels_times_the_solvers_compiled_residual_and_its_eager_chain(tmp_path):
    """``cpu_residual_kernels.py`` times the library's compiled bf16 residual and the eager chain's operations
    for the same result (which agree: checked here), writes the records with the command and machine, and
    refuses a malformed shape by name before anything runs."""
    import torch

    from locoprop.losses import MatchingLoss
    from locoprop.transfer import Tanh

    mod = _module("cpu_residual_kernels")
    out = tmp_path / "r.json"
    assert mod.main(["--shapes", "12x5", "--variants", "compiled-quick-tanh", "eager-quick-tanh", "--repeats", "2",
                     "--flush-mb", "1", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["command"].startswith("python benchmarks/cpu_residual_kernels.py --shapes 12x5")
    assert [(r["variant"], r["rows"], r["columns"], r["repeats"]) for r in data["records"]] == [
        ("compiled-quick-tanh", 12, 5, 2), ("eager-quick-tanh", 12, 5, 2)]
    assert all(r["ms_min"] <= r["ms_median"] for r in data["records"])
    torch.manual_seed(0)  # the eager stand-in computes what the library's residual computes
    product = torch.randn(6, 4).to(torch.bfloat16)
    a0, y, db = torch.randn(6, 4), torch.rand(6, 4), torch.randn(4)
    from locoprop import fused

    ours = fused._bf16_residual_(MatchingLoss(), product, a0, db, y, Tanh().quick())
    eager = mod._eager_residual(MatchingLoss(), product, a0, db, y, Tanh().quick())
    assert torch.equal(ours[0], eager[0]) and torch.allclose(ours[1], eager[1])
    with pytest.raises(SystemExit):
        mod.main(["--shapes", "12by5", "--out", str(tmp_path / "no.json")])
    assert not (tmp_path / "no.json").exists()
