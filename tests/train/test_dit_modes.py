"""model.name = "dit" through the whole Experiment: training steps, every sampler, both kinds
of guidance and the conditional modes (img2img, inpaint, invert), as with the UNet.

Each sampling result is compared with the library function it stands for, applied to the
DiT task's own denoiser, so a mode that silently fell back to another path would fail.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import configlib, experiment, generate, parallel
from diffjax.diffusion import conditional
from diffjax.diffusion import guidance as G
from diffjax.diffusion import samplers as S
from diffjax.models import dit as dit_model
from diffjax.train import loop

DIT = {"model.name": "dit", "model.dit.patch_size": 2, "model.dit.depth": 1,
       "model.dit.hidden_size": 32, "model.dit.num_heads": 2, "model.dropout": 0.0,
       "sampler.name": "ddim", "sampler.num_steps": 3, "sampler.thresholding": "none"}


def _exp(tiny, tiny_data, **overrides):
    return experiment.build(tiny.config(tiny_data, **{**DIT, **overrides}))


def _params(task, seed=0):
    """Random weights everywhere (a fresh DiT outputs exactly zero: adaLN-Zero)."""
    params = task.init_params(jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: (0.3 * rng.standard_normal(p.shape)).astype(p.dtype), params)


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(jax.devices()[:1])


def test_config_builds_the_paper_sizes(tiny, tiny_data):
    exp = _exp(tiny, tiny_data, **{"model.dit.depth": None, "model.dit.hidden_size": None,
                                   "model.dit.num_heads": None, "model.dit.size": "B"})
    m = exp.task.model
    assert isinstance(m, dit_model.DiT)
    assert (m.depth, m.hidden_size, m.num_heads) == dit_model.DIT_SIZES["B"]
    assert (m.input_size, m.in_channels, m.num_classes, m.learn_sigma) == (8, 1, 4, True)
    assert m.label_rows == 5  # label dropout 0.2: the null row exists
    with pytest.raises(configlib.ConfigError, match="patch_size=3 must divide"):
        _exp(tiny, tiny_data, **{"model.dit.patch_size": 3})
    with pytest.raises(configlib.ConfigError, match="not divisible by num_heads"):
        _exp(tiny, tiny_data, **{"model.dit.num_heads": 3})


def test_trains(tiny, tiny_data, mesh):
    """Three steps of the trainer's step (hybrid loss, label dropout, EMA) on the DiT move
    every parameter: adaLN-Zero starts the gates and the final layer at 0, so the final
    layer learns first, then the modulations, then the attention and MLP weights."""
    exp = _exp(tiny, tiny_data, **{"optim.warmup_steps": 0})
    trainer = loop.Trainer(exp.task, exp.optim, exp.train, mesh)
    state = trainer.new_state()
    before = jax.device_get(state.params)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
             "label": (np.arange(8) % 4).astype(np.int32)}
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params,
                         before)
    assert min(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_every_sampler(tiny, tiny_data, mesh, name):
    """Generator on a DiT = the sampler on the DiT's denoiser (same key layout)."""
    over = {"sampler.name": name, "guidance.type": "none", "guidance.label_dropout": 0.0}
    exp = _exp(tiny, tiny_data, **over)
    params = _params(exp.task)
    sampling = exp.sampling
    images, labels = generate.Generator(exp.task, sampling, mesh)(params, 4,
                                                                    jax.random.PRNGKey(1))
    assert images.shape == (4, 8, 8, 1) and np.all(np.isfinite(images))
    key = jax.random.fold_in(jax.random.PRNGKey(1), 0)
    k_init, k_sample = jax.random.split(key)
    sig = jnp.asarray(sampling.sampler.sigmas, jnp.float32)
    x = jax.random.normal(k_init, (4, 8, 8, 1)) * sig[0]
    denoise = exp.task.denoiser(params, sampling.with_variance)
    want = sampling.sampler.fn(denoise, x, sig, k_sample, cond=jnp.asarray(labels),
                               **sampling.sampler.options, **sampling.knobs()["sampler"])
    np.testing.assert_allclose(images, np.clip(want, -1, 1), atol=2e-5)


def test_classifier_free_guidance_and_channels(tiny, tiny_data, mesh):
    """CFG on the DiT mixes the conditional and null-label passes with weight w; with
    guidance.channels the later channels keep the conditional prediction (DiT's switch)."""
    exp = _exp(tiny, tiny_data, **{"guidance.scale": 2.0, "data.channels": 2})
    params = _params(exp.task)
    denoise = exp.task.denoiser(params)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 2))
    sigma, y = jnp.full((3,), 2.0), jnp.array([0, 1, 3])
    d_c, d_u = denoise(x, sigma, y), denoise(x, sigma, jnp.full((3,), 4))
    assert float(jnp.abs(d_c - d_u).max()) > 1e-3  # the label matters
    full = G.classifier_free(denoise, 2.0, 4)(x, sigma, y)
    # one batched call of 2B against two of B: float32 round-off of the outputs' scale
    tol = 1e-5 * float(jnp.abs(full).max())
    np.testing.assert_allclose(full, 3.0 * d_c - 2.0 * d_u, atol=tol)
    c = tiny.config(tiny_data, **{**DIT, "guidance.scale": 2.0, "data.channels": 2,
                                  "guidance.channels": 1})
    spec = experiment.build(c).sampling.guidance
    assert spec.static == {"null_cond": 4, "channels": 1}
    part = spec.fn(denoise, 2.0, **spec.static)(x, sigma, y)
    np.testing.assert_allclose(part[..., :1], full[..., :1], atol=1e-6)
    np.testing.assert_allclose(part[..., 1:], d_c[..., 1:], atol=tol)
    with pytest.raises(configlib.ConfigError, match="guidance.channels=3"):
        experiment.build(tiny.config(tiny_data, **{**DIT, "guidance.channels": 3}))


def test_classifier_guidance(tiny, tiny_data, mesh):
    """Classifier guidance (score shift under DDIM) of an unconditional DiT: the guided
    denoiser is D + sigma^2 s grad_x log p(y | x, sigma) with the labels reaching the
    classifier (as ADM guides its unconditional 256x256 model), and sampling runs."""
    exp = _exp(tiny, tiny_data, **{"guidance.type": "none", "guidance.label_dropout": 0.0,
                                   "model.class_cond": False})
    clf_c = tiny.config(tiny_data, **{"model.name": "classifier", "model.class_cond": False,
                                     "model.pool": "adaptive",
                                     "guidance.type": "none", "guidance.label_dropout": 0.0,
                                     "diffusion.loss": "simple",
                                     "diffusion.variance_type": "fixed_small"})
    clf = experiment.build(clf_c).task
    clf_params = _params(clf, 1)
    params = _params(exp.task)
    spec = generate.GuidanceSpec(name="classifier", fn=G.GUIDANCE["classifier"], static={},
                                 knobs={"scale": 5.0}, classifier=clf, mode="score")
    sampling = dataclasses.replace(exp.sampling, guidance=spec)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1)) * 3.0
    sigma, y = jnp.full((4,), 3.0), jnp.array([0, 1, 2, 3])
    plain = exp.task.denoiser(params)
    guided = generate.guided_denoiser(sampling, plain, sampling.knobs(), clf_params)

    def log_p(z):
        return clf.log_prob(clf_params, z, sigma, y).sum()

    want = plain(x, sigma, None) + 9.0 * 5.0 * jax.grad(log_p)(x)
    got = guided(x, sigma, y)
    assert float(jnp.abs(want - plain(x, sigma, None)).max()) > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    images, _ = generate.Generator(exp.task, sampling, mesh, clf_params)(
        params, 4, jax.random.PRNGKey(2), labels=np.array([0, 1, 2, 3]))
    assert images.shape == (4, 8, 8, 1) and np.all(np.isfinite(images))


def test_img2img_inpaint_and_invert(tiny, tiny_data, mesh):
    inputs = np.random.default_rng(0).uniform(-0.9, 0.9, (4, 8, 8, 1)).astype(np.float32)
    labels = np.array([0, 1, 2, 3], np.int32)
    base = {"guidance.type": "none", "guidance.label_dropout": 0.0}
    # img2img at strength 0 returns its inputs; at 1 it is sampling from noise.
    exp = _exp(tiny, tiny_data, **base, **{"condition.type": "img2img",
                                           "condition.strength": 0.0})
    params = _params(exp.task)
    same, _ = generate.Generator(exp.task, exp.sampling, mesh)(
        params, 4, jax.random.PRNGKey(0), labels=labels, inputs=inputs)
    np.testing.assert_array_equal(same, inputs)
    # inpaint pins the known half.
    exp = _exp(tiny, tiny_data, **base, **{"condition.type": "inpaint",
                                           "condition.mask": "left_half"})
    out, _ = generate.Generator(exp.task, exp.sampling, mesh)(
        params, 4, jax.random.PRNGKey(0), labels=labels, inputs=inputs)
    np.testing.assert_array_equal(out[..., :4, :], inputs[..., :4, :])
    assert np.abs(out[..., 4:, :] - inputs[..., 4:, :]).max() > 0.1
    # invert: the latents are ddim_invert of the DiT's denoiser.
    exp = _exp(tiny, tiny_data, **base, **{"condition.type": "invert"})
    generator = generate.Generator(exp.task, exp.sampling, mesh)
    latents = generator.latents(params, inputs, jax.random.PRNGKey(0), labels)
    want = conditional.ddim_invert(exp.task.denoiser(params), inputs,
                                   exp.sampling.sampler.sigmas, cond=jnp.asarray(labels))
    # float32 rounding of the same arithmetic in another order: relative to the latents'
    # largest magnitude (about 15 sigma_max here), as for the guided denoiser above.
    np.testing.assert_allclose(latents, want, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(want).max()))
