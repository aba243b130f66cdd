"""A caption-conditioned model on an autoencoder's latents (``text.encoder`` with
``data.latent``, LDM's text-to-image setup): batches from the latent cache carry each
example's own caption, the same as the pixel batches encoded on the fly; the loss sees the
captions; training draws prompt grids and ``--mode sample`` writes prompted samples decoded to
pixels."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from diffjax import configlib, data, experiment, parallel, tasks
from diffjax import main as cli
from diffjax.app import common
from diffjax.app import encode as app_encode
from diffjax.app import sample as app_sample
from diffjax.app import text as text_app
from diffjax.app import train as app_train
from diffjax.data import latent_cache

AE = {"model.name": "autoencoder_kl", "model.class_cond": False, "guidance.type": "none",
      "guidance.label_dropout": 0.0, "model.autoencoder.block_out_channels": (8, 16),
      "model.autoencoder.layers_per_block": 1, "model.autoencoder.norm_num_groups": 4,
      "model.autoencoder.latent_channels": 2, "optim.warmup_steps": 0,
      "eval.metrics": ("psnr",), "text.encoder": "none"}
# 40 captioned 8x8 images -> 4x4x2 latents in shards of 16
LATENT = {"model.channel_mult": (1, 2), "model.attention_resolutions": (2,),
          "model.dropout": 0.0, "data.latent.shard_size": 16, "sampler.thresholding": "none",
          "guidance.type": "classifier_free", "guidance.label_dropout": 0.2,
          "guidance.scale": 2.0}


def _config(tiny, text_data, ae, cache, **overrides):
    return tiny.text_config(text_data, **{**LATENT, "data.latent.workdir": ae,
                                          "data.latent.cache": cache, **overrides})


@pytest.fixture(scope="module")
def setup(tiny, built_once):
    """(the mesh, the captioned data, an autoencoder run of random weights, the latent cache
    of its train split), built once for all workers."""
    mesh = parallel.make_mesh()

    def build(root):
        text_data = tiny.write_text_dataset(os.path.join(root, "data"))
        ae = os.path.join(root, "ae")
        c = tiny.text_config(text_data, **AE)
        tiny.save_run(c, ae, mesh, 1)
        with open(os.path.join(ae, "config.json"), "w") as f:
            json.dump(c.to_dict(), f, default=str)
        exp = experiment.build(_config(tiny, text_data, ae, os.path.join(root, "cache")),
                               mode="encode")
        app_encode.run(exp, None, mesh)
        return text_data

    root, text_data = built_once("text_latent", build)
    return mesh, text_data, os.path.join(root, "ae"), os.path.join(root, "cache")


def test_cached_batches_carry_each_examples_caption(tiny, setup, tmp_path):
    mesh, text_data, ae, cache = setup
    exp = experiment.build(_config(tiny, text_data, ae, cache))
    assert isinstance(exp.task, tasks.LatentTextDiffusionTask)
    assert exp.task.image_shape == (4, 4, 2) and exp.task.input_shape == (8, 8, 1)
    tokenizer = text_app.training_tokenizer(exp, str(tmp_path))
    params, step = common.first_stage_params(exp, mesh)
    train = data.make_source(**exp.data.source_kwargs("train"))
    every = tokenizer.encode(text_app.captioner(exp).captions(train))  # row i's caption
    rows = latent_cache.LatentCacheSource(
        cache, exp.latent.identity(exp.data, common.params_digest(params), step))
    means = rows.read_batch(np.arange(len(rows)))["mean"].reshape(len(rows), -1)
    cached = app_train.latent_train_iterator(exp, mesh, params, step, 0, 1, tokenizer)
    fly_exp = experiment.build(_config(tiny, text_data, ae, "",
                                       **{"data.latent.scale_factor": 0.7}))
    fly = app_train.latent_train_iterator(fly_exp, mesh, params, step, 0, 1, tokenizer)
    for _ in range(6):  # past the first epoch (40 / 8 batches), shuffled
        a, b = next(cached), next(fly)
        assert set(a) == set(b) == {"mean", "std", "label", "tokens"}
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-5, atol=1e-6)
        for mean, tokens in zip(a["mean"].reshape(len(a["mean"]), -1), a["tokens"]):
            (i,) = np.flatnonzero((means == mean).all(axis=1))  # the cache row it came from
            np.testing.assert_array_equal(tokens, every[i])
    # precomputed embeddings (row i's context holds i) on the cache: each row's own
    n, width, length = len(rows), 6, 4
    context = np.repeat(np.arange(n, dtype=np.float32)[:, None, None], length, 1)
    context = np.repeat(context, width, 2)
    np.savez(tmp_path / "embeddings.npz", context=context, mask=np.ones((n, length), bool))
    emb_exp = experiment.build(_config(tiny, text_data, ae, cache, **{
        "text.encoder": "embeddings", "text.embeddings": str(tmp_path / "embeddings.npz"),
        "text.width": width, "text.context_length": length}))
    packed = app_train.latent_train_iterator(emb_exp, mesh, params, step, 0, 1)
    for _ in range(6):
        batch = next(packed)
        assert set(batch) == {"mean", "std", "label", "context"}
        for mean, cond in zip(batch["mean"].reshape(len(batch["mean"]), -1), batch["context"]):
            (i,) = np.flatnonzero((means == mean).all(axis=1))
            np.testing.assert_array_equal(cond[:, :width], i)  # and the mask after it
            np.testing.assert_array_equal(cond[:, width], 1.0)
    # the loss is conditioned on the captions: other tokens, another loss
    rng = np.random.default_rng(0)
    net = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32),
                       exp.task.init_params(jax.random.PRNGKey(0)))
    state = type("State", (), {"loss_count": np.zeros(50)})()
    key = jax.random.PRNGKey(3)
    loss = jax.jit(lambda p, b: exp.task.loss_fn()(p, state, b, key)[0])
    other = dict(a, tokens=np.roll(a["tokens"], 1, axis=0))
    assert abs(float(loss(net, a)) - float(loss(net, other))) > 1e-6


def test_trains_and_samples_prompts_through_the_decoder(tiny, setup, tmp_path):
    """Two training steps from the cache with a prompt grid at step 2, then --mode sample of
    two prompts: images of the data's (pixel) shape, their prompts recorded; --mode eval
    scores the prompts' attributes on decoded samples."""
    mesh, text_data, ae, cache = setup
    workdir = str(tmp_path / "run")
    exp = experiment.build(_config(tiny, text_data, ae, cache, **{
        "train.num_steps": 2, "train.sample_every": 2, "train.num_sample_images": 4,
        "train.checkpoint_every": 2}), num_devices=len(mesh.devices.flat))
    app_train.run(exp, workdir, mesh)
    with Image.open(os.path.join(workdir, "samples", "step_0000002.png")) as grid:
        assert grid.size[1] > grid.size[0] // 4  # one labelled row per class prompt
    prompts = ("a bright small shirt", "a dark large bag")
    sample_exp = experiment.build(_config(tiny, text_data, ae, cache, **{
        "sampler.prompts": prompts, "sampler.num_samples": 4, "sampler.batch_size": 8}),
        num_devices=len(mesh.devices.flat), mode="sample")
    images, tokens = app_sample.run(sample_exp, workdir, mesh)
    assert images.shape == (4, 8, 8, 1) and np.abs(images).max() <= 1.0
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        assert list(f["prompts"]) == [prompts[0]] * 2 + [prompts[1]] * 2
        np.testing.assert_array_equal(f["tokens"], tokens)
    # --mode eval measures the prompted attributes on the decoded images
    cli.run(_config(tiny, text_data, ae, cache, **{
        "eval.metrics": ("attribute_accuracy",), "eval.num_samples": 16, "eval.batch_size": 8,
        "sampler.prompts": prompts}), "eval", workdir)
    out = os.path.join(workdir, "eval")
    (record,) = [json.load(open(os.path.join(out, f))) for f in os.listdir(out)
                 if f.endswith(".json")]
    assert sorted(record["metrics"]) == ["brightness_accuracy", "size_accuracy"]
    assert all((v * 16).is_integer() for v in record["metrics"].values())


def test_fashion_mnist_text_latent_config():
    """experiments/fashion_mnist_text_latent.py: the caption model on the 8x8x4 latents of
    fashion_mnist_autoencoder.py's architecture (data.latent.config alone: --mode summary),
    28x28 data in its padded 32x32 frame; the network takes tokens; :smoke builds too."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(repo, "experiments", "fashion_mnist_text_latent.py")
    for variant in ("", ":smoke"):
        c = configlib.load_config_file(path + variant)
        c.data.latent.workdir = ""
        exp = experiment.build(c, mode="summary")
        task = exp.task
        assert isinstance(task, tasks.LatentTextDiffusionTask)
        assert task.image_shape == (8, 8, 4) and task.input_shape == (28, 28, 1)
        assert task.frame_offset == (2, 2) and exp.text.captions == "fashion_mnist_attributes"
    params = task.init_params(jax.random.PRNGKey(0))
    tokens = np.array([[3, 5, 0, 0, 0, 0, 0, 0], [-1] * 8], np.int32)  # a caption, the null
    out = task.apply(params, np.zeros((2, 8, 8, 4), np.float32), np.array([3.0, 7.0]), tokens,
                     False)
    assert out.shape == (2, 8, 8, 4) and bool(np.isfinite(out).all())
