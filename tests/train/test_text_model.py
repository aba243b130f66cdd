"""A caption-conditioned model end to end on a tiny captioned data set: batches carry each
image's own caption, label dropout drops whole captions, the text encoder is trained and
resumed exactly after kill -9, and sampling / eval take prompts (classifier-free guidance
against the learned null caption)."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffjax import experiment, generate
from diffjax import main as cli
from diffjax import text as text_lib
from diffjax.app import text as text_app
from diffjax.data import captions
from diffjax.train import step as step_lib
from diffjax.train.step import LossSpec


@pytest.fixture(scope="module")
def text_data(tiny, built_once):
    return built_once("text_data", tiny.write_text_dataset)[0]


@pytest.fixture(scope="module")
def straight(tiny, text_data, built_once):
    """6 steps of the tiny caption model without interruption on 2 devices."""

    def build(workdir):
        tiny.run_driver([text_data, workdir, 6, 2, "--text"])

    return built_once("text_straight", build)[0]


def _experiment(tiny, text_data, **overrides):
    return experiment.build(tiny.text_config(text_data, **overrides), num_devices=8)


@pytest.mark.parametrize("kind", ["word", "byte"])
def test_batches_carry_each_images_own_caption(tiny, text_data, tmp_path, kind):
    exp = _experiment(tiny, text_data, **{"text.tokenizer": kind, "text.context_length": 24})
    assert exp.task.model.encoder.vocab_size == (257 if kind == "byte" else 32)
    tokenizer = text_app.training_tokenizer(exp, str(tmp_path))
    assert text_lib.Tokenizer.load(str(tmp_path / "tokenizer.json")) == tokenizer
    train = text_app.data_lib.make_source(**exp.data.source_kwargs("train"))
    images, labels = train.read_batch(np.arange(len(train)))
    thresholds = captions.thresholds_from(images, labels, tiny.TEXT_CLASSES)
    it = text_app.train_iterator(exp, tokenizer, 0, 1)
    for _ in range(5):  # 40 examples, batches of 8: more than one epoch, shuffled
        batch = next(it)
        x = batch["image"]
        values = captions.attribute_values(captions.measure(x), batch["label"], thresholds)
        for i, text in enumerate(tokenizer.decode(batch["tokens"])):
            words = text.split()
            assert words[-1] == captions.CLASS_WORDS[batch["label"][i]], text
            for attr in captions.ATTRIBUTES:
                said = [w for w in words if w in attr.words]
                if said:  # a kept attribute word is the image's own
                    assert said == [attr.words[values[attr.name][i]]], (text, attr.name)


def test_a_resumed_run_with_other_captions_is_refused(tiny, text_data, tmp_path):
    exp = _experiment(tiny, text_data)
    text_app.training_tokenizer(exp, str(tmp_path))
    before = (tmp_path / "tokenizer.json").read_bytes()
    other = _experiment(tiny, text_data, **{"text.caption_keep_prob": 0.0})  # class words only
    with pytest.raises(text_lib.TextError, match="other captions"):
        text_app.training_tokenizer(other, str(tmp_path))
    assert (tmp_path / "tokenizer.json").read_bytes() == before


def test_a_vocabulary_larger_than_the_embedding_is_refused(tiny, text_data, tmp_path):
    exp = _experiment(tiny, text_data, **{"text.vocab_size": 8})
    with pytest.raises(text_lib.TextError, match="text.vocab_size=8"):
        text_app.training_tokenizer(exp, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_label_dropout_drops_whole_captions_and_leaves_labels_as_they_were(tiny, text_data):
    seen = {}

    def apply_fn(params, x, t, y, train, rngs):
        seen["y"] = y
        return jnp.zeros_like(x)

    ds = _experiment(tiny, text_data).schedule
    x0 = jnp.zeros((64, 4, 4, 1))
    tokens = jnp.tile(jnp.arange(1, 7, dtype=jnp.int32), (64, 1))
    key = jax.random.PRNGKey(3)
    spec = LossSpec(label_dropout=0.5, null_label=-1, cond_key="tokens")
    state = types.SimpleNamespace(loss_count=jnp.zeros((ds.num_timesteps,), jnp.int32))
    step_lib.make_diffusion_loss(apply_fn, ds, spec)(None, state,
                                                     {"image": x0, "tokens": tokens}, key)
    y = np.asarray(seen["y"])
    dropped = (y == -1).all(axis=1)
    assert ((y == -1).any(axis=1) == dropped).all()  # rows, never single tokens
    np.testing.assert_array_equal(y[~dropped], np.asarray(tokens)[~dropped])
    assert 10 < dropped.sum() < 54
    # labels [B]: the drop is drawn as before ([B] bernoullis of the same key)
    labels = jnp.arange(64, dtype=jnp.int32) % 10
    spec = LossSpec(label_dropout=0.5, null_label=10)
    step_lib.make_diffusion_loss(apply_fn, ds, spec)(None, state,
                                                     {"image": x0, "label": labels}, key)
    k_label = jax.random.split(key, 4)[3]
    want = jnp.where(jax.random.bernoulli(k_label, 0.5, (64,)), 10, labels)
    np.testing.assert_array_equal(np.asarray(seen["y"]), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(seen["y"]) == 10, dropped)


def test_kill_9_and_resume_trains_the_text_encoder_exactly(tiny, text_data, straight,
                                                            tmp_path):
    workdir = str(tmp_path / "killed")
    killed = tiny.run_driver([text_data, workdir, 6, 2, "--kill-at-batch", 7, "--text"],
                             check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not os.path.exists(os.path.join(workdir, "final_params.npz"))
    tiny.run_driver([text_data, workdir, 6, 2, "--text"])
    resumed, want = tiny.final_params(workdir), tiny.final_params(straight)
    assert resumed.keys() == want.keys()
    names = list(want)
    assert any("text_encoder" in n for n in names) and any("null_context" in n for n in names)
    for name in names:
        np.testing.assert_array_equal(resumed[name], want[name], err_msg=name)
    with open(os.path.join(workdir, "tokenizer.json")) as f, \
            open(os.path.join(straight, "tokenizer.json")) as g:
        assert json.load(f) == json.load(g)


def _sample(tiny, text_data, workdir, prompts, **overrides):
    config = tiny.text_config(text_data, **{"sampler.prompts": prompts, **overrides})
    cli.run(config, "sample", workdir)
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        return {k: f[k] for k in f.files}


def test_sample_from_prompts_with_guidance_against_the_null_caption(tiny, text_data, straight):
    prompts = ("a dark small sneaker", "a bright bag")
    got = _sample(tiny, text_data, straight, prompts, **{"sampler.num_samples": 8,
                                                        "guidance.scale": 1.0})
    assert list(got["prompts"]) == [prompts[0]] * 4 + [prompts[1]] * 4
    tokenizer = text_lib.Tokenizer.load(os.path.join(straight, "tokenizer.json"))
    np.testing.assert_array_equal(got["tokens"], tokenizer.encode(list(got["prompts"])))
    grid = Image.open(os.path.join(straight, "samples.png"))
    assert grid.width > 2 * (4 * (8 + 2) + 2) and grid.height == 2 * (2 * (8 + 2) + 2)
    # w = 0 is the conditional model alone: what guidance "none" draws from the same noise
    plain = _sample(tiny, text_data, straight, prompts, **{
        "sampler.num_samples": 8, "guidance.type": "none"})
    w0 = _sample(tiny, text_data, straight, prompts, **{"sampler.num_samples": 8,
                                                       "guidance.scale": 0.0})
    np.testing.assert_allclose(w0["images"], plain["images"], atol=1e-5)


def _perturbed(params, seed):
    """params + N(0, 0.05^2) noise, so that the context reaches the zero-initialised output
    layers (NumPy draws: jax.random leaf by leaf compiles a sampler per shape, and all of
    them in one program took 18 s to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
        jax.device_get(params))


def _denoisers(task, sampling, params, guidance_scale):
    """(guided, plain) denoisers ``(x, sigma, cond) -> x0`` of ``params``, compiled."""
    knobs = sampling.knobs(guidance_scale=guidance_scale)
    guided = jax.jit(lambda p, x, s, c: generate.guided_denoiser(
        sampling, task.denoiser(p), knobs)(x, s, c))
    plain = jax.jit(lambda p, x, s, c: task.denoiser(p)(x, s, c))
    return (lambda x, s, c: guided(params, x, s, c)), (lambda x, s, c: plain(params, x, s, c))


def test_guidance_is_against_the_learned_null_caption(tiny, text_data):
    exp = _experiment(tiny, text_data, **{"sampler.thresholding": "none"})
    task, sampling = exp.task, exp.sampling
    params = _perturbed(task.init_params(jax.random.PRNGKey(0)), seed=2)
    tokens = jnp.asarray([[1, 6, 12, 13, 0, 0], [1, 4, 0, 0, 0, 0]], jnp.int32)
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    guided, plain = _denoisers(task, sampling, params, guidance_scale=2.0)
    d_c, d_u = plain(x, 2.0, tokens), plain(x, 2.0, jnp.full_like(tokens, -1))
    np.testing.assert_allclose(guided(x, 2.0, tokens), d_c + 2.0 * (d_c - d_u), rtol=1e-5,
                               atol=1e-5)  # float32, batches of 2B vs B: as below
    assert np.abs(d_c - d_u).max() > 1e-3  # the null caption is not the captions


def test_eval_scores_attributes_per_guidance_scale(tiny, text_data, straight):
    config = tiny.text_config(text_data, **{
        "eval.metrics": ("attribute_accuracy",), "eval.num_samples": 16, "eval.batch_size": 8,
        "eval.sweep_guidance_scales": (0.0, 3.0),
        "sampler.prompts": ("a dark small sneaker", "a bright large bag")})
    cli.run(config, "eval", straight)
    out = os.path.join(straight, "eval")
    records = [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out))
               if f.endswith(".json")]
    assert [r["guidance"]["scale"] for r in records] == [0.0, 3.0]
    for r in records:
        m = r["metrics"]
        assert sorted(m) == ["brightness_accuracy", "size_accuracy"]
        for k in m:  # a fraction of the 16 samples, every prompt naming both
            assert 0.0 <= m[k] <= 1.0 and (m[k] * 16).is_integer()
    assert os.path.exists(os.path.join(out, "sweep_vs_guidance_scale.png"))


# ----------------------------------------------------------------------- precomputed embeddings

WIDTH, LENGTH = 12, 5


def _embeddings_for(images, labels, rng):
    """Embeddings [N, LENGTH, WIDTH] that encode each example's label (channel 0) and mean
    pixel (channel 1), the rest noise; a mask of 1..LENGTH valid entries."""
    n = len(labels)
    context = rng.standard_normal((n, LENGTH, WIDTH)).astype(np.float32)
    context[:, :, 0] = labels[:, None]
    context[:, :, 1] = images.reshape(n, -1).mean(axis=1)[:, None] / 255.0
    mask = np.arange(LENGTH)[None] < rng.integers(1, LENGTH + 1, n)[:, None]
    return context, mask


@pytest.fixture(scope="module")
def embeddings(tiny, text_data, tmp_path_factory):
    """(train .npz, sample .npz) of precomputed embeddings for the tiny captioned data."""
    exp = _experiment(tiny, text_data)
    train = text_app.data_lib.make_source(**exp.data.source_kwargs("train"))
    images, labels = train.read_batch(np.arange(len(train)))
    rng = np.random.default_rng(0)
    context, mask = _embeddings_for(images, labels, rng)
    d = tmp_path_factory.mktemp("embeddings")
    np.savez(d / "train.npz", context=context, mask=mask)
    np.savez(d / "prompts.npz", context=context[:2], mask=mask[:2],
             prompts=np.asarray(["first", "second"]))
    return str(d / "train.npz"), str(d / "prompts.npz")


def _embedding_config(tiny, text_data, train_npz, **overrides):
    return tiny.text_config(text_data, **{
        "text.encoder": "embeddings", "text.embeddings": train_npz, "text.width": WIDTH,
        "text.context_length": LENGTH + 1, **overrides})


def test_batches_carry_each_images_own_embeddings(tiny, text_data, embeddings):
    exp = experiment.build(_embedding_config(tiny, text_data, embeddings[0]), num_devices=8)
    assert exp.task.loss.cond_key == "context" and exp.task.loss.null_label == 0
    it = text_app.embedding_train_iterator(exp, 0, 1)
    for _ in range(6):
        batch = next(it)
        c = batch["context"]  # [B, LENGTH, WIDTH + 1], the mask last
        assert c.shape == (8, LENGTH, WIDTH + 1)
        np.testing.assert_array_equal(c[:, 0, 0], batch["label"])
        mean = (batch["image"].reshape(8, -1).mean(axis=1) + 1.0) * 127.5 / 255.0
        np.testing.assert_allclose(c[:, 0, 1], mean, atol=1e-5)
        assert set(np.unique(c[..., -1])) <= {0.0, 1.0} and (c[:, 0, -1] == 1).all()


@pytest.mark.parametrize("case, expect", [
    ("missing_file", "not found"),
    ("no_context_column", "no 'context' column"),
    ("wrong_width", "embeddings of width 10 but text.width=12"),
    ("wrong_rows", "holds 30 rows of embeddings but the data has 40"),
    ("too_long", "text.context_length=6"),
    ("empty_row", "row 3 has no valid embedding"),
])
def test_bad_embeddings_are_one_line_before_any_work(tiny, text_data, embeddings, tmp_path,
                                                     case, expect):
    with np.load(embeddings[0]) as f:
        context, mask = f["context"], f["mask"]
    path = str(tmp_path / "bad.npz")
    if case == "no_context_column":
        np.savez(path, ctx=context, mask=mask)
    elif case == "wrong_width":
        np.savez(path, context=context[..., :10], mask=mask)
    elif case == "wrong_rows":
        np.savez(path, context=context[:30], mask=mask[:30])
    elif case == "too_long":
        np.savez(path, context=np.concatenate([context, context], 1),
                 mask=np.concatenate([mask, mask], 1))
    elif case == "empty_row":
        mask = mask.copy()
        mask[3] = False
        np.savez(path, context=context, mask=mask)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep me\n")
    with pytest.raises(text_app.data_lib.DataError) as info:
        cli.run(_embedding_config(tiny, text_data, path), "train", str(workdir))
    message = str(info.value)
    assert expect in message and "\n" not in message, message
    assert sorted(os.listdir(workdir)) == ["config.json", "notes.txt"] or \
        sorted(os.listdir(workdir)) == ["notes.txt"]


def _write_records(path, rows):
    """An ArrayRecord file of one msgpack record per row (dicts, or raw bytes)."""
    from array_record.python import array_record_module
    from flax import serialization

    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for row in rows:
        writer.write(row if isinstance(row, bytes) else serialization.msgpack_serialize(row))
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def record_embeddings(embeddings, tmp_path_factory):
    """The same embeddings as ``embeddings`` as ArrayRecord files (prompts as "prompt")."""
    with np.load(embeddings[0]) as f:
        context, mask = f["context"], f["mask"]
    d = tmp_path_factory.mktemp("records")
    train = _write_records(d / "train.array_record",
                           [{"context": c, "mask": m} for c, m in zip(context, mask)])
    prompts = _write_records(d / "prompts.array_record", [
        {"context": context[i], "mask": mask[i], "prompt": p}
        for i, p in enumerate(["first", "second"])])
    return train, prompts


def test_array_record_embeddings_are_the_npz_ones_batch_for_batch(tiny, text_data, embeddings,
                                                                  record_embeddings, tmp_path):
    from diffjax.data import text_source

    want = text_source.load_embeddings(embeddings[1], WIDTH, LENGTH + 1)
    got = text_source.load_embeddings(record_embeddings[1], WIDTH, LENGTH + 1)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    # the first rows only (the training grids of a model without sample embeddings): a
    # record file is read no further, so a bad record after them goes unread
    with np.load(embeddings[0]) as f:
        rows = [{"context": c, "mask": m} for c, m in zip(f["context"], f["mask"])]
    rows[5] = {**rows[5], "mask": np.zeros(LENGTH, bool)}
    bad_after = _write_records(tmp_path / "bad_after.array_record", rows)
    head = text_source.load_embeddings(bad_after, WIDTH, LENGTH + 1, rows=3)
    with np.load(embeddings[0]) as f:
        np.testing.assert_array_equal(head[0], f["context"][:3])
        np.testing.assert_array_equal(head[1], f["mask"][:3])
    assert head[2] is None
    # (2 grain worker processes: the record reader travels to them)
    configs = [_embedding_config(tiny, text_data, path, **{"data.num_workers": 2})
               for path in (embeddings[0], record_embeddings[0])]
    iterators = [text_app.embedding_train_iterator(experiment.build(c, num_devices=8), 0, 1)
                 for c in configs]
    for _ in range(6):
        a, b = (next(it) for it in iterators)
        assert a.keys() == b.keys() == {"image", "label", "context"}
        for name in a:
            np.testing.assert_array_equal(b[name], a[name], err_msg=name)


@pytest.mark.parametrize("case, expect, when", [
    ("missing_file", "not found", "open"),
    ("not_array_record", "is not a readable ArrayRecord file", "open"),
    ("wrong_rows", "holds 30 records of embeddings but the data has 40", "open"),
    ("wrong_width", "embeddings of width 10 but text.width=12", "open"),
    ("too_long", "text.context_length=6", "open"),
    ("no_context_column", "record 0 has no 'context' column (it has ['ctx', 'mask'])", "open"),
    ("not_msgpack", "record 0 is not a msgpack map of embeddings", "open"),
    ("other_length", "record 3: context of shape (4, 12), but record 0 has (5, 12)", "read"),
    ("empty_row", "record 3 has no valid embedding", "read"),
])
def test_bad_array_record_embeddings_are_one_line(tiny, text_data, embeddings, tmp_path, case,
                                                  expect, when):
    from diffjax.data import text_source

    with np.load(embeddings[0]) as f:
        rows = [{"context": c, "mask": m} for c, m in zip(f["context"], f["mask"])]
    path = str(tmp_path / "bad.array_record")
    if case == "not_array_record":
        (tmp_path / "bad.array_record").write_bytes(b"not an array record" * 4000)
    elif case == "wrong_rows":
        _write_records(path, rows[:30])
    elif case == "wrong_width":
        _write_records(path, [{**r, "context": r["context"][:, :10]} for r in rows])
    elif case == "too_long":
        _write_records(path, [{"context": np.concatenate([r["context"]] * 2),
                               "mask": np.concatenate([r["mask"]] * 2)} for r in rows])
    elif case == "no_context_column":
        _write_records(path, [{"ctx": r["context"], "mask": r["mask"]} for r in rows])
    elif case == "not_msgpack":
        _write_records(path, [b"\xc1 not msgpack"] * len(rows))
    elif case == "other_length":
        rows[3] = {"context": rows[3]["context"][:4], "mask": rows[3]["mask"][:4]}
        _write_records(path, rows)
    elif case == "empty_row":
        rows[3] = {**rows[3], "mask": np.zeros(LENGTH, bool)}
        _write_records(path, rows)
    with pytest.raises(text_app.data_lib.DataError) as info:
        records = text_source.RecordEmbeddings(path, WIDTH, LENGTH + 1, count=40)
        assert when == "read", "opening should have failed"
        records.read(np.arange(40))
    message = str(info.value)
    assert expect in message and "\n" not in message, message
    if when == "open":  # the command line: one line before any work, the workdir kept
        workdir = tmp_path / "run"
        workdir.mkdir()
        (workdir / "notes.txt").write_text("keep me\n")
        with pytest.raises(text_app.data_lib.DataError, match="bad.array_record"):
            cli.run(_embedding_config(tiny, text_data, path), "train", str(workdir))
        assert sorted(os.listdir(workdir)) in (["config.json", "notes.txt"], ["notes.txt"])


def test_embedding_model_trains_samples_and_guides_against_its_null_row(
        tiny, text_data, embeddings, tmp_path):
    train_npz, prompts_npz = embeddings
    config = _embedding_config(tiny, text_data, train_npz, **{
        "train.num_steps": 2, "train.checkpoint_every": 2, "guidance.scale": 2.0,
        "text.sample_embeddings": prompts_npz, "sampler.num_samples": 8,
        "sampler.thresholding": "none"})
    workdir = str(tmp_path / "run")
    cli.run(config, "train", workdir)
    cli.run(config, "sample", workdir)
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        assert list(f["prompts"]) == ["first"] * 4 + ["second"] * 4
        assert f["context"].shape == (8, LENGTH, WIDTH + 1)
        assert np.isfinite(f["images"]).all()
    exp = experiment.build(config, num_devices=8)
    task, sampling = exp.task, exp.sampling
    params = _perturbed(task.init_params(jax.random.PRNGKey(0)), seed=2)
    with np.load(prompts_npz) as f:
        cond = jnp.asarray(np.concatenate([f["context"], f["mask"][..., None]], -1),
                           jnp.float32)
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    guided, plain = _denoisers(task, sampling, params, guidance_scale=2.0)
    d_c, d_u = plain(x, 2.0, cond), plain(x, 2.0, jnp.zeros_like(cond))
    # float32 outputs of a batch of 2B vs B differ by ~2e-6 relative; the mix 3 d_c - 2 d_u
    # carries five times that
    np.testing.assert_allclose(guided(x, 2.0, cond), d_c + 2.0 * (d_c - d_u), rtol=1e-5,
                               atol=1e-5)
    assert np.abs(d_c - d_u).max() > 1e-3
    # the null row is the learned null sequence, whatever the embeddings under its mask
    noise = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(4), cond.shape[:-1] + (WIDTH,)),
                             jnp.zeros(cond.shape[:-1] + (1,))], -1)
    np.testing.assert_allclose(plain(x, 2.0, noise), d_u, atol=1e-6)


def test_two_processes_with_sharded_state_train_the_text_model_as_one(tiny, text_data,
                                                                     straight, tmp_path):
    """The caption model (its text encoder trained jointly) with its state sharded (fsdp)
    over 2 processes x 1 device: each process builds the same tokenizer from the captions,
    reads its half of each batch and draws the training grids from prompts; the run ends
    where the 1-process run on 2 devices does."""
    workdir = str(tmp_path / "two")
    tiny.run_together(tiny.driver_processes(
        [text_data, workdir, 6, 1, "--text", "--shard-state", "fsdp", "--sample-every", 3], 2))
    with open(os.path.join(workdir, "tokenizer.json")) as f, \
            open(os.path.join(straight, "tokenizer.json")) as g:
        assert json.load(f) == json.load(g)
    two, one = tiny.final_params(workdir), tiny.final_params(straight)
    assert two.keys() == one.keys()
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
        "step_0000003.png", "step_0000006.png"]
