"""A KL autoencoder for Fashion-MNIST: 28x28 images padded to 32x32 <-> 8x8x4 latents.

Stable Diffusion's autoencoder architecture (``experiments/autoencoder_sd_vae.py``) at CPU
size: block_out_channels (32, 64, 64) (two 2x downsamplings), 1 ResNet layer per block,
GroupNorm of 16 groups; L1 reconstruction + 1e-6 KL per pixel, posterior samples in
training::

    python -m diffjax.main --config experiments/fashion_mnist_autoencoder.py \\
        --workdir runs/fmnist_ae
    python -m diffjax.main --config experiments/fashion_mnist_autoencoder.py \\
        --workdir runs/fmnist_ae --mode eval

The training grids (``WORKDIR/samples/``) show test images above their reconstructions;
``--mode eval`` writes the test-set PSNR to ``WORKDIR/eval/reconstruction.json``.
Measured: 25.38 +- 0.03 dB over the 10,000 test images after the 1000 steps (about 35
minutes on 2 CPU cores shared with other work). ``:smoke`` is a seconds-long CPU check.

SD's adversarial term (a PatchGAN discriminator, hinge loss, adaptive weight) is off here;
``--config.model.autoencoder.disc_start=N`` switches it on from step N (SD starts it after
tens of thousands of steps), with ``disc_weight`` (0.5), ``disc_layers`` (at most 3 for
32x32 images: a 2x2 grid of patch logits) and ``disc_channels`` (64) beside it. Not measured.
"""

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.base_config()
        c.data.source = "fashion_mnist_idx"
        c.data.image_size = 32
        c.data.resize = "pad"  # 28 -> 32
        c.data.channels = 1
        c.data.num_classes = 10
        c.data.batch_size = 64
        c.model.name = "autoencoder_kl"
        c.model.autoencoder.block_out_channels = (32, 64, 64)
        c.model.autoencoder.layers_per_block = 1
        c.model.autoencoder.norm_num_groups = 16
        c.optim.learning_rate = 1e-3
        c.optim.warmup_steps = 100
        c.optim.ema_decays = (0.995,)
        c.train.num_steps = 1000
        c.train.log_every = 50
        c.train.checkpoint_every = 500
        c.train.sample_every = 500
        c.train.num_sample_images = 32
        c.eval.metrics = ("psnr",)
        c.eval.batch_size = 250
        return c

    return configlib.with_variant(build, arg)
