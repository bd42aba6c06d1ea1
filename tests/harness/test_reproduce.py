"""`locoprop reproduce` (issue 4): the figure configurations of configs/figures/, drawing a figure
from (re)used runs, settings taken from `locoprop tune --report` files, and Table 1's measurements."""

import json
from pathlib import Path

import pytest
import yaml

from locoprop.harness.cli import main as cli_main
from locoprop.harness.reproduce import figure_runs, fit_power_law, list_figures, load_figure
from locoprop.harness.train import TrainConfig

REPO = Path(__file__).resolve().parents[2]
FIGURES = REPO / "configs" / "figures"
EXPECTED = {"fig3a", "fig3b", "fig3c", "fig4-standard", "fig4-deep", "fig4-wide", "fig5-standard", "fig5-deep",
            "fig5-wide", "fig6a", "fig6b", "fig6c", "fig6d", "fig6e", "fig6f", "fig7", "fig8-standard",
            "fig8-deep", "fig8-wide"}
QUICK = ["--epochs", "2", "--limit-train", "100", "--limit-test", "50", "--set", "model=tiny", "--set",
         "batch_size=50", "--device", "cpu", "--no-progress", "--figures-dir", str(FIGURES)]


def test_every_figure_configuration_loads_and_names_valid_runs():
    names = set(list_figures(FIGURES))
    assert EXPECTED <= names
    by_run = {}
    for name in sorted(names):
        spec = load_figure(name, FIGURES)
        runs = figure_runs(spec, log=lambda s: None)
        assert runs and spec["plots"], name
        for run_name, cfg, origin in runs:
            TrainConfig.from_dict(cfg.__dict__).validate()
            assert origin == "untuned"  # placeholders, until a tuned file is given
            # figures share an experiment's runs: one name, one setting
            key = (spec["experiment"], run_name)
            assert by_run.setdefault(key, cfg) == cfg, f"{name}: {key} differs from another figure's"
        raw = yaml.safe_load((FIGURES / f"{name}.yaml").read_text())
        if "runs" in raw:  # the placeholders are marked as such
            assert "untuned defaults" in raw["note"] and "locoprop tune --report" in raw["note"]
    assert load_figure("fig5-deep", FIGURES)["plots"][0]["views"] == ["wall_time"]
    assert {p["metric"] for p in load_figure("fig7", FIGURES)["plots"]} == {"train_loss", "test_loss"}
    for name in ("fig6d", "fig6e", "fig6f", "fig8-standard", "fig8-deep", "fig8-wide"):
        assert load_figure(name, FIGURES)["plots"][0]["metric"] == "test_loss"


def test_settings_from_replaces_the_placeholders(tmp_path):
    tuned = tmp_path / "best-rmsprop.yaml"
    tuned.write_text(yaml.safe_dump({"settings": {"optimizer": "rmsprop", "lr": 0.0123, "beta1": 0.5,
                                                  "epochs": 3, "model": "standard"}}))
    fig = tmp_path / "figs"
    fig.mkdir()
    (fig / "f.yaml").write_text(yaml.safe_dump({
        "experiment": "e", "defaults": {"model": "tiny", "epochs": 20, "warmup_epochs": 2},
        "runs": [{"name": "r", "optimizer": "rmsprop", "lr": 1e-3, "settings_from": str(tuned)},
                 {"name": "a", "optimizer": "adam", "lr": 1e-3}],
        "plots": [{"file": "f", "metric": "train_loss", "views": ["epoch"]}]}))
    runs = figure_runs(load_figure("f", fig), {"epochs": 10}, log=lambda s: None)
    (_, r, origin), (_, a, untuned) = runs
    # the tuned keys only; the figure's own epochs and model stay, the warm-up keeps its share
    assert (r.lr, r.beta1, r.model, r.epochs, r.warmup_epochs) == (0.0123, 0.5, "tiny", 10, 1)
    assert origin == str(tuned) and untuned == "untuned" and a.lr == 1e-3
    # a figure of the notebook's protocol (99 of 100 epochs) keeps its one untrained epoch under --epochs
    (fig / "nb.yaml").write_text(yaml.safe_dump({
        "experiment": "e", "defaults": {"model": "tiny", "epochs": 99, "schedule_epochs": 100},
        "runs": [{"name": "a", "optimizer": "adam", "lr": 1e-3}], "plots": [{"file": "nb"}]}))
    (_, a, _), = figure_runs(load_figure("nb", fig), {"epochs": 9}, log=lambda s: None)
    assert (a.epochs, a.schedule_epochs) == (9, 10)
    # --settings-dir applies best-OPTIMIZER.yaml only where it was tuned for the same problem
    (fig / "g.yaml").write_text(yaml.safe_dump({
        "experiment": "e", "defaults": {"model": "standard"}, "runs": [{"name": "r", "optimizer": "rmsprop"}],
        "plots": [{"file": "g"}]}))
    (_, r, origin), = figure_runs(load_figure("g", fig), settings_dir=tmp_path, log=lambda s: None)
    assert r.lr == 0.0123 and origin.endswith("best-rmsprop.yaml")
    # several folders: the first with a file tuned for the same problem wins; one for another model is passed over
    other, longer = tmp_path / "other-model", tmp_path / "longer"
    for folder, model, lr in ((other, "wide", 0.5), (longer, "standard", 0.0077)):
        folder.mkdir()
        (folder / "best-rmsprop.yaml").write_text(yaml.safe_dump({"settings": {"optimizer": "rmsprop", "lr": lr,
                                                                               "model": model}}))
    notes = []
    (_, r, origin), = figure_runs(load_figure("g", fig), settings_dir=[other, longer, tmp_path], log=notes.append)
    assert r.lr == 0.0077 and origin == str(longer / "best-rmsprop.yaml")
    assert len(notes) == 1 and "other-model" in notes[0] and "model" in notes[0]
    # K-FAC's kl_clip belongs to the method the values were tuned for: it comes along; inverse_every does not
    (longer / "best-kfac.yaml").write_text(yaml.safe_dump({"settings": {
        "optimizer": "kfac", "model": "standard", "lr": 0.01, "kl_clip": 0.001, "inverse_every": 50}}))
    (fig / "k.yaml").write_text(yaml.safe_dump({
        "experiment": "e", "defaults": {"model": "standard"}, "runs": [{"name": "kfac", "optimizer": "kfac"}],
        "plots": [{"file": "k"}]}))
    (_, k, _), = figure_runs(load_figure("k", fig), settings_dir=[longer], log=lambda s: None)
    assert (k.lr, k.kl_clip, k.inverse_every) == (0.01, 0.001, 1)
    # so does Shampoo's root method
    (longer / "best-shampoo.yaml").write_text(yaml.safe_dump({"settings": {
        "optimizer": "shampoo", "model": "standard", "lr": 0.002, "shampoo_root": "eigh", "inverse_every": 1}}))
    (fig / "s.yaml").write_text(yaml.safe_dump({
        "experiment": "e", "defaults": {"model": "standard"},
        "runs": [{"name": "shampoo-at50", "optimizer": "shampoo", "inverse_every": 50}], "plots": [{"file": "s"}]}))
    (_, sh, _), = figure_runs(load_figure("s", fig), settings_dir=[longer], log=lambda s: None)
    assert (sh.lr, sh.shampoo_root, sh.inverse_every) == (0.002, "eigh", 50)
    bad = dict(yaml.safe_load((fig / "f.yaml").read_text()), colour="red")
    (fig / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key\(s\) \['colour'\]"):
        load_figure("bad", fig)


def test_reproduce_draws_a_figure_and_reuses_its_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["reproduce", "fig3a", "--out", str(out), *QUICK]) == 0
    pngs = list(out.glob("fig3a*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = sorted(p.parent for p in out.glob("*/*/metrics.jsonl"))
    assert [p.name for p in runs] == sorted(["sgd", "momentum", "nesterov", "adagrad", "adam", "rmsprop"])
    stamps = [(p / "metrics.jsonl").stat().st_mtime_ns for p in runs]
    capsys.readouterr()
    # the test-loss figure of the same runs (Fig. 3a's runs are Fig. 4's experiment): nothing retrained
    assert cli_main(["reproduce", "fig3a", "--out", str(out), *QUICK]) == 0
    assert capsys.readouterr().out.count(": reused") == 6
    assert stamps == [(p / "metrics.jsonl").stat().st_mtime_ns for p in runs]


def test_reproduce_rejects_unknown_figures(tmp_path, capsys):
    assert cli_main(["reproduce", "fig99", "--figures-dir", str(FIGURES)]) == 2
    assert "fig4-standard" in capsys.readouterr().err
    assert cli_main(["reproduce", "--list", "--figures-dir", str(FIGURES)]) == 0
    assert "table1" in capsys.readouterr().out
    assert cli_main(["reproduce", "table1", "--dims", "a,b", "--out", str(tmp_path)]) == 2


def test_table1_measures_and_fits_exponents(tmp_path, capsys):
    assert cli_main(["reproduce", "table1", "--dims", "16,32", "--batches", "8,16", "--local-steps", "1,2",
                     "--steps", "2", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    result = json.loads((tmp_path / "table1.json").read_text())
    labels = [r["optimizer"] for r in result["rows"]]
    assert set(labels) == {"adam", "shampoo", "kfac", "locoprop-m T=1", "locoprop-m T=2"}
    assert len(result["rows"]) == 5 * 4 and all(r["median_step_s"] > 0 for r in result["rows"])
    fits = result["fits"]
    # byte counts are exact: LocoProp keeps O(b * sum of widths) per step; the optimizer states do not grow with b
    assert fits["locoprop-m T=1"]["step_bytes"]["p_d"] == pytest.approx(1.0)
    assert fits["locoprop-m T=1"]["step_bytes"]["q_b"] == pytest.approx(1.0)
    for label in ("adam", "shampoo", "kfac", "locoprop-m T=2"):
        assert fits[label]["state_bytes"]["q_b"] == pytest.approx(0.0, abs=1e-9)
        assert 1.8 < fits[label]["state_bytes"]["p_d"] <= 2.0  # weights d^2 (+ biases d)
        assert fits[label]["median_step_s"] is not None
    assert "O(b T prod_i d_i)" in text and "O(sum_i d_i^3)" in text
    assert fit_power_law([(1, 1, 1.0), (2, 1, 4.0), (1, 2, 2.0), (2, 2, 8.0)])["p_d"] == pytest.approx(2.0)
