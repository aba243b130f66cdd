"""The resolved experiment: small frozen, typed specs built once from the config.

:func:`diffjax.experiment.build` turns a validated ConfigDict into an :class:`Experiment`;
everything below it (trainer, generation, evaluation, the app tier) takes these specs and
never reads a ConfigDict. Implementations chosen by name (schedule, model, sampler, guidance,
conditioning, task) are already objects here: no code below the Experiment maps names to
implementations or branches on a task's name.
"""

from __future__ import annotations

import dataclasses
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
class Experiment:
    """One experiment, resolved: what to train or sample, and how.

    model_name: ``model.name`` (for summaries); task: a :class:`diffjax.tasks.Task` (model,
    inputs, loss, what sampling/eval means); schedule: the T-step table of the diffusion;
    sampling: a :class:`diffjax.generate.Sampling` (sampler, guidance, thresholding,
    conditioning; None for a task that draws no samples);
    resolved: the config as a JSON-able dict (written to WORKDIR/config.json and each
    checkpoint); config_text: the config as printed by ``--mode summary``.
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
