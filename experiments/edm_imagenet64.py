"""EDM on ImageNet 64x64, class-conditional (Karras et al. 2022, config F: "ADM + EDM").

EDM's training command for this model (its train.py option names; values transcribed here)::

    --cond=1 --arch=adm --precond=edm --batch=4096 --duration=2500 --lr=2e-4 --ema=50
    --dropout=0.10 --augment=0 --fp16=1

The network is ADM's ImageNet-64 UNet of ``imagenet64.py`` (EDM's DhariwalUNet: 192 channels,
mult 1-2-3-4, 3 blocks, attention at 32/16/8 with 64 channels per head) with one output per
channel (no learned variance), trained with EDM's preconditioning and loss at continuous
sigma (ln sigma ~ N(-1.2, 1.2^2), sigma_data 0.5). ``--duration`` 2500 Mimg is 610,352 steps
of 4096; ``--lr_rampup`` 10 Mimg is 2,441 warm-up steps; ``--ema`` 50 Mimg half-life is the
per-step decay 0.5^(4096 / 50e6). Mixed precision is bfloat16 (EDM: fp16 with loss scaling).
Not transcribed: EDM's EMA half-life ramp-up (``ema_rampup_ratio`` 0.05 in the first steps).

    python -m diffjax.main --config experiments/edm_imagenet64.py --workdir gs://BUCKET/edm64

Published result: FID 1.36 with the stochastic Heun sampler (256 steps, S_churn 40,
S_min 0.05, S_max 50, S_noise 1.003: 511 network evaluations), the sampler set here;
2.23 with the deterministic one at 79 evaluations (--config.sampler.num_steps=40
--config.sampler.s_churn=0).
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        here = os.path.dirname(__file__)
        c = configlib.load_config_file(os.path.join(here, "imagenet64.py"))
        c.data.batch_size = 4096  # --batch
        c.model.dropout = 0.10  # --dropout
        c.diffusion.prediction = "edm"  # --precond=edm
        c.diffusion.timestep_sampler = "lognormal"
        c.diffusion.loss = "simple"
        c.diffusion.variance_type = "fixed_small"  # DhariwalUNet: no learned variance
        c.diffusion.schedule = "karras"
        c.diffusion.P_mean = -1.2
        c.diffusion.P_std = 1.2
        c.diffusion.sigma_data = 0.5
        c.diffusion.sigma_min = 0.002
        c.diffusion.sigma_max = 80.0
        c.optim.learning_rate = 2e-4  # --lr
        c.optim.warmup_steps = 2_441  # --lr_rampup=10000 kimg
        c.optim.grad_clip = 0.0  # EDM does not clip (it zeroes non-finite gradients)
        c.optim.ema_decays = (0.5 ** (4096 / 50e6),)  # --ema=50 Mimg half-life
        c.train.num_steps = 610_352  # --duration=2500 Mimg
        c.sampler.name = "heun"
        c.sampler.num_steps = 256
        c.sampler.sigma_spacing = "karras"
        c.sampler.rho = 7.0
        c.sampler.s_churn = 40.0
        c.sampler.s_tmin = 0.05
        c.sampler.s_tmax = 50.0
        c.sampler.s_noise = 1.003
        c.sampler.thresholding = "none"  # EDM's sampler does not clip
        c.eval.metrics = ("fid",)
        return c

    return configlib.with_variant(build, arg)
