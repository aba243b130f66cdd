"""diffjax.models.autoencoder: SD's AutoencoderKL (numerical parity with diffusers lives in
tests/convert/test_autoencoder_kl.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import autoencoder, layers
from diffjax.models.autoencoder import AutoencoderKL

SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
          "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
          "norm_num_groups": 32}
TINY = {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4}


# ----------------------------------------------------------------------------- sizes


def _closed_form(in_channels, out_channels, latent_channels, block_out_channels,
                 layers_per_block, **_) -> tuple[int, int]:
    """(encoder + quant_conv, decoder + post_quant_conv) parameter counts, by hand."""
    def conv(i, o, k=3):
        return k * k * i * o + o

    def norm(c):
        return 2 * c

    def res(i, o):
        return norm(i) + conv(i, o) + norm(o) + conv(o, o) + (conv(i, o, 1) if i != o else 0)

    def mid(c):
        return 2 * res(c, c) + norm(c) + 4 * (c * c + c)

    chans, z, last = list(block_out_channels), latent_channels, block_out_channels[-1]
    enc, prev = conv(in_channels, chans[0]), chans[0]
    for i, ch in enumerate(chans):
        enc += res(prev, ch) + (layers_per_block - 1) * res(ch, ch)
        enc += conv(ch, ch) if i < len(chans) - 1 else 0
        prev = ch
    enc += mid(last) + norm(last) + conv(last, 2 * z) + conv(2 * z, 2 * z, 1)
    dec, prev = conv(z, last) + mid(last) + conv(z, z, 1), last
    for i, ch in enumerate(reversed(chans)):
        dec += res(prev, ch) + layers_per_block * res(ch, ch)
        dec += conv(ch, ch) if i < len(chans) - 1 else 0
        prev = ch
    dec += norm(chans[0]) + conv(chans[0], out_channels)
    return enc, dec


def _abstract(module: AutoencoderKL) -> dict:
    f = module.downsampling_factor
    x = jax.ShapeDtypeStruct((1, f, f, module.in_channels), jnp.float32)
    return jax.eval_shape(lambda x_: module.init(jax.random.key(0), x_), x)["params"]


def _halves(params) -> tuple[int, int]:
    enc = layers.num_params(params["encoder"]) + layers.num_params(params["quant_conv"])
    dec = layers.num_params(params["decoder"]) + layers.num_params(params["post_quant_conv"])
    return enc, dec


def test_sd_vae_has_83_653_863_parameters():
    params = _abstract(AutoencoderKL(**SD_VAE))
    assert layers.num_params(params) == 83_653_863
    assert _halves(params) == (34_163_664, 49_490_199)
    assert _closed_form(**SD_VAE) == (34_163_664, 49_490_199)


@pytest.mark.parametrize("config", [
    {"in_channels": 1, "out_channels": 2, "latent_channels": 8,
     "block_out_channels": (16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8},
    {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (32,),
     "layers_per_block": 3, "norm_num_groups": 16},
    {"in_channels": 4, "out_channels": 3, "latent_channels": 4,
     "block_out_channels": (64, 32, 48), "layers_per_block": 2, "norm_num_groups": 16},
])
def test_parameter_counts_match_the_closed_form(config):
    assert _halves(_abstract(AutoencoderKL(**config))) == _closed_form(**config)


# ----------------------------------------------------------------------------- behaviour


@pytest.fixture(scope="module")
def tiny():
    """(module, params, x [2, 8, 8, 3])."""
    module = AutoencoderKL(**TINY)
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
    return module, module.init(jax.random.key(0), x)["params"], x


def test_shapes(tiny):
    module, params, x = tiny
    mean, logvar = module.apply({"params": params}, x, method="encode")
    assert mean.shape == logvar.shape == (2, 4, 4, 4)
    assert mean.dtype == logvar.dtype == jnp.float32
    image = module.apply({"params": params}, mean, method="decode")
    assert image.shape == (2, 8, 8, 3) and image.dtype == jnp.float32
    recon, mean2, _ = module.apply({"params": params}, x)
    np.testing.assert_allclose(recon, image, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(mean2, mean)
    assert set(params) == {"encoder", "quant_conv", "post_quant_conv", "decoder"}
    assert "up_0_upsample" in params["decoder"] and "down_0_downsample" in params["encoder"]


@pytest.mark.parametrize("bias, want", [(100.0, 20.0), (-100.0, -30.0)])
def test_logvar_is_clipped(tiny, bias, want):
    module, params, x = tiny
    quant = {"kernel": jnp.zeros_like(params["quant_conv"]["kernel"]),
             "bias": jnp.concatenate([jnp.arange(4.0), jnp.full((4,), bias)])}
    mean, logvar = module.apply({"params": dict(params, quant_conv=quant)}, x, method="encode")
    np.testing.assert_array_equal(logvar, want)
    np.testing.assert_array_equal(mean, jnp.broadcast_to(jnp.arange(4.0), mean.shape))


def test_posterior_sample_uses_the_key(tiny):
    module, params, x = tiny
    variables = {"params": params}
    k1, k2 = jax.random.key(7), jax.random.key(8)
    a, mean, logvar = module.apply(variables, x, k1, sample_posterior=True)
    b, _, _ = module.apply(variables, x, k1, sample_posterior=True)
    c, _, _ = module.apply(variables, x, k2, sample_posterior=True)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k1, mean.shape)
    np.testing.assert_allclose(autoencoder.posterior_sample(mean, logvar, k1), z, rtol=1e-6)
    np.testing.assert_allclose(a, module.apply(variables, z, method="decode"), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        module.apply(variables, x, sample_posterior=True)


def test_kl_divergence_matches_the_gaussian_formula():
    mean = jnp.array([[[[0.5, -1.0]]]])
    logvar = jnp.array([[[[0.0, np.log(2.0)]]]])
    want = 0.5 * (0.25 + 1 - 1 - 0) + 0.5 * (1 + 2 - 1 - np.log(2.0))
    np.testing.assert_allclose(autoencoder.kl_divergence(mean, logvar), [want], rtol=1e-6)


def test_bfloat16_compute_stays_close(tiny):
    module, params, x = tiny
    bf16 = AutoencoderKL(**TINY, dtype=jnp.bfloat16)
    variables = {"params": params}
    want = module.apply(variables, x, method="encode")
    got = bf16.apply(variables, x, method="encode")
    want += (module.apply(variables, want[0], method="decode"),)
    got += (bf16.apply(variables, want[0], method="decode"),)
    for g, w in zip(got, want):  # measured: 2.5e-2, 1.9e-2, 2.8e-2 (random weights)
        assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) < 6e-2


def test_remat_changes_nothing(tiny):
    module, params, x = tiny
    remat = AutoencoderKL(**TINY, remat=True)
    assert jax.tree.structure(_abstract(remat)) == jax.tree.structure(params)
    for g, w in zip(remat.apply({"params": params}, x), module.apply({"params": params}, x)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, method, match", [
    ((2, 3, 8, 8), "encode", r"\[B, H, W, 3\] \(NHWC\)"),
    ((2, 7, 8, 3), "encode", "divisible by 2\\*\\*\\(len\\(block_out_channels\\)-1\\) = 2"),
    ((8, 8, 3), "encode", "NHWC"),
    ((2, 4, 4, 3), "decode", r"\[B, H, W, 4\]"),
])
def test_bad_shapes_are_one_line_errors(tiny, shape, method, match):
    module, params, _ = tiny
    with pytest.raises(ValueError, match=match) as e:
        module.apply({"params": params}, jnp.zeros(shape), method=method)
    assert "\n" not in str(e.value)
