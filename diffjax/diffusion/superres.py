"""Low-resolution conditioning of a super-resolution model (ADM upsampler, cascaded diffusion).

The model is a UNet called with ``low_res=`` (upsampled inside the UNet and concatenated to
x on channels, as ADM's SuperResModel). The low-resolution input is the training image
downsampled by a box (area) filter; with noise-conditioning augmentation (Ho et al. 2021,
"Cascaded Diffusion Models") it is first noised by the forward process at an augmentation
level s in [0, 1], drawn s ~ U[0, aug_max] per example at training and fixed at sampling,
and s reaches the model through ``aug_level`` (UNet ``aug_embed=True``).

Augmentation level s -> noise: position u = s * T on the diffusion's own table extended by
a clean entry, abar(u) linearly interpolated over [1, abar_0, ..., abar_{T-1}] (s = 0 is
clean, s = 1 is the last timestep); low_aug = sqrt(abar) low + sqrt(1 - abar) n. The model's
``aug_level`` input is u (the same scale as its timestep input).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion import process
from diffjax.diffusion.schedules import DiscreteSchedule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SuperRes:
    """low_res_size: side of the low-resolution input; aug_max: largest training augmentation
    level (0 = no augmentation and no ``aug_level`` input); aug_sample: the sampling level."""

    low_res_size: int
    aug_max: float = 0.0
    aug_sample: float = 0.0

    @property
    def augments(self) -> bool:
        return self.aug_max > 0


def downsample(images: Array, size: int) -> Array:
    """Box-filter (area) downsampling [B, H, W, C] -> [B, size, size, C]; H, W multiples of size."""
    b, h, w, c = images.shape
    if h % size or w % size:
        raise ValueError(f"cannot box-downsample {h}x{w} images to {size}x{size}: the size must "
                         "divide the image size; set condition.low_res_size to a divisor")
    return images.reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))


def aug_coefficients(ds: DiscreteSchedule, level: Array) -> tuple[Array, Array, Array]:
    """(sqrt(abar), sqrt(1 - abar), u) at augmentation levels level: [B] in [0, 1]."""
    table = jnp.asarray(np.concatenate([[1.0], ds.alphas_cumprod]), jnp.float32)
    u = jnp.clip(jnp.asarray(level, jnp.float32), 0.0, 1.0) * ds.num_timesteps
    lo = jnp.minimum(jnp.floor(u).astype(jnp.int32), ds.num_timesteps - 1)
    frac = u - lo
    abar = table[lo] * (1 - frac) + table[lo + 1] * frac
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar), u


def augment(low: Array, key: Array, ds: DiscreteSchedule, level: Array) -> tuple[Array, Array]:
    """Noise-conditioning augmentation: (low_aug [B, h, w, C], aug_level input u [B])."""
    a, s, u = aug_coefficients(ds, level)
    noise = jax.random.normal(key, low.shape, low.dtype)
    return process.q_sample(low, noise, a, s), u


def train_conditioning(sr: SuperRes, images: Array, key: Array,
                       ds: DiscreteSchedule) -> dict[str, Array]:
    """Model keyword inputs for a training batch: {"low_res"} (+ {"aug_level"} with
    augmentation, s ~ U[0, aug_max] per example)."""
    low = downsample(images, sr.low_res_size)
    if not sr.augments:
        return {"low_res": low}
    k_level, k_noise = jax.random.split(key)
    level = jax.random.uniform(k_level, (images.shape[0],), jnp.float32, 0.0, sr.aug_max)
    low_aug, u = augment(low, k_noise, ds, level)
    return {"low_res": low_aug, "aug_level": u}


def sample_conditioning(sr: SuperRes, low: Array, key: Array,
                        ds: DiscreteSchedule) -> dict[str, Array]:
    """Model keyword inputs at sampling from low-resolution images low: [B, h, w, C] in
    [-1, 1], augmented at the fixed level ``aug_sample``."""
    if low.shape[1:3] != (sr.low_res_size, sr.low_res_size):
        raise ValueError(f"low-resolution inputs are {low.shape[1]}x{low.shape[2]}, the model "
                         f"expects {sr.low_res_size}x{sr.low_res_size}")
    if not sr.augments:
        return {"low_res": low}
    level = jnp.full((low.shape[0],), sr.aug_sample, jnp.float32)
    low_aug, u = augment(low, key, ds, level)
    return {"low_res": low_aug, "aug_level": u}
