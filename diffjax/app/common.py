"""What the modes share: the user errors, restoring parameters for inference, output."""

from __future__ import annotations

import hashlib
import zipfile
from typing import Any

import jax
import numpy as np
import PIL
from etils import epath

from diffjax import checkpoint, parallel
from diffjax.convert.torch_file import WeightFileError
from diffjax.data import DataError
from diffjax.errors import ConfigError
from diffjax.evaluation.metrics import MetricError
from diffjax.train.loop import NonFiniteLossError

# Errors whose message is the whole story: main prints one line and exits with status 2.
# The last two: a condition.input that is not an image / not an .npz.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, checkpoint.CheckpointError, DataError, MetricError, WeightFileError,
    FileNotFoundError, NonFiniteLossError, PIL.UnidentifiedImageError, zipfile.BadZipFile)


def abstract_params(task, mesh) -> Any:
    """The task's parameter shapes and dtypes, replicated on ``mesh`` (nothing allocated)."""
    rep = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                        task.abstract_params())


def restore_params(task, mesh, source: str, step: int | None = None) -> tuple[Any, int]:
    """(EMA parameters of the first decay, step) of a run directory or its checkpoints
    directory, read-only, replicated on ``mesh``: only the model's init shapes are built."""
    return checkpoint.restore_ema_params(source, abstract_params(task, mesh), step)


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
