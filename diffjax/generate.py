"""Samples from trained parameters: denoiser -> guidance -> thresholding -> sampler.

This is where a trained network meets the pure sampling math. A :class:`Sampling` (built by
the Experiment) holds the resolved sampler, guidance, thresholding and conditioning; a
:class:`Generator` compiles one program per (batch size, with or without inputs) that runs
the whole chain with the batch split over the mesh's ``data`` axis. Every float knob (the
guidance scale and interval, CFG rescale, the sampler's eta / s_noise / churn, the dynamic
threshold's percentile) is an argument of that program: sweeping them never recompiles.

Conditioning at sampling (``condition.type``): :class:`FromNoise` (plain sampling; a
super-resolution task's low-resolution inputs reach the network through the task),
:class:`Img2Img` (SDEdit) and :class:`Inpaint` (pinned known pixels, optionally RePaint),
via :mod:`diffjax.diffusion.conditional`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from diffjax import hugepages, parallel
from diffjax.diffusion import conditional
from diffjax.diffusion import guidance as guidance_lib
from diffjax.specs import SamplerSpec

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GuidanceSpec:
    """A denoiser transform of :data:`diffjax.diffusion.guidance.GUIDANCE`.

    name: the table's key (``none`` / ``classifier_free`` / ``classifier`` /
    ``autoguidance`` / ``gradient``), also the record's guidance type; fn: ``fn(denoise,
    **static, **knobs) -> denoise``; static: e.g. gradient guidance's resolved
    ``log_density`` function and its input ``on``; knobs: traced floats (``scale``,
    ``interval``, ``rescale``); classifier:
    the noise-aware classifier's task (``ClassifierTask``) and run directory of classifier
    guidance, whose parameters enter the sampling program as an argument and reach ``fn`` as
    ``log_prob_fn``; guide / guide_workdir / guide_step: autoguidance's guiding diffusion
    task, its run directory and checkpoint step (None = latest): its parameters take the
    same program argument (a guidance has a classifier or a guide, never both) and its
    denoiser (x0 only, :meth:`DiffusionTask.denoiser`) reaches ``fn`` as ``guide``;
    mode: how classifier guidance enters, resolved from ``guidance.classifier_mode``:
    ``"score"`` (``fn`` transforms the denoiser, ADM's Alg. 2) or ``"mean"`` (the denoiser is
    left alone and the ``ddpm`` sampler shifts its mean, Alg. 1: ``sampler_guidance``).
    """

    name: str
    fn: Callable[..., Any]
    static: Mapping[str, Any]
    knobs: Mapping[str, Any]
    classifier: Any = None
    classifier_workdir: str = ""
    mode: str = "score"
    guide: Any = None
    guide_workdir: str = ""
    guide_step: int | None = None

    @property
    def scale(self) -> float:
        return float(self.knobs.get("scale", 0.0))


@dataclasses.dataclass(frozen=True)
class ThresholdSpec:
    """An x0 transform of :data:`diffjax.diffusion.guidance.THRESHOLDING` with its knobs."""

    name: str
    fn: Callable[..., Any]
    knobs: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class FromNoise:
    """Sample from Gaussian noise of std sigmas[0] (``condition.type`` none / superres).

    Every condition's ``sample(sampler, denoise, key, cond, inputs, shape, knobs, place)``
    returns x [B, H, W, C]; ``place`` lays the initial noise out over the mesh;
    ``takes_inputs``: whether it starts from per-sample input images."""

    takes_inputs = False

    def sample(self, sampler: SamplerSpec, denoise, key, cond, inputs, shape, knobs, place):
        sig = jnp.asarray(sampler.sigmas, jnp.float32)
        k_init, k_sample = jax.random.split(key)
        x = place(jax.random.normal(k_init, shape, jnp.float32) * sig[0])
        return sampler.fn(denoise, x, sig, k_sample, cond=cond, **sampler.options, **knobs)


@dataclasses.dataclass(frozen=True)
class Img2Img:
    """SDEdit: the input noised to the sigma at ``strength`` along the sequence, then sampled."""

    strength: float

    takes_inputs = True

    def sample(self, sampler: SamplerSpec, denoise, key, cond, inputs, shape, knobs, place):
        return conditional.sdedit(denoise, sampler.fn, inputs, sampler.sigmas, self.strength,
                                  key, cond, **sampler.options, **knobs)


@dataclasses.dataclass(frozen=True, eq=False)
class Inpaint:
    """Known pixels of ``mask`` ([H, W, 1], 1 = known) pinned; ``resample`` > 1: RePaint
    (the ancestral step whatever the sampler, jumps of ``jump`` steps)."""

    mask: np.ndarray
    resample: int = 1
    jump: int = 10

    takes_inputs = True

    def sample(self, sampler: SamplerSpec, denoise, key, cond, inputs, shape, knobs, place):
        mask = jnp.asarray(self.mask)
        if self.resample > 1:
            return conditional.repaint(denoise, inputs, mask, sampler.sigmas, key, cond=cond,
                                       jump=self.jump, resample=self.resample,
                                       variance=sampler.options.get("variance", "fixed_small"))
        return conditional.inpaint(sampler.fn, denoise, inputs, mask, sampler.sigmas, key,
                                   cond=cond, **sampler.options, **knobs)


@dataclasses.dataclass(frozen=True)
class Invert:
    """DDIM inversion (``condition.type`` invert): :meth:`encode` carries each input x0 up the
    sampler's deterministic ODE (``ddim`` with eta 0 or ``euler`` without churn) over the
    reversed sampling sequence to x_T at sigmas[0]; :meth:`sample` decodes that x_T back down
    the same sequence, so it returns the round trip. x_T is in the samplers' frame
    (x_vp * sqrt(1 + sigma^2), sigma = sigmas[0]); the VP latent of the DDIM paper is
    x_T / sqrt(1 + sigmas[0]^2). The network sees the same sigmas both ways (N evaluations
    each, none at sigma 0)."""

    takes_inputs = True
    writes_latents = True

    def encode(self, sampler: SamplerSpec, denoise, key, cond, inputs, knobs):
        up = jnp.flip(jnp.asarray(sampler.sigmas, jnp.float32))
        return sampler.fn(denoise, inputs, up, key, cond=cond, **sampler.options, **knobs)

    def sample(self, sampler: SamplerSpec, denoise, key, cond, inputs, shape, knobs, place):
        x_t = self.encode(sampler, denoise, key, cond, inputs, knobs)
        sig = jnp.asarray(sampler.sigmas, jnp.float32)
        return sampler.fn(denoise, x_t, sig, key, cond=cond, **sampler.options, **knobs)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a task's samples are drawn: everything resolved, nothing read from a config.

    condition: how samples start (:class:`FromNoise`, :class:`Img2Img`, :class:`Inpaint`,
    :class:`Invert`);
    condition_type: ``condition.type``; condition_input: the file of input images
    (``condition.input``) of ``--mode sample``;
    with_variance: the sampler consumes a learned variance (ddpm on an iDDPM network);
    batch_size / num_samples / seed: ``sampler.*`` of ``--mode sample``.
    """

    sampler: SamplerSpec
    guidance: GuidanceSpec
    threshold: ThresholdSpec
    condition: Any
    condition_type: str
    condition_input: str
    with_variance: bool
    batch_size: int
    num_samples: int
    seed: int

    def knobs(self, **overrides: float) -> dict[str, Any]:
        """The traced knob values: ``{"sampler", "guidance", "threshold"}`` dicts; overrides
        ``guidance_scale=`` and any sampler knob by name."""
        sampler = dict(self.sampler.knobs)
        guidance = dict(self.guidance.knobs)
        for name, value in overrides.items():
            if name == "guidance_scale":
                if "scale" in guidance:
                    guidance["scale"] = value
                elif not isinstance(value, (int, float)) or value != 0:
                    raise ValueError(f"guidance_scale={value} for guidance "
                                     f"{self.guidance.name!r}, which has no scale")
            elif name in sampler:
                sampler[name] = value
            else:
                raise ValueError(f"{name!r} is not a knob of {self.sampler.name} "
                                 f"(knobs: guidance_scale, {', '.join(sampler)})")
        to_array = functools.partial(jnp.asarray, dtype=jnp.float32)
        return jax.tree.map(to_array, {"sampler": sampler, "guidance": guidance,
                                       "threshold": dict(self.threshold.knobs)})

    def uses_inputs(self, task) -> bool:
        """Whether ``--mode sample`` reads input images (the condition starts from them, or
        the task's network is conditioned on them)."""
        return self.condition.takes_inputs or task.needs_inputs

    def with_steps(self, sampler: SamplerSpec, batch_size: int | None = None) -> Sampling:
        return dataclasses.replace(self, sampler=sampler,
                                   batch_size=batch_size or self.batch_size)


def guided_denoiser(sampling: Sampling, denoise, knobs, classifier_params=None):
    """Applies the guidance and thresholding of ``sampling`` to a denoiser;
    ``classifier_params``: the guiding network's parameters (classifier guidance's classifier
    or autoguidance's guide), else None."""
    g = sampling.guidance
    if g.mode != "mean":  # mean-mode guidance acts in the sampler (sampler_guidance)
        static = dict(g.static)
        if g.classifier is not None:
            static["log_prob_fn"] = functools.partial(g.classifier.log_prob, classifier_params)
        if g.guide is not None:  # x0 alone: the main denoiser's learned variance is kept
            static["guide"] = g.guide.denoiser(classifier_params, False)
        denoise = g.fn(denoise, **static, **knobs["guidance"])
    return sampling.threshold.fn(denoise, **knobs["threshold"])


def sampler_guidance(sampling: Sampling, knobs, classifier_params=None) -> dict[str, Any]:
    """The guidance that acts inside the sampler rather than on the denoiser: for
    ``mode == "mean"``, ``{"mean_shift": fn}`` for ``samplers.ddpm`` (ADM's Alg. 1, the
    scale a traced knob); else ``{}``."""
    g = sampling.guidance
    if g.mode != "mean":
        return {}
    log_prob_fn = functools.partial(g.classifier.log_prob, classifier_params)
    shift = guidance_lib.classifier_mean_shift(log_prob_fn, knobs["guidance"]["scale"])
    return {"mean_shift": shift}


def _cond(task, sampling: Sampling, labels):
    """What the denoiser and guidance see as cond: the labels (a text model's tokens [B, L])
    when the network takes them or a classifier guides (an unconditional network ignores them, the
    classifier's log p(y | x) needs them: ADM's guided unconditional 256x256 model)."""
    return labels if task.takes_cond or sampling.guidance.classifier is not None else None


def param_sharding(task, mesh, shard_params: str = "replicated") -> Any:
    """How the sampling programs take the model's parameters: ``shard_params`` "replicated",
    one NamedSharding (whole on every device); "fsdp", the tree of the train state's fsdp
    placement of them (:func:`diffjax.parallel.state_sharding`): each device keeps 1/N of
    every large array, and the programs gather the weights inside each denoiser call
    (:func:`_denoiser`), so the trainer's grids, sample and eval use the state as it lies,
    with no whole copy beside it between calls."""
    if shard_params == "replicated":
        return parallel.replicated(mesh)
    return parallel.state_sharding(mesh, task.abstract_params(), shard_params)


def _denoiser(task, params, mesh, shard_params: str, with_variance: bool, **inputs):
    """``task.denoiser(params, ...)``; under "fsdp" one that gathers ``params`` anew in each
    call (:func:`diffjax.parallel.gathered`: data-parallel on whole weights). The optimization
    barrier ties the parameters to the call's input: without it XLA hoists the gathers of
    loop-invariant parameters out of the sampler's loop, and the gathered network would sit
    beside its shards on every device for the whole loop. Within a call, how many gathered
    weights are alive at once is the backend scheduler's choice (XLA:CPU issues all of a
    call's gathers before its first layer, so its peak still holds one whole copy)."""
    if shard_params == "replicated":
        return task.denoiser(params, with_variance, **inputs)

    def denoise(x, *args, **kwargs):
        p, x = jax.lax.optimization_barrier((params, x))
        return task.denoiser(parallel.gathered(p, mesh, shard_params), with_variance, **inputs)(
            x, *args, **kwargs)

    return denoise


def make_sample_program(task, sampling: Sampling, mesh, batch: int, with_inputs: bool,
                        shard_params: str = "replicated"):
    """A jitted ``(params, classifier_params, first_stage_params, key, labels [batch], inputs,
    knobs) -> images [batch, H, W, C]`` in [-1, 1]; params: placed as :func:`param_sharding`
    says for ``shard_params``; inputs: [batch, ...] images to condition on (None when
    ``with_inputs`` is False: plain sampling from noise); classifier_params: the guiding
    network's (classifier guidance's classifier or autoguidance's guide; else None);
    first_stage_params: the autoencoder's of a latent model (inputs encoded, samples
    decoded; else None); those two replicated."""
    shape = (batch, *task.image_shape)
    condition = sampling.condition if with_inputs else FromNoise()
    data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
    params_sh = param_sharding(task, mesh, shard_params)

    def run(params, classifier_params, first_stage_params, key, labels, inputs, knobs):
        cond = _cond(task, sampling, labels)
        model_inputs = {}
        if with_inputs and task.needs_inputs:
            k_inputs, key = jax.random.split(jax.random.fold_in(key, 1))
            model_inputs = task.sampling_inputs(inputs, k_inputs)
        if with_inputs:
            inputs = task.encode_inputs(first_stage_params, inputs)
        denoise = _denoiser(task, params, mesh, shard_params, sampling.with_variance,
                            **model_inputs)
        denoise = guided_denoiser(sampling, denoise, knobs, classifier_params)
        place = functools.partial(jax.lax.with_sharding_constraint, shardings=data)
        sampler_knobs = {**knobs["sampler"],
                         **sampler_guidance(sampling, knobs, classifier_params)}
        out = condition.sample(sampling.sampler, denoise, key, cond, inputs, shape,
                               sampler_knobs, place)
        return jnp.clip(task.decode_outputs(first_stage_params, out), -1.0, 1.0)

    return jax.jit(run, in_shardings=(params_sh, rep, rep, rep, data,
                                      data if with_inputs else None, rep), out_shardings=data)


def make_invert_program(task, sampling: Sampling, mesh, batch: int,
                        shard_params: str = "replicated"):
    """A jitted ``(params, classifier_params, first_stage_params, key, labels [batch], inputs
    [batch, H, W, C], knobs) -> x_T [batch, ...]``: :meth:`Invert.encode` of
    ``sampling.condition`` with the guided denoiser (classifier-free guidance and
    autoguidance invert the guided ODE); a latent model inverts the inputs' latents. params
    as in :func:`make_sample_program`."""
    data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
    params_sh = param_sharding(task, mesh, shard_params)

    def run(params, classifier_params, first_stage_params, key, labels, inputs, knobs):
        cond = _cond(task, sampling, labels)
        inputs = task.encode_inputs(first_stage_params, inputs)
        denoise = _denoiser(task, params, mesh, shard_params, sampling.with_variance)
        denoise = guided_denoiser(sampling, denoise, knobs, classifier_params)
        return sampling.condition.encode(sampling.sampler, denoise, key, cond, inputs,
                                         knobs["sampler"])

    return jax.jit(run, in_shardings=(params_sh, rep, rep, rep, data, data, rep),
                   out_shardings=data)


# Fields that never change the compiled program: knob values are its arguments, the others
# are read outside it.
_NOT_IN_PROGRAM = frozenset({"knobs", "batch_size", "num_samples", "seed", "condition_input",
                             "classifier_workdir", "guide_workdir", "guide_step"})


def _structure(obj: Any) -> Any:
    """A hashable description of everything in ``obj`` that shapes the sampling program
    (dataclass fields but those of _NOT_IN_PROGRAM, arrays by content)."""
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.shape, obj.dtype.str, hashlib.sha1(obj.tobytes()).hexdigest())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, (type, nn.Module)):
        return (type(obj), *((f.name, _structure(getattr(obj, f.name)))
                             for f in dataclasses.fields(obj) if f.name not in _NOT_IN_PROGRAM))
    if isinstance(obj, Mapping):
        return tuple(sorted((k, _structure(v)) for k, v in obj.items()))
    if isinstance(obj, (tuple, list)):
        return tuple(_structure(v) for v in obj)
    return obj


@dataclasses.dataclass(frozen=True, eq=False)
class _ProgramKey:
    """Equal for two (task, sampling, mesh, batch, with_inputs) that compile to the same
    program whatever their knob values: the key of :func:`_program`'s cache."""

    task: Any
    sampling: Sampling
    mesh: Any
    batch: int
    with_inputs: bool
    invert: bool = False  # make_invert_program rather than make_sample_program
    shard_params: str = "replicated"  # param_sharding's mode

    @functools.cached_property
    def structure(self) -> tuple:
        return (_structure(self.task), _structure(self.sampling), self.mesh, self.batch,
                self.with_inputs, self.invert, self.shard_params)

    def __hash__(self) -> int:
        return hash(self.structure)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ProgramKey) and self.structure == other.structure


@functools.lru_cache(maxsize=32)
def _program(key: _ProgramKey):
    """The jitted program of ``key``, shared by every Generator of the same structure (so a
    second ``--mode sample`` or eval point with another guidance scale compiles nothing)."""
    if key.invert:
        return make_invert_program(key.task, key.sampling, key.mesh, key.batch,
                                   key.shard_params)
    return make_sample_program(key.task, key.sampling, key.mesh, key.batch, key.with_inputs,
                               key.shard_params)


def balanced_labels(n: int, num_classes: int, grouped: bool = False) -> np.ndarray:
    """Labels 0..K-1 cycling (``grouped``: each class repeated n/K times in a row)."""
    if grouped:
        return np.repeat(np.arange(num_classes), math.ceil(n / num_classes))[:n].astype(np.int32)
    return (np.arange(n) % max(num_classes, 1)).astype(np.int32)


class Generator:
    """Draws samples from parameters in batches sharded over the mesh.

    Its programs (from noise, from inputs, inversion) compile on first use and are shared by
    every Generator of the same structure, whatever the knob values. Batch i uses
    ``fold_in(key, i)``, so a seed gives the same images however many devices there are.
    ``classifier_params``: the guiding network's parameters (classifier guidance's
    classifier, autoguidance's guide; else None);
    ``first_stage_params``: the autoencoder's of a latent model (samples are decoded);
    ``shard_params``: how the programs take the model's parameters (:func:`param_sharding`:
    "replicated", or "fsdp" as a train state of ``parallel.shard_state="fsdp"`` holds them).
    """

    def __init__(self, task, sampling: Sampling, mesh, classifier_params=None,
                 batch_size: int | None = None, first_stage_params=None,
                 shard_params: str = "replicated"):
        if shard_params not in parallel.SHARD_MODES:
            raise ValueError(f"shard_params={shard_params!r}; valid: "
                             f"{', '.join(parallel.SHARD_MODES)}")
        n = parallel.num_data_shards(mesh)
        self.task, self.sampling, self.mesh = task, sampling, mesh
        self.shard_params = shard_params
        self.batch = _round_up(batch_size or sampling.batch_size, n)
        self.classifier_params = classifier_params
        self.first_stage_params = first_stage_params

    def program(self, with_inputs: bool, invert: bool = False):
        return _program(_ProgramKey(self.task, self.sampling, self.mesh, self.batch,
                                    with_inputs, invert, self.shard_params))

    def __call__(self, params, num_samples: int, key, labels: np.ndarray | None = None,
                 grouped: bool = False, inputs: np.ndarray | None = None,
                 knobs: Mapping[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``num_samples`` images [N, H, W, C] in [-1, 1] (NumPy) and their labels [N] (a
        text model's: the tokens [N, L] of each sample's prompt, which it needs).

        inputs ([N, ...] in [-1, 1]): the images to condition on (img2img, inpaint, invert:
        [N, H, W, C]; superres: the low-resolution images). Without them a config with
        ``condition.type`` img2img / inpaint / invert samples from noise (the trainer's
        grids); a super-resolution task needs them. knobs: overrides of the traced knobs,
        e.g. ``{"guidance_scale": 3.0, "eta": 0.5}``.
        """
        if labels is None:
            if getattr(self.task, "samples_from_prompts", False):
                raise ValueError("a text model samples from prompts: pass labels = their "
                                 "tokens [N, L] (Tokenizer.encode)")
            labels = balanced_labels(num_samples, self.task.num_classes, grouped)
        if inputs is None and self.task.needs_inputs:
            raise ValueError("a super-resolution model samples from low-resolution inputs: "
                             "pass inputs (--config.condition.input=PATH)")
        if inputs is not None and not self.sampling.uses_inputs(self.task):
            raise ValueError("inputs given but condition.type is 'none'")
        images = self._run(self.program(inputs is not None), params, num_samples, key,
                           labels, inputs, knobs)
        return images, np.asarray(labels)

    def latents(self, params, inputs: np.ndarray, key, labels: np.ndarray | None = None,
                knobs: Mapping[str, float] | None = None) -> np.ndarray:
        """x_T [N, H, W, C] of the inputs [N, H, W, C] in [-1, 1] (``condition.type``
        invert: :meth:`Invert.encode`); labels [N] for a class-conditional model (default:
        :func:`balanced_labels`)."""
        if not getattr(self.sampling.condition, "writes_latents", False):
            raise ValueError(f"latents need condition.type='invert', not "
                             f"{self.sampling.condition_type!r}")
        if labels is None:
            labels = balanced_labels(len(inputs), self.task.num_classes)
        return self._run(self.program(True, invert=True), params, len(inputs), key, labels,
                         inputs, knobs)

    def _run(self, fn, params, num_samples: int, key, labels, inputs, knobs) -> np.ndarray:
        """``fn`` over batches of ``self.batch`` (the last one padded), concatenated.

        labels and inputs are the whole run's, the same on every process; each batch is
        placed over all processes' devices (``jax.device_put`` of the same array on every
        process) and every process receives all of its images."""
        values = self.sampling.knobs(**(knobs or {}))
        data = parallel.data_sharding(self.mesh)
        out = []
        for i in range(math.ceil(num_samples / self.batch)):
            chunk = labels[i * self.batch:(i + 1) * self.batch]
            padded = np.pad(chunk, ((0, self.batch - len(chunk)),) + ((0, 0),) * (chunk.ndim - 1))
            part = None
            if inputs is not None:
                part = inputs[i * self.batch:(i + 1) * self.batch]
                part = np.pad(part, ((0, self.batch - len(part)),) + ((0, 0),) * (part.ndim - 1))
            padded, part = jax.device_put((padded, part), data)
            with parallel.gc_paused():  # the first call traces the program
                got = fn(params, self.classifier_params, self.first_stage_params,
                         jax.random.fold_in(key, i), padded, part, values)
            out.append(_fetch(got)[:len(chunk)])
            if i == 0:  # what compiling (or reading) the program freed goes back to the system
                hugepages.release_freed_memory()
        return np.concatenate(out)


def _fetch(x: jax.Array) -> np.ndarray:
    """``x`` whole, as NumPy, on every process (each holds only its devices' part of an array
    sharded over several processes)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k
