"""Harness: models, schedule, training runs, checkpoints and resume, divergence, plots, CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from locoprop.harness.cli import main as cli_main
from locoprop.harness.models import WIDTHS, autoencoder_loss, build_autoencoder
from locoprop.harness.optimizers import OPTIMIZER_NAMES, build_optimizer
from locoprop.harness.models import AutoencoderLoss
from locoprop.harness.train import TrainConfig, early_exit_reason, lr_factor, read_metrics, train

REPO = Path(__file__).resolve().parents[2]
TINY = dict(dataset="mnist", model="tiny", epochs=4, warmup_epochs=1, batch_size=50, limit_train=150,
            limit_test=100, device="cpu")


@pytest.mark.parametrize("size", sorted(WIDTHS))
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_autoencoders_have_the_reference_widths(size, activation):
    model = build_autoencoder(size, activation)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == WIDTHS[size] + [784]
    assert linears[0].in_features == 784
    # every hidden layer has the activation, except the linear code layer; the output is linear
    kinds = [type(m).__name__ for m in model]
    code_index = kinds.index("Linear", 2 * WIDTHS[size].index(min(WIDTHS[size])))
    assert kinds.count({"tanh": "Tanh", "relu": "ReLU"}[activation]) == len(WIDTHS[size]) - 1
    assert kinds[-1] == "Linear"
    for m in linears:  # Glorot-uniform weights and 1-D Glorot biases
        assert m.weight.abs().max() <= math.sqrt(6 / (m.in_features + m.out_features))
        assert m.bias.abs().max() <= math.sqrt(3 / m.out_features)
    assert code_index >= 0


def test_fresh_standard_model_scores_about_547_on_mnist():
    from locoprop.harness.data import load_dataset

    data = load_dataset("mnist", limit_train=5000)
    torch.manual_seed(0)
    loss = autoencoder_loss(build_autoencoder("standard")(data.train), data.train).item()
    assert 530 < loss < 565


def test_schedule_is_the_notebooks():
    assert [lr_factor(e, 100, 5) for e in range(6)] == [0, 0.2, 0.4, 0.6, 0.8, 1 - 1 / 95]
    assert lr_factor(99, 100, 5) == 0.0
    assert lr_factor(50, 100, 5) == pytest.approx(1 - 46 / 95)


@pytest.mark.parametrize("optimizer,extra", [
    ("rmsprop", dict(lr=1e-3, beta1=0.9, beta2=0.9)),
    ("locoprop-m", dict(lr=1e-4, activation_lr=10.0, beta1=0.9, beta2=0.9, eps=1e-8, local_steps=2)),
])
def test_notebook_protocol_trains_the_schedule_without_its_last_epoch(tmp_path, optimizer, extra):
    """``epochs=3, schedule_epochs=4``: the first three epochs of the 4-epoch run, bit for bit, without the
    fourth, whose learning rate is 0 (the authors' notebook: 99 epochs of a 100-epoch schedule)."""
    full = train(TrainConfig(optimizer=optimizer, **extra, **TINY), tmp_path / "full", progress=False,
                 log=lambda s: None)
    cut = train(TrainConfig(optimizer=optimizer, **extra, **{**TINY, "epochs": 3, "schedule_epochs": 4}),
                tmp_path / "cut", progress=False, log=lambda s: None)
    assert (full.status, cut.status, cut.epochs_done) == ("finished", "finished", 3)
    longer, shorter = read_metrics(tmp_path / "full")[0], read_metrics(tmp_path / "cut")[0]
    assert longer[-1]["lr"] == 0.0 and shorter[-1]["lr"] > 0
    key = lambda r: (r["epoch"], r["train_loss"], r["test_loss"], r["lr"], r["batch_loss"])  # noqa: E731
    assert [key(r) for r in shorter[1:]] == [key(r) for r in longer[1:4]]
    # a 3-epoch schedule decays faster: another run
    plain = train(TrainConfig(optimizer=optimizer, **extra, **{**TINY, "epochs": 3}), tmp_path / "plain",
                  progress=False, log=lambda s: None)
    assert read_metrics(plain.out)[0][2]["lr"] < shorter[2]["lr"]


@pytest.mark.parametrize("value", [3, 0, 2.5, "100"])
def test_schedule_epochs_must_cover_the_epochs_trained(value):
    with pytest.raises(ValueError, match=r"schedule_epochs: expected an integer >= epochs \(4\)"):
        TrainConfig(**TINY, schedule_epochs=value).validate()
    TrainConfig(**TINY, schedule_epochs=4).validate()


def test_the_warm_up_is_shorter_than_the_schedule_not_the_epochs_trained():
    """The first epochs of a long schedule may all lie in its warm-up (two epochs of the notebook's 100-epoch
    schedule, five of them warm-up); a warm-up as long as the schedule itself is refused, naming it."""
    TrainConfig(**{**TINY, "epochs": 2, "warmup_epochs": 5, "schedule_epochs": 100}).validate()
    for settings in (dict(epochs=2, warmup_epochs=5), dict(epochs=2, warmup_epochs=5, schedule_epochs=5),
                     dict(warmup_epochs=-1)):
        with pytest.raises(ValueError, match=r"warmup_epochs: expected 0 <= warmup_epochs < \d+ \(the epochs "
                                             r"the schedule spans"):
            TrainConfig(**{**TINY, **settings}).validate()


def test_early_exit_rules():
    assert early_exit_reason(float("nan"), 500, 1)
    assert early_exit_reason(1001, 500, 1)
    assert early_exit_reason(601, 601, 1)
    assert early_exit_reason(351, 351, 10)
    assert early_exit_reason(351, 351, 9) is None
    assert early_exit_reason(100, 100, 50) is None


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_name_takes_a_step(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4),
                                torch.nn.Linear(4, 12), torch.nn.Tanh(), torch.nn.Linear(12, 20))
    x = torch.rand(32, 20)
    loss_fn = AutoencoderLoss()
    opt = build_optimizer(name, model, loss_fn, lr=1e-3 if "closed" not in name else 0.1, beta1=0.9, beta2=0.99,
                          eps=1e-8, activation_lr=1.0, local_steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(lambda: loss_fn(model(x), x))
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match="valid names"):
        build_optimizer("lbfgs", torch.nn.Sequential(torch.nn.Linear(2, 2)), AutoencoderLoss(), lr=0.1)


def test_run_writes_config_metrics_and_checkpoint(tmp_path):
    cfg = TrainConfig(optimizer="rmsprop", lr=1e-3, beta1=0.9, beta2=0.9, **TINY)
    result = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert result.status == "finished"
    records, events = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4] and not events
    assert {"epoch", "train_loss", "test_loss", "wall_time", "lr"} <= set(records[1])
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["settings"]["optimizer"] == "rmsprop"
    assert "torch" in config["versions"] and config["device"].startswith("cpu")
    assert "mnist" in config["data_source"].lower() and config["synthetic_data"] is False
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 4
    with pytest.raises(FileExistsError, match="resume"):
        train(cfg, tmp_path / "run", progress=False, log=lambda s: None)


@pytest.mark.parametrize("optimizer,extra", [
    ("locoprop-m", dict(lr=1e-4, activation_lr=10.0, beta1=0.9, beta2=0.9, eps=1e-8, local_steps=3)),
    ("kfac", dict(lr=1e-3, inverse_every=2, early_exit=False)),
    ("shampoo", dict(lr=1e-3, inverse_every=2, early_exit=False)),
])
def test_resume_after_stop_gives_identical_metrics(tmp_path, optimizer, extra):
    cfg = TrainConfig(optimizer=optimizer, **{**TINY, **extra})
    train(cfg, tmp_path / "full", progress=False, log=lambda s: None)
    first = train(cfg, tmp_path / "cut", progress=False, log=lambda s: None, stop_after_epochs=2)
    assert first.status == "stopped"
    train(cfg, tmp_path / "cut", resume=True, progress=False, log=lambda s: None)
    full, _ = read_metrics(tmp_path / "full")
    cut, _ = read_metrics(tmp_path / "cut")
    assert [(r["epoch"], r["train_loss"], r["test_loss"]) for r in full] == \
        [(r["epoch"], r["train_loss"], r["test_loss"]) for r in cut]


def test_resume_after_sigkill_of_the_cli(tmp_path):
    """A real kill -9 of `locoprop train`, then --resume: the same losses as an uninterrupted run."""
    args = ["--optimizer", "locoprop-m", "--lr", "1e-4", "--activation-lr", "10", "--beta1", "0.9", "--beta2", "0.9",
            "--local-steps", "3", "--epochs", "8", "--model", "tiny", "--warmup-epochs", "1", "--batch-size", "50",
            "--limit-train", "300", "--limit-test", "100", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "locoprop", "train"]
    subprocess.run(cmd + args + ["--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + args + ["--out", str(tmp_path / "cut")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 2 <= done < 8, "the run was not killed mid-way; make it longer"
    subprocess.run(cmd + args + ["--out", str(tmp_path / "cut"), "--resume"], check=True, env=env,
                   capture_output=True)
    full, _ = read_metrics(tmp_path / "full")
    cut, _ = read_metrics(tmp_path / "cut")
    assert [(r["epoch"], r["train_loss"], r["test_loss"]) for r in full] == \
        [(r["epoch"], r["train_loss"], r["test_loss"]) for r in cut]


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(optimizer="sgd", lr=1e38, early_exit=False, **TINY)
    result = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert result.status == "diverged"
    records, events = read_metrics(tmp_path / "run")
    assert events and events[-1]["event"] == "diverged" and events[-1]["reason"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert ckpt["epoch"] == records[-1]["epoch"]


def test_early_exit_is_recorded(tmp_path):
    cfg = TrainConfig(optimizer="sgd", lr=1e-9, **{**TINY, "epochs": 12})
    result = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert result.status == "early-exit"
    _, events = read_metrics(tmp_path / "run")
    assert "350" in events[-1]["reason"]


def test_plot_and_compare_via_the_cli(tmp_path, capsys):
    spec = tmp_path / "cmp.yaml"
    spec.write_text(
        f"out: {tmp_path / 'cmp'}\n"
        "defaults: {dataset: mnist, model: tiny, epochs: 2, warmup_epochs: 1, batch_size: 50, "
        "limit_train: 100, limit_test: 50, device: cpu}\n"
        "runs:\n"
        "  - {name: rms, optimizer: rmsprop, lr: 0.001, beta1: 0.9, beta2: 0.9}\n"
        "  - {name: loco, optimizer: locoprop-m, lr: 0.0001, activation_lr: 10, beta1: 0.9, beta2: 0.9, "
        "local_steps: 2}\n")
    assert cli_main(["compare", str(spec), "--no-progress"]) == 0
    fig = tmp_path / "cmp" / "train_loss.png"
    assert fig.exists() and fig.stat().st_size > 10_000
    assert (tmp_path / "cmp" / "test_loss.png").stat().st_size > 10_000
    assert "loco" in capsys.readouterr().out
    out = tmp_path / "again.png"
    assert cli_main(["plot", str(tmp_path / "cmp" / "rms"), str(tmp_path / "cmp" / "loco"), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    import matplotlib.image

    one = tmp_path / "epochs.png"  # --views epoch: one panel, so a narrower image
    assert cli_main(["plot", str(tmp_path / "cmp" / "rms"), "--out", str(one), "--views", "epoch"]) == 0
    named = tmp_path / "named.png"
    assert cli_main(["plot", str(tmp_path / "cmp" / "rms"), "--out", str(named), "--labels", "RMSProp"]) == 0
    assert named.exists()
    wrong = tmp_path / "wrong.png"
    assert cli_main(["plot", str(tmp_path / "cmp" / "rms"), "--out", str(wrong), "--labels", "a", "b"]) != 0
    assert not wrong.exists()
    assert matplotlib.image.imread(one).shape[1] < matplotlib.image.imread(out).shape[1]


def test_legend_labels_name_the_device_where_runs_come_from_several():
    from locoprop.harness.plots import legend_labels

    def run(device, events=()):
        return {"config": {"settings": dict(optimizer="rmsprop", lr=1e-3), "device": device}, "events": list(events),
                "dir": Path("x")}

    same = legend_labels([run("cpu (x86_64, 2 threads)"), run("cpu (x86_64, 1 threads)")])
    assert same == ["rmsprop η=0.001"] * 2
    mixed = legend_labels([run("cpu (x86_64, 2 threads)"), run("NVIDIA H200", [{"event": "diverged"}])])
    assert mixed == ["rmsprop η=0.001, cpu", "rmsprop η=0.001, NVIDIA H200 [diverged]"]
    assert legend_labels([run("cpu"), run("cpu")], ["fp32", "bf16"]) == ["fp32", "bf16"]
    with pytest.raises(ValueError, match="labels: expected one per run, 2, got 1"):
        legend_labels([run("cpu"), run("cpu")], ["fp32"])


def test_config_files_read_exponent_numbers_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-05`` as text; a settings file with it (``json.dumps(1e-5)`` writes it) still
    trains with the number, and text that is no number is refused, naming the setting."""
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"settings": {**TINY, "optimizer": "rmsprop", "lr": 1e-05, "eps": 1e-08,
                                             "epochs": 1, "warmup_epochs": 0}}))
    assert cli_main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert (config["lr"], config["eps"]) == (1e-05, 1e-08)
    with pytest.raises(ValueError, match="lr: expected a number, got 'fast'"):
        TrainConfig.from_dict({"lr": "fast"})


def test_cli_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs: !!python/object/apply:os.system ['echo hacked']\n")
    assert cli_main(["compare", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert cli_main(["train", "--optimizer", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "optimizer" in capsys.readouterr().err


def test_precision_setting_reaches_the_locoprop_fast_solver(tmp_path):
    """`--precision bf16` trains LocoProp-M on the fast solver and lands close to FP32 on the same run."""
    finals = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(optimizer="locoprop-m", lr=1e-4, activation_lr=10.0, beta1=0.9, beta2=0.9, eps=1e-8,
                          local_steps=3, precision=precision, **TINY)
        result = train(cfg, tmp_path / precision, progress=False, log=lambda s: None)
        assert result.status == "finished"
        finals[precision] = result.final_train_loss
        saved = json.loads((tmp_path / precision / "config.json").read_text())["settings"]
        assert saved["precision"] == precision and saved["cuda_graph"] is True
    assert finals["bf16"] != finals["fp32"]
    assert abs(finals["bf16"] - finals["fp32"]) / finals["fp32"] < 0.01
    assert TrainConfig(optimizer="locoprop-m", precision="bf16").label().endswith(" bf16")
    assert "fp32" not in TrainConfig(optimizer="locoprop-m").label()


@pytest.mark.parametrize("values, match", [
    (dict(optimizer="adam", precision="bf16"), "precision: 'bf16' applies to the LocoProp optimizers only"),
    (dict(optimizer="locoprop-m", precision="fp16"), "precision: expected auto, fp32, tf32 or bf16"),
    (dict(optimizer="locoprop-m", rollback="disk"), "rollback: expected device or host, got 'disk'"),
    (dict(optimizer="rmsprop", rollback="host"), "rollback: 'host' applies to the LocoProp optimizers only"),
    (dict(optimizer="rmsprop", check_finite=False), "check_finite: False applies to the LocoProp optimizers only"),
    (dict(optimizer="rmsprop", check_finite="layer"), "check_finite: 'layer' applies to the LocoProp optimizers"),
    (dict(optimizer="locoprop-m", check_finite="step"), "check_finite: expected true, false or layer, got 'step'"),
    (dict(optimizer="adam", compile_elementwise=True), "compile_elementwise: True applies to the LocoProp optimizers"),
    (dict(optimizer="adam", solve_order="iteration-major"), "solve_order: 'iteration-major' applies to the LocoProp"),
    (dict(optimizer="adam", triton_elementwise=False), "triton_elementwise: False applies to the LocoProp optimizers"),
    (dict(optimizer="locoprop-m", triton_elementwise="yes"), "triton_elementwise: expected true, false or unset"),
    (dict(optimizer="adam", solve_in_backward=False), "solve_in_backward: False applies to the LocoProp optimizers"),
    (dict(optimizer="locoprop-m", solve_in_backward="yes"),
     "solve_in_backward: expected true, false, overlap or unset"),
    (dict(optimizer="locoprop-m", solve_order="rows"),
     "solve_order: expected layer-major or iteration-major or grouped"),
    (dict(optimizer="shampoo", shampoo_root="svd"), "shampoo_root: expected newton or eigh, got 'svd'"),
    (dict(optimizer="kfac", shampoo_root="eigh"), "shampoo_root: 'eigh' applies to shampoo only, not 'kfac'"),
])
def test_method_setting_errors_name_the_setting(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**values).validate()


def test_shampoo_root_setting_reaches_the_shampoo_optimizer(tmp_path, newton_roots):
    """`--shampoo-root eigh` trains Shampoo with the eigendecomposition roots: the run records the setting and its
    label, and its optimizer never calls the library's Newton iteration."""
    for root in ("newton", "eigh"):
        cfg = TrainConfig(optimizer="shampoo", lr=1e-3, shampoo_root=root, **TINY)
        newton_roots.calls = 0
        assert train(cfg, tmp_path / root, progress=False, log=lambda s: None).status == "finished"
        assert (newton_roots.calls > 0) == (root == "newton")
    saved = json.loads((tmp_path / "eigh" / "config.json").read_text())["settings"]
    assert saved["shampoo_root"] == "eigh"
    assert TrainConfig(optimizer="shampoo", shampoo_root="eigh").label().endswith(" root=eigh")
    assert "root" not in TrainConfig(optimizer="shampoo").label()
    assert TrainConfig(optimizer="adam", seed=3).label().endswith(" seed=3")
    assert "seed" not in TrainConfig(optimizer="adam").label()


def test_rollback_and_compile_settings_reach_the_locoprop_optimizer(tmp_path):
    """`--rollback host` and `--compile-elementwise` are LocoProp's arguments of the same names: a run records
    them, and the optimizer it builds carries them."""
    from locoprop.harness.models import AutoencoderLoss, build_autoencoder
    from locoprop.harness.optimizers import build_optimizer

    model = build_autoencoder("tiny", "tanh", input_dim=784)
    opt = build_optimizer("locoprop-m", model, AutoencoderLoss(), lr=1e-4, rollback="host", compile_elementwise=True,
                          solve_order="iteration-major")
    assert opt.rollback == "host" and opt.fused_solver.compile_elementwise is True
    assert opt.fused_solver.order == "iteration-major"
    opt = build_optimizer("locoprop-m", model, AutoencoderLoss(), lr=1e-4)
    assert opt.rollback == "device" and opt.fused_solver.compile_elementwise is False
    assert opt.fused_solver.order == "layer-major"
    cfg = TrainConfig(optimizer="locoprop-m", lr=1e-4, activation_lr=10.0, local_steps=2, rollback="host",
                      solve_order="iteration-major", **TINY)
    assert train(cfg, tmp_path / "run", progress=False, log=lambda s: None).status == "finished"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert saved["rollback"] == "host" and saved["compile_elementwise"] is False
    assert saved["solve_order"] == "iteration-major"


def test_every_command_prints_its_help(capsys):
    """Each subcommand's --help formats (a stray % in a help string breaks argparse only when printed)."""
    from locoprop.harness.cli import build_parser

    parser = build_parser()
    commands = [a for a in parser._subparsers._group_actions[0].choices]
    assert "train" in commands and "tune" in commands
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_triton_elementwise_setting_reaches_the_fast_solver(tmp_path):
    """`--no-triton-elementwise` (and the YAML key) reach LocoProp's fast solver; unset, it stays automatic."""
    from locoprop.harness.cli import build_parser, _config_from

    for argv, expected in (([], None), (["--no-triton-elementwise"], False), (["--triton-elementwise"], True)):
        args = build_parser().parse_args(["train", "--optimizer", "locoprop-m", "--out", str(tmp_path), *argv])
        cfg = _config_from(args)
        assert cfg.triton_elementwise is expected
        opt = build_optimizer("locoprop-m", build_autoencoder("tiny", "tanh"), AutoencoderLoss(), lr=1e-3,
                              triton_elementwise=cfg.triton_elementwise)
        assert opt.fused_solver.triton_elementwise is expected


def test_solve_in_backward_setting_reaches_the_optimizer(tmp_path):
    """`--solve-in-backward` / `--no-solve-in-backward` (and the YAML key) reach LocoProp; unset, it stays
    automatic, and a step on the CPU then solves in the backward pass only with the finite check."""
    from locoprop.harness.cli import build_parser, _config_from

    for argv, expected in (([], None), (["--no-solve-in-backward"], False), (["--solve-in-backward"], True),
                           (["--solve-in-backward", "overlap"], "overlap")):
        args = build_parser().parse_args(["train", "--optimizer", "locoprop-m", "--out", str(tmp_path), *argv])
        cfg = _config_from(args)
        assert cfg.solve_in_backward == expected and type(cfg.solve_in_backward) is type(expected)
        for check_finite in (True, False):
            opt = build_optimizer("locoprop-m", build_autoencoder("tiny", "tanh"), AutoencoderLoss(), lr=1e-3,
                                  check_finite=check_finite, solve_in_backward=cfg.solve_in_backward)
            assert opt.solve_in_backward == expected
            assert opt._solves_in_backward([None], False) == (expected in (True, "overlap")
                                                               or (expected is None and check_finite))


def test_check_finite_layer_reaches_the_optimizer_trains_as_the_default_and_stops_a_diverged_run(tmp_path,
                                                                                                 monkeypatch):
    """`--check-finite layer` (and the YAML key) build LocoProp with ``check_finite="layer"``: a run trains to the
    same losses as with the default check, and one whose update diverges stops there as diverged, naming the
    layers undone; `--check-finite` alone is true, `--no-check-finite` false, another word an error."""
    from locoprop.harness import train as train_module
    from locoprop.harness.cli import build_parser, _config_from

    parser = build_parser()
    for argv, expected in (([], True), (["--check-finite"], True), (["--check-finite", "layer"], "layer"),
                           (["--no-check-finite"], False)):
        args = parser.parse_args(["train", "--optimizer", "locoprop-m", "--out", str(tmp_path), *argv])
        assert _config_from(args).check_finite == expected and type(_config_from(args).check_finite) is type(expected)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--out", str(tmp_path), "--check-finite", "yes"])
    built = []
    original = train_module.build_optimizer
    monkeypatch.setattr(train_module, "build_optimizer", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    settings = dict(optimizer="locoprop-m", lr=1e-4, activation_lr=10.0, local_steps=2, **TINY)
    train(TrainConfig(**settings), tmp_path / "check", progress=False, log=lambda s: None)
    result = train(TrainConfig(**settings, check_finite="layer"), tmp_path / "layer", progress=False,
                   log=lambda s: None)
    assert built[1].check_finite == "layer" and result.status == "finished"
    key = lambda r: (r["epoch"], r["train_loss"], r["test_loss"], r.get("batch_loss"))  # noqa: E731
    assert [key(r) for r in read_metrics(tmp_path / "check")[0]] == \
        [key(r) for r in read_metrics(tmp_path / "layer")[0]]
    out = tmp_path / "diverged"
    result = train(TrainConfig(**{**settings, "activation_lr": 1e300}, check_finite="layer"), out, progress=False,
                   log=lambda s: None)
    records, events = read_metrics(out)
    assert result.status == "diverged" and "were undone, the others kept their update" in events[-1]["reason"]
    assert records[-1]["epoch"] == 0 and not (out / "checkpoint.pt").exists()


def test_the_batch_loss_is_the_host_mean_of_the_step_losses_read_only_now_and_then(tmp_path, monkeypatch):
    """The running mean of an epoch's batch losses is kept on the device (on a GPU no read-back, so no wait for
    the GPU, after every step; read every ``LOSS_READ_EVERY`` steps and at the epoch's end) and equals the
    host's float64 mean of the steps' losses to the bit."""
    from locoprop.harness import train as train_module

    losses = []
    built = train_module.build_optimizer

    def recording(*args, **kwargs):
        opt = built(*args, **kwargs)
        step = opt.step

        def recorded(closure):
            loss = step(closure)
            losses.append(float(loss))
            return loss
        opt.step = recorded
        return opt
    monkeypatch.setattr(train_module, "build_optimizer", recording)
    cfg = TrainConfig(optimizer="rmsprop", lr=1e-3, **{**TINY, "epochs": 2})
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    records, _ = read_metrics(tmp_path / "run")
    per_epoch = len(losses) // 2
    for epoch, rec in enumerate(records[1:]):
        running = 0.0
        for i, value in enumerate(losses[epoch * per_epoch:(epoch + 1) * per_epoch]):
            running += (value - running) / (i + 1)
        assert rec["batch_loss"] == running
    assert per_epoch == 3 and len(records) == 3


def test_a_locoprop_run_without_the_finite_check_stops_at_a_later_non_finite_loss(tmp_path, monkeypatch):
    """``--no-check-finite`` builds LocoProp with ``check_finite=False`` (no copy to undo a step; a captured
    step on CUDA reads nothing back): a run trains as with the check, to the same losses, and one that diverges
    stops as diverged at a later step's non-finite loss (here, eagerly, the next step's; a captured step's at
    the next read of the running loss), writing no epoch of NaN weights, as a run with the check stops at the
    step itself."""
    from locoprop.harness import train as train_module

    built = []
    original = train_module.build_optimizer
    monkeypatch.setattr(train_module, "build_optimizer", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    settings = dict(optimizer="locoprop-m", lr=1e-4, activation_lr=10.0, local_steps=2, **TINY)
    plain = train(TrainConfig(**settings), tmp_path / "check", progress=False, log=lambda s: None)
    unchecked = train(TrainConfig(**settings, check_finite=False), tmp_path / "nocheck", progress=False,
                      log=lambda s: None)
    assert built[0].check_finite and not built[1].check_finite
    assert (plain.status, unchecked.status) == ("finished", "finished")
    key = lambda r: (r["epoch"], r["train_loss"], r["test_loss"], r.get("batch_loss"))  # noqa: E731
    assert [key(r) for r in read_metrics(tmp_path / "check")[0]] == \
        [key(r) for r in read_metrics(tmp_path / "nocheck")[0]]
    for check in (True, False):
        out = tmp_path / f"diverged-{check}"
        result = train(TrainConfig(**{**settings, "activation_lr": 1e300}, check_finite=check), out,
                       progress=False, log=lambda s: None)
        records, events = read_metrics(out)
        assert result.status == "diverged" and events[-1]["event"] == "diverged", check
        reason = events[-1]["reason"]
        assert ("not finite" in reason) if check else ("loss is nan" in reason), reason
        assert records[-1]["epoch"] == 0 and not (out / "checkpoint.pt").exists()  # no epoch ended: none saved
