"""Fashion-MNIST 28x28 with a DiT backbone: the embedded default (experiments/fashion_mnist.py)
with the UNet replaced by a small DiT in pixel space.

Patch 4 (7 x 7 = 49 tokens), depth 6, hidden 192, 3 heads, MLP ratio 4 (between the paper's
S and a CPU budget), adaLN-Zero conditioning on the timestep and the class (with its
null-label row for classifier-free guidance); v-prediction on the cosine table, DDIM-25
and w = 1 as the UNet default::

    python -m diffjax.main --config experiments/dit_fashion_mnist.py --workdir runs/fmnist_dit

``:smoke`` is a seconds-long CPU check.

Measured (2 CPU cores, judged by ``fmnist_features.py`` on 1000 DDIM-25 samples at w = 1):
after the default 1000 steps, fd_fashion_mnist 6.96 and class accuracy 0.811, against 2.41
and 0.924 for the UNet default after its 1000 steps, which take 1.13 times as long as the
DiT's (``benchmarks/fashion_mnist_models.py``): at equal cost the UNet is far ahead here,
and the DiT's samples show its 4x4 patches.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                    "fashion_mnist.py"))
        c.model.name = "dit"
        c.model.dit.patch_size = 4
        c.model.dit.depth = 6
        c.model.dit.hidden_size = 192
        c.model.dit.num_heads = 3
        return c

    return configlib.with_variant(build, arg)
