"""improved-diffusion's class-conditional ImageNet 64x64: ``imagenet64_cond_270M_250K.pt``.

``iddpm_imagenet64_uncond.py`` with this file's flags (``--num_channels 192 --class_cond True
--rescale_learned_sigmas False --rescale_timesteps False``, ``--lr 3e-4 --batch_size
2048``): the network sees the timestep index itself (0 ... 3999), and the hybrid loss is
L_simple + L_vlb unscaled (vlb_weight 1 / T = 2.5e-4 in diffjax's T-scaled form).

``--mode summary`` reports 273,049,350 parameters (derived in
tests/models/test_released_configs.py; "270M" in its file name)::

    python -m diffjax.convert --config experiments/iddpm_imagenet64_cond.py \\
        --checkpoint imagenet64_cond_270M_250K.pt --workdir runs/iddpm64c
    python -m diffjax.main --config experiments/iddpm_imagenet64_cond.py \\
        --workdir runs/iddpm64c --mode sample
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "iddpm_imagenet64_uncond.py"))
        c.data.batch_size = 2048
        c.model.model_channels = 192
        c.model.class_cond = True
        c.diffusion.rescale_timesteps = False
        c.diffusion.vlb_weight = 1.0 / 4000
        c.optim.learning_rate = 3e-4
        c.train.num_steps = 250_000
        c.eval.metrics = ("fid", "sfid", "inception_score", "precision_recall")
        return c

    return configlib.with_variant(build, arg)
