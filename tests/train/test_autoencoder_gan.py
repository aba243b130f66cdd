"""The adversarial term of AutoencoderTask (SD's PatchGAN, hinge loss, adaptive weight) and
its discriminator (diffjax.models.discriminator), on tiny models."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import configlib, experiment, parallel
from diffjax.models.autoencoder import AutoencoderKL
from diffjax.models.discriminator import PatchDiscriminator, patch_grid
from diffjax.tasks import AutoencoderTask
from diffjax.train import loop

SMALL = {"in_channels": 1, "out_channels": 1, "latent_channels": 2,
         "block_out_channels": (8, 16), "norm_num_groups": 4}
GAN = {"use_discriminator": True, "disc_layers": 1, "disc_channels": 8}
X = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
KEY = jax.random.PRNGKey(1)


@flax.struct.dataclass
class _State:
    step: jax.Array


def _tasks(disc_start: int = 3, disc_weight: float = 0.5):
    """(task with a discriminator from disc_start, the same autoencoder without one, params)."""
    common = {"image_shape": (8, 8, 1), "num_classes": 0, "schedule": None}
    gan = AutoencoderTask(model=AutoencoderKL(**SMALL, **GAN), disc_start=disc_start,
                          disc_weight=disc_weight, **common)
    plain = AutoencoderTask(model=AutoencoderKL(**SMALL), **common)
    return gan, plain, gan.init_params(jax.random.PRNGKey(0))


def _ae(params):
    return {k: v for k, v in params.items() if k != "discriminator"}


def _loss_and_grads(task, params, step):
    fn = jax.jit(jax.value_and_grad(task.loss_fn(), has_aux=True))
    (loss, (terms, _)), grads = fn(params, _State(jnp.int32(step)), {"image": X}, KEY)
    return loss, terms, grads


@pytest.mark.parametrize("size, n_layers", [(32, 1), (32, 2), (32, 3), (33, 2), (256, 3),
                                            (24, 3)])
def test_patch_logit_grid(size, n_layers):
    """floor(size / 2**n_layers) - 2 logits per side (30 for SD's 256x256, 3 layers)."""
    d = PatchDiscriminator(n_layers=n_layers, channels=4)
    x = jnp.zeros((2, size, size, 3))
    params = jax.eval_shape(d.init, jax.random.PRNGKey(0), x)
    out = jax.eval_shape(d.apply, params, x)
    assert out.shape == (2, patch_grid(size, n_layers), patch_grid(size, n_layers), 1)
    assert patch_grid(256, 3) == 30 and patch_grid(32, 3) == 2
    widths = [params["params"][f"conv_{n}"]["kernel"].shape[-1] for n in range(n_layers + 1)]
    assert widths == [4 * min(2**n, 8) for n in range(n_layers + 1)]


def test_patch_discriminator_is_pix2pix_layout():
    """SD's 3-layer, ndf=64 discriminator of RGB: 2,765,633 parameters as PyTorch's
    NLayerDiscriminator (BatchNorm's affine parameters; no bias before a norm)."""
    d = PatchDiscriminator()
    params = jax.eval_shape(d.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)) == 2_765_633
    with pytest.raises(ValueError, match="H, W >= 3 \\* 2\\*\\*n_layers"):
        d.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))


def test_params_gain_discriminator_only_when_on():
    """params["discriminator"] exists only with use_discriminator; the autoencoder's own
    parameters and its encode / decode are the same either way."""
    key, x = jax.random.PRNGKey(0), jnp.asarray(X)
    init = lambda model: jax.jit(  # noqa: E731
        model.init, compiler_options=parallel.init_compiler_options())(key, x)["params"]
    off, on = init(AutoencoderKL(**SMALL)), init(AutoencoderKL(**SMALL, **GAN))
    assert "discriminator" not in off and "discriminator" in on
    assert set(on["discriminator"]) == {"conv_0", "conv_1", "norm_1", "conv_out"}
    jax.tree.map(np.testing.assert_array_equal, _ae(on), off)
    encode = lambda model, p: jax.jit(  # noqa: E731
        lambda p: model.apply({"params": p}, x, method="encode")[0])(p)
    np.testing.assert_array_equal(encode(AutoencoderKL(**SMALL, **GAN), on),
                                  encode(AutoencoderKL(**SMALL), off))
    with pytest.raises(ValueError, match="use_discriminator=True"):
        AutoencoderKL(**SMALL).apply({"params": off}, x, method="discriminate")


def test_before_disc_start_is_the_plain_loss():
    """Steps before disc_start: loss, terms and autoencoder gradients exactly those without
    a discriminator, zero gradients into D, and zero GAN terms."""
    gan, plain, params = _tasks(disc_start=3)
    loss0, terms0, grads0 = _loss_and_grads(plain, _ae(params), 0)
    for step in (0, 2):
        loss, terms, grads = _loss_and_grads(gan, params, step)
        np.testing.assert_array_equal(loss, loss0)
        for name in ("loss", "recon", "kl"):
            np.testing.assert_array_equal(terms[name], terms0[name])
        for name in ("g_loss", "d_loss", "d_weight"):
            np.testing.assert_array_equal(terms[name], np.zeros(4))
        jax.tree.map(np.testing.assert_array_equal, _ae(grads), grads0)
        assert all(not np.any(g) for g in jax.tree.leaves(grads["discriminator"]))


def _reference(gan, params):
    """Independent pieces from jax.grad of each loss separately: (x_hat, d_weight, the
    hinge loss of D's params, the generator loss of the autoencoder's params)."""
    recon = jax.jit(gan.forward)(params, X, KEY)[0]
    kernel = params["decoder"]["conv_out"]["kernel"]

    def with_kernel(w):
        dec = {**params["decoder"], "conv_out": {**params["decoder"]["conv_out"], "kernel": w}}
        return gan.forward({**params, "decoder": dec}, X, KEY)[0]

    grad_rec = jax.jit(jax.grad(lambda w: jnp.mean(jnp.abs(with_kernel(w) - X))))(kernel)
    grad_g = jax.jit(jax.grad(
        lambda w: -jnp.mean(gan.discriminate(params, with_kernel(w)))))(kernel)
    ratio = np.linalg.norm(grad_rec) / (np.linalg.norm(grad_g) + 1e-4)
    d_weight = gan.disc_weight * np.clip(ratio, 0, 1e4)

    def hinge(d_params):
        p = {**params, "discriminator": d_params}
        return 0.5 * (jnp.mean(jax.nn.relu(1 - gan.discriminate(p, X)))
                      + jnp.mean(jax.nn.relu(1 + gan.discriminate(p, recon))))

    def generator(ae_params):
        p = {**ae_params, "discriminator": params["discriminator"]}
        return -jnp.mean(gan.discriminate(p, gan.forward(p, X, KEY)[0]))

    return recon, d_weight, hinge, generator


def test_adaptive_weight_and_terms_match_an_independent_computation():
    gan, _, params = _tasks(disc_start=3, disc_weight=0.7)
    _, terms, _ = _loss_and_grads(gan, params, 3)
    recon, d_weight, hinge, _ = _reference(gan, params)
    assert 0 < d_weight < 1e4
    np.testing.assert_allclose(terms["d_weight"], np.full(4, d_weight), rtol=1e-4)
    discriminate = jax.jit(gan.discriminate)
    fake = np.asarray(discriminate(params, recon))
    real = np.asarray(discriminate(params, X))
    np.testing.assert_allclose(terms["g_loss"], -fake.mean(axis=(1, 2, 3)), atol=1e-6)
    d = 0.5 * (np.maximum(1 - real, 0) + np.maximum(1 + fake, 0)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(terms["d_loss"], d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.mean(terms["d_loss"]),
                               jax.jit(hinge)(params["discriminator"]), rtol=1e-5)
    np.testing.assert_allclose(terms["loss"], terms["recon"] + 1e-6 * terms["kl"]
                               + terms["d_weight"] * terms["g_loss"] + terms["d_loss"],
                               rtol=1e-6)


def test_after_disc_start_gradients_go_where_they_belong():
    """From disc_start on: D's gradient is the hinge loss's alone (the generator term does
    not reach D); the autoencoder's is the plain one plus d_weight times the generator
    loss's (the hinge term does not reach the autoencoder)."""
    gan, plain, params = _tasks(disc_start=3)
    _, _, grads = _loss_and_grads(gan, params, 5)
    _, _, grads0 = _loss_and_grads(plain, _ae(params), 5)
    _, d_weight, hinge, generator = _reference(gan, params)
    d_grads = jax.jit(jax.grad(hinge))(params["discriminator"])
    # every leaf but conv_out's bias, whose hinge gradient is 0 while all |logits| < 1
    nonzero = {k: bool(np.any(g)) for k, g in jax.tree_util.tree_leaves_with_path(
        grads["discriminator"])}
    assert sum(nonzero.values()) == len(nonzero) - 1, nonzero
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 grads["discriminator"], d_grads)
    g_grads = jax.jit(jax.grad(generator))(_ae(params))
    expected = jax.tree.map(lambda a, b: a + d_weight * b, grads0, g_grads)
    differs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), _ae(grads), grads0)
    assert max(jax.tree.leaves(differs)) > 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
                 _ae(grads), expected)


def test_task_without_a_discriminator_model_is_refused():
    with pytest.raises(ValueError, match="use_discriminator=True"):
        AutoencoderTask(model=AutoencoderKL(**SMALL), image_shape=(8, 8, 1), num_classes=0,
                        schedule=None, disc_start=0).loss_fn()


AE = {"model.name": "autoencoder_kl", "model.class_cond": False, "guidance.type": "none",
      "guidance.label_dropout": 0.0, "model.autoencoder.block_out_channels": (8, 16),
      "model.autoencoder.layers_per_block": 1, "model.autoencoder.norm_num_groups": 4,
      "model.autoencoder.latent_channels": 2, "optim.warmup_steps": 0}


def test_trainer_steps_through_disc_start(tiny, tiny_data):
    """The config path: disc_start=2 adds params["discriminator"]; a few trainer steps on
    both sides of it stay finite and switch the GAN terms on at step 2."""
    c = tiny.config(tiny_data, **AE, **{"model.autoencoder.disc_start": 2,
                                        "model.autoencoder.disc_layers": 1,
                                        "model.autoencoder.disc_channels": 8})
    exp = experiment.build(c)
    assert "discriminator" in exp.task.abstract_params()
    assert "discriminator" not in experiment.build(tiny.config(tiny_data, **AE)) \
        .task.abstract_params()
    trainer = loop.Trainer(exp.task, exp.optim, exp.train, parallel.make_mesh(jax.devices()[:1]))
    state = trainer.new_state()
    batch = {"image": np.asarray(X[:1].repeat(8, 0)), "label": np.zeros(8, np.int32)}
    records = []
    for _ in range(4):
        state, metrics = trainer.train_step(state, batch)
        records.append({k: float(v) for k, v in metrics.items()})
    assert all(np.isfinite(list(r.values())).all() and r["nonfinite"] == 0 for r in records)
    assert [r["d_loss"] > 0 for r in records] == [False, False, True, True]
    assert records[3]["d_weight"] > 0


@pytest.mark.parametrize("overrides, match", [
    ({"model.autoencoder.disc_start": -2}, "disc_start=-2 must be a step >= 0"),
    ({"model.autoencoder.disc_start": 0, "model.autoencoder.disc_layers": 2},
     "disc_layers=2 leaves no patch of data.image_size=8"),
    ({"model.autoencoder.disc_start": 0, "model.autoencoder.disc_weight": -1.0},
     "disc_weight=-1.0 must be >= 0"),
])
def test_config_errors(tiny, tiny_data, overrides, match):
    with pytest.raises(configlib.ConfigError, match=match) as err:
        experiment.build(tiny.config(tiny_data, **AE, **overrides))
    assert "\n" not in str(err.value)
