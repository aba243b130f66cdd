"""Checkpoint integrity (issue 17): every checkpoint carries a digest of its arrays that every
restore checks, full or partial; overwritten bytes, a garbled ``_CHECKPOINT_METADATA``,
NaN/Inf and a failed write are one-line CheckpointErrors that name the step and delete
nothing, and the run after a failed write resumes from the last complete checkpoint."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffjax import checkpoint, parallel


def _hashes(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _one_line(info, *parts):
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


def _assert_trees_equal(a, b):
    a, b = jax.device_get(a), jax.device_get(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- a small state

def _small_state(k: int, ema_size: int = 64):
    """A train-state-like tree whose EMA kernels are random finite bit patterns: zstd cannot
    compress them, so orbax stores their bytes verbatim and a test can find and overwrite
    them (bytes overwritten in compressed data often fail to decompress instead)."""
    rng = np.random.default_rng(k)

    def ema():
        bits = rng.integers(0, 2**32, (ema_size, ema_size), np.uint32) & np.uint32(0xBFFFFFFF)
        return {"dense": {"kernel": bits.view(np.float32),  # |x| < 2: exponent below 128
                          "bias": rng.standard_normal(ema_size).astype(np.float32)}}

    return {"step": np.int32(k), "params": {"w": rng.standard_normal(8).astype(np.float32)},
            "ema_params": [ema(), ema()], "rng": np.arange(2, dtype=np.uint32) + k,
            "count": np.arange(3, dtype=np.int32)}


def _normal_state(k: int):
    """Gaussian parameters, as trained ones look: orbax's zstd compresses them."""
    rng = np.random.default_rng(k)
    ema = [{"kernel": rng.standard_normal((96, 96)).astype(np.float32)} for _ in range(2)]
    return {"step": np.int32(k), "params": ema[0], "ema_params": ema}


def _data_files(step_dir):
    return [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
            if os.path.basename(r) == "d"]


def _abstract(tree, mesh):
    rep = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                       sharding=rep), tree)


def _write(directory, steps, state_fn=_small_state):
    manager = checkpoint.make_manager(str(directory), async_save=False)
    for k in steps:
        checkpoint.save(manager, k, state_fn(k), None, {"step": k})
    checkpoint.wait(manager)
    manager.close()


def _write_raw(directory, step, state, with_digest):
    """A checkpoint written by orbax directly, through the manager diffjax made before it wrote
    each replicated array from one device (orbax's StandardCheckpointHandler, every array
    handler orbax's default): as diffjax wrote them before it saved a digest
    (``with_digest=False``), or with a digest but without the NaN check of ``save``."""
    options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_names=checkpoint.ITEMS,
        item_handlers={"state": ocp.StandardCheckpointHandler(), **checkpoint._handlers()})
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave({})}
    if with_digest:
        items["digest"] = ocp.args.JsonSave({"format": checkpoint.DIGEST_FORMAT, "arrays": {
            name: s for name, (s, _) in checkpoint.digest(state).items()}})
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Steps 1 and 2 of the small state (copy it before damaging it)."""
    directory = tmp_path_factory.mktemp("small") / "checkpoints"
    _write(directory, [1, 2])
    return directory


@pytest.fixture
def small_copy(small_run, tmp_path):
    directory = tmp_path / "run" / "checkpoints"
    shutil.copytree(small_run, directory)
    return directory


def test_digest_is_the_same_on_the_host_replicated_and_sharded():
    state = _small_state(1, ema_size=64)
    want = checkpoint.digest(state)
    assert set(want) >= {"step", "params/w", "ema_params/1/dense/kernel", "rng"}
    devices = jax.devices()[:4]
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    rep = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert checkpoint.digest(rep) == want

    def shard(x):  # the first axis over 4 devices where it divides
        split = np.ndim(x) and np.shape(x)[0] % 4 == 0
        spec = jax.sharding.PartitionSpec("data") if split else jax.sharding.PartitionSpec()
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    sharded = jax.tree.map(shard, state)
    assert not sharded["ema_params"][0]["dense"]["kernel"].sharding.is_fully_replicated
    assert checkpoint.digest(sharded) == want
    # One flipped bit, or two elements swapped, changes that array's digest and no other.
    kernel = state["ema_params"][0]["dense"]["kernel"]
    flipped = kernel.copy()
    flipped.view(np.uint32)[3, 5] ^= 1 << 7
    swapped = kernel.copy()
    swapped[0, 0], swapped[0, 1] = kernel[0, 1], kernel[0, 0]
    for changed in (flipped, swapped):
        other = jax.tree.map(lambda x: x, state)
        other["ema_params"][0]["dense"]["kernel"] = changed
        got = checkpoint.digest(other)
        assert [n for n in want if got[n] != want[n]] == ["ema_params/0/dense/kernel"]
    bad = dict(state, params={"w": np.asarray([np.nan, 1, np.inf, 0], np.float32)})
    assert checkpoint.digest(bad)["params/w"][1] == 2
    # NumPy arrays are hashed on the host: the same values as on the devices, for every dtype.
    rng = np.random.default_rng(0)
    odd = {"bool": rng.random((3, 5)) > 0.5, "int8": rng.integers(-9, 9, (7,), np.int8),
           "bf16": rng.standard_normal((2, 3, 4)).astype(jnp.bfloat16), "scalar": np.float32(2),
           "f16": np.asarray([np.inf, 1, -np.inf], np.float16), "empty": np.zeros((0, 3))}
    assert checkpoint.digest(odd) == checkpoint.digest(jax.device_put(odd, jax.devices()[0]))
    assert checkpoint.digest(odd)["f16"][1] == 2


def test_overwritten_array_bytes_stop_full_and_partial_restores(small_copy, mesh):
    """256 bytes of an EMA kernel overwritten by finite values: orbax reads them without
    complaint; the digest refuses them."""
    state = _small_state(2)
    kernel = state["ema_params"][0]["dense"]["kernel"].tobytes()
    found = []
    for path in _data_files(small_copy / "2"):
        with open(path, "rb") as f:
            at = f.read().find(kernel[1024:1088])
        if at >= 0:
            found.append((path, at))
    assert len(found) == 1, found
    path, at = found[0]
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes(256))  # zeros: finite, so only the digest can tell
    before = _hashes(small_copy.parent)
    manager = checkpoint.make_manager(str(small_copy))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore(manager, _abstract(state, mesh))
    _one_line(info, f"checkpoint step 2 in {small_copy} is corrupt", "1 of 8 arrays differ "
              "from the digest", "(ema_params/0/dense/kernel)", "nothing was deleted",
              "to resume from step 1")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore_ema_params(str(small_copy.parent), _abstract(
            state["ema_params"][0], mesh), index=0)
    _one_line(info, "checkpoint step 2", "is corrupt", "--checkpoint_step 1")
    # The other EMA copy is whole: reading it alone is allowed.
    ema, _ = checkpoint.restore_ema_params(str(small_copy.parent), _abstract(
        state["ema_params"][1], mesh), index=1)
    _assert_trees_equal(ema, state["ema_params"][1])
    assert _hashes(small_copy.parent) == before
    # The previous step, asked for explicitly, restores exactly.
    restored, step = checkpoint.restore(manager, _abstract(state, mesh), step=1)
    assert step == 1
    _assert_trees_equal(restored, _small_state(1))


# orbax leaves the coroutines of the other arrays' reads unfinished when one read fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_overwritten_compressed_bytes_are_one_line(tmp_path, mesh):
    """Bytes overwritten in the compressed data of Gaussian parameters: tensorstore cannot
    decompress them (and orbax raises a bare Exception); one line naming the step."""
    directory = tmp_path / "checkpoints"
    _write(directory, [1, 2], _normal_state)
    frames = 0
    for path in _data_files(directory / "2"):
        if os.path.getsize(path) < 4096:  # b-tree nodes, not array data
            continue
        with open(path, "rb") as f:
            blob = f.read()
        with open(path, "r+b") as f:  # the header after each zstd frame's magic number
            for at in range(len(blob)):
                if blob.startswith(bytes([0x28, 0xB5, 0x2F, 0xFD]), at):
                    f.seek(at + 4)
                    f.write(bytes(range(16)))
                    frames += 1
    assert frames >= 3  # params and both EMA copies
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore(checkpoint.make_manager(str(directory)), _abstract(
            _normal_state(2), mesh))
    _one_line(info, f"checkpoint step 2 in {directory} cannot be restored", "ZSTD",
              "to resume from step 1")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore_ema_params(str(directory), _abstract(_normal_state(2)["params"], mesh))
    _one_line(info, "checkpoint step 2", "--checkpoint_step 1")


# orbax leaves the coroutines of the other arrays' reads unfinished when one read fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_data_file_is_one_line(tmp_path, mesh, keep):
    """The array data files of the latest step cut to half their bytes, or to none (a copy
    or a disk that stopped short): one line naming the step and the previous one, for the
    full restore and for an EMA copy alone; no file is changed or deleted."""
    directory = tmp_path / "checkpoints"
    _write(directory, [1, 2], _normal_state)
    cut = 0
    for path in _data_files(directory / "2"):
        size = os.path.getsize(path)
        if size > 4096:  # array data, not a b-tree node
            with open(path, "r+b") as f:
                f.truncate(int(size * keep))
            cut += 1
    assert cut >= 1
    before = _hashes(directory)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore(checkpoint.make_manager(str(directory)), _abstract(
            _normal_state(2), mesh))
    _one_line(info, f"checkpoint step 2 in {directory}", "to resume from step 1")
    # An EMA copy alone: refused in one line, or (cut in half, where the copy's bytes may lie
    # in the kept half of the files orbax spread the arrays over) read whole and verified.
    abstract = _abstract(_normal_state(2)["params"], mesh)
    try:
        ema, _ = checkpoint.restore_ema_params(str(directory), abstract)
    except checkpoint.CheckpointError:
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.restore_ema_params(str(directory), abstract)
        _one_line(info, "checkpoint step 2", "--checkpoint_step 1")
    else:
        assert keep > 0
        _assert_trees_equal(ema, _normal_state(2)["ema_params"][0])
    assert _hashes(directory) == before
    restored, step = checkpoint.restore(checkpoint.make_manager(str(directory)), _abstract(
        _normal_state(2), mesh), step=1)
    assert step == 1
    _assert_trees_equal(restored, _normal_state(1))


@pytest.mark.parametrize("damage", ["metadata", "digest"])
def test_garbled_metadata_is_one_line(small_copy, mesh, damage):
    path = small_copy / "2" / ("_CHECKPOINT_METADATA" if damage == "metadata" else
                               "digest/metadata")
    path.write_bytes(b'{"item_handlers": {"state": \x00\xff garbage')
    before = _hashes(small_copy.parent)
    abstract = _abstract(_small_state(2), mesh)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore(checkpoint.make_manager(str(small_copy)), abstract)
    name = "_CHECKPOINT_METADATA" if damage == "metadata" else "digest"
    _one_line(info, "checkpoint step 2", f"is corrupt: its {name} cannot be read",
              "to resume from step 1")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore_ema_params(str(small_copy), abstract["ema_params"][0])
    _one_line(info, "checkpoint step 2", name, "--checkpoint_step 1")
    assert _hashes(small_copy.parent) == before


def test_nan_is_never_saved_nor_restored(small_copy, mesh):
    nan = _small_state(3)
    nan["ema_params"][1]["dense"]["bias"][5] = np.nan
    before = _hashes(small_copy.parent)
    manager = checkpoint.make_manager(str(small_copy), async_save=False)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.save(manager, 3, nan, None, {})
    _one_line(info, "not writing checkpoint step 3", "1 NaN/Inf values in "
              "ema_params/1/dense/bias", "earlier checkpoints are kept")
    manager.close()
    assert _hashes(small_copy.parent) == before
    abstract = _abstract(nan, mesh)
    for with_digest in (True, False):
        _write_raw(small_copy, 3, nan, with_digest)
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.restore(checkpoint.make_manager(str(small_copy)), abstract)
        _one_line(info, "checkpoint step 3", "holds 1 NaN/Inf values in ema_params/1/dense/bias",
                  "to resume from step 2")
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.restore_ema_params(str(small_copy), abstract["ema_params"][1], index=1)
        _one_line(info, "checkpoint step 3", "NaN/Inf", "--checkpoint_step 2")
        shutil.rmtree(small_copy / "3")


def test_checkpoint_without_digest_still_restores(tmp_path, mesh, caplog):
    directory = tmp_path / "checkpoints"
    state = _small_state(4)
    _write_raw(directory, 4, state, with_digest=False)
    with caplog.at_level(logging.WARNING):
        restored, step = checkpoint.restore(checkpoint.make_manager(str(directory)),
                                            _abstract(state, mesh))
    assert step == 4 and "has no digest" in caplog.text
    _assert_trees_equal(restored, state)
    ema, _ = checkpoint.restore_ema_params(str(directory), _abstract(state["ema_params"][1],
                                                                       mesh), index=1)
    _assert_trees_equal(ema, state["ema_params"][1])


def _write_shapes(step_dir) -> dict[str, list[int]]:
    """The shape of the pieces each array was written in (orbax's array metadata)."""
    with open(step_dir / "state" / "array_metadatas" / "process_0") as f:
        entries = json.load(f)["array_metadatas"]
    return {e["array_metadata"]["param_name"]: e["array_metadata"]["write_shape"]
            for e in entries}


def test_one_process_writes_each_replicated_array_whole_and_reads_the_sliced_ones(tmp_path):
    """A replicated array on 4 devices of one process is written whole from one of them, not
    cut into a slice per device (orbax's replica-parallel default: a program per slice, run
    on the training thread), and checkpoints written the old, sliced way still restore."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
    rng = np.random.default_rng(0)
    state = {"step": np.int32(3), "params": {"kernel": rng.standard_normal((64, 3), np.float32),
                                             "bias": rng.standard_normal(8, np.float32)}}
    on_devices = {"step": state["step"], "params": jax.device_put(
        state["params"], parallel.replicated(mesh))}
    whole = tmp_path / "whole"
    manager = checkpoint.make_manager(str(whole), async_save=False)
    checkpoint.save(manager, 3, on_devices, None, {})
    checkpoint.wait(manager)
    assert _write_shapes(whole / "3") == {"params.kernel": [64, 3], "params.bias": [8]}
    sliced = tmp_path / "sliced"
    _write_raw(sliced, 3, on_devices, with_digest=True)
    assert _write_shapes(sliced / "3") == {"params.kernel": [16, 3], "params.bias": [2]}
    for directory in (whole, sliced):
        restored, step = checkpoint.restore(checkpoint.make_manager(str(directory)),
                                            _abstract(state, mesh))
        assert step == 3
        _assert_trees_equal(restored, state)

# --------------------------------------------------------------------------- failed writes

WRITER = """
import os, resource, sys
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {test_dir!r})
import jax
from test_checkpoint_integrity import _small_state
from diffjax import checkpoint
directory, first, last, limit = sys.argv[1], *map(int, sys.argv[2:])
manager = checkpoint.make_manager(directory, keep=1)
device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
try:
    if first > 1:  # resume: the newest complete step, verified, is where it goes on from
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                _small_state(first - 1, ema_size=256))
        assert checkpoint.restore(manager, abstract)[1] == first - 1
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    for step in range(first, last + 1):  # the save's error comes at the next save or the wait
        checkpoint.save(manager, step, _small_state(step, ema_size=256), None, {{}})
    checkpoint.wait(manager)
except checkpoint.CheckpointError as e:  # to stdout: orbax's threads write tracebacks to stderr
    print(f"diffjax: error: {{e}}", flush=True)
    sys.exit(2)
"""


def _writer(tmp_path, directory, first, last, limit=0):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(test_dir=os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(script), str(directory), str(first), str(last),
                           str(limit)], env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_failed_write_keeps_earlier_checkpoints_and_the_next_run_resumes(tmp_path, mesh):
    directory = tmp_path / "checkpoints"
    ok = _writer(tmp_path, directory, 1, 1)
    assert ok.returncode == 0, ok.stderr[-3000:]
    before = _hashes(directory)
    # A file size limit below one array's bytes: the background write of step 2 fails; it
    # surfaces at the wait at the end of a run, or at the next save (max_to_keep=1: a
    # completed step 2 would have deleted step 1).
    for last_step in (2, 3):
        full = _writer(tmp_path, directory, 2, last_step, limit=100_000)
        assert full.returncode == 2, full.stderr[-3000:]
        # (orbax's background threads log the failure to stderr too, interleaved with
        # anything else written there: the script prints its line to stdout)
        lines = [x for x in full.stdout.splitlines() if x.startswith("diffjax: error:")]
        assert len(lines) == 1, full.stdout[-1000:] + full.stderr[-3000:]
        assert lines[0].startswith(
            f"diffjax: error: writing a checkpoint in {directory} failed (File too large); "
            "the complete ones (latest: step 1) are kept"), lines[0]
        kept = {k: v for k, v in _hashes(directory).items() if not k.startswith("2.orbax")}
        assert kept == before
        assert sorted(os.listdir(directory)) == ["1", "2.orbax-checkpoint-tmp"]
    # The next run (space freed) resumes from step 1 exactly; its manager deletes orbax's
    # unfinished directory (before its first save at the latest) and nothing else.
    manager = checkpoint.make_manager(str(directory), keep=3)
    restored, step = checkpoint.restore(manager, _abstract(_small_state(1, ema_size=256), mesh))
    assert step == 1
    _assert_trees_equal(restored, _small_state(1, ema_size=256))
    checkpoint.save(manager, 5, _small_state(5), None, {})
    checkpoint.wait(manager)
    assert sorted(os.listdir(directory)) == ["1", "5"]
    assert {k: v for k, v in _hashes(directory).items() if k.startswith("1" + os.sep)} == before


# ------------------------------------------------------------------- the command line, disk full

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(workdir, steps, cache, limit=0):
    """``python -m diffjax.main`` training the smoke model, a checkpoint every step, with the
    file size limit ``limit`` bytes (0: none)."""
    import resource

    def preexec():
        if limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "diffjax.main", "--config", "experiments/fashion_mnist.py:smoke",
           "--workdir", str(workdir), f"--config.train.num_steps={steps}",
           "--config.train.checkpoint_every=1", "--config.train.log_every=1",
           "--config.train.sample_every=0", "--config.train.keep_checkpoints=3",
           "--compilation_cache_dir", str(cache)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=preexec, check=False)


def test_disk_full_during_a_run_is_one_line_and_the_run_resumes(tmp_path):
    """ulimit -f below a checkpoint's size: the run stops with exit 2 and stderr holds its
    progress lines and one ``diffjax: error:`` line, nothing else (none of the tracebacks that
    orbax's, asyncio's and tensorstore's threads report the failed writes with); the earlier
    checkpoints are untouched, and the same command without the limit resumes to the end."""
    # The tests' shared compilation cache: after the first run it holds every program the
    # others run, so the run under the limit writes nothing there (a failed cache write would
    # be a warning on stderr, which the test counts).
    workdir, cache = tmp_path / "run", jax.config.jax_compilation_cache_dir
    first = _train(workdir, 2, cache)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = workdir / "checkpoints"
    before = _hashes(ckpts)
    biggest = max(os.path.getsize(ckpts / name) for name in before)
    full = _train(workdir, 4, cache, limit=biggest // 2)
    assert full.returncode == 2, full.stderr[-3000:]
    lines = [x for x in full.stderr.replace("\r", "\n").splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("diffjax: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], full.stderr[-3000:]
    assert errors[0].startswith(f"diffjax: error: writing a checkpoint in {ckpts} failed "
                                "(File too large)"), errors[0]
    others = [x for x in lines[:-1] if not x.startswith("step ")]
    assert not others, others[:10]
    assert {k: v for k, v in _hashes(ckpts).items() if k in before} == before
    resumed = _train(workdir, 4, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(os.listdir(ckpts)) == ["2", "3", "4"]


@pytest.mark.parametrize("text", [
    "OUT_OF_RANGE: Error writing local file \"/c/0\": Failed writing: \"/c/0.__lock\": Failed to "
    "write 39000 bytes to file 4: File too large [os_error_code='27']",
    # tensorstore may quote the spec (JSON, with colons) before the code
    "OUT_OF_RANGE: Error writing \"d/x\": Failed to write 8 bytes [tensorstore_spec='{\"driver\":"
    "\"file\",\"recheck\":true}'] [os_error_code='27']",
])
def test_the_reason_of_a_failed_write_is_the_operating_systems(text):
    assert checkpoint._write_reason(RuntimeError(text)) == os.strerror(27) == "File too large"
