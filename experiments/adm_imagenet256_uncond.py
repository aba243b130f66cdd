"""ADM ImageNet 256x256, unconditional: guided-diffusion's ``256x256_diffusion_uncond.pt``.

The flags of ``adm_imagenet256.py`` with ``--class_cond False`` (no label embedding):
552,814,086 parameters. guided-diffusion samples it with ``256x256_classifier.pt`` at
classifier scale 10 (``adm_classifier256.py``)::

    python -m diffjax.convert --config experiments/adm_imagenet256_uncond.py \\
        --checkpoint 256x256_diffusion_uncond.pt --workdir runs/adm256u
    python -m diffjax.main --config experiments/adm_imagenet256_uncond.py --workdir runs/adm256u \\
        --mode sample

guided-diffusion's README gives no FID for this file alone; the paper's figures for it
(guided and unguided) are not transcribed here.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "adm_imagenet256.py"))
        c.model.class_cond = False
        return c

    return configlib.with_variant(build, arg)
