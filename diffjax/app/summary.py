"""``--mode summary``: the resolved config, the device mesh and the parameter count."""

from __future__ import annotations

import jax
import numpy as np

from diffjax import parallel
from diffjax.specs import Experiment


def param_count(experiment: Experiment) -> int:
    """Parameters of the experiment's model from ``jax.eval_shape`` (nothing allocated)."""
    shapes = experiment.task.abstract_params()
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def run(experiment: Experiment, mesh) -> str:
    """The text ``--mode summary`` prints."""
    n = param_count(experiment)
    lines = [
        "# resolved config",
        experiment.config_text,
        "# devices",
        parallel.describe(mesh),
        "# model",
        f"{experiment.model_name}: {n:,} parameters ({n / 1e6:.2f}M)",
    ]
    if experiment.latent is not None:
        lat = experiment.latent
        m = param_count(lat.autoencoder)
        h, w, c = experiment.task.image_shape
        lines.append(f"on {h}x{w}x{c} latents (scale factor {lat.scale_factor:.5g}) of an "
                     f"autoencoder_kl of {m:,} parameters ({m / 1e6:.2f}M, not trained here)")
    return "\n".join(lines)
