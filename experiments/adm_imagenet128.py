"""ADM ImageNet 128x128, class-conditional: guided-diffusion's ``128x128_diffusion.pt``.

A transcription of guided-diffusion's published sampling flags for this file
(``--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128
--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2
--resblock_updown True --use_fp16 True --use_scale_shift_norm True``), every other flag at
guided-diffusion's default: channel_mult (1, 1, 2, 3, 4) (its choice for image_size 128),
dropout 0. Unlike the 64 and 256 models (64 channels per head, so more heads where there
are more channels), this one has a fixed 4 heads at every resolution (``num_heads 4``,
``num_head_channels -1``, ``num_heads_upsample -1`` = the same 4), and like every release
but the 64x64 model it has QKVAttentionLegacy's per-head [q_h | k_h | v_h] qkv layout
(``use_new_attention_order False``). These options change no tensor shape, so a wrong one
converts without error and computes another function: keep them as written here.

``--mode summary`` reports 421,529,606 parameters, guided-diffusion's UNetModel count for
these flags (tests/models/test_released_configs.py derives it in closed form).

From the released file to samples (classifier guidance with ``128x128_classifier.pt``,
``experiments/adm_classifier128.py``, is the published setting)::

    python -m diffjax.convert --config experiments/adm_imagenet128.py \\
        --checkpoint 128x128_diffusion.pt --workdir runs/adm128
    python -m diffjax.main --config experiments/adm_imagenet128.py --workdir runs/adm128 \\
        --mode sample

Published (Dhariwal & Nichol 2021, Table 4): FID 2.97 on 50k samples, 250 ancestral steps,
classifier scale 0.5 (ADM-G). Training from scratch reads tfds ``imagenet2012`` resized to
128x128; the optimiser settings below are this project's, not checked against the paper's.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        # ImageNet-64's ADM config (experiments/imagenet64.py) with what differs at 128x128.
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__), "imagenet64.py"))
        c.data.source = "tfds:imagenet2012"
        c.data.image_size = 128
        c.data.batch_size = 256
        c.data.resize = "resize"
        c.model.model_channels = 256
        c.model.channel_mult = (1, 1, 2, 3, 4)
        c.model.num_res_blocks = 2
        c.model.num_heads = 4
        c.model.num_head_channels = -1
        c.model.num_heads_upsample = -1
        c.model.use_new_attention_order = False
        c.model.dropout = 0.0
        c.diffusion.schedule = "linear"
        c.sampler.batch_size = 64
        c.optim.learning_rate = 1e-4
        c.train.num_steps = 500_000
        c.train.sample_every = 0
        return c

    return configlib.with_variant(build, arg)
