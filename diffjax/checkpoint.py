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
import jax
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


def resolve_dir(source: str) -> str:
    """The checkpoints directory of a run directory (or ``source`` itself if it is one)."""
    directory = source if epath.Path(source).name == "checkpoints" else checkpoint_dir(source)
    if not epath.Path(directory).exists():
        raise CheckpointError(
            f"no checkpoints at {directory}; train first or pass --checkpoint RUN_DIR")
    return directory


def _read_only_params_manager(directory: str) -> ocp.CheckpointManager:
    """A read-only manager whose ``state`` item is read as a plain PyTree (partial restore)."""
    if "://" not in directory:
        directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        epath.Path(directory), options=options, item_names=("state", "data", "config"),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})


def _shapes(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(path), tuple(leaf.shape)) for path, leaf in flat]


def restore_ema_params(source: str, abstract_params: Any, step: int | None = None,
                       index: int = 0) -> tuple[Any, int]:
    """(EMA parameters number ``index``, step) of a run directory or its checkpoints
    directory, read-only, without the optimiser state or the other parameter copies.

    abstract_params: shapes, dtypes and shardings of the parameters (from the model's init,
    ``jax.eval_shape``); nothing else of the train state is needed.

    Raises:
      CheckpointError: no checkpoint, an unreadable one, or one of another model.
    """
    directory = resolve_dir(source)
    manager = _read_only_params_manager(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {directory}; train first (--mode train)")
    try:
        stored = manager.item_metadata(step)["state"]
        stored_ema = stored["ema_params"]
        if index >= len(stored_ema):
            raise CheckpointError(f"checkpoint step {step} in {directory} holds "
                                  f"{len(stored_ema)} EMA copies, not {index + 1}")
        if _shapes(stored_ema[index]) != _shapes(abstract_params):
            raise CheckpointError(
                f"checkpoint step {step} in {directory} holds parameters of another model "
                "(shapes or names differ from this config's); pass the config the run was "
                "trained with, or another --checkpoint")
        target = {"ema_params": [abstract_params if i == index else None
                                 for i in range(len(stored_ema))]}
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    except CheckpointError:
        raise
    except (ValueError, KeyError, OSError, TypeError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint step {step} in {directory} cannot be restored ({first[:200]}); it is "
            "corrupt or from a different config: move that step's directory aside or pass "
            "another --checkpoint_step") from e
    finally:
        manager.close()
    return restored["state"]["ema_params"][index], step


def restore_config(manager: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The config JSON stored with a checkpoint, or None when there is no checkpoint."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]
