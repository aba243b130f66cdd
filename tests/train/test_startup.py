"""The start of a training run: the step compiles while the state is created or restored."""

import threading

import jax
import pytest

from diffjax import checkpoint, experiment, parallel
from diffjax.train import loop

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
