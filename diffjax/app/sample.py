"""``--mode sample``: samples from a checkpoint to ``WORKDIR/samples.npz`` and a PNG grid.

With ``condition.type`` set each sample starts from an input image of ``condition.input``
(img2img, inpaint) or is conditioned on it (superres: the low-resolution image); an .npz
input may carry the class ``labels`` of its images. ``invert`` (DDIM inversion) writes
each input's x_T (``latents``, at ``sigma_max``) and its reconstruction decoded from it,
with the round trip's PSNR per image (``psnr``, dB, data range [-1, 1]). A text model draws
``sampler.num_samples / len(prompts)`` samples per prompt of ``sampler.prompts`` (or its
captioner's defaults; a model of precomputed embeddings: the rows of
``text.sample_embeddings``) into a grid with one labelled row per prompt.
"""

from __future__ import annotations

import os
import time
import zipfile

import jax
import numpy as np
from PIL import Image

from diffjax import generate
from diffjax.app import common
from diffjax.app import text as text_app
from diffjax.errors import ConfigError
from diffjax.evaluation import grid
from diffjax.specs import Experiment


def to_model_range(images: np.ndarray, size: int, channels: int) -> np.ndarray:
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


def load_inputs(path: str, size: int, channels: int) -> np.ndarray:
    """Images of ``condition.input``: an image file (PNG, JPEG...) or an .npz (key "images",
    else its first array; uint8 in [0, 255] or floats in [-1, 1]) -> [N, size, size, channels]."""
    if not path or not os.path.isfile(path):
        raise ConfigError(
            f"condition.input={path!r} is not a file; pass --config.condition.input=PATH of an "
            "image or an .npz of images to condition on")
    if path.endswith(".npz"):
        try:
            with np.load(path) as f:
                arr = f["images"] if "images" in f.files else f[f.files[0]]
        except (OSError, ValueError, IndexError, zipfile.BadZipFile) as e:
            raise ConfigError(f"condition.input={path!r} cannot be read as an .npz of images "
                              f"({type(e).__name__}: {e}); pass an .npz with an 'images' "
                              "array, or an image file") from e
    else:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    return to_model_range(arr, size, channels)


def load_input_labels(path: str, count: int, num_classes: int) -> np.ndarray | None:
    """The ``labels`` array of an .npz ``condition.input`` ([count] ints in [0, num_classes)),
    or None (no such array, or the model is unconditional)."""
    if not num_classes or not path.endswith(".npz"):
        return None
    with np.load(path) as f:
        if "labels" not in f.files:
            return None
        labels = np.asarray(f["labels"])
    if labels.shape != (count,) or labels.dtype.kind not in "iu" or (
            count and not 0 <= labels.min() <= labels.max() < num_classes):
        raise ConfigError(
            f"condition.input={path!r}: 'labels' must be {count} integers in [0, "
            f"{num_classes}) (one per image), got shape {labels.shape} dtype {labels.dtype}; "
            "fix or drop the array")
    return labels.astype(np.int32)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB per image of [N, ...] arrays in [-1, 1] (peak-to-peak range 2)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2,
                  axis=tuple(range(1, np.ndim(a))))
    return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-20))


def side_by_side(inputs: np.ndarray, *outputs: np.ndarray, ncol: int = 8) -> np.ndarray:
    """Interleaves rows of ``ncol`` inputs and of each of ``outputs`` for them ([N, H, W, C]
    each, outputs of one size; smaller inputs are enlarged by pixel repetition) for one grid:
    input row, result row(s), input row, ...; short last rows are padded with white."""
    factor = outputs[0].shape[1] // inputs.shape[1]
    inputs = np.repeat(np.repeat(inputs, factor, 1), factor, 2)
    rows = []
    for i in range(0, len(inputs), ncol):
        for group in (inputs, *outputs):
            part = group[i:i + ncol]
            rows.append(np.pad(part, ((0, ncol - len(part)), (0, 0), (0, 0), (0, 0)),
                               constant_values=1.0))
    return np.concatenate(rows)


def _check_can_sample(experiment: Experiment) -> None:
    if not experiment.task.draws_samples:
        raise ConfigError(f"--mode sample needs a diffusion model; {experiment.model_name!r} "
                          "draws no samples (use --mode eval: a classifier's accuracy, an "
                          "autoencoder's reconstructions)")


def run(experiment: Experiment, workdir: str, mesh, *, checkpoint: str = "",
        step: int | None = None, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Writes ``WORKDIR/samples.npz`` (images in [-1, 1], labels) and ``samples.png``;
    returns (images [N, H, W, C], labels [N])."""
    _check_can_sample(experiment)
    task, sampling = experiment.task, experiment.sampling
    inputs = labels = None
    if sampling.uses_inputs(task):  # read (and checked) before the checkpoint
        size, _, channels = task.input_shape
        inputs = load_inputs(sampling.condition_input, size, channels)
        labels = load_input_labels(sampling.condition_input, len(inputs), task.num_classes)
    if experiment.text is not None:  # prompts checked before the checkpoint is read
        tokenizer = None
        if not experiment.text.precomputed:
            tokenizer = text_app.load_tokenizer(experiment, checkpoint or workdir)
        prompts, per_sample, labels, per = text_app.conditions(
            experiment, tokenizer, sampling.num_samples, "grid")
    params, got = common.model_params(experiment, mesh, checkpoint or workdir, step)
    seed = sampling.seed if seed is None else seed
    generator = generate.Generator(task, sampling, mesh,
                                   common.classifier_params(sampling, mesh),
                                   first_stage_params=common.first_stage_params(experiment,
                                                                                mesh)[0],
                                   shard_params=experiment.train.shard_state)
    if inputs is not None and getattr(sampling.condition, "writes_latents", False):
        return invert_inputs(sampling, workdir, generator, params, inputs, labels, got, seed)
    if inputs is not None:
        return sample_with_inputs(sampling, workdir, generator, params, inputs, got, seed,
                                  labels)
    if experiment.text is not None:
        return sample_prompts(sampling, workdir, generator, params, prompts, per_sample,
                              labels, per, got, seed)
    start = time.perf_counter()
    images, labels = generator(params, sampling.num_samples, jax.random.PRNGKey(seed),
                               grouped=True)
    wall = time.perf_counter() - start
    out = common.write_samples(workdir, images=images, labels=labels, step=got, seed=seed)
    if jax.process_index() == 0:
        ncol = -(-len(images) // task.num_classes) if task.class_cond else None
        grid.save_grid(images, str(out / "samples.png"), ncol=ncol, scale=2)
    common.say(f"wrote {len(images)} samples from checkpoint step {got} with "
               f"{sampling.sampler.name} ({sampling.sampler.num_steps} steps, seed {seed}) in "
               f"{wall:.1f}s to {out}/samples.npz and samples.png")
    return images, labels


def sample_prompts(sampling, workdir: str, generator, params, prompts, per_sample,
                   tokens: np.ndarray, per: int, step: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A text model's samples, ``per`` for each prompt: ``WORKDIR/samples.npz`` (images,
    tokens (or the packed embeddings, context), prompts: each sample's) and ``samples.png``
    (one row per prompt, labelled)."""
    start = time.perf_counter()
    images, _ = generator(params, len(tokens), jax.random.PRNGKey(seed), labels=tokens)
    wall = time.perf_counter() - start
    key = "context" if tokens.ndim == 3 else "tokens"  # precomputed embeddings, or tokens
    out = common.write_samples(workdir, images=images, **{key: tokens},
                               prompts=np.asarray(per_sample, dtype=str), step=step, seed=seed)
    if jax.process_index() == 0:
        grid.save_grid(images, str(out / "samples.png"), ncol=per, scale=2,
                       row_labels=list(prompts))
    guidance = sampling.guidance
    common.say(f"wrote {len(images)} samples ({per} per prompt, {len(prompts)} prompts) from "
               f"checkpoint step {step} with {sampling.sampler.name} "
               f"({sampling.sampler.num_steps} steps, {guidance.name} {guidance.scale:g}, seed "
               f"{seed}) in {wall:.1f}s to {out}/samples.npz and samples.png")
    return images, tokens


def sample_with_inputs(sampling, workdir: str, generator, params, inputs: np.ndarray,
                       step: int, seed: int, labels: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """One result per input image, written to ``WORKDIR/samples.npz`` (images, inputs,
    labels) and ``samples.png`` (input | result rows)."""
    images, labels = generator(params, len(inputs), jax.random.PRNGKey(seed), labels=labels,
                               inputs=inputs)
    out = common.write_samples(workdir, images=images, inputs=inputs, labels=labels, step=step,
                               seed=seed)
    if jax.process_index() == 0:
        grid.save_grid(side_by_side(inputs, images), str(out / "samples.png"), ncol=8, scale=2)
    common.say(f"wrote {len(images)} {sampling.condition_type} results from checkpoint step "
               f"{step} with {sampling.sampler.name} to {out}/samples.npz and samples.png "
               "(input | result rows)")
    return images, labels


def invert_inputs(sampling, workdir: str, generator, params, inputs: np.ndarray,
                  labels: np.ndarray | None, step: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """DDIM inversion of each input: ``WORKDIR/samples.npz`` with ``latents`` (x_T at
    ``sigma_max``, the samplers' frame), ``images`` (decoded back from them), ``inputs``,
    ``labels`` and ``psnr`` (dB per image); ``samples.png`` (input | reconstruction rows).
    Returns (reconstructions, labels)."""
    key = jax.random.PRNGKey(seed)
    if labels is None:
        labels = generate.balanced_labels(len(inputs), generator.task.num_classes)
    start = time.perf_counter()
    latents = generator.latents(params, inputs, key, labels)
    images, labels = generator(params, len(inputs), key, labels=labels, inputs=inputs)
    wall = time.perf_counter() - start
    scores = psnr(inputs, images)
    sigma_max = float(sampling.sampler.sigmas[0])
    out = common.write_samples(workdir, images=images, inputs=inputs, labels=labels,
                               latents=latents, sigma_max=sigma_max, psnr=scores, step=step,
                               seed=seed)
    if jax.process_index() == 0:
        grid.save_grid(side_by_side(inputs, images), str(out / "samples.png"), ncol=8, scale=2)
    common.say(f"inverted {len(inputs)} images to x_T at sigma {sigma_max:.4g} with "
               f"{sampling.sampler.name} ({sampling.sampler.num_steps} steps each way, "
               f"checkpoint step {step}) in {wall:.1f}s; round trip PSNR {scores.mean():.2f} dB "
               f"(min {scores.min():.2f}, max {scores.max():.2f}); wrote {out}/samples.npz "
               "(latents, images, psnr) and samples.png (input | reconstruction rows)")
    return images, labels
