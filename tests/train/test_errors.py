"""Refusals before any long work: another run's workdir, corrupt checkpoints."""

import json
import os

import jax
import numpy as np
import pytest

from diffjax import checkpoint, configlib, experiment, parallel
from diffjax.app import common
from diffjax.app import train as app_train
from diffjax.train import loop


def test_workdir_of_a_different_config_is_refused(tiny, tiny_data, tmp_path):
    first = tiny.config(tiny_data)
    (tmp_path / "config.json").write_text(json.dumps(first.to_dict()))
    other = tiny.config(tiny_data, **{"model.model_channels": 64})
    mesh = parallel.make_mesh(jax.devices()[:1])
    with pytest.raises(configlib.ConfigError, match="holds a run of a different config "
                                                    "\\(fields differ: model.model_channels\\)"):
        app_train.run(experiment.build(other), str(tmp_path), mesh)
    assert not (tmp_path / "checkpoints").exists()
    # Sections that may change between sessions of one run are not compared.
    longer = tiny.config(tiny_data, **{"train.num_steps": 1000, "sampler.name": "heun"})
    loop.check_workdir_config(str(tmp_path), longer.to_dict(), allow_change=False)
    loop.check_workdir_config(str(tmp_path), other.to_dict(), allow_change=True)
    # A section a newer version added is not a difference.
    newer = first.to_dict()
    newer["condition"]["brand_new_field"] = 1
    newer["brand_new_section"] = {"x": 1}
    loop.check_workdir_config(str(tmp_path), newer, allow_change=False)


def _trainer(c, mesh):
    exp = experiment.build(c)
    return loop.Trainer(exp.task, exp.optim, exp.train, mesh)


def test_corrupt_checkpoint_is_a_one_line_error_and_is_kept(tiny, tiny_data, tmp_path):
    c = tiny.config(tiny_data)
    mesh = parallel.make_mesh(jax.devices()[:1])
    trainer = _trainer(c, mesh)
    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), async_save=False)
    checkpoint.save(manager, 1, trainer.new_state(), None, c.to_dict())
    manager.wait_until_finished()
    state_dir = tmp_path / "checkpoints" / "1" / "state"
    damaged = 0
    for root, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(max(os.path.getsize(path) // 3, 1))
            damaged += 1
    assert damaged
    fresh = checkpoint.make_manager(str(tmp_path / "checkpoints"))
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint step 1 .* cannot be restored"
                                                         ".*move that step's directory aside"):
        checkpoint.restore(fresh, trainer.abstract_state())
    assert state_dir.exists()


def test_checkpoint_round_trip_is_exact(tiny, tiny_data, tmp_path):
    c = tiny.config(tiny_data)
    mesh = parallel.make_mesh(jax.devices()[:2])
    trainer = _trainer(c, mesh)
    state = trainer.new_state()
    manager = checkpoint.make_manager(str(tmp_path / "ck"))
    checkpoint.save(manager, 3, state, None, c.to_dict())
    manager.wait_until_finished()
    restored, step = checkpoint.restore(manager, trainer.abstract_state())
    assert step == 3
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(
            jax.device_get(restored))):
        assert (a == b).all()
    assert checkpoint.restore_config(manager)["model"]["model_channels"] == 32
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.restore(checkpoint.make_manager(str(tmp_path / "empty")),
                           trainer.abstract_state())


def test_relative_checkpoint_directory_works(tiny, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = tiny.config(tiny_data)
    trainer = _trainer(c, parallel.make_mesh(jax.devices()[:1]))
    manager = checkpoint.make_manager("runs/x/checkpoints", async_save=False)
    checkpoint.save(manager, 2, trainer.new_state(), None, c.to_dict())
    manager.wait_until_finished()
    assert (tmp_path / "runs" / "x" / "checkpoints" / "2" / "state").is_dir()


def test_inference_restores_one_ema_copy_from_the_model_shapes_alone(tiny, tiny_data, tmp_path):
    """checkpoint.restore_ema_params reads EMA copy i into the model's init shapes (no
    optimiser, no train step), and refuses a checkpoint of another model in one line."""
    c = tiny.config(tiny_data)  # two EMA decays
    mesh = parallel.make_mesh(jax.devices()[:1])
    trainer = _trainer(c, mesh)
    state = trainer.new_state()
    emas = tuple(jax.tree.map(lambda p, k=k: p + (k + 1.0), state.params) for k in range(2))
    state = state.replace(ema_params=emas)
    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), async_save=False)
    checkpoint.save(manager, 4, state, None, c.to_dict())
    manager.wait_until_finished()
    task = experiment.build(c).task
    abstract = common.abstract_params(task, mesh)
    for k in range(2):
        got, step = checkpoint.restore_ema_params(str(tmp_path), abstract, index=k)
        assert step == 4
        for a, b in zip(jax.tree.leaves(jax.device_get(got)),
                        jax.tree.leaves(jax.device_get(emas[k]))):
            np.testing.assert_array_equal(a, b)
    other = experiment.build(tiny.config(tiny_data, **{"model.model_channels": 64})).task
    with pytest.raises(checkpoint.CheckpointError, match="parameters of another model") as info:
        common.restore_params(other, mesh, str(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoints at"):
        common.restore_params(task, mesh, str(tmp_path / "elsewhere"))
