"""SDEdit, inpainting and RePaint on the exact denoiser of 2-D Gaussian mixtures (mixture.py).

The "image" is a 2-D point: coordinate 0 is known (mask [1, 0]), coordinate 1 is generated.
Conditional laws are computed in closed form: given x0[0] = a, component k has weight
∝ w_k N(a; mu_k0, s_k^2) and then x0[1] ~ N(mu_k1, s_k^2) (components are isotropic).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from mixture import GaussianMixture, default_mixture  # noqa: E402

from diffjax.diffusion import conditional as C  # noqa: E402
from diffjax.diffusion import samplers as S  # noqa: E402
from diffjax.diffusion import sigmas as SG  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
MASK = jnp.array([1.0, 0.0])
KEY = jax.random.PRNGKey(3)

# The known coordinate separates the components (means 8 apart, stds <= 0.2): given
# x0[0] = 3.9 the other component has posterior weight < e^-700, so x0[1] ~ N(0.5, 0.2^2).
SEPARATED = GaussianMixture(means=np.array([[-4.0, -0.5], [4.0, 0.5]]), stds=np.array([0.1, 0.2]),
                            weights=np.array([0.6, 0.4]), labels=np.array([0, 1]))


def conditional_law(gm: GaussianMixture, a: float) -> tuple[np.ndarray, float, float]:
    """Component weights, mean and std of x0[1] given x0[0] = a (float64)."""
    logw = np.log(gm.weights) - 0.5 * (a - gm.means[:, 0]) ** 2 / gm.stds**2 - np.log(gm.stds)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    mean = float(np.sum(w * gm.means[:, 1]))
    second = float(np.sum(w * (gm.stds**2 + gm.means[:, 1] ** 2)))
    return w, mean, float(np.sqrt(second - mean**2))


def _known(n, a):
    return jnp.zeros((n, 2), jnp.float32).at[:, 0].set(a)


SAMPLER_CASES = [
    ("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 0.5}), ("euler", {}),
    ("euler", {"s_churn": 4.0}), ("heun", {}), ("heun", {"s_churn": 4.0}),
    ("euler_ancestral", {}), ("dpmpp_2m", {}), ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}),
]


@pytest.mark.parametrize("name,options", SAMPLER_CASES)
def test_known_pixels_carry_each_steps_sigma(name, options):
    """After step i the known coordinate is x_known + sigmas[i+1] * (unit Gaussian): exactly
    x_known + sigma z0 for the deterministic samplers, by its first two moments otherwise."""
    n, a = 4000, 0.3
    sig = SG.karras_sigmas(6, 0.05, 10.0)
    z0 = jax.random.normal(jax.random.PRNGKey(1), (n, 2))
    x_init = _known(n, a) * MASK + sig[0] * z0
    pinned = C.pin_known(default_mixture().denoise, _known(n, a), MASK)
    _, traj = S.SAMPLERS[name](pinned, x_init, sig, KEY, return_trajectory=True, **options)
    known = np.asarray(traj[:, :, 0], np.float64) - a
    deterministic = name in ("ddim", "euler", "heun", "dpmpp_2m") and not any(options.values())
    for i in range(len(sig) - 1):
        s = sig[i + 1]
        if deterministic:
            np.testing.assert_allclose(known[i], s * np.asarray(z0[:, 0]), rtol=0,
                                       atol=64 * EPS32 * (sig[0] + 1))
        elif s > 0:
            assert abs(known[i].mean()) < 5 * s / np.sqrt(n)
            assert abs(known[i].std() / s - 1) < 5 / np.sqrt(2 * n)
        else:
            np.testing.assert_allclose(known[i], 0.0, atol=16 * EPS32)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde"])
def test_inpainting_samples_the_exact_conditional(name):
    """Stochastic samplers with the pinned denoiser reach the conditional law within the
    Monte-Carlo error. (The ODE samplers keep a measurable bias here, mean 0.468 instead of
    0.5 with euler: the known pixel's noise is frozen along the ODE; see conditional.py.)"""
    n, a = 4000, 3.9
    _, mean, std = conditional_law(SEPARATED, a)
    sig = SG.karras_sigmas(60, 0.002, 80.0)
    fn = jax.jit(lambda k: C.inpaint(S.SAMPLERS[name], SEPARATED.denoise, _known(n, a), MASK,
                                     sig, k))
    out = np.asarray(fn(KEY), np.float64)
    np.testing.assert_array_equal(out[:, 0], np.float32(a))
    y = out[:, 1]
    assert abs(y.mean() - mean) < 4.5 * std / np.sqrt(n), (y.mean(), mean)
    assert abs(y.std() / std - 1) < 4.5 / np.sqrt(2 * n), (y.std(), std)
    # Plain sampling (mask 0) does not do this: half of its mass sits in the other component.
    plain = np.asarray(C.inpaint(S.SAMPLERS[name], SEPARATED.denoise, _known(n, a),
                                 jnp.zeros(2), sig, KEY))
    assert np.mean(plain[:, 1] < 0) > 0.5


def _repaint_schedule_reference(num_steps, jump, resample):
    """RePaint's published jump schedule (written independently): timesteps from T-1 down to
    -1 (= data), jumping ``jump`` up at t in range(0, T - jump, jump), resample - 1 times each."""
    jumps = {t: resample - 1 for t in range(0, num_steps - jump, jump)}
    t, ts = num_steps, []
    while t >= 1:
        t -= 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump):
                t += 1
                ts.append(t)
    return np.asarray(ts + [-1])


@pytest.mark.parametrize("n,jump,resample", [(10, 1, 1), (10, 2, 3), (12, 5, 4), (7, 3, 2)])
def test_repaint_moves_follow_the_published_schedule(n, jump, resample):
    moves = C.repaint_moves(n, jump, resample)
    # Position p holds x at sigmas[p]: RePaint's t = N - 1 - p (t = -1 is sigma 0).
    path = np.concatenate([moves[:1, 0], moves[:, 1]])
    np.testing.assert_array_equal(n - 1 - path, _repaint_schedule_reference(n, jump, resample))
    assert np.all(np.abs(moves[:, 1] - moves[:, 0]) == 1)
    # Each move starts where the previous one ended.
    np.testing.assert_array_equal(moves[1:, 0], moves[:-1, 1])


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_repaint_without_resampling_is_ddpm_inpainting(variance):
    n = 64
    sig = SG.karras_sigmas(12, 0.01, 20.0)
    gm = default_mixture()
    a = C.repaint(gm.denoise, _known(n, -0.6), MASK, sig, KEY, jump=3, resample=1,
                  variance=variance)
    b = C.inpaint(S.ddpm, gm.denoise, _known(n, -0.6), MASK, sig, KEY, variance=variance)
    # The same arithmetic and noise in two compiled programs (XLA may fuse differently):
    # agreement to a few float32 ulps per step.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=12 * 4 * EPS32)


def test_repaint_resampling_moves_towards_the_exact_conditional():
    """Where the known coordinate decides the component only at small sigma (x0[0] = -0.65
    lies between components 0 and 3), plain replacement is biased; resampling reduces it."""
    n, a = 4000, -0.65
    gm = default_mixture()
    w, _, _ = conditional_law(gm, a)
    p_exact = float(w[gm.means[:, 1] > 0].sum())
    sig = SG.karras_sigmas(50, 0.002, 80.0)
    plain = C.inpaint(S.ddpm, gm.denoise, _known(n, a), MASK, sig, KEY)
    resampled = jax.jit(lambda k: C.repaint(gm.denoise, _known(n, a), MASK, sig, k, jump=5,
                                            resample=5))(KEY)
    err_plain = abs(np.mean(np.asarray(plain)[:, 1] > 0) - p_exact)
    err_resampled = abs(np.mean(np.asarray(resampled)[:, 1] > 0) - p_exact)
    assert np.all(np.asarray(resampled)[:, 0] == np.float32(a))
    # The two estimates share noise only through the key; 4 binomial s.e. of each.
    assert err_resampled < err_plain - 8 * 0.5 / np.sqrt(n), (err_plain, err_resampled)


def test_sdedit_strength_zero_one_and_tail():
    n = 256
    gm = default_mixture()
    sig = SG.karras_sigmas(10, 0.01, 20.0)
    x_img = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (n, 2)), jnp.float32)
    assert C.sdedit(gm.denoise, S.euler, x_img, sig, 0.0, KEY) is x_img
    k_init, k_sample = jax.random.split(KEY)
    z = jax.random.normal(k_init, (n, 2))
    full = C.sdedit(gm.denoise, S.ddpm, x_img, sig, 1.0, KEY)
    np.testing.assert_array_equal(full, S.ddpm(gm.denoise, x_img + sig[0] * z, sig, k_sample))
    # With a zero image, strength 1 is plain sampling from the same key (generate's split).
    zero = jnp.zeros_like(x_img)
    np.testing.assert_array_equal(C.sdedit(gm.denoise, S.ddim, zero, sig, 1.0, KEY),
                                  S.ddim(gm.denoise, sig[0] * z, sig, k_sample))
    # Strength 0.3 of 10 steps: the last 3 steps, from sigmas[7].
    assert C.sdedit_start(10, 0.3) == 7
    part = C.sdedit(gm.denoise, S.euler, x_img, sig, 0.3, KEY)
    np.testing.assert_array_equal(part, S.euler(gm.denoise, x_img + sig[7] * z, sig[7:],
                                                k_sample))


def test_sdedit_at_full_strength_forgets_the_image():
    """From a far-off image at strength 1 (sigma_max 80) the result follows the data law."""
    n = 4000
    gm = default_mixture()
    sig = SG.karras_sigmas(30, 0.002, 80.0)
    x_img = jnp.full((n, 2), 3.0)
    out = np.asarray(C.sdedit(gm.denoise, S.ddpm, x_img, sig, 1.0, KEY), np.float64)
    ref = gm.sample(np.random.default_rng(0), 200_000)
    mean_se = np.sqrt(ref.var(0) / n)
    assert np.all(np.abs(out.mean(0) - ref.mean(0)) < 5 * mean_se)


def test_masks_and_errors():
    m = C.center_mask(8, 8)
    assert m.shape == (8, 8, 1) and m.sum() == 48 and m[4, 4, 0] == 0 and m[0, 0, 0] == 1
    h = C.left_half_mask(4, 6)
    assert h[:, :3].min() == 1 and h[:, 3:].max() == 0
    with pytest.raises(ValueError, match="strength"):
        C.sdedit_start(10, 1.5)
    with pytest.raises(ValueError, match="mask"):
        C.pin_known(default_mixture().denoise, jnp.zeros((4, 2)), jnp.ones(3))
    with pytest.raises(ValueError, match="repaint"):
        C.repaint_moves(10, 0, 2)
