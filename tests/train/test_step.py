"""The pure train step: data parallelism, learning, NaN safety, EMA, resampler, schedules."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import experiment, parallel
from diffjax.train import optim
from diffjax.train import loop
from diffjax.train import step as step_lib
from diffjax.train.state import HISTORY, ema_update
from diffjax.train.step import sample_timesteps


def Trainer(c, mesh):  # noqa: N802 (the trainer of a config)
    exp = experiment.build(c)
    return loop.Trainer(exp.task, exp.optim, exp.train, mesh)


def _batch(c, seed=0):
    rng = np.random.default_rng(seed)
    n, s = c.data.batch_size, c.data.image_size
    return {"image": rng.uniform(-1, 1, (n, s, s, 1)).astype(np.float32),
            "label": (np.arange(n) % c.data.num_classes).astype(np.int32)}


def _place(batch, mesh):
    return parallel.global_batch_from_local(batch, mesh)


@pytest.fixture(scope="module")
def hybrid(tiny, tiny_data):
    """One step of the full-featured tiny config on 8 devices and on 1 device."""
    c = tiny.config(tiny_data)
    out = {}
    for n in (8, 1):
        mesh = parallel.make_mesh(jax.devices()[:n])
        trainer = Trainer(c, mesh)
        state, metrics = trainer.train_step(trainer.new_state(), _place(_batch(c), mesh))
        out[n] = jax.device_get((state, metrics))
    return out


def test_eight_device_step_equals_one_device_step(hybrid):
    (s8, m8), (s1, m1) = hybrid[8], hybrid[1]
    assert int(s8.step) == int(s1.step) == 1
    flat8 = jax.tree_util.tree_leaves_with_path(s8.params)
    flat1 = jax.tree.leaves(s1.params)
    for (path, a), b in zip(flat8, flat1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    for e8, e1 in zip(jax.tree.leaves(s8.ema_params), jax.tree.leaves(s1.ema_params)):
        np.testing.assert_allclose(e8, e1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_array_equal(s8.loss_count, s1.loss_count)


def test_step_metrics_and_history(hybrid):
    state, metrics = hybrid[1]
    assert {"loss", "mse", "vlb", "grad_norm", "learning_rate", "nonfinite"} <= set(metrics)
    assert int(metrics["nonfinite"]) == 0 and np.isfinite(metrics["loss"])
    # 8 examples pushed into the resampler's history, one count per example.
    assert int(np.sum(state.loss_count)) == 8


def test_loss_falls_on_a_tiny_set(tiny, tiny_data):
    c = tiny.config(tiny_data, **{"diffusion.loss": "simple", "diffusion.variance_type":
                                  "fixed_small", "diffusion.timestep_sampler": "uniform",
                                  "model.dropout": 0.0, "guidance.label_dropout": 0.0,
                                  "guidance.type": "none"})
    mesh = parallel.make_mesh(jax.devices()[:1])
    trainer = Trainer(c, mesh)
    state, batch = trainer.new_state(), _place(_batch(c, seed=1), mesh)
    mses = []
    for _ in range(60):
        state, metrics = trainer.train_step(state, batch)
        mses.append(float(metrics["mse"]))
    # Zero-initialised output: the first eps-MSE is a mean of 512 eps^2 draws, 1 +- sqrt(2/512).
    sd = np.sqrt(2 / 512)
    assert abs(mses[0] - 1.0) < 4 * sd
    # Fitting 8 images must bring the mean of the last 10 steps far below that: an untrained
    # net would stay within 4 sd / sqrt(10) of 1.
    assert np.mean(mses[-10:]) < 0.6


def test_nonfinite_step_leaves_the_state_unchanged(tiny, tiny_data):
    c = tiny.config(tiny_data)
    mesh = parallel.make_mesh(jax.devices()[:1])
    trainer = Trainer(c, mesh)
    # Good steps first (the first has learning rate 0: warm-up): the EMAs then differ from
    # the parameters (at the start they are equal, and an EMA update towards unchanged
    # parameters would not move them).
    state = trainer.new_state()
    for _ in range(2):
        state, _ = trainer.train_step(state, _place(_batch(c), mesh))
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, jax.device_get(state.params),
                                                jax.device_get(state.ema_params[0]))))
    fields = ("params", "ema_params", "opt_state", "loss_history", "loss_count")
    before = {name: jax.device_get(getattr(state, name)) for name in fields}
    bad = _batch(c)
    bad["image"][0, 0, 0, 0] = np.nan
    new, metrics = trainer.train_step(state, _place(bad, mesh))
    assert int(metrics["nonfinite"]) == 1
    assert int(new.step) == 3
    new = jax.device_get(new)
    assert int(np.sum(new.loss_count)) == 16  # the good steps' 8 examples each only
    for name in fields:  # parameters, EMAs, Adam's moments and count, resampler history
        for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(getattr(new, name))):
            np.testing.assert_array_equal(a, b, err_msg=name)


def _copied_state_paths(step, state, batch):
    """Paths of the state's leaves whose (donated) input buffers the compiled step copies."""
    hlo = step.lower(state, batch).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    number = {m.group(1): int(m.group(2))
              for m in re.finditer(r"%(\S+) = \S+ parameter\((\d+)\)", entry)}
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert len(number) == len(paths) + len(jax.tree.leaves(batch))
    return [paths[number[m]] for m in re.findall(r" copy\(%(\S+)\)", entry) if m in number]


def test_step_copies_no_state_buffer(tiny, tiny_data):
    """The compiled step updates the donated model-sized state in place: parameters, EMAs,
    Adam's moments.

    XLA copied the parameters (the EMAs recomputed the update from them) and both moments
    (the update's fusion recomputed them from the old ones) before overwriting them; the same
    step with optax's own AdamW, checked the same way, still copies its moments."""
    c = tiny.config(tiny_data)
    mesh = parallel.make_mesh(jax.devices()[:1])
    exp = experiment.build(c)
    trainer = loop.Trainer(exp.task, exp.optim, exp.train, mesh)
    state, batch = trainer.abstract_state(), _place(_batch(c), mesh)
    copied = _copied_state_paths(trainer.train_step, state, batch)
    big = (".params", ".ema_params", ".mu[", ".nu[")  # (counters and the history may be)
    assert not [p for p in copied if any(k in p for k in big)], copied
    o = exp.optim
    assert o.grad_clip > 0
    plain = optim.optax.chain(optim.optax.clip_by_global_norm(o.grad_clip),
                              optim.optax.adamw(trainer.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                                weight_decay=o.weight_decay))
    step = step_lib.make_train_step(exp.task.loss_fn(), plain, o.ema_decays, trainer.lr,
                                    exp.task.timestep_sampler, o.ema_gammas)
    jitted = jax.jit(lambda s, b: step(s, b, step_lib.step_key(s)), donate_argnums=(0,))
    copied = _copied_state_paths(jitted, state, batch)
    assert any(".mu[" in p for p in copied) and any(".nu[" in p for p in copied), copied


def test_ema_update_closed_form():
    ema, params = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}
    out = ema_update(ema, params, 0.9)
    np.testing.assert_allclose(out["w"], 0.9 * np.array([1.0, 2.0]) + 0.1 * np.array([3.0, -2.0]),
                               rtol=1e-6)


def test_loss_second_moment_sampler_follows_the_history(tiny, tiny_data):
    from diffjax.train.state import TrainState

    num_t = 5
    history = np.tile(np.array([1.0, 2.0, 3.0, 4.0, 0.0])[:, None], (1, HISTORY))
    state = TrainState(step=0, params={}, ema_params=(), opt_state=(), rng=None,
                       loss_history=jnp.asarray(history, jnp.float32),
                       loss_count=jnp.full((num_t,), HISTORY, jnp.int32))
    t, w = sample_timesteps(jax.random.PRNGKey(0), 200_000, state, "loss_second_moment")
    p = np.array([1, 2, 3, 4, 0], np.float64) / 10 * (1 - 1e-3) + 1e-3 / num_t
    freq = np.bincount(np.asarray(t), minlength=num_t) / 200_000
    bound = 5 * np.sqrt(p * (1 - p) / 200_000)  # 5 binomial standard errors
    assert np.all(np.abs(freq - p) <= bound), (freq, p, bound)
    np.testing.assert_allclose(np.asarray(w), 1 / (num_t * p[np.asarray(t)]), rtol=1e-5)
    cold = state.replace(loss_count=jnp.zeros((num_t,), jnp.int32))
    t, w = sample_timesteps(jax.random.PRNGKey(1), 1000, cold, "loss_second_moment")
    np.testing.assert_allclose(np.asarray(w), 1.0, rtol=1e-6)


def test_learning_rate_schedules():
    warm = optim.learning_rate_schedule(1.0, 10, 110, "constant")
    assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(0.5)
    assert float(warm(10)) == pytest.approx(1.0) and float(warm(100)) == pytest.approx(1.0)
    cos = optim.learning_rate_schedule(1.0, 10, 110, "cosine", min_ratio=0.1)
    assert float(cos(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), rel=1e-5)
    assert float(cos(110)) == pytest.approx(0.1, rel=1e-5)


def test_gradient_clipping_bounds_the_update():
    tx = optim.make_optimizer(optim.learning_rate_schedule(1.0, 0, 10), grad_clip=1.0)
    g = {"w": jnp.array([30.0, 40.0])}
    # Clipped to norm 1 before Adam: Adam's first step is lr * g/|g| elementwise = sign(g).
    clip_only = optim.optax.clip_by_global_norm(1.0)
    clipped, _ = clip_only.update(g, clip_only.init(g))
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8], rtol=1e-6)
    updates, _ = tx.update(g, tx.init(g), g)
    np.testing.assert_allclose(updates["w"], [-1.0, -1.0], rtol=1e-5)


@pytest.mark.parametrize("grad_clip,given_norm", [(0.0, False), (0.3, False), (0.3, True)])
def test_optimizer_is_optax_adamw_value_for_value(grad_clip, given_norm):
    """make_optimizer = optax.chain(clip_by_global_norm, adamw) with the step's guard around
    it: the same state tree, and the same operations: run op by op (no jit, so no fusion can
    round differently), bit for bit the same parameters and state over 6 steps, a non-finite
    one among them (it keeps everything)."""
    lr = optim.learning_rate_schedule(0.1, 2, 8, "cosine", min_ratio=0.1)
    kw = dict(b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.3)
    tx = optim.make_optimizer(lr, grad_clip=grad_clip, **kw)
    ref = optim.optax.chain(*([optim.optax.clip_by_global_norm(grad_clip)] if grad_clip else []),
                            optim.optax.adamw(lr, **kw))
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(7, 9)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(9,)), jnp.float32)}

    def ours(p, s, g, finite):
        norm = optim.global_norm(g) if given_norm else None
        u, s = tx.update(g, s, p, finite=finite, grad_norm=norm)
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b),
                            optim.optax.apply_updates(p, u), p), s

    def theirs(p, s, g, finite):
        u, new = ref.update(g, s, p)
        keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
        return keep(optim.optax.apply_updates(p, u), p), keep(new, s)

    a, b = (params, tx.init(params)), (params, ref.init(params))
    assert jax.tree.structure(a[1]) == jax.tree.structure(b[1])
    for i in range(6):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        finite = i != 3
        if not finite:
            g["w"] = g["w"].at[0, 0].set(jnp.nan)
        with jax.disable_jit():
            a, b = ours(*a, g, jnp.asarray(finite)), theirs(*b, g, jnp.asarray(finite))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y, err_msg=f"step {i}")
    assert int(a[1][-1][0].count) == 5  # Adam's count: the non-finite step did not count
    assert not np.array_equal(a[0]["w"], params["w"])


def test_optimizer_traces_one_call_per_array():
    """Each parameter array's arithmetic is one call of a function jitted once per shape, so
    tracing a step records a few equations per array, not optax's ~28 (the cost of tracing is
    per equation; ADM-64 has 541 arrays)."""
    params = {f"w{i}": jnp.zeros((4, 3) if i % 2 else (5,)) for i in range(40)}
    lr = optim.learning_rate_schedule(0.1, 2, 8)
    tx = optim.make_optimizer(lr, weight_decay=0.1, grad_clip=1.0)

    def count(fn, state):
        return len(jax.make_jaxpr(fn)(params, state, params).jaxpr.eqns)

    ours = count(lambda g, s, p: tx.update(g, s, p, finite=jnp.isfinite(g["w0"][0])),
                 tx.init(params))
    given = count(lambda g, s, p: tx.update(g, s, p, finite=jnp.isfinite(g["w0"][0]),
                                            grad_norm=jnp.float32(2.0)), tx.init(params))
    ref = optim.optax.chain(optim.optax.clip_by_global_norm(1.0),
                            optim.optax.adamw(lr, weight_decay=0.1))
    theirs = count(ref.update, ref.init(params))
    # per array: its squared norm, the norm's running sum, its update (given the norm: its
    # update); then a few scalars
    assert given <= 40 + 30 and ours <= 3 * 40 + 30 < 15 * 40 <= theirs, (given, ours, theirs)


def test_optimizer_takes_a_constant_learning_rate():
    g = {"w": jnp.array([3.0, -4.0, 0.5])}
    tx, ref = optim.make_optimizer(0.1, weight_decay=0.2), optim.optax.adamw(0.1, weight_decay=0.2)
    with jax.disable_jit():
        ours, _ = tx.update(g, tx.init(g), g)
        theirs, _ = ref.update(g, ref.init(g), g)
    np.testing.assert_array_equal(ours["w"], theirs["w"])
