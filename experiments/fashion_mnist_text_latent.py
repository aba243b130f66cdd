"""Fashion-MNIST from captions on latents: ``fashion_mnist_text.py``'s caption model (a text
transformer trained with the UNet) on the 8x8x4 latents of ``fashion_mnist_autoencoder.py``,
as ``fashion_mnist_latent.py`` puts the class-conditional default there: LDM's text-to-image
setup (Rombach et al. 2022 trained a transformer on the captions with the latent UNet).

The autoencoder and the latent cache are ``fashion_mnist_latent.py``'s (the same training
images, encoded once; each cache row's caption is computed from its image)::

    python -m diffjax.main --config experiments/fashion_mnist_autoencoder.py \\
        --workdir runs/fmnist_ae
    python -m diffjax.main --config experiments/fashion_mnist_latent.py --mode encode
    python -m diffjax.main --config experiments/fashion_mnist_text_latent.py \\
        --workdir runs/fmnist_text_latent
    python -m diffjax.main --config experiments/fashion_mnist_text_latent.py \\
        --workdir runs/fmnist_text_latent --mode sample \\
        --config.sampler.prompts='("a dark sneaker", "a bright dress")'

Samples, grids and ``--mode eval`` (class and attribute accuracy of the prompts) are decoded
28x28 images, judged as ``fashion_mnist_text.py``'s. Measured (2 CPU cores, 2026-11-29;
``--config.eval.num_samples=800``: 40 prompts x 20 per guidance scale, DDIM-25): at w = 0 /
1 / 3 class accuracy 0.845 / 0.951 / 0.979, brightness 0.860 / 0.975 / 0.990, size 0.855 /
0.945 / 0.976, after the 3500 steps (about 18 minutes at 3.2-3.45 steps/s); the pixel
model's at 2000 steps, same count: 0.844 / 0.944 / 0.970, 0.876 / 0.985 / 0.978, 0.874 /
0.959 / 0.968. ``:smoke`` is a seconds-long CPU check (it
still needs the autoencoder run).
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        here = os.path.dirname(__file__)
        c = configlib.load_config_file(os.path.join(here, "fashion_mnist_text.py"))
        latent = configlib.load_config_file(os.path.join(here, "fashion_mnist_latent.py"))
        c.data.latent = latent.data.latent  # autoencoder, its run, cache and scale factor
        # fashion_mnist_latent.py's network for 8x8x4 (attention at 4x4 reads the captions)
        for name in ("model_channels", "channel_mult", "num_res_blocks",
                     "attention_resolutions"):
            c.model[name] = latent.model[name]
        c.sampler.thresholding = "none"  # latents are not in [-1, 1]
        c.optim.ema_decays = latent.optim.ema_decays
        # a latent step costs about half a pixel step (fashion_mnist_latent.py): the pixel
        # caption model's 2000 steps' budget
        c.train.num_steps = 3500
        c.train.sample_every = 875
        return c

    return configlib.with_variant(build, arg)
