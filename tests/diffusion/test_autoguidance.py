"""Autoguidance (guidance.type = "autoguidance"): the transform against its closed form, and
through the Generator on tiny saved DiT runs whose guide enters the sampling program as the
argument classifier guidance's classifier takes.

Scale convention: Ho & Salimans' w as for CFG, D = D_m + w (D_m - D_g); Karras et al.'s
weight is 1 + w, D = D_g + (1 + w) (D_m - D_g).
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import checkpoint, configlib, experiment, generate, parallel
from diffjax.app import common
from diffjax.diffusion import conditional
from diffjax.diffusion import guidance as G

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_PATH = os.path.join(REPO, "tests", "train", "tiny.py")
DIT = {"model.name": "dit", "model.dit.patch_size": 2, "model.dit.depth": 1,
       "model.dit.hidden_size": 32, "model.dit.num_heads": 2, "model.dropout": 0.0,
       "sampler.name": "ddim", "sampler.num_steps": 3, "sampler.thresholding": "none",
       "diffusion.prediction": "v"}  # v: random weights saturate fewer pixels than eps
# A smaller guide of another prediction and variance: its denoiser is still x0 in VE.
SMALL = {**DIT, "model.dit.hidden_size": 16, "diffusion.prediction": "x0",
         "diffusion.loss": "simple", "diffusion.variance_type": "fixed_small",
         "diffusion.timestep_sampler": "uniform", "guidance.type": "none"}
CONFIG_FILE = '''\
import importlib.util


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("diffjax_autoguidance_tiny", {tiny!r})
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny.config({data!r}, **{overrides!r})
'''
LABELS = np.array([0, 1, 2, 3], np.int32)


def _load_tiny():
    spec = importlib.util.spec_from_file_location("diffjax_tests_tiny_autoguidance", TINY_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _load_tiny()


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mesh):
    """(root, data dir, main run, the small guide's config file, its run)."""
    root = tmp_path_factory.mktemp("autoguidance")
    data = TINY.write_dataset(str(root / "data"))
    TINY.save_run(TINY.config(data, **DIT), str(root / "main"), mesh, 1)
    small = _config_file(root / "small.py", data, SMALL)
    TINY.save_run(configlib.load_config_file(small), str(root / "small"), mesh, 2)
    return root, data, str(root / "main"), small, str(root / "small")


def _config_file(path, data: str, overrides: dict) -> str:
    path.write_text(CONFIG_FILE.format(tiny=TINY_PATH, data=data, overrides=overrides))
    return str(path)


def _build(data: str, **overrides):
    return experiment.build(TINY.config(data, **{**DIT, "guidance.type": "autoguidance",
                                                 **overrides}))


# ----------------------------------------------------------------------------- the transform


def _pair(seed=0):
    """Two arbitrary (non-linear, label-dependent) denoisers and inputs x [4, 3, 2]."""
    rng = np.random.default_rng(seed)
    a, b = (jnp.asarray(rng.standard_normal((3, 2)), jnp.float32) for _ in range(2))

    def main(x, sigma, c):
        s = jnp.reshape(jnp.asarray(sigma), (-1, 1, 1))
        return jnp.tanh(x * a) / (1 + s) + c[:, None, None]

    def guide(x, sigma, c):
        s = jnp.reshape(jnp.asarray(sigma), (-1, 1, 1))
        return jnp.sin(x + b) * s / (1 + s**2) - 0.5 * c[:, None, None]

    x = jnp.asarray(rng.standard_normal((4, 3, 2)), jnp.float32)
    return main, guide, x, jnp.arange(4, dtype=jnp.float32)


def test_transform_is_the_papers_interpolation():
    main, guide, x, c = _pair()
    sigma = jnp.array([0.1, 0.5, 2.0, 10.0])
    d_m, d_g = main(x, sigma, c), guide(x, sigma, c)
    for w in (0.5, 1.25, 3.0):
        got = jax.jit(G.autoguidance(main, guide, w))(x, sigma, c)
        paper_w = 1.0 + w  # Karras et al.'s D_0 + w (D_1 - D_0), D_1 the main model
        np.testing.assert_allclose(got, d_g + paper_w * (d_m - d_g), rtol=1e-5, atol=1e-5)
    # The interval (lo, hi]: guided at 0.5 and 2.0, the main denoiser alone at 0.1 and 10.
    got = G.autoguidance(main, guide, 2.0, interval=(0.2, 2.0))(x, sigma, c)
    inside = np.array([False, True, True, False])
    np.testing.assert_allclose(got[inside], (3.0 * d_m - 2.0 * d_g)[inside], atol=1e-5)
    np.testing.assert_array_equal(got[~inside], d_m[~inside])
    # A scalar sigma, and the scale traced under jit.
    run = jax.jit(lambda w: G.autoguidance(main, guide, w)(x, 0.5, c))
    np.testing.assert_allclose(run(1.0), 2.0 * main(x, 0.5, c) - guide(x, 0.5, c), atol=1e-5)
    assert G.GUIDANCE["autoguidance"] is G.autoguidance


def test_scale_zero_is_the_main_denoiser_exactly_and_keeps_its_variance():
    main, guide, x, c = _pair(1)
    sigma = jnp.array([0.1, 0.5, 2.0, 10.0])
    np.testing.assert_array_equal(G.autoguidance(main, guide, 0.0)(x, sigma, c),
                                  main(x, sigma, c))
    frac = jnp.full(x.shape, 0.3)

    def with_variance(x, sigma, c):  # (x0_hat, frac) of a learned-variance network
        return main(x, sigma, c), frac

    x0, f = G.autoguidance(with_variance, guide, 1.5)(x, sigma, c)
    np.testing.assert_array_equal(f, frac)
    np.testing.assert_allclose(x0, 2.5 * main(x, sigma, c) - 1.5 * guide(x, sigma, c),
                               atol=1e-5)


# ----------------------------------------------------------------------------- Generator


def _unguided_sample(task, sampling, params, key, labels, denoise):
    """What Generator draws for one batch (FromNoise's key layout), with ``denoise``."""
    k_init, k_sample = jax.random.split(jax.random.fold_in(key, 0))
    sig = jnp.asarray(sampling.sampler.sigmas, jnp.float32)
    x = jax.random.normal(k_init, (len(labels), *task.image_shape)) * sig[0]
    out = sampling.sampler.fn(denoise, x, sig, k_sample, cond=jnp.asarray(labels),
                              **sampling.sampler.options, **sampling.knobs()["sampler"])
    return np.clip(np.asarray(out), -1.0, 1.0)


def test_a_guide_equal_to_the_model_is_unguided_sampling_and_inversion(runs, mesh):
    """guide_config "" and the main run as guide_workdir: D_m - D_g = 0, so any w samples
    (and inverts) as the unguided model; the guide is restored from its workdir."""
    _, data, main_run, _, _ = runs
    exp = _build(data, **{"guidance.guide_workdir": main_run, "guidance.scale": 3.0})
    guide_params = common.classifier_params(exp.sampling, mesh)
    params, _ = common.restore_params(exp.task, mesh, main_run)
    key = jax.random.PRNGKey(1)
    generator = generate.Generator(exp.task, exp.sampling, mesh, classifier_params=guide_params)
    images, _ = generator(params, 4, key, labels=LABELS)
    plain = exp.task.denoiser(params)
    want = _unguided_sample(exp.task, exp.sampling, params, key, LABELS, plain)
    np.testing.assert_allclose(images, want, atol=2e-5)
    assert np.all(np.isfinite(images)) and np.mean(np.abs(images) < 0.99) > 0.2  # not all clipped

    inv = _build(data, **{"guidance.guide_workdir": main_run, "guidance.scale": 3.0,
                          "condition.type": "invert"})
    inputs = np.random.default_rng(0).uniform(-0.9, 0.9, (4, 8, 8, 1)).astype(np.float32)
    latents = generate.Generator(inv.task, inv.sampling, mesh, guide_params).latents(
        params, inputs, key, LABELS)
    want = conditional.ddim_invert(plain, inputs, inv.sampling.sampler.sigmas,
                                   cond=jnp.asarray(LABELS))
    sigma_max = float(inv.sampling.sampler.sigmas[0])
    np.testing.assert_allclose(latents, want, rtol=1e-5, atol=1e-5 * sigma_max)


def test_a_smaller_guide_of_another_prediction_guides(runs, mesh):
    """A guide config of a smaller v-prediction DiT: the guided sample equals the sampler
    on autoguidance of the two tasks' denoisers, and differs from the unguided one."""
    _, data, main_run, small, small_run = runs
    exp = _build(data, **{"guidance.guide_config": small, "guidance.guide_workdir": small_run,
                          "guidance.scale": 0.5})  # larger w clips most pixels here
    guide = exp.sampling.guidance.guide
    assert guide.prediction == "x0" and guide.model.hidden_size == 16
    guide_params = common.classifier_params(exp.sampling, mesh)
    params, _ = common.restore_params(exp.task, mesh, main_run)
    plain, guide_denoise = exp.task.denoiser(params), guide.denoiser(guide_params)
    # The guided denoiser of the program, unclipped: 1.5 D_m - 0.5 D_g.
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1)) * 2.0
    sigma = jnp.array([0.5, 1.0, 2.0, 4.0])
    d_m, d_g = plain(x, sigma, LABELS), guide_denoise(x, sigma, LABELS)
    assert float(jnp.abs(d_m - d_g).mean()) > 1e-2
    got = generate.guided_denoiser(exp.sampling, plain, exp.sampling.knobs(), guide_params)
    np.testing.assert_allclose(got(x, sigma, LABELS), 1.5 * d_m - 0.5 * d_g, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(d_m).max()))
    key = jax.random.PRNGKey(2)
    generator = generate.Generator(exp.task, exp.sampling, mesh, guide_params)
    images, _ = generator(params, 4, key, labels=LABELS)
    want = _unguided_sample(exp.task, exp.sampling, params, key, LABELS,
                            G.autoguidance(plain, guide_denoise, 0.5))
    np.testing.assert_allclose(images, want, atol=1e-4)
    assert np.mean(np.abs(images) < 0.99) > 0.1  # not all clipped to [-1, 1]
    unguided, _ = generator(params, 4, key, labels=LABELS, knobs={"guidance_scale": 0.0})
    assert np.all(np.isfinite(images)) and np.abs(images - unguided).mean() > 1e-2
    np.testing.assert_allclose(
        unguided, _unguided_sample(exp.task, exp.sampling, params, key, LABELS, plain),
        atol=2e-5)


def test_guide_step_picks_the_checkpoint(runs, mesh):
    _, data, _, small, small_run = runs
    over = {"guidance.guide_config": small, "guidance.guide_workdir": small_run}
    latest = common.classifier_params(_build(data, **over).sampling, mesh)
    at_2 = common.classifier_params(_build(data, **over, **{"guidance.guide_step": 2})
                                    .sampling, mesh)
    for a, b in zip(jax.tree.leaves(latest), jax.tree.leaves(at_2), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(checkpoint.CheckpointError):
        common.classifier_params(_build(data, **over, **{"guidance.guide_step": 7})
                                 .sampling, mesh)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, guide, match", [
    ({}, None, "needs --config.guidance.guide_workdir"),
    ({"guidance.guide_workdir": "x", "guidance.guide_step": -2}, None, "guide_step=-2"),
    ({"guidance.guide_workdir": "x"}, {"model.name": "classifier", "model.pool": "adaptive"},
     "is not a diffusion model"),
    ({"guidance.guide_workdir": "x"}, {"data.image_size": 16}, "same images"),
    ({"guidance.guide_workdir": "x"}, {"model.class_cond": False,
                                       "guidance.label_dropout": 0.0}, "same images"),
    ({"guidance.guide_workdir": "x"}, {"data.num_classes": 5}, "same labels"),
    ({"guidance.guide_workdir": "x", "guidance.guide_config": "no/such.py"}, None,
     "guide_config='no/such.py': config file"),
])
def test_config_errors_are_one_line(runs, tmp_path, overrides, guide, match):
    _, data, _, _, _ = runs
    if guide is not None:
        overrides = {**overrides, "guidance.guide_config": _config_file(
            tmp_path / "guide.py", data, {**SMALL, **guide})}
    with pytest.raises(configlib.ConfigError, match=match) as err:
        _build(data, **overrides)
    assert "\n" not in str(err.value)


def test_only_diffusion_models_on_images_are_autoguided(runs):
    _, data, _, _, _ = runs
    with pytest.raises(configlib.ConfigError, match="guides a diffusion model") as err:
        experiment.build(TINY.config(data, **{
            "model.name": "classifier", "model.pool": "adaptive",
            "guidance.type": "autoguidance", "guidance.guide_workdir": "x"}))
    assert "\n" not in str(err.value)
