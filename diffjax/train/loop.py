"""The training loop: restore or create the state, step, log, checkpoint, draw samples.

Small on purpose: the step is pure (:mod:`diffjax.train.step`), the pieces around it are
helpers. Metrics stay on the devices and are fetched every ``train.log_every`` steps. Only
process 0 writes logs and images; every process takes part in checkpointing.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from diffjax import checkpoint, configlib, parallel
from diffjax import data as data_lib
from diffjax.train import optim, reporting
from diffjax.train.state import TrainState, abstract_state, create_sharded_state
from diffjax.train import step as step_lib
from diffjax.train.step import LossSpec, step_key


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/Inf."""


def loss_spec(c: ml_collections.ConfigDict) -> LossSpec:
    d = c.diffusion
    kwargs = {"vlb_weight": d.vlb_weight, "min_snr_gamma": d.min_snr_gamma,
              "p2_gamma": d.p2_gamma, "p2_k": d.p2_k}
    cfg = c.guidance.type == "classifier_free"
    return LossSpec(
        prediction=d.prediction, loss_type=d.loss, variance_type=d.variance_type,
        weighting=d.weighting, loss_kwargs=tuple(sorted(kwargs.items())),
        timestep_sampler=d.timestep_sampler,
        label_dropout=c.guidance.label_dropout if cfg else 0.0,
        null_label=c.data.num_classes,
        superres=configlib.superres_spec(c),
    )


def make_apply_fn(model, c: ml_collections.ConfigDict):
    """``apply(params, x, t, y, train, rngs, **kw)``; ``y`` is ignored by unconditional models;
    ``kw`` (``low_res``, ``aug_level`` of a super-resolution UNet) go to the model."""
    if c.model.name == "classifier":
        return lambda params, x, t, y, train, rngs=None: model.apply(
            {"params": params}, x, t, train=train, rngs=rngs)
    conditional = c.model.class_cond

    def apply(params, x, t, y, train, rngs=None, **kw):
        return model.apply({"params": params}, x, t, y if conditional else None,
                           train=train, rngs=rngs, **kw)

    return apply


def init_params_fn(model, c: ml_collections.ConfigDict):
    """``key -> params`` on a one-example dummy batch (shapes from the config)."""
    shape = (1, c.data.image_size, c.data.image_size, c.data.channels)

    def init(key):
        if c.model.name == "classifier":
            return model.init(key, jnp.zeros(shape), jnp.zeros((1,)), train=False)["params"]
        y = jnp.zeros((1,), jnp.int32) if c.model.class_cond else None
        return model.init(key, jnp.zeros(shape), jnp.zeros((1,)), y, train=False,
                          **superres_dummies(c))["params"]

    return init


def superres_dummies(c: ml_collections.ConfigDict, batch: int = 1) -> dict[str, Any]:
    """Zero ``low_res`` / ``aug_level`` inputs of a super-resolution UNet for ``batch``
    examples, as model keywords (empty for every other model): for init and shape checks."""
    sr = configlib.superres_spec(c)
    if sr is None:
        return {}
    out = {"low_res": jnp.zeros((batch, sr.low_res_size, sr.low_res_size, c.data.channels))}
    if sr.augments:
        out["aug_level"] = jnp.zeros((batch,))
    return out


class Trainer:
    """Everything built from the config for training: model, schedule, optimiser, step."""

    def __init__(self, c: ml_collections.ConfigDict, mesh):
        self.config, self.mesh = c, mesh
        self.model = configlib.build_model(c)
        self.ds = configlib.build_discrete_schedule(c)
        self.lr = optim.learning_rate_schedule(
            c.optim.learning_rate, c.optim.warmup_steps, c.train.num_steps, c.optim.decay,
            c.optim.min_lr_ratio)
        self.tx = optim.make_optimizer(
            self.lr, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
            weight_decay=c.optim.weight_decay, grad_clip=c.optim.grad_clip)
        self.apply_fn = make_apply_fn(self.model, c)
        self.init_fn = init_params_fn(self.model, c)
        spec = loss_spec(c)
        if c.model.name == "classifier":
            loss_fn = step_lib.make_classifier_loss(self.apply_fn, self.ds,
                                                    c.model.classifier_noised)
            sampler = "uniform"
        else:
            loss_fn = step_lib.make_diffusion_loss(self.apply_fn, self.ds, spec)
            sampler = spec.timestep_sampler
        step = step_lib.make_train_step(loss_fn, self.tx, tuple(c.optim.ema_decays), self.lr,
                                        sampler)
        rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
        self.train_step = jax.jit(
            lambda state, batch: step(state, batch, step_key(state)),
            in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,))
        self._state_args = (self.init_fn, self.tx, c.train.seed, len(c.optim.ema_decays),
                            self.ds.num_timesteps, rep)

    def new_state(self) -> TrainState:
        return create_sharded_state(*self._state_args)

    def abstract_state(self) -> TrainState:
        return abstract_state(*self._state_args)


def restore_ema_params(c: ml_collections.ConfigDict, mesh, source: str, step: int | None = None):
    """(model, EMA params of the first decay, step) from a run directory or its checkpoints
    directory, read-only, replicated on ``mesh``."""
    directory = source if epath.Path(source).name == "checkpoints" else \
        checkpoint.checkpoint_dir(source)
    if not epath.Path(directory).exists():
        raise checkpoint.CheckpointError(
            f"no checkpoints at {directory}; train first or pass --checkpoint RUN_DIR")
    manager = checkpoint.make_manager(directory, read_only=True)
    trainer = Trainer(c, mesh)
    state, got = checkpoint.restore(manager, trainer.abstract_state(), None, step)
    return trainer.model, state.ema_params[0], got


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of fields present in both configs whose values differ (fields that a
    newer diffjax added, or that an older one had, are not differences)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) & set(new)):
            out += _changed_fields(old[key], new[key], f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _check_workdir_config(workdir: str, resolved: dict, allow_change: bool) -> None:
    """Refuses to continue a workdir whose run had another model, data, diffusion or optimiser.

    Sections that may change between sessions of one run (train, eval, sampler) are not compared.
    """
    path = epath.Path(workdir) / "config.json"
    if not path.exists() or allow_change:
        return
    previous = json.loads(path.read_text())
    current = json.loads(json.dumps(resolved, default=str))
    mutable = ("train", "eval", "sampler")
    changed = [f for f in _changed_fields(previous, current) if f.split(".")[0] not in mutable]
    if changed:
        raise configlib.ConfigError(
            f"{workdir} holds a run of a different config (fields differ: {', '.join(changed)});"
            f" use another --workdir, or pass --allow_config_change to continue it anyway"
        )


def train(c: ml_collections.ConfigDict, workdir: str, mesh, *, allow_config_change: bool = False,
          data_iterator=None) -> TrainState:
    """Trains to ``train.num_steps``, resuming from ``workdir/checkpoints`` if it has any."""
    from diffjax import generate

    resolved = c.to_dict()
    _check_workdir_config(workdir, resolved, allow_config_change)
    per_device = parallel.check_global_batch(c.data.batch_size, mesh)
    del per_device
    it = data_iterator or configlib.build_train_iterator(c, jax.process_index(), jax.process_count())
    trainer = Trainer(c, mesh)
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(workdir), c.train.keep_checkpoints,
                                      c.train.keep_every)
    feeder = data_lib.prefetch_to_mesh(it, parallel.data_sharding(mesh))
    if manager.latest_step() is not None:
        state, start = checkpoint.restore(manager, trainer.abstract_state(), feeder)
    else:
        state, start = trainer.new_state(), 0
    writer = reporting.Reporter(workdir, enabled=jax.process_index() == 0,
                                total_steps=c.train.num_steps, start_step=start,
                                batch_size=c.data.batch_size)
    writer.write_config(resolved)
    # A super-resolution model samples from low-res inputs: no unconditional image grids.
    draws = (c.train.sample_every > 0 and c.model.name != "classifier"
             and c.condition.type != "superres")
    sampler = generate.Generator(c, trainer.model, mesh, max_batch=c.train.num_sample_images) \
        if draws else None
    pending: list[dict[str, jax.Array]] = []
    try:
        for step in range(start, c.train.num_steps):
            state, metrics = trainer.train_step(state, next(feeder))
            pending.append(metrics)
            done = step + 1
            if done % c.train.log_every == 0 or done == c.train.num_steps:
                summary = _mean_metrics(jax.device_get(pending))
                pending = []
                writer.log(done, summary)
                if summary.get("nonfinite", 0) > 0:
                    raise NonFiniteLossError(
                        f"loss or gradient became NaN/Inf before step {done} (the update was "
                        f"skipped); lower optim.learning_rate or check the data; last checkpoint "
                        f"step: {manager.latest_step()}")
            if done % c.train.checkpoint_every == 0 or done == c.train.num_steps:
                checkpoint.save(manager, done, state, feeder, resolved)
            if sampler is not None and (done % c.train.sample_every == 0
                                        or done == c.train.num_steps):
                images, _ = sampler(state.ema_params[0], c.train.num_sample_images,
                                    jax.random.PRNGKey(c.train.seed + 1), grouped=True)
                writer.image_grid(done, images, c.data.num_classes if c.model.class_cond else 0)
    finally:
        feeder.close()
        manager.wait_until_finished()
        writer.close()
    return state


def _mean_metrics(pending: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for name in pending[0]:
        values = np.asarray([m[name] for m in pending], np.float64)
        out[name] = float(values.sum() if name == "nonfinite" else values.mean())
    return out


def wall_clock() -> float:
    return time.perf_counter()
