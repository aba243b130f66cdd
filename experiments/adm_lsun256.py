"""ADM LSUN 256x256, unconditional: guided-diffusion's ``lsun_bedroom.pt``, ``lsun_cat.pt``,
``lsun_horse.pt`` (and ``lsun_horse_nodropout.pt`` with ``--config.model.dropout=0``).

The flags of ``adm_imagenet256_uncond.py`` (552,814,086 parameters) with ``--dropout 0.1``,
the only difference guided-diffusion's README gives; it samples them with 1000 steps
(``--timestep_respacing 1000``), set below::

    python -m diffjax.convert --config experiments/adm_lsun256.py \\
        --checkpoint lsun_bedroom.pt --workdir runs/lsun_bedroom
    python -m diffjax.main --config experiments/adm_lsun256.py --workdir runs/lsun_bedroom \\
        --mode sample

Published (guided-diffusion README, ADM with dropout, unguided): FID 1.90 bedroom, 5.57 cat,
2.57 horse. Training reads tfds ``lsun/bedroom`` (``--config.data.source=tfds:lsun/cat``
etc. for the others); the optimiser settings are this project's, not the paper's.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "adm_imagenet256_uncond.py"))
        c.data.source = "tfds:lsun/bedroom"
        c.data.num_classes = 0
        c.model.dropout = 0.1
        c.sampler.num_steps = 1000
        c.eval.split = "train"
        return c

    return configlib.with_variant(build, arg)
