"""Snapshots of the power-function EMAs in ``WORKDIR/ema_snapshots`` and post-hoc EMA from them.

Every ``ema.snapshot_every`` steps the training loop saves the state's power-function EMA copies
(EDM2; :mod:`diffjax.train.posthoc_ema`) as one orbax checkpoint step with two items: ``ema``
(the copies, in the order of ``ema.sigma_rels``) and ``profile`` (JSON: the step, the sigma_rels
and their exponents gamma). Saves are asynchronous and atomic like the train checkpoints and all
are kept. A run resumed from an earlier checkpoint recomputes exactly the same EMAs, so a
snapshot step that already exists is left as it is.

:func:`reconstruct` solves for any sigma_rel at the latest snapshot (or the latest at or before
a step) and combines the snapshots' parameters, reading one snapshot at a time.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from diffjax import checkpoint
from diffjax.errors import ConfigError
from diffjax.train import posthoc_ema

SNAPSHOT_DIR = "ema_snapshots"


def snapshot_dir(workdir: str) -> str:
    return os.path.join(workdir, SNAPSHOT_DIR)


def _manager(directory: str, read_only: bool) -> ocp.CheckpointManager:
    if "://" not in directory:
        directory = os.path.abspath(directory)
    # Its own names for orbax's barriers between processes: the train checkpoints' manager
    # saves at the same steps, and two managers' barriers of one name collide (a multi-process
    # run stopped with "Barrier ... is already ongoing").
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=not read_only, read_only=read_only,
        enable_async_checkpointing=not read_only, cleanup_tmp_directories=not read_only,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix="ema_snapshots"))
    return ocp.CheckpointManager(
        epath.Path(directory), options=options, item_names=("ema", "profile"),
        item_handlers={"ema": checkpoint.array_tree_handler(),
                       "profile": ocp.JsonCheckpointHandler()})


class SnapshotWriter:
    """Saves the power-function EMA copies ``state.ema_params[first:]`` at a step."""

    def __init__(self, workdir: str, sigma_rels: tuple[float, ...], gammas: tuple[float, ...],
                 first: int):
        self.manager = _manager(snapshot_dir(workdir), read_only=False)
        self.profile = {"sigma_rels": [float(r) for r in sigma_rels],
                        "gammas": [float(g) for g in gammas]}
        self.first = first

    def save(self, step: int, state: Any) -> None:
        if step in self.manager.all_steps():
            return  # written by a run killed after it: the resumed run recomputes it exactly
        items = {"ema": ocp.args.PyTreeSave(tuple(state.ema_params[self.first:])),
                 "profile": ocp.args.JsonSave({"step": int(step), **self.profile})}
        self.manager.save(step, args=ocp.args.Composite(**items))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """What :func:`reconstruct` solved: the target profile, the snapshots used (step, profile
    index, gamma) with their coefficients, and the relative L2 residual of the profile fit."""

    sigma_rel: float
    gamma: float
    step: int
    snapshots: tuple[tuple[int, int, float], ...]
    coefficients: tuple[float, ...]
    residual: float

    def summary(self) -> str:
        used = sorted({s for s, _, _ in self.snapshots})
        return (f"post-hoc EMA sigma_rel={self.sigma_rel:g} (gamma={self.gamma:.3f}) at step "
                f"{self.step} from {len(self.snapshots)} snapshot profiles at steps "
                f"{used[0]}..{used[-1]}: relative L2 residual of the profile "
                f"{self.residual:.2e}, max |coefficient| "
                f"{max(abs(c) for c in self.coefficients):.3g}")


def _profiles(manager: ocp.CheckpointManager, steps: list[int]) -> dict[int, dict]:
    out = {}
    for step in steps:
        restored = manager.restore(step, args=ocp.args.Composite(
            profile=ocp.args.JsonRestore()))
        out[step] = restored["profile"]
    return out


def solve_for(workdir: str, sigma_rel: float, max_step: int | None = None
              ) -> Reconstruction:
    """The coefficients of ``workdir``'s snapshots for ``sigma_rel`` at the latest snapshot
    step (at or before ``max_step`` when given); nothing but the JSON profiles is read."""
    directory = snapshot_dir(workdir)
    if not epath.Path(directory).exists():
        raise ConfigError(f"ema.sigma_rel={sigma_rel} needs the power-function EMA snapshots "
                          f"of the run, and {directory} does not exist: train with "
                          "ema.sigma_rels and ema.snapshot_every > 0, or set ema.sigma_rel=0")
    manager = _manager(directory, read_only=True)
    try:
        steps = [s for s in manager.all_steps() if max_step is None or s <= max_step]
        if not steps:
            raise ConfigError(f"no EMA snapshot in {directory}"
                              f"{'' if max_step is None else f' at or before step {max_step}'}"
                              "; train further or pick another checkpoint step")
        profiles = _profiles(manager, sorted(steps))
    finally:
        manager.close()
    gamma = posthoc_ema.sigma_rel_to_gamma(sigma_rel)
    used = tuple((s, i, float(g)) for s in sorted(steps)
                 for i, g in enumerate(profiles[s]["gammas"]))
    target = max(steps)
    sol = posthoc_ema.solve([s for s, _, _ in used], [g for _, _, g in used], target, gamma)
    return Reconstruction(sigma_rel=float(sigma_rel), gamma=gamma, step=target, snapshots=used,
                          coefficients=tuple(float(c) for c in sol.coefficients),
                          residual=sol.residual)


def reconstruct(workdir: str, sigma_rel: float, abstract_params: Any,
                max_step: int | None = None) -> tuple[Any, Reconstruction]:
    """(the parameters of the post-hoc EMA with ``sigma_rel``, what was solved).

    abstract_params: shapes, dtypes and shardings of one parameter tree; each snapshot is read
    whole (its profiles) and added in with its coefficients, one snapshot at a time.
    """
    solution = solve_for(workdir, sigma_rel, max_step)
    manager = _manager(snapshot_dir(workdir), read_only=True)
    total = None
    try:
        by_step: dict[int, list[tuple[int, float]]] = {}
        for (step, index, _), coef in zip(solution.snapshots, solution.coefficients):
            by_step.setdefault(step, []).append((index, coef))
        for step, parts in sorted(by_step.items()):
            count = len(manager.item_metadata(step)["ema"])
            target = tuple(abstract_params for _ in range(count))
            restored = manager.restore(step, args=ocp.args.Composite(
                ema=checkpoint.tree_restore_args(target)))["ema"]
            part = posthoc_ema.combine([restored[i] for i, _ in parts], [c for _, c in parts])
            total = part if total is None else jax.tree.map(lambda a, b: a + b, total, part)
    finally:
        manager.close()
    return total, solution
