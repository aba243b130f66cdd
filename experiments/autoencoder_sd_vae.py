"""Stable Diffusion's KL autoencoder (``sd-vae-ft-mse``, the VAE of SD 1.x / 2.x, DiT and
LDM-4 ImageNet): 256x256x3 images <-> 32x32x4 latents (scale factor 0.18215 for diffusion).

diffusers' ``AutoencoderKL`` options: block_out_channels (128, 256, 512, 512), 2 ResNet
layers per block, 4 latent channels, 32 GroupNorm groups. ``--mode summary`` reports
83,653,863 parameters (34,163,664 in the encoder and quant conv, 49,490,199 in the decoder
and post-quant conv). The released weights convert with::

    python -m diffjax.convert --config experiments/autoencoder_sd_vae.py \\
        --checkpoint diffusion_pytorch_model.safetensors --workdir runs/sd_vae
    python -m diffjax.main --config experiments/autoencoder_sd_vae.py --workdir runs/sd_vae \\
        --mode eval

(a CompVis ``.ckpt`` of a whole Stable Diffusion model gives its ``first_stage_model``).
Training here uses L1 + 1e-6 KL only: SD's recipe adds an LPIPS perceptual loss (its VGG
weights cannot be downloaded here) and a PatchGAN hinge loss, which diffjax does not have.
"""

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.base_config()
        c.data.source = "tfds:imagenet2012"
        c.data.image_size = 256
        c.data.channels = 3
        c.data.num_classes = 0
        c.data.batch_size = 64
        c.data.resize = "resize"
        c.data.random_flip = True
        c.model.name = "autoencoder_kl"
        c.model.dtype = "bfloat16"
        c.optim.learning_rate = 4.5e-6 * 64  # LDM's base_learning_rate x batch
        c.optim.warmup_steps = 0
        c.optim.ema_decays = (0.999,)
        c.train.num_steps = 500_000
        c.train.sample_every = 5_000
        c.train.num_sample_images = 16
        c.eval.metrics = ("psnr",)
        c.eval.split = "validation"
        c.eval.batch_size = 32
        return c

    return configlib.with_variant(build, arg)
