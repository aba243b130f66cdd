"""DiT-XL/2 on ImageNet 512x512 in SD VAE latents: ``dit_xl2_imagenet256.py`` at 64x64x4
latents (1024 tokens), as the released ``DiT-XL-2-512x512.pt``.

``--mode summary`` reports 674,834,720 trainable parameters, as the 256x256 model: the
larger token grid changes only the fixed position table (1024 x 1152), which is not a
parameter::

    python -m diffjax.convert --config experiments/dit_xl2_imagenet512.py \\
        --checkpoint DiT-XL-2-512x512.pt --workdir runs/dit_xl2_512

The VAE (``data.latent``) is set up as in ``dit_xl2_imagenet256.py``. Published (Table 5):
FID 3.04 with cfg-scale 1.5, 250 DDPM steps.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "dit_xl2_imagenet256.py"))
        c.data.image_size = 512  # 64x64x4 latents
        c.sampler.batch_size = 8
        c.train.num_steps = 3_000_000
        return c

    return configlib.with_variant(build, arg)
