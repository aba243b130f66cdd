"""improved-diffusion's unconditional CIFAR-10 (Nichol & Dhariwal 2021), L_hybrid.

A transcription of the flags of openai/improved-diffusion's ``cifar10_uncond_50M_500K.pt``
(``--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3
--diffusion_steps 4000 --noise_schedule cosine``, ``--lr 1e-4 --batch_size 128``), the
other flags at improved-diffusion's defaults as in ``iddpm_imagenet64_uncond.py``
(channel_mult (1, 2, 2, 2) for 32x32, attention at 16 and 8 pixels with 4 heads, legacy qkv
order, ``rescale_timesteps``, hybrid loss with vlb_weight 1e-3). ``cifar10_uncond_vlb_50M_500K.pt``
has the same architecture.

``--mode summary`` reports 52,546,438 parameters (derived in
tests/models/test_released_configs.py; "50M" in its file name)::

    python -m diffjax.convert --config experiments/iddpm_cifar10_uncond.py \\
        --checkpoint cifar10_uncond_50M_500K.pt --workdir runs/iddpm_cifar10

Published (Nichol & Dhariwal 2021, Table 2): 2.94 bits/dim, FID 11.47 (L_hybrid, 500K steps).
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "iddpm_imagenet64_uncond.py"))
        c.data.source = "tfds:cifar10"
        c.data.image_size = 32
        c.data.num_classes = 10
        c.data.random_flip = True
        c.model.channel_mult = (1, 2, 2, 2)
        c.model.dropout = 0.3
        c.train.num_steps = 500_000
        c.eval.split = "test"
        return c

    return configlib.with_variant(build, arg)
