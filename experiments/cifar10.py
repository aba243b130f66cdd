"""DDPM on CIFAR-10 (Ho et al. 2020): the 35.7M-parameter model, linear T=1000, eps, L_simple.

Needs the tfds ``cifar10`` dataset prepared under ``--config.data.path`` (or TFDS_DATA_DIR)::

    python -m diffjax.main --config experiments/cifar10.py --workdir gs://BUCKET/cifar10

Published result: FID 3.17 (50k samples, 1000 ancestral steps) after 800k steps at batch 128.
"""

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.base_config()
        c.data.source = "tfds:cifar10"
        c.data.image_size = 32
        c.data.channels = 3
        c.data.num_classes = 10
        c.data.batch_size = 128
        c.data.random_flip = True
        c.model.model_channels = 128
        c.model.channel_mult = (1, 2, 2, 2)
        c.model.num_res_blocks = 2
        c.model.attention_resolutions = (16,)
        c.model.dropout = 0.1
        c.diffusion.schedule = "linear"
        c.diffusion.num_timesteps = 1000
        c.diffusion.prediction = "eps"
        c.diffusion.loss = "simple"
        c.diffusion.variance_type = "fixed_large"
        c.sampler.name = "ddpm"
        c.sampler.num_steps = 1000
        c.optim.learning_rate = 2e-4
        c.optim.warmup_steps = 5000
        c.optim.grad_clip = 1.0
        c.optim.ema_decays = (0.9999,)
        c.train.num_steps = 800_000
        c.train.log_every = 100
        c.train.checkpoint_every = 10_000
        c.train.sample_every = 10_000
        c.eval.metrics = ("fid", "inception_score")
        c.eval.num_samples = 50_000
        return c

    return configlib.with_variant(build, arg)
