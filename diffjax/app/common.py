"""What the modes share: the user errors, restoring parameters for inference, output."""

from __future__ import annotations

import hashlib
import json
import zipfile
from typing import Any

import jax
import numpy as np
import PIL
from etils import epath

from diffjax import checkpoint, generate
from diffjax.convert.torch_file import WeightFileError
from diffjax.data import DataError
from diffjax.errors import ConfigError
from diffjax.text import TextError
from diffjax.evaluation.metrics import MetricError
from diffjax.train import ema_snapshots
from diffjax.train.loop import NonFiniteLossError
from diffjax.train.state import with_sharding

# Errors whose message is the whole story: main prints one line and exits with status 2.
# The last two: a condition.input that is not an image / not an .npz.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, checkpoint.CheckpointError, DataError, MetricError, WeightFileError,
    FileNotFoundError, NonFiniteLossError, PIL.UnidentifiedImageError, zipfile.BadZipFile,
    TextError)


def abstract_params(task, mesh, shard_params: str = "replicated") -> Any:
    """The task's parameter shapes and dtypes, placed on ``mesh`` as
    :func:`diffjax.generate.param_sharding` says for ``shard_params`` (replicated, or fsdp as
    a sharded train state holds them); nothing allocated."""
    return with_sharding(task.abstract_params(),
                         generate.param_sharding(task, mesh, shard_params))


def restore_params(task, mesh, source: str, step: int | None = None,
                   shard_params: str = "replicated") -> tuple[Any, int]:
    """(EMA parameters of the first decay, step) of a run directory or its checkpoints
    directory, read-only, placed on ``mesh`` as ``shard_params`` says (each device reads only
    its shards under "fsdp"): only the model's init shapes are built."""
    return checkpoint.restore_ema_params(source, abstract_params(task, mesh, shard_params), step)


# What defines the trained network (and how it is sampled as a denoiser): sample and eval take
# these from the run, and a config that differs is an error. model.* but its compute options.
NETWORK_FIELDS = ("model", "data.image_size", "data.channels", "data.num_classes",
                  "diffusion.schedule", "diffusion.num_timesteps", "diffusion.prediction",
                  "diffusion.variance_type", "diffusion.rescale_timesteps",
                  "diffusion.timestep_sampler", "diffusion.sigma_data", "diffusion.sigma_min",
                  "diffusion.sigma_max", "data.latent.scale_factor")
COMPUTE_FIELDS = ("model.dtype", "model.param_dtype", "model.remat", "model.remat_policy",
                  "model.attention_impl", "model.cpu_fast_conv", "model.dropout")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def check_run_config(experiment, source: str) -> None:
    """Refuses to sample or evaluate the run ``source`` (its directory or its checkpoints
    directory) with a config whose network-defining fields (``NETWORK_FIELDS``) differ from
    the run's ``config.json``; fields missing on either side (other diffjax versions) and a
    run without ``config.json`` are not compared."""
    source = source.rstrip("/")
    run_dir = source[:-len("/checkpoints")] if source.endswith("/checkpoints") else source
    path = epath.Path(run_dir) / "config.json"
    if not path.exists():
        return
    try:
        saved = _leaves(json.loads(path.read_text()))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not the JSON config a run writes ({e}); restore it or "
                          "pass --checkpoint of another run") from e
    current = _leaves(json.loads(json.dumps(experiment.resolved, default=str)))
    differ = [f for f in sorted(set(saved) & set(current))
              if any(f == n or f.startswith(n + ".") for n in NETWORK_FIELDS)
              and f not in COMPUTE_FIELDS and saved[f] != current[f]]
    if differ:
        f = differ[0]
        more = f" (and {len(differ) - 1} more: {', '.join(differ[1:4])})" if len(differ) > 1 \
            else ""
        raise ConfigError(
            f"{run_dir} was trained with {f}={saved[f]!r}, this config has {current[f]!r}"
            f"{more}: fields that define the trained network (model.*, data size and "
            "classes, the diffusion's schedule and prediction, the latent scale) come from the "
            "run; drop the override or pass the run's config. At sampling you may change "
            "sampler.*, guidance.*, condition.*, eval.*, ema.sigma_rel and model.dtype/remat")


def model_params(experiment, mesh, source: str, step: int | None = None) -> tuple[Any, int]:
    """(parameters, step) that sample and eval use: the first EMA copy of ``source``'s
    checkpoint, or with ``ema.sigma_rel`` > 0 the post-hoc EMA of that profile solved from
    the run's snapshots at the latest snapshot (at or before ``step`` when given), placed as
    ``parallel.shard_state`` places a train state's (sharded under "fsdp": a model that
    trains only sharded is also sampled sharded, :class:`diffjax.generate.Generator`). The
    config must agree with the run's on the network (:func:`check_run_config`)."""
    check_run_config(experiment, source)
    if not experiment.ema_sigma_rel:
        return restore_params(experiment.task, mesh, source, step, experiment.train.shard_state)
    params, solution = posthoc_params(experiment, mesh, source, step)
    return params, solution.step


def posthoc_params(experiment, mesh, source: str, step: int | None = None
                   ) -> tuple[Any, ema_snapshots.Reconstruction]:
    """(the post-hoc EMA of ``ema.sigma_rel`` from the snapshots of the run ``source`` (its
    directory or its checkpoints directory), what was solved)."""
    check_run_config(experiment, source)
    source = source.rstrip("/")
    run_dir = source[:-len("/checkpoints")] if source.endswith("/checkpoints") else source
    params, solution = ema_snapshots.reconstruct(
        run_dir, experiment.ema_sigma_rel,
        abstract_params(experiment.task, mesh, experiment.train.shard_state), step)
    say(solution.summary())
    return params, solution


def classifier_params(sampling, mesh) -> Any:
    """The guiding network's EMA parameters, the program argument ``classifier_params`` of
    :class:`diffjax.generate.Generator`: classifier guidance's classifier (latest step of
    ``guidance.classifier_workdir``), autoguidance's guide (``guidance.guide_step`` of
    ``guidance.guide_workdir``, the latest for -1); else None."""
    g = sampling.guidance
    if g.classifier is not None:
        return restore_params(g.classifier, mesh, g.classifier_workdir)[0]
    if g.guide is not None:
        return restore_params(g.guide, mesh, g.guide_workdir, g.guide_step)[0]
    return None


def first_stage_params(experiment, mesh) -> tuple[Any, int] | tuple[None, None]:
    """(the autoencoder's EMA parameters, its step) of a latent diffusion experiment
    (``data.latent.workdir``, read-only), else (None, None)."""
    lat = experiment.latent
    if lat is None:
        return None, None
    if not lat.workdir:
        raise ConfigError("data.latent.workdir is empty: set it to the autoencoder's run "
                          "(trained, or converted by python -m diffjax.convert) to read its "
                          "weights")
    return restore_params(lat.autoencoder.task, mesh, lat.workdir, lat.checkpoint_step)


def params_digest(params) -> str:
    """SHA-256 of a parameter tree (names, dtypes, shapes and bytes of every leaf): what
    identifies the autoencoder a latent cache was made with."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def write_samples(workdir: str, **arrays: Any) -> epath.Path:
    """``WORKDIR/samples.npz`` of ``arrays`` (process 0); returns WORKDIR."""
    out = epath.Path(workdir)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "samples.npz").open("wb") as f:
            np.savez(f, **arrays)
    return out


def say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
