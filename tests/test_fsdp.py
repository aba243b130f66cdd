"""Sharded train state (``parallel.shard_state="fsdp"``) on 8 fake CPU devices.

The placement rule, leaf by leaf and in bytes per device (closed form); two fsdp train steps
equal to the replicated ones on the same global batch; checkpoints that move between the two
shardings (values, step and digest unchanged, and the next step the same); ``--mode summary``'s
bytes per device. One tiny UNet (8x8, channels 32/64, no attention) keeps the two compiled
steps to seconds.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from diffjax import checkpoint, configlib, experiment, generate, parallel
from diffjax.app import common as app_common
from diffjax.app import evaluate as app_evaluate
from diffjax.app import sample as app_sample
from diffjax.app import summary
from diffjax.app import train as app_train
from diffjax.errors import ConfigError
from diffjax.train import loop

P = PartitionSpec


def _load_tiny():
    path = os.path.join(os.path.dirname(__file__), "train", "tiny.py")
    spec = importlib.util.spec_from_file_location("diffjax_tests_tiny_fsdp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = _load_tiny()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny.write_dataset(str(tmp_path_factory.mktemp("fsdp_data")))


def _config(data_dir: str, mode: str):
    return tiny.config(data_dir, **{
        "parallel.shard_state": mode, "model.attention_resolutions": (),
        "model.class_cond": False, "model.dropout": 0.0, "guidance.type": "none",
        "guidance.label_dropout": 0.0, "diffusion.loss": "simple",
        "diffusion.variance_type": "fixed_small", "diffusion.timestep_sampler": "uniform"})


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    return parallel.make_mesh()


@pytest.fixture(scope="module")
def trainers(data_dir, mesh):
    return {mode: loop.Trainer(*_specs(_config(data_dir, mode)), mesh)
            for mode in ("replicated", "fsdp")}


def _specs(c):
    exp = experiment.build(c, num_devices=8)
    return exp.task, exp.optim, exp.train


def _batch(c, seed):
    rng = np.random.default_rng(seed)
    n, s = c.data.batch_size, c.data.image_size
    return {"image": rng.uniform(-1, 1, (n, s, s, 1)).astype(np.float32),
            "label": np.zeros(n, np.int32)}


def _expected_spec(shape) -> PartitionSpec:
    """The rule, written out: >= 2**14 elements and a dimension divisible by 8 -> the first
    largest such dimension over "data"; else replicated."""
    if math.prod(shape) < 2**14:
        return P()
    divisible = [(size, -d) for d, size in enumerate(shape) if size % 8 == 0]
    if not divisible:
        return P()
    d = -max(divisible)[1]
    return P(*([None] * d), "data")


def _paths(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _specs_of(tree):
    """{leaf name: PartitionSpec} of a tree of NamedShardings or placed arrays."""
    return {name: getattr(x, "sharding", x).spec for name, x in _paths(tree).items()}


# ----------------------------------------------------------------------------- (a) the rule

def test_fsdp_spec_examples():
    assert parallel.fsdp_spec((3, 3, 32, 64), 8) == P(None, None, None, "data")
    assert parallel.fsdp_spec((3, 3, 64, 64), 8) == P(None, None, "data")  # first of equals
    assert parallel.fsdp_spec((128, 128), 8) == P("data")  # exactly 2**14 elements
    assert parallel.fsdp_spec((127, 128), 8) == P()  # 16256 < 2**14: stays replicated
    assert parallel.fsdp_spec((3, 3, 36, 100), 8) == P()  # no dimension divisible by 8
    assert parallel.fsdp_spec((), 8) == P()
    assert parallel.fsdp_spec((1024, 64), 1) == P()  # one device
    assert parallel.fsdp_spec((1024, 64), 8, min_size=1) == P("data")


def test_fsdp_places_each_leaf_by_shape_and_mirrors_params(trainers):
    fsdp, rep = trainers["fsdp"], trainers["replicated"]
    shapes = fsdp.abstract_state()
    specs = _specs_of(fsdp.state_sharding)
    leaves = _paths(shapes)
    for name, leaf in leaves.items():
        assert specs[name] == _expected_spec(leaf.shape), name
    assert set(_specs_of(rep.state_sharding).values()) == {P()}
    # Some kernels sharded, along the expected dimension; small arrays and the bookkeeping
    # (step, RNG, timestep history) replicated.
    sharded = {n for n, s in specs.items() if s != P()}
    assert len(sharded) >= 10
    assert all(leaves[n].size >= 2**14 for n in sharded)
    assert specs[".step"] == specs[".rng"] == specs[".loss_history"] == P()
    # Adam's mu and nu and every EMA copy lie as their parameter does.
    params = _specs_of(fsdp.state_sharding.params)
    mirrors = {pname: [s for n, s in specs.items()
                       if n.endswith((".mu" + pname, ".nu" + pname))
                       or n in (f".ema_params[0]{pname}", f".ema_params[1]{pname}")]
               for pname in params}
    for pname, pspec in params.items():
        assert mirrors[pname] == [pspec] * 4, pname  # mu, nu and two EMA copies


def test_per_device_bytes_closed_form(trainers):
    shapes = trainers["fsdp"].abstract_state()
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    per_device = sum(x.size * x.dtype.itemsize // (8 if _expected_spec(x.shape) != P() else 1)
                     for x in jax.tree.leaves(shapes))
    assert parallel.per_device_bytes(shapes) == per_device
    assert parallel.per_device_bytes(trainers["replicated"].abstract_state()) == whole
    assert per_device < whole / 3  # most of the tiny UNet's bytes are in large kernels
    n = sum(x.size for x in jax.tree.leaves(shapes.params))
    assert parallel.per_device_bytes(trainers["replicated"].abstract_state().params) == 4 * n


# --------------------------------------------------------------- (b) the step equals replicated

@pytest.fixture(scope="module")
def stepped(trainers, data_dir, mesh):
    """Two steps under each sharding from the same fresh state on the same global batches;
    the states on the host after each step, and the live states (placed) after two."""
    c = _config(data_dir, "fsdp")
    batches = [parallel.global_batch_from_local(_batch(c, s), mesh) for s in (0, 1)]
    out = {}
    for mode, trainer in trainers.items():
        state, host, metrics = trainer.new_state(), [], []
        for batch in batches:
            state, m = trainer.train_step(state, batch)
            host.append(jax.device_get(state))
            metrics.append(jax.device_get(m))
        out[mode] = {"host": host, "metrics": metrics, "live": state}
    return out


def test_fsdp_steps_equal_replicated_steps(stepped):
    """Both programs compute the same sums; only the order of the cross-device gradient
    reduction may differ (all-reduce against reduce-scatter), a few float32 ulps of each
    gradient (~1e-7 relative). Adam's update lr * m / (sqrt(v) + eps) is scale-free in g, so a
    parameter moves by at most ~lr = 1e-3 per step and differs by ~1e-7 of that, far below
    rtol 1e-5 / atol 1e-6 on values of order 0.01-1; a wrong reduction (a missing or doubled
    gradient shard) changes updates by O(lr) = 1e-3. (On XLA:CPU with jaxlib 0.10.2 the two
    are bit-identical, measured; the tolerance is for backends that reduce in another order.)"""
    for i in range(2):
        rep, fsdp = stepped["replicated"]["host"][i], stepped["fsdp"]["host"][i]
        assert int(rep.step) == int(fsdp.step) == i + 1
        for (name, a), b in zip(_paths(rep).items(), jax.tree.leaves(fsdp)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=f"step {i + 1} {name}")
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(stepped["fsdp"]["metrics"][i][key],
                                       stepped["replicated"]["metrics"][i][key], rtol=1e-5)
    # The parameters moved (the comparison is not of two untouched states).
    first = stepped["replicated"]["host"]
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), first[0].params,
                         first[1].params)
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_fsdp_state_stays_in_its_sharding(stepped, trainers):
    live = stepped["fsdp"]["live"]
    want = trainers["fsdp"].state_sharding
    got = _specs_of(live)
    assert got == _specs_of(want)
    assert parallel.per_device_bytes(live) == parallel.per_device_bytes(
        trainers["fsdp"].abstract_state())
    # Each device really holds 1/8 of a sharded array.
    name = next(n for n, s in got.items() if s != P())
    x = _paths(live)[name]
    assert {s.data.size for s in x.addressable_shards} == {x.size // 8}


def _collectives(hlo: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(computation, op, result dims; () for a tuple) of every collective in compiled HLO."""
    out, computation = [], ""
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY )?%([\w.\-]+) \(", line)
        if head:
            computation = head.group(1)
        m = re.search(r" = (.+?) (all-gather|all-reduce|reduce-scatter|collective-permute|"
                      r"all-to-all)(?:-start)?\(", line)
        if m:
            shape = re.fullmatch(r"\w+\[([\d,]*)\]\S*", m.group(1))
            dims = tuple(int(d) for d in shape.group(1).split(",") if d) if shape else ()
            out.append((computation, m.group(2), dims))
    return out


def test_fsdp_step_gathers_weights_not_activations(trainers, mesh):
    """ZeRO-3: the fsdp step's only collectives are gathers of parameter shards to their whole
    shapes and the one combined gradient all-reduce (XLA:CPU then keeps each device's slice);
    nothing moves activations. Left to XLA's partitioner (without parallel.gathered) this
    step gathered the whole batch's activations 7 times and held 23 all-to-alls."""
    fsdp = trainers["fsdp"]
    data = parallel.data_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 1), np.float32, sharding=data),
             "label": jax.ShapeDtypeStruct((8,), np.int32, sharding=data)}
    hlo = fsdp.train_step.lower(fsdp.abstract_state(), batch).compile().as_text()
    found = _collectives(hlo)
    params = fsdp.abstract_state().params
    sharded = {tuple(x.shape) for x, sh in zip(jax.tree.leaves(params),
                                               jax.tree.leaves(fsdp.state_sharding.params))
               if sh.spec != P()}
    gathers = [dims for _, op, dims in found if op == "all-gather"]
    assert sorted({op for _, op, _ in found}) == ["all-gather", "all-reduce"], found
    assert [op for _, op, _ in found].count("all-reduce") == 1
    assert set(gathers) == sharded, set(gathers) ^ sharded


def _while_bodies(hlo: str) -> set[str]:
    return set(re.findall(r"body=%([\w.\-]+)", hlo))


def test_fsdp_sampling_equals_replicated_and_gathers_in_each_step(data_dir, mesh):
    """generate.Generator with shard_params="fsdp" takes the parameters as an fsdp state holds
    them: the images are those of the replicated program (the same sums on gathered weights;
    bit-identical on XLA:CPU, where the tolerance is float32 rounding for other backends), each
    device receives only its shards, and the weights are gathered inside the sampler's loop
    (without the optimization barrier XLA hoisted every gather out of it, keeping the whole
    network gathered beside its shards for the whole loop)."""
    c = _config(data_dir, "fsdp")
    c.model.attention_resolutions = (4,)  # attention weights too
    exp = experiment.build(c, num_devices=8)
    task, sampling = exp.task, exp.sampling
    params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
    placed = {mode: jax.device_put(params, generate.param_sharding(task, mesh, mode))
              for mode in ("replicated", "fsdp")}
    key = jax.random.PRNGKey(3)
    images = {mode: generate.Generator(task, sampling, mesh, shard_params=mode)(
        placed[mode], 8, key)[0] for mode in placed}
    np.testing.assert_allclose(images["fsdp"], images["replicated"], rtol=0, atol=1e-5)
    assert np.std(images["replicated"]) > 0.1  # real images, not a constant

    programs = {mode: generate.Generator(task, sampling, mesh, shard_params=mode).program(False)
                for mode in placed}
    args = (None, None, key, generate.balanced_labels(8, task.num_classes), None,
            sampling.knobs())
    compiled = {mode: programs[mode].lower(placed[mode], *args).compile() for mode in placed}
    per_device = {mode: compiled[mode].memory_analysis().argument_size_in_bytes
                  for mode in placed}
    shards = parallel.per_device_bytes(placed["fsdp"])
    whole = parallel.per_device_bytes(placed["replicated"])
    assert shards < whole / 2
    assert per_device["replicated"] - per_device["fsdp"] == whole - shards
    hlo = compiled["fsdp"].as_text()
    bodies = _while_bodies(hlo)
    sharded = {tuple(x.shape) for x in jax.tree.leaves(placed["fsdp"])
               if not x.is_fully_replicated}
    gathered_in = {dims for comp, op, dims in _collectives(hlo)
                   if op == "all-gather" and comp in bodies}
    gathered_out = {dims for comp, op, dims in _collectives(hlo)
                    if op == "all-gather" and comp not in bodies}
    assert gathered_in == sharded and not gathered_out & sharded, (gathered_in, gathered_out)


def test_sample_mode_restores_and_samples_sharded(data_dir, mesh, tmp_path):
    """--mode sample of a run with parallel.shard_state="fsdp": the EMA parameters are read
    into their shards (common.model_params) and the samples are the replicated config's."""
    run = tiny.save_run(_config(data_dir, "replicated"), str(tmp_path / "run"), mesh, seed=5)
    out = {}
    for mode in ("replicated", "fsdp"):
        exp = experiment.build(_config(data_dir, mode), num_devices=8, mode="sample")
        params, step = app_common.model_params(exp, mesh, run)
        want = generate.param_sharding(exp.task, mesh, mode)
        if mode == "fsdp":
            assert step == 2 and _specs_of(params) == _specs_of(want)
            assert any(s != P() for s in _specs_of(params).values())
        workdir = str(tmp_path / mode)
        out[mode], _ = app_sample.run(exp, workdir, mesh, checkpoint=run, seed=1)
    np.testing.assert_allclose(out["fsdp"], out["replicated"], rtol=0, atol=1e-5)
    assert np.std(out["replicated"]) > 0.1


def test_eval_nll_of_a_sharded_run(data_dir, mesh, tmp_path):
    """--mode eval's bits/dim (a program of its own, not the sampler's) takes fsdp-restored
    parameters and gives the replicated config's value (float32 sums: rtol 1e-6)."""
    run = tiny.save_run(_config(data_dir, "replicated"), str(tmp_path / "run"), mesh, seed=5)
    bpd = {}
    for mode in ("replicated", "fsdp"):
        c = _config(data_dir, mode)
        c.eval.metrics, c.eval.batch_size, c.eval.nll_num_examples = ("nll",), 8, 8
        exp = experiment.build(c, num_devices=8, mode="eval")
        records = app_evaluate.run(exp, str(tmp_path / mode), mesh, checkpoint=run, seed=0)
        bpd[mode] = records[0]["metrics"]["nll_bpd"]
    assert 0 < bpd["replicated"] < 100
    np.testing.assert_allclose(bpd["fsdp"], bpd["replicated"], rtol=1e-6)


# --------------------------------------------------- (c) checkpoints across a sharding change

def _save(state, directory, config):
    manager = checkpoint.make_manager(str(directory), async_save=False)
    checkpoint.save(manager, int(state.step), state, None, config.to_dict())
    manager.wait_until_finished()
    return manager


def test_checkpoint_moves_between_shardings(stepped, trainers, data_dir, mesh, tmp_path):
    c = _config(data_dir, "replicated")
    rep_host = stepped["replicated"]["host"][1]
    rep_state = jax.device_put(rep_host, trainers["replicated"].state_sharding)
    _save(rep_state, tmp_path / "rep", c)
    # Written replicated, restored as fsdp: same values and step, fsdp's shardings, and the
    # digest (checked by restore) the same whatever the sharding.
    fsdp_state, step = checkpoint.restore(checkpoint.make_manager(str(tmp_path / "rep")),
                                          trainers["fsdp"].abstract_state())
    assert step == 2 and int(fsdp_state.step) == 2
    assert _specs_of(fsdp_state) == _specs_of(trainers["fsdp"].state_sharding)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(fsdp_state), rep_host)
    assert checkpoint.digest(fsdp_state) == checkpoint.digest(rep_state)
    # Written fsdp, restored replicated.
    _save(fsdp_state, tmp_path / "fsdp", c)
    back, step = checkpoint.restore(checkpoint.make_manager(str(tmp_path / "fsdp")),
                                    trainers["replicated"].abstract_state())
    assert step == 2 and all(x.is_fully_replicated for x in jax.tree.leaves(back))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), rep_host)
    # The resumed run's next step: fsdp from the replicated checkpoint equals replicated.
    batch = parallel.global_batch_from_local(_batch(c, 2), mesh)
    after_fsdp, _ = trainers["fsdp"].train_step(fsdp_state, batch)
    after_rep, _ = trainers["replicated"].train_step(back, batch)
    assert int(after_fsdp.step) == int(after_rep.step) == 3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(after_fsdp), jax.device_get(after_rep))


def test_digest_of_many_sharded_arrays(mesh):
    """A checkpoint digest of many sharded arrays equals their host digest (sums modulo 2**32
    do not depend on the order of reduction), and completes: independent collective programs
    in flight together deadlock XLA:CPU (an abort after 40 s), so it runs them one by one."""
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((64, 256 + 8 * (i % 3))).astype(np.float32) for i in range(256)]
    sharded = [jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data"))) for x in host]
    assert checkpoint.digest(sharded) == checkpoint.digest(host)


def test_a_run_resumes_under_another_sharding_and_draws_grids(data_dir, mesh, tmp_path):
    """The trainer's loop end to end: 1 step replicated, then resumed under fsdp to step 2
    (parallel.* is not part of a run's identity), drawing grids from the EMA parameters as
    the state holds them (generate.Generator's programs take them so; no replicated copy)."""
    workdir = str(tmp_path / "run")
    drawn = []
    mean = jax.jit(lambda p: sum(jax.numpy.mean(x) for x in jax.tree.leaves(p)))

    def draw(ema_params):
        drawn.append((_specs_of(ema_params), float(mean(ema_params))))
        return np.zeros((4, 8, 8, 1), np.float32), 0

    for mode, steps in (("replicated", 1), ("fsdp", 2)):
        c = _config(data_dir, mode)
        c.train.num_steps, c.train.sample_every, c.train.log_every = steps, 1, 1
        exp = experiment.build(c, num_devices=8)
        loop.check_workdir_config(workdir, exp.resolved, allow_change=False)
        it = app_train.train_iterator(exp.data, exp.train.seed, 0, 1)
        state = loop.train(exp.task, exp.optim, exp.train, workdir, mesh, it,
                           resolved=exp.resolved, global_batch=8, draw_grid=draw)
    assert int(state.step) == 2 and len(drawn) == 2
    want = loop.Trainer(exp.task, exp.optim, exp.train, mesh).state_sharding
    assert _specs_of(state) == _specs_of(want)
    assert set(drawn[0][0].values()) == {P()}  # the replicated run's grid
    assert drawn[1][0] == _specs_of(want.ema_params[0])  # the fsdp run's: its shards
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:2] == ["1", "2"]


# --------------------------------------------------------------------- (d) summary and config

def test_summary_prints_state_bytes_per_device(data_dir, mesh):
    texts, sizes, compiled = {}, {}, []

    def listen(event, *args, **kwargs):
        if "mlir" in event or "backend_compile" in event:
            compiled.append(event)

    for mode in ("replicated", "fsdp"):
        exp = experiment.build(_config(data_dir, mode), num_devices=8, mode="summary")
        jax.monitoring.register_event_duration_secs_listener(listen)
        try:
            texts[mode] = summary.run(exp, mesh)
            sizes[mode] = summary.state_bytes(exp, mesh)
        finally:
            jax.monitoring.unregister_event_duration_listener(listen)
    assert not compiled  # eval_shape only: nothing lowered, compiled or run
    for mode, text in texts.items():
        b, f = sizes[mode], parallel.format_bytes
        assert (f"# train state per device (parallel.shard_state={mode}, 8 devices)\n"
                f"params {f(b['params'])}, optimizer state {f(b['optimizer'])}, "
                f"EMA {f(b['ema'])} (2 copies), total {f(b['total'])}") in text, text
    rep, fsdp = sizes["replicated"], sizes["fsdp"]
    n = summary.param_count(experiment.build(_config(data_dir, "fsdp"), num_devices=8))
    assert rep["params"] == 4 * n and rep["optimizer"] >= 8 * n and rep["ema"] == 8 * n
    for key in ("params", "optimizer", "ema", "total"):
        assert fsdp[key] < rep[key] / 3, key
    assert rep["total"] > rep["params"] + rep["optimizer"] + rep["ema"]  # step, RNG, history


def test_format_bytes():
    assert parallel.format_bytes(512) == "512 B"
    assert parallel.format_bytes(1_500_000) == "1.50 MB"
    assert parallel.format_bytes(2.25e9) == "2.25 GB"


def test_unknown_shard_state_is_a_one_line_error(data_dir):
    c = _config(data_dir, "zero3")
    with pytest.raises(ConfigError, match=re.escape(
            "config.parallel.shard_state='zero3' is not a valid choice; valid: replicated, "
            "fsdp")):
        experiment.build(c)
    assert configlib.base_config().parallel.shard_state == "replicated"
