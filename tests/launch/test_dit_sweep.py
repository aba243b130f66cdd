"""The DiT size x patch sweep on Fashion-MNIST, and collect's per-run columns: params and
Gflops from a run's config.json, train images/s from its metrics.jsonl."""

import csv
import json
from pathlib import Path

import pytest

from diffjax import configlib, experiment
from diffjax.models import dit
from launch import collect
from launch.spec import expand, load_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "experiments" / "sweeps" / "fashion_mnist_dit.py"
NAMES = [f"depth-{d}_D-{h}_heads-{n}_patch-{p}" for d, h, n in ((4, 64, 2), (6, 128, 4))
         for p in (2, 4, 7)]


def run_config(sweep, run):
    """The resolved config a run trains with: base config, fixed overrides, its axis values."""
    c = configlib.load_config_file(str(REPO / sweep.config))
    c.update_from_flattened_dict({**sweep.overrides, **run.assignment})
    return c


@pytest.fixture(scope="module")
def sweep():
    return load_sweep(SWEEP)


def test_sweep_lists_size_x_patch_runs_that_train_then_eval(sweep):
    runs = expand(sweep)
    assert [r.name for r in runs] == NAMES
    assert sweep.modes == ("train", "eval") and sweep.checkpoint is None
    for run in runs:
        c = run_config(sweep, run)
        module = experiment.build_model(c)
        assert isinstance(module, dit.DiT)
        assert (module.input_size, module.in_channels, module.num_classes) == (28, 1, 10)
        assert (module.depth, module.hidden_size, module.num_heads, module.patch_size) == (
            run.assignment["model.dit.depth"], run.assignment["model.dit.hidden_size"],
            run.assignment["model.dit.num_heads"], run.assignment["model.dit.patch_size"])
        assert c.diffusion.prediction == "v" and c.guidance.type == "classifier_free"


def make_run(root, sweep, run, *, rates, fd):
    d = root / run.name
    (d / "eval").mkdir(parents=True)
    (d / "sweep_run.json").write_text(json.dumps(
        {"name": run.name, "axes": run.assignment, "labels": run.labels}))
    (d / "sweep_done.json").write_text("{}")
    # As diffjax.main --mode train writes them: the resolved config and one line per log.
    (d / "config.json").write_text(json.dumps(run_config(sweep, run).to_dict(), default=str))
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 50 * (i + 1), "loss": 0.1, "examples_per_sec": r}) + "\n"
        for i, r in enumerate(rates)) + '{"step": 2')  # a line cut off by a preemption
    (d / "eval" / "fd.json").write_text(json.dumps({
        "name": "ddim-25_cfg-1.0", "metrics": {"fd_fashion_mnist": fd}, "sampler": "ddim",
        "num_steps": 25, "nfe": 50, "guidance": {"type": "classifier_free", "scale": 1.0},
        "checkpoint_step": 1000, "wall_time_s": 3.0}))


def test_collect_reports_params_gflops_and_train_images_per_s(sweep, tmp_path):
    runs = expand(sweep)
    root = tmp_path / "fm_dit"
    # The first log interval includes compilation (slow); the median ignores it.
    make_run(root, sweep, runs[0], rates=[12.0, 640.0, 660.0, 650.0], fd=40.0)
    make_run(root, sweep, runs[5], rates=[30.0, 900.0, 1000.0], fd=35.0)
    (root / "unstarted").mkdir()
    (root / "unstarted" / "sweep_run.json").write_text(json.dumps({"name": "unstarted"}))

    result = collect.collect(root, metric="fd_fashion_mnist")
    with open(result["csv"]) as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    for run, rate in ((runs[0], 645.0), (runs[5], 900.0)):
        module = experiment.build_model(run_config(sweep, run))
        row = table[run.name]
        assert int(row["params"]) == dit.count_params(module)
        assert float(row["gflops"]) == pytest.approx(dit.forward_flops(module) / 1e9, rel=1e-5)
        assert float(row["train_images_per_s"]) == rate
    assert table[runs[0].name]["params"] == "328964"  # depth 4, D 64 at patch 2
    assert float(table[runs[0].name]["gflops"]) == pytest.approx(0.116863, abs=1e-6)  # by hand
    assert table["unstarted"]["params"] == table["unstarted"]["train_images_per_s"] == ""
    header = result["table"].splitlines()[0]
    assert header.startswith("| run | status | model.dit.depth | model.dit.hidden_size | "
                             "model.dit.num_heads | model.dit.patch_size | params | gflops | "
                             "train_images_per_s | eval |")
    assert header.endswith("| metric/fd_fashion_mnist |")


def test_a_config_diffjax_cannot_build_leaves_the_columns_empty(tmp_path, capsys):
    d = tmp_path / "sweep" / "old"
    d.mkdir(parents=True)
    (d / "sweep_run.json").write_text(json.dumps({"name": "old", "axes": {}}))
    (d / "config.json").write_text(json.dumps({"model": {"name": "unknown"}}))
    rows, _, _ = collect.gather(tmp_path / "sweep")
    assert rows[0]["run"] == "old" and "params" not in rows[0]
    assert "old: no params/gflops from config.json" in capsys.readouterr().err
