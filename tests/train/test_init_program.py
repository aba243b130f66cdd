"""The train state is created by a program that holds no forward pass of the network: tracing
``model.init`` runs the forward, but its outputs are dead and are removed before XLA sees the
program, so start-up pays only for the random initialisers (issue 15)."""

import pickle

import jax
import numpy as np
import pytest

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


def test_init_programs_compile_with_the_init_options_and_keep_the_parameters(
        tiny, tiny_data, monkeypatch):
    """Task.init_params and the trainer's state creation compile with
    parallel.init_compiler_options (a lower LLVM level than XLA's: start-up pays mostly for
    compiling the initialisers), and the parameters are those of the program compiled with
    XLA's defaults, bit for bit."""
    exp = experiment.build(tiny.config(tiny_data), num_devices=1)
    key = jax.random.PRNGKey(5)
    assert parallel.init_compiler_options() == parallel.INIT_COMPILER_OPTIONS  # CPU
    default = jax.jit(exp.task._init_params)(key)
    jax.tree.map(np.testing.assert_array_equal, exp.task.init_params(key), default)
    trainer = Trainer(exp.task, exp.optim, exp.train, parallel.make_mesh(jax.devices()[:1]))
    state = trainer.new_state()
    init_key = jax.random.split(jax.random.PRNGKey(exp.train.seed))[0]  # create_train_state's
    jax.tree.map(np.testing.assert_array_equal, state.params,
                 jax.jit(exp.task._init_params)(init_key))
    # Traced (jit, eval_shape), init_params is part of the caller's program, with the key an
    # argument or closed over.
    for shapes in (jax.eval_shape(exp.task.init_params, key),
                   jax.eval_shape(lambda: exp.task.init_params(key))):
        assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, default)
    jax.tree.map(np.testing.assert_array_equal,
                 jax.jit(lambda: exp.task.init_params(key))(), default)
    # The task pickles as before its compiled init existed, and its copy initialises alike.
    copy = pickle.loads(pickle.dumps(exp.task))
    jax.tree.map(np.testing.assert_array_equal, copy.init_params(key), default)
    # The options reach both compilations: an unknown one is refused by XLA.
    monkeypatch.setattr(parallel, "INIT_COMPILER_OPTIONS", {"xla_no_such_option": 1})
    other = experiment.build(tiny.config(tiny_data), num_devices=1)
    with pytest.raises(Exception, match="xla_no_such_option"):
        other.task.init_params(key)
    trainer = Trainer(other.task, other.optim, other.train,
                      parallel.make_mesh(jax.devices()[:1]))
    with pytest.raises(Exception, match="xla_no_such_option"):
        trainer.new_state()
