"""The start of a training run: the step compiles while the state is created or restored."""

import gc
import threading

import jax
import numpy as np
import pytest

from diffjax import checkpoint, experiment, generate, hugepages, parallel
from diffjax.models import layers
from diffjax.train import loop, reporting

WAIT_S = 60  # how long either side waits for the other; a sequential start runs it out


def _meet(monkeypatch, owner, name):
    """Makes the step's compilation and ``owner.name`` (the state's creation or restoration)
    each wait until the other has begun: both get through at once only if they run at the
    same time; one after the other, the first runs out its wait and is recorded as alone."""
    compiling, creating = threading.Event(), threading.Event()
    met = {}
    compile_step, make_state = loop.CompilingStep._compile, getattr(owner, name)

    def _compile(self, lowered):
        compiling.set()
        met["compile"] = creating.wait(WAIT_S)
        return compile_step(self, lowered)

    def state(*args, **kwargs):
        creating.set()
        met["state"] = compiling.wait(WAIT_S)
        return make_state(*args, **kwargs)

    monkeypatch.setattr(loop.CompilingStep, "_compile", _compile)
    monkeypatch.setattr(owner, name, state)
    return met


def _train(c, workdir, mesh):
    exp = experiment.build(c, num_devices=parallel.num_data_shards(mesh))
    from diffjax.app import train as app_train  # (the app layer, as diffjax.main runs it)

    return app_train.run(exp, workdir, mesh)


def test_the_step_compiles_while_the_state_is_created_and_restored(tiny, tiny_data, tmp_path,
                                                                   monkeypatch, capsys):
    mesh = parallel.make_mesh(jax.devices()[:1])
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as m:
        met = _meet(m, loop.Trainer, "new_state")
        state = _train(tiny.config(tiny_data, **{"train.num_steps": 1}), workdir, mesh)
    assert met == {"compile": True, "state": True}
    assert int(state.step) == 1
    err = capsys.readouterr().err
    assert "step 1: first step" in err
    for part in ("step lowered at", "state created at", "step compiled at", "first step"):
        assert part in err.split("step 1: first step", 1)[1].splitlines()[0], err[-2000:]
    # A resumed run: the checkpoint is read while the step compiles.
    with monkeypatch.context() as m:
        met = _meet(m, checkpoint, "restore")
        state = _train(tiny.config(tiny_data, **{"train.num_steps": 2}), workdir, mesh)
    assert met == {"compile": True, "state": True}
    assert int(state.step) == 2
    assert "state restored at" in capsys.readouterr().err


class _Lowered:
    def __init__(self, result):
        self._result = result

    def compile(self):
        if isinstance(self._result, Exception):
            raise self._result
        return self._result


class _Trainer:
    def __init__(self, result):
        self.train_step = self
        self._result = result

    def lower(self, state, batch):
        assert state == "abstract" and batch == "batch"
        return _Lowered(self._result)

    def abstract_state(self):
        return "abstract"


def test_compiling_step_returns_raises_and_skips():
    done = loop.CompilingStep(_Trainer("compiled"), "batch", began=0.0)
    assert done.result(otherwise=None) == "compiled"
    assert set(done.times) == {"step lowered at", "step compiled at"}
    failed = loop.CompilingStep(_Trainer(RuntimeError("out of memory")), "batch", began=0.0)
    with pytest.raises(RuntimeError, match="out of memory"):
        failed.result(otherwise=None)
    nothing = loop.CompilingStep(_Trainer("compiled"), None, began=0.0)  # no step to run
    assert nothing.result(otherwise="the jitted step") == "the jitted step"
    assert nothing.times == {}


def test_gc_paused_restores_the_collector_as_it_was():
    assert gc.isenabled()
    with parallel.gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError), parallel.gc_paused():
        assert not gc.isenabled()
        1 / 0
    assert gc.isenabled()
    gc.disable()
    try:
        with parallel.gc_paused():
            pass
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


def test_the_large_traces_run_with_the_garbage_collector_paused(tiny, tiny_data, monkeypatch):
    """The state's shapes, the train step and a sampling program are traced with Python's
    cyclic collector off (parallel.gc_paused: its passes were a fifth to a quarter of tracing
    and lowering ADM-64's step): every GroupNorm traced records whether it was on."""
    seen = []
    group_norm = layers._group_norm_f32

    def recording(*args):
        seen.append(gc.isenabled())
        return group_norm(*args)

    monkeypatch.setattr(layers, "_group_norm_f32", recording)
    c = tiny.config(tiny_data)
    exp = experiment.build(c, num_devices=1)
    mesh = parallel.make_mesh(jax.devices()[:1])
    trainer = loop.Trainer(exp.task, exp.optim, exp.train, mesh)  # the state's shapes
    assert seen and not any(seen)
    traced = len(seen)
    batch = {"image": np.zeros((8, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, 1), np.float32),
             "label": np.zeros((8,), np.int32)}
    loop.CompilingStep(trainer, batch, began=0.0).result(otherwise=None)
    assert len(seen) > traced and not any(seen)
    traced = len(seen)
    state = trainer.new_state()
    generator = generate.Generator(exp.task, exp.sampling, mesh, batch_size=2)
    generator(state.ema_params[0], 2, jax.random.PRNGKey(0))
    assert len(seen) > traced and not any(seen)
    assert gc.isenabled()


def test_memory_freed_by_compiling_goes_back_after_the_first_step_and_batch(
        tiny, tiny_data, tmp_path, monkeypatch):
    """hugepages.release_freed_memory (glibc's malloc_trim) runs once the first train step has
    run, before later steps, and after the first batch of each sampling run: malloc keeps what
    compiling freed otherwise (a Fashion-MNIST run held a median 1.40-1.57 GB through its
    training instead of 0.76-0.79 GB)."""
    events = []
    monkeypatch.setattr(hugepages, "release_freed_memory", lambda: events.append("release"))
    startup, log = reporting.Reporter.startup, reporting.Reporter.log

    def recording_startup(self, *args, **kwargs):
        events.append("first step")
        return startup(self, *args, **kwargs)

    def recording_log(self, step, *args, **kwargs):
        events.append(f"log {step}")
        return log(self, step, *args, **kwargs)

    monkeypatch.setattr(reporting.Reporter, "startup", recording_startup)
    monkeypatch.setattr(reporting.Reporter, "log", recording_log)
    mesh = parallel.make_mesh(jax.devices()[:1])
    c = tiny.config(tiny_data, **{"train.num_steps": 3, "train.log_every": 1})
    state = _train(c, str(tmp_path / "run"), mesh)
    assert events == ["first step", "release", "log 1", "log 2", "log 3"]

    program = generate.Generator.program

    def recording_program(self, *args, **kwargs):
        fn = program(self, *args, **kwargs)

        def run(*call_args):
            events.append("batch")
            return fn(*call_args)

        return run

    monkeypatch.setattr(generate.Generator, "program", recording_program)
    exp = experiment.build(c, num_devices=1)
    generator = generate.Generator(exp.task, exp.sampling, mesh, batch_size=2)
    for _ in range(2):
        events.clear()
        images, _ = generator(state.ema_params[0], 5, jax.random.PRNGKey(0))
        assert images.shape[0] == 5
        assert events == ["batch", "release", "batch", "batch"]
