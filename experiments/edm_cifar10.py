"""EDM on CIFAR-10, class-conditional (Karras et al. 2022, config F with the DDPM++ settings).

EDM's training command (its train.py option names; values transcribed here)::

    --cond=1 --arch=ddpmpp --precond=edm --batch=512 --duration=200 --lr=10e-4 --ema=0.5
    --dropout=0.13 --augment=0.12 --cbase=128 --cres=2,2,2

diffjax has no DDPM++ (SongUNet) network: this config uses the ADM UNet with DDPM++'s widths
and depths (128 base channels, multipliers 2-2-2, 4 residual blocks per level, one attention
head at 16x16, additive time embedding, residual down/up-sampling blocks), about the same
size. EDM's non-leaking augmentation pipeline (``--augment=0.12``, which conditions the
network on the augmentation) is not implemented: expect a worse FID than the paper's 1.79.
``--duration`` 200 Mimg is 390,625 steps of 512; ``--lr_rampup`` 10 Mimg 19,531 warm-up
steps; ``--ema`` 0.5 Mimg half-life the per-step decay 0.5^(512 / 5e5); EDM's EMA ramp-up is
not transcribed.

    python -m diffjax.main --config experiments/edm_cifar10.py --workdir gs://BUCKET/edm_cifar

Sampled as EDM reports it: deterministic Heun, 18 steps (35 network evaluations).
"""

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.base_config()
        c.data.source = "tfds:cifar10"
        c.data.image_size = 32
        c.data.channels = 3
        c.data.num_classes = 10
        c.data.batch_size = 512  # --batch
        c.model.model_channels = 128  # --cbase
        c.model.channel_mult = (2, 2, 2)  # --cres
        c.model.num_res_blocks = 4
        c.model.attention_resolutions = (16,)
        c.model.num_heads = 1
        c.model.dropout = 0.13  # --dropout
        c.model.class_cond = True  # --cond=1
        c.model.use_scale_shift_norm = False  # DDPM++: additive embedding
        c.model.resblock_updown = True  # DDPM++: residual down/up-sampling blocks
        c.diffusion.prediction = "edm"  # --precond=edm
        c.diffusion.timestep_sampler = "lognormal"
        c.diffusion.schedule = "karras"
        c.diffusion.P_mean = -1.2
        c.diffusion.P_std = 1.2
        c.diffusion.sigma_data = 0.5
        c.diffusion.sigma_min = 0.002
        c.diffusion.sigma_max = 80.0
        c.optim.learning_rate = 1e-3  # --lr=10e-4
        c.optim.warmup_steps = 19_531  # --lr_rampup=10000 kimg
        c.optim.grad_clip = 0.0
        c.optim.ema_decays = (0.5 ** (512 / 5e5),)  # --ema=0.5 Mimg half-life
        c.train.num_steps = 390_625  # --duration=200 Mimg
        c.train.log_every = 100
        c.train.checkpoint_every = 10_000
        c.train.sample_every = 10_000
        c.sampler.name = "heun"
        c.sampler.num_steps = 18
        c.sampler.sigma_spacing = "karras"
        c.sampler.rho = 7.0
        c.sampler.thresholding = "none"
        c.eval.metrics = ("fid",)
        c.eval.num_samples = 50_000
        return c

    return configlib.with_variant(build, arg)
