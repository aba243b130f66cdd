"""Stable Diffusion's KL autoencoder (``AutoencoderKL``), Flax Linen, NHWC.

The first-stage model of latent diffusion (Rombach et al. 2022, CompVis/latent-diffusion's
``AutoencoderKL``; diffusers' ``AutoencoderKL`` with ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` blocks). Option names are diffusers', so a diffusers ``config.json``
transcribes one to one:

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                  block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  norm_num_groups=32)        # sd-vae-ft-mse / SD 1.x-2.x: 83,653,863 params

Dimension letters: B batch, H/W image height/width, h/w latent height/width
(H / 2**(len(block_out_channels) - 1)), C channels, L = h*w tokens.

Architecture (every GroupNorm has eps 1e-6 and runs in float32; every conv is 3x3 unless
said otherwise; ResBlock = GN, SiLU, conv, GN, SiLU, conv, plus x, through a 1x1 conv when
the channel count changes; no time embedding):
- encoder: ``conv_in``; per level i, ``layers_per_block`` ResBlocks to
  ``block_out_channels[i]`` channels, then (except the last level) a stride-2 conv after
  zero padding (0, 1) on H and W (SD's asymmetric padding, not a symmetric 1); middle block
  ResBlock, single-head self-attention over the h*w positions (GN, q/k/v/out projections,
  softmax(q k^T / sqrt(C)) in float32, residual), ResBlock; GN, SiLU, ``conv_out`` to
  2 * latent_channels (mean | log-variance); then ``quant_conv`` (1x1).
- decoder: ``post_quant_conv`` (1x1); ``conv_in``; middle block; levels in reverse
  (``up_0`` is the deepest, diffusers' ``up_blocks.0`` = CompVis's ``up.{n-1}``), each
  ``layers_per_block + 1`` ResBlocks, then (except the last) nearest-neighbour 2x
  upsampling and a conv; GN, SiLU, ``conv_out``.

The posterior is CompVis's ``DiagonalGaussianDistribution``: the log-variance is clipped to
[-30, 20] and a sample is ``mean + exp(logvar / 2) * n``, n ~ N(0, I).

Latent scale: SD's latent diffusion models see ``z * 0.18215`` (diffusers'
``scaling_factor``; SDXL's VAE uses 0.13025), and divide by it before decoding. This module
does not scale; the latent-diffusion task does.

Precision: ``dtype=jnp.bfloat16`` computes convolutions, projections and the attention's
inputs in bfloat16; GroupNorm statistics and the softmax stay in float32; ``encode`` returns
float32 (mean, logvar) and ``decode`` a float32 image. ``param_dtype`` is the storage
dtype of the parameters. ``remat=True`` rematerialises every ResBlock and attention block
(same parameters and outputs, less activation memory). ``norm_num_groups`` changes no
shape: transcribe it from the released config (32 for SD).

Adversarial training: ``use_discriminator=True`` adds SD's PatchGAN
(``discriminator.PatchDiscriminator(disc_layers, disc_channels)``) as the submodule
``discriminator``, so the parameters gain ``params["discriminator"]``; ``init`` creates it,
``discriminate`` applies it, and ``encode`` / ``decode`` / ``__call__``'s outputs never touch
it. Off (the default), the parameters are exactly SD's (what the converter reads).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models import layers
from diffjax.models.discriminator import PatchDiscriminator

Array = jax.Array
Dtype = Any

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
SD_SCALING_FACTOR = 0.18215  # SD 1.x/2.x latents: z * 0.18215 before the diffusion model


def group_norm(x: Array, groups: int, name: str, param_dtype: Dtype) -> Array:
    """GroupNorm(groups, eps=1e-6) in float32, cast back to x.dtype (SD's VAE normalisation).

    Must be called inside a compact method; creates a submodule called `name`.
    """
    return layers.group_norm(x, groups, name, param_dtype, eps=1e-6, fast_variance=False,
                             option="norm_num_groups")


class ResnetBlock(nn.Module):
    """x: [B, H, W, C] -> [B, H, W, out_channels].

    out = shortcut(x) + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), shortcut = identity or 1x1 conv.
    """

    out_channels: int
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cpu_fast_conv: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(layers.Conv, self.out_channels, dtype=self.dtype,
                                 param_dtype=self.param_dtype, cpu_fast_conv=self.cpu_fast_conv)
        h = nn.silu(group_norm(x, self.norm_num_groups, "norm1", self.param_dtype))
        h = conv(name="conv1")(h)
        h = nn.silu(group_norm(h, self.norm_num_groups, "norm2", self.param_dtype))
        h = conv(name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(kernel_size=1, name="shortcut")(x)
        return x.astype(h.dtype) + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions with a residual: [B,H,W,C] -> same."""

    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hh, ww, c = x.shape
        dense = functools.partial(layers.Dense, c, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=layers.torch_default_init)
        h = group_norm(x, self.norm_num_groups, "norm", self.param_dtype).reshape(b, hh * ww, 1, c)
        q, k, v = (dense(name=n)(h) for n in ("q", "k", "v"))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits / jnp.sqrt(jnp.float32(c)), axis=-1)
        a = jnp.einsum("bhqk,bkhc->bqhc", weights.astype(v.dtype), v)
        a = dense(name="proj_out")(a.reshape(b, hh * ww, c))
        return x.astype(a.dtype) + a.reshape(b, hh, ww, c)


class _Blocks(nn.Module):
    """Options shared by Encoder and Decoder, and their ResBlock / attention constructors."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    cpu_fast_conv: str = "auto"

    def _conv(self, features: int, name: str, kernel_size: int = 3) -> nn.Module:
        return layers.Conv(features, kernel_size, dtype=self.dtype, param_dtype=self.param_dtype,
                           cpu_fast_conv=self.cpu_fast_conv, name=name)

    def _res(self, out_channels: int, name: str) -> nn.Module:
        cls = nn.remat(ResnetBlock) if self.remat else ResnetBlock
        return cls(out_channels, self.norm_num_groups, self.dtype, self.param_dtype,
                   self.cpu_fast_conv, name=name)

    def _mid(self, h: Array) -> Array:
        """Middle block (names mid_res_0, mid_attn, mid_res_1); keeps the shape of h."""
        c = h.shape[-1]
        h = self._res(c, "mid_res_0")(h)
        cls = nn.remat(Attention) if self.remat else Attention
        h = cls(self.norm_num_groups, self.dtype, self.param_dtype, name="mid_attn")(h)
        return self._res(c, "mid_res_1")(h)

    def _out(self, h: Array, features: int) -> Array:
        """norm_out, SiLU, conv_out."""
        h = nn.silu(group_norm(h, self.norm_num_groups, "norm_out", self.param_dtype))
        return self._conv(features, "conv_out")(h)


class Encoder(_Blocks):
    """x: [B, H, W, C_in] -> [B, h, w, 2 * latent_channels] (before quant_conv).

    Names: conv_in, down_{i}_res_{j}, down_{i}_downsample, mid_*, norm_out, conv_out.
    """

    latent_channels: int = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = self._conv(self.block_out_channels[0], "conv_in")(x.astype(self.dtype))
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(self.block_out_channels):
            for j in range(self.layers_per_block):
                h = self._res(ch, f"down_{i}_res_{j}")(h)
            if i != last:
                h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                h = layers.FlaxConv(ch, (3, 3), strides=(2, 2), padding="VALID",
                                    dtype=self.dtype, param_dtype=self.param_dtype,
                                    kernel_init=layers.torch_default_init,
                                    name=f"down_{i}_downsample")(h)
        return self._out(self._mid(h), 2 * self.latent_channels)


class Decoder(_Blocks):
    """z: [B, h, w, latent_channels] (after post_quant_conv) -> [B, H, W, out_channels].

    Names: conv_in, mid_*, up_{i}_res_{j}, up_{i}_upsample (i = 0 deepest), norm_out, conv_out.
    Sows conv_out's input [B, H, W, block_out_channels[0]] as ``conv_out_input`` in the
    "intermediates" collection (kept only when that collection is mutable).
    """

    out_channels: int = 3

    @nn.compact
    def __call__(self, z: Array) -> Array:
        channels = tuple(reversed(self.block_out_channels))
        h = self._mid(self._conv(channels[0], "conv_in")(z.astype(self.dtype)))
        for i, ch in enumerate(channels):
            for j in range(self.layers_per_block + 1):
                h = self._res(ch, f"up_{i}_res_{j}")(h)
            if i != len(channels) - 1:
                h = self._conv(ch, f"up_{i}_upsample")(layers.upsample_nearest(h))
        h = nn.silu(group_norm(h, self.norm_num_groups, "norm_out", self.param_dtype))
        self.sow("intermediates", "conv_out_input", h)  # the GAN's adaptive weight reads it
        return self._conv(self.out_channels, "conv_out")(h)


def posterior_sample(mean: Array, logvar: Array, key: Array) -> Array:
    """z = mean + exp(logvar / 2) * n, n ~ N(0, I); mean, logvar: [B, h, w, C] -> [B, h, w, C]."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(mean: Array, logvar: Array) -> Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over h, w, C: [B, h, w, C] -> [B] (CompVis)."""
    return 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """SD's KL-regularised autoencoder: x [B, H, W, C] in [-1, 1] <-> latents [B, h, w, C_lat].

    ``module.init(key, x)`` creates the parameters {encoder, quant_conv, post_quant_conv,
    decoder} (and discriminator if ``use_discriminator``); call ``encode`` / ``decode``
    with ``module.apply(variables, x, method="encode")``.
    Defaults are diffusers' (a one-level toy); SD's VAE is in the module docstring.
    ``cpu_fast_conv`` is ``layers.Conv``'s (CPU-only weight-gradient path); the asymmetric
    stride-2 convs always run the native convolution.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    cpu_fast_conv: str = "auto"
    use_discriminator: bool = False  # SD's PatchGAN as the submodule "discriminator"
    disc_layers: int = 3
    disc_channels: int = 64

    def setup(self) -> None:
        if not self.block_out_channels or self.layers_per_block < 1:
            raise ValueError(f"AutoencoderKL needs block_out_channels (got "
                             f"{self.block_out_channels}) and layers_per_block >= 1 (got "
                             f"{self.layers_per_block})")
        shared = {"block_out_channels": tuple(self.block_out_channels),
                  "layers_per_block": self.layers_per_block,
                  "norm_num_groups": self.norm_num_groups, "dtype": self.dtype,
                  "param_dtype": self.param_dtype, "remat": self.remat,
                  "cpu_fast_conv": self.cpu_fast_conv}
        conv = functools.partial(layers.Conv, kernel_size=1, dtype=self.dtype,
                                 param_dtype=self.param_dtype, cpu_fast_conv=self.cpu_fast_conv)
        self.encoder = Encoder(latent_channels=self.latent_channels, **shared)
        self.quant_conv = conv(2 * self.latent_channels)
        self.post_quant_conv = conv(self.latent_channels)
        self.decoder = Decoder(out_channels=self.out_channels, **shared)
        if self.use_discriminator:
            self.discriminator = PatchDiscriminator(self.disc_layers, self.disc_channels,
                                                    self.dtype, self.param_dtype)

    @property
    def downsampling_factor(self) -> int:
        """H / h: 2 ** (len(block_out_channels) - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def _check(self, x: Array, channels: int, what: str, factor: int) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL.{what} expects [B, H, W, {channels}] (NHWC), "
                             f"got shape {x.shape}")
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"AutoencoderKL.{what}: size {x.shape[1]}x{x.shape[2]} must be "
                             f"divisible by 2**(len(block_out_channels)-1) = {factor}")

    def encode(self, x: Array) -> tuple[Array, Array]:
        """x: [B, H, W, in_channels] -> (mean, logvar), each [B, h, w, latent_channels] float32;
        logvar clipped to [-30, 20]."""
        self._check(x, self.in_channels, "encode", self.downsampling_factor)
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: Array) -> Array:
        """z: [B, h, w, latent_channels] (unscaled latents) -> [B, H, W, out_channels] float32."""
        self._check(z, self.latent_channels, "decode", 1)
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def discriminate(self, x: Array) -> Array:
        """x: [B, H, W, out_channels] -> PatchGAN logits [B, P, Q, 1] float32 (needs
        ``use_discriminator``)."""
        if not self.use_discriminator:
            raise ValueError("AutoencoderKL.discriminate needs use_discriminator=True")
        return self.discriminator(x)

    def __call__(self, x: Array, key: Array | None = None,
                 sample_posterior: bool = False) -> tuple[Array, Array, Array]:
        """x: [B, H, W, in_channels] -> (reconstruction [B, H, W, out_channels], mean, logvar).

        Decodes a posterior sample (needs ``key``) if sample_posterior, else the mean.
        """
        mean, logvar = self.encode(x)
        if sample_posterior:
            if key is None:
                raise ValueError("AutoencoderKL(x, sample_posterior=True) needs a PRNG key=")
            z = posterior_sample(mean, logvar, key)
        else:
            z = mean
        recon = self.decode(z)
        if self.use_discriminator and self.is_initializing():
            self.discriminator(recon)  # creates params["discriminator"]; output unused
        return recon, mean, logvar
