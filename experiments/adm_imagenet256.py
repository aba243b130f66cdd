"""ADM ImageNet 256x256, class-conditional: guided-diffusion's ``256x256_diffusion.pt``.

A transcription of guided-diffusion's published sampling flags for this file
(``--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256
--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64
--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True``),
every other flag at guided-diffusion's default: channel_mult (1, 1, 2, 2, 4, 4) (its choice
for image_size 256), dropout 0, and the *legacy* qkv order (``use_new_attention_order``
False; only the 64x64 model was released with the new order) with 64 channels per head.

``--mode summary`` reports 553,838,086 parameters ("554M" in the paper), guided-diffusion's
UNetModel count for these flags (derived in tests/models/test_released_configs.py).
``adm_imagenet256_uncond.py`` is the unconditional release, ``adm_lsun256.py`` the LSUN ones.

    python -m diffjax.convert --config experiments/adm_imagenet256.py \\
        --checkpoint 256x256_diffusion.pt --workdir runs/adm256
    python -m diffjax.main --config experiments/adm_imagenet256.py --workdir runs/adm256 \\
        --mode sample

Published (Dhariwal & Nichol 2021, Table 4): FID 4.59 on 50k samples, 250 ancestral steps,
classifier scale 1.0 with ``256x256_classifier.pt`` (ADM-G, ``adm_classifier256.py``); 3.94
with the 64 -> 256 upsampler on guided 64x64 samples (ADM-G + ADM-U). Training from scratch
reads tfds ``imagenet2012``; the optimiser settings are this project's, not the paper's.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        # ImageNet-64's ADM config (experiments/imagenet64.py) with what differs at 256x256.
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__), "imagenet64.py"))
        c.data.source = "tfds:imagenet2012"
        c.data.image_size = 256
        c.data.batch_size = 256
        c.data.resize = "resize"
        c.model.model_channels = 256
        c.model.channel_mult = (1, 1, 2, 2, 4, 4)
        c.model.num_res_blocks = 2
        c.model.use_new_attention_order = False
        c.model.dropout = 0.0
        c.diffusion.schedule = "linear"
        c.sampler.batch_size = 32
        c.optim.learning_rate = 1e-4
        c.train.num_steps = 500_000
        c.train.sample_every = 0
        return c

    return configlib.with_variant(build, arg)
