"""Latent diffusion (issue 12): ``--mode encode`` and its cache, training on latents (from the
cache or encoded on the fly), sampling through the decoder, and the one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from diffjax import configlib, data, experiment, generate, parallel, tasks
from diffjax.app import common
from diffjax.app import encode as app_encode
from diffjax.app import train as app_train
from diffjax.data import latent_cache
from diffjax.errors import ConfigError

AE = {"model.name": "autoencoder_kl", "model.class_cond": False, "guidance.type": "none",
      "guidance.label_dropout": 0.0, "model.autoencoder.block_out_channels": (8, 16),
      "model.autoencoder.layers_per_block": 1, "model.autoencoder.norm_num_groups": 4,
      "model.autoencoder.latent_channels": 2, "optim.warmup_steps": 0,
      "eval.metrics": ("psnr",)}
# 64 images -> shards of 24, 24, 16; the network sees 4x4x2 latents
LATENT = {"model.channel_mult": (1, 2), "model.attention_resolutions": (2,),
          "model.dropout": 0.0, "data.latent.shard_size": 24,
          "diffusion.timestep_sampler": "uniform", "sampler.thresholding": "none"}


def _ae_run(tiny, tiny_data, workdir, mesh, seed, **overrides):
    c = tiny.config(tiny_data, **{**AE, **overrides})
    tiny.save_run(c, workdir, mesh, seed)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(c.to_dict(), f, default=str)
    return workdir


@pytest.fixture(scope="module")
def setup(tiny, tiny_data, built_once):
    """(its directory, the mesh, an autoencoder run, the latent cache encoded with it, the
    cache's meta), built once for all workers (the tests only read them)."""
    mesh = parallel.make_mesh()

    def build(root):
        ae = _ae_run(tiny, tiny_data, os.path.join(root, "ae"), mesh, 1)
        exp = experiment.build(_config(tiny, tiny_data, ae, os.path.join(root, "cache")),
                               mode="encode")
        return app_encode.run(exp, None, mesh)

    root, meta = built_once("latent", build)
    return root, mesh, os.path.join(root, "ae"), os.path.join(root, "cache"), meta


def _config(tiny, tiny_data, ae, cache, **overrides):
    return tiny.config(tiny_data, **{**LATENT, "data.latent.workdir": ae,
                                     "data.latent.cache": cache, **overrides})


def _pixels(tiny_data, split="train"):
    src = data.make_source("idx", split=split, data_dir=tiny_data, image_size=8)
    images, labels = src.read_batch(np.arange(len(src)))
    return images.astype(np.float32) / 127.5 - 1.0, labels


def test_cache_holds_the_posterior_of_every_image(tiny, tiny_data, setup):
    """Shards of 24, 24, 16 rows hold each training image's posterior mean and std (the
    autoencoder applied directly) and its label; the measured scale factor is 1/std of
    z ~ q(z | x) in float64: E[z^2] = mean^2 + std^2."""
    _, mesh, ae, cache, meta = setup
    exp = experiment.build(_config(tiny, tiny_data, ae, cache))
    params, step = common.first_stage_params(exp, mesh)
    x, labels = _pixels(tiny_data)
    post = jax.device_get(exp.task.posterior(params, x))
    identity = exp.latent.identity(exp.data, common.params_digest(params), step)
    src = latent_cache.LatentCacheSource(cache, identity)
    got = src.read_batch(np.arange(64)[::-1])
    # Two float32 evaluations of the encoder (the cache: compiled, in batches over 8 devices;
    # here: all 64 at once, op by op but for each norm, one compiled call) round differently
    # through its convolutions and norms: up to ~1.2e-6 apart (measured, on values of order
    # 0.1-1); a wrong image or a misplaced row is off by order 0.1.
    np.testing.assert_allclose(got["mean"][::-1], post["mean"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["std"][::-1], post["std"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["label"][::-1], labels)
    assert [s["rows"] for s in meta["shards"]] == [24, 24, 16]
    m, s = np.asarray(post["mean"], np.float64), np.asarray(post["std"], np.float64)
    std = np.sqrt(np.mean(m**2 + s**2) - np.mean(m) ** 2)
    assert float(np.abs(m).mean()) > 1e-2 and float(s.std()) > 1e-4  # not degenerate
    np.testing.assert_allclose(meta["measured_scale_factor"], 1 / std, rtol=1e-6)
    # data.latent.scale_factor=0 resolves to it
    assert exp.task.scale_factor == pytest.approx(1 / std, rel=1e-6)
    assert isinstance(exp.task, tasks.LatentDiffusionTask)
    assert exp.task.image_shape == (4, 4, 2) and exp.task.input_shape == (8, 8, 1)


_DRIVER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import importlib.util
spec = importlib.util.spec_from_file_location("tiny", {tiny_path!r})
tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
from diffjax import experiment, parallel
from diffjax.app import encode
from diffjax.data import latent_cache

real = latent_cache._atomic_write

def killing(path, write):
    if path.endswith("shard-00001.npy"):  # die half-way through writing shard 1
        import io
        buf = io.BytesIO(); write(buf)
        with open(path + ".tmp" + str(os.getpid()), "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, write)

latent_cache._atomic_write = killing
c = tiny.config({data!r}, **{overrides!r})
exp = experiment.build(c, mode="encode")
encode.run(exp, None, parallel.make_mesh())
"""


def test_encode_resumes_after_kill_9_to_identical_files(tiny, tiny_data, setup, tmp_path):
    """SIGKILL half-way through writing shard 1: the cache is incomplete (a one-line error to
    training); rerunning the same encode finishes it, file for file identical to the
    uninterrupted cache, with the temporary file gone."""
    _, mesh, ae, cache, _ = setup
    killed = str(tmp_path / "cache")
    overrides = {**LATENT, "data.latent.workdir": ae, "data.latent.cache": killed}
    script = tmp_path / "driver.py"
    here = os.path.dirname(os.path.abspath(__file__))
    script.write_text(_DRIVER.format(tests=here, tiny_path=os.path.join(here, "tiny.py"),
                                     data=tiny_data, overrides=overrides))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(os.listdir(killed))
    assert "shard-00000.json" in left and "shard-00001.json" not in left
    assert any(".tmp" in n for n in left)
    c = _config(tiny, tiny_data, ae, killed)
    with pytest.raises(ConfigError, match="no measured scale factor"):
        experiment.build(c)
    c.data.latent.scale_factor = 0.5
    exp = experiment.build(c)
    with pytest.raises(data.DataError, match="incomplete .1 of 3 shards.*rerun") as err:
        app_train.run(exp, str(tmp_path / "run"), mesh)
    assert "\n" not in str(err.value) and not os.path.exists(tmp_path / "run" / "checkpoints")
    app_encode.run(experiment.build(c, mode="encode"), None, mesh)
    assert sorted(os.listdir(killed)) == sorted(os.listdir(cache))
    for name in os.listdir(cache):
        with open(os.path.join(cache, name), "rb") as a, open(os.path.join(killed, name),
                                                               "rb") as b:
            assert a.read() == b.read(), name


def _copy_cache(src: str, dst) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(dst, name), "wb") as b:
            b.write(a.read())
    return str(dst)


def test_bad_caches_are_one_line_errors_before_training(tiny, tiny_data, setup, tmp_path):
    """Truncated or corrupted shards, a cache of another autoencoder or of latents of another
    shape, a missing cache: one line each, from train before any checkpoint is written."""
    _, mesh, ae, cache, _ = setup
    other = _ae_run(tiny, tiny_data, str(tmp_path / "ae_other"), mesh, 7)
    wide = _ae_run(tiny, tiny_data, str(tmp_path / "ae_wide"), mesh, 1,
                   **{"model.autoencoder.latent_channels": 3})
    truncated = _copy_cache(cache, tmp_path / "truncated")
    with open(os.path.join(truncated, "shard-00002.npy"), "r+b") as f:
        f.truncate(200)
    flipped = _copy_cache(cache, tmp_path / "flipped")
    with open(os.path.join(flipped, "shard-00001.npy"), "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    cases = [
        (ae, truncated, {}, "shard-00002.npy is truncated or corrupt"),
        (ae, flipped, {}, "shard-00001.npy is corrupt .SHA-256"),
        (other, cache, {}, "made by another autoencoder"),
        (wide, cache, {}, "holds latents of another shape"),
        (ae, str(tmp_path / "none"), {"data.latent.scale_factor": 0.5}, "no latent cache at"),
        (ae, cache, {"data.random_flip": True}, "cannot be flipped"),
    ]
    for workdir, where, extra, message in cases:
        exp = experiment.build(_config(tiny, tiny_data, workdir, where, **extra))
        run = tmp_path / f"run_{len(message)}"
        with pytest.raises(data.DataError, match=message) as err:
            app_train.run(exp, str(run), mesh)
        assert "\n" not in str(err.value), message
        assert not os.path.exists(run / "checkpoints"), message


def test_config_errors_are_one_line(tiny, tiny_data, setup, tmp_path):
    _, mesh, ae, cache, _ = setup
    pixel = str(tmp_path / "pixel")
    tiny.save_run(tiny.config(tiny_data), pixel, mesh, 1)
    with open(os.path.join(pixel, "config.json"), "w") as f:
        json.dump(tiny.config(tiny_data).to_dict(), f, default=str)
    cases = [
        ({"data.latent.workdir": str(tmp_path)}, "has no config.json"),
        ({"data.latent.workdir": pixel}, "not an autoencoder"),
        ({"data.latent.cache": ""}, "scale_factor=0 means the cache's measured"),
        ({"data.channels": 3}, "encodes 1-channel images, this config's data have 3"),
        ({"data.image_size": 7}, "at data.image_size=7: .*downsampling"),
        ({"model.name": "classifier"}, "is for diffusion models"),
        ({"condition.type": "superres", "condition.low_res_size": 4}, "superres"),
        ({"data.latent.workdir": "", "data.latent.cache": cache}, "set both"),
        ({"sampler.thresholding": "static"}, "x0 is a latent"),
    ]
    for overrides, message in cases:
        c = _config(tiny, tiny_data, ae, cache, **overrides)
        with pytest.raises(ConfigError, match=message) as err:
            experiment.build(c)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="likelihood of pixels"):
        experiment.build(_config(tiny, tiny_data, ae, cache, **{"eval.metrics": ("nll",)}),
                         mode="eval")
    with pytest.raises(ConfigError, match="writes data.latent.cache"):
        experiment.build(_config(tiny, tiny_data, ae, ""), mode="encode")
    with pytest.raises(ConfigError, match="--mode encode writes the latents"):
        experiment.build(tiny.config(tiny_data), mode="encode")


def test_training_batches_from_the_cache_equal_encoding_on_the_fly(tiny, tiny_data, setup):
    """The same seed gives the same shuffled rows from the cache as from the pixel pipeline
    encoded as it comes; the loss trains on z = scale * (mean + std * n)."""
    _, mesh, ae, cache, _ = setup
    exp = experiment.build(_config(tiny, tiny_data, ae, cache))
    params, step = common.first_stage_params(exp, mesh)
    cached = app_train.latent_train_iterator(exp, mesh, params, step, 0, 1)
    fly_exp = experiment.build(_config(tiny, tiny_data, ae, "",
                                       **{"data.latent.scale_factor": 0.7}))
    fly = app_train.latent_train_iterator(fly_exp, mesh, params, step, 0, 1)
    for _ in range(9):  # past the first epoch (64 / 8 batches)
        a, b = next(cached), next(fly)
        assert set(a) == set(b) == {"mean", "std", "label"}
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a["std"], b["std"], rtol=1e-5, atol=1e-6)
    state = fly.get_state()
    after = next(fly)
    fly.set_state(state)
    np.testing.assert_array_equal(next(fly)["mean"], after["mean"])

    task = fly_exp.task  # the loss: the pixel loss on z, the posterior noise from the key
    rng = np.random.default_rng(0)  # ADM zero-initialises the output layer: perturb it all
    diff_params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32),
                               task.init_params(jax.random.PRNGKey(0)))
    inner = tasks.DiffusionTask(**{f.name: getattr(task, f.name)
                                   for f in dataclasses.fields(tasks.DiffusionTask)})
    key = jax.random.PRNGKey(3)
    k_z, k_rest = jax.random.split(key)
    state = types.SimpleNamespace(loss_count=np.zeros(50))  # T, all uniform sampling reads
    z = 0.7 * (after["mean"] + after["std"] * np.asarray(
        jax.random.normal(k_z, after["mean"].shape)))
    got, (_, t) = task.loss_fn()(diff_params, state, after, key)
    want, (_, t2) = inner.loss_fn()(diff_params, state, {"image": z, "label": after["label"]},
                                    k_rest)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(t, t2)
    mean_only = dataclasses.replace(task, sample_posterior=False)
    plain, _ = inner.loss_fn()(diff_params, state,
                               {"image": 0.7 * after["mean"], "label": after["label"]}, k_rest)
    np.testing.assert_allclose(mean_only.loss_fn()(diff_params, state, after, key)[0], plain,
                               rtol=1e-6)
    assert abs(float(got) - float(plain)) > 1e-6


def test_sampling_decodes_and_img2img_round_trips_through_the_latents(tiny, tiny_data, setup):
    """Samples are images of the data's shape; img2img at strength 0 returns
    decode(encode(x)) (the inputs enter as scale * mean, the output is decoded), and the
    autoencoder's larger padded frame is cropped back; inpaint masks live on the latent
    grid."""
    _, mesh, ae, cache, _ = setup
    exp = experiment.build(_config(tiny, tiny_data, ae, cache,
                                   **{"condition.type": "img2img", "condition.strength": 0.0}))
    fs, _ = common.first_stage_params(exp, mesh)
    params = exp.task.init_params(jax.random.PRNGKey(0))
    gen = generate.Generator(exp.task, exp.sampling, mesh, first_stage_params=fs)
    images, _ = gen(params, 8, jax.random.PRNGKey(1))
    assert images.shape == (8, 8, 8, 1) and np.abs(images).max() <= 1.0
    x, _ = _pixels(tiny_data)
    out, _ = gen(params, 8, jax.random.PRNGKey(1), inputs=x[:8])
    ae_task = exp.latent.autoencoder.task
    want = np.clip(np.asarray(ae_task.decode(fs, ae_task.encode(fs, x[:8])[0])), -1, 1)
    np.testing.assert_allclose(out, want, atol=1e-5)

    inpaint = experiment.build(_config(tiny, tiny_data, ae, cache,
                                       **{"condition.type": "inpaint"}))
    assert inpaint.sampling.condition.mask.shape == (4, 4, 1)

    # an autoencoder of 8x8 padded frames serving 6x6 data: pad with -1 to encode, crop
    frame = dataclasses.replace(exp.task, frame_offset=(1, 1), pixel_size=6)
    small = x[:2, 1:7, 1:7]
    padded = np.full((2, 8, 8, 1), -1.0, np.float32)
    padded[:, 1:7, 1:7] = small
    np.testing.assert_allclose(frame.encode_inputs(fs, small),
                               exp.task.encode_inputs(fs, padded), rtol=1e-6)
    z = exp.task.encode_inputs(fs, padded)
    np.testing.assert_allclose(frame.decode_outputs(fs, z),
                               np.asarray(exp.task.decode_outputs(fs, z))[:, 1:7, 1:7],
                               rtol=1e-6)
    assert frame.input_shape == (6, 6, 1)


def test_fashion_mnist_latent_config_on_its_autoencoder(tiny, tmp_path):
    """experiments/fashion_mnist_latent.py on a run of experiments/fashion_mnist_autoencoder.py
    (random weights): 28x28 data in the autoencoder's padded 32x32 frame, 8x8x4 latents, and
    its :smoke variant's network applies."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mesh = parallel.make_mesh()
    ae_c = configlib.load_config_file(os.path.join(repo, "experiments",
                                                   "fashion_mnist_autoencoder.py"))
    ae = str(tmp_path / "ae")
    tiny.save_run(ae_c, ae, mesh, 1)
    with open(os.path.join(ae, "config.json"), "w") as f:
        json.dump(ae_c.to_dict(), f, default=str)
    for variant in ("", ":smoke"):
        c = configlib.load_config_file(os.path.join(repo, "experiments",
                                                    f"fashion_mnist_latent.py{variant}"))
        c.data.latent.workdir, c.data.latent.scale_factor = ae, 0.3
        exp = experiment.build(c)
        task = exp.task
        assert task.image_shape == (8, 8, 4) and task.input_shape == (28, 28, 1)
        assert task.frame_offset == (2, 2)
    c.data.latent.workdir = ""  # the architecture from data.latent.config alone: summary
    exp = experiment.build(c, mode="summary")
    assert exp.task.image_shape == (8, 8, 4)
    with pytest.raises(ConfigError, match="data.latent.workdir is empty"):
        common.first_stage_params(exp, mesh)
    params = task.init_params(jax.random.PRNGKey(0))
    out = task.apply(params, np.zeros((2, 8, 8, 4), np.float32), np.array([3.0, 7.0]),
                     np.array([0, 1]), False)
    assert out.shape == (2, 8, 8, 4) and bool(np.isfinite(out).all())


def test_encode_and_train_on_two_processes(tiny, tiny_data, setup, tmp_path):
    """``--mode encode`` as 2 processes x 2 devices (``jax.distributed``) writes the cache one
    process writes, file for file; ``--mode train`` of the latent model with its state
    sharded (fsdp) over both processes trains on that cache and draws its grid, decoded by
    the autoencoder on every process's devices."""
    _, _, ae, cache, _ = setup
    two = str(tmp_path / "cache")
    settings = {**LATENT, "data.latent.workdir": ae, "data.latent.cache": two}
    config = tiny.write_cli_config(tmp_path / "encode.py", tiny_data, settings)
    tiny.run_main(config, str(tmp_path / "encoded"), "encode", 2, 2, cache_name="latent")
    assert sorted(os.listdir(two)) == sorted(os.listdir(cache))
    for name in os.listdir(cache):
        with open(os.path.join(cache, name), "rb") as a, open(os.path.join(two, name),
                                                               "rb") as b:
            assert a.read() == b.read(), name
    run = str(tmp_path / "run")
    config = tiny.write_cli_config(
        tmp_path / "train.py", tiny_data,
        {**settings, "train.num_steps": 2, "train.sample_every": 2,
         "parallel.shard_state": "fsdp"})
    tiny.run_main(config, run, "train", 2, 2, cache_name="latent")
    assert "2" in os.listdir(os.path.join(run, "checkpoints"))
    grid = np.asarray(Image.open(os.path.join(run, "samples", "step_0000002.png")))
    assert grid.std() > 0  # decoded images, not a blank page
