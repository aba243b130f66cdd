"""prefetch_to_mesh: global sharded batches, and a checkpointed position that ignores the
batches already buffered ahead (also through orbax with grain's checkpoint handler)."""

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffjax.data import pipeline


def _host_iterator(idx_dir):
    return pipeline.make_train_iterator(
        source="idx", split="train", data_dir=idx_dir, image_size=None, global_batch_size=8,
        seed=4, random_flip=True, process_index=0, process_count=1)


def _sharding():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    return NamedSharding(mesh, PartitionSpec("data"))


def test_batches_land_sharded_and_equal_host_batches(idx_dir):
    sharding = _sharding()
    host = _host_iterator(idx_dir)
    expected = [next(host) for _ in range(5)]
    on_devices = pipeline.prefetch_to_mesh(_host_iterator(idx_dir), sharding, size=2)
    for want in expected:
        got = next(on_devices)
        assert isinstance(got["image"], jax.Array) and got["image"].sharding == sharding
        assert len(got["image"].addressable_shards) == len(jax.devices())
        np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])
        np.testing.assert_array_equal(np.asarray(got["label"]), want["label"])


def test_state_is_the_next_unconsumed_batch_through_orbax(idx_dir, tmp_path):
    sharding = _sharding()
    host = _host_iterator(idx_dir)
    expected = [next(host) for _ in range(9)]
    it = pipeline.prefetch_to_mesh(_host_iterator(idx_dir), sharding, size=3)
    for _ in range(4):
        next(it)  # the background thread has read further ahead than this
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    for _ in range(3):
        next(it)  # the run continues a little, then dies
    fresh = pipeline.prefetch_to_mesh(_host_iterator(idx_dir), sharding, size=3)
    manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want in expected[4:]:
        np.testing.assert_array_equal(np.asarray(next(fresh)["image"]), want["image"])
    manager.close()
