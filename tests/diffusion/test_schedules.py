"""Schedules against the published formulas (float64 NumPy written here) and pinned values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.diffusion import schedules as S

F32_EPS = float(np.finfo(np.float32).eps)
F64_EPS = float(np.finfo(np.float64).eps)


# ---- independent references: the papers' formulas, written out in float64 ----


def ref_linear_betas(T, b0=1e-4, b1=0.02):
    scale = 1000.0 / T
    return np.array([scale * (b0 + (b1 - b0) * i / (T - 1)) for i in range(T)])


def ref_cosine_betas(T, s=0.008):
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])


def ref_sigmoid_betas(T, start=-3.0, end=3.0, tau=1.0):
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    g = lambda t: (sig(end / tau) - sig((t * (end - start) + start) / tau)) / (  # noqa: E731
        sig(end / tau) - sig(start / tau)
    )
    return np.array([min(1 - g((i + 1) / T) / g(i / T), 0.999) for i in range(T)])


def ref_tables(betas):
    """Ho et al. eq. (6)-(7) written term by term."""
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        abar.append(prod)
    abar = np.array(abar)
    prev = np.concatenate([[1.0], abar[:-1]])
    var = betas * (1 - prev) / (1 - abar)
    return {
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": prev,
        "posterior_variance": var,
        "posterior_log_variance_clipped": np.log(np.concatenate([[var[1]], var[1:]])),
        "posterior_mean_coef1": np.sqrt(prev) * betas / (1 - abar),
        "posterior_mean_coef2": np.sqrt(1 - betas) * (1 - prev) / (1 - abar),
    }


# Cumulative products of T float64 factors carry <= T * eps relative rounding.
@pytest.mark.parametrize(
    "schedule,ref,T",
    [
        (S.LinearSchedule(), ref_linear_betas, 1000),
        (S.LinearSchedule(), ref_linear_betas, 250),
        (S.CosineSchedule(), ref_cosine_betas, 1000),
        (S.CosineSchedule(), ref_cosine_betas, 4000),
        (S.SigmoidSchedule(), ref_sigmoid_betas, 1000),
    ],
)
def test_discrete_tables_match_published_formulas(schedule, ref, T):
    ds = schedule.discretize(T)
    betas = ref(T)
    np.testing.assert_allclose(ds.betas, betas, rtol=1e-12, atol=0)
    for name, value in ref_tables(betas).items():
        np.testing.assert_allclose(getattr(ds, name), value, rtol=max(1e-12, 4 * T * F64_EPS))
    assert ds.num_timesteps == T
    np.testing.assert_allclose(ds.sqrt_alphas_cumprod**2, ds.alphas_cumprod, rtol=1e-14)
    np.testing.assert_allclose(ds.sqrt_one_minus_alphas_cumprod**2, 1 - ds.alphas_cumprod)


def test_scaled_linear_is_latent_diffusion_table():
    ds = S.ScaledLinearSchedule().discretize(1000)
    ref = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(ds.betas, ref, rtol=1e-14)


# Pinned alpha-bar values computed once with mpmath at 50 digits from the formulas of Ho et
# al. (linear) and Nichol & Dhariwal (cosine, clip 0.999), as in improved-diffusion's
# get_named_beta_schedule / betas_for_alpha_bar. Tolerances are float64's conditioning:
# the product of T factors adds T * eps; cosine's last unclipped entry is cos^2(x) with x
# within delta = pi / (2 T (1 + s)) of pi/2, so float64 rounding of x (2.2e-16) moves it by
# 2 * 2.2e-16 / delta relative (2.8e-13 at T = 1000, 1.1e-12 at T = 4000).
@pytest.mark.parametrize(
    "schedule,T,index,value",
    [
        (S.LinearSchedule(), 1000, -1, 4.0358297653756825e-05),
        (S.LinearSchedule(), 1000, 499, 0.078587242881778233),
        (S.CosineSchedule(), 1000, -1, 2.4287669070344684e-09),
        (S.CosineSchedule(), 1000, 499, 0.49384359044063771),
        (S.CosineSchedule(), 4000, -1, 1.5179804688495632e-10),
        (S.CosineSchedule(), 4000, 1999, 0.49384359044063771),
    ],
)
def test_pinned_alpha_bar(schedule, T, index, value):
    ds = schedule.discretize(T)
    rtol = T * F64_EPS
    if isinstance(schedule, S.CosineSchedule) and index == -1:
        delta = math.pi / (2 * T * 1.008)
        rtol += 2 * 2.2e-16 / delta
    np.testing.assert_allclose(ds.alphas_cumprod[index], value, rtol=rtol, atol=0)


ALL = [S.LinearSchedule(), S.CosineSchedule(), S.SigmoidSchedule(), S.ScaledLinearSchedule()]


@pytest.mark.parametrize("schedule", ALL + [S.KarrasSchedule()])
def test_continuous_logsnr_monotone_and_invertible(schedule):
    t = jnp.linspace(0.01, 0.99, 99)
    lam = schedule.logsnr(t)
    assert bool(jnp.all(jnp.diff(lam) < 0))
    # d t / d logsnr is bounded by (max |dlogsnr/dt|)^-1; float32 logsnr error ~ eps |lam|.
    t_back = schedule.t_from_logsnr(lam)
    np.testing.assert_allclose(np.asarray(t_back), np.asarray(t), atol=2e-5)
    if not isinstance(schedule, S.KarrasSchedule):
        a, s = schedule.alpha(t), schedule.sigma(t)
        np.testing.assert_allclose(np.asarray(a**2 + s**2), 1.0, atol=4 * F32_EPS)
        np.testing.assert_allclose(np.asarray(jnp.log(a**2 / s**2)), np.asarray(lam), atol=1e-4)
        assert float(schedule.alpha(0.0)) == 1.0 and float(schedule.sigma(0.0)) == 0.0


@pytest.mark.parametrize("schedule", [S.CosineSchedule(), S.SigmoidSchedule()])
def test_alpha_bar_schedules_continuous_equals_discrete_on_grid(schedule):
    """abar_i = abar_cont((i + 1) / T) exactly (telescoping), where beta is not clipped."""
    T = 200
    ds = schedule.discretize(T)
    t = (np.arange(T) + 1) / T
    abar = np.asarray(jax.nn.sigmoid(schedule.logsnr(jnp.asarray(t))), np.float64)
    unclipped = np.cumsum(ds.betas >= 0.999) == 0
    np.testing.assert_allclose(abar[unclipped], ds.alphas_cumprod[unclipped], rtol=2e-5)
    assert float(schedule.alpha(1.0)) == 0.0


@pytest.mark.parametrize("schedule", [S.LinearSchedule(), S.ScaledLinearSchedule()])
def test_linear_family_continuous_limit(schedule):
    """-log abar_i vs the integral B((i+1)/T): |diff| <= sum beta^2 (from -log(1-b) - b <= b^2)
    + the Riemann error of sampling beta at i/(T-1) instead of the cell midpoint, which is at
    most 1.5 * max|beta'(t)| / T."""
    T = 1000
    ds = schedule.discretize(T)
    t = (np.arange(T) + 1) / T
    lam = np.asarray(schedule.logsnr(jnp.asarray(t)), np.float64)
    integral = np.log1p(np.exp(-lam))
    ref = -np.log(ds.alphas_cumprod)
    beta_prime = 1000 * (schedule.beta_end - schedule.beta_start) * 2  # sqrt-linear: < 2x
    bound = np.cumsum(ds.betas**2) + 1.5 * beta_prime / T + 1e-6 * ref
    assert np.all(np.abs(integral - ref) <= bound)


def test_karras_sigma_family():
    sch = S.KarrasSchedule(0.002, 80.0, 7.0)
    assert float(sch.sigma(0.0)) == pytest.approx(0.002, rel=1e-6)
    assert float(sch.sigma(1.0)) == pytest.approx(80.0, rel=1e-6)
    n = 10
    ramp = np.linspace(0, 1, n)
    karras = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # paper eq. (5)
    np.testing.assert_allclose(np.asarray(sch.sigma(jnp.asarray(1 - ramp))), karras, rtol=1e-5)
    assert float(sch.alpha(0.3)) == 1.0
    np.testing.assert_allclose(float(sch.c_noise(0.5)), 0.25 * np.log(float(sch.sigma(0.5))))
    ds = sch.discretize(50)
    np.testing.assert_allclose(ds.sigmas, np.asarray(sch.sigma(jnp.arange(1, 51) / 50)), rtol=1e-5)


def test_discrete_schedule_as_continuous():
    ds = S.LinearSchedule().discretize(100)
    T = ds.num_timesteps
    t_grid = (np.arange(T) + 1) / T
    np.testing.assert_allclose(
        np.asarray(ds.logsnr(jnp.asarray(t_grid))), -2 * np.log(ds.sigmas), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(ds.alpha(jnp.asarray(t_grid))), ds.sqrt_alphas_cumprod, rtol=1e-5
    )
    # Midway between grid points log-sigma is the mean of its neighbours.
    mid = (np.arange(T - 1) + 1.5) / T
    want = -(np.log(ds.sigmas[:-1]) + np.log(ds.sigmas[1:]))
    np.testing.assert_allclose(np.asarray(ds.logsnr(jnp.asarray(mid))), want, rtol=1e-5, atol=1e-5)
    back = ds.t_from_logsnr(ds.logsnr(jnp.asarray(mid)))
    np.testing.assert_allclose(np.asarray(back), mid, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ds.c_noise(jnp.asarray(mid))), np.arange(T - 1) + 0.5,
                               atol=1e-4)
    assert np.all(np.diff(ds.sigmas) > 0)
    # Clamped outside the table.
    assert float(ds.c_noise(0.0)) == 0.0 and float(ds.c_noise(2.0)) == T - 1


def test_space_timesteps_matches_iddpm_examples():
    # iDDPM's docstring example: 300 steps, sections [10, 15, 20].
    steps = S.space_timesteps(300, [10, 15, 20])
    assert len(steps) == 45
    assert steps[:10] == tuple(range(0, 100, 11))
    assert steps[10] == 100 and steps[24] == 199 and steps[25] == 200 and steps[-1] == 299
    assert S.space_timesteps(300, "10,15,20") == steps
    assert S.space_timesteps(1000, "ddim50") == tuple(range(0, 1000, 20))
    assert S.space_timesteps(1000, "1000") == tuple(range(1000))
    # Uneven sections: the first T mod n sections get one more step.
    assert S.space_timesteps(10, [2, 2, 2]) == (0, 3, 4, 6, 7, 9)
    with pytest.raises(ValueError, match="integer stride"):
        S.space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="section"):
        S.space_timesteps(10, [20])


def test_respace_keeps_alpha_bar_and_recomputes_betas():
    ds = S.CosineSchedule().discretize(1000)
    keep = S.space_timesteps(1000, "ddim25")
    new, tmap = ds.respace(keep)
    assert new.num_timesteps == 25
    np.testing.assert_array_equal(tmap, np.array(keep))
    np.testing.assert_allclose(new.alphas_cumprod, ds.alphas_cumprod[list(keep)], rtol=1e-12)
    prev = np.concatenate([[1.0], ds.alphas_cumprod[list(keep)][:-1]])
    np.testing.assert_allclose(new.betas, 1 - ds.alphas_cumprod[list(keep)] / prev, rtol=1e-12)
    full, _ = ds.respace(range(1000))
    np.testing.assert_allclose(full.betas, ds.betas, rtol=1e-9)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="num_timesteps"):
        S.LinearSchedule().discretize(1)
    with pytest.raises(ValueError, match="betas"):
        S.DiscreteSchedule.from_betas([0.1, 1.5])
    with pytest.raises(ValueError, match="betas"):
        S.LinearSchedule().discretize(20)
    with pytest.raises(ValueError, match="sigma_min"):
        S.KarrasSchedule(sigma_min=10.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        S.LinearSchedule(beta_start=0.02, beta_end=1e-4)
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        S.ScaledLinearSchedule(beta_end=1.5)
    with pytest.raises(ValueError, match="max_beta"):
        S.CosineSchedule(max_beta=1.0)
    with pytest.raises(ValueError, match="tau"):
        S.SigmoidSchedule(tau=0.0)
    with pytest.raises(ValueError, match="use_timesteps"):
        S.LinearSchedule().discretize(100).respace([3, 101])
    assert set(S.SCHEDULES) == {"linear", "cosine", "sigmoid", "scaled_linear", "karras"}


def test_methods_work_under_jit_and_any_shape():
    for sch in ALL + [S.KarrasSchedule(), S.LinearSchedule().discretize(50)]:
        t = jnp.full((2, 3), 0.5)
        out = jax.jit(lambda u, sch=sch: (sch.alpha(u), sch.sigma(u), sch.c_noise(u)))(t)
        assert all(o.shape == (2, 3) for o in out)
