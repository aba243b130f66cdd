"""ImageNet 64x64 with classifier-free guidance (Ho & Salimans 2022) on the ADM architecture.

Labels are dropped to the null label with p=0.1 during training; the guidance weight is chosen
at sampling time (``--config.guidance.scale=W``, Ho & Salimans' w: 0 = conditional model)::

    python -m diffjax.main --config experiments/imagenet64_cfg.py --workdir gs://BUCKET/cfg64
    python -m diffjax.main --config experiments/imagenet64_cfg.py --workdir gs://BUCKET/cfg64 \
        --mode eval --config.guidance.scale=0.3

Published result (Ho & Salimans, Table 1): FID 1.55 at w=0.1, IS rising with w.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        base = os.path.join(os.path.dirname(__file__), "imagenet64.py")
        c = configlib.load_config_file(base)
        c.guidance.type = "classifier_free"
        c.guidance.label_dropout = 0.1
        c.guidance.scale = 0.3
        return c

    return configlib.with_variant(build, arg)
