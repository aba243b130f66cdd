"""ADM noise-aware ImageNet 256x256 classifier: guided-diffusion's ``256x256_classifier.pt``.

``adm_classifier128.py`` at image_size 256, where guided-diffusion's classifier takes
channel_mult (1, 1, 2, 2, 4, 4); the same defaults otherwise (width 128, depth 2, attention
at 32, 16, 8 pixels, 64 channels per head, attention pooling), the linear T = 1000 table.
It guides both ``adm_imagenet256.py`` (published: scale 1.0, 250 ancestral steps, FID 4.59)
and ``adm_imagenet256_uncond.py`` (guided-diffusion's README samples it at scale 10); see
``adm_classifier64.py`` for the guidance caveat::

    python -m diffjax.convert --config experiments/adm_classifier256.py \\
        --checkpoint 256x256_classifier.pt --workdir runs/adm256_cls
    python -m diffjax.main --config experiments/adm_imagenet256.py --workdir runs/adm256 \\
        --mode sample --config.guidance.type=classifier --config.guidance.scale=1.0 \\
        --config.guidance.classifier_config=experiments/adm_classifier256.py \\
        --config.guidance.classifier_workdir=runs/adm256_cls
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "adm_classifier128.py"))
        c.data.image_size = 256
        c.model.channel_mult = (1, 1, 2, 2, 4, 4)
        return c

    return configlib.with_variant(build, arg)
