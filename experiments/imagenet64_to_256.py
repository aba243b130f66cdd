"""ADM ImageNet 64 -> 256 upsampler (Dhariwal & Nichol 2021, guided-diffusion's SuperResModel).

guided-diffusion's published flags for ``64_256_upsampler.pt``: num_channels 192,
num_res_blocks 2, channel_mult (1, 1, 2, 2, 4, 4) (its choice for large_size 256),
attention at 32, 16, 8 pixels with num_heads 4, resblock_updown, use_scale_shift_norm,
learn_sigma, class_cond, linear schedule with 1000 steps, dropout 0, large_size 256,
small_size 64. SuperResModel is UNetModel with in_channels * 2 = 6 input channels (the
bilinearly upsampled 64x64 image concatenated to x): here ``condition.type = "superres"``
and ``condition.low_res_size = 64``, the UNet's ``low_res`` input.

``--mode summary`` reports 311,795,910 parameters, the count of guided-diffusion's
SuperResModel for these flags (its closed form in tests/train/test_superres.py). No
noise-conditioning augmentation (``condition.aug_max = 0``), as the published model: with
aug_max > 0 the model gains an ``aug_embed`` time embedding (Ho et al. 2021's cascades).

Needs the tfds ``imagenet2012`` dataset (256x256 crops)::

    python -m diffjax.main --config experiments/imagenet64_to_256.py --workdir gs://B/up256
    python -m diffjax.main --config experiments/imagenet64_to_256.py --workdir gs://B/up256 \\
        --mode sample --config.condition.input=samples_64.npz

Loss: learned-range variance with use_kl False is guided-diffusion's MSE + VB ("hybrid").
The optimiser settings, batch and step counts below are this project's choices, not checked
against the paper's upsampler hyper-parameters.
"""

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.base_config()
        c.data.source = "tfds:imagenet2012"
        c.data.image_size = 256
        c.data.channels = 3
        c.data.num_classes = 1000
        c.data.batch_size = 256
        c.data.resize = "resize"
        c.data.random_flip = False
        c.model.model_channels = 192
        c.model.channel_mult = (1, 1, 2, 2, 4, 4)
        c.model.num_res_blocks = 2
        c.model.attention_resolutions = (32, 16, 8)
        c.model.num_heads = 4
        c.model.num_head_channels = -1
        c.model.use_scale_shift_norm = True
        c.model.resblock_updown = True
        c.model.dropout = 0.0
        c.model.class_cond = True
        c.model.dtype = "bfloat16"
        c.diffusion.schedule = "linear"
        c.diffusion.num_timesteps = 1000
        c.diffusion.prediction = "eps"
        c.diffusion.variance_type = "learned_range"
        c.diffusion.loss = "hybrid"
        c.condition.type = "superres"
        c.condition.low_res_size = 64
        c.condition.aug_max = 0.0
        c.sampler.name = "ddpm"
        c.sampler.num_steps = 250
        c.sampler.batch_size = 64
        c.optim.learning_rate = 1e-4
        c.optim.warmup_steps = 1000
        c.optim.ema_decays = (0.9999,)
        c.train.num_steps = 500_000
        c.train.log_every = 100
        c.train.checkpoint_every = 5_000
        c.train.sample_every = 0
        c.eval.metrics = ("fid", "sfid", "inception_score", "precision_recall")
        c.eval.split = "validation"  # ImageNet has no labelled test split
        c.eval.num_samples = 50_000
        return c

    return configlib.with_variant(build, arg)
