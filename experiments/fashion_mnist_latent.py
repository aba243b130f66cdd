"""Latent diffusion on Fashion-MNIST: the default's class-conditional model on the 8x8x4
latents of ``fashion_mnist_autoencoder.py``.

Three steps: train the autoencoder, encode the training set once, train on the latents::

    python -m diffjax.main --config experiments/fashion_mnist_autoencoder.py \\
        --workdir runs/fmnist_ae
    python -m diffjax.main --config experiments/fashion_mnist_latent.py --mode encode
    python -m diffjax.main --config experiments/fashion_mnist_latent.py \\
        --workdir runs/fmnist_latent

``--mode encode`` writes the posterior mean and std of the 60,000 training images to
``data.latent.cache`` (runs/fmnist_ae/latents_train) with their labels and the latents'
measured scale factor (1/std; the config fixes it at the measured 0.315, as SD fixes
0.18215: set ``--config.data.latent.scale_factor=0`` to use the cache's own). The
autoencoder saw the 28x28 images centred on a 32x32 black canvas (``data.resize="pad"``);
this config's data stay 28x28: they are padded before encoding and the decoded samples
cropped back, so samples, grids and ``--mode eval`` are 28x28 images judged exactly like the
pixel default's (``fd_fashion_mnist`` / ``class_accuracy`` of ``fmnist_features.py``).
``:smoke`` is a seconds-long CPU check (it still needs the autoencoder run).

Measured (2 CPU cores, judged by ``fmnist_features.py`` on 1000 DDIM-25 samples at w = 1):
after the default 1750 steps, fd_fashion_mnist 2.52 and class accuracy 0.933, against 2.41
and 0.924 for the pixel default ``fashion_mnist.py`` after its 1000 steps. The budgets match:
a latent step takes 1/1.96 of a pixel step (``benchmarks/fashion_mnist_models.py``), and the
remaining 11% pays for encoding the training set once.
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        here = os.path.dirname(__file__)
        # the pixel default (data, class-conditional v-prediction on the cosine table, CFG,
        # DDIM-25, optimiser, eval) with the network on the latents
        c = configlib.load_config_file(os.path.join(here, "fashion_mnist.py"))
        c.data.latent.config = os.path.join(here, "fashion_mnist_autoencoder.py")
        c.data.latent.workdir = "runs/fmnist_ae"
        c.data.latent.cache = "runs/fmnist_ae/latents_train"
        # 1/std of the latents, measured by --mode encode on the autoencoder's 1000-step run
        # (0.31511); 0 reads the measured value of the cache instead
        c.data.latent.scale_factor = 0.315
        # the network sees 8x8x4: two levels (8, 4), attention at 4x4
        c.model.model_channels = 64
        c.model.channel_mult = (1, 2)
        c.model.num_res_blocks = 2
        c.model.attention_resolutions = (4,)
        c.sampler.thresholding = "none"  # latents are not in [-1, 1]
        c.sampler.batch_size = 100
        c.sampler.num_samples = 100
        c.optim.ema_decays = (0.999,)
        c.train.num_steps = 1750  # the pixel default's wall-clock budget (docstring)
        c.train.checkpoint_every = 250
        c.train.sample_every = 875
        c.eval.features_config = "experiments/fmnist_features.py"
        c.eval.features_workdir = "runs/fmnist_features"
        return c

    return configlib.with_variant(build, arg)
