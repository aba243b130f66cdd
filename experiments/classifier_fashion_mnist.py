"""Noise-aware Fashion-MNIST classifier for classifier guidance (Dhariwal & Nichol 2021).

The ADM encoder half with attention pooling, trained with cross-entropy on x_t at uniform
timesteps of the same cosine T=1000 table as ``fashion_mnist.py``::

    python -m diffjax.main --config experiments/classifier_fashion_mnist.py --workdir runs/fmnist_cls
    python -m diffjax.main --config experiments/fashion_mnist.py --workdir runs/fmnist --mode sample \
        --config.guidance.type=classifier --config.guidance.scale=3 \
        --config.guidance.classifier_config=experiments/classifier_fashion_mnist.py \
        --config.guidance.classifier_workdir=runs/fmnist_cls
    python -m diffjax.main --config experiments/classifier_fashion_mnist.py --workdir runs/fmnist_cls \
        --mode eval    # test accuracy at t = 0, T/4, T/2, 3T/4 -> runs/fmnist_cls/eval/accuracy.json

Expected after the default 3000 steps (about 15 minutes on 2 CPU cores): test accuracy
0.87 at t=0, 0.86 at t=250, 0.81 at t=500, 0.68 at t=749 (measured: 0.868, 0.857, 0.806,
0.685).
"""

import os

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.load_config_file(os.path.join(os.path.dirname(__file__), "fashion_mnist.py"))
        c.model.name = "classifier"
        c.model.class_cond = False
        c.model.model_channels = 32
        c.model.channel_mult = (1, 2, 2)
        c.model.num_res_blocks = 1
        c.model.attention_resolutions = (7,)
        c.model.use_scale_shift_norm = True
        c.model.pool = "attention"
        c.model.num_head_channels = 32
        c.model.classifier_noised = True
        c.guidance.type = "none"
        c.guidance.label_dropout = 0.0
        c.data.random_flip = True
        c.optim.learning_rate = 1e-3
        c.optim.weight_decay = 0.05
        c.optim.ema_decays = (0.99,)
        c.train.num_steps = 3000
        c.train.sample_every = 0
        c.train.checkpoint_every = 200
        return c

    return configlib.with_variant(build, arg)
