"""Checkpoints in ``WORKDIR/checkpoints`` with orbax's CheckpointManager.

One checkpoint per saved step holds three items: ``state`` (params, EMA params, optimiser
state, step, RNG, timestep history), ``data`` (the grain iterator's position, one file per
process) and ``config`` (the resolved config as JSON). Saves are asynchronous and atomic:
orbax writes into a temporary directory and renames it when complete, so a run killed at any
moment leaves only whole checkpoints behind, and the newest whole one is where it resumes.
The last ``keep`` checkpoints are kept, plus every ``keep_every``-th step when set.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; the message says which and what to do."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def make_manager(
    directory: str, keep: int = 3, keep_every: int = 0, read_only: bool = False,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """A manager over ``directory`` (a local path or ``gs://...``)."""
    if "://" not in directory:
        directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        keep_period=keep_every or None,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(
        epath.Path(directory),
        options=options,
        item_names=("state", "data", "config"),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any | None,
    config: dict[str, Any], force: bool = False,
) -> bool:
    """Starts an (asynchronous) save of ``state``, the iterator position and the config."""
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(
    manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any | None = None,
    step: int | None = None,
) -> tuple[Any, int]:
    """Restores the newest (or the given) step into ``abstract_state``'s shapes and shardings.

    The iterator, if given, is moved to the saved position in place.

    Raises:
      CheckpointError: there is no checkpoint, or it is unreadable or of another model.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {manager.directory}; train first (--mode train)")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, OSError, TypeError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint step {step} in {manager.directory} cannot be restored ({first[:200]}); "
            f"it is corrupt or from a different config: move that step's directory aside to "
            f"resume from an earlier one, or use a fresh --workdir"
        ) from e
    return restored["state"], step


def restore_config(manager: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The config JSON stored with a checkpoint, or None when there is no checkpoint."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]
