"""Fashion-MNIST 28x28, class-conditional with classifier-free guidance: the embedded default.

Trains on 2 CPU cores in about 20 minutes from the IDX files of Debian's
``dataset-fashion-mnist`` package and writes sample grids (one row per class) to
``WORKDIR/samples/``::

    python -m diffjax.main --config experiments/fashion_mnist.py --workdir runs/fmnist

Expected: after the default steps the ten classes are recognisable in the grid
(trousers, bags, shoes, ... in their rows), samples drawn with DDIM-25 and
classifier-free guidance w=1. ``:smoke`` is a seconds-long CPU check.
"""

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.base_config()
        c.data.source = "fashion_mnist_idx"
        c.data.image_size = 28
        c.data.channels = 1
        c.data.num_classes = 10
        c.data.batch_size = 64
        c.model.model_channels = 32
        c.model.channel_mult = (1, 2, 2)
        c.model.num_res_blocks = 1
        c.model.attention_resolutions = (7,)
        c.model.class_cond = True
        c.diffusion.schedule = "cosine"
        c.diffusion.num_timesteps = 1000
        # v-prediction (Salimans & Ho 2022): x0_hat stays bounded at high noise, where an
        # eps-model's x0_hat = (x - sigma eps_hat) amplifies its error by sigma (up to 2e4 on
        # this table); with few training steps and few sampling steps that is what shows.
        c.diffusion.prediction = "v"
        c.guidance.type = "classifier_free"
        c.guidance.label_dropout = 0.1
        c.guidance.scale = 1.0
        c.sampler.name = "ddim"
        c.sampler.num_steps = 25
        c.optim.learning_rate = 1e-3
        c.optim.warmup_steps = 100
        c.optim.ema_decays = (0.995,)
        c.train.num_steps = 1000
        c.train.log_every = 50
        c.train.checkpoint_every = 200
        c.train.sample_every = 500
        c.train.num_sample_images = 100
        # nll is sampler-independent and costs T=1000 network passes per test image (about
        # 23 min for 250 images on 2 CPU cores): ask for it alone, --config.eval.metrics='("nll",)'
        c.eval.metrics = ("fd_fashion_mnist", "class_accuracy")
        c.eval.nll_num_examples = 250  # 0 = all 10k test images
        return c

    return configlib.with_variant(build, arg)
