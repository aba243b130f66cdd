"""``--mode summary``: the resolved config, the device mesh, the parameter count and the
train state's bytes per device under ``parallel.shard_state`` on this mesh.

Allocation-free: every shape comes from ``jax.eval_shape``, nothing is compiled or placed.
"""

from __future__ import annotations

import jax
import numpy as np

from diffjax import parallel
from diffjax.specs import Experiment
from diffjax.train import loop


def param_count(experiment: Experiment) -> int:
    """Parameters of the experiment's model from ``jax.eval_shape`` (nothing allocated)."""
    shapes = experiment.task.abstract_params()
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def state_bytes(experiment: Experiment, mesh) -> dict[str, int]:
    """Bytes of the train state on the device holding most of it, under the experiment's
    ``parallel.shard_state`` on ``mesh``: {"params", "optimizer", "ema", "total"} (total
    includes the step, RNG and timestep-resampler history)."""
    state = loop.Trainer(experiment.task, experiment.optim, experiment.train,
                         mesh).abstract_state()
    return {"params": parallel.per_device_bytes(state.params),
            "optimizer": parallel.per_device_bytes(state.opt_state),
            "ema": parallel.per_device_bytes(state.ema_params),
            "total": parallel.per_device_bytes(state)}


def _state_lines(experiment: Experiment, mesh) -> list[str]:
    b, f = state_bytes(experiment, mesh), parallel.format_bytes
    copies = len(experiment.optim.ema_decays) + len(experiment.optim.ema_gammas)
    head = (f"# train state per device (parallel.shard_state={experiment.train.shard_state}, "
            f"{parallel.num_data_shards(mesh)} devices)")
    sizes = (f"params {f(b['params'])}, optimizer state {f(b['optimizer'])}, EMA "
             f"{f(b['ema'])} ({copies} cop{'y' if copies == 1 else 'ies'}), total "
             f"{f(b['total'])}")
    return [head, sizes]


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
    if experiment.text is not None:  # TextConditioned: text_encoder, null_context, denoiser
        parts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
                 for k, v in experiment.task.abstract_params().items()}
        lines.append(f"of which the text encoder {parts['text_encoder']:,}, the learned null "
                     f"caption {parts['null_context']:,}, the UNet {parts['denoiser']:,}")
    if experiment.latent is not None:
        lat = experiment.latent
        m = param_count(lat.autoencoder)
        h, w, c = experiment.task.image_shape
        lines.append(f"on {h}x{w}x{c} latents (scale factor {lat.scale_factor:.5g}) of an "
                     f"autoencoder_kl of {m:,} parameters ({m / 1e6:.2f}M, not trained here)")
    return "\n".join(lines + _state_lines(experiment, mesh))
