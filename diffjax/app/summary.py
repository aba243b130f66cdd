"""``--mode summary``: the resolved config, the device mesh and the parameter count."""

from __future__ import annotations

import numpy as np
import jax

from diffjax import parallel
from diffjax.specs import Experiment


def param_count(experiment: Experiment) -> int:
    """Parameters of the experiment's model from ``jax.eval_shape`` (nothing allocated)."""
    shapes = experiment.task.abstract_params()
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def run(experiment: Experiment, mesh) -> str:
    """The text ``--mode summary`` prints."""
    n = param_count(experiment)
    return "\n".join([
        "# resolved config",
        experiment.config_text,
        "# devices",
        parallel.describe(mesh),
        "# model",
        f"{experiment.model_name}: {n:,} parameters ({n / 1e6:.2f}M)",
    ])
