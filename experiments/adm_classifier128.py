"""ADM noise-aware ImageNet 128x128 classifier: guided-diffusion's ``128x128_classifier.pt``.

The classifier flags of ``adm_classifier64.py`` at guided-diffusion's defaults for this file
(its README's ``--image_size 128 --classifier_attention_resolutions 32,16,8
--classifier_depth 2 --classifier_width 128 --classifier_pool attention
--classifier_resblock_updown True --classifier_use_scale_shift_norm True``): channel_mult
(1, 1, 2, 3, 4) (its choice for image_size 128), 2 ResBlocks per level, the linear T = 1000
table of ``adm_imagenet128.py``, the model it guides (published: scale 0.5, 250 ancestral
steps, FID 2.97; see ``adm_classifier64.py`` for the guidance caveat)::

    python -m diffjax.convert --config experiments/adm_classifier128.py \\
        --checkpoint 128x128_classifier.pt --workdir runs/adm128_cls
    python -m diffjax.main --config experiments/adm_imagenet128.py --workdir runs/adm128 \\
        --mode sample --config.guidance.type=classifier --config.guidance.scale=0.5 \\
        --config.guidance.classifier_config=experiments/adm_classifier128.py \\
        --config.guidance.classifier_workdir=runs/adm128_cls

Training from scratch reads tfds ``imagenet2012`` resized to 128x128.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "adm_classifier64.py"))
        c.data.source = "tfds:imagenet2012"
        c.data.image_size = 128
        c.data.resize = "resize"
        c.model.channel_mult = (1, 1, 2, 3, 4)
        c.model.num_res_blocks = 2
        c.diffusion.schedule = "linear"
        return c

    return configlib.with_variant(build, arg)
