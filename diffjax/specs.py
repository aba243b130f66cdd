"""The resolved experiment: small frozen, typed specs built once from the config.

:func:`diffjax.experiment.build` turns a validated ConfigDict into an :class:`Experiment`;
everything below it (trainer, generation, evaluation, the app tier) takes these specs and
never reads a ConfigDict. Implementations chosen by name (schedule, model, sampler, guidance,
conditioning, task) are already objects here: no code below the Experiment maps names to
implementations or branches on a task's name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from diffjax.diffusion.schedules import DiscreteSchedule


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the images come from and their geometry; batch_size is global (all devices)."""

    source: str
    path: str
    split: str
    image_size: int
    channels: int
    num_classes: int
    batch_size: int
    random_flip: bool = False
    resize: str = "none"
    num_workers: int = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def source_kwargs(self, split: str | None = None) -> dict[str, Any]:
        """Keyword arguments of :func:`diffjax.data.dataset_info` and the iterators."""
        options = {"channels": self.channels} if self.source == "folder" else {}
        return dict(source=self.source, split=split or self.split,
                    image_size=self.image_size, data_dir=self.path or None,
                    resize=self.resize, **options)


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    learning_rate: float
    warmup_steps: int
    decay: str
    min_lr_ratio: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    grad_clip: float
    ema_decays: tuple[float, ...]
    # EDM2 power-function EMA profiles, one copy each after ema_decays' (exponents gamma)
    ema_gammas: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    num_steps: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    keep_every: int
    sample_every: int
    num_sample_images: int
    seed: int
    ema_snapshot_every: int = 0  # snapshots of the power-function EMAs (0 = none)
    shard_state: str = "replicated"  # parallel.shard_state: replicated / fsdp


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A sampler resolved from config.

    fn: ``fn(denoise, x_init, sigmas, key, *, cond, **options, **knobs)``;
    sigmas: [num_steps + 1] decreasing, ending at 0 (float64 NumPy);
    options: static (string) options, e.g. ddpm's ``variance``;
    knobs: every float option ``fn`` takes, with its value (configured or ``fn``'s default):
      traced arguments of the compiled sampling program.
    """

    name: str
    fn: Callable[..., Any]
    num_steps: int
    sigmas: np.ndarray
    options: Mapping[str, Any]
    knobs: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    num_samples: int
    batch_size: int
    metrics: tuple[str, ...]
    split: str
    sweep_guidance_scales: tuple[float, ...]
    sweep_num_steps: tuple[int, ...]  # the configured sampler.num_steps when not swept
    samplers: tuple[SamplerSpec, ...]  # one per sweep_num_steps (resolved for --mode eval)
    name: str
    features: Experiment | None  # the feature classifier of fd_<domain> / class_accuracy
    features_config: str
    features_workdir: str
    inception_weights: str
    reference_stats: str
    inception_size: int
    nll_num_examples: int
    nll_clip_denoised: bool  # x0_hat clipped to [-1, 1] in the VLB terms
    domain: str  # short data name in metric and file names, e.g. "fashion_mnist"
    seed: int  # sampler.seed: the samples' (or a noise-aware classifier's noise) seed


@dataclasses.dataclass(frozen=True)
class LatentSpec:
    """Where a latent diffusion model's latents come from (``data.latent``).

    autoencoder: the autoencoder run's Experiment (its task encodes and decodes); workdir /
    checkpoint_step (None = latest): its parameters; cache: a latent cache directory ("" =
    encode each training batch); shard_size: rows per cache shard (``--mode encode``);
    scale_factor: resolved (given, or the cache's measured 1/std; 0 only while encoding);
    frame_offset / pixel_size: where the data's images sit in the autoencoder's when it was
    trained on them padded to a larger size (``data.resize="pad"``): encoding pads, decoding
    crops.
    """

    autoencoder: Experiment
    workdir: str
    checkpoint_step: int | None
    cache: str
    shard_size: int
    scale_factor: float
    frame_offset: tuple[int, int] = (0, 0)  # the data's images in the autoencoder's frame
    pixel_size: int = 0  # the data's image size

    def identity(self, data: DataSpec, digest: str, step: int) -> dict[str, Any]:
        """What a latent cache of ``data`` encoded by these parameters depends on."""
        path = data.path if not data.path or "://" in data.path else os.path.abspath(data.path)
        return {"latent_shape": list(self.autoencoder.task.latent_shape),
                "source": data.source, "path": path, "split": data.split,
                "image_size": data.image_size, "channels": data.channels,
                "resize": data.resize, "num_classes": data.num_classes,
                "autoencoder_digest": digest, "autoencoder_step": int(step)}


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """Where a text-conditioned model's captions come from (config section ``text``).

    tokenizer: "word" / "byte" (:class:`diffjax.text.Tokenizer`, built from the training
    captions); context_length: L, tokens per caption or prompt; vocab_size: rows of the
    encoder's token embedding; captions: the captioner's name
    (:data:`diffjax.data.text_source.CAPTIONERS`) with its seed and the probability of keeping
    each attribute word; prompts: ``sampler.prompts`` (() = the captioner's defaults);
    encoder "embeddings" (``precomputed``): the context is read from ``embeddings`` (training)
    and ``sample_embeddings`` (sampling), of width ``width``.
    """

    tokenizer: str
    context_length: int
    vocab_size: int
    captions: str
    caption_seed: int
    caption_keep_prob: float
    prompts: tuple[str, ...] = ()
    encoder: str = "transformer"  # or "embeddings": precomputed, read from files
    width: int = 0
    embeddings: str = ""  # the train split's .npz (encoder "embeddings")
    sample_embeddings: str = ""  # the prompts' .npz of --mode sample (encoder "embeddings")

    @property
    def precomputed(self) -> bool:
        return self.encoder == "embeddings"


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment, resolved: what to train or sample, and how.

    model_name: ``model.name`` (for summaries); task: a :class:`diffjax.tasks.Task` (model,
    inputs, loss, what sampling/eval means); schedule: the T-step table of the diffusion;
    sampling: a :class:`diffjax.generate.Sampling` (sampler, guidance, thresholding,
    conditioning; None for a task that draws no samples);
    resolved: the config as a JSON-able dict (written to WORKDIR/config.json and each
    checkpoint); config_text: the config as printed by ``--mode summary``; latent: the
    :class:`LatentSpec` of a latent diffusion model (its task a
    :class:`diffjax.tasks.LatentDiffusionTask`), else None.
    """

    model_name: str
    data: DataSpec
    task: Any
    schedule: DiscreteSchedule
    sampling: Any
    optim: OptimSpec
    train: TrainSpec
    eval: EvalSpec
    resolved: dict[str, Any]
    config_text: str
    latent: LatentSpec | None = None  # a latent diffusion model's autoencoder and cache
    # ema.sigma_rel: sample / eval with the post-hoc EMA of this profile (0 = first EMA copy)
    ema_sigma_rel: float = 0.0
    text: TextSpec | None = None  # a text-conditioned model's captions and tokenizer
