"""ADM ImageNet 128 -> 512 upsampler: guided-diffusion's ``128_512_upsampler.pt``.

The flags of ``imagenet64_to_256.py`` with guided-diffusion's published differences for
this file (``--attention_resolutions 32,16 --large_size 512 --small_size 128
--num_head_channels 64``): channel_mult (1, 1, 2, 2, 4, 4) (sr_create_model's choice for
large_size 512), attention at 32 and 16 pixels only, 64 channels per head in the legacy qkv
order (``use_new_attention_order`` False), the 128x128 image as the UNet's ``low_res`` input.
``--mode summary`` reports 308,835,270 parameters, guided-diffusion's SuperResModel count
(derived in tests/models/test_released_configs.py).

    python -m diffjax.convert --config experiments/adm_upsampler128_512.py \\
        --checkpoint 128_512_upsampler.pt --workdir runs/up512
    python -m diffjax.main --config experiments/adm_upsampler128_512.py --workdir runs/up512 \\
        --mode sample --config.condition.input=samples_128.npz

Published (Dhariwal & Nichol 2021): FID 3.85 at 512x512 for classifier-guided 128x128
samples upsampled by this model (ADM-G + ADM-U).
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "imagenet64_to_256.py"))
        c.data.image_size = 512
        c.data.batch_size = 64
        c.model.attention_resolutions = (32, 16)
        c.model.num_heads = 1
        c.model.num_head_channels = 64
        c.model.use_new_attention_order = False
        c.condition.low_res_size = 128
        c.sampler.batch_size = 16
        return c

    return configlib.with_variant(build, arg)
