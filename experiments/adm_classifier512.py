"""ADM noise-aware ImageNet 512x512 classifier: guided-diffusion's ``512x512_classifier.pt``.

``adm_classifier128.py`` at image_size 512, where guided-diffusion's classifier takes
channel_mult (0.5, 1, 1, 2, 2, 4, 4) (64 channels at the first level of width 128); the same
defaults otherwise (depth 2, attention at 32, 16, 8 pixels, 64 channels per head, attention
pooling), the linear T = 1000 table: 54,448,360 parameters. It guides ``adm_imagenet512.py`` (guided-diffusion's
README: scale 4.0); see ``adm_classifier64.py`` for the guidance caveat::

    python -m diffjax.convert --config experiments/adm_classifier512.py \\
        --checkpoint 512x512_classifier.pt --workdir runs/adm512_cls
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "adm_classifier128.py"))
        c.data.image_size = 512
        c.model.channel_mult = (0.5, 1, 1, 2, 2, 4, 4)
        return c

    return configlib.with_variant(build, arg)
