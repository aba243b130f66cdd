"""The post-hoc EMA sweep over sigma_rel on the Fashion-MNIST EDM run."""

from pathlib import Path

from diffjax import configlib, experiment
from launch.spec import expand, load_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "experiments" / "sweeps" / "fashion_mnist_edm_ema.py"


def test_sweep_evaluates_each_sigma_rel_of_one_run():
    sweep = load_sweep(SWEEP)
    runs = expand(sweep)
    assert [r.name for r in runs] == [f"ema-{s}" for s in
                                      ("0.02", "0.035", "0.05", "0.07", "0.1", "0.15", "0.2")]
    assert sweep.modes == ("eval",) and sweep.checkpoint == "runs/fmnist_edm"
    for run in runs:
        c = configlib.load_config_file(str(REPO / sweep.config))
        c.update_from_flattened_dict({**sweep.overrides, **run.assignment})
        exp = experiment.build(c, mode="eval")
        assert exp.ema_sigma_rel == run.assignment["ema.sigma_rel"] > 0
