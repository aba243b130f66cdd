"""The training loop: restore or create the state, step, log, checkpoint, draw samples.

Small on purpose: the step is pure (:mod:`diffjax.train.step`), the pieces around it are
helpers. Metrics stay on the devices and are fetched every ``train.log_every`` steps. Only
process 0 writes logs and images; every process takes part in checkpointing. The state lies
on the devices as ``parallel.shard_state`` says (replicated, or sharded over the data axis:
:func:`diffjax.parallel.state_sharding`); it is created, restored and stepped in that
sharding, so a run checkpointed under one setting resumes under the other.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath

from diffjax import checkpoint, hugepages, parallel
from diffjax import data as data_lib
from diffjax.errors import ConfigError
from diffjax.specs import OptimSpec, TrainSpec
from diffjax.tasks import Task
from diffjax.train import ema_snapshots, optim, posthoc_ema, reporting
from diffjax.train import step as step_lib
from diffjax.train.state import (
    TrainState,
    create_sharded_state,
    state_shapes,
    with_sharding,
)
from diffjax.train.step import step_key


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/Inf."""


class Trainer:
    """Everything built for training a task: learning rate, optimiser, jitted step.

    ``state_sharding``: the tree of NamedSharding the state lives in (``train.shard_state``).
    """

    def __init__(self, task: Task, optim_spec: OptimSpec, train_spec: TrainSpec, mesh):
        self.task, self.mesh = task, mesh
        o = optim_spec
        self.lr = optim.learning_rate_schedule(o.learning_rate, o.warmup_steps,
                                               train_spec.num_steps, o.decay, o.min_lr_ratio)
        self.tx = optim.make_optimizer(self.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                       weight_decay=o.weight_decay, grad_clip=o.grad_clip)
        gather = functools.partial(parallel.gathered, mesh=mesh, mode=train_spec.shard_state)
        step = step_lib.make_train_step(task.loss_fn(), self.tx, o.ema_decays, self.lr,
                                        task.timestep_sampler, o.ema_gammas, gather)
        self._state_args = (task.init_params, self.tx, train_spec.seed,
                            len(o.ema_decays) + len(o.ema_gammas), task.schedule.num_timesteps)
        with parallel.gc_paused():
            self._shapes = state_shapes(*self._state_args)
        self.state_sharding = parallel.state_sharding(mesh, self._shapes, train_spec.shard_state)
        rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
        self.train_step = jax.jit(
            lambda state, batch: step(state, batch, step_key(state)),
            in_shardings=(self.state_sharding, data), out_shardings=(self.state_sharding, rep),
            donate_argnums=(0,))

    def new_state(self) -> TrainState:
        with parallel.gc_paused():  # traced, compiled and run
            return create_sharded_state(*self._state_args, self.state_sharding)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and this trainer's shardings of the state: restoring into it places
        a checkpoint's arrays in them, whatever sharding wrote it."""
        return with_sharding(self._shapes, self.state_sharding)


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of fields present in both configs whose values differ (fields that a
    newer diffjax added, or that an older one had, are not differences)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) & set(new)):
            out += _changed_fields(old[key], new[key], f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def check_workdir_config(workdir: str, resolved: dict, allow_change: bool) -> None:
    """Refuses to continue a workdir whose run had another model, data, diffusion or optimiser.

    Sections that may change between sessions of one run (train, eval, sampler, parallel) and
    ema.sigma_rel (which post-hoc EMA sample/eval use) are not compared.
    """
    path = epath.Path(workdir) / "config.json"
    if not path.exists() or allow_change:
        return
    previous = json.loads(path.read_text())
    current = json.loads(json.dumps(resolved, default=str))
    mutable = ("train", "eval", "sampler", "parallel")
    changed = [f for f in _changed_fields(previous, current)
               if f.split(".")[0] not in mutable and f != "ema.sigma_rel"]
    if changed:
        raise ConfigError(
            f"{workdir} holds a run of a different config (fields differ: {', '.join(changed)});"
            f" use another --workdir, or pass --allow_config_change to continue it anyway"
        )


def train(task: Task, optim_spec: OptimSpec, t: TrainSpec, workdir: str, mesh, data_iterator,
          *, resolved: dict[str, Any], global_batch: int,
          draw_grid: Callable[[Any], tuple[np.ndarray, Any]] | None = None,
          started: float | None = None) -> TrainState:
    """Trains to ``t.num_steps``, resuming from ``workdir/checkpoints`` if it has any.

    data_iterator: this process's iterator of local batches; resolved: the config as a dict
    (written to WORKDIR/config.json and saved with every checkpoint; the caller checks it
    against an existing run first, :func:`check_workdir_config`); draw_grid:
    ``ema_params -> (images [N, H, W, C] in [-1, 1], rows)`` (rows: the number of classes, 0
    = unlabelled, or a text model's prompts, one row each; ema_params placed as the state
    holds them, ``t.shard_state``: :func:`diffjax.generate.param_sharding`), called every
    ``t.sample_every`` steps (None: no grids); started: ``time.time()`` when the process
    started (default: now), from which the time to the first step is reported.
    """
    began = time.time() if started is None else started
    with reporting.CompileTimes() as compile_times:  # JAX's share of the start, read at step 1
        return _train(task, optim_spec, t, workdir, mesh, data_iterator, resolved,
                      global_batch, draw_grid, began, compile_times)


def _train(task, optim_spec, t, workdir, mesh, data_iterator, resolved, global_batch,
           draw_grid, began, compile_times) -> TrainState:
    parallel.check_global_batch(global_batch, mesh)
    trainer = Trainer(task, optim_spec, t, mesh)
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(workdir), t.keep_checkpoints,
                                      t.keep_every)
    feeder = data_lib.prefetch_to_mesh(data_iterator, parallel.data_sharding(mesh))
    latest = manager.latest_step()
    start = 0 if latest is None else latest
    if latest is not None:
        checkpoint.restore_data(manager, latest, feeder)
    first_batch = next(feeder) if start < t.num_steps else None
    compiling = CompilingStep(trainer, first_batch, began)
    if latest is None:
        state = trainer.new_state()
    else:
        state, _ = checkpoint.restore(manager, trainer.abstract_state(), None, latest)
    jax.block_until_ready(state)
    state_ready = time.time() - began
    writer = reporting.Reporter(workdir, enabled=jax.process_index() == 0,
                                total_steps=t.num_steps, start_step=start,
                                batch_size=global_batch)
    writer.write_config(resolved)
    draws = draw_grid is not None and t.sample_every > 0
    snapshots = None
    if t.ema_snapshot_every:
        gammas = optim_spec.ema_gammas
        snapshots = ema_snapshots.SnapshotWriter(
            workdir, tuple(posthoc_ema.gamma_to_sigma_rel(g) for g in gammas), gammas,
            first=len(optim_spec.ema_decays))
    train_step = compiling.result(otherwise=trainer.train_step)
    times = {**compiling.times, f"state {'created' if latest is None else 'restored'} at":
             state_ready, "logs opened at": time.time() - began}
    times = dict(sorted(times.items(), key=lambda item: item[1]))  # in the order they ended
    pending: list[dict[str, jax.Array]] = []
    try:
        for step in range(start, t.num_steps):
            batch = first_batch if step == start else next(feeder)
            state, metrics = train_step(state, batch)
            pending.append(metrics)
            if step == start:  # the first step: how long it took to get here, and where it went
                jax.block_until_ready(metrics)
                first = time.time()
                writer.startup(step + 1, {"total": first - began, **times,
                                          "first step": first - began - max(times.values())},
                               compile_times.seconds())
                first_batch = None
                # What compiling the state's and the step's programs freed, held by malloc
                # since, goes back to the system (a Fashion-MNIST run's median resident
                # memory 1.40-1.57 GB -> 0.76-0.79 GB; hugepages.release_freed_memory).
                hugepages.release_freed_memory()
            done = step + 1
            if done % t.log_every == 0 or done == t.num_steps:
                summary = _mean_metrics(jax.device_get(pending))
                pending = []
                writer.log(done, summary)
                if summary.get("nonfinite", 0) > 0:
                    raise NonFiniteLossError(
                        f"loss or gradient became NaN/Inf before step {done} (the update was "
                        f"skipped); lower optim.learning_rate or check the data; last checkpoint "
                        f"step: {manager.latest_step()}")
            if done % t.checkpoint_every == 0 or done == t.num_steps:
                checkpoint.save(manager, done, state, feeder, resolved)
            if snapshots is not None and done % t.ema_snapshot_every == 0:
                snapshots.save(done, state)
            if draws and (done % t.sample_every == 0 or done == t.num_steps):
                writer.drawing(done)
                drawn = time.time()
                images, per_row = draw_grid(state.ema_params[0])
                writer.image_grid(done, images, per_row, time.time() - drawn)
    finally:
        feeder.close()
        if snapshots is not None:
            snapshots.close()
        writer.close()
        checkpoint.wait(manager)  # CheckpointError if the last save failed
    return state


class CompilingStep:
    """The train step for batches like ``batch`` (None: no step to run), compiling while the
    caller goes on.

    The step is traced and lowered here, from the state's shapes (no state needed); XLA then
    compiles it, or reads it from the persistent compilation cache, in a thread, outside
    Python's lock, while the caller creates or restores the state (on an accelerator mostly
    compiling and running the initialisation program, or reading the checkpoint) and opens
    its logs: the time to the first step is the longer of the two, not their sum. If the
    caller fails first, the compilation still finishes in its thread (XLA cannot be
    interrupted) and the process exits when it does. ``times``: seconds after ``began`` at
    which each part was done.
    """

    def __init__(self, trainer: Trainer, batch: Any, began: float):
        self.times: dict[str, float] = {}
        self._began, self._future = began, None
        if batch is not None:
            with parallel.gc_paused():
                lowered = trainer.train_step.lower(trainer.abstract_state(), batch)
            self.times["step lowered at"] = time.time() - began
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="diffjax-compile")
            self._future = pool.submit(self._compile, lowered)
            pool.shutdown(wait=False)  # its thread ends with the compilation

    def _compile(self, lowered: Any) -> Any:
        compiled = lowered.compile()
        self.times["step compiled at"] = time.time() - self._began
        return compiled

    def result(self, otherwise: Callable[..., Any]) -> Callable[..., Any]:
        """The compiled step (waiting for it; its error raised here), or ``otherwise``."""
        return otherwise if self._future is None else self._future.result()


def _mean_metrics(pending: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for name in pending[0]:
        values = np.asarray([m[name] for m in pending], np.float64)
        out[name] = float(values.sum() if name == "nonfinite" else values.mean())
    return out

