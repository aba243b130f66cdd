"""ADM ImageNet 64x64, class-conditional (Dhariwal & Nichol 2021): about 296M parameters.

Cosine schedule, T=1000, learned variance (learned-range) with the hybrid loss, scale-shift
norm, BigGAN up/down blocks, attention at 32/16/8 with 64 channels per head. Needs the tfds
``imagenet_resized/64x64`` dataset prepared under ``--config.data.path``::

    python -m diffjax.main --config experiments/imagenet64.py --workdir gs://BUCKET/adm64

Published result: FID 2.07 (50k samples, 250 steps) at batch 2048 after 540k steps.
"""

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.base_config()
        c.data.source = "tfds:imagenet_resized/64x64"
        c.data.image_size = 64
        c.data.channels = 3
        c.data.num_classes = 1000
        c.data.batch_size = 2048
        c.model.model_channels = 192
        c.model.channel_mult = (1, 2, 3, 4)
        c.model.num_res_blocks = 3
        c.model.attention_resolutions = (32, 16, 8)
        c.model.num_head_channels = 64
        c.model.use_scale_shift_norm = True
        c.model.resblock_updown = True
        c.model.use_new_attention_order = True
        c.model.dropout = 0.1
        c.model.class_cond = True
        c.model.dtype = "bfloat16"
        c.diffusion.schedule = "cosine"
        c.diffusion.num_timesteps = 1000
        c.diffusion.prediction = "eps"
        c.diffusion.loss = "hybrid"
        c.diffusion.variance_type = "learned_range"
        c.sampler.name = "ddpm"
        c.sampler.num_steps = 250
        c.optim.learning_rate = 3e-4
        c.optim.warmup_steps = 1000
        c.optim.ema_decays = (0.9999,)
        c.train.num_steps = 540_000
        c.train.log_every = 100
        c.train.checkpoint_every = 5_000
        c.train.sample_every = 10_000
        c.eval.metrics = ("fid", "sfid", "inception_score", "precision_recall")
        c.eval.split = "validation"  # ImageNet has no labelled test split
        c.eval.num_samples = 50_000
        return c

    return configlib.with_variant(build, arg)
