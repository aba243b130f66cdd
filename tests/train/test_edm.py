"""EDM training (Karras et al. 2022): continuous log-normal sigma, preconditioning and loss,
checked against float64 NumPy transcriptions of the paper's formulas; its config wiring."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import configlib, experiment, tasks
from diffjax.diffusion import losses
from diffjax.diffusion.schedules import KarrasSchedule
from diffjax.errors import ConfigError
from diffjax.train.step import LossSpec, make_diffusion_loss

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EDM_CONFIG = os.path.join(REPO, "experiments", "fashion_mnist_edm.py")


def _edm_numpy(F, x0, n, sigma, sd):
    """EDM Table 1 / eq. 8 in float64: lambda(sigma) ||D(x) - x0||^2, mean over pixels."""
    F, x0, n, sigma = (np.asarray(a, np.float64) for a in (F, x0, n, sigma))
    s = sigma[:, None, None, None]
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / np.sqrt(s**2 + sd**2)
    x = x0 + s * n
    D = c_skip * x + c_out * F
    lam = (s**2 + sd**2) / (s * sd) ** 2
    return (lam * (D - x0) ** 2).mean(axis=(1, 2, 3))


def test_sigma_loss_is_edm_loss():
    rng = np.random.default_rng(0)
    shape = (6, 4, 4, 2)
    F, x0, n = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    sigma = np.exp(rng.normal(-1.2, 1.2, 6)).astype(np.float32)
    for sd in (0.5, 0.7):
        got = losses.sigma_training_losses(jnp.asarray(F), jnp.asarray(x0), jnp.asarray(n),
                                           jnp.asarray(sigma), prediction="edm", sigma_data=sd)
        np.testing.assert_allclose(got["loss"], _edm_numpy(F, x0, n, sigma, sd), rtol=2e-5)


def test_lognormal_loss_feeds_the_network_edm_inputs():
    """The network sees c_in (x0 + sigma n) and ln(sigma)/4, with ln sigma = P_mean + P_std z
    from the step key's first split, n from its second; the loss is EDM's on its output."""
    spec = LossSpec(prediction="edm", timestep_sampler="lognormal", p_mean=0.3, p_std=0.7,
                    sigma_data=0.6)
    seen = {}

    def apply_fn(params, x_in, c_noise, labels, train, rngs):
        seen.update(x_in=x_in, c_noise=c_noise)
        return params["F"]

    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.uniform(-1, 1, (5, 4, 4, 1)), jnp.float32)
    params = {"F": jnp.asarray(rng.standard_normal((5, 4, 4, 1)), jnp.float32)}
    ds = KarrasSchedule().discretize(10)
    key = jax.random.PRNGKey(3)
    loss, (terms, _) = make_diffusion_loss(apply_fn, ds, spec)(params, None, {"image": x0}, key)
    k_t, k_noise, _, _ = jax.random.split(key, 4)
    sigma = np.exp(0.3 + 0.7 * np.asarray(jax.random.normal(k_t, (5,)), np.float64))
    n = np.asarray(jax.random.normal(k_noise, x0.shape), np.float64)
    c_in = 1 / np.sqrt(sigma**2 + 0.36)
    np.testing.assert_allclose(seen["c_noise"], np.log(sigma) / 4, rtol=1e-5, atol=1e-6)
    want_x = c_in[:, None, None, None] * (np.asarray(x0, np.float64) + sigma[:, None, None,
                                                                            None] * n)
    np.testing.assert_allclose(seen["x_in"], want_x, rtol=1e-5, atol=1e-6)
    want = _edm_numpy(params["F"], x0, n, sigma, 0.6)
    np.testing.assert_allclose(terms["loss"], want, rtol=1e-4)
    assert float(loss) == pytest.approx(want.mean(), rel=1e-4)


def test_lognormal_sigmas_follow_p_mean_and_p_std():
    spec = LossSpec(prediction="edm", timestep_sampler="lognormal", p_mean=-1.2, p_std=1.2)
    seen = []

    def apply_fn(params, x_in, c_noise, labels, train, rngs):
        seen.append(c_noise)
        return jnp.zeros_like(x_in)

    fn = make_diffusion_loss(apply_fn, KarrasSchedule().discretize(10), spec)
    fn({}, None, {"image": jnp.zeros((20000, 1, 1, 1))}, jax.random.PRNGKey(0))
    ln_sigma = 4 * np.asarray(seen[0], np.float64)
    # 20000 draws: mean within 5 standard errors, std within 5 of its standard error
    assert abs(ln_sigma.mean() + 1.2) < 5 * 1.2 / np.sqrt(20000)
    assert abs(ln_sigma.std() - 1.2) < 5 * 1.2 / np.sqrt(2 * 20000)


def _edm(**overrides):
    c = configlib.load_config_file(EDM_CONFIG)
    c.update_from_flattened_dict(overrides)
    return c


def test_edm_config_samples_on_sigma_min_max_with_its_sigma_data(monkeypatch):
    exp = experiment.build(_edm(**{"diffusion.sigma_data": 0.7, "diffusion.sigma_max": 60.0}))
    sigmas = exp.sampling.sampler.sigmas
    assert sigmas[0] == pytest.approx(60.0) and sigmas[-2] == pytest.approx(0.002)
    assert sigmas[-1] == 0.0 and len(sigmas) == 14
    assert exp.task.loss.sigma_data == 0.7 and exp.task.loss.timestep_sampler == "lognormal"
    assert exp.optim.ema_decays == () and len(exp.optim.ema_gammas) == 2

    # the task's denoiser preconditions with the configured sigma_data
    def fake_apply(self, params, x, t, y, train, rngs=None, **inputs):
        return params["F"]

    monkeypatch.setattr(tasks.DiffusionTask, "apply", fake_apply)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 28, 28, 1)).astype(np.float32)
    F = rng.standard_normal((3, 28, 28, 1)).astype(np.float32)
    got = exp.task.denoiser({"F": jnp.asarray(F)})(jnp.asarray(x), jnp.asarray(2.0), None)
    c_skip, c_out = 0.49 / (4 + 0.49), 2 * 0.7 / np.sqrt(4 + 0.49)
    np.testing.assert_allclose(got, c_skip * x + c_out * F, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, words", [
    ({"diffusion.prediction": "v"}, "prediction='edm'"),
    ({"sampler.sigma_spacing": "model"}, "no timestep table"),
    ({"sampler.name": "ddpm"}, "no timestep table"),
    ({"eval.metrics": ("nll",)}, "nll"),
    ({"diffusion.sigma_data": 0.0}, "sigma_data"),
    ({"diffusion.sigma_min": 100.0}, "sigma_min"),
    ({"ema.sigma_rels": (0.05, 0.4)}, "ema.sigma_rels"),
    ({"ema.sigma_rel": 0.5}, "ema.sigma_rel"),
    ({"ema.sigma_rels": (), "ema.snapshot_every": 0}, "no EMA"),
    ({"ema.sigma_rels": (0.05, 0.05)}, "twice"),
    ({"ema.snapshot_every": -1}, "snapshot_every"),
])
def test_edm_config_errors(overrides, words):
    with pytest.raises(ConfigError, match=words) as e:
        experiment.build(_edm(**overrides))
    assert "\n" not in str(e.value)



@pytest.mark.parametrize("model", ["unet", "dit"])
def test_edm_training_loss_of_both_networks(tiny, tiny_data, model):
    """The trainer's loss of a lognormal EDM task, UNet and DiT: finite, and an all-zero
    network output gives EDM's loss of D = c_skip x exactly (float64 NumPy)."""
    c = tiny.config(tiny_data, **{
        "diffusion.prediction": "edm", "diffusion.timestep_sampler": "lognormal",
        "diffusion.loss": "simple", "diffusion.variance_type": "fixed_small",
        "diffusion.schedule": "karras", "sampler.name": "heun",
        "sampler.sigma_spacing": "karras", "model.name": model, "model.dit.patch_size": 2,
        "model.dit.depth": 1, "model.dit.hidden_size": 32, "model.dit.num_heads": 2})
    task = experiment.build(c).task
    params = task.init_params(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    batch = {"image": x0, "label": jnp.arange(4) % 4}
    loss, (terms, _) = task.loss_fn()(params, None, batch, jax.random.PRNGKey(1))
    assert np.isfinite(float(loss)) and terms["loss"].shape == (4,)
    zero = jax.tree.map(jnp.zeros_like, params)  # output 0 (DiT's final layer is zeroed too)
    _, (terms, _) = task.loss_fn()(zero, None, batch, jax.random.PRNGKey(1))
    k_t, k_noise, _, _ = jax.random.split(jax.random.PRNGKey(1), 4)
    sigma = np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(k_t, (4,)), np.float64))
    n = np.asarray(jax.random.normal(k_noise, x0.shape), np.float64)
    want = _edm_numpy(np.zeros(x0.shape), x0, n, sigma, 0.5)
    np.testing.assert_allclose(terms["loss"], want, rtol=1e-4)
