"""Guidance and thresholding transforms, on the class-conditional mixture of mixture.py.

Scale convention: Ho & Salimans' w, D = (1 + w) D_c - w D_u, so w = 0 is plain conditional
sampling; GLIDE/diffusers' guidance_scale is 1 + w.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from mixture import default_mixture  # noqa: E402

from diffjax.diffusion import guidance as G  # noqa: E402
from diffjax.diffusion import samplers as S  # noqa: E402
from diffjax.diffusion import sigmas as SG  # noqa: E402

MIX = default_mixture()
NULL = MIX.num_classes
EPS32 = float(np.finfo(np.float32).eps)
KEY = jax.random.PRNGKey(0)


def _denoise(x, sigma, cond):
    return MIX.denoise(x, sigma, cond)


EXACT = jax.jit(MIX.denoise)  # jitted: op-by-op dispatch would dominate the test time


def _points(n=64, sigma=0.5, seed=0):
    rng = np.random.default_rng(seed)
    x = MIX.sample(rng, n) + sigma * rng.standard_normal((n, 2))
    return jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, 2, n), jnp.int32)


def test_cfg_scale_zero_equals_conditional_sampling():
    sig = SG.karras_sigmas(12, 0.002, 80.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (128, 2)) * sig[0]
    y = jnp.arange(128, dtype=jnp.int32) % 2
    guided = G.classifier_free(_denoise, 0.0, NULL)
    for name in ("heun", "euler_ancestral"):
        run = jax.jit(lambda x, d, name=name: S.SAMPLERS[name](d, x, sig, KEY, cond=y),
                      static_argnums=1)
        # Equal up to float32 rounding (the 2B-batch program may fuse differently):
        # a few ulps per step over the 12 steps, as in test_samplers.
        np.testing.assert_allclose(np.asarray(run(x, guided)), np.asarray(run(x, _denoise)),
                                   rtol=0, atol=8 * 12 * EPS32)


def test_cfg_formula_one_batched_call_and_glide_convention():
    x, y = _points()
    sigma = jnp.full((64,), 0.7)
    shapes = []

    def recording(x, sigma, cond):
        shapes.append((x.shape, sigma.shape, cond.shape))
        return MIX.denoise(x, sigma, cond)

    w = 2.5
    out = jax.jit(G.classifier_free(recording, w, NULL))(x, sigma, y)
    assert shapes == [((128, 2), (128,), (128,))]  # both passes in one call of 2B
    d_c, d_u = EXACT(x, sigma, y), EXACT(x, sigma, jnp.full_like(y, NULL))
    np.testing.assert_allclose(out, (1 + w) * d_c - w * d_u, rtol=0, atol=16 * EPS32)
    # GLIDE/diffusers: eps_u + s (eps_c - eps_u) in eps space, with s = 1 + w.
    s_glide = 3.5
    eps_c, eps_u = (x - d_c) / sigma[:, None], (x - d_u) / sigma[:, None]
    eps_glide = eps_u + s_glide * (eps_c - eps_u)
    out_glide = jax.jit(G.classifier_free(_denoise, G.ho_scale_from_glide(s_glide), NULL))(
        x, sigma, y)
    np.testing.assert_allclose((x - out_glide) / sigma[:, None], eps_glide, rtol=0,
                               atol=64 * EPS32)
    with pytest.raises(ValueError, match="needs cond"):
        G.classifier_free(_denoise, 1.0, NULL)(x, sigma, None)


def test_cfg_interval_and_rescale():
    x, y = _points()
    sigma = jnp.asarray(np.linspace(0.1, 3.0, 64), jnp.float32)
    d_c = EXACT(x, sigma, y)
    d_u = EXACT(x, sigma, jnp.full_like(y, NULL))
    out = jax.jit(G.classifier_free(_denoise, 2.0, NULL, interval=(0.5, 2.0)))(x, sigma, y)
    inside = np.asarray((sigma > 0.5) & (sigma <= 2.0))
    np.testing.assert_allclose(out[~inside], d_c[~inside], rtol=0, atol=4 * EPS32)
    np.testing.assert_allclose(out[inside], (3 * d_c - 2 * d_u)[inside], rtol=0, atol=16 * EPS32)
    # rescale = 1: each example's guided x0 has the conditional x0's standard deviation.
    full = jax.jit(G.classifier_free(_denoise, 4.0, NULL, rescale=1.0))(x, sigma, y)
    np.testing.assert_allclose(np.std(full, axis=1), np.std(d_c, axis=1), rtol=1e-5)
    half = jax.jit(G.classifier_free(_denoise, 4.0, NULL, rescale=0.5))(x, sigma, y)
    plain = 5 * d_c - 4 * d_u
    np.testing.assert_allclose(half, 0.5 * full + 0.5 * plain, rtol=1e-5, atol=1e-5)


def test_classifier_guidance_shift_and_exact_posterior_identity():
    """Exact posterior: D_u + sigma^2 s grad log p(y|x) = D_u + s (D_c - D_u), since
    grad log p(y|x, sigma) = (D_c - D_u) / sigma^2 (Tweedie), so scale s equals CFG w = s - 1.
    """
    x, y = _points(sigma=0.3)
    sigma = jnp.full((64,), 0.3)
    null = jnp.full_like(y, NULL)

    def uncond(x, sigma, cond):
        return MIX.denoise(x, sigma, None)

    guided = jax.jit(lambda x, sigma, y, s: G.classifier_guidance(
        uncond, MIX.class_log_prob, s)(x, sigma, y))  # the scale may be traced: one compile
    d_c, d_u = EXACT(x, sigma, y), EXACT(x, sigma, null)
    for s in (0.0, 1.0, 3.0):
        out = guided(x, sigma, y, s)
        np.testing.assert_allclose(out, d_u + s * (d_c - d_u), rtol=0, atol=1e-5)
    grad = jax.jit(jax.grad(lambda z: jnp.sum(MIX.class_log_prob(z, sigma, y))))(x)
    out = jax.jit(G.classifier_guidance(uncond, MIX.class_log_prob, 2.0))(x, 0.3, y)
    np.testing.assert_allclose(out, EXACT(x, sigma, None) + 0.09 * 2.0 * grad, rtol=0, atol=1e-6)


def test_classifier_guidance_moves_samples_toward_class():
    """Fraction of samples classified as y grows with the scale; scale 0 = prior, 1 = p(x|y)."""
    n, y = 2000, 1
    sig = SG.karras_sigmas(40, 0.002, 80.0)
    x = jax.random.normal(jax.random.PRNGKey(3), (n, 2)) * sig[0]
    labels = jnp.full((n,), y, jnp.int32)

    def uncond(x, sigma, cond):
        return MIX.denoise(x, sigma, None)

    run = jax.jit(lambda x, s: S.heun(G.classifier_guidance(uncond, MIX.class_log_prob, s),
                                      x, sig, KEY, cond=labels))
    frac = {}
    for s in (0.0, 1.0, 4.0):
        frac[s] = float(np.mean(MIX.classify(np.asarray(run(x, s))) == y))
    prior = MIX.weights[MIX.labels == y].sum()  # 0.5; binomial SE sqrt(.25 / 2000) = 0.011
    assert abs(frac[0.0] - prior) < 4 * np.sqrt(prior * (1 - prior) / n)
    assert frac[0.0] < frac[1.0] <= frac[4.0]
    assert frac[1.0] > 0.97, frac  # the conditional law, up to ODE discretisation


def test_static_and_dynamic_thresholding_bound_x0():
    def wide(x, sigma, cond):
        return 3.0 * x

    x = jax.random.normal(KEY, (8, 4, 4, 3))
    static = jax.jit(G.static_threshold(wide))(x, 1.0, None)
    assert float(jnp.max(jnp.abs(static))) <= 1.0
    dyn = jax.jit(G.dynamic_threshold(wide, percentile=0.9))(x, 1.0, None)
    assert float(jnp.max(jnp.abs(dyn))) <= 1.0 + EPS32
    # Reference: Imagen's rule per example in NumPy.
    x0 = np.asarray(3.0 * x, np.float64).reshape(8, -1)
    s = np.maximum(np.quantile(np.abs(x0), 0.9, axis=1), 1.0)[:, None]
    expect = (np.clip(x0, -s, s) / s).reshape(x.shape)
    np.testing.assert_allclose(dyn, expect, rtol=1e-5, atol=1e-6)
    # Examples already inside [-1, 1] are left unchanged.
    small = 0.2 * jnp.tanh(x)
    unchanged = jax.jit(G.dynamic_threshold(lambda x, s, c: x))(small, 1.0, None)
    np.testing.assert_array_equal(unchanged, small)
    with pytest.raises(ValueError, match="percentile"):
        G.dynamic_threshold(wide, percentile=1.5)


def test_transforms_pass_learned_variance_through():
    x, y = _points(8)
    frac = jax.nn.sigmoid(x[:, 0])

    def with_var(x, sigma, cond):
        f = jax.nn.sigmoid(x[:, 0]) * jnp.where(cond == NULL, 0.0, 1.0)
        return MIX.denoise(x, sigma, cond) * 5.0, f

    x0, f = jax.jit(G.classifier_free(with_var, 1.0, NULL))(x, 0.5, y)
    np.testing.assert_array_equal(f, frac)  # the conditional pass's frac
    x0_t, f_t = jax.jit(G.static_threshold(with_var))(x, 0.5, y)
    assert float(jnp.max(jnp.abs(x0_t))) <= 1.0 and f_t is not None
    sig = SG.karras_sigmas(5, 0.01, 10.0)
    out = jax.jit(lambda x: S.ddpm(G.static_threshold(with_var), x, sig, KEY, cond=y,
                                  variance="learned"))(x * 10.0)
    assert out.shape == x.shape and float(jnp.max(jnp.abs(out))) <= 1.0


def test_registries():
    assert set(G.GUIDANCE) == {"none", "classifier_free", "classifier", "autoguidance",
                               "gradient"}
    assert set(G.THRESHOLDING) == {"none", "static", "dynamic"}
    assert G.GUIDANCE["none"](_denoise) is _denoise
