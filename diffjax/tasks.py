"""What is trained: one small interface, one class per kind of model.

A :class:`Task` says how to initialise its network (from the shapes of one example), how to
apply it, what it optimises, and what sampling and evaluation mean for it. The Experiment
picks one (:func:`diffjax.experiment.build`, its table ``TASKS``); the trainer, generation
and the app tier call the interface and never ask which task they hold.

- :class:`DiffusionTask`: a denoising network (eps / x0 / v prediction, optionally learned
  variance and class labels); sampled through its denoiser, evaluated on its samples.
- :class:`TextDiffusionTask`: a diffusion task conditioned on a caption through a text
  encoder trained with it (GLIDE).
- :class:`SuperResTask`: a diffusion task whose network also sees a low-resolution image
  (ADM's upsampler, cascaded diffusion's noise-conditioning augmentation).
- :class:`LatentDiffusionTask`: a diffusion task on an autoencoder's latents (latent
  diffusion); sampling decodes.
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
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax import parallel
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
        """``key -> params`` from a one-example dummy batch, compiled as one program.

        Flax's ``init`` runs the network's forward pass on the dummy batch; run eagerly, that
        is every operation compiled and run on its own, while compiled, XLA drops the forward
        pass (nothing uses its output) and the program is kept in JAX's persistent cache
        (compiled with :func:`diffjax.parallel.init_compiler_options`). Called while a
        program is traced (``jax.jit``, ``jax.eval_shape``: the trainer's state creation) it
        is traced into that program. Subclasses define :meth:`_init_params`.
        """
        # Inside a trace every operation is staged, even one on constants (a key closed over).
        if isinstance(key, jax.core.Tracer) or isinstance(jnp.zeros(()), jax.core.Tracer):
            return self._init_params(key)
        return self._compiled_init(key)

    @functools.cached_property
    def _compiled_init(self) -> Callable[[Array], Any]:
        # one jitted function per task, so repeated calls reuse its trace and executable
        return jax.jit(self._init_params, compiler_options=parallel.init_compiler_options())

    def __getstate__(self) -> dict[str, Any]:
        # pickled without the compiled init (a jitted function), which is rebuilt on demand
        return {k: v for k, v in self.__dict__.items() if k != "_compiled_init"}

    def _init_params(self, key: Array) -> Any:
        args, kwargs = self.init_inputs()
        return self.model.init(key, *args, train=False, **kwargs)["params"]

    def abstract_params(self) -> Any:
        """Shapes and dtypes of the parameters (``jax.eval_shape``, nothing allocated)."""
        return jax.eval_shape(lambda: self.init_params(jax.random.PRNGKey(0)))

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
    channels (iDDPM); context_dim: the width D of the network's context [B, L, D] (0 =
    none; init sees one zero token: no parameter depends on L).
    """

    class_cond: bool = False
    loss: LossSpec = LossSpec()
    learned_variance: bool = False
    context_dim: int = 0

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
        if self.context_dim:
            return {"context": jnp.zeros((batch, 1, self.context_dim))}
        return {}

    @property
    def takes_cond(self) -> bool:
        """Whether the network takes a condition (labels, or a text model's tokens)."""
        return self.class_cond

    def apply(self, params, x, t, y, train, rngs=None, **inputs):
        return self.model.apply({"params": params}, x, self._time(t),
                                y if self.takes_cond else None, train=train, rngs=rngs,
                                **inputs)

    def train_inputs(self) -> Callable[[Array, Array], dict[str, Array]] | None:
        """``(x0, key) -> extra network inputs`` of a training batch, or None."""
        return None

    def sampling_inputs(self, inputs: Array, key: Array) -> dict[str, Array]:
        """Extra network inputs at sampling from the per-sample input images."""
        return {}

    def encode_inputs(self, first_stage_params, x: Array) -> Array:
        """Input images [B, H, W, C] -> what sampling starts from or pins (img2img, inpaint,
        invert): the images themselves here, their latents for a latent model."""
        return x

    def decode_outputs(self, first_stage_params, x: Array) -> Array:
        """What the sampler returns -> images: themselves here, decoded for a latent model."""
        return x

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
                                                       prediction=self.prediction,
                                                       sigma_data=self.loss.sigma_data)
        return process.make_denoiser(model_fn, self.schedule, prediction=self.prediction,
                                     learned_variance=self.learned_variance,
                                     sigma_data=self.loss.sigma_data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextDiffusionTask(DiffusionTask):
    """A denoising network conditioned on a caption (``model``: a
    :class:`diffjax.models.text_encoder.TextConditioned`, its text encoder trained with it).

    Its condition (the ``y`` of :meth:`apply`, the ``cond`` of its denoiser) is tokens [B, L]
    int32 (0 = padding); a row of -1 is the null caption (the learned null sequence) that
    classifier-free guidance drops to in training and guides against at sampling. Batches
    hold it as ``"tokens"`` (:class:`diffjax.data.text_source.CaptionedSource`). With
    ``context_width`` > 0 (``model``: an ``EmbeddingConditioned``) it is instead precomputed
    embeddings and their mask [B, L, context_width + 1], a row of zeros the null condition,
    held as ``"context"`` (:class:`diffjax.data.text_source.EmbeddingSource`).
    """

    context_length: int
    # > 0: the condition is precomputed embeddings of this width with their mask, packed as
    # [B, L, width + 1] float (models.text_encoder.pack_context; a row of zeros is null)
    context_width: int = 0

    samples_from_prompts = True

    @property
    def takes_cond(self) -> bool:
        return True

    def init_inputs(self, batch: int = 1):
        x = jnp.zeros((batch, *self.image_shape))
        if self.context_width:
            cond = jnp.ones((batch, self.context_length, self.context_width + 1))
        else:
            cond = jnp.ones((batch, self.context_length), jnp.int32)
        return (x, jnp.zeros((batch,)), cond), {}


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
        out = {**super().extra_inputs_like(batch),
               "low_res": jnp.zeros((batch, *self.input_shape))}
        if self.superres.augments:
            out["aug_level"] = jnp.zeros((batch,))
        return out

    def train_inputs(self):
        sr, ds = self.superres, self.schedule
        return lambda x0, key: superres_lib.train_conditioning(sr, x0, key, ds)

    def sampling_inputs(self, inputs, key):
        return superres_lib.sample_conditioning(self.superres, inputs, key, self.schedule)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentDiffusionTask(DiffusionTask):
    """A diffusion model on the latents of an autoencoder (latent diffusion, Rombach et al.
    2022): ``image_shape`` is the latent's (h, w, c), ``first_stage`` the
    :class:`AutoencoderTask` whose parameters (``first_stage_params``, not trained here)
    encode inputs and decode samples.

    Training batches hold each image's posterior ``{"mean", "std", "label"}`` (a latent cache,
    or encoded on the fly); the network learns z = scale_factor * (mean + std * n), n ~ N(0, I)
    drawn afresh each step (``sample_posterior``; else the mean), so that z has about unit
    variance. Sampling returns decode(z / scale_factor); input images enter as
    scale_factor * mean.
    """

    first_stage: AutoencoderTask
    scale_factor: float
    sample_posterior: bool = True
    # The data's images sit centred on the autoencoder's larger black canvas (it was trained
    # with data.resize="pad"): (top, left) of the data's frame in the autoencoder's.
    frame_offset: tuple[int, int] = (0, 0)
    pixel_size: int = 0  # the data's image size (0 = the autoencoder's)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w, c = self.first_stage.image_shape
        return (self.pixel_size, self.pixel_size, c) if self.pixel_size else (h, w, c)

    def _to_frame(self, x: Array) -> Array:
        """Images of the data's size -> the autoencoder's (centred on -1, as sizing.pad)."""
        (top, left), (h, w, _) = self.frame_offset, self.first_stage.image_shape
        if x.shape[1:3] == (h, w):
            return x
        pad = ((0, 0), (top, h - top - x.shape[1]), (left, w - left - x.shape[2]), (0, 0))
        return jnp.pad(x, pad, constant_values=-1.0)

    def posterior(self, first_stage_params, x: Array) -> dict[str, Array]:
        """{"mean", "std"} of q(z | x) for images x [B, H, W, C] (unscaled)."""
        mean, logvar = self.first_stage.encode(first_stage_params, self._to_frame(x))
        return {"mean": mean, "std": jnp.exp(0.5 * logvar)}

    def encode_inputs(self, first_stage_params, x: Array) -> Array:
        return self.posterior(first_stage_params, x)["mean"] * self.scale_factor

    def decode_outputs(self, first_stage_params, x: Array) -> Array:
        images = self.first_stage.decode(first_stage_params, x / self.scale_factor)
        (top, left), (h, w, _) = self.frame_offset, self.input_shape
        return images[:, top:top + h, left:left + w]

    def loss_fn(self):
        inner = super().loss_fn()
        scale, sample = self.scale_factor, self.sample_posterior

        def loss_fn(params, state, batch, key):
            k_z, key = jax.random.split(key)
            z = batch["mean"]
            if sample:
                z = z + batch["std"] * jax.random.normal(k_z, z.shape, z.dtype)
            rest = {k: v for k, v in batch.items() if k not in ("mean", "std")}
            return inner(params, state, {**rest, "image": z * scale}, key)

        return loss_fn


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentTextDiffusionTask(LatentDiffusionTask, TextDiffusionTask):
    """A caption-conditioned model on an autoencoder's latents (LDM's text-to-image setup):
    :class:`TextDiffusionTask`'s condition (tokens, or precomputed embeddings) and inputs at
    the latent shape, :class:`LatentDiffusionTask`'s posterior batches (which also hold the
    ``"tokens"`` / ``"context"`` column), encoding and decoding."""


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
    No perceptual (LPIPS) term. ``schedule`` is unused.

    Adversarial term (SD's ``LPIPSWithDiscriminator`` without LPIPS), when ``disc_start >= 0``
    and the model holds a discriminator D (``use_discriminator``, ``params["discriminator"]``);
    from step ``disc_start`` on (``state.step``, traced: no recompilation) the loss adds

        g = d_weight * -mean(D_sg(x_hat))                  (into the autoencoder only)
        d = 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(sg(x_hat)))))  (into D only)

    D_sg: D's parameters under stop_gradient; d_weight = disc_weight * sg(clip(|grad_W recon|
    / (|grad_W -mean(D(x_hat))| + 1e-4), 0, 1e4)), W the decoder's ``conv_out`` kernel, both
    gradients of batch means taken inside the loss (SD's adaptive weight; it makes the
    generator term's gradient at W as large as the reconstruction's times disc_weight, so
    it does not depend on recon being a per-pixel mean here and a per-image sum in SD).
    Before ``disc_start`` the adversarial part is skipped (``lax.cond``): the loss and the
    autoencoder's gradients are those without it, D's gradients are 0, and the terms
    ``g_loss`` (-mean(D(x_hat)) per image), ``d_loss`` (the hinge per image; it depends on
    the batch through D's batch-statistics norm) and ``d_weight`` are 0.

    One optimiser: the trainer steps one AdamW over the joint tree. Adam is elementwise, so
    this is SD's two Adams (autoencoder, discriminator) with the same hyper-parameters, but
    stepping *simultaneously*: both gradients are taken at the same parameters. SD
    alternates within each batch: the autoencoder steps first, then a second forward pass
    of the updated autoencoder gives the reconstructions the discriminator steps on (the
    generator term sees D before its step in both). Also shared here: the learning-rate
    schedule, weight decay, and global-norm clipping (``optim.grad_clip``), whose norm is
    taken over both groups together (SD clips neither).
    """

    recon_loss: str = "l1"
    kl_weight: float = 1e-6
    sample_posterior: bool = True
    disc_start: int = -1  # first step of the adversarial term; -1: none (no discriminator)
    disc_weight: float = 0.5

    reconstructs = True

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.model.downsampling_factor
        h, w, _ = self.image_shape
        return (h // f, w // f, self.model.latent_channels)

    def init_inputs(self, batch: int = 1):
        return (jnp.zeros((batch, *self.image_shape)),), {}

    def _init_params(self, key: Array) -> Any:
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

        if self.disc_start < 0:
            return loss_fn
        if not getattr(self.model, "use_discriminator", False):
            raise ValueError(f"AutoencoderTask(disc_start={self.disc_start}) needs a model "
                             "with use_discriminator=True")
        return self._adversarial_loss_fn(recon_fn, pixels)

    def discriminate(self, params, x: Array) -> Array:
        """PatchGAN logits [B, P, Q, 1] of images x [B, H, W, C] (``params["discriminator"]``
        of the joint tree ``params``)."""
        return self.model.apply({"params": params}, x, method="discriminate")

    @staticmethod
    def _adaptive_weight(h: Array, kernel: Array, d_rec: Array, d_g: Array) -> Array:
        """SD's ``calculate_adaptive_weight``, without gradient: clip(|grad_W L_rec| /
        (|grad_W L_g| + 1e-4), 0, 1e4), W = kernel [k, k, C, C_out] of the decoder's last conv
        (stride 1, "same" padding) and h [B, H, W, C] its input; d_rec, d_g [B, H, W, C_out]:
        the gradients of the two losses w.r.t. its output. grad_W is the conv's weight gradient,
        so nothing before the last layer is differentiated again."""
        h, kernel, d_rec, d_g = (jax.lax.stop_gradient(a).astype(jnp.float32)
                                 for a in (h, kernel, d_rec, d_g))
        _, pull = jax.vjp(lambda w: jax.lax.conv_general_dilated(
            h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), kernel)
        ratio = jnp.linalg.norm(pull(d_rec)[0]) / (jnp.linalg.norm(pull(d_g)[0]) + 1e-4)
        return jnp.clip(ratio, 0.0, 1e4)

    def _adversarial_loss_fn(self, recon_fn, pixels: float):
        """The loss with SD's hinge GAN term (class docstring)."""
        kl_weight, sample = self.kl_weight, self.sample_posterior
        disc_start, disc_weight = self.disc_start, self.disc_weight

        def loss_fn(params, state, batch, key):
            x = batch["image"]
            b = x.shape[0]
            (recon, mean, logvar), inter = self.model.apply(
                {"params": params}, x, key if sample else None, sample_posterior=sample,
                mutable=["intermediates"])
            rec = jnp.mean(recon_fn(recon - x), axis=(1, 2, 3))
            kl = autoencoder_kl_divergence(mean, logvar) / pixels

            def adversarial():
                d_frozen = {**params, "discriminator": jax.lax.stop_gradient(
                    params["discriminator"])}
                g, pull_g = jax.vjp(
                    lambda r: -jnp.mean(self.discriminate(d_frozen, r), axis=(1, 2, 3)), recon)
                _, pull_rec = jax.vjp(lambda r: jnp.mean(recon_fn(r - x)), recon)
                d_weight = disc_weight * self._adaptive_weight(
                    inter["intermediates"]["decoder"]["conv_out_input"][0],
                    params["decoder"]["conv_out"]["kernel"],
                    pull_rec(jnp.ones((), rec.dtype))[0], pull_g(jnp.full((b,), 1.0 / b))[0])
                real = self.discriminate(params, x)
                fake = self.discriminate(params, jax.lax.stop_gradient(recon))
                d = 0.5 * (jnp.mean(jax.nn.relu(1.0 - real), axis=(1, 2, 3))
                           + jnp.mean(jax.nn.relu(1.0 + fake), axis=(1, 2, 3)))
                return g, d, jnp.broadcast_to(d_weight, (b,))

            def off():
                return (jnp.zeros((b,), jnp.float32),) * 3

            g, d, d_weight = jax.lax.cond(state.step >= disc_start, adversarial, off)
            loss = rec + kl_weight * kl + d_weight * g + d
            terms = {"loss": loss, "recon": rec, "kl": kl, "g_loss": g, "d_loss": d,
                     "d_weight": d_weight}
            return jnp.mean(loss), (terms, jnp.zeros((b,), jnp.int32))

        return loss_fn
