"""Samples from trained parameters: denoiser, guidance, sigmas and sampler, from the config.

This is where a trained network meets the pure sampling math: the model's ``apply`` becomes
``denoise(x, sigma, cond) -> x0_hat`` (:func:`diffjax.diffusion.process.make_denoiser`),
guidance and thresholding transform that denoiser, and the configured sampler runs the whole
chain as one compiled program per batch, with the batch split over the mesh's ``data`` axis.

With ``condition.type`` set (``--mode sample`` only) each sample starts from an input image
of ``condition.input``: img2img (SDEdit), inpaint (known pixels of ``condition.mask``,
optionally RePaint) via :mod:`diffjax.diffusion.conditional`, or superres (the input is the
low-resolution image given to the model, :mod:`diffjax.train.superres`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import configlib, parallel
from diffjax.diffusion import conditional, guidance, process, sigmas as sigma_lib


def sigma_sequence(c: ml_collections.ConfigDict, ds) -> np.ndarray:
    """The decreasing sigma sequence (ending at 0) of ``c.sampler`` for the model's table."""
    s = c.sampler
    if s.sigma_spacing == "model":
        spacing = s.timestep_spacing or "uniform"
        return sigma_lib.discrete_sigmas(ds.sigmas, s.num_steps, spacing)
    lo, hi = float(ds.sigmas[0]), float(ds.sigmas[-1])
    if s.sigma_spacing == "karras":
        return sigma_lib.karras_sigmas(s.num_steps, lo, hi, s.rho)
    return sigma_lib.loglinear_sigmas(s.num_steps, lo, hi)


def model_denoiser(c: ml_collections.ConfigDict, model, ds) -> Callable[..., Any]:
    """``(params) -> denoise`` for the configured prediction and variance.

    The ``ddpm`` sampler of a learned-variance model gets ``denoise_with_variance`` (x0_hat and
    the iDDPM interpolation fraction); every other sampler uses the mean prediction only.
    """
    learned = configlib.learns_variance(c)
    conditional = c.model.class_cond
    with_variance = learned and c.sampler.name == "ddpm"

    def for_params(params, **model_kwargs):
        def model_fn(x_in, c_noise, cond):
            return model.apply({"params": params}, x_in, c_noise, cond if conditional else None,
                               train=False, **model_kwargs)

        if with_variance:
            return process.make_denoiser_with_variance(model_fn, ds,
                                                       prediction=c.diffusion.prediction)
        return process.make_denoiser(model_fn, ds, prediction=c.diffusion.prediction,
                                     learned_variance=learned)

    return for_params


def guide(c: ml_collections.ConfigDict, denoise, classifier_log_prob=None):
    """Applies ``c.guidance`` and ``c.sampler.thresholding`` to a denoiser."""
    g = c.guidance
    if g.type == "classifier_free":
        interval = None
        if g.interval_sigma_min > 0 or math.isfinite(g.interval_sigma_max):
            interval = (g.interval_sigma_min, g.interval_sigma_max)
        denoise = guidance.classifier_free(denoise, g.scale, c.data.num_classes,
                                           interval=interval, rescale=g.rescale)
    elif g.type == "classifier":
        denoise = guidance.classifier_guidance(denoise, classifier_log_prob, g.scale)
    if c.sampler.thresholding == "static":
        denoise = guidance.static_threshold(denoise)
    elif c.sampler.thresholding == "dynamic":
        denoise = guidance.dynamic_threshold(denoise, c.sampler.dynamic_percentile)
    return denoise


@dataclasses.dataclass(frozen=True)
class ClassifierLogProb:
    """log p(y | x_ve) of a noise-aware classifier, with its trained parameters.

    ``apply(params, x_ve, sigma, y) -> [B]``. Calling the object binds ``params``; the sampling
    programs of this module take ``params`` as an argument of the compiled program instead, so
    an ADM-size classifier is not baked into it as constants.
    """

    apply: Callable[..., Any]
    params: Any

    def __call__(self, x, sigma, y):
        return self.apply(self.params, x, sigma, y)


def load_classifier_log_prob(c: ml_collections.ConfigDict, mesh) -> ClassifierLogProb | None:
    """The :class:`ClassifierLogProb` of the noise-aware classifier named by
    ``guidance.classifier_config`` / ``guidance.classifier_workdir`` (None without guidance).

    The classifier was trained on VP inputs x_t at timestep t of its own schedule table, so
    x_vp = x_ve / sqrt(1 + sigma^2) and its time input is the (fractional) timestep of sigma.
    """
    if c.guidance.type != "classifier":
        return None
    from diffjax.train.loop import restore_ema_params

    g = c.guidance
    if not g.classifier_config or not g.classifier_workdir:
        raise configlib.ConfigError(
            "guidance.type='classifier' needs --config.guidance.classifier_config=experiments/"
            "classifier_*.py and --config.guidance.classifier_workdir=DIR of its trained run")
    cc = configlib.load_config_file(g.classifier_config)
    model, params, _ = restore_ema_params(cc, mesh, g.classifier_workdir)
    ds = configlib.build_discrete_schedule(cc)

    def apply(p, x, sigma, y):
        sigma = jnp.broadcast_to(sigma, (x.shape[0],))
        x_vp = x * jax.lax.rsqrt(1.0 + sigma**2)[:, None, None, None]
        t = ds.c_noise(ds.t_from_logsnr(-2.0 * jnp.log(sigma)))
        logits = model.apply({"params": p}, x_vp, t, train=False)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]

    return ClassifierLogProb(apply, params)


def _jit_sampler(run, classifier_log_prob, mesh, in_shardings, out_shardings):
    """jit ``run(classifier_log_prob, *args)``; a :class:`ClassifierLogProb`'s parameters
    enter the program as a replicated argument (bound here, so callers pass ``*args`` only)."""
    if not isinstance(classifier_log_prob, ClassifierLogProb):
        return jax.jit(lambda *args: run(classifier_log_prob, *args),
                       in_shardings=in_shardings, out_shardings=out_shardings)
    apply = classifier_log_prob.apply
    jitted = jax.jit(lambda cls_params, *args: run(ClassifierLogProb(apply, cls_params), *args),
                     in_shardings=(parallel.replicated(mesh), *in_shardings),
                     out_shardings=out_shardings)

    def call(*args):
        return jitted(classifier_log_prob.params, *args)

    call.lower = lambda *args: jitted.lower(classifier_log_prob.params, *args)
    return call


def make_sample_fn(c: ml_collections.ConfigDict, model, mesh, batch: int,
                   classifier_log_prob=None):
    """A jitted ``(params, key, labels [batch]) -> images [batch, H, W, C]`` in [-1, 1]."""
    ds = configlib.build_discrete_schedule(c)
    spec = configlib.build_sampler(c)
    sig = jnp.asarray(sigma_sequence(c, ds), jnp.float32)
    make = model_denoiser(c, model, ds)
    shape = (batch, c.data.image_size, c.data.image_size, c.data.channels)
    data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)

    def run(classifier_log_prob, params, key, labels):
        k_init, k_sample = jax.random.split(key)
        x = jax.random.normal(k_init, shape, jnp.float32) * sig[0]
        x = jax.lax.with_sharding_constraint(x, data)
        denoise = guide(c, make(params), classifier_log_prob)
        cond = labels if c.model.class_cond else None
        out = spec.fn(denoise, x, sig, k_sample, cond=cond, **spec.options)
        return jnp.clip(out, -1.0, 1.0)

    return _jit_sampler(run, classifier_log_prob, mesh, (rep, rep, data), data)


def make_conditional_sample_fn(c: ml_collections.ConfigDict, model, mesh, batch: int,
                               classifier_log_prob=None):
    """A jitted ``(params, key, labels [batch], inputs) -> images [batch, H, W, C]`` for
    ``condition.type``; inputs: [batch, H, W, C] images (img2img, inpaint) or
    [batch, h, w, C] low-resolution images (superres), in [-1, 1]."""
    from diffjax.train import superres

    ds = configlib.build_discrete_schedule(c)
    spec = configlib.build_sampler(c)
    sig_np = sigma_sequence(c, ds)
    sig = jnp.asarray(sig_np, jnp.float32)
    make = model_denoiser(c, model, ds)
    k = c.condition
    size, shape = c.data.image_size, (batch, c.data.image_size, c.data.image_size, c.data.channels)
    mask = jnp.asarray(load_mask(k.mask, size)) if k.type == "inpaint" else None
    sr = configlib.superres_spec(c)
    data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)

    def run(classifier_log_prob, params, key, labels, inputs):
        cond = labels if c.model.class_cond else None
        if k.type == "superres":
            k_aug, key = jax.random.split(jax.random.fold_in(key, 1))
            denoise = guide(c, make(params, **superres.sample_conditioning(sr, inputs, k_aug, ds)),
                            classifier_log_prob)
            k_init, k_sample = jax.random.split(key)
            x = jax.random.normal(k_init, shape, jnp.float32) * sig[0]
            out = spec.fn(denoise, x, sig, k_sample, cond=cond, **spec.options)
        elif k.type == "img2img":
            denoise = guide(c, make(params), classifier_log_prob)
            out = conditional.sdedit(denoise, spec.fn, inputs, sig_np, k.strength, key, cond,
                                     **spec.options)
        elif k.repaint_resample > 1:
            denoise = guide(c, make(params), classifier_log_prob)
            out = conditional.repaint(denoise, inputs, mask, sig_np, key, cond=cond,
                                      jump=k.repaint_jump, resample=k.repaint_resample,
                                      variance=spec.options.get("variance", "fixed_small"))
        else:
            denoise = guide(c, make(params), classifier_log_prob)
            out = conditional.inpaint(spec.fn, denoise, inputs, mask, sig_np, key, cond=cond,
                                      **spec.options)
        return jnp.clip(out, -1.0, 1.0)

    return _jit_sampler(run, classifier_log_prob, mesh, (rep, rep, data, data), data)


def _to_model_range(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """[N, H, W, C] (or [H, W, C]) uint8 or float in [-1, 1] -> float32 [N, size, size,
    channels] in [-1, 1]: channels averaged or repeated, resized (antialiased bilinear)."""
    x = np.asarray(images)
    x = x[None] if x.ndim == 3 else x[None, ..., None] if x.ndim == 2 else x
    x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.shape[-1] != channels:
        x = x.mean(-1, keepdims=True) if channels == 1 else np.repeat(x[..., :1], channels, -1)
    if x.shape[1:3] != (size, size):
        x = np.asarray(jax.image.resize(x, (x.shape[0], size, size, channels), "linear",
                                        antialias=True))
    return x


def load_condition_inputs(path: str, size: int, channels: int) -> np.ndarray:
    """Images of ``condition.input``: an image file (PNG, JPEG...) or an .npz (key "images",
    else its first array; uint8 in [0, 255] or floats in [-1, 1]) -> [N, size, size, channels]."""
    from PIL import Image

    if not path or not os.path.isfile(path):
        raise configlib.ConfigError(
            f"condition.input={path!r} is not a file; pass --config.condition.input=PATH of an "
            "image or an .npz of images to condition on")
    if path.endswith(".npz"):
        with np.load(path) as f:
            arr = f["images"] if "images" in f.files else f[f.files[0]]
    else:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    return _to_model_range(arr, size, channels)


def load_mask(spec: str, size: int) -> np.ndarray:
    """``condition.mask`` as [size, size, 1] float32, 1 = known: "center", "left_half" or a
    PNG (pixels > 127 known, resized nearest)."""
    from PIL import Image

    if spec in conditional.MASKS:
        return conditional.MASKS[spec](size, size)
    if not os.path.isfile(spec):
        raise configlib.ConfigError(f"condition.mask={spec!r} is neither center, left_half nor "
                                    "an existing PNG file")
    with Image.open(spec) as img:
        m = np.asarray(img.convert("L").resize((size, size), Image.NEAREST))
    return (m > 127).astype(np.float32)[..., None]


def side_by_side(inputs: np.ndarray, outputs: np.ndarray, ncol: int = 8) -> np.ndarray:
    """Interleaves rows of ``ncol`` inputs and their outputs ([N, H, W, C] each; smaller
    inputs are enlarged by pixel repetition) for one grid: input row, result row, ..."""
    factor = outputs.shape[1] // inputs.shape[1]
    inputs = np.repeat(np.repeat(inputs, factor, 1), factor, 2)
    rows = []
    for i in range(0, len(outputs), ncol):
        a, b = inputs[i:i + ncol], outputs[i:i + ncol]
        pad = ((0, ncol - len(a)), (0, 0), (0, 0), (0, 0))
        rows += [np.pad(a, pad, constant_values=1.0), np.pad(b, pad, constant_values=1.0)]
    return np.concatenate(rows)


def sample_with_condition(c: ml_collections.ConfigDict, workdir: str, mesh, model, params,
                          step: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``--mode sample`` with ``condition.type``: one result per input image, written to
    ``WORKDIR/samples.npz`` (images, inputs, labels) and ``samples.png`` (input | result rows)."""
    from etils import epath

    from diffjax.evaluation import grid

    sr = configlib.superres_spec(c)
    size = sr.low_res_size if sr is not None else c.data.image_size
    inputs = load_condition_inputs(c.condition.input, size, c.data.channels)
    generator = Generator(c, model, mesh)
    images, labels = generator(params, len(inputs), jax.random.PRNGKey(seed), inputs=inputs)
    if jax.process_index() == 0:
        out = epath.Path(workdir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "samples.npz").open("wb") as f:
            np.savez(f, images=images, inputs=inputs, labels=labels, step=step, seed=seed)
        grid.save_grid(side_by_side(inputs, images), str(out / "samples.png"), ncol=8, scale=2)
        print(f"wrote {len(images)} {c.condition.type} results from checkpoint step {step} "
              f"with {c.sampler.name} to {out}/samples.npz and samples.png (input | result rows)")
    return images, labels


def balanced_labels(n: int, num_classes: int, grouped: bool = False) -> np.ndarray:
    """Labels 0..K-1 cycling (``grouped``: each class repeated n/K times in a row)."""
    if grouped:
        return np.repeat(np.arange(num_classes), math.ceil(n / num_classes))[:n].astype(np.int32)
    return (np.arange(n) % max(num_classes, 1)).astype(np.int32)


class Generator:
    """Draws samples from parameters in batches of ``sampler.batch_size`` sharded over the mesh.

    Built once per (config, model, mesh); the sampling program compiles on the first call and
    is reused. Batch i uses ``fold_in(key, i)``, so a seed gives the same images however many
    devices there are.
    """

    def __init__(self, c: ml_collections.ConfigDict, model, mesh, classifier_log_prob=None,
                 max_batch: int | None = None):
        n = parallel.num_data_shards(mesh)
        self.batch = _round_up(min(c.sampler.batch_size, max_batch or c.sampler.batch_size), n)
        self.num_classes = c.data.num_classes
        if classifier_log_prob is None:
            classifier_log_prob = load_classifier_log_prob(c, mesh)
        self._fn = make_sample_fn(c, model, mesh, self.batch, classifier_log_prob)
        self._conditioned = c.condition.type != "none"
        self._superres = c.condition.type == "superres"
        if self._conditioned:
            self._cond_fn = make_conditional_sample_fn(c, model, mesh, self.batch,
                                                       classifier_log_prob)

    def __call__(self, params, num_samples: int, key, labels: np.ndarray | None = None,
                 grouped: bool = False, inputs: np.ndarray | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``num_samples`` images [N, H, W, C] in [-1, 1] (NumPy) and their labels [N].

        ``inputs`` ([N, ...] in [-1, 1]): the images to condition on, for a config with
        ``condition.type`` (without them such a config samples unconditionally, e.g. the
        trainer's image grids of an img2img / inpaint model; a superres model needs them).
        """
        if labels is None:
            labels = balanced_labels(num_samples, self.num_classes, grouped)
        if inputs is None and self._superres:
            raise ValueError("a super-resolution model samples from low-resolution inputs: "
                             "pass inputs (--config.condition.input=PATH)")
        if inputs is not None and not self._conditioned:
            raise ValueError("inputs given but condition.type is 'none'")
        images = []
        for i in range(math.ceil(num_samples / self.batch)):
            chunk = labels[i * self.batch:(i + 1) * self.batch]
            padded = np.pad(chunk, (0, self.batch - len(chunk)))
            if inputs is None:
                out = self._fn(params, jax.random.fold_in(key, i), padded)
            else:
                part = inputs[i * self.batch:(i + 1) * self.batch]
                part = np.pad(part, ((0, self.batch - len(part)),) + ((0, 0),) * (part.ndim - 1))
                out = self._cond_fn(params, jax.random.fold_in(key, i), padded, part)
            images.append(np.asarray(jax.device_get(out))[:len(chunk)])
        return np.concatenate(images), np.asarray(labels)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k
