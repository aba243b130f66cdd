"""Forward process, posterior, conversions and the denoiser wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.diffusion import process as P
from diffjax.diffusion import schedules as S

DS = S.LinearSchedule().discretize(1000)
COS = S.CosineSchedule().discretize(200)
F32 = float(np.finfo(np.float32).eps)


def test_q_sample_moments():
    """Mean alpha x0 and variance sigma^2 over 1e5 draws, to 5 standard errors."""
    n, x0 = 100_000, jnp.array([0.7, -0.3])
    t = jnp.full((n,), 400)
    noise = jax.random.normal(jax.random.key(1), (n, 2))
    x_t = np.asarray(P.q_sample_discrete(DS, jnp.broadcast_to(x0, (n, 2)), noise, t), np.float64)
    a, s = DS.sqrt_alphas_cumprod[400], DS.sqrt_one_minus_alphas_cumprod[400]
    se_mean = s / np.sqrt(n)
    se_var = s**2 * np.sqrt(2 / (n - 1))  # Gaussian sample variance
    np.testing.assert_allclose(x_t.mean(0), a * np.asarray(x0), atol=5 * se_mean)
    np.testing.assert_allclose(x_t.var(0, ddof=1), s**2, atol=5 * se_var)
    # The continuous form agrees with the discrete one.
    same = P.q_sample(jnp.broadcast_to(x0, (n, 2)), noise, jnp.full((n,), a), jnp.full((n,), s))
    np.testing.assert_allclose(np.asarray(same), x_t, atol=4 * F32)


def bayes_posterior(ds, x0, x_t, t):
    """q(x_{t-1} | x_t, x0) as the product of the Gaussians q(x_{t-1} | x0) and
    q(x_t | x_{t-1}) (as a function of x_{t-1}), in float64."""
    abar_prev = ds.alphas_cumprod[t - 1] if t > 0 else 1.0
    beta = ds.betas[t]
    prec_prior = 1.0 / (1.0 - abar_prev) if t > 0 else np.inf
    if t == 0:  # x_{-1} is x0 itself
        return x0, 0.0
    prec_lik = (1.0 - beta) / beta  # x_t = sqrt(1-beta) x_{t-1} + sqrt(beta) n
    var = 1.0 / (prec_prior + prec_lik)
    mean = var * (np.sqrt(abar_prev) * x0 * prec_prior + x_t * np.sqrt(1 - beta) / beta)
    return mean, var


@pytest.mark.parametrize("ds", [DS, COS])
def test_posterior_matches_bayes_rule(ds):
    rng = np.random.default_rng(0)
    ts = np.array([0, 1, 2, ds.num_timesteps // 2, ds.num_timesteps - 1])
    x0 = rng.uniform(-1, 1, (len(ts), 3))
    x_t = rng.normal(size=(len(ts), 3))
    mean, var, log_var = P.q_posterior(ds, jnp.asarray(x0, jnp.float32),
                                       jnp.asarray(x_t, jnp.float32), jnp.asarray(ts))
    for i, t in enumerate(ts):
        m_ref, v_ref = bayes_posterior(ds, x0[i], x_t[i], t)
        # float32 inputs and coefficients: a few eps of |coef| |x|.
        np.testing.assert_allclose(np.asarray(mean[i]), m_ref, atol=1e-6 * (1 + np.abs(x_t[i]).max()))
        np.testing.assert_allclose(np.asarray(var[i]), v_ref, rtol=1e-6, atol=1e-30)
        clipped = v_ref if t > 0 else bayes_posterior(ds, x0[i], x_t[i], 1)[1]
        np.testing.assert_allclose(np.asarray(log_var[i]), np.log(clipped), rtol=1e-6)


def test_conversions_round_trip():
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    x0 = jax.random.uniform(k1, (4, 3, 3, 2), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    lam = jax.random.uniform(k3, (4,), minval=-6, maxval=6)
    a, s = jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))
    x_t = P.q_sample(x0, eps, a, s)
    v = P.x0_eps_to_v(x0, eps, a, s)
    tol = dict(atol=2e-5 * float(jnp.exp(6.0) ** 0.5))  # 1/alpha amplification of f32 error
    np.testing.assert_allclose(P.eps_to_x0(x_t, eps, a, s), x0, **tol)
    np.testing.assert_allclose(P.x0_to_eps(x_t, x0, a, s), eps, **tol)
    np.testing.assert_allclose(P.v_to_x0(x_t, v, a, s), x0, atol=1e-5)
    np.testing.assert_allclose(P.v_to_eps(x_t, v, a, s), eps, atol=1e-5)
    np.testing.assert_allclose(P.score_to_eps(P.eps_to_score(eps, s), s), eps, atol=1e-5)
    # VE frame: x_ve = x_t / alpha, sigma_ve = sigma / alpha.
    x_ve, sig = x_t / P.bcast(a, x_t), s / a
    np.testing.assert_allclose(P.denoised_to_eps(x_ve, x0, sig), eps, **tol)
    score_ve = P.denoised_to_score(x_ve, x0, sig)
    np.testing.assert_allclose(score_ve, -eps / P.bcast(sig, eps), rtol=1e-4, atol=1e-4)
    # Every prediction's target maps back to x0, in the VP and in the VE frame.
    for pred in P.PREDICTIONS:
        for alpha, sigma, x in [(a, s, x_t), (jnp.ones_like(sig), sig, x_ve)]:
            target = P.prediction_target(pred, x0, eps, alpha, sigma)
            back = P.prediction_to_x0(target, x, alpha, sigma, pred)
            np.testing.assert_allclose(back, x0, **tol, err_msg=pred)
    # The EDM target is F = (x0 - c_skip x_ve) / c_out, with EDM's coefficients.
    c_skip, c_out, c_in, c_noise = P.edm_coefficients(sig)
    f = (x0 - P.bcast(c_skip, x0) * x_ve) / P.bcast(c_out, x0)
    np.testing.assert_allclose(P.prediction_target("edm", x0, eps, a, s), f, atol=1e-3)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(np.asarray(sig) ** 2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(np.asarray(sig)) / 4, rtol=1e-6, atol=1e-6)


def oracle_model(schedule, prediction, x0):
    """A network that knows x0 and inverts c_noise back to its noise level independently."""

    def model(x_in, c_noise, cond):
        if prediction == "edm" or isinstance(schedule, S.KarrasSchedule):
            sig = jnp.exp(4 * c_noise)
        elif isinstance(schedule, S.DiscreteSchedule):
            sig = jnp.exp(jnp.interp(c_noise, jnp.arange(schedule.num_timesteps),
                                     np.log(schedule.sigmas)))
        else:
            sig = jnp.exp(-schedule.logsnr(c_noise / 1000) / 2)
        if prediction == "edm":
            x = x_in * P.bcast(jnp.sqrt(sig**2 + 0.25), x_in)
        else:
            x = x_in * P.bcast(jnp.sqrt(1 + sig**2), x_in)
        noise = (x - x0) / P.bcast(sig, x)
        target = P.prediction_target(prediction, x0, noise, jnp.ones_like(sig), sig)
        return target + (0 if cond is None else cond)

    return model


@pytest.mark.parametrize("schedule", [DS, S.CosineSchedule(), S.KarrasSchedule()])
@pytest.mark.parametrize("prediction", P.PREDICTIONS)
def test_denoiser_of_oracle_returns_x0(schedule, prediction):
    x0 = jnp.linspace(-1, 1, 16).reshape(2, 2, 2, 2)
    sigma = jnp.array([0.05, 4.0])
    x = x0 + P.bcast(sigma, x0) * jax.random.normal(jax.random.key(3), x0.shape)
    denoise = jax.jit(P.make_denoiser(oracle_model(schedule, prediction, x0), schedule,
                                      prediction=prediction))
    np.testing.assert_allclose(denoise(x, sigma), x0, atol=1e-5)
    x_scalar = x0 + 0.05 * jax.random.normal(jax.random.key(4), x0.shape)
    np.testing.assert_allclose(denoise(x_scalar, 0.05), x0, atol=1e-5)  # scalar sigma


def test_denoiser_feeds_the_discrete_model_its_training_inputs():
    """At a table sigma the network sees exactly the VP state and the integer timestep."""
    seen = {}

    def model(x_in, c_noise, cond):
        seen["x_in"], seen["c"] = x_in, c_noise
        return jnp.zeros_like(x_in)

    t = np.array([0, 10, 999])
    x_vp = jax.random.normal(jax.random.key(4), (3, 2, 2, 1))
    sig = jnp.asarray(DS.sigmas[t], jnp.float32)
    x = x_vp / P.bcast(jnp.asarray(DS.sqrt_alphas_cumprod[t], jnp.float32), x_vp)
    out = P.make_denoiser(model, DS, prediction="eps")(x, sig)
    x_in, c = P.discrete_model_input(DS, x_vp, jnp.asarray(t), prediction="eps")
    np.testing.assert_allclose(seen["x_in"], x_in, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["c"], c, atol=2e-3)  # interp of float32 log-sigmas
    np.testing.assert_allclose(out, x, rtol=1e-6)  # eps = 0 -> x0_hat = x
    # Continuous schedules: 1000 t; EDM: ln(sigma) / 4 and c_in x.
    lin = S.LinearSchedule()
    t_c = jnp.array([0.25, 0.75])
    x_in, c = P.model_input(lin, x_vp[:2], t_c, prediction="v")
    np.testing.assert_allclose(c, 1000 * t_c, rtol=1e-5)
    np.testing.assert_allclose(x_in, x_vp[:2], rtol=1e-6)
    P.make_denoiser(model, lin, prediction="v")(x[:2], jnp.exp(-lin.logsnr(t_c) / 2))
    np.testing.assert_allclose(seen["c"], 1000 * t_c, rtol=1e-4)
    # A respaced schedule feeds the original indices through its timestep map.
    spaced, tmap = DS.respace(S.space_timesteps(1000, "ddim10"))
    _, c = P.discrete_model_input(spaced, x_vp, jnp.array([0, 4, 9]), prediction="v",
                                  timestep_map=tmap)
    np.testing.assert_array_equal(c, [0.0, 400.0, 900.0])
    x_in, c = P.discrete_model_input(DS, x_vp, jnp.asarray(t), prediction="edm")
    np.testing.assert_allclose(c, np.log(DS.sigmas[t]) / 4, rtol=1e-5, atol=1e-6)
    want = x / P.bcast(jnp.sqrt(sig**2 + 0.25), x)
    np.testing.assert_allclose(x_in, want, rtol=1e-5)


def test_denoiser_with_variance_and_learned_output():
    def model(x_in, c_noise, cond):
        return jnp.concatenate([jnp.zeros_like(x_in), jnp.full_like(x_in, 0.5)], -1)

    x = jnp.ones((2, 2, 2, 3))
    x0, frac = P.make_denoiser_with_variance(model, DS, prediction="x0")(x, jnp.array([1., 2.]))
    np.testing.assert_array_equal(x0, 0.0)
    np.testing.assert_array_equal(frac, 0.75)
    assert P.make_denoiser(model, DS, prediction="x0", learned_variance=True)(x, 1.0).shape \
        == x.shape
    with pytest.raises(ValueError, match="channels"):
        P.make_denoiser(model, DS, prediction="x0")(x, 1.0)
    with pytest.raises(ValueError, match="prediction"):
        P.make_denoiser(model, DS, prediction="score")


def test_p_mean_variance_variance_types():
    t = jnp.array([0, 1, 500, 999])
    x_t = jax.random.normal(jax.random.key(5), (4, 2, 2, 1))
    x0 = jnp.clip(x_t * 0.3, -1, 1)
    a = jnp.asarray(DS.sqrt_alphas_cumprod, jnp.float32)[t]
    s = jnp.asarray(DS.sqrt_one_minus_alphas_cumprod, jnp.float32)[t]
    eps = P.x0_to_eps(x_t, x0, a, s)
    mean_ref, _, _ = P.q_posterior(DS, x0, x_t, t)
    post = np.log(np.append(DS.posterior_variance[1], DS.posterior_variance[1:]))
    large = np.log(np.append(DS.posterior_variance[1], DS.betas[1:]))
    cases = {"fixed_small": post, "fixed_large": large}
    for vt, want in cases.items():
        out = P.p_mean_variance(DS, eps, x_t, t, prediction="eps", variance_type=vt)
        np.testing.assert_allclose(out["mean"], mean_ref, atol=2e-5)
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0], want[np.asarray(t)],
                                   rtol=1e-6)
        np.testing.assert_allclose(out["pred_x0"], x0, atol=2e-3)
    for v, want in [(-1.0, post), (1.0, np.log(DS.betas))]:
        out_v = jnp.concatenate([eps, jnp.full_like(eps, v)], -1)
        out = P.p_mean_variance(DS, out_v, x_t, t, prediction="eps",
                                variance_type="learned_range")
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0], want[np.asarray(t)],
                                   rtol=1e-6)
    out = P.p_mean_variance(DS, jnp.concatenate([x0, jnp.full_like(x0, -3.0)], -1), x_t, t,
                            prediction="x0", variance_type="learned")
    np.testing.assert_allclose(out["variance"], np.exp(-3.0), rtol=1e-6)
    # clip_denoised clips the x0 estimate before the posterior mean.
    out = P.p_mean_variance(DS, 5 * jnp.ones_like(x_t), x_t, t, prediction="x0",
                            variance_type="fixed_small", clip_denoised=True)
    np.testing.assert_allclose(out["pred_x0"], 1.0)
    # p_sample adds no noise at t = 0 and var^(1/2) noise elsewhere.
    noise = jnp.ones_like(x_t)
    step = P.p_sample(DS, eps, x_t, t, noise, prediction="eps", variance_type="fixed_small")
    np.testing.assert_allclose(step[0], mean_ref[0], atol=2e-5)
    np.testing.assert_allclose(step[1:], mean_ref[1:] + np.exp(0.5 * post[np.asarray(t[1:])])
                               [:, None, None, None], atol=2e-5)


def test_jit_vmap_and_leading_batch_shapes():
    x0 = jax.random.normal(jax.random.key(6), (2, 3, 4, 4, 1))  # batch (2, 3)
    noise = jax.random.normal(jax.random.key(7), x0.shape)
    t = jnp.array([[0, 5, 9], [100, 500, 999]])
    x_t = jax.jit(P.q_sample_discrete, static_argnums=0)(DS, x0, noise, t)
    flat = P.q_sample_discrete(DS, x0.reshape(6, 4, 4, 1), noise.reshape(6, 4, 4, 1),
                               t.reshape(6))
    np.testing.assert_allclose(x_t.reshape(6, 4, 4, 1), flat, rtol=1e-6)
    per_example = jax.vmap(lambda a, b, c: P.q_posterior(DS, a, b, c)[0])(
        x0[0], x_t[0], t[0])
    np.testing.assert_allclose(per_example, P.q_posterior(DS, x0, x_t, t)[0][0], rtol=1e-6)
    out = jax.jit(lambda o, x, tt: P.p_mean_variance(DS, o, x, tt, prediction="v",
                                                     variance_type="fixed_large"))(
        noise, x_t, t)
    assert out["mean"].shape == x0.shape and out["log_variance"].shape == x0.shape
