"""ADM noise-aware ImageNet 64x64 classifier: guided-diffusion's ``64x64_classifier.pt``.

guided-diffusion's EncoderUNetModel with its classifier defaults and the published
``--classifier_depth 4``: width 128, channel_mult (1, 2, 3, 4) (its choice for image_size
64), 4 ResBlocks per level, attention at 32, 16, 8 pixels with 64 channels per head in the
legacy qkv order (EncoderUNetModel's default ``use_new_attention_order`` False), scale-shift
norm, BigGAN down blocks, attention pooling to 1000 logits. It takes the timestep of the
cosine T = 1000 table of ``imagenet64.py`` (``64x64_diffusion.pt``), the model it guides::

    python -m diffjax.convert --config experiments/adm_classifier64.py \\
        --checkpoint 64x64_classifier.pt --workdir runs/adm64_cls
    python -m diffjax.main --config experiments/imagenet64.py --workdir runs/adm64 --mode sample \\
        --config.guidance.type=classifier --config.guidance.scale=1.0 \\
        --config.guidance.classifier_config=experiments/adm_classifier64.py \\
        --config.guidance.classifier_workdir=runs/adm64_cls

guided-diffusion samples the 64x64 model with classifier scale 1.0. Its ancestral sampler
shifts the mean (ADM's Algorithm 1), as diffjax's ``ddpm`` does under
``guidance.classifier_mode=auto`` (the score shift, Algorithm 2, for DDIM and the other
samplers), so ADM's scales carry over. Training from scratch reads tfds
``imagenet_resized/64x64`` with guided-diffusion's README settings for its 128x128
classifier (AdamW lr 3e-4, weight decay 0.05, batch 256, 300k steps) except its
``--anneal_lr`` (linear decay to 0): here the learning rate stays constant after warm-up.
"""

from diffjax import configlib


def get_config(arg=None):
    def build():
        c = configlib.base_config()
        c.data.source = "tfds:imagenet_resized/64x64"
        c.data.image_size = 64
        c.data.channels = 3
        c.data.num_classes = 1000
        c.data.batch_size = 256
        c.model.name = "classifier"
        c.model.class_cond = False
        c.model.model_channels = 128
        c.model.channel_mult = (1, 2, 3, 4)
        c.model.num_res_blocks = 4
        c.model.attention_resolutions = (32, 16, 8)
        c.model.num_heads = 1
        c.model.num_head_channels = 64
        c.model.use_new_attention_order = False
        c.model.use_scale_shift_norm = True
        c.model.resblock_updown = True
        c.model.pool = "attention"
        c.model.classifier_noised = True
        c.diffusion.schedule = "cosine"
        c.diffusion.num_timesteps = 1000
        c.optim.learning_rate = 3e-4
        c.optim.weight_decay = 0.05
        c.optim.ema_decays = (0.9999,)
        c.train.num_steps = 300_000
        c.train.log_every = 100
        c.train.checkpoint_every = 10_000
        c.train.sample_every = 0
        c.eval.split = "validation"  # ImageNet has no labelled test split
        return c

    return configlib.with_variant(build, arg)
