"""improved-diffusion's unconditional ImageNet 64x64 (Nichol & Dhariwal 2021), L_hybrid.

A transcription of the flags of openai/improved-diffusion's ``imagenet64_uncond_100M_1500K.pt``
(``--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True
--diffusion_steps 4000 --noise_schedule cosine``, ``--lr 1e-4 --batch_size 128``) with every
other flag at improved-diffusion's default: attention at 16 and 8 pixels with 4 heads in the
legacy qkv order, scale-shift norm, convolutional (not BigGAN) resampling, dropout 0, and
``rescale_timesteps`` (the network sees t * 1000 / 4000) and ``rescale_learned_sigmas``
(the hybrid loss L_simple + (T / 1000) L_vlb: vlb_weight 1e-3 in diffjax's T-scaled form).
The ``imagenet64_uncond_vlb_100M_1500K.pt`` file (``--use_kl True``) has the same
architecture and converts with this config too (train it with ``diffusion.loss=vlb``).

``--mode summary`` reports 121,063,942 parameters (improved-diffusion's UNetModel count for
these flags, derived in tests/models/test_released_configs.py; "100M" in its file name)::

    python -m diffjax.convert --config experiments/iddpm_imagenet64_uncond.py \\
        --checkpoint imagenet64_uncond_100M_1500K.pt --workdir runs/iddpm64
    python -m diffjax.main --config experiments/iddpm_imagenet64_uncond.py \\
        --workdir runs/iddpm64 --mode eval --config.eval.metrics='("nll",)'

Published (Nichol & Dhariwal 2021, Table 2): 3.57 bits/dim (L_hybrid, 1.5M steps); FID 19.2
(50k samples, 4000 steps; Table 4's L_hybrid ImageNet 64x64 row).
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        # ADM's ImageNet-64 config (experiments/imagenet64.py) with improved-diffusion's model.
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__), "imagenet64.py"))
        c.data.batch_size = 128
        c.model.model_channels = 128
        c.model.attention_resolutions = (16, 8)
        c.model.num_heads = 4
        c.model.num_head_channels = -1
        c.model.resblock_updown = False
        c.model.use_new_attention_order = False
        c.model.dropout = 0.0
        c.model.class_cond = False
        c.diffusion.num_timesteps = 4000
        c.diffusion.rescale_timesteps = True
        c.diffusion.vlb_weight = 1e-3
        c.optim.learning_rate = 1e-4
        c.train.num_steps = 1_500_000
        c.eval.metrics = ("fid", "nll")
        return c

    return configlib.with_variant(build, arg)
