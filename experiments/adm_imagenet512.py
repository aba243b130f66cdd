"""ADM ImageNet 512x512, class-conditional: guided-diffusion's ``512x512_diffusion.pt``.

A transcription of guided-diffusion's published sampling flags for this file
(``--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512
--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64
--num_res_blocks 2 --resblock_updown True --use_fp16 False --use_scale_shift_norm True``),
every other flag at guided-diffusion's default: channel_mult (0.5, 1, 1, 2, 2, 4, 4) (its
choice for image_size 512: the first level has 128 channels), dropout 0 and the legacy qkv
order with 64 channels per head. The file is stored in float32 (``--use_fp16 False``).

``--mode summary`` reports 558,997,638 parameters ("559M" in the paper), guided-diffusion's UNetModel count for
these flags (derived in tests/models/test_released_configs.py).

    python -m diffjax.convert --config experiments/adm_imagenet512.py \\
        --checkpoint 512x512_diffusion.pt --workdir runs/adm512
    python -m diffjax.main --config experiments/adm_imagenet512.py --workdir runs/adm512 \\
        --mode sample --config.guidance.type=classifier --config.guidance.scale=4.0 \\
        --config.guidance.classifier_config=experiments/adm_classifier512.py \\
        --config.guidance.classifier_workdir=runs/adm512_cls

Published (Dhariwal & Nichol 2021; guided-diffusion's README): FID 7.72 unguided-table
entry for ImageNet 512x512 with 250 steps, 3.85 with the 128 -> 512 upsampler and guidance;
the README samples this file at classifier scale 4.0. Training from scratch reads tfds
``imagenet2012``; the optimiser settings are this project's, not the paper's.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        # The 256x256 release (adm_imagenet256.py) with what differs at 512x512.
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "adm_imagenet256.py"))
        c.data.image_size = 512
        c.data.batch_size = 256
        c.model.channel_mult = (0.5, 1, 1, 2, 2, 4, 4)
        c.sampler.batch_size = 8
        return c

    return configlib.with_variant(build, arg)
