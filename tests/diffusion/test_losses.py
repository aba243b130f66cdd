"""Losses, VLB terms and the full NLL against closed forms, float64 references and MC."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_ndtr
from scipy.stats import norm

from diffjax.diffusion import losses as L
from diffjax.diffusion import process as P
from diffjax.diffusion import schedules as S

DS = S.LinearSchedule().discretize(1000)
LN2 = math.log(2.0)


def log_bin_mass(lo, hi, mean, sd):
    """log(Phi((hi - mean) / sd) - Phi((lo - mean) / sd)) in float64 without underflow:
    taken on the tail side of the bin (by symmetry) as log Phi(b) + log1p(-Phi(a) / Phi(b))."""
    a, b = (lo - mean) / sd, (hi - mean) / sd
    flip = a > 0
    a, b = np.where(flip, -b, a), np.where(flip, -a, b)
    return log_ndtr(b) + np.log1p(-np.exp(log_ndtr(a) - log_ndtr(b)))


def test_normal_kl_matches_monte_carlo():
    """E_{x~q}[log q(x) - log p(x)] over 2e5 draws, within 5 standard errors."""
    n = 200_000
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
    x = m1 + math.exp(lv1 / 2) * np.random.default_rng(0).standard_normal(n)
    ratio = norm.logpdf(x, m1, math.exp(lv1 / 2)) - norm.logpdf(x, m2, math.exp(lv2 / 2))
    kl = float(L.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2), jnp.float32(lv2)))
    assert abs(kl - ratio.mean()) < 5 * ratio.std() / math.sqrt(n)
    assert float(L.normal_kl(0.1, -1.0, 0.1, -1.0)) == 0.0


def test_discretized_gaussian_likelihood_against_float64_cdf():
    grid = np.linspace(-1, 1, 256)
    for mean, scale in [(0.3, 0.05), (-0.99, 0.01), (0.0, 2.0), (0.9, 0.003)]:
        ll = np.asarray(L.discretized_gaussian_log_likelihood(
            jnp.asarray(grid, jnp.float32), mean, jnp.log(jnp.float32(scale))), np.float64)
        edges = np.concatenate([[-np.inf], (grid[:-1] + grid[1:]) / 2, [np.inf]])
        probs = norm.cdf(edges[1:], mean, scale) - norm.cdf(edges[:-1], mean, scale)
        big = probs > 1e-6
        # float32 CDF differences: absolute error ~1e-7 in each probability.
        np.testing.assert_allclose(np.exp(ll[big]), probs[big], rtol=1e-4, atol=1e-7)
        assert abs(np.exp(ll).sum() - 1.0) < 1e-5


def test_prior_bpd_closed_form():
    x0 = np.array([[-1.0, 0.0, 0.5, 1.0]])
    a2 = DS.alphas_cumprod[-1]
    kl = 0.5 * (-np.log(1 - a2) + (1 - a2) + a2 * x0**2 - 1)
    # float32: the variance part (d^2 / 4 with d = log(1 - abar_T) ~ -4e-5) is computed as
    # expm1(d) - d with absolute error ~ eps32 |d| = 5e-12; the mean part to ~1e-6 relative.
    np.testing.assert_allclose(np.asarray(L.prior_bpd(DS, jnp.asarray(x0, jnp.float32))),
                               kl.mean(1) / LN2, rtol=1e-5, atol=2e-11)


def _sample(t, shape=(4, 3, 3, 2), seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x0 = jax.random.uniform(k1, shape, minval=-1, maxval=1)
    noise = jax.random.normal(k2, shape)
    out = jax.random.normal(k3, shape[:-1] + (2 * shape[-1],))
    t = jnp.asarray(t)
    return x0, noise, P.q_sample_discrete(DS, x0, noise, t), out, t


@pytest.mark.parametrize("prediction", P.PREDICTIONS)
@pytest.mark.parametrize("weighting", ["snr", "min_snr", "p2"])
def test_weightings_are_x0_space_weights(prediction, weighting):
    """Weighted target MSE == w_x0(SNR) * mean((x0_hat - x0)^2) with w_x0 written here."""
    x0, noise, x_t, out, t = _sample([20, 200, 500, 900])
    mean_out = out[..., :2]
    terms = L.training_losses(mean_out, x0, x_t, noise, t, DS, prediction=prediction,
                              weighting=weighting, min_snr_gamma=5.0, p2_gamma=0.5, p2_k=1.0)
    snr = (DS.alphas_cumprod / (1 - DS.alphas_cumprod))[np.asarray(t)]
    w_x0 = {"snr": snr, "min_snr": np.minimum(snr, 5.0),
            "p2": snr / (1.0 + snr) ** 0.5}[weighting]
    a = jnp.asarray(DS.sqrt_alphas_cumprod[np.asarray(t)], jnp.float32)
    s = jnp.asarray(DS.sqrt_one_minus_alphas_cumprod[np.asarray(t)], jnp.float32)
    x0_hat = P.prediction_to_x0(mean_out, x_t, a, s, prediction)
    x0_mse = np.mean((np.asarray(x0_hat, np.float64) - np.asarray(x0)) ** 2, axis=(1, 2, 3))
    # float32: x0_hat carries ~1e-6 / alpha absolute error; relative 1e-4 covers it here.
    np.testing.assert_allclose(np.asarray(terms["loss"]), w_x0 * x0_mse, rtol=1e-4)


def test_uniform_simple_loss_is_target_mse():
    x0, noise, x_t, out, t = _sample([0, 999, 3, 600])
    for pred in P.PREDICTIONS:
        terms = L.training_losses(out[..., :2], x0, x_t, noise, t, DS, prediction=pred)
        a = DS.sqrt_alphas_cumprod[np.asarray(t)][:, None, None, None]
        s = DS.sqrt_one_minus_alphas_cumprod[np.asarray(t)][:, None, None, None]
        x0n, nn = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
        sd = 0.5
        sig = s / a
        c_skip, c_out = sd**2 / (sig**2 + sd**2), sig * sd / np.sqrt(sig**2 + sd**2)
        target = {"eps": nn, "x0": x0n, "v": a * nn - s * x0n,
                  "edm": (x0n - c_skip * (x0n + sig * nn)) / c_out}[pred]
        want = np.mean((np.asarray(out[..., :2], np.float64) - target) ** 2, axis=(1, 2, 3))
        np.testing.assert_allclose(np.asarray(terms["loss"]), want, rtol=1e-4, err_msg=pred)
        np.testing.assert_allclose(np.asarray(terms["mse"]), want, rtol=1e-4)


def test_vlb_term_is_kl_to_posterior_and_decoder_nll():
    x0, noise, x_t, out, t = _sample([0, 1, 400, 999])
    terms = L.training_losses(out, x0, x_t, noise, t, DS, prediction="eps", loss_type="vlb",
                              variance_type="learned_range")
    p = P.p_mean_variance(DS, out, x_t, t, prediction="eps", variance_type="learned_range")
    m, v = np.asarray(p["mean"], np.float64), np.asarray(p["variance"], np.float64)
    qm, qv, qlv = (np.asarray(a, np.float64) for a in P.q_posterior(DS, x0, x_t, t))
    kl = 0.5 * (np.log(v) - qlv + np.exp(qlv) / v + (qm - m) ** 2 / v - 1)
    x0n = np.asarray(x0, np.float64)
    lo = np.where(x0n < -0.99, -np.inf, x0n - 1 / 255)
    hi = np.where(x0n > 0.99, np.inf, x0n + 1 / 255)
    dec = -log_bin_mass(lo, hi, m, np.sqrt(v))
    want = np.where(np.asarray(t) == 0, dec.mean((1, 2, 3)), kl.mean((1, 2, 3))) / LN2
    np.testing.assert_allclose(np.asarray(terms["vlb"]), want, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(terms["loss"]), 1000 * np.asarray(terms["vlb"]),
                               rtol=1e-6)


def test_hybrid_loss_stops_gradient_on_the_mean():
    x0, noise, x_t, out, t = _sample([0, 10, 400, 999])

    def loss(o, loss_type, weighting="min_snr"):
        return L.training_losses(o, x0, x_t, noise, t, DS, loss_type=loss_type, weighting=weighting,
                                 variance_type="learned_range", vlb_weight=1e-3)

    hybrid = loss(out, "hybrid")
    simple = loss(out, "simple")
    np.testing.assert_allclose(hybrid["loss"], simple["loss"] + hybrid["vlb"], rtol=1e-6)
    g_h = jax.grad(lambda o: loss(o, "hybrid")["loss"].sum())(out)
    g_s = jax.grad(lambda o: loss(o, "simple")["loss"].sum())(out)
    g_v = jax.grad(lambda o: loss(o, "vlb")["vlb"].sum())(out)
    np.testing.assert_array_equal(g_h[..., :2], g_s[..., :2])  # mean: L_simple only
    np.testing.assert_allclose(g_h[..., 2:], 1e-3 * 1000 * g_v[..., 2:], rtol=1e-5, atol=1e-9)
    assert float(jnp.abs(g_v[..., :2]).max()) > 0  # the plain VLB does train the mean
    with pytest.raises(ValueError, match="hybrid"):
        L.training_losses(out[..., :2], x0, x_t, noise, t, DS, loss_type="hybrid")
    with pytest.raises(ValueError, match="weighting"):
        loss(out, "simple", weighting="sqrt")


def test_continuous_losses_edm_and_vp():
    key = jax.random.key(3)
    x0 = jax.random.uniform(key, (3, 4, 4, 1), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    out = jax.random.normal(jax.random.fold_in(key, 2), x0.shape)
    t = jnp.array([0.1, 0.5, 0.9])
    karras = S.KarrasSchedule()
    terms = L.continuous_training_losses(out, x0, noise, t, karras, prediction="edm")
    # EDM eq. (2) with lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on D = x0_hat.
    sig = np.asarray(karras.sigma(t), np.float64)
    x = x0 + P.bcast(karras.sigma(t), x0) * noise
    d = P.prediction_to_x0(out, x, jnp.ones(3), karras.sigma(t), "edm")
    lam = (sig**2 + 0.25) / (sig * 0.5) ** 2
    want = lam * np.mean((np.asarray(d, np.float64) - np.asarray(x0)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(terms["loss"]), want, rtol=1e-4)
    cos = S.CosineSchedule()
    terms = L.continuous_training_losses(out, x0, noise, t, cos, prediction="v",
                                         weighting="min_snr")
    a, s = cos.alpha(t), cos.sigma(t)
    mse = np.mean((np.asarray(out - P.x0_eps_to_v(x0, noise, a, s))) ** 2, axis=(1, 2, 3))
    snr = np.exp(np.asarray(cos.logsnr(t), np.float64))
    np.testing.assert_allclose(np.asarray(terms["loss"]), np.minimum(snr, 5) / (1 + snr) * mse,
                               rtol=1e-5)


# ---- the full NLL of the exact denoiser on Gaussian data ----

MU, S0 = 0.05, 0.2


def exact_gaussian_oracle(ds):
    """Tables of the exact reverse process for x0 ~ N(MU, S0^2): E[x0 | x_t] = MU + k (x_t -
    a MU), Var[x0 | x_t] = V, and the learned-range output giving the exact reverse variance
    beta~_t + coef1_t^2 V_t (within [beta~_t, beta_t] because S0 <= 1)."""
    a2 = ds.alphas_cumprod
    a, s2 = np.sqrt(a2), 1 - a2
    k = a * S0**2 / (a2 * S0**2 + s2)
    var_x0 = S0**2 * s2 / (a2 * S0**2 + s2)
    rev_var = ds.posterior_variance + ds.posterior_mean_coef1**2 * var_x0
    lo, hi = ds.posterior_log_variance_clipped, np.log(ds.betas)
    frac = (np.log(rev_var) - lo) / (hi - lo)
    assert np.all((frac >= 0) & (frac <= 1 + 1e-9))
    tabs = [jnp.asarray(v, jnp.float32) for v in (a, np.sqrt(s2), k, 2 * frac - 1)]

    def model(x_in, c_noise, cond):
        t = jnp.round(c_noise).astype(jnp.int32)
        a_t, s_t, k_t, v_t = (P.bcast(tab[t], x_in) for tab in tabs)
        x0_hat = MU + k_t * (x_in - a_t * MU)
        eps = (x_in - a_t * x0_hat) / s_t
        return jnp.concatenate([eps, jnp.broadcast_to(v_t, x_in.shape)], axis=-1)

    return model, var_x0


def expected_bound_nats(ds, x0, var_x0):
    """E over the diffusion noise of the bound for each x0 element, float64, nats.

    With every reverse kernel exact, sum of terms = -log q(x0) + E_{x_T|x0} log(q(x_T) /
    p(x_T)) for a continuous decoder (the chain telescopes to the joint q). iDDPM's decoder
    integrates over the bin x0 +- 1/255 instead, adding E_{x|x0}[log N(x0; mu(x), V_0) -
    log mass], done here by 80-point Gauss-Hermite quadrature over the noise of x_0.
    """
    a2T = ds.alphas_cumprod[-1]
    big_s2 = a2T * S0**2 + (1 - a2T)
    nll_data = 0.5 * np.log(2 * np.pi * S0**2) + (x0 - MU) ** 2 / (2 * S0**2)
    e_log_q = -0.5 * np.log(2 * np.pi * big_s2) - (a2T * (x0 - MU) ** 2 + 1 - a2T) / (2 * big_s2)
    e_log_p = -0.5 * np.log(2 * np.pi) - (a2T * x0**2 + 1 - a2T) / 2
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    a0, s0n = np.sqrt(ds.alphas_cumprod[0]), np.sqrt(1 - ds.alphas_cumprod[0])
    k0 = a0 * S0**2 / (ds.alphas_cumprod[0] * S0**2 + s0n**2)
    sd0 = np.sqrt(var_x0[0])
    x = a0 * x0[..., None] + s0n * nodes
    mean = MU + k0 * (x - a0 * MU)
    xx = x0[..., None]
    log_mass = log_bin_mass(xx - 1 / 255, xx + 1 / 255, mean, sd0)
    correction = (norm.logpdf(xx, mean, sd0) - log_mass) @ weights
    return nll_data + (e_log_q - e_log_p) + correction


def test_nll_of_exact_denoiser_on_gaussian_data():
    """nll_bpd vs its expectation given x0, computed analytically, and vs the data's NLL.

    Comparison 1 (the code under test): per example, total_bpd - expected bound has mean
    zero; the tolerance is 5 standard errors of that mean (estimated from the batch) plus
    float32 rounding of T = 1000 KL terms (each a difference of log-variances |log v| < 16
    rounded to 2 ulp = 4e-6 nats, summed: 1000 * 4e-6 / ln 2 = 6e-3 bits).
    Comparison 2 (what the bound means): the expected bound exceeds the discretised data's
    NLL -log2 P(x0 +- 1/255) only by the prior mismatch (q(x_T) != N(0, 1)) and the
    decoder's bin integration, both computed; it is >= 0 and below 0.01 bits/dim here.
    Comparison 3 (sensitivity): with fixed-small variance the bound is larger by far more
    than the tolerance (the decoder's variance beta~_1 is about half the true one).
    """
    batch, dims = 64, 512
    x0 = MU + S0 * np.random.default_rng(5).standard_normal((batch, dims))
    assert np.abs(x0).max() < 1 - 1 / 255  # no edge bins in play
    model, var_x0 = exact_gaussian_oracle(DS)
    x0_j = jnp.asarray(x0, jnp.float32)
    x0 = np.asarray(x0_j, np.float64)
    nll = jax.jit(lambda x, k: L.nll_bpd(model, DS, x, k, prediction="eps",
                                         variance_type="learned_range"))
    result = nll(x0_j, jax.random.key(11))
    total = np.asarray(result["total_bpd"], np.float64)
    assert result["vb"].shape == (batch, 1000)
    expected = expected_bound_nats(DS, x0, var_x0).mean(1) / LN2
    resid = total - expected
    se = resid.std(ddof=1) / math.sqrt(batch)
    tol = 5 * se + 1000 * 4e-6 / LN2
    assert abs(resid.mean()) < tol, (resid.mean(), se)

    data_nll = -log_bin_mass(x0 - 1 / 255, x0 + 1 / 255, MU, S0)
    gap = expected.mean() - data_nll.mean(1).mean() / LN2
    assert 0 <= gap < 0.01, gap
    print(f"bound - expected {resid.mean():.2e} (tol {tol:.2e}); gap to data NLL {gap:.2e}")
    assert abs(total.mean() - data_nll.mean() / LN2) < tol + gap

    def small_model(x_in, c_noise, cond):
        return model(x_in, c_noise, cond)[..., :dims]

    fixed = L.nll_bpd(small_model, DS, x0_j, jax.random.key(11), prediction="eps",
                      variance_type="fixed_small")
    assert float(fixed["total_bpd"].mean()) > total.mean() + 5 * tol


def test_losses_jit_and_leading_batch_shapes():
    """[2, 3] batches under jit equal the flattened [6] batch; vmap over examples agrees."""
    shape = (2, 3, 4, 4, 1)
    x0 = jax.random.uniform(jax.random.key(8), shape, minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(9), shape)
    out = jax.random.normal(jax.random.key(10), shape[:-1] + (2,))
    t = jnp.array([[0, 5, 9], [100, 500, 999]])
    x_t = P.q_sample_discrete(DS, x0, noise, t)
    fn = jax.jit(lambda o, a, b, c, tt: L.training_losses(
        o, a, b, c, tt, DS, loss_type="hybrid", variance_type="learned_range",
        weighting="p2"))
    nested = fn(out, x0, x_t, noise, t)
    flat = fn(*(a.reshape((6,) + a.shape[2:]) for a in (out, x0, x_t, noise, t)))
    for key in ("loss", "mse", "vlb"):
        assert nested[key].shape == (2, 3)
        np.testing.assert_allclose(nested[key].reshape(6), flat[key], rtol=1e-6)
    single = jax.vmap(lambda *a: fn(*(b[None] for b in a))["loss"][0])(
        out[0], x0[0], x_t[0], noise[0], t[0])
    np.testing.assert_allclose(single, nested["loss"][0], rtol=1e-6)
