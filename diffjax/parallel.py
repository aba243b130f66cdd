"""Device mesh, shardings and multi-host start-up: the only module that names mesh axes.

diffjax trains data-parallel with SPMD: one mesh axis ``data`` spans every device of every
process; a batch is split along its leading dimension over that axis, parameters and
optimiser state are replicated, and ``jax.jit`` inserts the gradient all-reduce. Library
functions know nothing of devices; callers place arrays with the shardings made here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def maybe_initialize_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
) -> bool:
    """Starts ``jax.distributed`` when this run spans several processes.

    With an explicit coordinator address (``host:port``) all three arguments are used. On a
    Cloud TPU pod slice (detected by several worker hostnames in ``TPU_WORKER_HOSTNAMES``),
    JAX finds the coordinator itself. Otherwise nothing is done (single process).

    Returns:
      True if ``jax.distributed.initialize`` was called.
    """
    if coordinator_address:
        if num_processes <= 0 or process_id < 0:
            raise ValueError(
                "--coordinator_address needs --num_processes and --process_id as well"
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return True
    workers = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(workers) > 1:
        jax.distributed.initialize()
        return True
    return False


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the ``data`` axis, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimiser state, step, keys)."""
    return NamedSharding(mesh, PartitionSpec())


def num_data_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def check_global_batch(global_batch: int, mesh: Mesh, what: str = "data.batch_size") -> int:
    """Per-device batch of ``global_batch``; a one-line error when it does not divide evenly."""
    n = num_data_shards(mesh)
    if global_batch % n or global_batch % jax.process_count():
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {n} devices "
            f"({jax.process_count()} processes); use a multiple of {n}"
        )
    return global_batch // n


def global_batch_from_local(tree: Any, mesh: Mesh) -> Any:
    """Assembles each process's local batch (numpy, leading dim B/P) into global jax Arrays."""
    sharding = data_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def describe(mesh: Mesh) -> str:
    """One line about the mesh: axis sizes, processes, platform."""
    d = mesh.devices.flat[0]
    return (
        f"mesh {dict(mesh.shape)} over {mesh.devices.size} {d.platform} devices "
        f"in {jax.process_count()} process(es); this is process {jax.process_index()}"
    )
