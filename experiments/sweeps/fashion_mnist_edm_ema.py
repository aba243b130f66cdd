"""Eval-only sweep over the EMA length chosen after training (EDM2's post-hoc EMA).

The Fashion-MNIST EDM run tracks two power-function EMAs (sigma_rel 0.05 and 0.10) with
snapshots every 50 steps; each run here solves for another sigma_rel from those snapshots
(``--config.ema.sigma_rel``) and evaluates it (fd_fashion_mnist, class_accuracy on 1000
Heun-13 samples at the config's guidance), nothing retrained::

    python -m diffjax.main --config experiments/fashion_mnist_edm.py --workdir runs/fmnist_edm
    python -m launch.sweep run experiments/sweeps/fashion_mnist_edm_ema.py --root runs/fm_edm_ema
    python -m launch.sweep collect --root runs/fm_edm_ema --metric fd_fashion_mnist

Runs are named ``ema-0.02`` ... ``ema-0.2``; ``collect`` plots each metric against
sigma_rel.
"""

from launch.spec import Sweep, axis


def get_sweep() -> Sweep:
    return Sweep(
        config="experiments/fashion_mnist_edm.py",
        mode="eval",
        checkpoint="runs/fmnist_edm",
        axes=axis("ema.sigma_rel", [0.02, 0.035, 0.05, 0.07, 0.1, 0.15, 0.2],
                  label="ema"),
        overrides={"eval.metrics": ("fd_fashion_mnist", "class_accuracy")},
    )
