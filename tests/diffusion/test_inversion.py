"""DDIM inversion: ddim / euler over increasing sigmas and conditional.ddim_invert, on exact
denoisers (mixture.py).

Measured here (float32, Karras sigmas 0.002..80, rho 7, with 0 appended): the round trip
ddim_invert -> samplers.ddim on 256 draws of the default mixture has an RMS error of
0.179 / 0.094 / 0.040 / 0.021 at N = 16 / 32 / 64 / 128 steps (first order: halves as N
doubles; the max error, 0.62 .. 0.24, comes from the few points near a boundary between
modes), and x_T of a single Gaussian N(0, 0.5^2) is within 17 / 8.8 / 4.4 / 2.2 % of the
probability-flow ODE's x0 sqrt(sigma_T^2 + s_d^2) / s_d.
"""

from __future__ import annotations

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from mixture import GaussianMixture, default_mixture

from diffjax.diffusion import conditional as C
from diffjax.diffusion import samplers as S
from diffjax.diffusion import sigmas as SG

MIX = default_mixture()
SD = 0.5
GAUSS = GaussianMixture(means=np.zeros((1, 2)), stds=np.array([SD]), weights=np.array([1.0]),
                        labels=np.array([0]))
KEY = jax.random.key(0)
EPS32 = float(np.finfo(np.float32).eps)


def _mix(x, sigma, cond=None):
    return MIX.denoise(x, sigma, cond)


def _gauss(x, sigma, cond=None):
    return GAUSS.denoise(x, sigma, cond)


def _data(n=256, seed=0):
    return jnp.asarray(MIX.sample(np.random.default_rng(seed), n), jnp.float32)


def _rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def test_ddim_and_euler_run_upward_and_agree():
    x0 = _data(64)
    up = SG.karras_sigmas(20, 0.002, 80.0)[::-1].copy()  # [0, 0.002, ..., 80]
    a, traj = S.ddim(_mix, x0, up, KEY, return_trajectory=True)
    b = S.euler(_mix, x0, up, KEY)
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * 80)
    # The step out of sigma 0 takes the noise estimate at its end: x' = x + (x - D(x, s')).
    first = x0 + (x0 - _mix(x0, jnp.float32(up[1])))
    np.testing.assert_allclose(np.asarray(traj[0]), np.asarray(first), rtol=0, atol=4 * EPS32)


def test_gaussian_inversion_is_euler_on_the_ode_exactly():
    """Single Gaussian: D(x, s) = k(s) x, k = s_d^2 / (s_d^2 + s^2), so every step is linear:
    out of 0, x' = (2 - k(s')) x; else x' = x (1 + (s' - s) s / (s_d^2 + s^2))."""
    x0 = jnp.asarray(np.random.default_rng(1).normal(size=(8, 2)) * SD, jnp.float32)
    sig = SG.karras_sigmas(10, 0.002, 80.0)
    up = sig[::-1]
    factor = 2.0 - SD**2 / (SD**2 + up[1] ** 2)
    for s, s_next in itertools.pairwise(up[1:]):
        factor *= 1.0 + (s_next - s) * s / (SD**2 + s**2)
    got = np.asarray(C.ddim_invert(_gauss, x0, sig), np.float64)
    np.testing.assert_allclose(got, factor * np.asarray(x0, np.float64), rtol=50 * EPS32)


def test_gaussian_inversion_converges_to_the_ode_map():
    """x_T -> x0 sqrt(sigma_T^2 + s_d^2) / s_d (the probability-flow ODE's flow), first order."""
    x0 = jnp.asarray(np.random.default_rng(1).normal(size=(64, 2)) * SD, jnp.float32)
    exact = np.asarray(x0, np.float64) * np.sqrt(80.0**2 + SD**2) / SD
    errs = []
    for n in (16, 32, 64, 128):
        got = np.asarray(C.ddim_invert(_gauss, x0, SG.karras_sigmas(n, 0.002, 80.0)))
        errs.append(np.abs(got - exact).max() / np.abs(exact).max())
    assert errs[-1] < 0.025, errs
    for coarse, fine in itertools.pairwise(errs):
        assert 0.4 < fine / coarse < 0.6, errs  # error ~ 1 / N


def test_round_trip_reconstructs_and_shrinks_with_steps():
    x0 = _data()
    errs = []
    for n in (16, 32, 64, 128):
        sig = SG.karras_sigmas(n, 0.002, 80.0)
        x_t = C.ddim_invert(_mix, x0, sig)
        assert np.all(np.isfinite(x_t))
        errs.append(_rms(S.ddim(_mix, x_t, sig, KEY), x0))
    assert errs[-1] < 0.025, errs
    for coarse, fine in itertools.pairwise(errs):
        assert fine < 0.65 * coarse, errs


def test_inversion_from_the_smallest_sigma_and_with_cond():
    """A sequence not ending at 0 takes x0 as the state at its last sigma; labels pass through."""
    x0 = _data(32)
    cond = jnp.asarray(MIX.classify(np.asarray(x0)))
    sig = SG.karras_sigmas(64, 0.002, 80.0)[:-1]  # ends at 0.002
    x_t = C.ddim_invert(_mix, x0, sig, cond=cond)
    direct = S.ddim(_mix, x0, sig[::-1].copy(), KEY, cond=cond)
    np.testing.assert_array_equal(np.asarray(x_t), np.asarray(direct))
    assert _rms(S.ddim(_mix, x_t, sig, KEY, cond=cond), x0) < 0.06


def test_stochastic_options_refused_upward():
    x0, up = _data(4), SG.karras_sigmas(5, 0.002, 80.0)[::-1].copy()
    with pytest.raises(ValueError, match="deterministic only.*eta=0.5"):
        S.ddim(_mix, x0, up, KEY, eta=0.5)
    with pytest.raises(ValueError, match="deterministic only.*s_churn=1"):
        S.euler(_mix, x0, up, KEY, s_churn=1.0)
    with pytest.raises(ValueError, match="decreasing sampling sequence"):
        C.ddim_invert(_mix, x0, up)
    S.ddim(_mix, x0, up[::-1].copy(), KEY, eta=0.5)  # decreasing: fine


def test_traced_eta_is_not_applied_on_increasing_steps():
    x0, up = _data(8), SG.karras_sigmas(8, 0.002, 80.0)[::-1].copy()
    run = jax.jit(lambda eta: S.ddim(_mix, x0, up, KEY, eta=eta))
    np.testing.assert_allclose(np.asarray(run(0.7)), np.asarray(S.ddim(_mix, x0, up, KEY)),
                               rtol=0, atol=1e-5 * 80)
