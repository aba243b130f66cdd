"""Eval-only sweep: 2 samplers x 2 guidance scales over one trained Fashion-MNIST model.

Every run samples from the same checkpoint (read-only) with its own sampler and
classifier-free guidance weight w (Ho & Salimans; w=0 is the plain conditional model)
and writes its metrics (fd_fashion_mnist, class_accuracy) to ROOT/<run>/eval/::

    python -m diffjax.main --config experiments/fashion_mnist.py --workdir runs/fmnist
    python -m launch.sweep run experiments/sweeps/fashion_mnist_samplers.py --root runs/fm_samplers
    python -m launch.sweep collect --root runs/fm_samplers --metric fd_fashion_mnist

Another trained run: add ``--checkpoint PATH`` to ``run``. Runs are named
``sampler-ddim_scale-0``, ``sampler-ddim_scale-3``, ``sampler-dpmpp_2m_scale-0``, ...
"""

from launch.spec import Sweep, axis, product


def get_sweep() -> Sweep:
    return Sweep(
        config="experiments/fashion_mnist.py",
        mode="eval",
        checkpoint="runs/fmnist",
        axes=product(
            axis("sampler.name", ["ddim", "dpmpp_2m"]),
            axis("guidance.scale", [0.0, 3.0]),
        ),
        # 500 samples per run keeps the 4 runs near 10 minutes on 2 CPU cores; FD from 500
        # samples is biased upwards but compares runs of equal size.
        overrides={"eval.metrics": ("fd_fashion_mnist", "class_accuracy"),
                   "eval.num_samples": 500},
    )
