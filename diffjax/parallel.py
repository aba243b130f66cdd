"""Device mesh, shardings and multi-host start-up: the only module that names mesh axes.

diffjax trains data-parallel with SPMD: one mesh axis ``data`` spans every device of every
process; a batch is split along its leading dimension over that axis, and ``jax.jit`` inserts
the gradient all-reduce. The train state (parameters, optimiser state, EMA copies) is either
replicated on every device or, for models that outgrow one device, sharded over the same
``data`` axis ZeRO-3 style (``parallel.shard_state="fsdp"``, :func:`state_sharding`): each
device stores 1/N of every large array and XLA inserts the all-gathers before use and the
reduce-scatters of the gradients. Library functions know nothing of devices; callers place
arrays with the shardings made here.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import importlib.util
import math
import mmap
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# parallel.shard_state: how the train state lies on the devices (see state_sharding).
SHARD_MODES = ("replicated", "fsdp")
# Under "fsdp", arrays of fewer elements than this stay replicated: biases, norm scales and
# small kernels (64 KiB in float32) cost little memory, and sharding them would add one
# collective per array per step for nothing.
FSDP_MIN_SIZE = 2**14


# XLA options diffjax's runs use unless XLA_FLAGS names them (`xla_defaults`), with the
# measurement behind each:
XLA_DEFAULTS = {
    # GPU: matrix products through cuBLAS rather than autotuned Triton kernels (ADM-64 on one
    # H100, benchmarks/adm64_accelerator.py: a 4% faster train step, 20 s less compilation).
    "xla_gpu_enable_triton_gemm": "false",
    # CPU: convolutions through XLA's Eigen kernels, which split each convolution over the
    # intra-op threads, instead of YNNPACK's, which run each one on a single core (jaxlib
    # 0.10.2, 2-core AMD EPYC: a 16x28x28x64 3x3 convolution 6.0 ms vs 11.0 ms forward and
    # 19.4 vs 34.8 ms forward + both gradients; the Fashion-MNIST train step about 1.4x
    # faster, benchmarks/vs_pytorch.py). YNNPACK keeps its other fusions (dots, reductions).
    "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
}


# jaxlib releases whose XLA was seen to know every option of XLA_DEFAULTS. XLA ends the
# process on an option in XLA_FLAGS it does not know, and experimental ones come and go, so
# with any other release `xla_defaults` first looks each one up in jaxlib's binaries.
CHECKED_JAXLIB = ("0.10.2",)


def xla_defaults() -> None:
    """Adds `XLA_DEFAULTS` to the XLA_FLAGS environment variable, keeping any of them that
    XLA_FLAGS already sets (the user's choice wins) and leaving out any that the installed
    jaxlib's XLA does not know (:func:`xla_knows`).

    XLA reads XLA_FLAGS once, when JAX starts its first backend: call this before any JAX
    computation (``python -m diffjax.main`` does; a script that imports diffjax calls it
    itself). Each option applies only to its own backend.
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    named = {f.lstrip("-").split("=", 1)[0] for f in flags}
    wanted = [k for k in XLA_DEFAULTS if k not in named]
    known = xla_knows(wanted)
    flags += [f"--{k}={XLA_DEFAULTS[k]}" for k in wanted if k in known]
    os.environ["XLA_FLAGS"] = " ".join(flags)


def xla_knows(names: Sequence[str], version: str | None = None,
              directory: str | None = None) -> set[str]:
    """Those of the XLA option ``names`` that the installed jaxlib knows: all of them for a
    release in :data:`CHECKED_JAXLIB`; otherwise those whose name is in one of jaxlib's
    shared libraries (where XLA registers its options; a scan of a few hundred MB, ~0.2 s).
    ``version``, ``directory``: jaxlib's version and folder (default: the installed one's),
    for tests. Nothing of JAX is imported."""
    if not names:
        return set()
    try:
        version = version or importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return set()
    if version in CHECKED_JAXLIB:
        return set(names)
    if directory is None:
        spec = importlib.util.find_spec("jaxlib")
        if spec is None or not spec.submodule_search_locations:
            return set()
        directory = list(spec.submodule_search_locations)[0]
    found: set[str] = set()
    for root, _, files in os.walk(directory):
        for name in files:
            if ".so" not in name:
                continue
            try:
                with open(os.path.join(root, name), "rb") as f, \
                        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as image:
                    found.update(n for n in names if image.find(n.encode()) >= 0)
            except (OSError, ValueError):  # unreadable, or empty (mmap of 0 bytes)
                continue
    return found


# XLA options for a program that only creates parameters (:func:`init_compiler_options`).
INIT_COMPILER_OPTIONS = {
    # LLVM's optimisation level 1 instead of XLA's 3. Initialisation is mostly the threefry
    # hashes of every parameter's random draw: many small fusions that run once, so their
    # compilation is the cost (jaxlib 0.10.2, 2-core Intel Xeon: the full ADM-64's init
    # program compiled in 9.5 s instead of 16.2 s, imagenet64.py:smoke's 4.3 s instead of
    # 9.9 s, running as fast) and the parameters came out bit for bit the same (level 0
    # changes their float rounding).
    "xla_backend_optimization_level": 1,
}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside the block, as it was after: for tracing
    and lowering a large program.

    Tracing allocates millions of short-lived objects, and the collector's passes over them
    were a fifth to a quarter of tracing and lowering ADM-64's train step (jax 0.10.2, 2-core
    Intel Xeon, fresh processes: 4.05-4.32 s with it, 3.13-3.47 s without) while they find
    nothing to free: 6 objects in cycles were left after that trace. Reference counting
    still frees everything else.
    Wraps diffjax's own traces (the train state's shapes and creation, the train step, the
    first call of each sampling program); use it around a program of your own the same way.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def init_compiler_options() -> dict[str, Any] | None:
    """``compiler_options`` for jitting a parameter-creating program on the default backend:
    :data:`INIT_COMPILER_OPTIONS` on CPU and GPU (XLA's LLVM back ends), None elsewhere."""
    return dict(INIT_COMPILER_OPTIONS) if jax.default_backend() in ("cpu", "gpu") else None


def maybe_initialize_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    *,
    initialization_timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
    shutdown_timeout_s: int = 300,
    barrier_timeout_s: int = 300,
    collective_timeout_s: int | None = None,
) -> bool:
    """Starts ``jax.distributed`` when this run spans several processes.

    With an explicit coordinator address (``host:port``) all three arguments are used. On a
    Cloud TPU pod slice (detected by several worker hostnames in ``TPU_WORKER_HOSTNAMES``),
    JAX finds the coordinator itself. Otherwise nothing is done (single process).

    Must run before anything starts a JAX backend; with several processes on CPU it starts the
    backend itself (to connect the collectives, below).

    Timeouts, in seconds (raise them on a loaded machine, where processes drift apart):
      initialization_timeout_s: how long a process waits for all processes to connect to the
        coordinator (``jax.distributed.initialize(initialization_timeout=...)``).
      heartbeat_timeout_s: silence after which the coordinator declares a process dead.
      shutdown_timeout_s: how long an exiting process waits for the others at the shutdown
        barrier.
      barrier_timeout_s: how long a process waits for the others at start-up: at the CPU
        backend's topology exchange (rounded up to minutes) and at the barrier before the CPU
        collectives connect (see ``_connect_cpu_collectives``).
      collective_timeout_s: CPU (gloo) only: how long one collective (a gradient all-reduce,
        orbax's save barrier) waits for the other processes to join it, set as XLA's
        ``--xla_cpu_collective_timeout_seconds``; None keeps XLA_FLAGS' or XLA's (30 min).

    Returns:
      True if ``jax.distributed.initialize`` was called.
    """
    timeouts = {"initialization_timeout": initialization_timeout_s,
                "heartbeat_timeout_seconds": heartbeat_timeout_s,
                "shutdown_timeout_seconds": shutdown_timeout_s}
    if coordinator_address:
        if num_processes <= 0 or process_id < 0:
            raise ValueError(
                "--coordinator_address needs --num_processes and --process_id as well"
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            **timeouts,
        )
    elif len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        jax.distributed.initialize(**timeouts)
    else:
        return False
    # The backend reads these when it starts, which jax.distributed.initialize has not done.
    minutes = max(1, math.ceil(barrier_timeout_s / 60))
    jax.config.update("jax_cpu_get_local_topology_timeout_minutes", minutes)
    jax.config.update("jax_cpu_get_global_topology_timeout_minutes", minutes + 1)
    if collective_timeout_s is not None:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_cpu_collective_timeout_seconds")]
        flags.append(f"--xla_cpu_collective_timeout_seconds={int(collective_timeout_s)}")
        os.environ["XLA_FLAGS"] = " ".join(flags)
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        _connect_cpu_collectives(barrier_timeout_s)
    return True


def _connect_cpu_collectives(timeout_s: int) -> None:
    """Connects, on all processes at one moment, the gloo groups that data-parallel work uses.

    gloo connects the processes of a device group when the group's first collective runs, and
    waits a fixed 30 s for the others (jaxlib 0.10 exposes no setting for it: not
    jax.distributed's timeouts, not ``--xla_cpu_collective_timeout_seconds``); a process more
    than 30 s late fails the run with "Gloo context initialization failed: ... GetKeyValue()
    timed out ... 30s". Left to itself, the first collective is wherever a process first needs
    one (a train step, orbax's first save barrier), and compiling up to it can put one process
    minutes behind another on a busy machine. So each process compiles one collective per group
    first, then all wait at a coordination-service barrier (``timeout_s``), then run them:
    connecting takes milliseconds, and XLA keeps the connections for the process's lifetime,
    shared by every later program over the same devices (after which a collective waits up to
    ``--xla_cpu_collective_timeout_seconds``). The groups: every device (a gradient all-reduce
    over ``make_mesh()``, an all-gather of a sharded array) and each local device index across
    processes (jax.experimental.multihost_utils' process_allgather, broadcast_one_to_all and
    sync_global_devices, which orbax's save/restore barriers use).
    """
    # orbax holds the public handle on the coordination service's barrier (jax's is private).
    import orbax.checkpoint as ocp  # heavy, adds a log handler: only multi-process runs need it

    mesh = make_mesh()
    whole = jax.make_array_from_process_local_data(
        data_sharding(mesh), np.ones(jax.local_device_count(), np.int32))
    grid = Mesh(np.asarray(jax.devices()).reshape(jax.process_count(), -1),
                ("processes", "local_devices"))  # as multihost_utils lays out the devices
    columns = jax.make_array_from_process_local_data(
        NamedSharding(grid, PartitionSpec("processes")), np.ones(1, np.int32))
    programs = [
        (jax.jit(jnp.sum, out_shardings=replicated(mesh)).lower(whole).compile(), whole),
        (jax.jit(lambda x: x, out_shardings=NamedSharding(grid, PartitionSpec()))
         .lower(columns).compile(), columns),
    ]
    ocp.multihost.get_barrier_sync_fn()(key="diffjax_connect_collectives",
                                        timeout_ms=1000 * timeout_s)
    outs = [compiled(x) for compiled, x in programs]
    n = jax.process_count()
    got = [int(outs[0].addressable_data(0)), np.asarray(outs[1].addressable_data(0)).tolist()]
    if got != [jax.device_count(), [1] * n]:
        raise RuntimeError(f"the first collectives between processes returned {got}")


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


def fsdp_spec(shape: Sequence[int], num_shards: int,
              min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
    """The ``fsdp`` placement of one array: split over ``data`` along its largest dimension
    divisible by ``num_shards`` (the first of equal ones: each shard then holds contiguous
    rows), or replicated (``PartitionSpec()``) for a scalar, an array of fewer than
    ``min_size`` elements, one without such a dimension, or one device."""
    if num_shards <= 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    dims = [d for d, size in enumerate(shape) if size % num_shards == 0]
    if not dims:
        return PartitionSpec()
    dim = max(dims, key=lambda d: shape[d])  # max() keeps the first of equal sizes
    return PartitionSpec(*([None] * dim), DATA_AXIS)


def state_sharding(mesh: Mesh, abstract_tree: Any, mode: str = "replicated",
                   min_size: int = FSDP_MIN_SIZE) -> Any:
    """A tree of NamedSharding for ``abstract_tree`` (arrays or ShapeDtypeStructs).

    mode "replicated": every device holds every array (``PartitionSpec()``); "fsdp": each array
    as :func:`fsdp_spec` places it. The rule depends on the shape only, so the optimiser's
    moments (Adam's mu and nu) and the EMA copies lie exactly as their parameter does.
    """
    if mode not in SHARD_MODES:
        raise ValueError(f"shard_state={mode!r}; valid: {', '.join(SHARD_MODES)}")
    n = num_data_shards(mesh)
    if mode == "replicated":
        return jax.tree.map(lambda _: replicated(mesh), abstract_tree)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, n, min_size)),
                        abstract_tree)


def gathered(tree: Any, mesh: Mesh, mode: str = "fsdp") -> Any:
    """``tree``, placed as :func:`state_sharding` places it for ``mode``, whole on every
    device inside a jitted program (a sharding constraint; ``tree`` itself when "replicated"):
    how a program uses the parameters of a sharded (fsdp) state. The network then runs
    data-parallel on gathered weights and, in a train step, each gradient is reduced back to
    its shard (ZeRO-3). Left to itself, XLA's partitioner instead splits some layers' work
    along the weights' sharded dimension, moving activations between devices (on 8 CPU
    devices, a tiny UNet's fsdp train step gathered the whole batch's activations 7 times
    and held 23 all-to-alls; with this constraint, neither)."""
    if mode == "replicated":
        return tree
    return jax.lax.with_sharding_constraint(tree, replicated(mesh))


def per_device_bytes(abstract_tree: Any) -> int:
    """Bytes of ``abstract_tree`` (leaves with shape, dtype and sharding: placed jax.Arrays or
    ShapeDtypeStructs) on the device that holds the most of it; nothing is allocated."""
    held: dict[Any, int] = {}
    for x in jax.tree.leaves(abstract_tree):
        itemsize = np.dtype(x.dtype).itemsize
        for device, index in x.sharding.devices_indices_map(tuple(x.shape)).items():
            count = math.prod(len(range(*s.indices(n))) for s, n in zip(index, x.shape))
            held[device] = held.get(device, 0) + count * itemsize
    return max(held.values(), default=0)


def format_bytes(n: float) -> str:
    """``n`` bytes in human form: 512 B, 1.50 MB, 2.25 GB (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


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
