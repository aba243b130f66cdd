"""The train state is created by a program that holds no forward pass of the network: tracing
``model.init`` runs the forward, but its outputs are dead and are removed before XLA sees the
program, so start-up pays only for the random initialisers (issue 15)."""

import jax

from diffjax import configlib, experiment, parallel
from diffjax.train import state as state_lib
from diffjax.train.loop import Trainer


def test_state_initialisation_compiles_no_forward_pass():
    c = configlib.load_config_file("experiments/imagenet64.py:smoke")
    exp = experiment.build(c, num_devices=1)
    trainer = Trainer(exp.task, exp.optim, exp.train, parallel.make_mesh(jax.devices()[:1]))
    make = lambda: state_lib.create_train_state(exp.task.init_params, trainer.tx, 0, 1, 1000)  # noqa: E731
    text = jax.jit(make).lower().as_text()
    # The network's forward pass (convolutions, attention matmuls) is not in the program ...
    assert "stablehlo.convolution" not in text
    assert "stablehlo.dot_general" not in text
    # ... which the same trace with the forward's output kept would hold.
    x = jax.numpy.zeros((1, 64, 64, 3))
    apply = lambda: exp.task.model.init_with_output(  # noqa: E731
        jax.random.key(0), x, jax.numpy.zeros((1,)), jax.numpy.zeros((1,), jax.numpy.int32))[0]
    assert "stablehlo.convolution" in jax.jit(apply).lower().as_text()
