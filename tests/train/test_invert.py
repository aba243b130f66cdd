"""``condition.type = "invert"``: DDIM inversion in --mode sample (latents, round trip, PSNR).

The app's latents and reconstructions are checked against the library functions they
stand for: ``conditional.ddim_invert`` (x0 -> x_T) and ``samplers.ddim`` / ``samplers.euler``
(x_T -> x0) with the task's own denoiser, on a tiny random-weight model.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from diffjax import configlib, experiment, generate, parallel
from diffjax.app import sample as app_sample
from diffjax.diffusion import conditional
from diffjax.diffusion import samplers as S

SMALL = {"guidance.type": "none", "guidance.label_dropout": 0.0, "model.model_channels": 8,
         "model.norm_groups": 4, "model.attention_resolutions": (), "model.dropout": 0.0,
         "diffusion.loss": "simple", "diffusion.variance_type": "fixed_small",
         "model.use_scale_shift_norm": False, "model.channel_mult": (1,),
         "condition.type": "invert", "sampler.name": "ddim", "sampler.num_steps": 6,
         "sampler.thresholding": "none"}


def _setup(tiny, tiny_data, **overrides):
    c = tiny.config(tiny_data, **{**SMALL, **overrides})
    exp = experiment.build(c)
    params = exp.task.init_params(jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype),
                          params)
    return exp, params


def _inputs(n=5):
    yy, xx = np.mgrid[0:8, 0:8] / 7.0
    phase = np.linspace(0, 3, n)[:, None, None]
    return (0.8 * np.sin(2 * np.pi * (xx + yy / 2) + phase))[..., None].astype(np.float32)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_latents_and_round_trip_match_the_library(tiny, tiny_data, tmp_path, sampler):
    """samples.npz holds x_T = the inverse ODE of the sampler (ddim_invert for ddim), the
    images decoded from it, the inputs, their labels (from the .npz) and the PSNR of each."""
    exp, params = _setup(tiny, tiny_data, **{"sampler.name": sampler})
    mesh = parallel.make_mesh(jax.devices()[:1])
    inputs, labels = _inputs(), np.array([3, 0, 2, 1, 3], np.int32)
    np.savez(tmp_path / "in.npz", images=inputs, labels=labels)
    assert np.array_equal(app_sample.load_input_labels(str(tmp_path / "in.npz"), 5, 4), labels)
    run = tmp_path / "run"
    generator = generate.Generator(exp.task, exp.sampling, mesh)
    out, got_labels = app_sample.invert_inputs(exp.sampling, str(run), generator, params,
                                               inputs, labels, 0, 1)
    np.testing.assert_array_equal(got_labels, labels)
    with np.load(run / "samples.npz") as f:
        latents, sigma_max, scores = f["latents"], float(f["sigma_max"]), f["psnr"]
        np.testing.assert_array_equal(f["images"], out)
        np.testing.assert_array_equal(f["inputs"], inputs)
    assert (run / "samples.png").exists()

    sig = exp.sampling.sampler.sigmas
    assert sigma_max == pytest.approx(float(sig[0])) and sigma_max > 50
    denoise = exp.task.denoiser(params, False)
    if sampler == "ddim":
        want = conditional.ddim_invert(denoise, inputs, sig, cond=labels)
    else:
        want = S.euler(denoise, inputs, np.asarray(sig)[::-1].copy(), jax.random.PRNGKey(0),
                       cond=labels)
    np.testing.assert_allclose(latents, want, rtol=1e-5, atol=1e-5 * sigma_max)
    decoded = getattr(S, sampler)(denoise, latents, sig, jax.random.PRNGKey(0), cond=labels)
    # The decode starts at |x_T| ~ sigma_max (~1e3), where float32 resolves ~6e-8 sigma_max:
    # two compilations of the same chain differ by a few of those.
    np.testing.assert_allclose(out, np.clip(decoded, -1, 1), atol=1e-6 * sigma_max)
    mse = ((out.astype(np.float64) - inputs) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(scores, 10 * np.log10(4 / mse), rtol=1e-12)
    # The labels are used: other labels invert to other latents.
    other = generator.latents(params, inputs, jax.random.PRNGKey(1), (labels + 1) % 4)
    assert np.abs(other - latents).max() > 1e-3 * sigma_max


@pytest.mark.parametrize("overrides, match", [
    ({"sampler.name": "ddpm"}, "deterministic ODE sampler"),
    ({"sampler.eta": 0.5}, "sampler.eta=0.5"),
    ({"sampler.name": "euler", "sampler.s_churn": 1.0}, "s_churn"),
    ({"sampler.name": "heun"}, "ddim .eta 0. or euler"),
])
def test_invert_needs_a_deterministic_invertible_sampler(tiny, tiny_data, overrides, match):
    c = tiny.config(tiny_data, **{**SMALL, **overrides})
    with pytest.raises(configlib.ConfigError, match=match) as err:
        experiment.build(c)
    assert "\n" not in str(err.value)


def test_bad_input_labels_are_one_line_errors(tmp_path):
    path = str(tmp_path / "in.npz")
    for labels in (np.array([0, 1]), np.array([0, 1, 9]), np.array([0.0, 1.0, 2.0])):
        np.savez(path, images=np.zeros((3, 8, 8, 1)), labels=labels)
        with pytest.raises(configlib.ConfigError, match="'labels' must be 3 integers"):
            app_sample.load_input_labels(path, 3, 4)
    assert app_sample.load_input_labels(path, 3, 0) is None  # unconditional model
    np.savez(path, images=np.zeros((3, 8, 8, 1)))
    assert app_sample.load_input_labels(path, 3, 4) is None
