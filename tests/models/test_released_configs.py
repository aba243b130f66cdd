"""The configs of OpenAI's released ADM checkpoints (experiments/adm_*.py, imagenet64*.py):
each builds the architecture of its file, with guided-diffusion's parameter count derived
here in closed form from its unet.py / script_util.py, and the attention options (which
change no shape, so a converter cannot catch them) transcribed from its published flags."""

import importlib.util
import os

import pytest

from diffjax import configlib, experiment
from diffjax.app import summary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _adm_count():
    path = os.path.join(REPO, "tests", "models", "test_unet.py")
    spec = importlib.util.spec_from_file_location("diffjax_tests_unet_released", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.adm_count


def _lin(cin, cout):
    return cin * cout + cout


def encoder_count(size, mc, nrb, mult, attn_ds, num_classes=1000):
    """guided-diffusion EncoderUNetModel (resblock_updown, scale-shift norm, pool='attention')."""
    emb = 4 * mc

    def res(ci, co):  # in norm + conv, emb linear (scale and shift), out norm + conv, skip
        return (2 * ci + 9 * ci * co + co + _lin(emb, 2 * co) + 2 * co + 9 * co * co + co
                + (0 if ci == co else ci * co + co))

    def attn(c):  # norm, qkv (1x1 conv1d), proj_out
        return 2 * c + _lin(c, 3 * c) + _lin(c, c)

    total = _lin(mc, emb) + _lin(emb, emb)
    ch = int(mult[0] * mc)
    total += 9 * 3 * ch + ch
    ds = 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            total += res(ch, int(m * mc)) + (attn(int(m * mc)) if ds in attn_ds else 0)
            ch = int(m * mc)
        if level != len(mult) - 1:
            total += res(ch, ch)
            ds *= 2
    total += 2 * res(ch, ch) + attn(ch)
    spatial = size // ds
    # out: GroupNorm, then AttentionPool2d: positional embedding [C, S^2 + 1], qkv, c_proj
    return total + 2 * ch + ch * (spatial ** 2 + 1) + _lin(ch, 3 * ch) + _lin(ch, num_classes)


def _build(name):
    return experiment.build(configlib.load_config_file(
        os.path.join(REPO, "experiments", f"{name}.py")), num_devices=1)


# experiment -> (released file, guided-diffusion UNetModel / SuperResModel count arguments:
# in_ch, model_channels, out_ch, num_res_blocks, channel_mult, attention ds, classes, ...)
UNETS = {
    "imagenet64": ("64x64_diffusion.pt", (3, 192, 3, 3, (1, 2, 3, 4), (2, 4, 8), 1000)),
    "adm_imagenet128": ("128x128_diffusion.pt", (3, 256, 3, 2, (1, 1, 2, 3, 4), (4, 8, 16), 1000)),
    "adm_imagenet256": ("256x256_diffusion.pt",
                        (3, 256, 3, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), 1000)),
    "adm_imagenet256_uncond": ("256x256_diffusion_uncond.pt",
                               (3, 256, 3, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), None)),
    "adm_lsun256": ("lsun_bedroom.pt", (3, 256, 3, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), None)),
    "imagenet64_to_256": ("64_256_upsampler.pt",
                          (6, 192, 3, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), 1000)),
    "adm_upsampler128_512": ("128_512_upsampler.pt",
                             (6, 192, 3, 2, (1, 1, 2, 2, 4, 4), (16, 32), 1000)),
    "adm_imagenet512": ("512x512_diffusion.pt",
                        (3, 256, 3, 2, (0.5, 1, 1, 2, 2, 4, 4), (16, 32, 64), 1000)),
}
# improved-diffusion's releases: its UNetModel is guided-diffusion's without BigGAN
# resampling (convolutional down/up), scale-shift norm on; attention at 16, 8 pixels.
IDDPM = {
    "iddpm_imagenet64_uncond": ("imagenet64_uncond_100M_1500K.pt",
                                (3, 128, 3, 3, (1, 2, 3, 4), (4, 8), None)),
    "iddpm_imagenet64_cond": ("imagenet64_cond_270M_250K.pt",
                              (3, 192, 3, 3, (1, 2, 3, 4), (4, 8), 1000)),
    "iddpm_cifar10_uncond": ("cifar10_uncond_50M_500K.pt",
                             (3, 128, 3, 3, (1, 2, 2, 2), (2, 4), None)),
}
CLASSIFIERS = {
    "adm_classifier64": ("64x64_classifier.pt", (64, 128, 4, (1, 2, 3, 4), (2, 4, 8))),
    "adm_classifier128": ("128x128_classifier.pt", (128, 128, 2, (1, 1, 2, 3, 4), (4, 8, 16))),
    "adm_classifier256": ("256x256_classifier.pt",
                          (256, 128, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32))),
    "adm_classifier512": ("512x512_classifier.pt",
                          (512, 128, 2, (0.5, 1, 1, 2, 2, 4, 4), (16, 32, 64))),
}


@pytest.mark.parametrize("name", sorted(UNETS))
def test_released_unet_configs_have_guided_diffusions_parameter_count(name):
    _, args = UNETS[name]
    want = _adm_count()(*args, True, True, True)  # learn_sigma, scale-shift, BigGAN up/down
    assert summary.param_count(_build(name)) == want


@pytest.mark.parametrize("name", sorted(IDDPM))
def test_improved_diffusion_configs_have_its_parameter_count(name):
    _, args = IDDPM[name]
    assert summary.param_count(_build(name)) == _adm_count()(*args, True, True, False)


def test_improved_diffusion_time_input_and_loss_weight():
    """rescale_timesteps / rescale_learned_sigmas as released: the uncond models see
    t * 1000 / 4000 and weigh L_vlb by T / 1000 (vlb_weight 1e-3 in the T-scaled form); the
    conditional one sees t and weighs L_vlb by 1 (vlb_weight 1 / T)."""
    for name, (scale, weight) in {"iddpm_imagenet64_uncond": (0.25, 1e-3),
                                  "iddpm_cifar10_uncond": (0.25, 1e-3),
                                  "iddpm_imagenet64_cond": (1.0, 1 / 4000)}.items():
        exp = _build(name)
        assert exp.task.time_scale == scale and exp.task.schedule.num_timesteps == 4000, name
        assert dict(exp.task.loss.loss_kwargs)["vlb_weight"] == pytest.approx(weight), name
        m = exp.task.model
        assert (m.num_heads, m.num_head_channels, m.use_new_attention_order,
                m.resblock_updown, m.use_scale_shift_norm) == (4, -1, False, False, True)


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_released_classifier_configs_have_guided_diffusions_parameter_count(name):
    _, args = CLASSIFIERS[name]
    exp = _build(name)
    assert exp.task.model.pool == "attention"
    assert summary.param_count(exp) == encoder_count(*args)


def test_published_counts_pinned():
    """The counts the README table and the docstrings state."""
    adm = _adm_count()
    counts = {name: adm(*args, True, True, True) for name, (_, args) in UNETS.items()}
    counts.update({name: encoder_count(*args) for name, (_, args) in CLASSIFIERS.items()})
    counts.update({name: adm(*args, True, True, False) for name, (_, args) in IDDPM.items()})
    assert counts == {
        "imagenet64": 295_904_454, "adm_imagenet128": 421_529_606,
        "adm_imagenet256": 553_838_086, "adm_imagenet256_uncond": 552_814_086,
        "adm_lsun256": 552_814_086, "imagenet64_to_256": 311_795_910,
        "adm_upsampler128_512": 308_835_270, "adm_classifier64": 65_438_568,
        "adm_classifier128": 42_568_040, "adm_classifier256": 54_096_360,
        "adm_imagenet512": 558_997_638, "adm_classifier512": 54_448_360,
        "iddpm_imagenet64_uncond": 121_063_942, "iddpm_imagenet64_cond": 273_049_350,
        "iddpm_cifar10_uncond": 52_546_438}


def test_attention_options_transcribe_the_published_flags():
    """Head counts and qkv order change no shape: checked against the released flags."""
    # 64x64: --num_head_channels 64 --use_new_attention_order True
    m = _build("imagenet64").task.model
    assert (m.num_head_channels, m.use_new_attention_order) == (64, True)
    # 128x128: --num_heads 4 (num_head_channels, num_heads_upsample default -1), legacy order
    m = _build("adm_imagenet128").task.model
    assert (m.num_heads, m.num_head_channels, m.num_heads_upsample) == (4, -1, -1)
    assert m.use_new_attention_order is False
    # 256x256 and the 128 -> 512 upsampler: --num_head_channels 64, legacy order
    for name in ("adm_imagenet256", "adm_imagenet256_uncond", "adm_lsun256",
                 "adm_upsampler128_512", "adm_imagenet512"):
        m = _build(name).task.model
        assert (m.num_head_channels, m.use_new_attention_order) == (64, False), name
    # 64 -> 256 upsampler: --num_heads 4, legacy order
    m = _build("imagenet64_to_256").task.model
    assert (m.num_heads, m.num_head_channels, m.use_new_attention_order) == (4, -1, False)
    # classifiers: create_classifier's num_head_channels=64, EncoderUNetModel's legacy order
    for name in CLASSIFIERS:
        m = _build(name).task.model
        assert (m.num_head_channels, m.use_new_attention_order) == (64, False), name
