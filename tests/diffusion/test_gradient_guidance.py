"""Gradient guidance (guidance.type = "gradient") against closed forms.

The data model is Gaussian, x_0 ~ N(mu, s^2 I), so its denoiser is D(x, sigma) = mu + k (x -
mu), k = s^2 / (s^2 + sigma^2), and x_0 | x_t ~ N(D, v), v = k sigma^2. An observation y = x_0
+ N(0, tau^2) has the likelihood y | x_t ~ N(D(x_t), v + tau^2), and the exact posterior mean
E[x_0 | x_t, y] = D + v / (v + tau^2) (y - D): the score shift D + sigma^2 grad_{x_t} log
p(y | x_t) at scale 1 must give it, whether the likelihood is written on x_t (``on="xt"``) or
as -(y - z)^2 / (2 (v + tau^2)) on z = x0_hat, differentiated through D (``on="x0"``).
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import configlib, experiment, generate, parallel
from diffjax.app import common
from diffjax.diffusion import guidance as G
from diffjax.guides import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MU, S2, TAU2 = 0.3, 0.5, 0.2  # prior mean and variance, observation noise variance
SIGMA = jnp.array([0.05, 0.4, 1.5, 20.0])
SHAPE = (4, 3, 2, 1)


def denoise(x, sigma, cond):
    """The exact denoiser of N(MU, S2 I) (cond unused)."""
    k = S2 / (S2 + jnp.reshape(jnp.asarray(sigma) ** 2, (-1, 1, 1, 1)))
    return MU + k * (x - MU)


def _v(sigma):
    s2 = jnp.asarray(sigma) ** 2
    return S2 * s2 / (S2 + s2)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(SHAPE) * 2.0, jnp.float32)
    y = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    return x, y


def _per_example(v):
    return jnp.reshape(v, (-1, 1, 1, 1))


def _log_lik(y, z, sigma):
    """-(y - z)^2 / (2 (v(sigma) + tau^2)) summed per example: [B]."""
    var = _per_example(_v(sigma) + TAU2)
    return jnp.sum(-0.5 * (y - z) ** 2 / var, axis=(1, 2, 3))


def _posterior_mean(x, y, sigma):
    d, v = denoise(x, sigma, None), _per_example(_v(sigma))
    return d + v / (v + TAU2) * (y - d)


def test_x0_input_through_the_denoiser_is_the_exact_posterior_mean():
    x, y = _data()
    guided = jax.jit(G.gradient_guidance(denoise, lambda z, s, c: _log_lik(y, z, s), 1.0))
    np.testing.assert_allclose(guided(x, SIGMA, None), _posterior_mean(x, y, SIGMA),
                               rtol=1e-5, atol=1e-5)


def test_xt_input_with_the_likelihood_of_x_t_is_the_exact_posterior_mean():
    x, y = _data(1)

    def log_lik_xt(x_t, s, c):  # log p(y | x_t): the same likelihood, written on x_t
        return _log_lik(y, denoise(x_t, s, c), s)

    guided = G.gradient_guidance(denoise, log_lik_xt, 1.0, on="xt")
    np.testing.assert_allclose(guided(x, SIGMA, None), _posterior_mean(x, y, SIGMA),
                               rtol=1e-5, atol=1e-5)


def test_the_inputs_differ_as_they_must_and_scale_multiplies_the_shift():
    """The same function read on x_t has the gradient (y - x) / (v + tau^2), not k (y - D) /
    (v + tau^2): the two guided denoisers differ by exactly that."""
    x, y = _data(2)

    def fn(z, s, c):
        return _log_lik(y, z, s)

    d, var = denoise(x, SIGMA, None), _per_example(_v(SIGMA) + TAU2)
    s2 = _per_example(SIGMA**2)
    for scale in (0.5, 3.0):
        on_xt = G.gradient_guidance(denoise, fn, scale, on="xt")(x, SIGMA, None)
        on_x0 = G.gradient_guidance(denoise, fn, scale, on="x0")(x, SIGMA, None)
        k = S2 / (S2 + s2)
        np.testing.assert_allclose(on_xt, d + scale * s2 * (y - x) / var, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(on_x0, d + scale * s2 * k * (y - d) / var, rtol=1e-5,
                                   atol=1e-4)
        assert np.max(np.abs(on_xt - on_x0)) > 0.1
    np.testing.assert_array_equal(G.gradient_guidance(denoise, fn, 0.0)(x, SIGMA, None), d)


def test_the_interval_switches_it_off_and_traced_knobs():
    x, y = _data(3)

    def fn(z, s, c):  # NaN gradient where sigma > 10: the interval must not let it through
        return _log_lik(y, z, s) * jnp.where(s > 10.0, jnp.nan, 1.0)

    run = jax.jit(lambda scale, lo, hi: G.gradient_guidance(
        denoise, fn, scale, interval=(lo, hi))(x, SIGMA, None))
    got = run(1.0, 0.1, 2.0)  # (0.1, 2.0]: guided at 0.4 and 1.5 only
    inside = np.array([False, True, True, False])
    full = _posterior_mean(x, y, SIGMA)
    np.testing.assert_allclose(got[inside], full[inside], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[~inside], denoise(x, SIGMA, None)[~inside])
    np.testing.assert_allclose(run(1.0, 0.0, 10.0)[:3], full[:3], rtol=1e-5, atol=1e-5)


def test_labels_reach_the_log_density_and_frac_passes_through():
    x, _ = _data(4)
    targets = jnp.array([-1.0, 0.0, 0.5, 2.0])
    labels = jnp.array([3, 0, 2, 1], jnp.int32)

    def toward_class(z, s, c):  # -(z - target[c])^2 / 2 per example
        return jnp.sum(-0.5 * (z - _per_example(targets[c])) ** 2, axis=(1, 2, 3))

    frac = jnp.full(SHAPE, 0.25)
    x0, f = G.gradient_guidance(lambda *a: (denoise(*a), frac), toward_class, 2.0,
                                on="xt")(x, 0.7, labels)
    np.testing.assert_array_equal(f, frac)
    want = denoise(x, 0.7, None) + 2.0 * 0.49 * (_per_example(targets[labels]) - x)
    np.testing.assert_allclose(x0, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'x0'"):
        G.gradient_guidance(denoise, toward_class, 1.0, on="x_t")


def test_the_fashion_mnist_brightness_guide():
    x = jnp.stack([jnp.full((28, 28, 1), v) for v in (-1.0, 0.0, 1.0)])
    np.testing.assert_allclose(fashion_mnist.brightness(x), [0.0, 0.5, 1.0])
    at_target = jnp.full((1, 28, 28, 1), 2 * fashion_mnist.BRIGHT - 1)
    assert abs(float(fashion_mnist.brighter(at_target, jnp.zeros(1), None)[0])) < 1e-6
    assert float(fashion_mnist.darker(at_target, jnp.zeros(1), None)[0]) < -20
    # Noise widens the constraint by sigma^2 / (4 D): the log density flattens with sigma.
    lp = fashion_mnist.brighter(x[:1].repeat(3, 0), jnp.array([0.0, 1.0, 10.0]), None)
    assert lp[0] < lp[1] < lp[2] < 0
    # The xt-mode shift of a far-too-dark x_t at large sigma: its brightness rises by about
    # (target - b(x_t)) at scale 1 (the constraint's own mean shift).
    g = G.gradient_guidance(lambda z, s, c: jnp.zeros_like(z), fashion_mnist.brighter, 1.0,
                            on="xt")(x[:1], 100.0, None)
    np.testing.assert_allclose(fashion_mnist.brightness(g) - 0.5, fashion_mnist.BRIGHT,
                               rtol=1e-3)


# ----------------------------------------------------------------------------- config


def _tiny():
    spec = importlib.util.spec_from_file_location(
        "diffjax_tests_tiny_gradient", os.path.join(REPO, "tests", "train", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _tiny()
BAD_MODULE = '''\
import jax.numpy as jnp
NOT_A_FUNCTION = 3


def per_pixel(x, sigma, cond):
    return x


def needs_labels(x, sigma, cond):
    return jnp.sum(x, axis=(1, 2, 3)) + cond


def good(x, sigma, cond):
    return -jnp.sum(x ** 2, axis=(1, 2, 3))
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return TINY.write_dataset(str(tmp_path_factory.mktemp("gradient") / "data"))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "gg_user_guides.py").write_text(BAD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "gg_user_guides"


def _build(data_dir, **overrides):
    return experiment.build(TINY.config(data_dir, **{"guidance.type": "gradient", **overrides}))


@pytest.mark.parametrize("overrides, match", [
    ({}, "goes with guidance.type='gradient'"),
    ({"guidance.type": "none", "guidance.log_density": "a.b:c"}, "goes with"),
    ({"guidance.log_density": "diffjax.guides.fashion_mnist"}, "'package.module:function'"),
    ({"guidance.log_density": "no_such_package.guides:f"}, "cannot be imported"),
    ({"guidance.log_density": "diffjax.guides.fashion_mnist:nothing"}, "has no attribute"),
    ({"guidance.log_density": "{m}:NOT_A_FUNCTION"}, "is not callable"),
    ({"guidance.log_density": "{m}:per_pixel"}, r"returns float32\[2, 8, 8, 1\]"),
    ({"guidance.log_density": "{m}:needs_labels", "model.class_cond": False}, "cond None"),
    ({"guidance.log_density": "{m}:good", "guidance.log_density_input": "noisy"},
     "log_density_input='noisy' is not a valid choice"),
])
def test_config_errors_are_one_line(data_dir, user_module, overrides, match):
    overrides = {k: v.format(m=user_module) if isinstance(v, str) else v
                 for k, v in overrides.items()}
    with pytest.raises(configlib.ConfigError, match=match) as err:
        _build(data_dir, **overrides)
    assert "\n" not in str(err.value)


def test_config_builds_the_transform_with_its_knobs(data_dir, user_module):
    """The resolved spec reaches the denoiser (generate.guided_denoiser) with the scale and
    interval as knobs and the input as a static choice."""
    e = _build(data_dir, **{"guidance.log_density": f"{user_module}:good",
                            "guidance.log_density_input": "xt", "guidance.scale": 2.0,
                            "guidance.interval_sigma_max": 1.0})
    g = e.sampling.guidance
    assert g.name == "gradient" and g.static["on"] == "xt"
    assert g.static["log_density"].__name__ == "good"
    x = jnp.ones((2, 8, 8, 1))
    d = generate.guided_denoiser(e.sampling, denoise, e.sampling.knobs())
    # log density -|x|^2: gradient -2x, shift 2 * sigma^2 * (-2x) inside (0, 1], none above.
    np.testing.assert_allclose(d(x, jnp.array([0.5, 2.0]), jnp.zeros(2, jnp.int32)),
                               denoise(x, jnp.array([0.5, 2.0]), None)
                               - jnp.array([1.0, 0.0]).reshape(-1, 1, 1, 1) * x, rtol=1e-5)


def test_the_generator_samples_the_guided_denoiser(data_dir, tmp_path):
    """Through the sampling program (a tiny DiT, random weights): the samples are the
    sampler's on gradient_guidance of the task's denoiser, and differ from unguided ones."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    dit = {"model.name": "dit", "model.dit.patch_size": 2, "model.dit.depth": 1,
           "model.dit.hidden_size": 32, "model.dit.num_heads": 2, "model.dropout": 0.0,
           "sampler.name": "ddim", "sampler.num_steps": 3, "sampler.thresholding": "none",
           "diffusion.prediction": "v"}
    run = TINY.save_run(TINY.config(data_dir, **dit), str(tmp_path / "run"), mesh, 1)
    exp = _build(data_dir, **dit, **{"guidance.log_density":
                                     "diffjax.guides.fashion_mnist:brighter",
                                     "guidance.scale": 2.0})
    params, _ = common.restore_params(exp.task, mesh, run)
    labels, key = np.array([0, 1, 2, 3], np.int32), jax.random.PRNGKey(3)
    images, _ = generate.Generator(exp.task, exp.sampling, mesh)(params, 4, key, labels=labels)

    def sample(denoise):  # what the Generator draws for one batch (FromNoise's key layout)
        k_init, k_sample = jax.random.split(jax.random.fold_in(key, 0))
        sig = jnp.asarray(exp.sampling.sampler.sigmas, jnp.float32)
        x = jax.random.normal(k_init, (4, *exp.task.image_shape)) * sig[0]
        out = exp.sampling.sampler.fn(denoise, x, sig, k_sample, cond=jnp.asarray(labels),
                                      **exp.sampling.sampler.options,
                                      **exp.sampling.knobs()["sampler"])
        return np.clip(np.asarray(out), -1.0, 1.0)

    plain = exp.task.denoiser(params)
    want = sample(G.gradient_guidance(plain, fashion_mnist.brighter, 2.0))
    np.testing.assert_allclose(images, want, atol=2e-5)
    assert np.max(np.abs(images - sample(plain))) > 1e-2
