"""The PatchGAN discriminator of Stable Diffusion's autoencoder training, Flax Linen, NHWC.

pix2pix's ``NLayerDiscriminator`` (Isola et al. 2017), which taming-transformers and
CompVis/latent-diffusion use in ``LPIPSWithDiscriminator``: it scores overlapping patches
of an image, one logit per patch. Every conv is 4x4 with zero padding 1 on each side (as
PyTorch's ``padding=1``), every activation LeakyReLU(0.2):

- ``conv_0``: stride 2 to ``channels`` (with bias), LeakyReLU;
- ``conv_n`` for n = 1 .. n_layers - 1: stride 2 to ``channels * min(2**n, 8)`` (no bias),
  ``norm_n``, LeakyReLU;
- ``conv_{n_layers}``: stride 1 to ``channels * min(2**n_layers, 8)`` (no bias),
  ``norm_{n_layers}``, LeakyReLU;
- ``conv_out``: stride 1 to 1 channel (with bias): the patch logits.

x: [B, H, W, C] -> logits [B, P, Q, 1] with P = floor(H / 2**n_layers) - 2 (each stride-2
conv maps s -> floor(s / 2), each stride-1 conv s -> s - 1): 30 for SD's 256x256 and 3
layers, 2 for 32x32.

Normalisation: SD uses BatchNorm, and only ever calls the discriminator in training mode
(its running statistics serve nothing but validation logs). ``BatchStatNorm`` is that
training-mode computation without the running statistics: each call normalises every
channel by the mean and (biased) variance over the batch and positions of *its own input*
(eps 1e-5, as PyTorch), then a learned scale and bias. Nothing is kept between calls, so the
parameters stay one pure tree; logits of one example depend on the rest of its batch, as in
SD, which calls D separately on the real and on the reconstructed batch.

Initialisation is taming's ``weights_init``: conv kernels N(0, 0.02), norm scales
N(1, 0.02), biases 0 (taming leaves conv biases at PyTorch's default; zeros here).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models import layers

Array = jax.Array
Dtype = Any

LEAKY_SLOPE = 0.2
NORM_EPS = 1e-5


def patch_grid(size: int, n_layers: int) -> int:
    """Side of the logit grid for an input side ``size``: floor(size / 2**n_layers) - 2."""
    return size // 2**n_layers - 2


def _scale_init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class BatchStatNorm(layers.ReadsParams):
    """x: [B, H, W, C] -> same; per channel, (x - mean) / sqrt(var + eps) * scale + bias with
    mean and var over (B, H, W) of this x (BatchNorm in training mode, no running stats),
    computed in float32 and cast back to x.dtype."""

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", _scale_init, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(h - mean), axis=(0, 1, 2))
        h = (h - mean) * jax.lax.rsqrt(var + NORM_EPS)
        return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class PatchDiscriminator(nn.Module):
    """x: [B, H, W, C] in [-1, 1] -> patch logits [B, P, P', 1] float32 (module docstring).

    n_layers: the stride-2 convs (pix2pix's n_layers, SD's 3); channels: the first conv's
    width (pix2pix's ndf, SD's 64).
    """

    n_layers: int = 3
    channels: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _conv(self, features: int, stride: int, use_bias: bool, name: str) -> nn.Module:
        return layers.FlaxConv(features, (4, 4), strides=(stride, stride),
                               padding=((1, 1), (1, 1)), use_bias=use_bias, dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               kernel_init=nn.initializers.normal(0.02), name=name)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.n_layers < 1 or self.channels < 1:
            raise ValueError(f"PatchDiscriminator needs n_layers >= 1 (got {self.n_layers}) "
                             f"and channels >= 1 (got {self.channels})")
        if x.ndim != 4 or min(patch_grid(s, self.n_layers) for s in x.shape[1:3]) < 1:
            raise ValueError(f"PatchDiscriminator(n_layers={self.n_layers}) needs [B, H, W, C] "
                             f"with H, W >= 3 * 2**n_layers; got shape {x.shape}")
        h = self._conv(self.channels, 2, True, "conv_0")(x.astype(self.dtype))
        h = nn.leaky_relu(h, LEAKY_SLOPE)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = self._conv(self.channels * min(2**n, 8), stride, False, f"conv_{n}")(h)
            h = BatchStatNorm(self.param_dtype, name=f"norm_{n}")(h)
            h = nn.leaky_relu(h, LEAKY_SLOPE)
        return self._conv(1, 1, True, "conv_out")(h).astype(jnp.float32)
