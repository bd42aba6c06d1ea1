"""A population (locoprop.harness.population) computes what separate runs compute, member by member."""

import copy
import json

import pytest
import torch

from locoprop.harness.models import AutoencoderLoss, build_autoencoder
from locoprop.harness.optimizers import build_optimizer
from locoprop.harness.population import Member, Population

MEMBERS = [
    Member(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, activation_lr=10.0),
    Member(lr=1e-2, beta1=0.5, beta2=0.99, eps=1e-6, activation_lr=100.0),
    Member(lr=5e-4, activation_lr=1000.0),  # TF-RMSProp's defaults for beta1, beta2, eps
]
FACTORS = (0.0, 0.5, 1.0, 1.0, 0.25)  # the schedule's factors, a zero (warm-up's first epoch) included


def _data(dtype, n=40, d=20):
    return torch.rand(len(FACTORS), n, d, dtype=dtype, generator=torch.Generator().manual_seed(3))


def _separate_run(model, name, member, batches, local_steps):
    model = copy.deepcopy(model)
    loss_fn = AutoencoderLoss()
    opt = build_optimizer(name, model, loss_fn, lr=member.lr, beta1=member.beta1, beta2=member.beta2,
                          eps=member.eps, activation_lr=member.activation_lr, local_steps=local_steps)
    losses = []
    for x, factor in zip(batches, FACTORS):
        for g in opt.param_groups:
            g["lr"] = member.lr * factor
        losses.append(float(opt.step(lambda: loss_fn(model(x), x))))
    return model, losses


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("name, local_steps", [("locoprop-m", 4), ("locoprop-s", 3), ("rmsprop", 0), ("sgd", 0),
                                               ("momentum", 0), ("nesterov", 0), ("adam", 0), ("adagrad", 0)])
def test_every_member_equals_its_separate_run(name, local_steps, dtype, rtol):
    """Five steps of three members with their own settings (one leaves beta1, beta2 and eps to the optimizer's
    defaults; one step at learning rate 0, as in the first warm-up epoch) against three separate runs through
    the harness's optimizers: weights and batch losses."""
    torch.manual_seed(0)
    model = build_autoencoder("tiny", "tanh", input_dim=20, dtype=dtype)
    batches = _data(dtype)
    pop = Population(model, name, MEMBERS, local_steps=max(local_steps, 1))
    pop_losses = torch.stack([pop.step(x, f) for x, f in zip(batches, FACTORS)], 1)
    for j, member in enumerate(MEMBERS):
        alone, losses = _separate_run(model, name, member, batches, local_steps or 10)
        mine = pop.member_model(j, copy.deepcopy(model))
        for (pname, a), b in zip(alone.named_parameters(), mine.parameters()):
            torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * 1e-2, msg=f"member {j}, {pname}")
        torch.testing.assert_close(pop_losses[j], torch.tensor(losses, dtype=dtype), rtol=rtol, atol=0)
        moved = max((a - p).abs().max().item() for a, p in zip(alone.parameters(), model.parameters()))
        assert moved > 100 * rtol * 1e-2  # the weights moved far beyond the tolerance: not a check of initial ones


TINY = dict(dataset="mnist", model="tiny", epochs=3, warmup_epochs=1, batch_size=50, limit_train=150,
            limit_test=100, device="cpu", dtype="float64")


def _configs(optimizer):
    from locoprop.harness.train import TrainConfig

    return [TrainConfig(optimizer=optimizer, local_steps=3, lr=m.lr, beta1=m.beta1, beta2=m.beta2, eps=m.eps,
                        activation_lr=m.activation_lr, **TINY) for m in MEMBERS]


@pytest.mark.parametrize("name", ["locoprop-m", "adam"])
def test_relu_members_equal_their_separate_runs(name):
    """The ReLU autoencoder (LocoProp-M's matching loss of ReLU, the model's own nn.ReLU in the forward pass)."""
    torch.manual_seed(1)
    model = build_autoencoder("tiny", "relu", input_dim=20, dtype=torch.float64)
    batches = _data(torch.float64)
    pop = Population(model, name, MEMBERS, local_steps=4)
    for x, f in zip(batches, FACTORS):
        pop.step(x, f)
    for j, member in enumerate(MEMBERS):
        alone, _ = _separate_run(model, name, member, batches, 4)
        for a, b in zip(alone.parameters(), pop.member_model(j, copy.deepcopy(model)).parameters()):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["locoprop-m", "rmsprop"])
def test_a_population_run_writes_what_separate_runs_write(tmp_path, optimizer):
    from locoprop.harness.population import train_population
    from locoprop.harness.train import read_metrics, train

    configs = _configs(optimizer)
    results = train_population(configs, [tmp_path / f"pop-{j}" for j in range(len(configs))], log=lambda s: None)
    for j, cfg in enumerate(configs):
        alone = train(cfg, tmp_path / f"alone-{j}", progress=False, log=lambda s: None)
        assert (results[j].status, results[j].epochs_done) == (alone.status, alone.epochs_done) == ("finished", 3)
        mine, _ = read_metrics(tmp_path / f"pop-{j}")
        theirs, _ = read_metrics(tmp_path / f"alone-{j}")
        assert [r["epoch"] for r in mine] == [r["epoch"] for r in theirs] == [0, 1, 2, 3]
        for key in ("train_loss", "test_loss", "lr", "step"):
            assert [r[key] for r in mine] == pytest.approx([r[key] for r in theirs], rel=1e-10), (j, key)
        assert results[j].final_train_loss == pytest.approx(alone.final_train_loss, rel=1e-10)
        config = json.loads((tmp_path / f"pop-{j}" / "config.json").read_text())
        assert config["population"]["size"] == 3 and config["settings"]["lr"] == cfg.lr


def test_members_with_their_own_seeds_equal_their_separate_runs(tmp_path):
    """PER_MEMBER's seed: each member its own initial weights and order of batches (locoprop train --seeds);
    trained as the notebook does, 3 epochs of a 4-epoch schedule (``schedule_epochs``)."""
    from dataclasses import replace

    from locoprop.harness.population import train_population
    from locoprop.harness.train import read_metrics, train

    base = _configs("locoprop-m")[0]
    configs = [replace(base, seed=s, schedule_epochs=4) for s in (0, 1, 7)]
    results = train_population(configs, [tmp_path / f"pop-{j}" for j in range(3)], log=lambda s: None)
    finals = []
    for j, cfg in enumerate(configs):
        alone = train(cfg, tmp_path / f"alone-{j}", progress=False, log=lambda s: None)
        mine, _ = read_metrics(tmp_path / f"pop-{j}")
        theirs, _ = read_metrics(tmp_path / f"alone-{j}")
        assert [r["train_loss"] for r in mine] == pytest.approx([r["train_loss"] for r in theirs], rel=1e-10)
        assert [r["lr"] for r in mine] == [r["lr"] for r in theirs] and mine[-1]["lr"] == pytest.approx(cfg.lr / 3)
        finals.append(results[j].final_train_loss)
    assert len(set(finals)) == 3  # three seeds, three different runs


def test_ended_members_leave_the_population_and_the_others_go_on(tmp_path):
    from dataclasses import replace

    from locoprop.harness.population import train_population
    from locoprop.harness.train import read_metrics, train

    configs = _configs("rmsprop")
    configs[0] = replace(configs[0], lr=1e300, early_exit=False)  # diverges in epoch 2 (the warm-up epoch has lr 0)
    seen = []

    def on_epoch(j, rec):
        seen.append((j, rec["epoch"]))
        return "pruned here" if j == 2 and rec["epoch"] == 2 else None

    results = train_population(configs, [tmp_path / f"pop-{j}" for j in range(3)], log=lambda s: None,
                               on_epoch=on_epoch, on_end=lambda j, result: seen.append((j, result.status)))
    assert [r.status for r in results] == ["diverged", "finished", "pruned"]
    assert results[0].reason.startswith("epoch 2:") and results[2].epochs_done == 2
    diverged = train(configs[0], tmp_path / "alone-0", progress=False, log=lambda s: None)
    assert (diverged.status, diverged.epochs_done) == ("diverged", results[0].epochs_done) == ("diverged", 1)
    # each run ends (on_end) when its member does, while the others go on
    assert seen == [(0, 1), (1, 1), (2, 1), (0, "diverged"), (1, 2), (2, 2), (2, "pruned"), (1, 3), (1, "finished")]
    # the member that went on to the end is the separate run still (the stack shrank around it)
    alone = train(configs[1], tmp_path / "alone", progress=False, log=lambda s: None)
    assert results[1].final_train_loss == pytest.approx(alone.final_train_loss, rel=1e-10)
    _, events = read_metrics(tmp_path / "pop-2")
    assert events[-1]["event"] == "pruned"


def test_bad_population_input_names_the_setting(tmp_path):
    from dataclasses import replace

    from locoprop.harness.population import train_population

    configs = _configs("locoprop-m")
    cases = [
        ([replace(configs[0], optimizer="shampoo")], "optimizer: a population trains .*, not 'shampoo'"),
        ([replace(configs[0], precision="bf16")], "precision: a population runs auto, fp32 or tf32"),
        ([replace(configs[0], inner="adam")], "inner: a population runs inner='tf_rmsprop' only"),
        ([configs[0], replace(configs[1], epochs=5)], r"configs\[1\]: differs from configs\[0\] in \['epochs'\]"),
    ]
    for given, message in cases:
        with pytest.raises(ValueError, match=message):
            train_population(given, [tmp_path / f"x{j}" for j in range(len(given))], log=lambda s: None)
    assert not any(tmp_path.iterdir())  # nothing written
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="taken: a run is already there"):
        train_population(configs[:1], [tmp_path / "taken"], log=lambda s: None)
    from torch import nn

    dropout = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 20))
    with pytest.raises(ValueError, match=r"model: a population stacks .* not \['2 \(Dropout\)'\]"):
        Population(dropout, "adam", MEMBERS)
    with pytest.raises(ValueError, match="not a Linear without a bias"):
        Population(nn.Sequential(nn.Linear(20, 8, bias=False), nn.Tanh(), nn.Linear(8, 20)), "adam", MEMBERS)
    tiny = build_autoencoder("tiny", "tanh", input_dim=20)
    with pytest.raises(ValueError, match=r"model: one model, or one per member \(3\), got 2"):
        Population([tiny, tiny], "adam", MEMBERS)
    with pytest.raises(ValueError, match="model: the members' models differ in their Linear layers"):
        Population([tiny, tiny, build_autoencoder("tiny", "tanh", input_dim=30)], "adam", MEMBERS)
    with pytest.raises(ValueError, match="members: a population needs at least one member"):
        Population(build_autoencoder("tiny", "tanh", input_dim=20), "locoprop-m", [])


def test_compiled_updates_agree_with_the_eager_ones():
    """compile_update=True: each tensor's TF-RMSProp update as one compiled kernel (dynamic shapes: one
    compilation for every layer), equal to the eager population up to rounding."""
    torch.manual_seed(0)
    model = build_autoencoder("tiny", "tanh", input_dim=20, dtype=torch.float64)
    batches = _data(torch.float64)
    eager = Population(model, "locoprop-m", MEMBERS, local_steps=3)
    fused = Population(model, "locoprop-m", MEMBERS, local_steps=3, compile_update=True)
    for x, f in zip(batches, FACTORS):
        torch.testing.assert_close(fused.step(x, f), eager.step(x, f), rtol=1e-10, atol=0)
    for a, b in zip(eager.params(), fused.params()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert max((a - p).abs().max().item() for a, p in zip(eager.params(), Population(
        model, "locoprop-m", MEMBERS).params())) > 1e-3


def test_train_seeds_trains_one_run_per_seed_as_a_population(tmp_path, capsys):
    """`locoprop train --seeds 0 3`: OUT/seed-0 and OUT/seed-3, each the separate run of its seed, and
    OUT/seeds.json with their mean and spread; a repeated seed or --resume is refused."""
    import statistics

    from locoprop.harness.cli import main as cli_main
    from locoprop.harness.train import TrainConfig, train

    args = ["train", "--dataset", "mnist", "--model", "tiny", "--epochs", "2", "--warmup-epochs", "1",
            "--batch-size", "50", "--limit-train", "150", "--limit-test", "100", "--device", "cpu",
            "--optimizer", "rmsprop", "--lr", "0.001", "--no-progress", "--out", str(tmp_path / "seeds")]
    assert cli_main(args + ["--seeds", "0", "3"]) == 0
    summary = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [0, 3] and summary["finished"] == 2
    finals = [r["final_train_loss"] for r in summary["runs"]]
    assert summary["final_train_loss_mean"] == pytest.approx(statistics.fmean(finals))
    assert summary["final_train_loss_stdev"] == pytest.approx(statistics.stdev(finals)) and finals[0] != finals[1]
    cfg = TrainConfig(dataset="mnist", model="tiny", epochs=2, warmup_epochs=1, batch_size=50, limit_train=150,
                      limit_test=100, device="cpu", optimizer="rmsprop", lr=0.001, seed=3)
    alone = train(cfg, tmp_path / "alone", progress=False, log=lambda s: None)
    assert finals[1] == pytest.approx(alone.final_train_loss, rel=1e-5)
    assert "2 of 2 finished: final train loss" in capsys.readouterr().out
    assert cli_main(args[:-1] + [str(tmp_path / "again"), "--seeds", "1", "1"]) == 2
    assert cli_main(args[:-1] + [str(tmp_path / "again"), "--seeds", "1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--seeds: each seed once, got [1, 1]" in err and "cannot --resume" in err
    assert not (tmp_path / "again").exists()
