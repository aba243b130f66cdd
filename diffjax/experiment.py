"""ConfigDict -> Experiment: the one place names become implementations.

:func:`build` validates a config (:func:`diffjax.configlib.validate`) and resolves it, through
one name -> factory table per concept, into an :class:`diffjax.specs.Experiment` of small
frozen specs and a :class:`diffjax.tasks.Task`:

  TASKS        what is trained          (diffusion / superres / text / classifier /
                                         autoencoder)
  MODELS       the network              (``model.name``: unet / classifier / dit /
                                         autoencoder_kl)
  SCHEDULES    the noise schedule       (``diffusion.schedule``)
  SIGMA_SPACINGS  the sampling sigmas   (``sampler.sigma_spacing``)
  SAMPLERS     the sampling algorithm   (``sampler.name``), its options checked against it
  GUIDANCE     the denoiser transform   (``guidance.type``)
  THRESHOLDING the x0 transform         (``sampler.thresholding``)
  CONDITIONS   conditioning at sampling (``condition.type``)

Configs referenced by path (a guiding classifier, the feature network of ``--mode eval``)
are loaded and resolved here too, so nothing below reads a config file. Below this module
nothing imports ``ml_collections``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from diffjax import configlib, generate, specs, tasks
from diffjax import data as data_lib
from diffjax.configlib import ConfigError
from diffjax.data import latent_cache, text_source
from diffjax.diffusion import conditional, guidance, samplers, schedules
from diffjax.diffusion import sigmas as sigma_lib
from diffjax.diffusion import superres
from diffjax.evaluation import sample_metrics
from diffjax.models import autoencoder, classifier, dit, layers, text_encoder, unet
from diffjax.train import posthoc_ema
from diffjax.train.step import LossSpec

# Options of ``config.sampler`` that are a sampler's keyword arguments; None = the sampler's
# own default. Each is checked against the chosen sampler's signature.
SAMPLER_OPTIONS = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")
# Non-float options (None = the sampler's default), static arguments of the program.
STATIC_SAMPLER_OPTIONS = ("order", "variant")
_STATIC_CHOICES = {"order": (1, 2, 3), "variant": samplers.UNIPC_VARIANTS}
# Keyword arguments of samplers that are not options (see diffusion.samplers); ddpm's
# mean_shift is classifier guidance in mean mode (generate.sampler_guidance).
_SAMPLER_ARGS = ("cond", "return_trajectory", "mean_shift")

SCHEDULES = schedules.SCHEDULES
SAMPLERS = samplers.SAMPLERS
GUIDANCE = guidance.GUIDANCE
THRESHOLDING = guidance.THRESHOLDING


def build(c: ml_collections.ConfigDict, *, num_devices: int = 1,
          mode: str = "train") -> specs.Experiment:
    """The validated, resolved experiment of config ``c``.

    num_devices: the data-parallel width the batch sizes must divide; mode: the ``--mode``
    it is built for (``eval`` also resolves and checks the eval section). Raises
    ConfigError (one line) for anything wrong in the config.
    """
    configlib.check_name("data.source", c.data.source, data_lib.SOURCES)
    data = _data(c)
    # The network's view: a latent model's data geometry is the latent's (what the shape
    # checks of validate see); the pixels' are the autoencoder's to check.
    latent = _latent(c, mode) if c.data.latent.workdir or c.data.latent.config else None
    net_c = c
    if latent is not None:
        h, _, channels = latent.autoencoder.task.latent_shape
        net_c = copy.deepcopy(c)
        net_c.data.image_size, net_c.data.channels = h, channels
    configlib.validate(net_c, num_devices=num_devices)
    if latent is None:
        _latent(c, mode)  # --mode encode without data.latent: its one-line error
    _check_model(net_c)
    _check_context(c, mode)
    ds = _schedule(c)
    task = TASKS[_task_kind(c)](net_c, _data(net_c), ds)
    if latent is not None:
        latent_task = (tasks.LatentTextDiffusionTask
                       if isinstance(task, tasks.TextDiffusionTask) else tasks.LatentDiffusionTask)
        task = latent_task(
            **{f.name: getattr(task, f.name) for f in dataclasses.fields(task)},
            first_stage=latent.autoencoder.task, scale_factor=latent.scale_factor,
            sample_posterior=bool(c.data.latent.sample_posterior),
            frame_offset=latent.frame_offset, pixel_size=latent.pixel_size)
    return specs.Experiment(
        model_name=c.model.name, data=data, task=task, schedule=ds,
        sampling=_sampling(net_c, task, ds), optim=_optim(c), train=_train(c),
        eval=_eval(c, mode, ds), resolved=c.to_dict(), config_text=str(c), latent=latent,
        ema_sigma_rel=float(c.ema.sigma_rel), text=_text(c))


def load(path: str, *, num_devices: int = 1, mode: str = "train") -> specs.Experiment:
    """The experiment of a config file (``path`` or ``path:variant``)."""
    return build(configlib.load_config_file(path), num_devices=num_devices, mode=mode)


# ----------------------------------------------------------------------------- data, model


def _data(c: ml_collections.ConfigDict) -> specs.DataSpec:
    d = c.data
    return specs.DataSpec(
        source=d.source, path=d.path, split=d.split, image_size=d.image_size,
        channels=d.channels, num_classes=d.num_classes, batch_size=d.batch_size,
        random_flip=d.random_flip, resize=d.resize, num_workers=d.num_workers)


def autoencoder_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of an autoencoder run (``WORKDIR/config.json``, written by training and by
    ``diffjax.convert``) over today's defaults (fields added since keep their defaults)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(
            f"data.latent.workdir={workdir!r} has no config.json: train an autoencoder there "
            "(--config experiments/fashion_mnist_autoencoder.py --workdir DIR) or convert "
            "SD's VAE into it (python -m diffjax.convert --config "
            "experiments/autoencoder_sd_vae.py --checkpoint FILE --workdir DIR)")
    try:
        stored = json.loads(path.read_text())
        c = configlib.base_config()
        c.update_from_flattened_dict(_flatten(stored))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path} cannot be read as a diffjax config ({type(e).__name__}: "
                          f"{e}); point data.latent.workdir at an autoencoder run") from e
    return c


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _latent(c: ml_collections.ConfigDict, mode: str) -> specs.LatentSpec | None:
    """The autoencoder of ``data.latent`` and its scale factor; None for a pixel model."""
    lat = c.data.latent
    if not lat.workdir and not lat.config:
        if mode == "encode":
            raise ConfigError("--mode encode writes the latents of data.latent.workdir's "
                              "autoencoder; set --config.data.latent.workdir=DIR (and "
                              "data.latent.cache=DIR to write to)")
        return None
    where = f"data.latent.config={lat.config!r}" if lat.config else \
        f"data.latent.workdir={lat.workdir!r}"
    ae_c = (configlib.load_config_file(lat.config) if lat.config
            else autoencoder_config(lat.workdir))
    if ae_c.model.name != "autoencoder_kl":
        raise ConfigError(f"{where} is a {ae_c.model.name!r} model, not an autoencoder "
                          "(model.name='autoencoder_kl')")
    want = (c.data.image_size, c.data.channels)
    got = (ae_c.data.image_size, ae_c.data.channels)
    if got[1] != want[1]:
        raise ConfigError(f"{where} encodes {got[1]}-channel images, this config's data have "
                          f"{want[1]}; set data.channels (or choose another autoencoder)")
    # An autoencoder trained on images padded to a larger canvas keeps that frame; otherwise
    # it is convolutional and encodes images of this config's size.
    padded = ae_c.data.resize == "pad" and got[0] > want[0]
    if not padded:
        ae_c.data.image_size = want[0]
        got = want
    try:
        ae = build(ae_c)
    except ConfigError as e:
        raise ConfigError(f"{where} at data.image_size={want[0]}: {e}") from e
    if mode == "eval" and "nll" in tuple(c.eval.metrics):
        raise ConfigError("eval.metrics 'nll' is the likelihood of pixels; a latent model's "
                          "would be of its latents, which diffjax does not report: remove nll")
    if mode == "encode" and not lat.cache:
        raise ConfigError("--mode encode writes data.latent.cache; set "
                          "--config.data.latent.cache=DIR")
    scale = float(lat.scale_factor)
    if scale == 0.0 and mode not in ("encode", "summary"):
        if not lat.cache:
            raise ConfigError(
                "data.latent.scale_factor=0 means the cache's measured 1/std, but "
                "data.latent.cache is empty; give the factor (0.18215 for SD's VAE) or make a "
                "cache with --mode encode")
        try:
            meta = latent_cache.read_meta(lat.cache)
        except data_lib.DataError as e:
            raise ConfigError(f"{e} (data.latent.scale_factor=0 reads the measured factor "
                              "from it; or give --config.data.latent.scale_factor)") from e
        scale = float(meta.get("measured_scale_factor") or 0.0)
        if scale <= 0.0:
            raise ConfigError(f"latent cache {lat.cache} has no measured scale factor (status "
                              f"{meta.get('status')!r}); finish it with --mode encode or give "
                              "--config.data.latent.scale_factor")
    step = int(lat.checkpoint_step)
    offset = (got[0] - want[0]) // 2  # sizing.pad_center's placement
    return specs.LatentSpec(frame_offset=(offset, offset), pixel_size=want[0],
                            autoencoder=ae, workdir=lat.workdir,
                            checkpoint_step=None if step < 0 else step, cache=lat.cache,
                            shard_size=int(lat.shard_size), scale_factor=scale)


def _check_context(c: ml_collections.ConfigDict, mode: str) -> None:
    """ConfigError for context conditioning (model.context_dim, section text) where it
    cannot run."""
    m = c.model
    if m.context_dim < 0 or m.transformer_depth < 1:
        raise ConfigError(f"model.context_dim={m.context_dim} must be >= 0 and "
                          f"model.transformer_depth={m.transformer_depth} >= 1")
    configlib.check_name("text.encoder", c.text.encoder, TEXT_ENCODERS)
    if is_text_model(c):
        _check_text(c, mode)
        return
    if m.context_dim == 0:
        return
    if m.name != "unet":
        raise ConfigError(f"model.context_dim={m.context_dim} conditions the UNet only; set it "
                          f"to 0 for model.name={m.name!r}")
    if mode not in ("summary", "encode", "convert"):
        raise ConfigError(f"--mode {mode} of a context-conditioned UNet (model.context_dim="
                          f"{m.context_dim}) needs a context source: a text encoder trained "
                          "with it (--config.text.encoder=transformer, text.captions), or use "
                          "--mode summary / python -m diffjax.convert")


# text.encoder: "none", "transformer" (GLIDE's text transformer trained with the model) or
# "embeddings" (a user's precomputed embeddings stored with the data)
TEXT_ENCODERS = ("none", "transformer", "embeddings")


def is_text_model(c: ml_collections.ConfigDict) -> bool:
    return c.text.encoder != "none"


def _precomputed(c: ml_collections.ConfigDict) -> bool:
    return c.text.encoder == "embeddings"


def _check_text(c: ml_collections.ConfigDict, mode: str) -> None:
    """ConfigError for a text-conditioned model's options (section text) and what it cannot
    be combined with."""
    t, m = c.text, c.model
    if _precomputed(c):
        if not t.embeddings:
            raise ConfigError("text.encoder='embeddings' reads the context from the data: set "
                              "--config.text.embeddings=FILE.npz (context [N, L, width], mask "
                              "[N, L], one row per training example) or FILE.array_record")
        if mode == "eval":
            raise ConfigError("--mode eval scores prompts by their text, which precomputed "
                              "embeddings do not carry; draw samples with --mode sample "
                              "(text.sample_embeddings) instead")
    else:
        configlib.check_name("text.tokenizer", t.tokenizer, ("word", "byte"))
        configlib.check_name("text.captions", t.captions, tuple(text_source.CAPTIONERS))
    if t.context_length < 1 or t.width < 1 or t.layers < 0 or t.heads < 1 or t.width % t.heads:
        raise ConfigError(f"text.context_length={t.context_length} and text.width={t.width} "
                          f"must be >= 1, text.layers={t.layers} >= 0, and text.heads="
                          f"{t.heads} must divide the width")
    if not _precomputed(c) and t.tokenizer == "word" and t.vocab_size < 2:
        raise ConfigError(f"text.vocab_size={t.vocab_size} must be >= 2 (padding and a word; "
                          "a byte tokenizer has its own 257)")
    if m.name != "unet" or m.context_dim not in (0, t.width):
        raise ConfigError(f"text.encoder={t.encoder!r} conditions a UNet (model.name='unet', "
                          f"have {m.name!r}) through a context of text.width={t.width}: set "
                          f"model.context_dim to 0 or {t.width} (have {m.context_dim})")
    if m.class_cond:
        raise ConfigError("a text model is conditioned on captions, which name the class: "
                          "set model.class_cond=False")
    if c.guidance.type not in ("none", "classifier_free"):
        raise ConfigError(f"guidance.type={c.guidance.type!r} is not available for a text "
                          "model; use 'classifier_free' (against the learned null caption) "
                          "or 'none'")
    if c.condition.type != "none":
        raise ConfigError("a text model samples from noise (in pixel space, or in its "
                          "autoencoder's latents with data.latent): set condition.type='none'")


def _check_model(c: ml_collections.ConfigDict) -> None:
    """ConfigError for model options the network would only reject at init: the UNet's and
    the classifier's choices and attention heads, the DiT's position table."""
    m = c.model
    if m.attention_impl == "cudnn" and (jax.default_backend() != "gpu"
                                        or m.dtype != "bfloat16"):
        raise ConfigError(f"model.attention_impl='cudnn' (cuDNN flash attention) needs a GPU "
                          f"and model.dtype='bfloat16' (have {jax.default_backend()}, "
                          f"{m.dtype}); use --config.model.attention_impl=auto, which picks "
                          "it where it applies")
    if m.name == "dit":
        hidden = m.dit.hidden_size or dit.DIT_SIZES[m.dit.size][1]
        if hidden % 4:
            raise ConfigError(f"model.dit.hidden_size={hidden} must be a multiple of 4 (the "
                              "2-D sin-cos position table)")
    if m.name not in ("unet", "classifier"):
        return
    configlib.check_name("model.cpu_fast_conv", m.cpu_fast_conv, layers.CPU_FAST_CONV_CHOICES)
    if m.name == "classifier":
        configlib.check_name("model.pool", m.pool, classifier.POOLS)
        if m.pool == "attention" and m.num_head_channels < 1:
            raise ConfigError(f"model.pool='attention' needs model.num_head_channels > 0 (got "
                              f"{m.num_head_channels}; ADM uses 64), or model.pool='adaptive'")
    # channels of every attention block: the levels in attention_resolutions and the middle
    # block (the UNet's; the classifier's encoder has one too)
    size, widths = c.data.image_size, {int(m.model_channels * m.channel_mult[-1])}
    for level, mult in enumerate(m.channel_mult):
        if size // 2 ** level in tuple(m.attention_resolutions):
            widths.add(int(m.model_channels * mult))
    heads = [("model.num_head_channels", m.num_head_channels)] if m.num_head_channels != -1 \
        else [("model.num_heads", m.num_heads)]
    if m.num_head_channels == -1 and m.name == "unet" and m.num_heads_upsample != -1:
        heads.append(("model.num_heads_upsample", m.num_heads_upsample))
    for field, value in heads:
        bad = sorted(w for w in widths if value < 1 or w % value)
        if bad:
            raise ConfigError(f"{field}={value} does not divide the {bad} channels of the "
                              "attention blocks; choose a divisor of "
                              f"{sorted(widths)} (or -1 for num_head_channels)")


def _shared_model_options(m: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ADM options the UNet and the classifier share."""
    return dict(
        model_channels=m.model_channels,
        num_res_blocks=m.num_res_blocks,
        channel_mult=tuple(m.channel_mult),
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        num_head_channels=m.num_head_channels,
        use_scale_shift_norm=m.use_scale_shift_norm,
        resblock_updown=m.resblock_updown,
        conv_resample=m.conv_resample,
        use_new_attention_order=m.use_new_attention_order,
        dropout=m.dropout,
        norm_groups=m.norm_groups,
        dtype=jnp.dtype(m.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        remat=m.remat,
        remat_policy=m.remat_policy,
        attention_impl=m.attention_impl,
        cpu_fast_conv=m.cpu_fast_conv,
    )


def learns_variance(c: ml_collections.ConfigDict) -> bool:
    return c.diffusion.variance_type in ("learned", "learned_range")


def _unet(c: ml_collections.ConfigDict) -> unet.UNet:
    m = c.model
    return unet.UNet(
        out_channels=c.data.channels,
        num_heads_upsample=m.num_heads_upsample,
        num_classes=c.data.num_classes if m.class_cond else None,
        # The null-label row exists when the model was trained with label dropout, whatever
        # guidance samples it.
        class_null_label=m.class_cond and c.guidance.label_dropout > 0,
        learn_sigma=learns_variance(c),
        aug_embed=c.condition.type == "superres" and c.condition.aug_max > 0,
        context_dim=m.context_dim, use_spatial_transformer=m.use_spatial_transformer,
        transformer_depth=m.transformer_depth,
        use_linear_in_transformer=m.use_linear_in_transformer, context_pool=m.context_pool,
        **_shared_model_options(m),
    )


def _classifier(c: ml_collections.ConfigDict) -> classifier.EncoderClassifier:
    return classifier.EncoderClassifier(num_classes=c.data.num_classes, pool=c.model.pool,
                                        **_shared_model_options(c.model))


def _dit(c: ml_collections.ConfigDict) -> dit.DiT:
    d = c.model.dit
    depth, hidden, heads = dit.DIT_SIZES[d.size]
    hidden = d.hidden_size or hidden
    heads = d.num_heads or heads
    if hidden % heads:
        raise ConfigError(f"model.dit.hidden_size={hidden} is not divisible by num_heads="
                          f"{heads}; set --config.model.dit.num_heads to a divisor")
    return dit.DiT(
        input_size=c.data.image_size, patch_size=d.patch_size, in_channels=c.data.channels,
        hidden_size=hidden, depth=d.depth or depth, num_heads=heads,
        mlp_ratio=float(d.mlp_ratio),
        # only decides whether the null-label row exists (label dropout is the trainer's)
        class_dropout_prob=float(c.guidance.label_dropout) if c.model.class_cond else 0.0,
        num_classes=c.data.num_classes if c.model.class_cond else None,
        learn_sigma=learns_variance(c), dtype=jnp.dtype(c.model.dtype),
        param_dtype=jnp.dtype(c.model.param_dtype), remat=c.model.remat,
        remat_policy=c.model.remat_policy, attention_impl=c.model.attention_impl)


def _autoencoder(c: ml_collections.ConfigDict) -> autoencoder.AutoencoderKL:
    a = c.model.autoencoder
    return autoencoder.AutoencoderKL(
        in_channels=c.data.channels, out_channels=c.data.channels,
        latent_channels=a.latent_channels, block_out_channels=tuple(a.block_out_channels),
        layers_per_block=a.layers_per_block, norm_num_groups=a.norm_num_groups,
        dtype=jnp.dtype(c.model.dtype), param_dtype=jnp.dtype(c.model.param_dtype),
        remat=c.model.remat, cpu_fast_conv=c.model.cpu_fast_conv,
        use_discriminator=a.disc_start >= 0, disc_layers=a.disc_layers,
        disc_channels=a.disc_channels)


MODELS: dict[str, Callable[[ml_collections.ConfigDict], Any]] = {
    "unet": _unet,
    "classifier": _classifier,
    "dit": _dit,
    "autoencoder_kl": _autoencoder,
}


def build_model(c: ml_collections.ConfigDict):
    """The Flax module of ``model.name`` with the ADM options of ``c.model``; a text model
    (``text.encoder``): that UNet with context width ``text.width`` behind its text
    encoder."""
    if not is_text_model(c):
        return MODELS[c.model.name](c)
    t = c.text
    inner = copy.deepcopy(c)
    inner.model.context_dim = t.width
    if _precomputed(c):
        return text_encoder.EmbeddingConditioned(
            denoiser=_unet(inner), context_length=t.context_length, width=t.width,
            param_dtype=jnp.dtype(c.model.param_dtype))
    vocab = 257 if t.tokenizer == "byte" else t.vocab_size
    encoder = text_encoder.TextEncoder(
        vocab_size=vocab, context_length=t.context_length, width=t.width, layers=t.layers,
        heads=t.heads, dtype=jnp.dtype(c.model.dtype), param_dtype=jnp.dtype(c.model.param_dtype),
        attention_impl=c.model.attention_impl)
    return text_encoder.TextConditioned(denoiser=_unet(inner), encoder=encoder)


# ----------------------------------------------------------------------------- tasks


def _loss(c: ml_collections.ConfigDict) -> LossSpec:
    d = c.diffusion
    kwargs = {"vlb_weight": d.vlb_weight, "min_snr_gamma": d.min_snr_gamma,
              "p2_gamma": d.p2_gamma, "p2_k": d.p2_k}
    cfg = c.guidance.type == "classifier_free"
    return LossSpec(
        prediction=d.prediction, loss_type=d.loss, variance_type=d.variance_type,
        weighting=d.weighting, loss_kwargs=tuple(sorted(kwargs.items())),
        timestep_sampler=d.timestep_sampler,
        label_dropout=c.guidance.label_dropout if cfg else 0.0,
        null_label=_null_cond(c), cond_key=_cond_key(c), sigma_data=float(d.sigma_data),
        p_mean=float(d.P_mean), p_std=float(d.P_std),
    )


def _cond_key(c: ml_collections.ConfigDict) -> str:
    """The batch entry the network is conditioned on."""
    if not is_text_model(c):
        return "label"
    return "context" if _precomputed(c) else "tokens"


def _null_cond(c: ml_collections.ConfigDict) -> int:
    """What classifier-free guidance drops the condition to: the null label, a caption row
    of -1 (the learned null caption) or an all-masked (zero) row of embeddings."""
    if not is_text_model(c):
        return c.data.num_classes
    return 0 if _precomputed(c) else -1


def _time_scale(c: ml_collections.ConfigDict) -> float:
    """The factor on the network's timestep input: 1000 / T under rescale_timesteps."""
    return 1000.0 / c.diffusion.num_timesteps if c.diffusion.rescale_timesteps else 1.0


def _diffusion_task(c, data: specs.DataSpec, ds) -> tasks.DiffusionTask:
    return tasks.DiffusionTask(
        model=build_model(c), image_shape=data.image_shape, num_classes=data.num_classes,
        schedule=ds, time_scale=_time_scale(c), class_cond=c.model.class_cond, loss=_loss(c),
        learned_variance=learns_variance(c), context_dim=c.model.context_dim)


def _text_task(c, data: specs.DataSpec, ds) -> tasks.TextDiffusionTask:
    return tasks.TextDiffusionTask(
        model=build_model(c), image_shape=data.image_shape, num_classes=data.num_classes,
        schedule=ds, time_scale=_time_scale(c), loss=_loss(c),
        learned_variance=learns_variance(c), context_length=c.text.context_length,
        context_width=c.text.width if _precomputed(c) else 0)


def _text(c: ml_collections.ConfigDict) -> specs.TextSpec | None:
    prompts = c.sampler.prompts
    if not is_text_model(c):
        if prompts is not None:
            raise ConfigError("sampler.prompts are for a text model (text.encoder="
                              "'transformer'); this one takes none")
        return None
    t = c.text
    if _precomputed(c) and prompts is not None:
        raise ConfigError("sampler.prompts are texts; a model of precomputed embeddings "
                          "samples from text.sample_embeddings=FILE.npz")
    if prompts is not None and not prompts:
        raise ConfigError("sampler.prompts is empty: give at least one prompt, e.g. "
                          "--config.sampler.prompts='(\"a dark sneaker\",)', or leave it "
                          "unset for the captioner's defaults")
    return specs.TextSpec(tokenizer=t.tokenizer, context_length=t.context_length,
                          vocab_size=t.vocab_size, captions=t.captions,
                          caption_seed=int(t.caption_seed),
                          caption_keep_prob=float(t.caption_keep_prob),
                          prompts=tuple(str(p) for p in prompts or ()), encoder=t.encoder,
                          width=int(t.width), embeddings=t.embeddings,
                          sample_embeddings=t.sample_embeddings)


def _superres_task(c, data: specs.DataSpec, ds) -> tasks.SuperResTask:
    k = c.condition
    return tasks.SuperResTask(
        model=build_model(c), image_shape=data.image_shape, num_classes=data.num_classes,
        schedule=ds, time_scale=_time_scale(c), class_cond=c.model.class_cond, loss=_loss(c),
        learned_variance=learns_variance(c), context_dim=c.model.context_dim,
        superres=superres.SuperRes(low_res_size=k.low_res_size, aug_max=k.aug_max,
                                   aug_sample=k.aug_sample))


def _classifier_task(c, data: specs.DataSpec, ds) -> tasks.ClassifierTask:
    return tasks.ClassifierTask(
        model=build_model(c), image_shape=data.image_shape, num_classes=data.num_classes,
        schedule=ds, time_scale=_time_scale(c), noised=c.model.classifier_noised)


def _autoencoder_task(c, data: specs.DataSpec, ds) -> tasks.AutoencoderTask:
    a = c.model.autoencoder
    return tasks.AutoencoderTask(
        model=build_model(c), image_shape=data.image_shape, num_classes=data.num_classes,
        schedule=ds, recon_loss=a.recon_loss, kl_weight=float(a.kl_weight),
        sample_posterior=bool(a.sample_posterior), disc_start=int(a.disc_start),
        disc_weight=float(a.disc_weight))


TASKS: dict[str, Callable[..., tasks.Task]] = {
    "diffusion": _diffusion_task,
    "superres": _superres_task,
    "text": _text_task,
    "classifier": _classifier_task,
    "autoencoder": _autoencoder_task,
}


def _task_kind(c: ml_collections.ConfigDict) -> str:
    """The TASKS key: a classifier model, else a (super-resolution) diffusion model."""
    if c.model.name in ("classifier", "autoencoder_kl"):
        return {"classifier": "classifier", "autoencoder_kl": "autoencoder"}[c.model.name]
    if is_text_model(c):
        return "text"
    return "superres" if c.condition.type == "superres" else "diffusion"


# ----------------------------------------------------------------------------- sampling


def _schedule(c: ml_collections.ConfigDict) -> schedules.DiscreteSchedule:
    """The T-step table of ``diffusion.schedule`` (the "karras" one on [sigma_min,
    sigma_max]); a continuous-sigma (lognormal) model keeps it for bookkeeping only."""
    d = c.diffusion
    kwargs = ({"sigma_min": float(d.sigma_min), "sigma_max": float(d.sigma_max)}
              if d.schedule == "karras" else {})
    return SCHEDULES[d.schedule](**kwargs).discretize(d.num_timesteps)


def _sigma_range(c, ds) -> tuple[float, float]:
    """The sampling range: the table's, or [sigma_min, sigma_max] of a continuous model."""
    if c.diffusion.timestep_sampler == "lognormal":
        return float(c.diffusion.sigma_min), float(c.diffusion.sigma_max)
    return float(ds.sigmas[0]), float(ds.sigmas[-1])


def _model_sigmas(c, ds) -> np.ndarray:
    s = c.sampler
    return sigma_lib.discrete_sigmas(ds.sigmas, s.num_steps, s.timestep_spacing or "uniform")


def _karras_sigmas(c, ds) -> np.ndarray:
    lo, hi = _sigma_range(c, ds)
    return sigma_lib.karras_sigmas(c.sampler.num_steps, lo, hi, c.sampler.rho)


def _loglinear_sigmas(c, ds) -> np.ndarray:
    lo, hi = _sigma_range(c, ds)
    return sigma_lib.loglinear_sigmas(c.sampler.num_steps, lo, hi)


SIGMA_SPACINGS: dict[str, Callable[..., np.ndarray]] = {
    "model": _model_sigmas,
    "karras": _karras_sigmas,
    "loglinear": _loglinear_sigmas,
}


def sampler_options(fn: Callable[..., Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """(float options with their defaults, other options with theirs) of a sampler."""
    floats, other = {}, {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in _SAMPLER_ARGS:
            continue
        (floats if isinstance(p.default, float) else other)[p.name] = p.default
    return floats, other


def _sampler(c: ml_collections.ConfigDict, ds) -> specs.SamplerSpec:
    s = c.sampler
    fn = SAMPLERS[s.name]
    floats, other = sampler_options(fn)
    for name in SAMPLER_OPTIONS:
        value = s[name]
        if value is not None and name not in floats:
            takes = ", ".join(f"sampler.{o}" for o in floats) or "no options"
            raise ConfigError(
                f"sampler.{name}={value} is not an option of sampler {s.name!r}, which takes "
                f"{takes}; remove --config.sampler.{name} or choose another sampler.name")
    knobs = {name: float(s[name]) if s.get(name) is not None else default
             for name, default in floats.items()}
    if s.name == "ddim" and not 0.0 <= knobs["eta"] <= 1.0:
        raise ConfigError(f"sampler.eta={knobs['eta']} must be in [0, 1] for ddim")
    options = {}
    for name in STATIC_SAMPLER_OPTIONS:  # compiled into the program, not traced
        if s[name] is None:
            continue
        if name not in other:
            raise ConfigError(
                f"sampler.{name}={s[name]!r} is not an option of sampler {s.name!r}; remove "
                f"--config.sampler.{name} or choose a sampler that takes it (unipc)")
        if s[name] not in _STATIC_CHOICES[name]:
            raise ConfigError(f"sampler.{name}={s[name]!r} is not valid for {s.name}; valid: "
                              f"{', '.join(map(str, _STATIC_CHOICES[name]))}")
        options[name] = s[name]
    if "variance" in other:  # ddpm: the variance the model was trained for
        options["variance"] = "learned" if learns_variance(c) else c.diffusion.variance_type
    sigmas = SIGMA_SPACINGS[s.sigma_spacing](c, ds)
    return specs.SamplerSpec(name=s.name, fn=fn, num_steps=s.num_steps, sigmas=sigmas,
                             options=options, knobs=knobs)


def _no_guidance(c: ml_collections.ConfigDict) -> generate.GuidanceSpec:
    return generate.GuidanceSpec(name="none", fn=GUIDANCE["none"], static={}, knobs={})


def _classifier_free(c: ml_collections.ConfigDict) -> generate.GuidanceSpec:
    g = c.guidance
    static = {"null_cond": _null_cond(c)}
    if g.channels:
        static["channels"] = int(g.channels)
    return generate.GuidanceSpec(
        name=g.type, fn=GUIDANCE[g.type], static=static,
        knobs={"scale": float(g.scale), "rescale": float(g.rescale),
               "interval": (float(g.interval_sigma_min), float(g.interval_sigma_max))})


def _classifier_guidance(c: ml_collections.ConfigDict) -> generate.GuidanceSpec:
    g = c.guidance
    if not g.classifier_config or not g.classifier_workdir:
        raise ConfigError(
            "guidance.type='classifier' needs --config.guidance.classifier_config="
            "experiments/classifier_*.py and --config.guidance.classifier_workdir=DIR of "
            "its trained run")
    guide = load(g.classifier_config)
    if not isinstance(guide.task, tasks.ClassifierTask):
        raise ConfigError(f"guidance.classifier_config={g.classifier_config!r} is not a "
                          "classifier config (model.name='classifier')")
    return generate.GuidanceSpec(name=g.type, fn=GUIDANCE[g.type], static={},
                                 knobs={"scale": float(g.scale)}, classifier=guide.task,
                                 classifier_workdir=g.classifier_workdir,
                                 mode=_classifier_mode(c))


def _classifier_mode(c: ml_collections.ConfigDict) -> str:
    """``guidance.classifier_mode`` resolved: "auto" is ADM's choice, the mean shift (Alg. 1)
    for the ancestral ``ddpm`` sampler and the score shift (Alg. 2) for every other sampler
    (DDIM, the ODE and SDE solvers) and for RePaint, whose own ancestral steps take no mean
    shift."""
    mode = c.guidance.get("classifier_mode", "auto")
    repaint = c.condition.type == "inpaint" and c.condition.repaint_resample > 1
    if mode == "auto":
        return "mean" if c.sampler.name == "ddpm" and not repaint else "score"
    if mode == "mean" and (c.sampler.name != "ddpm" or repaint):
        raise ConfigError(
            f"guidance.classifier_mode='mean' (ADM's mean shift) needs the ancestral sampler "
            f"(sampler.name='ddpm', no RePaint), got sampler.name={c.sampler.name!r}"
            f"{' with condition.repaint_resample > 1' if repaint else ''}; use "
            "--config.guidance.classifier_mode=score or auto")
    return mode


def _autoguidance(c: ml_collections.ConfigDict) -> generate.GuidanceSpec:
    """Autoguidance: the guide's task from ``guidance.guide_config`` ("" = ``c`` itself, an
    earlier checkpoint of the same architecture), checked to denoise the same images with
    the same labels. Its prediction and schedule may differ from the main model's: each
    task's denoiser maps the samplers' VE (x, sigma) to its own VP input and time (the
    timestep of that sigma in its own schedule, clamped to its range) and its output to
    x0_hat (process.make_denoiser), so both give x0 of the same x at the same sigma."""
    g = c.guidance
    if g.guide_config:
        where = f"guidance.guide_config={g.guide_config!r}"
        try:
            gc = configlib.load_config_file(g.guide_config)
            gc.guidance.type, gc.guidance.channels = "none", 0  # the guide is sampled unguided
            guide = build(gc).task
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
        if not isinstance(guide, tasks.DiffusionTask) or guide.needs_inputs:
            raise ConfigError(f"{where} is not a diffusion model on images (model.name unet or "
                              "dit, no superres); give a config of the same task")
        if isinstance(guide, tasks.LatentDiffusionTask) != bool(c.data.latent.workdir
                                                                or c.data.latent.config):
            raise ConfigError(f"{where}: one model is a latent diffusion model and the other is "
                              "not; the guide must denoise the main model's space")
        main = (tuple(_data(c).image_shape), bool(c.model.class_cond),
                c.data.num_classes if c.model.class_cond else 0)
        got = (tuple(guide.image_shape), guide.class_cond,
               guide.num_classes if guide.class_cond else 0)
        if got != main:
            raise ConfigError(f"{where} has (image_shape, class_cond, num_classes) {got}, the "
                              f"main model {main}; the guide must denoise the same images "
                              "with the same labels")
    else:
        ds = _schedule(c)
        guide = TASKS[_task_kind(c)](c, _data(c), ds)
    return generate.GuidanceSpec(
        name=g.type, fn=GUIDANCE[g.type], static={},
        knobs={"scale": float(g.scale),
               "interval": (float(g.interval_sigma_min), float(g.interval_sigma_max))},
        guide=guide, guide_workdir=g.guide_workdir,
        guide_step=None if int(g.guide_step) < 0 else int(g.guide_step))


def _gradient_guidance(c: ml_collections.ConfigDict) -> generate.GuidanceSpec:
    """Gradient guidance by ``guidance.log_density``, imported and checked here once, on the
    network's input shape (a latent model's latents) and the denoiser's cond."""
    g = c.guidance
    shape = (c.data.image_size, c.data.image_size, c.data.channels)
    fn = resolve_log_density(g.log_density, shape, labels=bool(c.model.class_cond))
    return generate.GuidanceSpec(
        name=g.type, fn=GUIDANCE[g.type],
        static={"log_density": fn, "on": g.log_density_input},
        knobs={"scale": float(g.scale),
               "interval": (float(g.interval_sigma_min), float(g.interval_sigma_max))})


def resolve_log_density(spec: str, image_shape: tuple[int, ...], labels: bool) -> Callable:
    """The function of ``guidance.log_density`` "package.module:function", checked to map x
    [B, *image_shape] float32, sigma [B] and cond (labels [B] int32 when ``labels``, else
    None) to a float [B] (traced abstractly: nothing compiles). One-line ConfigError else."""
    field = f"guidance.log_density={spec!r}"
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{field} must name a function as 'package.module:function', e.g. "
                          "diffjax.guides.fashion_mnist:brighter")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field}: module {module_name!r} cannot be imported ({e}); install "
                          "it or put its directory on PYTHONPATH") from e
    except Exception as e:  # user code: any failure of its import is reported
        raise ConfigError(f"{field}: importing {module_name!r} failed ({type(e).__name__}: "
                          f"{_first_line(e)})") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{field}: module {module_name!r} has no attribute {attr!r}; name "
                          "one of its functions after the ':'")
    if not callable(fn):
        raise ConfigError(f"{field}: {attr!r} is not callable ({type(fn).__name__}); name "
                          "a function log_density(x, sigma, cond) -> [B]")
    batch = 2
    args = (jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32) if labels else None)
    try:
        out = jax.eval_shape(fn, *args)
    except Exception as e:  # user code: any failure on the abstract batch
        raise ConfigError(f"{field} fails on x [{batch}, {', '.join(map(str, image_shape))}], "
                          f"sigma [{batch}], cond {'labels' if labels else 'None'}: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    if getattr(out, "shape", None) != (batch,) or not jnp.issubdtype(out.dtype, jnp.floating):
        got = (f"{out.dtype}{list(out.shape)}" if hasattr(out, "shape")
               else type(out).__name__)
        raise ConfigError(f"{field} returns {got} for a batch of {batch}; it must return one "
                          "float log density per example, shape [B]")
    return fn


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


GUIDANCE_SPECS: dict[str, Callable[[ml_collections.ConfigDict], generate.GuidanceSpec]] = {
    "none": _no_guidance,
    "classifier_free": _classifier_free,
    "classifier": _classifier_guidance,
    "autoguidance": _autoguidance,
    "gradient": _gradient_guidance,
}


def _threshold(c: ml_collections.ConfigDict) -> generate.ThresholdSpec:
    s = c.sampler
    knobs = {"percentile": float(s.dynamic_percentile)} if s.thresholding == "dynamic" else {}
    if knobs and not 0.0 < knobs["percentile"] <= 1.0:
        raise ConfigError(f"sampler.dynamic_percentile={s.dynamic_percentile} must be in (0, 1]")
    return generate.ThresholdSpec(name=s.thresholding, fn=THRESHOLDING[s.thresholding],
                                  knobs=knobs)


def load_mask(spec: str, size: int) -> np.ndarray:
    """``condition.mask`` as [size, size, 1] float32, 1 = known: "center", "left_half" or a
    PNG (pixels > 127 known, resized nearest)."""
    if spec in conditional.MASKS:
        return conditional.MASKS[spec](size, size)
    if not os.path.isfile(spec):
        raise ConfigError(f"condition.mask={spec!r} is neither center, left_half nor "
                          "an existing PNG file")
    try:
        with Image.open(spec) as img:
            m = np.asarray(img.convert("L").resize((size, size), Image.NEAREST))
    except OSError as e:  # PIL.UnidentifiedImageError, a truncated file
        raise ConfigError(f"condition.mask={spec!r} cannot be read as an image ({e}); pass a "
                          "PNG (white = known pixels), center or left_half") from e
    return (m > 127).astype(np.float32)[..., None]


# The samplers whose deterministic setting inverts: name -> the options that must stay at
# their defaults (None) or 0.
_INVERTIBLE = {"ddim": ("eta",), "euler": ("s_churn",)}


def _invert(c: ml_collections.ConfigDict) -> generate.Invert:
    s = c.sampler
    if s.name not in _INVERTIBLE or any(s[o] for o in _INVERTIBLE[s.name]):
        raise ConfigError(
            f"condition.type='invert' runs a deterministic ODE sampler backwards: use "
            f"--config.sampler.name=ddim (eta 0) or euler (s_churn 0), got sampler.name="
            f"{s.name!r}" + "".join(f", sampler.{o}={s[o]}" for o in _INVERTIBLE.get(s.name, ())
                                     if s[o]))
    if c.condition.low_res_size:
        raise ConfigError("condition.type='invert' is for a diffusion model on images; "
                          "a super-resolution model (condition.low_res_size) cannot invert")
    return generate.Invert()


CONDITIONS: dict[str, Callable[[ml_collections.ConfigDict], Any]] = {
    "none": lambda c: generate.FromNoise(),
    # the low-resolution inputs reach the network through the SuperResTask
    "superres": lambda c: generate.FromNoise(),
    "img2img": lambda c: generate.Img2Img(strength=float(c.condition.strength)),
    "inpaint": lambda c: generate.Inpaint(
        mask=load_mask(c.condition.mask, c.data.image_size),
        resample=int(c.condition.repaint_resample), jump=int(c.condition.repaint_jump)),
    "invert": _invert,
}


def _sampling(c: ml_collections.ConfigDict, task: tasks.Task, ds) -> generate.Sampling | None:
    if not task.draws_samples:
        return None
    s = c.sampler
    return generate.Sampling(
        sampler=_sampler(c, ds), guidance=GUIDANCE_SPECS[c.guidance.type](c),
        threshold=_threshold(c), condition=CONDITIONS[c.condition.type](c),
        condition_type=c.condition.type, condition_input=c.condition.input,
        with_variance=learns_variance(c) and s.name == "ddpm",
        batch_size=s.batch_size, num_samples=s.num_samples, seed=s.seed)


# ----------------------------------------------------------------------------- optim, train, eval


def _optim(c: ml_collections.ConfigDict) -> specs.OptimSpec:
    o = c.optim
    return specs.OptimSpec(
        learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, decay=o.decay,
        min_lr_ratio=o.min_lr_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
        grad_clip=o.grad_clip, ema_decays=tuple(float(d) for d in o.ema_decays),
        ema_gammas=tuple(posthoc_ema.sigma_rel_to_gamma(float(r)) for r in c.ema.sigma_rels))


def _train(c: ml_collections.ConfigDict) -> specs.TrainSpec:
    t = c.train
    return specs.TrainSpec(
        num_steps=t.num_steps, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints, keep_every=t.keep_every,
        sample_every=t.sample_every, num_sample_images=t.num_sample_images, seed=t.seed,
        ema_snapshot_every=int(c.ema.snapshot_every), shard_state=c.parallel.shard_state)


def domain_name(source: str) -> str:
    """Short name of a data source for metric and file names: "fashion_mnist_idx" ->
    "fashion_mnist", "tfds:cifar10" -> "cifar10", "tfds:imagenet_resized/64x64" ->
    "imagenet_resized_64x64", "folder" -> "folder"."""
    name = source.split(":", 1)[-1]
    name = name[:-len("_idx")] if name.endswith("_idx") else name
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def valid_metrics(domain: str, text: bool = False) -> tuple[str, ...]:
    """The eval.metrics of a model of data ``domain`` (``text``: a text model's too)."""
    return (f"fd_{domain}", *sample_metrics.OTHER_METRICS, *sample_metrics.INCEPTION_METRICS,
            *(sample_metrics.TEXT_METRICS if text else ()))


def _eval(c: ml_collections.ConfigDict, mode: str, ds) -> specs.EvalSpec:
    e = c.eval
    domain = domain_name(c.data.source)
    steps = tuple(int(n) for n in e.sweep_num_steps) or (c.sampler.num_steps,)
    features = None
    if mode == "eval":
        features = _check_eval(c, domain)
    samplers_ = ()
    if mode == "eval" and c.model.name not in ("classifier", "autoencoder_kl"):
        point = copy.deepcopy(c)
        points = []
        for n in steps:
            point.sampler.num_steps = n
            points.append(_sampler(point, ds))
        samplers_ = tuple(points)
    return specs.EvalSpec(
        num_samples=e.num_samples, batch_size=e.batch_size, metrics=tuple(e.metrics),
        split=e.split, sweep_guidance_scales=tuple(float(s) for s in e.sweep_guidance_scales),
        sweep_num_steps=steps, samplers=samplers_, name=e.name, features=features,
        features_config=e.features_config, features_workdir=e.features_workdir,
        inception_weights=e.inception_weights, reference_stats=e.reference_stats,
        inception_size=e.inception_size, nll_num_examples=e.nll_num_examples,
        nll_clip_denoised=e.nll_clip_denoised, domain=domain,
        seed=c.sampler.seed)


def _check_eval(c: ml_collections.ConfigDict, domain: str) -> specs.Experiment | None:
    """The config checks of ``--mode eval`` (one-line ConfigError) and the feature
    classifier's experiment when a metric needs it. Files (checkpoints, weights, data) are
    checked by the app before any checkpoint is read."""
    e = c.eval
    names, valid = tuple(e.metrics), valid_metrics(domain, is_text_model(c))
    if c.model.name == "classifier":
        if e.batch_size < 1:
            raise ConfigError("eval.batch_size must be >= 1")
        return None
    if c.model.name == "autoencoder_kl":
        allowed = ("psnr", f"fd_{domain}")
        if not names or any(m not in allowed for m in names) or e.batch_size < 1:
            raise ConfigError(f"eval.metrics={names}: an autoencoder is evaluated by the PSNR "
                              f"and the {allowed[1]} of its reconstructions, "
                              f"--config.eval.metrics='(\"psnr\", \"{allowed[1]}\")' or "
                              "one of them (and eval.batch_size >= 1)")
        return _features_experiment(c, names)
    if c.condition.type == "superres":
        raise ConfigError(
            "--mode eval draws samples without inputs, and a superres model needs a "
            "low-resolution input per sample; upsample given inputs with --mode sample "
            "--config.condition.input=FILE instead")
    if "attribute_accuracy" in names and not is_text_model(c):
        raise ConfigError("attribute_accuracy scores a text model's prompts (text.encoder="
                          "'transformer'); remove it from eval.metrics")
    unknown = [m for m in names if m not in valid]
    if not names or unknown:
        raise ConfigError(f"eval.metrics has unknown metric(s) {unknown or '(none given)'}; "
                          f"valid: {', '.join(valid)}")
    if e.num_samples < 2 or e.batch_size < 1:
        raise ConfigError("eval.num_samples must be >= 2 and eval.batch_size >= 1")
    if "nll" in names and is_text_model(c):
        raise ConfigError("nll of a text model would need each test image's caption, which "
                          "the likelihood evaluation does not pass yet; remove it from "
                          "eval.metrics")
    if "class_accuracy" in names and not (c.model.class_cond or is_text_model(c)):
        raise ConfigError("class_accuracy needs a class-conditional model "
                          "(model.class_cond=True) or a text model; remove it from "
                          "eval.metrics")
    if e.sweep_guidance_scales and c.guidance.type == "none":
        raise ConfigError("eval.sweep_guidance_scales needs guidance.type "
                          "'classifier_free' or 'classifier'")
    if any(int(n) < 1 for n in e.sweep_num_steps):
        raise ConfigError(f"eval.sweep_num_steps={tuple(e.sweep_num_steps)} must be step "
                          "counts >= 1")
    return _features_experiment(c, names)


def _features_experiment(c: ml_collections.ConfigDict, names: tuple[str, ...]
                         ) -> specs.Experiment | None:
    """The feature classifier's experiment when ``names`` need it (fd_*, class_accuracy),
    checked against this model's data (one-line ConfigError); None otherwise."""
    e = c.eval
    if not sample_metrics.needs_features(names):
        return None
    if not e.features_config or not e.features_workdir:
        raise ConfigError(
            "fd_* and class_accuracy need eval.features_config (e.g. experiments/"
            "fmnist_features.py) and eval.features_workdir (its trained run)")
    fc = configlib.load_config_file(e.features_config)
    if fc.model.name != "classifier":
        raise ConfigError(f"eval.features_config={e.features_config!r} is not a classifier "
                          f"config (model.name={fc.model.name!r})")
    want = (c.data.image_size, c.data.channels)
    if (fc.data.image_size, fc.data.channels) != want:
        raise ConfigError(
            f"eval.features_config={e.features_config!r} classifies "
            f"{fc.data.image_size}px x{fc.data.channels} images but this model makes "
            f"{want[0]}px x{want[1]}; use a feature classifier of this data")
    if "class_accuracy" in names and fc.data.num_classes != c.data.num_classes:
        raise ConfigError(
            f"eval.features_config={e.features_config!r} has {fc.data.num_classes} classes,"
            f" this model {c.data.num_classes}; class_accuracy needs the same labels")
    return build(fc)
