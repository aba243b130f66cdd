"""The base config, its variants, loading experiment files, and validation.

Every experiment under ``experiments/`` starts from :func:`base_config` and states only what
differs. :func:`validate` checks every name and shape constraint once, at start-up, with a
one-line error listing the valid choices. :func:`diffjax.experiment.build` then turns the
validated ConfigDict into an Experiment of frozen specs; below it no code reads a ConfigDict.

Glossary of config sections:
  data       source and geometry of the images, global batch size
  model      the network (ADM option names)
  diffusion  noise schedule, parameterisation, loss, variance
  guidance   none / classifier / classifier_free / autoguidance / gradient and its scale
  sampler    sampling algorithm, steps and its options
  optim      AdamW, schedule, clipping, EMA
  train      steps, logging, checkpointing, seeds
  parallel   how the train state lies on the devices (replicated / fsdp)
  eval       sample counts, metrics, sweeps
  condition  conditional generation: img2img (SDEdit), inpaint (RePaint), superres,
             invert (DDIM inversion)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from diffjax import parallel
from diffjax.diffusion import conditional, losses, samplers, schedules
from diffjax.errors import ConfigError

MODES = ("train", "sample", "eval", "summary")
GUIDANCE_TYPES = ("none", "classifier", "classifier_free", "autoguidance", "gradient")
# What guidance.type = "gradient"'s log density reads: the denoiser's x0_hat (differentiated
# through the network) or the noisy x_t.
LOG_DENSITY_INPUTS = ("x0", "xt")
# How classifier guidance enters: "auto" is ADM's choice (mean shift, Alg. 1, under the
# ancestral ddpm sampler; score shift, Alg. 2, under ddim and the ODE/other samplers).
CLASSIFIER_MODES = ("auto", "mean", "score")
MODEL_NAMES = ("unet", "classifier", "dit", "autoencoder_kl")
DIT_SIZES = ("S", "B", "L", "XL")  # the DiT paper's Table 1
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("block", "dots")  # diffjax.models.layers.REMAT_POLICIES
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blocked")  # diffjax.models.layers.ATTENTION_IMPLS
CONTEXT_POOLS = ("none", "last", "mean")  # diffjax.models.cross_attention.CONTEXT_POOLS
SIGMA_SPACINGS = ("model", "karras", "loglinear")
LR_DECAYS = ("constant", "cosine")
TIMESTEP_SAMPLERS = ("uniform", "loss_second_moment", "lognormal")
THRESHOLDINGS = ("none", "static", "dynamic")
CONDITION_TYPES = ("none", "img2img", "inpaint", "superres", "invert")


def _option() -> ml_collections.FieldReference:
    """An unset float option (None) that ``--config.x.y=0.5`` can still set."""
    return ml_collections.FieldReference(None, field_type=float)


def base_config() -> ml_collections.ConfigDict:
    """The shared defaults every experiment starts from (a small unconditional DDPM)."""
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.source = "fashion_mnist_idx"  # see diffjax.data.SOURCES
    c.data.path = ""  # directory / file root of the source; "" = the source's default
    c.data.split = "train"
    c.data.image_size = 28
    c.data.channels = 1
    c.data.num_classes = 10  # labels present in the data (0 = unlabelled)
    c.data.batch_size = 64  # global, across all devices of all processes
    c.data.random_flip = False
    c.data.resize = "none"  # none (size must match) / pad / resize (then centre-crop)
    c.data.num_workers = 0
    # Latent diffusion: the diffusion model works on the latents of an autoencoder run
    # (trained with model.name="autoencoder_kl", or SD's VAE converted by diffjax.convert);
    # "" = on pixels. Its network's input geometry is the latent's; sampling decodes.
    c.data.latent = ml_collections.ConfigDict()
    c.data.latent.config = ""  # the autoencoder's experiment file ("" = workdir's config.json)
    c.data.latent.workdir = ""  # the autoencoder's run directory (its weights)
    c.data.latent.checkpoint_step = -1  # its checkpoint (-1 = the latest)
    c.data.latent.cache = ""  # latents written by --mode encode ("" = encode each batch)
    c.data.latent.shard_size = 4096  # rows per cache shard (--mode encode)
    c.data.latent.scale_factor = 0.0  # z = latent * this; 0 = the cache's measured 1/std
    c.data.latent.sample_posterior = True  # train on z ~ q(z | x) (False: its mean)

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (7,)
    c.model.num_heads = 1
    c.model.num_head_channels = -1
    c.model.num_heads_upsample = -1
    c.model.dropout = 0.0
    c.model.class_cond = False
    c.model.use_scale_shift_norm = False
    c.model.resblock_updown = False
    c.model.conv_resample = True
    c.model.use_new_attention_order = False
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.norm_groups = 32  # GroupNorm groups (ADM: 32); channels must be multiples of it
    c.model.remat = False
    # with remat: "block" recomputes each ResBlock / attention / DiT block in the backward
    # pass, "dots" keeps its convolution and matmul outputs (less recomputation, more memory)
    c.model.remat_policy = "block"
    # self-attention kernel: auto (cuDNN flash attention on GPU in bf16/fp16; on CPU "blocked"
    # from 512 tokens; else XLA) / xla / cudnn / blocked (XLA's over blocks of 256 queries,
    # recomputed in the backward pass: the whole [B, heads, L, L] logits never exist)
    c.model.attention_impl = "auto"
    c.model.cpu_fast_conv = "auto"
    # Context conditioning of the UNet (issue 13; names of CompVis/LDM's UNetModel): width D
    # of a context [B, L, D] (e.g. text tokens) every attention block attends to; 0 = none.
    # Its source: the text encoder of section text (else --mode summary and diffjax.convert
    # only).
    c.model.context_dim = 0
    # with context: False = GLIDE's form (context keys/values beside each attention block's
    # own), True = LDM / Stable Diffusion's transformer blocks (self-attn, cross-attn, GEGLU)
    c.model.use_spatial_transformer = False
    c.model.transformer_depth = 1  # transformer blocks per SpatialTransformer
    c.model.use_linear_in_transformer = False  # SD 2's Linear proj_in/out (SD 1: 1x1 conv)
    # also add the pooled context to the time embedding: none / last (GLIDE's last token) /
    # mean (Imagen's mean over unmasked tokens)
    c.model.context_pool = "none"
    c.model.pool = "attention"  # classifier only
    c.model.classifier_noised = True  # classifier only: train on x_t at random t (guidance)
    # model.name="dit" (Peebles & Xie 2023; option names of its code). input_size, in_channels,
    # num_classes, learn_sigma and the null-label row come from data / diffusion / guidance;
    # dtype, param_dtype and remat are the model's above. None = the size's value.
    c.model.dit = ml_collections.ConfigDict()
    c.model.dit.size = "S"  # S / B / L / XL: depth, hidden_size, num_heads of the paper
    c.model.dit.patch_size = 2
    c.model.dit.depth = ml_collections.FieldReference(None, int)
    c.model.dit.hidden_size = ml_collections.FieldReference(None, int)
    c.model.dit.num_heads = ml_collections.FieldReference(None, int)
    c.model.dit.mlp_ratio = 4.0
    # model.name="autoencoder_kl" (Stable Diffusion's VAE; diffusers' option names) and its
    # training loss: recon_loss + kl_weight * KL (KL per pixel; no perceptual term), plus
    # SD's PatchGAN hinge term from step disc_start on (tasks.AutoencoderTask)
    c.model.autoencoder = ml_collections.ConfigDict()
    c.model.autoencoder.block_out_channels = (128, 256, 512, 512)
    c.model.autoencoder.layers_per_block = 2
    c.model.autoencoder.latent_channels = 4
    c.model.autoencoder.norm_num_groups = 32
    c.model.autoencoder.recon_loss = "l1"  # l1 / l2
    c.model.autoencoder.kl_weight = 1e-6
    c.model.autoencoder.sample_posterior = True  # train on z ~ q(z|x) (False: the mean)
    c.model.autoencoder.disc_start = -1  # first step of the GAN term; -1: no discriminator
    c.model.autoencoder.disc_weight = 0.5  # times SD's adaptive weight of the GAN term
    c.model.autoencoder.disc_layers = 3  # PatchGAN: stride-2 4x4 convs (pix2pix n_layers)
    c.model.autoencoder.disc_channels = 64  # PatchGAN: width of its first conv (ndf)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.prediction = "eps"
    c.diffusion.loss = "simple"
    c.diffusion.variance_type = "fixed_small"
    c.diffusion.weighting = "uniform"
    c.diffusion.min_snr_gamma = 5.0
    c.diffusion.p2_gamma = 1.0
    c.diffusion.p2_k = 1.0
    c.diffusion.vlb_weight = 0.001  # lambda of the hybrid loss (iDDPM)
    c.diffusion.timestep_sampler = "uniform"
    # timestep_sampler="lognormal": EDM's training (Karras et al. 2022; option names of its
    # code) at continuous noise levels, ln sigma ~ N(P_mean, P_std^2), x = x0 + sigma n, with
    # prediction "edm"; no timestep table: sampled on [sigma_min, sigma_max] with
    # sampler.sigma_spacing karras or loglinear
    c.diffusion.P_mean = -1.2
    c.diffusion.P_std = 1.2
    c.diffusion.sigma_data = 0.5  # EDM's preconditioning (prediction "edm")
    c.diffusion.sigma_min = 0.002  # the "karras" schedule's range, and a lognormal model's
    c.diffusion.sigma_max = 80.0
    # improved-diffusion's --rescale_timesteps: the network's time input is t * 1000 / T
    # (its released T = 4000 models use it); eps / x0 / v predictions only
    c.diffusion.rescale_timesteps = False

    c.guidance = ml_collections.ConfigDict()
    c.guidance.type = "none"
    # Ho & Salimans w for classifier_free and autoguidance (0 = unguided; the autoguidance
    # paper's w is 1 + scale); the gradient scale for classifier and gradient
    c.guidance.scale = 0.0
    c.guidance.label_dropout = 0.0  # training-time p of replacing the label by the null label
    c.guidance.classifier_config = ""  # experiments/classifier_*.py of the guiding classifier
    c.guidance.classifier_workdir = ""  # the workdir that classifier was trained in
    c.guidance.interval_sigma_min = 0.0  # guide only for sigma in [min, max]; 0/inf = always
    c.guidance.interval_sigma_max = float("inf")
    c.guidance.rescale = 0.0  # CFG rescale phi (Lin et al. 2023); 0 = off
    c.guidance.classifier_mode = "auto"  # classifier: mean (ADM Alg. 1, ddpm) / score (Alg. 2)
    # autoguidance (Karras et al. 2024): the guide's config ("" = this experiment's own, i.e.
    # an earlier checkpoint of the same architecture), its run directory, and its checkpoint
    # step (-1 = the latest; set it to guide by an early checkpoint of the same run)
    c.guidance.guide_config = ""
    c.guidance.guide_workdir = ""
    c.guidance.guide_step = -1
    # classifier_free: guide only the first `channels` channels (0 = all); the released DiT
    # guides 3 of its 4 latent channels (a reproduction switch)
    c.guidance.channels = 0
    # gradient: x0_hat += scale * sigma^2 * grad_{x_t} log_density, the function given as
    # "package.module:function" (log_density(x [B, ...], sigma [B], cond) -> [B], e.g.
    # diffjax.guides.fashion_mnist:brighter), read on the denoiser's x0_hat ("x0", the
    # gradient taken through the network) or on the noisy x_t ("xt")
    c.guidance.log_density = ""
    c.guidance.log_density_input = "x0"

    c.sampler = ml_collections.ConfigDict()
    c.sampler.name = "ddim"
    c.sampler.num_steps = 50
    # Sampler options: None = the sampler's own default; one the sampler does not take is an
    # error (diffjax.experiment checks them against the sampler's signature).
    c.sampler.eta = _option()  # ddim (default 0), euler_ancestral / dpmpp_2s_ancestral /
    # dpmpp_*_sde (default 1)
    c.sampler.sigma_spacing = "model"
    c.sampler.timestep_spacing = ""  # "" = uniform; "ddimN" or "10,10,5" as in iDDPM
    c.sampler.rho = 7.0
    c.sampler.s_churn = _option()  # euler, heun, dpm_2: Karras churn (default 0)
    c.sampler.s_tmin = _option()  # euler, heun, dpm_2 (default 0)
    c.sampler.s_tmax = _option()  # euler, heun, dpm_2 (default inf)
    c.sampler.s_noise = _option()  # euler, heun, dpm_2, the ancestral and SDE ones (default 1)
    c.sampler.order = ml_collections.FieldReference(None, field_type=int)  # unipc (default 2)
    c.sampler.variant = ml_collections.FieldReference(None, field_type=str)  # unipc: bh1 / bh2
    c.sampler.thresholding = "static"
    c.sampler.dynamic_percentile = 0.995
    c.sampler.num_samples = 64
    c.sampler.batch_size = 64
    c.sampler.seed = 0
    # a text model's --mode sample / eval prompts (sample: one grid row each); None = the
    # captioner's defaults
    c.sampler.prompts = ml_collections.FieldReference(None, field_type=tuple)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 100
    c.optim.decay = "constant"
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0
    c.optim.ema_decays = (0.9999,)

    # EDM2's power-function EMA (Karras et al. 2024): one EMA copy per relative standard
    # deviation sigma_rels (after optim.ema_decays' copies in the state), snapshots of them
    # every snapshot_every steps in WORKDIR/ema_snapshots, and sigma_rel > 0: sample and eval
    # with the EMA of that profile solved post hoc from the snapshots (--mode posthoc_ema
    # writes it), at the latest snapshot <= the checkpoint step
    c.ema = ml_collections.ConfigDict()
    c.ema.sigma_rels = ()  # e.g. (0.05, 0.10) as EDM2
    c.ema.snapshot_every = 0  # 0 = no snapshots
    c.ema.sigma_rel = 0.0  # 0 = the run's first EMA copy (no post-hoc reconstruction)

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.keep_every = 0  # additionally keep every K-th step's checkpoint; 0 = none
    c.train.sample_every = 500
    c.train.num_sample_images = 64
    c.train.seed = 0

    # "fsdp": parameters, optimiser state and EMA copies sharded over the data axis (ZeRO-3;
    # XLA gathers them where used), for models that outgrow one device; arrays under
    # parallel.FSDP_MIN_SIZE elements stay replicated. A run may resume under either.
    c.parallel = ml_collections.ConfigDict()
    c.parallel.shard_state = "replicated"

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 1000
    c.eval.batch_size = 250
    c.eval.metrics = ("fd_fashion_mnist",)
    c.eval.split = "test"
    c.eval.sweep_guidance_scales = ()
    c.eval.sweep_num_steps = ()
    c.eval.name = ""  # JSON/PNG name under WORKDIR/eval/; "" = derived, e.g. "ddim-50_cfg-3.0"
    c.eval.features_config = "experiments/fmnist_features.py"  # fd_<data> / class_accuracy
    c.eval.features_workdir = "runs/fmnist_features"  # the trained run of features_config
    c.eval.inception_weights = ""  # converted InceptionV3 (.npz/.msgpack) for fid/sfid/IS/P-R
    c.eval.reference_stats = ""  # Inception reference .npz (ADM layout); "" = data's eval split
    c.eval.inception_size = 299  # Inception input resolution; 299 for the standard metrics
    c.eval.nll_num_examples = 0  # cap on test images for "nll"; 0 = the whole eval split
    # "nll": clip x0_hat to [-1, 1] in the VLB terms, as ADM's image_nll.py (its default)
    c.eval.nll_clip_denoised = True

    # Text conditioning (issue 13; GLIDE's jointly trained text transformer): encoder
    # "transformer" encodes each example's caption (text.captions) into the context [B, L,
    # width] of a UNet (model.context_dim = 0 or width); classifier-free guidance drops it to
    # a learned null sequence with probability guidance.label_dropout. The tokenizer (word or
    # byte level) is built from the training captions and kept in WORKDIR/tokenizer.json.
    c.text = ml_collections.ConfigDict()
    c.text.encoder = "none"  # none / transformer / embeddings (precomputed, text.embeddings)
    c.text.tokenizer = "word"  # word / byte
    c.text.context_length = 16  # tokens per caption or prompt (L)
    c.text.vocab_size = 256  # word tokenizer: rows of the token embedding (words + padding)
    c.text.width = 64
    c.text.layers = 2
    c.text.heads = 4
    # where captions come from: "fashion_mnist_attributes" (class + measured brightness and
    # size, diffjax.data.captions)
    c.text.captions = ""
    c.text.caption_seed = 0
    c.text.caption_keep_prob = 0.75  # each attribute word kept in an example's caption
    # encoder "embeddings": a user's precomputed embeddings (e.g. T5, CLIP) of the train
    # split, one row per example in its order: .npz with context [N, L, width], mask [N, L],
    # or an .array_record file of one msgpack record per example (read per batch; see
    # data/text_source.py); and those of the prompts that --mode sample and the training
    # grids draw (same layouts, optional prompts [N] / "prompt" as the grid's row labels)
    c.text.embeddings = ""
    c.text.sample_embeddings = ""

    c.condition = ml_collections.ConfigDict()
    c.condition.type = "none"  # none / img2img / inpaint / superres / invert
    c.condition.strength = 0.5  # img2img (SDEdit): fraction of the sampling steps that run
    # image file (PNG...) or .npz of images (key "images"; "labels" optional) that
    # --mode sample conditions on / inverts
    c.condition.input = ""
    c.condition.mask = "center"  # inpaint: center / left_half / a PNG path (white = known)
    c.condition.repaint_resample = 1  # inpaint: RePaint resamplings (1 = off; > 1 uses the
    # ancestral ddpm step whatever sampler.name, on sampler.num_steps steps)
    c.condition.repaint_jump = 10  # inpaint: RePaint jump length
    c.condition.low_res_size = 0  # superres: side of the low-resolution input
    c.condition.aug_max = 0.0  # superres: training noise-augmentation levels U[0, aug_max]
    c.condition.aug_sample = 0.0  # superres: augmentation level at sampling
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink any experiment to a CPU-sized model of the same family (the ``:smoke`` variant).

    Keeps every option that changes the code path (conditioning, learned variance, scale-shift,
    resblock up/down, attention) and shrinks widths, depths, batch and step counts.
    """
    n_levels = min(len(c.model.channel_mult), 3)
    c.model.channel_mult = tuple(c.model.channel_mult[:n_levels])
    # 32 channels at the narrowest level (ADM-512's channel_mult starts at 0.5)
    c.model.model_channels = int(round(32 / min(1.0, *c.model.channel_mult)))
    c.model.num_res_blocks = 1
    if c.data.image_size > 32:
        if c.condition.low_res_size:  # a super-resolution model keeps its upscaling factor
            c.condition.low_res_size = max(1, c.condition.low_res_size * 32 // c.data.image_size)
        c.data.image_size = 32
        c.data.resize = "resize"
    lowest = c.data.image_size // 2 ** (n_levels - 1)
    c.model.attention_resolutions = (lowest,) if c.model.attention_resolutions else ()
    if c.model.num_head_channels > 0:
        c.model.num_head_channels = 32
    if c.model.name == "dit":  # the paper's patch size, a CPU-sized transformer
        c.model.dit.depth, c.model.dit.hidden_size, c.model.dit.num_heads = 2, 64, 2
    if c.text.encoder != "none":  # a one-layer text transformer of width 32
        c.text.width, c.text.layers, c.text.heads = 32, 1, 2
    c.data.batch_size = 8
    c.diffusion.num_timesteps = min(c.diffusion.num_timesteps, 100)
    c.sampler.num_steps = 4
    c.sampler.num_samples = 8
    c.sampler.batch_size = 8
    c.train.num_steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    if c.ema.snapshot_every:
        c.ema.snapshot_every = 2
    c.train.sample_every = 4
    c.train.num_sample_images = 4
    c.eval.num_samples = 16
    c.eval.batch_size = 8
    c.optim.warmup_steps = 1
    return c


def with_variant(get_config: Callable[[], ml_collections.ConfigDict], arg: str | None):
    """Applies a config variant named after the ``:`` of ``--config path.py:variant``."""
    c = get_config()
    if arg in (None, ""):
        return c
    if arg == "smoke":
        return smoke(c)
    raise ConfigError(f"unknown config variant {arg!r}: valid variants are '' and 'smoke'")


# ----------------------------------------------------------------------------- validation


def _tables() -> dict[str, Sequence[str]]:
    """Every named choice of the config and the names that are valid for it."""
    return {
        "model.name": MODEL_NAMES,
        "model.dit.size": DIT_SIZES,
        "model.autoencoder.recon_loss": ("l1", "l2"),
        "model.dtype": DTYPES,
        "model.remat_policy": REMAT_POLICIES,
        "model.attention_impl": ATTENTION_IMPLS,
        "model.context_pool": CONTEXT_POOLS,
        "model.param_dtype": DTYPES,
        "diffusion.schedule": tuple(schedules.SCHEDULES),
        "diffusion.prediction": tuple(losses.PREDICTIONS),
        "diffusion.loss": tuple(losses.LOSS_TYPES),
        "diffusion.variance_type": tuple(losses.VARIANCE_TYPES),
        "diffusion.weighting": tuple(losses.WEIGHTINGS),
        "diffusion.timestep_sampler": TIMESTEP_SAMPLERS,
        "guidance.type": GUIDANCE_TYPES,
        "guidance.classifier_mode": CLASSIFIER_MODES,
        "guidance.log_density_input": LOG_DENSITY_INPUTS,
        "sampler.name": tuple(samplers.SAMPLERS),
        "sampler.sigma_spacing": SIGMA_SPACINGS,
        "sampler.thresholding": THRESHOLDINGS,
        "optim.decay": LR_DECAYS,
        "parallel.shard_state": parallel.SHARD_MODES,
        "condition.type": CONDITION_TYPES,
    }


def _get(c: ml_collections.ConfigDict, dotted: str) -> Any:
    node = c
    for part in dotted.split("."):
        node = node[part]
    return node


def check_name(field: str, value: str, valid: Sequence[str]) -> None:
    """ConfigError unless ``value`` is one of ``valid`` (a ``tfds:NAME`` data source is)."""
    if field == "data.source" and isinstance(value, str) and value.startswith("tfds:"):
        return
    if value not in valid:
        raise ConfigError(
            f"config.{field}={value!r} is not a valid choice; valid: {', '.join(map(str, valid))}"
            f" (set it with --config.{field}=NAME)"
        )


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Checks names and shape constraints of a config; raises ConfigError with one line.

    ``data.source`` is checked by :func:`diffjax.experiment.build` (its table comes with the
    data pipelines, whose imports configure logging; this module stays free of them)."""
    for field, valid in _tables().items():
        check_name(field, _get(c, field), valid)
    if c.model.name == "dit":
        _validate_dit(c)
    if c.model.name == "autoencoder_kl":
        _validate_autoencoder(c)
    _validate_counts(c)
    _validate_latent(c)
    unet_like = c.model.name in ("unet", "classifier")
    levels = len(c.model.channel_mult)
    if unet_like and c.data.image_size % 2 ** (levels - 1):
        raise ConfigError(
            f"data.image_size={c.data.image_size} is not divisible by 2**(len(model.channel_mult)-1)"
            f"={2 ** (levels - 1)}; change model.channel_mult or data.image_size"
        )
    for name, batch in (("data.batch_size", c.data.batch_size),
                        ("sampler.batch_size", c.sampler.batch_size)):
        if batch <= 0 or batch % num_devices:
            raise ConfigError(
                f"{name}={batch} is not a positive multiple of the {num_devices} devices; "
                f"set --config.{name} to a multiple of {num_devices}"
            )
    if c.diffusion.rescale_timesteps and c.diffusion.prediction == "edm":
        raise ConfigError("diffusion.rescale_timesteps=True scales the timestep index the "
                          "network sees; an 'edm' network sees ln(sigma)/4: set it False")
    for mult in c.model.channel_mult if unet_like else ():
        if mult * c.model.model_channels != int(mult * c.model.model_channels) or (
                int(mult * c.model.model_channels) % c.model.norm_groups):
            raise ConfigError(
                f"model.model_channels={c.model.model_channels} x channel_mult {mult} is not "
                f"divisible by model.norm_groups={c.model.norm_groups}; use a multiple of it")
    learned = c.diffusion.variance_type in ("learned", "learned_range")
    if c.diffusion.loss in ("hybrid", "vlb") and not learned:
        raise ConfigError(
            f"diffusion.loss={c.diffusion.loss!r} trains the variance, so diffusion.variance_type "
            "must be 'learned_range' or 'learned'"
        )
    conditional = c.model.class_cond
    if c.model.name == "classifier" and c.data.num_classes <= 0:
        raise ConfigError("model.name='classifier' needs labelled data: set data.num_classes > 0")
    if conditional and c.data.num_classes <= 0:
        raise ConfigError("model.class_cond=True needs labelled data: set data.num_classes > 0")
    if c.guidance.type == "classifier_free" and not (conditional or c.text.encoder != "none"):
        raise ConfigError("guidance.type='classifier_free' needs a class-conditional model (or "
                          "a text model): set model.class_cond=True and guidance.label_dropout "
                          "> 0 for training")
    if c.guidance.type == "classifier_free" and c.guidance.label_dropout <= 0:
        raise ConfigError("guidance.type='classifier_free' needs guidance.label_dropout > 0 so "
                          "the model also learns the unconditional (null-label) denoiser")
    if c.guidance.channels and (c.guidance.type != "classifier_free"
                                or not 0 < c.guidance.channels <= c.data.channels):
        raise ConfigError(f"guidance.channels={c.guidance.channels} needs guidance.type="
                          f"'classifier_free' and a value in [1, data.channels="
                          f"{c.data.channels}] (0 = guide every channel)")
    if not 0.0 <= c.guidance.label_dropout < 1.0:
        raise ConfigError(f"guidance.label_dropout={c.guidance.label_dropout} must be in [0, 1)")
    if c.sampler.num_steps < 1 or c.train.num_steps < 0:
        raise ConfigError("sampler.num_steps must be >= 1 and train.num_steps >= 0")
    g = c.guidance
    if g.interval_sigma_min < 0 or g.interval_sigma_min > g.interval_sigma_max:
        raise ConfigError(f"guidance.interval_sigma_min={g.interval_sigma_min} must be in [0, "
                          f"guidance.interval_sigma_max={g.interval_sigma_max}] (0 and inf: "
                          "guide at every sigma)")
    if g.type == "autoguidance":
        _check_autoguidance(c)
    if bool(g.log_density) != (g.type == "gradient"):
        raise ConfigError(
            f"guidance.log_density={g.log_density!r} goes with guidance.type='gradient' (got "
            f"{g.type!r}): set both, e.g. --config.guidance.type=gradient "
            "--config.guidance.log_density=diffjax.guides.fashion_mnist:brighter, or neither")
    for name in ("b1", "b2"):
        if not 0.0 <= c.optim[name] < 1.0:
            raise ConfigError(f"optim.{name}={c.optim[name]} must be in [0, 1) (Adam's decay "
                              "of its moment estimates)")
    if not all(0.0 <= d < 1.0 for d in c.optim.ema_decays):
        raise ConfigError(f"optim.ema_decays={tuple(c.optim.ema_decays)} must be values in [0, 1)")
    _validate_ema(c)
    _validate_edm(c)
    _validate_condition(c)


def _check_autoguidance(c: ml_collections.ConfigDict) -> None:
    """This config's side of guidance.type='autoguidance' (the guide's own config is checked
    against it by experiment._autoguidance)."""
    g = c.guidance
    if c.model.name not in ("unet", "dit") or c.condition.type == "superres":
        raise ConfigError("guidance.type='autoguidance' guides a diffusion model on images "
                          "(model.name unet or dit, condition.type not superres); set "
                          "guidance.type=none")
    if not g.guide_workdir:
        raise ConfigError("guidance.type='autoguidance' needs --config.guidance.guide_workdir="
                          "DIR, the run of the guide (a smaller or less-trained model; with "
                          "guidance.guide_config='' an earlier checkpoint of this config, "
                          "e.g. guidance.guide_step=N)")
    if int(g.guide_step) < -1:
        raise ConfigError(f"guidance.guide_step={g.guide_step} must be a checkpoint step >= 0 "
                          "or -1 (the latest of guidance.guide_workdir)")


# sigma_rel of a power-function EMA profile is below sqrt(1/12) (gamma -> 0, a uniform average)
MAX_SIGMA_REL = (1.0 / 12.0) ** 0.5


def _validate_ema(c: ml_collections.ConfigDict) -> None:
    e = c.ema
    if not c.optim.ema_decays and not e.sigma_rels:
        raise ConfigError("no EMA: set optim.ema_decays (e.g. '(0.9999,)') or ema.sigma_rels "
                          "(e.g. '(0.05, 0.1)')")
    for name, values in (("ema.sigma_rels", tuple(e.sigma_rels)),
                         ("ema.sigma_rel", (e.sigma_rel,) if e.sigma_rel else ())):
        if not all(0.0 < v < MAX_SIGMA_REL for v in values):
            raise ConfigError(f"{name}={values if len(values) > 1 else values[0]} must be in "
                              f"(0, {MAX_SIGMA_REL:.4f}) (the relative std of a power-function "
                              "EMA profile; EDM2 uses 0.05 and 0.10)")
    if e.snapshot_every < 0 or (e.snapshot_every and not e.sigma_rels):
        raise ConfigError(f"ema.snapshot_every={e.snapshot_every} must be >= 0 and needs "
                          "ema.sigma_rels (the power-function EMAs it saves)")
    if len(set(e.sigma_rels)) != len(e.sigma_rels):
        raise ConfigError(f"ema.sigma_rels={tuple(e.sigma_rels)} holds a value twice")


def _validate_edm(c: ml_collections.ConfigDict) -> None:
    """Continuous-sigma (EDM) training and the EDM constants."""
    d = c.diffusion
    if not d.sigma_data > 0 or not 0 < d.sigma_min < d.sigma_max or not d.P_std > 0:
        raise ConfigError(
            f"diffusion.sigma_data={d.sigma_data}, P_std={d.P_std} must be > 0 and "
            f"0 < diffusion.sigma_min={d.sigma_min} < diffusion.sigma_max={d.sigma_max}")
    if d.timestep_sampler != "lognormal":
        return
    if d.prediction != "edm" or d.loss != "simple" or d.variance_type not in ("fixed_small",
                                                                              "fixed_large"):
        raise ConfigError(
            "diffusion.timestep_sampler='lognormal' trains at continuous sigma with EDM's "
            f"preconditioning: needs diffusion.prediction='edm' (got {d.prediction!r}), "
            f"loss='simple' (got {d.loss!r}) and a fixed variance_type (got "
            f"{d.variance_type!r})")
    if c.sampler.sigma_spacing == "model" or c.sampler.name == "ddpm":
        raise ConfigError(
            "a diffusion.timestep_sampler='lognormal' model has no timestep table: set "
            "--config.sampler.sigma_spacing=karras (or loglinear) and a sampler other than "
            f"ddpm (got sampler.name={c.sampler.name!r}, sigma_spacing="
            f"{c.sampler.sigma_spacing!r})")
    if "nll" in c.eval.metrics:
        raise ConfigError("eval.metrics 'nll' is the discrete bound of a timestep table; a "
                          "diffusion.timestep_sampler='lognormal' model has none: remove it")


def _validate_counts(c: ml_collections.ConfigDict) -> None:
    """Sizes and counts that must be >= 1, and the discrete schedule's step budget."""
    counts = ["data.image_size", "data.channels", "diffusion.num_timesteps"]
    if c.model.name in ("unet", "classifier"):
        counts += ["model.model_channels", "model.norm_groups"]
    for field in counts:
        if _get(c, field) < 1:
            raise ConfigError(f"{field}={_get(c, field)} must be >= 1; set --config.{field}")
    s, steps = c.sampler, c.diffusion.num_timesteps
    if s.sigma_spacing == "model" and not s.timestep_spacing and s.num_steps > steps:
        raise ConfigError(f"sampler.num_steps={s.num_steps} is more than the model's "
                          f"diffusion.num_timesteps={steps}; use at most {steps} steps (or "
                          "sampler.sigma_spacing=karras / loglinear)")


def _validate_latent(c: ml_collections.ConfigDict) -> None:
    lat = c.data.latent
    if not lat.workdir and not lat.config:
        if lat.cache:
            raise ConfigError("data.latent.cache is set but data.latent.workdir (the "
                              "autoencoder run whose latents it holds) is empty; set both")
        return
    if c.model.name in ("classifier", "autoencoder_kl"):
        raise ConfigError(f"data.latent is for diffusion models; model.name={c.model.name!r} "
                          "works on images: set --config.data.latent.workdir='' and "
                          "--config.data.latent.config=''")
    if c.sampler.thresholding != "none":
        raise ConfigError(f"sampler.thresholding={c.sampler.thresholding!r} clips x0 to the "
                          "pixel range [-1, 1], but a latent model's x0 is a latent: set "
                          "--config.sampler.thresholding=none")
    if c.condition.type == "superres":
        raise ConfigError("condition.type='superres' on latents is not supported; a "
                          "latent model samples from noise, img2img, inpaint or invert")
    if lat.shard_size < 1 or lat.scale_factor < 0:
        raise ConfigError(f"data.latent.shard_size={lat.shard_size} must be >= 1 and "
                          f"data.latent.scale_factor={lat.scale_factor} >= 0 (0 = measured)")


def _validate_dit(c: ml_collections.ConfigDict) -> None:
    d = c.model.dit
    if d.patch_size < 1 or c.data.image_size % d.patch_size:
        raise ConfigError(f"model.dit.patch_size={d.patch_size} must divide data.image_size="
                          f"{c.data.image_size}; choose a divisor (the paper uses 2, 4, 8)")
    for name in ("depth", "hidden_size", "num_heads"):
        if d[name] is not None and d[name] < 1:
            raise ConfigError(f"model.dit.{name}={d[name]} must be >= 1 (or None for the "
                              f"DiT-{d.size} value)")
    if d.mlp_ratio <= 0:
        raise ConfigError(f"model.dit.mlp_ratio={d.mlp_ratio} must be > 0")
    if c.condition.type == "superres":
        raise ConfigError("condition.type='superres' needs model.name='unet' (the DiT takes "
                          "no low-resolution input)")


def _validate_autoencoder(c: ml_collections.ConfigDict) -> None:
    a = c.model.autoencoder
    chans = tuple(a.block_out_channels)
    if not chans or a.layers_per_block < 1 or a.latent_channels < 1:
        raise ConfigError("model.autoencoder needs block_out_channels (one per level), "
                          "layers_per_block >= 1 and latent_channels >= 1")
    if a.norm_num_groups < 1:
        raise ConfigError(f"model.autoencoder.norm_num_groups={a.norm_num_groups} must be >= 1")
    if any(ch % a.norm_num_groups for ch in chans):
        raise ConfigError(f"model.autoencoder.block_out_channels={chans} must be multiples of "
                          f"norm_num_groups={a.norm_num_groups}")
    factor = 2 ** (len(chans) - 1)
    if c.data.image_size % factor:
        raise ConfigError(f"data.image_size={c.data.image_size} is not divisible by the "
                          f"autoencoder's downsampling 2**(len(block_out_channels)-1)={factor};"
                          " pad the images (--config.data.resize=pad with a larger image_size)")
    if a.kl_weight < 0:
        raise ConfigError(f"model.autoencoder.kl_weight={a.kl_weight} must be >= 0")
    _validate_discriminator(c)
    if c.guidance.type != "none" or c.condition.type != "none" or c.model.class_cond:
        raise ConfigError("model.name='autoencoder_kl' takes no labels, guidance or "
                          "condition: set guidance.type=none, condition.type=none and "
                          "model.class_cond=False")


def _validate_discriminator(c: ml_collections.ConfigDict) -> None:
    a = c.model.autoencoder
    if a.disc_start < -1:
        raise ConfigError(f"model.autoencoder.disc_start={a.disc_start} must be a step >= 0, "
                          "or -1 for no discriminator")
    if a.disc_start == -1:
        return
    if a.disc_weight < 0:
        raise ConfigError(f"model.autoencoder.disc_weight={a.disc_weight} must be >= 0")
    if a.disc_layers < 1 or a.disc_channels < 1:
        raise ConfigError(f"model.autoencoder.disc_layers={a.disc_layers} and disc_channels="
                          f"{a.disc_channels} must both be >= 1")
    if c.data.image_size // 2**a.disc_layers - 2 < 1:  # the PatchGAN's logit grid
        raise ConfigError(f"model.autoencoder.disc_layers={a.disc_layers} leaves no patch of "
                          f"data.image_size={c.data.image_size}: use at most "
                          f"log2(image_size / 3) layers")


def _validate_condition(c: ml_collections.ConfigDict) -> None:
    k = c.condition
    if not 0.0 <= k.strength <= 1.0:
        raise ConfigError(f"condition.strength={k.strength} must be in [0, 1]")
    if k.repaint_resample < 1 or k.repaint_jump < 1:
        raise ConfigError("condition.repaint_resample and condition.repaint_jump must be >= 1 "
                          "(repaint_resample=1 turns RePaint off)")
    if k.mask not in conditional.MASKS and not str(k.mask).lower().endswith(".png"):
        raise ConfigError(f"condition.mask={k.mask!r} must be one of "
                          f"{', '.join(conditional.MASKS)} or a .png path (white = known pixels)")
    if k.type != "superres":
        if k.low_res_size:
            raise ConfigError("condition.low_res_size is set but condition.type is not "
                              "'superres'; set --config.condition.type=superres or 0")
        return
    size = c.data.image_size
    if not 0 < k.low_res_size < size or size % k.low_res_size:
        raise ConfigError(f"condition.low_res_size={k.low_res_size} must be a proper divisor of "
                          f"data.image_size={size} for super-resolution")
    if not 0.0 <= k.aug_max <= 1.0 or not 0.0 <= k.aug_sample <= max(k.aug_max, 0.0):
        raise ConfigError(f"condition.aug_max={k.aug_max} must be in [0, 1] and "
                          f"condition.aug_sample={k.aug_sample} in [0, aug_max]")
    if c.guidance.type == "classifier_free" or c.model.name != "unet":
        raise ConfigError("condition.type='superres' needs model.name='unet' and no "
                          "classifier-free guidance (the low-res input is not a label)")


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Loads ``get_config(arg)`` of an experiment file (``path`` or ``path:arg``)."""
    if arg is None and ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found; pass --config experiments/NAME.py")
    name = "diffjax_experiment_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config(arg) function")
    return module.get_config(arg) if arg is not None else module.get_config()
