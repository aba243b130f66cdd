"""DiT-XL/2 on ImageNet 256x256 in Stable Diffusion VAE latents (Peebles & Xie 2023).

The paper's recipe as options: the network sees 32x32x4 latents (256 / 8, SD's VAE, scale
0.18215: ``data.latent``), patch 2 (256 tokens), depth 28, hidden 1152, 16 heads, MLP ratio 4; learned
variance with iDDPM's hybrid loss on the linear T = 1000 table; class-conditional with label
dropout 0.1 (the null row of the label table); AdamW at lr 1e-4 without weight decay,
global batch 256, EMA 0.9999; 250-step ancestral sampling with classifier-free guidance
(DiT's cfg-scale 1.5 = Ho's w 0.5). ``guidance.channels=3`` guides only the first 3 of the 4
latent channels as the released DiT's sampling script does (a reproduction switch; 0 guides
all four).

``--mode summary`` reports 674,834,720 parameters, the trainable count of facebookresearch/
DiT's ``DiT_XL_2(input_size=32, num_classes=1000)`` (its script also counts the fixed
256 x 1152 position table: 675,129,632). The released ``DiT-XL-2-256x256.pt`` converts with::

    python -m diffjax.convert --config experiments/dit_xl2_imagenet256.py \\
        --checkpoint DiT-XL-2-256x256.pt --workdir runs/dit_xl2

The VAE is ``data.latent``: the architecture of ``experiments/autoencoder_sd_vae.py`` with
the weights of ``data.latent.workdir`` (convert the released VAE into it first; DiT used
``sd-vae-ft-ema``, ``sd-vae-ft-mse`` has the same architecture)::

    python -m diffjax.convert --config experiments/autoencoder_sd_vae.py \
        --checkpoint sd-vae-ft-ema/diffusion_pytorch_model.safetensors --workdir runs/sd_vae_ft_ema

Training encodes each batch of 256x256 images (centre-cropped, randomly flipped, as DiT)
on the fly and trains on posterior samples times 0.18215; ``--mode sample`` / ``eval``
decode the samples to images. Published (Table 4): FID 2.27 with cfg-scale 1.5, 250 DDPM
steps.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.base_config()
        c.data.source = "tfds:imagenet2012"
        c.data.image_size = 256  # the network sees 32x32x4 latents (SD's VAE: / 8)
        c.data.channels = 3
        c.data.resize = "resize"  # shorter side to 256, centre crop
        c.data.latent.config = os.path.join(os.path.dirname(__file__), "autoencoder_sd_vae.py")
        c.data.latent.workdir = "runs/sd_vae_ft_ema"
        c.data.latent.scale_factor = 0.18215
        c.data.num_classes = 1000
        c.data.batch_size = 256
        c.data.random_flip = True
        c.model.name = "dit"
        c.model.dit.size = "XL"
        c.model.dit.patch_size = 2
        c.model.class_cond = True
        c.model.dtype = "bfloat16"
        c.diffusion.schedule = "linear"
        c.diffusion.num_timesteps = 1000
        c.diffusion.prediction = "eps"
        c.diffusion.loss = "hybrid"
        c.diffusion.variance_type = "learned_range"
        c.guidance.type = "classifier_free"
        c.guidance.label_dropout = 0.1
        c.guidance.scale = 0.5  # DiT's cfg-scale 1.5 (GLIDE's convention, 1 + w)
        c.guidance.channels = 3
        c.sampler.name = "ddpm"
        c.sampler.num_steps = 250
        c.sampler.thresholding = "none"  # latents are not in [-1, 1]
        c.sampler.batch_size = 32
        c.optim.learning_rate = 1e-4
        c.optim.warmup_steps = 0
        c.optim.weight_decay = 0.0
        c.optim.ema_decays = (0.9999,)
        c.train.num_steps = 7_000_000
        c.train.log_every = 100
        c.train.checkpoint_every = 50_000
        c.train.sample_every = 0
        c.eval.metrics = ("fid",)
        c.eval.split = "validation"
        c.eval.num_samples = 50_000
        return c

    return configlib.with_variant(build, arg)
