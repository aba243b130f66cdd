"""Stable Diffusion 1.5's UNet (CompVis/LDM's ``v1-inference.yaml``; diffusers'
``UNet2DConditionModel`` of ``stable-diffusion-v1-5/unet``), on SD's 64x64x4 latents of
512x512 images.

The options transcribed (LDM's name = value; diffjax takes the same names): image_size 64
(latent; ``data.latent`` is SD's VAE, ``experiments/autoencoder_sd_vae.py``, scale factor
0.18215), in/out_channels 4, model_channels 320, channel_mult (1, 2, 4, 4),
num_res_blocks 2, attention_resolutions (4, 2, 1) as downsample rates = latent resolutions
(64, 32, 16) here, num_heads 8 (head width C / 8), use_spatial_transformer True,
transformer_depth 1, context_dim 768 (CLIP ViT-L/14's token width), use_linear_in_transformer
False (1x1-conv proj_in/out; SD 2 sets it), no scale-shift norm, conv resampling, no class
embedding; the noise table: ``scaled_linear`` betas 0.00085 -> 0.012, T = 1000, eps
prediction. ``--mode summary`` reports 859,520,964 parameters, the count of diffusers'
``UNet2DConditionModel`` with SD 1.5's config::

    python -m diffjax.main --config experiments/sd15_unet.py --mode summary

The released weights convert with::

    python -m diffjax.convert --config experiments/sd15_unet.py \\
        --checkpoint stable-diffusion-v1-5/unet/diffusion_pytorch_model.safetensors \\
        --workdir runs/sd15_unet

or, in CompVis/LDM's format, ``--checkpoint v1-5-pruned-emaonly.safetensors`` (a whole SD
checkpoint: its ``model.diffusion_model.*`` tensors are the UNet; the VAE's convert with
``experiments/autoencoder_sd_vae.py`` from the same file).

Not wired yet (issue 13 part 2): the context source. CLIP's text encoder and its tokenizer
exist as library parts (``diffjax.models.clip_text``, ``diffjax.convert.clip_text``,
``diffjax.text.CLIPTokenizer``: prompts -> the [B, 77, 768] context this UNet takes, from the
released files), but no config runs them as a frozen encoder with the empty prompt as the
null condition of classifier-free guidance, so ``--mode train`` / ``sample`` / ``eval`` of
this config stop with a one-line error before any work. SD 1.5's own training (LAION-Aesthetics, 10% of captions dropped, AdamW 1e-4) and
sampling (PNDM/DDIM 50 steps, guidance 7.5 = diffjax's w 6.5) wait for it. ``:smoke`` is
the CPU-sized model of the same family (its init and apply run).
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.base_config()
        c.data.source = "folder"  # LAION-Aesthetics is not reachable here
        c.data.image_size = 512  # the network sees 64x64x4 latents (SD's VAE: / 8)
        c.data.channels = 3
        c.data.num_classes = 0
        c.data.resize = "resize"
        c.data.batch_size = 64
        c.data.latent.config = os.path.join(os.path.dirname(__file__), "autoencoder_sd_vae.py")
        c.data.latent.workdir = "runs/sd_vae"
        c.data.latent.scale_factor = 0.18215
        c.model.model_channels = 320
        c.model.channel_mult = (1, 2, 4, 4)
        c.model.num_res_blocks = 2
        c.model.attention_resolutions = (64, 32, 16)
        c.model.num_heads = 8
        c.model.context_dim = 768
        c.model.use_spatial_transformer = True
        c.model.transformer_depth = 1
        c.model.use_linear_in_transformer = False
        c.model.dtype = "bfloat16"
        c.diffusion.schedule = "scaled_linear"
        c.diffusion.num_timesteps = 1000
        c.diffusion.prediction = "eps"
        c.sampler.name = "ddim"
        c.sampler.num_steps = 50
        c.sampler.thresholding = "none"  # latents are not in [-1, 1]
        c.optim.learning_rate = 1e-4
        c.optim.warmup_steps = 10_000
        c.optim.weight_decay = 0.0
        c.train.sample_every = 0
        return c

    return configlib.with_variant(build, arg)
