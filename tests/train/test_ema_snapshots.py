"""EMA snapshots on disk, post-hoc EMA for sample/eval and ``--mode posthoc_ema`` (no compile:
snapshots of random parameter trees written with the trainer's writer)."""

import dataclasses
import json
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffjax import experiment, parallel
from diffjax.app import common
from diffjax.app import posthoc as app_posthoc
from diffjax.errors import ConfigError
from diffjax.train import ema_snapshots, posthoc_ema

SIGMA_RELS = (0.05, 0.10)


@pytest.fixture(scope="module")
def run(tiny, tiny_data, tmp_path_factory):
    """A run directory with snapshots at steps 10..60 of a fixed copy + two power profiles."""
    c = tiny.config(tiny_data, **{"ema.sigma_rels": SIGMA_RELS, "ema.snapshot_every": 10})
    exp = experiment.build(c)
    mesh = parallel.make_mesh(jax.devices()[:1])
    abstract = common.abstract_params(exp.task, mesh)
    workdir = str(tmp_path_factory.mktemp("posthoc"))
    gammas = tuple(posthoc_ema.sigma_rel_to_gamma(s) for s in SIGMA_RELS)
    writer = ema_snapshots.SnapshotWriter(workdir, SIGMA_RELS, gammas, first=1)
    rng = np.random.default_rng(0)
    trees = {}
    for step in range(10, 61, 10):
        copies = tuple(jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype),
                                    abstract) for _ in range(3))
        trees[step] = copies[1:]
        writer.save(step, types.SimpleNamespace(ema_params=copies))
    writer.save(60, types.SimpleNamespace(ema_params=copies))  # a resumed run: kept as is
    writer.close()
    return types.SimpleNamespace(exp=exp, mesh=mesh, workdir=workdir, trees=trees,
                                 gammas=gammas)


def _expected(run, sigma_rel, last):
    steps = [s for s in sorted(run.trees) if s <= last]
    sol = posthoc_ema.solve([s for s in steps for _ in SIGMA_RELS],
                            [g for _ in steps for g in run.gammas], last,
                            posthoc_ema.sigma_rel_to_gamma(sigma_rel))
    flat = [run.trees[s][i] for s in steps for i in range(len(SIGMA_RELS))]
    return jax.tree.map(lambda *leaves: sum(c * np.asarray(x, np.float64) for c, x in
                                            zip(sol.coefficients, leaves)), *flat), sol


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), y, rtol=1e-4, atol=1e-4 * np.abs(y).max())


def test_sample_and_eval_params_are_the_posthoc_ema(run):
    exp = dataclasses.replace(run.exp, ema_sigma_rel=0.07)
    params, step = common.model_params(exp, run.mesh, run.workdir)
    want, sol = _expected(run, 0.07, 60)
    assert step == 60 and sol.residual < 0.05
    _close(params, want)
    # --checkpoint_step 35: the snapshots up to step 30
    params, step = common.model_params(exp, run.mesh, run.workdir + "/checkpoints", 35)
    assert step == 30
    _close(params, _expected(run, 0.07, 30)[0])


def test_a_tracked_profile_comes_back_as_its_snapshot(run):
    exp = dataclasses.replace(run.exp, ema_sigma_rel=0.10)
    params, _ = common.model_params(exp, run.mesh, run.workdir)
    _close(params, jax.tree.map(lambda a: np.asarray(a, np.float64), run.trees[60][1]))


def test_posthoc_mode_writes_params_json_and_plot(run):
    exp = dataclasses.replace(run.exp, ema_sigma_rel=0.08)
    params, sol = app_posthoc.run(exp, run.workdir, run.mesh)
    out = f"{run.workdir}/posthoc_ema/sigma_rel-0.08_step-60"
    record = json.loads(open(out + ".json").read())
    assert record["step"] == 60 and len(record["snapshots"]) == 12
    np.testing.assert_allclose([s["coefficient"] for s in record["snapshots"]],
                               sol.coefficients)
    restored = ocp.StandardCheckpointer().restore(out, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))
    _close(restored, jax.tree.map(lambda a: np.asarray(a, np.float64), params))
    assert open(out + ".png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_posthoc_errors_are_one_line(run, tmp_path):
    with pytest.raises(ConfigError, match="ema.sigma_rel=S") as e:
        app_posthoc.run(run.exp, run.workdir, run.mesh)
    exp = dataclasses.replace(run.exp, ema_sigma_rel=0.08)
    with pytest.raises(ConfigError, match="ema.snapshot_every") as e:
        common.model_params(exp, run.mesh, str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="at or before step 5"):
        common.model_params(exp, run.mesh, run.workdir, 5)
