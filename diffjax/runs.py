"""What each ``--mode`` of ``diffjax.main`` does, given a validated config and a mesh.

Kept apart from ``main.py`` so that the modes can be called (and tested) without flags.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from etils import epath

from diffjax import checkpoint, configlib, parallel
from diffjax.data import DataError

USER_ERRORS: tuple[type[Exception], ...] = (
    configlib.ConfigError, checkpoint.CheckpointError, DataError, FileNotFoundError)


def user_errors() -> tuple[type[Exception], ...]:
    from diffjax.train.loop import NonFiniteLossError

    return USER_ERRORS + (NonFiniteLossError,)


def param_count(c: ml_collections.ConfigDict) -> int:
    """Parameters of the configured model from ``jax.eval_shape`` (nothing allocated)."""
    from diffjax.train.loop import init_params_fn

    shapes = jax.eval_shape(init_params_fn(configlib.build_model(c), c), jax.random.PRNGKey(0))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def summary(c: ml_collections.ConfigDict, mesh) -> str:
    """The resolved config, the mesh and the parameter count, as printed by ``--mode summary``."""
    n = param_count(c)
    return "\n".join([
        "# resolved config",
        str(c),
        "# devices",
        parallel.describe(mesh),
        "# model",
        f"{c.model.name}: {n:,} parameters ({n / 1e6:.2f}M)",
    ])


def train(c: ml_collections.ConfigDict, workdir: str, mesh, *, allow_config_change=False):
    from diffjax.train import loop

    return loop.train(c, workdir, mesh, allow_config_change=allow_config_change)


def _params_for_sampling(c, mesh, workdir, checkpoint_path, step):
    from diffjax.train.loop import restore_ema_params

    return restore_ema_params(c, mesh, checkpoint_path or workdir, step)


def sample(c: ml_collections.ConfigDict, workdir: str, mesh, *, checkpoint="", step=None,
           seed=None):
    """Writes ``WORKDIR/samples.npz`` (images in [-1,1], labels) and ``samples.png``."""
    from diffjax import generate
    from diffjax.evaluation import grid

    model, params, got = _params_for_sampling(c, mesh, workdir, checkpoint, step)
    seed = c.sampler.seed if seed is None else seed
    if c.condition.type != "none":
        return generate.sample_with_condition(c, workdir, mesh, model, params, got, seed)
    start = time.perf_counter()
    generator = generate.Generator(c, model, mesh)
    images, labels = generator(params, c.sampler.num_samples, jax.random.PRNGKey(seed),
                               grouped=True)
    wall = time.perf_counter() - start
    if jax.process_index() == 0:
        out = epath.Path(workdir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "samples.npz").open("wb") as f:
            np.savez(f, images=images, labels=labels, step=got, seed=seed)
        ncol = -(-len(images) // c.data.num_classes) if c.model.class_cond else None
        grid.save_grid(images, str(out / "samples.png"), ncol=ncol, scale=2)
        print(f"wrote {len(images)} samples from checkpoint step {got} with {c.sampler.name} "
              f"({c.sampler.num_steps} steps, seed {seed}) in {wall:.1f}s to {out}/samples.npz "
              f"and samples.png")
    return images, labels


def evaluate(c, workdir, mesh, *, checkpoint="", step=None, seed=None):
    """Samples and metrics of ``c.eval`` into ``WORKDIR/eval/`` (see diffjax.evaluation.run_eval);
    the eval config is checked before the checkpoint is read."""
    from diffjax.evaluation import run_eval

    run_eval.check(c)
    model, params, got = _params_for_sampling(c, mesh, workdir, checkpoint, step)
    run = run_eval.evaluate_classifier if c.model.name == "classifier" else run_eval.evaluate
    return run(c, workdir, mesh, model, params, got, c.sampler.seed if seed is None else seed)

