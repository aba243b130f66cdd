"""A tiny training set-up shared by the trainer tests and their subprocess driver.

Loaded by path (tests run in importlib mode): ``tiny = load_tiny()`` in a test module.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from diffjax import configlib

IMAGE_SIZE = 8
NUM_EXAMPLES = 64
NUM_CLASSES = 4


def _write_idx(path: str, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_dataset(directory: str) -> str:
    """Smooth random 8x8 images with 4 classes (class = brightness quadrant) as IDX files."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.arange(NUM_EXAMPLES) % NUM_CLASSES
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1)
    phase = rng.uniform(0, 2 * np.pi, (NUM_EXAMPLES, 1, 1))
    images = 0.5 + 0.4 * np.sin(2 * np.pi * (xx + labels[:, None, None] * yy / 2) + phase)
    for prefix in ("train", "t10k"):
        _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"),
                   np.round(images * 255))
        _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return directory


def config(data_dir: str, **overrides):
    """A class-conditional, learned-variance, hybrid-loss model small enough for CPU tests."""
    c = configlib.base_config()
    c.data.source = "idx"
    c.data.path = data_dir
    c.data.image_size = IMAGE_SIZE
    c.data.channels = 1
    c.data.num_classes = NUM_CLASSES
    c.data.batch_size = 8
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.model.class_cond = True
    c.model.use_scale_shift_norm = True
    c.model.dropout = 0.1
    c.diffusion.num_timesteps = 50
    c.diffusion.schedule = "cosine"
    c.diffusion.loss = "hybrid"
    c.diffusion.variance_type = "learned_range"
    c.diffusion.timestep_sampler = "loss_second_moment"
    c.guidance.type = "classifier_free"
    c.guidance.label_dropout = 0.2
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 2
    c.optim.ema_decays = (0.9, 0.99)
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 1
    c.train.sample_every = 0
    c.sampler.num_steps = 3
    c.sampler.batch_size = 8
    c.update_from_flattened_dict(overrides)
    return c
