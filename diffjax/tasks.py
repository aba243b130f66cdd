"""What is trained: one small interface, one class per kind of model.

A :class:`Task` says how to initialise its network (from the shapes of one example), how to
apply it, what it optimises, and what sampling and evaluation mean for it. The Experiment
picks one (:func:`diffjax.experiment.build`, its table ``TASKS``); the trainer, generation
and the app tier call the interface and never ask which task they hold.

- :class:`DiffusionTask`: a denoising network (eps / x0 / v prediction, optionally learned
  variance and class labels); sampled through its denoiser, evaluated on its samples.
- :class:`SuperResTask`: a diffusion task whose network also sees a low-resolution image
  (ADM's upsampler, cascaded diffusion's noise-conditioning augmentation).
- :class:`ClassifierTask`: a classifier of x_t (noise-aware, for classifier guidance) or of
  clean images (a domain feature network); evaluated by its accuracy.
- :class:`AutoencoderTask`: a KL autoencoder (latent diffusion's first stage); evaluated by
  its reconstructions.

Shapes: x [B, H, W, C] float32 in [-1, 1]; t [B] float (the network's time input); y [B]
int32 labels (num_classes = the null label of classifier-free guidance).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.diffusion import process
from diffjax.diffusion import superres as superres_lib
from diffjax.diffusion.schedules import DiscreteSchedule
from diffjax.models.autoencoder import kl_divergence as autoencoder_kl_divergence
from diffjax.train import step as step_lib
from diffjax.train.step import LossSpec

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task(abc.ABC):
    """The common part: the network, the geometry of one example and the labels.

    Subclasses set ``draws_samples`` (whether the network generates images: training grids,
    ``--mode sample``, sample metrics) and ``needs_inputs`` (sampling needs an input image
    per sample, e.g. a low-resolution one), and implement ``init_inputs``, ``apply`` and
    ``loss_fn``.
    """

    model: nn.Module
    image_shape: tuple[int, int, int]
    num_classes: int  # labels of the data (0 = unlabelled)
    schedule: DiscreteSchedule
    # The network sees time input t * time_scale (improved-diffusion's rescale_timesteps:
    # 1000 / T); 1 = the timestep index itself.
    time_scale: float = 1.0

    def _time(self, t: Array) -> Array:
        return t if self.time_scale == 1.0 else t * self.time_scale

    draws_samples = False
    needs_inputs = False
    reconstructs = False  # an autoencoder: its grids show inputs and reconstructions
    timestep_sampler = "uniform"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one conditioning input image at sampling (img2img / inpaint: the image)."""
        return self.image_shape

    def init_params(self, key: Array) -> Any:
        """``key -> params`` from a one-example dummy batch."""
        args, kwargs = self.init_inputs()
        return self.model.init(key, *args, train=False, **kwargs)["params"]

    def abstract_params(self) -> Any:
        """Shapes and dtypes of the parameters (``jax.eval_shape``, nothing allocated)."""
        return jax.eval_shape(self.init_params, jax.random.PRNGKey(0))

    @abc.abstractmethod
    def init_inputs(self, batch: int = 1) -> tuple[tuple, dict[str, Array]]:
        """(positional, keyword) zero inputs of the network for ``batch`` examples."""

    @abc.abstractmethod
    def apply(self, params, x, t, y, train: bool, rngs=None, **inputs) -> Array:
        """The network's output for x [B, H, W, C], time input t [B], labels y [B]."""

    @abc.abstractmethod
    def loss_fn(self) -> Callable[..., Any]:
        """``loss_fn(params, state, batch, key) -> (loss, (terms, t))`` of the train step."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionTask(Task):
    """A denoising network on the T-step table ``schedule``.

    class_cond: the network takes labels; loss: what the step optimises (prediction, loss,
    variance, weighting, label dropout); learned_variance: the network's output has 2C
    channels (iDDPM).
    """

    class_cond: bool = False
    loss: LossSpec = LossSpec()
    learned_variance: bool = False

    draws_samples = True

    @property
    def timestep_sampler(self) -> str:  # type: ignore[override]
        return self.loss.timestep_sampler

    @property
    def prediction(self) -> str:
        return self.loss.prediction

    def init_inputs(self, batch: int = 1):
        x = jnp.zeros((batch, *self.image_shape))
        y = jnp.zeros((batch,), jnp.int32) if self.class_cond else None
        return (x, jnp.zeros((batch,)), y), self.extra_inputs_like(batch)

    def extra_inputs_like(self, batch: int) -> dict[str, Array]:
        """Zero values of the network's inputs beyond (x, t, y), for init and shape checks."""
        return {}

    def apply(self, params, x, t, y, train, rngs=None, **inputs):
        return self.model.apply({"params": params}, x, self._time(t),
                                y if self.class_cond else None, train=train, rngs=rngs, **inputs)

    def train_inputs(self) -> Callable[[Array, Array], dict[str, Array]] | None:
        """``(x0, key) -> extra network inputs`` of a training batch, or None."""
        return None

    def sampling_inputs(self, inputs: Array, key: Array) -> dict[str, Array]:
        """Extra network inputs at sampling from the per-sample input images."""
        return {}

    def loss_fn(self):
        return step_lib.make_diffusion_loss(self.apply, self.schedule, self.loss,
                                            self.train_inputs())

    def denoiser(self, params, with_variance: bool = False, **inputs):
        """``denoise(x, sigma, cond) -> x0_hat`` (VE) of the network with ``params``;
        ``with_variance``: ``-> (x0_hat, frac)`` of a learned-variance network (ddpm)."""

        def model_fn(x_in, c_noise, cond):
            return self.apply(params, x_in, c_noise, cond, False, **inputs)

        if with_variance:
            return process.make_denoiser_with_variance(model_fn, self.schedule,
                                                       prediction=self.prediction)
        return process.make_denoiser(model_fn, self.schedule, prediction=self.prediction,
                                     learned_variance=self.learned_variance)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuperResTask(DiffusionTask):
    """A diffusion task conditioned on a low-resolution image (``superres.SuperRes``)."""

    superres: superres_lib.SuperRes

    draws_samples = True
    needs_inputs = True

    @property
    def input_shape(self) -> tuple[int, int, int]:
        s = self.superres.low_res_size
        return (s, s, self.image_shape[-1])

    def extra_inputs_like(self, batch: int) -> dict[str, Array]:
        out = {"low_res": jnp.zeros((batch, *self.input_shape))}
        if self.superres.augments:
            out["aug_level"] = jnp.zeros((batch,))
        return out

    def train_inputs(self):
        sr, ds = self.superres, self.schedule
        return lambda x0, key: superres_lib.train_conditioning(sr, x0, key, ds)

    def sampling_inputs(self, inputs, key):
        return superres_lib.sample_conditioning(self.superres, inputs, key, self.schedule)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierTask(Task):
    """A classifier ``(x, t) -> logits [B, num_classes]``.

    noised: trained on x_t at uniform timesteps of ``schedule`` with t as its time input (the
    noise-aware classifier of classifier guidance); else on clean images at time 0.
    """

    noised: bool = True

    def init_inputs(self, batch: int = 1):
        return (jnp.zeros((batch, *self.image_shape)), jnp.zeros((batch,))), {}

    def apply(self, params, x, t, y, train, rngs=None):
        return self.model.apply({"params": params}, x, self._time(t), train=train, rngs=rngs)

    def loss_fn(self):
        return step_lib.make_classifier_loss(self.apply, self.schedule, self.noised)

    def log_prob(self, params, x_ve: Array, sigma: Array, y: Array) -> Array:
        """log p(y | x) [B] at VE inputs x_ve of noise level sigma (scalar or [B]).

        The classifier was trained on VP inputs x_t at timestep t of its own table, so
        x_vp = x_ve / sqrt(1 + sigma^2) and its time input is the (fractional) timestep of
        sigma.
        """
        ds = self.schedule
        sigma = jnp.broadcast_to(sigma, (x_ve.shape[0],))
        x_vp = x_ve * jax.lax.rsqrt(1.0 + sigma**2)[:, None, None, None]
        t = ds.c_noise(ds.t_from_logsnr(-2.0 * jnp.log(sigma)))
        logits = self.model.apply({"params": params}, x_vp, self._time(t), train=False)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderTask(Task):
    """A KL autoencoder (Stable Diffusion's first stage): x -> posterior (mean, logvar) ->
    z -> reconstruction, trained on

        recon(x, D(z)) + kl_weight * KL(q(z | x) || N(0, I)),  z ~ q(z | x) when sampling,

    ``recon`` the per-pixel mean of |x - x_hat| ("l1") or (x - x_hat)^2 ("l2"); the KL is
    summed over the latent and divided by the pixels per image, so ``kl_weight`` is
    relative to the per-pixel reconstruction loss (SD trains with 1e-6 on its summed NLL).
    No perceptual or adversarial term. ``schedule`` is unused.
    """

    recon_loss: str = "l1"
    kl_weight: float = 1e-6
    sample_posterior: bool = True

    reconstructs = True

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.model.downsampling_factor
        h, w, _ = self.image_shape
        return (h // f, w // f, self.model.latent_channels)

    def init_inputs(self, batch: int = 1):
        return (jnp.zeros((batch, *self.image_shape)),), {}

    def init_params(self, key: Array) -> Any:
        (x,), _ = self.init_inputs()
        return self.model.init(key, x)["params"]

    def apply(self, params, x, t=None, y=None, train=False, rngs=None):
        """The reconstruction [B, H, W, C] of x through the posterior mean (t, y, train and
        rngs, the other tasks' inputs, are ignored)."""
        return self.forward(params, x)[0]

    def forward(self, params, x, key=None):
        """(reconstruction, mean, logvar) of x [B, H, W, C]; z sampled iff ``key`` is given."""
        return self.model.apply({"params": params}, x, key, sample_posterior=key is not None)

    def encode(self, params, x: Array) -> tuple[Array, Array]:
        return self.model.apply({"params": params}, x, method="encode")

    def decode(self, params, z: Array) -> Array:
        return self.model.apply({"params": params}, z, method="decode")

    def loss_fn(self):
        recon_fn = {"l1": jnp.abs, "l2": jnp.square}[self.recon_loss]
        pixels = float(jnp.prod(jnp.asarray(self.image_shape)))
        kl_weight, sample = self.kl_weight, self.sample_posterior

        def loss_fn(params, state, batch, key):
            x = batch["image"]
            recon, mean, logvar = self.forward(params, x, key if sample else None)
            rec = jnp.mean(recon_fn(recon - x), axis=(1, 2, 3))
            kl = autoencoder_kl_divergence(mean, logvar) / pixels
            loss = rec + kl_weight * kl
            t = jnp.zeros((x.shape[0],), jnp.int32)  # no timesteps
            return jnp.mean(loss), ({"loss": loss, "recon": rec, "kl": kl}, t)

        return loss_fn
