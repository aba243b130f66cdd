"""Super-resolution conditioning (box downsampling, noise-conditioning augmentation), the ADM
64 -> 256 upsampler config, a tiny upsampler's training steps and sampling, and conditional
sampling from --mode sample (img2img / inpaint inputs, masks, the input | result grid)."""

import gzip
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffjax import configlib, experiment, generate, parallel
from diffjax.app import sample as app_sample
from diffjax.app import summary
from diffjax.app import train as app_train
from diffjax.diffusion import schedules, superres
from diffjax.train import loop, reporting

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS32 = float(np.finfo(np.float32).eps)


def _load_test_unet():
    path = os.path.join(REPO, "tests", "models", "test_unet.py")
    spec = importlib.util.spec_from_file_location("diffjax_tests_unet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_downsample_is_the_box_filter():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float64)
    got = np.asarray(superres.downsample(jnp.asarray(x, jnp.float32), 4))
    want = np.zeros((2, 4, 4, 3))
    for i in range(4):
        for j in range(4):
            want[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * EPS32)
    with pytest.raises(ValueError, match="low_res_size"):
        superres.downsample(jnp.zeros((1, 8, 8, 1)), 3)


def test_augmentation_levels_follow_the_extended_table():
    ds = schedules.LinearSchedule().discretize(50)  # the base config's schedule, T = 50
    t = ds.num_timesteps
    levels = jnp.array([0.0, 1.0 / t, 7.0 / t, 7.5 / t, 1.0])
    a, s, u = (np.asarray(v, np.float64) for v in superres.aug_coefficients(ds, levels))
    abar = np.concatenate([[1.0], ds.alphas_cumprod])
    want = np.array([abar[0], abar[1], abar[7], 0.5 * (abar[7] + abar[8]), abar[t]])
    np.testing.assert_allclose(a**2, want, rtol=8 * EPS32)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=8 * EPS32)
    np.testing.assert_allclose(u, [0, 1, 7, 7.5, t], rtol=4 * EPS32)


def test_train_and_sample_conditioning():
    ds = experiment.build(configlib.base_config()).schedule
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (512, 8, 8, 1)), jnp.float32)
    plain = superres.SuperRes(low_res_size=4)
    out = superres.train_conditioning(plain, images, jax.random.PRNGKey(0), ds)
    assert set(out) == {"low_res"}
    np.testing.assert_array_equal(out["low_res"], superres.downsample(images, 4))
    aug = superres.SuperRes(low_res_size=4, aug_max=0.3, aug_sample=0.1)
    out = superres.train_conditioning(aug, images, jax.random.PRNGKey(0), ds)
    u = np.asarray(out["aug_level"])
    assert u.min() >= 0 and u.max() <= 0.3 * ds.num_timesteps and u.std() > 0
    # The noise recovered from (low_aug, u) is standard normal: 8192 draws.
    a, s, _ = superres.aug_coefficients(ds, jnp.asarray(u) / ds.num_timesteps)
    low = superres.downsample(images, 4)
    z = np.asarray((out["low_res"] - a[:, None, None, None] * low) / s[:, None, None, None])
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs(z.std() - 1) < 5 / np.sqrt(2 * z.size)
    fixed = superres.sample_conditioning(aug, low, jax.random.PRNGKey(1), ds)
    np.testing.assert_allclose(fixed["aug_level"], 0.1 * ds.num_timesteps, rtol=4 * EPS32)
    with pytest.raises(ValueError, match="expects 4x4"):
        superres.sample_conditioning(aug, images, jax.random.PRNGKey(1), ds)


def test_adm_upsampler_config_has_the_published_parameter_count():
    """guided-diffusion's SuperResModel = UNetModel(in_channels=6) for the 64 -> 256 flags."""
    adm_count = _load_test_unet().adm_count
    want = adm_count(6, 192, 3, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), 1000, True, True, True)
    assert want == 311_795_910
    c = configlib.load_config_file(os.path.join(REPO, "experiments", "imagenet64_to_256.py"))
    exp = experiment.build(c)
    assert summary.param_count(exp) == want
    assert exp.task.model.aug_embed is False


def test_condition_validation_errors():
    cases = [({"condition.type": "sharpen"}, "condition.type"),
             ({"condition.strength": 1.5}, "strength"),
             ({"condition.repaint_resample": 0}, "repaint"),
             ({"condition.mask": "top"}, "condition.mask"),
             ({"condition.low_res_size": 4}, "low_res_size"),
             ({"condition.type": "superres", "condition.low_res_size": 5}, "divisor"),
             ({"condition.type": "superres", "condition.low_res_size": 7,
               "condition.aug_max": 0.1, "condition.aug_sample": 0.2}, "aug_sample")]
    for overrides, match in cases:
        c = configlib.base_config()
        c.update_from_flattened_dict(overrides)
        with pytest.raises(configlib.ConfigError, match=match) as err:
            configlib.validate(c)
        assert "\n" not in str(err.value)


# Small enough to compile quickly on a shared CPU: one level of 8 channels, attention only in
# the middle block, no dropout.
SMALL = {"guidance.type": "none", "guidance.label_dropout": 0.0, "model.model_channels": 8,
         "model.norm_groups": 4, "model.attention_resolutions": (), "model.dropout": 0.0,
         "diffusion.timestep_sampler": "uniform", "optim.warmup_steps": 0,
         "diffusion.loss": "simple", "diffusion.variance_type": "fixed_small",
         "model.class_cond": False, "model.use_scale_shift_norm": False,
         "model.channel_mult": (1,)}


def _superres_config(tiny, data_dir):
    return tiny.config(data_dir, **SMALL, **{
        "condition.type": "superres", "condition.low_res_size": 4, "condition.aug_max": 0.2,
        "condition.aug_sample": 0.05, "train.num_steps": 2})


def test_tiny_upsampler_trains_and_samples(tiny, tiny_data, tmp_path):
    c = _superres_config(tiny, tiny_data)
    exp = experiment.build(c, num_devices=1)
    mesh = parallel.make_mesh(jax.devices()[:1])
    trainer = loop.Trainer(exp.task, exp.optim, exp.train, mesh)
    assert exp.task.model.aug_embed
    state = trainer.new_state()
    before = jax.device_get(state.params)
    rng = np.random.default_rng(0)
    for i in range(3):
        batch = {"image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
                 "label": (np.arange(8) % 4).astype(np.int32)}
        state, metrics = trainer.train_step(state, parallel.global_batch_from_local(batch, mesh))
        assert int(metrics["nonfinite"]) == 0 and np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state.params)
    # Zero-initialised output convs: step 0 moves the model's out_conv, step 1 the ResBlocks'
    # last convs and the input conv (through the identity paths), step 2 the embeddings.
    assert np.abs(after["aug_embed"]["dense_1"]["kernel"]
                  - before["aug_embed"]["dense_1"]["kernel"]).max() > 0
    # The first conv sees x and the upsampled low-res image (channel 1), which is trained.
    k_after, k_before = after["input_blocks_0_conv"]["kernel"], before[
        "input_blocks_0_conv"]["kernel"]
    assert k_after.shape[2] == 2 and np.abs(k_after[:, :, 1] - k_before[:, :, 1]).max() > 0
    generator = generate.Generator(exp.task, exp.sampling, mesh)
    low = rng.uniform(-1, 1, (8, 4, 4, 1)).astype(np.float32)
    images, labels = generator(state.ema_params[0], 8, jax.random.PRNGKey(0), inputs=low)
    assert images.shape == (8, 8, 8, 1) and np.all(np.isfinite(images))
    with pytest.raises(ValueError, match="low-resolution"):
        generator(state.ema_params[0], 8, jax.random.PRNGKey(0))


def test_training_grids_show_inputs_samples_and_originals(tiny, tiny_data, tmp_path):
    """A super-resolution run's training grids: for each 8 of the eval split's first images a
    row of their box-downsampled inputs (enlarged by pixel repetition), a row of the samples
    drawn from those inputs and a row of the originals, labelled; a short last group is
    padded with white."""
    c = _superres_config(tiny, tiny_data)
    c.train.sample_every, c.train.num_sample_images = 1, 12
    exp = experiment.build(c, num_devices=1)
    mesh = parallel.make_mesh(jax.devices()[:1])
    params = _random_params(exp.task)
    rows, labels = app_train.grid_drawer(exp, mesh)(params)
    assert labels == ["4x4 input", "sample", "original"] * 2
    assert rows.shape == (48, 8, 8, 1)
    # The eval split (t10k) in its stored order, read independently of the pipeline.
    with gzip.open(os.path.join(tiny_data, "t10k-images-idx3-ubyte.gz")) as f:
        raw = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 8, 8, 1)[:12]
    originals = raw.astype(np.float64) / 127.5 - 1.0
    low = originals.reshape(12, 4, 2, 4, 2, 1).mean(axis=(2, 4))
    enlarged = np.repeat(np.repeat(low, 2, 1), 2, 2)
    # The samples: the generator's from the inputs shown (which equal `low` to rounding).
    shown = np.concatenate([rows[0:8], rows[24:28]])[:, ::2, ::2]
    samples, _ = generate.Generator(exp.task, exp.sampling, mesh, batch_size=8)(
        params, 12, jax.random.PRNGKey(c.train.seed + 1), inputs=shown)
    white = np.ones((4, 8, 8, 1))
    for got, want in [(rows[0:8], enlarged[:8]), (rows[8:16], samples[:8]),
                      (rows[16:24], originals[:8]), (rows[24:32], np.concatenate(
                          [enlarged[8:], white])), (rows[32:40], np.concatenate(
                              [samples[8:], white])), (rows[40:48], np.concatenate(
                                  [originals[8:], white]))]:
        np.testing.assert_allclose(got, want, atol=1e-6)
    # The trainer's reporter writes them as one labelled grid of 8 columns.
    reporter = reporting.Reporter(str(tmp_path), enabled=True, total_steps=1, start_step=0,
                                  batch_size=8)
    path = reporter.image_grid(1, rows, labels)
    reporter.close()
    width, height = Image.open(path).size
    assert height == 2 * (6 * 10 + 2) and width > 2 * (8 * 10 + 2)  # label column beside


def _random_params(task):
    params = task.init_params(jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), params)


def test_inpaint_and_img2img_sampling_from_inputs(tiny, tiny_data, tmp_path):
    c = tiny.config(tiny_data, **SMALL, **{"condition.type": "inpaint", "sampler.name": "ddpm",
                                           "condition.mask": "left_half"})
    mesh = parallel.make_mesh(jax.devices()[:1])
    exp = experiment.build(c)
    params = _random_params(exp.task)
    rng = np.random.default_rng(0)
    # Inputs through a PNG (uint8) and an .npz (floats in [-1, 1]), resized from 16x16.
    img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(img, "L").save(tmp_path / "in.png")
    one = app_sample.load_inputs(str(tmp_path / "in.png"), 8, 1)
    assert one.shape == (1, 8, 8, 1) and one.min() >= -1 and one.max() <= 1
    np.savez(tmp_path / "in.npz", images=rng.uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32))
    inputs = app_sample.load_inputs(str(tmp_path / "in.npz"), 8, 1)
    run = tmp_path / "run"
    generator = generate.Generator(exp.task, exp.sampling, mesh)
    out, _ = app_sample.sample_with_inputs(exp.sampling, str(run), generator, params, inputs, 0,
                                           1)
    with np.load(run / "samples.npz") as f:
        np.testing.assert_array_equal(f["inputs"], inputs)
        np.testing.assert_array_equal(f["images"], out)
    # input row, result row (5 of 8 columns filled), 2 pixels of padding, enlarged twice.
    assert Image.open(run / "samples.png").size == (2 * (8 * 10 + 2), 2 * (2 * 10 + 2))
    np.testing.assert_array_equal(out[..., :4, :], np.clip(inputs[..., :4, :], -1, 1))
    assert np.abs(out[..., 4:, :] - inputs[..., 4:, :]).max() > 0.1
    c.condition.type, c.condition.strength = "img2img", 0.0
    exp = experiment.build(c)
    same, _ = generate.Generator(exp.task, exp.sampling, mesh)(params, 5, jax.random.PRNGKey(1),
                                                                 inputs=inputs)
    np.testing.assert_array_equal(same, np.clip(inputs, -1, 1))
    grid = app_sample.side_by_side(inputs, same, ncol=4)
    assert grid.shape == (16, 8, 8, 1)
    np.testing.assert_array_equal(grid[:4], inputs[:4])
    np.testing.assert_array_equal(grid[4:8], same[:4])
    with pytest.raises(configlib.ConfigError, match="condition.input"):
        app_sample.load_inputs(str(tmp_path / "missing.png"), 8, 1)


def test_png_mask(tmp_path):
    m = np.zeros((4, 4), np.uint8)
    m[:, :2] = 255
    Image.fromarray(m, "L").save(tmp_path / "m.png")
    got = experiment.load_mask(str(tmp_path / "m.png"), 8)
    np.testing.assert_array_equal(got[..., 0], np.repeat(np.repeat(m > 127, 2, 0), 2, 1))
    with pytest.raises(configlib.ConfigError, match="condition.mask"):
        experiment.load_mask(str(tmp_path / "nope.png"), 8)
