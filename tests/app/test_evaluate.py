"""--mode eval end to end on 2-step smoke models: JSONs, grids, sweep plot, refusals."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from diffjax import checkpoint, configlib, experiment, generate, parallel
from diffjax.app import common, references
from diffjax.app import evaluate as app_evaluate
from diffjax.data import DataError, idx
from diffjax.evaluation import features, likelihood, metrics, sample_metrics
from launch import collect

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FEATURES = os.path.join(REPO, "experiments", "fmnist_features.py:smoke")
NUM_TEST = 40


def write_fashion_like(directory: str) -> str:
    """28x28 IDX files with 10 classes (class = stripe frequency), 48 train / 40 test images."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28] / 27
    for prefix, n in (("train", 48), ("t10k", NUM_TEST)):
        labels = np.arange(n) % 10
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        images = 0.5 + 0.45 * np.sin(2 * np.pi * (1 + labels[:, None, None]) * xx / 3 + phase
                                     + yy)
        TINY.write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"),
                   np.round(images * 255))
        TINY.write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return directory


def read_test_split(data: str) -> tuple[np.ndarray, np.ndarray]:
    """The NUM_TEST test images of write_fashion_like in [-1, 1] and their labels."""
    images, labels = idx.IdxSource(data, "test", num_classes=10, name="idx").read_batch(
        np.arange(NUM_TEST))
    return images.astype(np.float32) / 127.5 - 1, labels


def build(config, mesh, mode="eval"):
    return experiment.build(config, num_devices=parallel.num_data_shards(mesh), mode=mode)


def evaluate(config, workdir, mesh, **kwargs):
    """--mode eval of a config: built (checked) for eval, then run."""
    return app_evaluate.run(build(config, mesh), workdir, mesh, **kwargs)


def _load_tiny():
    spec = importlib.util.spec_from_file_location(
        "diffjax_tests_tiny_eval", os.path.join(REPO, "tests", "train", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _load_tiny()
save_run = TINY.save_run  # random EMA parameters at step 2, nothing compiled


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fashion_mnist :smoke run and an fmnist_features :smoke classifier run (see save_run)."""
    root = tmp_path_factory.mktemp("eval")
    data = write_fashion_like(str(root / "data"))
    mesh = parallel.make_mesh()
    fc = configlib.load_config_file(FEATURES)
    fc.data.path = data
    save_run(fc, str(root / "features"), mesh, 1)
    c = configlib.load_config_file(os.path.join(REPO, "experiments", "fashion_mnist.py:smoke"))
    c.data.path = data
    save_run(c, str(root / "sweep" / "run0"), mesh, 2)
    return root, data, mesh


@pytest.fixture(scope="module")
def net(trained):
    root, _, mesh = trained
    task = experiment.load(FEATURES).task
    params, step = common.restore_params(task, mesh, str(root / "features"))
    return features.FeatureNet(task.model, task.image_shape, params, mesh, step, 8)


def eval_config(root, data, **overrides):
    c = configlib.load_config_file(os.path.join(REPO, "experiments", "fashion_mnist.py:smoke"))
    c.data.path = data
    c.eval.features_config = FEATURES
    c.eval.features_workdir = str(root / "features")
    c.eval.metrics = ("fd_fashion_mnist", "class_accuracy", "nll")
    c.eval.num_samples = 16
    c.eval.batch_size = 8
    c.eval.nll_num_examples = 6
    c.sampler.num_steps = 2
    c.update_from_flattened_dict(overrides)
    return c


def test_eval_sweep_writes_jsons_grids_and_plot(trained):
    root, data, mesh = trained
    workdir = root / "sweep" / "run0"
    c = eval_config(root, data, **{"eval.sweep_guidance_scales": (1.0, 3.0)})
    records = evaluate(c, str(workdir), mesh, seed=0)
    names = [r["name"] for r in records]
    assert names == ["ddim-2_cfg-1.0", "ddim-2_cfg-3.0"]
    out = workdir / "eval"
    for r in records:
        on_disk = json.loads((out / f"{r['name']}.json").read_text())
        assert on_disk == r
        assert (out / f"{r['name']}.png").stat().st_size > 0
        assert r["sampler"] == "ddim" and r["num_steps"] == 2 and r["nfe"] == 2
        assert r["checkpoint_step"] == 2 and r["wall_time_s"] > 0
        assert r["settings"] == {"nll_clip_denoised": True}
        m = r["metrics"]
        assert set(m) == {"fd_fashion_mnist", "class_accuracy", "nll_bpd", "nll_bpd_stderr"}
        assert m["fd_fashion_mnist"] > 0 and math.isfinite(m["fd_fashion_mnist"])
        assert round(m["class_accuracy"] * 16) == pytest.approx(m["class_accuracy"] * 16)
        assert 0 < m["nll_bpd"] < math.inf and 0 < m["nll_bpd_stderr"] < m["nll_bpd"]
    assert [r["guidance"] for r in records] == [{"type": "classifier_free", "scale": 1.0},
                                                 {"type": "classifier_free", "scale": 3.0}]
    assert records[0]["metrics"]["nll_bpd"] == records[1]["metrics"]["nll_bpd"]
    assert records[0]["metrics"]["fd_fashion_mnist"] != records[1]["metrics"]["fd_fashion_mnist"]
    assert (out / "sweep_vs_guidance_scale.png").stat().st_size > 0
    assert (out / "reference_fd_fashion_mnist_test.npz").exists()

    (root / "sweep" / "run0" / "sweep_run.json").write_text(json.dumps({"name": "run0",
                                                                         "axes": {}}))
    rows, _, _ = collect.gather(root / "sweep")
    assert sorted(r["eval"] for r in rows) == names
    assert {r["guidance_scale"] for r in rows} == {1.0, 3.0}
    assert all(r["metric/nll_bpd"] == records[0]["metrics"]["nll_bpd"] for r in rows)


def test_nll_alone_draws_no_samples_and_writes_one_json(trained, tmp_path, monkeypatch):
    """eval.metrics=("nll",): the bits/dim of run0 (read through --checkpoint) equal a direct
    references.nll call with the same key, and the sampler is never built."""
    root, data, mesh = trained

    def no_sampling(*args, **kwargs):
        raise AssertionError("an nll-only eval drew samples")

    monkeypatch.setattr(generate, "Generator", no_sampling)
    seen = []
    make_nll_fn = likelihood.make_nll_fn
    monkeypatch.setattr(likelihood, "make_nll_fn",
                        lambda *a, **kw: seen.append(kw["clip_denoised"]) or make_nll_fn(*a, **kw))
    c = eval_config(root, data, **{"eval.metrics": ("nll",)})
    workdir = tmp_path / "nll_only"
    [record] = evaluate(c, str(workdir), mesh, checkpoint=str(root / "sweep" / "run0"), seed=0)
    assert json.loads((workdir / "eval" / "nll.json").read_text()) == record
    assert sorted(p.name for p in (workdir / "eval").iterdir()) == ["nll.json"]
    assert record["name"] == "nll" and record["split"] == "test"
    assert record["num_examples"] == 6 and record["checkpoint_step"] == 2
    assert record["settings"] == {"nll_clip_denoised": True} and seen == [True]  # as ADM
    exp = build(c, mesh)
    params, _ = common.restore_params(exp.task, mesh, str(root / "sweep" / "run0"))
    direct = references.nll(exp, mesh, params, jax.random.fold_in(jax.random.PRNGKey(0), 1))
    assert record["metrics"] == {"nll_bpd": direct.bpd, "nll_bpd_stderr": direct.stderr}


def test_data_against_its_own_reference_has_zero_fd(trained, net):
    """The eval split pushed through the sample path gives FD 0 against the cached reference
    (same network, same features up to float32 batching) and the classifier's accuracy."""
    root, data, mesh = trained
    exp = build(eval_config(root, data), mesh)
    ref = references.fd_reference(exp, mesh, net, root / "fd_ref")
    images, labels = read_test_split(data)
    got = sample_metrics.sample_metrics(("fd_fashion_mnist", "class_accuracy"), images, labels,
                                        domain="fashion_mnist", net=net, fd_ref=ref,
                                        inception_params=None, inception_ref=None, mesh=mesh,
                                        batch_size=16)
    feats, logits = net(images)
    scale = np.trace(ref.sigma)
    assert got["fd_fashion_mnist"] < 1e-5 * scale, (got, scale)
    assert got["class_accuracy"] == np.mean(np.argmax(logits, -1) == labels)
    assert metrics.frechet_distance(metrics.GaussianStats.from_features(feats[: NUM_TEST // 2]),
                                    ref) > 1e-3 * scale
    cached = references.fd_reference(exp, mesh, net, root / "fd_ref")  # read back from cache
    np.testing.assert_array_equal(cached.sigma, ref.sigma)


def test_penultimate_features_are_the_input_of_the_last_projection(net):
    x = np.asarray(jax.random.uniform(jax.random.key(0), (8, 28, 28, 1), minval=-1, maxval=1))
    feats, logits = net(x)
    head = jax.device_get(net._params)["out_pool"]["c_proj"]
    np.testing.assert_allclose(feats @ head["kernel"] + head["bias"], logits, rtol=1e-4,
                               atol=1e-5)
    assert feats.shape == (8, net.model.model_channels * 2)


@pytest.mark.parametrize("overrides, error, message", [
    ({"condition.type": "superres", "condition.low_res_size": 14, "guidance.type": "none"},
     configlib.ConfigError, "a superres model needs a "),
    ({"eval.metrics": ("fd_mnist",)}, configlib.ConfigError,
     "unknown metric(s) ['fd_mnist']; valid: fd_fashion_mnist, class_accuracy, nll, "
     "brightness, fid"),
    ({"eval.metrics": ("fid",), "eval.inception_weights": "/nowhere/inception.npz"},
     configlib.ConfigError, "need Inception weights: eval.inception_weights='/nowhere"),
    ({"eval.features_workdir": "/nowhere/fmnist_features"}, checkpoint.CheckpointError,
     "train it with `python -m diffjax.main --config "),
    ({"eval.split": "validation"}, DataError, "validation"),
    ({"model.class_cond": False, "guidance.type": "none", "eval.metrics": ("class_accuracy",)},
     configlib.ConfigError, "class_accuracy needs a class-conditional model"),
])
def test_errors_come_before_reading_the_checkpoint(trained, tmp_path, overrides, error,
                                                   message):
    root, data, mesh = trained
    c = eval_config(root, data, **overrides)
    with pytest.raises(error) as info:
        evaluate(c, str(tmp_path / "no_run"), mesh)  # no checkpoints there either
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "no_run").exists()


def test_main_prints_one_line_for_a_bad_metric(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, "-m", "diffjax.main", "--config", "experiments/fashion_mnist.py:smoke",
         "--workdir", str(tmp_path / "run"), "--mode", "eval", "--config.eval.metrics=('fdd',)"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    lines = [x for x in out.stderr.splitlines() if x.startswith("diffjax: error")]
    assert len(lines) == 1 and "unknown metric(s) ['fdd']" in lines[0], out.stderr[-2000:]


def test_inception_metrics_match_a_direct_computation(trained, tmp_path):
    """sfid/IS/precision-recall/KID through the eval path (reference from the data's eval
    split, sharded activations) vs compute_activations on one device and metrics.py; the FID
    reference statistics vs the direct ones, and FID's dispatch on small made-up features
    (a 2048-d Frechet distance costs ~10 s here). Random Inception weights at a 75 px input
    keep it fast; the pipeline is the one of the 299 px metrics."""
    from diffjax.evaluation import convert_inception, inception

    root, data, mesh = trained
    params = inception.init_params(jax.random.key(1))
    convert_inception.save_inception_params(params, str(tmp_path / "w.npz"))
    names = ("sfid", "inception_score", "precision_recall", "kid")
    c = eval_config(root, data, **{"eval.metrics": ("fid", *names), "eval.inception_size": 75,
                                   "eval.inception_weights": str(tmp_path / "w.npz")})
    exp = build(c, mesh)
    app_evaluate.check_files(exp)
    ref = references.inception_reference(exp, mesh, params, tmp_path)
    images, labels = read_test_split(data)
    got = sample_metrics.sample_metrics(names, images[:16], labels[:16], domain="fashion_mnist",
                                        net=None, fd_ref=None, inception_params=params,
                                        inception_ref=ref, mesh=mesh, batch_size=8,
                                        inception_size=75)
    acts_ref, acts = (inception.compute_activations(params, x, batch_size=8, size=75,
                                                    progress=False)
                      for x in (images, images[:16]))
    stats = metrics.GaussianStats.from_features
    direct = stats(acts_ref["pool"])
    np.testing.assert_allclose(ref["mu"], direct.mu, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ref["sigma"], direct.sigma, rtol=1e-4, atol=1e-7)
    assert got["sfid"] == pytest.approx(metrics.frechet_distance(
        stats(acts["spatial"]), stats(acts_ref["spatial"])), rel=1e-4)
    assert got["inception_score"] == pytest.approx(
        metrics.inception_score(acts["logits_unbiased"]), rel=1e-5)
    assert (got["precision"], got["recall"]) == metrics.precision_recall(acts_ref["pool"],
                                                                         acts["pool"])
    assert got["kid"] == pytest.approx(metrics.kernel_inception_distance(
        acts_ref["pool"], acts["pool"])[0], rel=1e-3)
    small = np.random.default_rng(3).normal(size=(16, 6))
    small_ref = stats(small[:8] * 2 + 1)
    fid = sample_metrics.inception_metrics(("fid",), {"pool": small},
                                           {"mu": small_ref.mu, "sigma": small_ref.sigma})
    assert fid == {"fid": metrics.frechet_distance(stats(small), small_ref)}


def test_classifier_guidance_loads_the_trained_classifier_as_a_program_argument(trained):
    """Classifier guidance from a saved classifier run: log p(y | x_t) at the classifier's
    own timesteps (x_ve / sqrt(1 + sigma^2), t of sigma), and the sampling program takes the
    classifier's parameters as an argument, with the samples of the closed-over form."""
    import dataclasses
    import functools

    root, data, mesh = trained
    cls_config = os.path.join(REPO, "experiments", "classifier_fashion_mnist.py:smoke")
    cc = configlib.load_config_file(cls_config)
    cc.data.path = data
    save_run(cc, str(root / "classifier"), mesh, 3)
    c = eval_config(root, data, **{"guidance.type": "classifier", "guidance.scale": 4.0,
                                   "guidance.classifier_config": cls_config,
                                   "guidance.classifier_workdir": str(root / "classifier")})
    exp = build(c, mesh)
    cls_task = exp.sampling.guidance.classifier
    cls_params = common.classifier_params(exp.sampling, mesh)
    log_prob = functools.partial(cls_task.log_prob, cls_params)

    ds = cls_task.schedule
    params, _ = common.restore_params(cls_task, mesh, str(root / "classifier"))
    t = np.array([0, 3, cc.diffusion.num_timesteps // 2, cc.diffusion.num_timesteps - 1])
    sigma = np.asarray(ds.sigmas)[t]
    x_ve = np.asarray(jax.random.normal(jax.random.key(1), (4, 28, 28, 1))) * np.sqrt(1 + sigma**2)[
        :, None, None, None]
    y = np.array([0, 3, 5, 9])
    logits = cls_task.model.apply({"params": params},
                                  x_ve / np.sqrt(1 + sigma**2)[:, None, None, None],
                                  t.astype(np.float32), train=False)  # the trainer's time input
    want = np.asarray(jax.nn.log_softmax(logits))[np.arange(4), y]
    np.testing.assert_allclose(log_prob(x_ve, sigma, y), want, rtol=1e-4, atol=1e-4)

    diff_params, _ = common.restore_params(exp.task, mesh, str(root / "sweep" / "run0"))
    fn = generate.make_sample_program(exp.task, exp.sampling, mesh, 8, False)
    key, labels = jax.random.key(2), np.arange(8) % 10
    knobs = exp.sampling.knobs()
    (_, cls_arg, *_), _ = fn.lower(diff_params, cls_params, None, key, labels, None, knobs).args_info
    assert len(jax.tree.leaves(cls_arg)) == len(jax.tree.leaves(cls_params)) > 0
    g = exp.sampling.guidance
    closed_guidance = dataclasses.replace(g, classifier=None,
                                          static={"log_prob_fn": log_prob})
    closed = generate.make_sample_program(
        exp.task, dataclasses.replace(exp.sampling, guidance=closed_guidance), mesh, 8, False)
    guided = np.asarray(fn(diff_params, cls_params, None, key, labels, None, knobs))
    # The same float32 math compiled with the parameters as constants or as an argument:
    # XLA folds and fuses differently, rounding differences of ~1e-4 at most in [-1, 1].
    np.testing.assert_allclose(guided, np.asarray(closed(diff_params, None, None, key, labels, None,
                                                         knobs)), atol=5e-4)
    plain = np.asarray(fn(diff_params, cls_params, None, key, labels, None,
                          exp.sampling.knobs(guidance_scale=0.0)))
    assert np.abs(guided - plain).mean() > 1e-2


def test_classifier_run_eval_reports_test_accuracy(trained, net, tmp_path):
    """--mode eval of a classifier run: accuracy on the eval split equals the feature net's own
    argmax on the test images; a noise-aware classifier is scored at 0, T/4, T/2, 3T/4."""
    root, data, mesh = trained
    fc = configlib.load_config_file(FEATURES)
    fc.data.path = data
    fc.eval.batch_size = 16  # 40 test images: the last batch is padded
    [record] = evaluate(fc, str(tmp_path / "features_eval"), mesh,
                        checkpoint=str(root / "features"))
    images, labels = read_test_split(data)
    _, logits = net(images)
    want = float(np.mean(np.argmax(logits, -1) == labels))
    assert record["metrics"] == {"accuracy_t0": want, "accuracy": want}
    assert record["num_examples"] == NUM_TEST and record["checkpoint_step"] == 2
    on_disk = tmp_path / "features_eval" / "eval" / "accuracy.json"
    assert json.loads(on_disk.read_text()) == record

    cc = configlib.load_config_file(os.path.join(REPO, "experiments",
                                                 "classifier_fashion_mnist.py:smoke"))
    t_max = cc.diffusion.num_timesteps - 1
    assert app_evaluate.classifier_timesteps(experiment.build(cc).task) == tuple(
        round(f * t_max) for f in (0, 0.25, 0.5, 0.75))
    assert app_evaluate.classifier_timesteps(experiment.build(fc).task) == (0,)


def _counting(monkeypatch, name):
    """Replaces sampler ``name`` in the samplers table by a wrapper counting its traces."""
    import functools

    from diffjax.diffusion import samplers

    original, calls = samplers.SAMPLERS[name], []

    @functools.wraps(original)
    def counted(*args, **kwargs):
        calls.append(1)  # runs once per trace of the sampling program
        return original(*args, **kwargs)

    monkeypatch.setitem(samplers.SAMPLERS, name, counted)
    return calls


def test_a_sweep_over_guidance_scales_traces_the_sampler_once(trained, monkeypatch):
    root, data, mesh = trained
    calls = _counting(monkeypatch, "ddim")
    c = eval_config(root, data, **{"eval.sweep_guidance_scales": (0.0, 1.5, 4.0),
                                   "eval.metrics": ("class_accuracy",)})
    records = evaluate(c, str(root / "sweep" / "run0"), mesh, seed=0)
    assert [r["guidance"]["scale"] for r in records] == [0.0, 1.5, 4.0]
    assert len(calls) == 1
    out = root / "sweep" / "run0" / "eval"
    grids = [np.asarray(Image.open(out / f"{r['name']}.png")) for r in records]
    assert all(np.abs(g.astype(int) - grids[0]).max() > 0 for g in grids[1:])  # scales applied


def test_sampling_twice_with_other_knobs_compiles_once(trained, tmp_path, monkeypatch):
    """--mode sample twice in one process, another guidance scale and eta: one trace; the
    knobs reach the program (the samples differ) and an unset eta is the sampler's own."""
    from diffjax.app import sample as app_sample

    root, data, mesh = trained
    calls = _counting(monkeypatch, "euler_ancestral")
    run = str(root / "sweep" / "run0")

    def draw(**overrides):
        c = eval_config(root, data, **{"sampler.name": "euler_ancestral", **overrides})
        images, _ = app_sample.run(build(c, mesh, mode="sample"), str(tmp_path / "out"), mesh,
                                   checkpoint=run, seed=0)
        return images

    base = draw()
    assert len(calls) == 1
    np.testing.assert_array_equal(draw(**{"sampler.eta": 1.0}), base)  # its default
    assert np.abs(draw(**{"sampler.eta": 0.5}) - base).max() > 1e-2
    assert np.abs(draw(**{"guidance.scale": 3.0}) - base).max() > 1e-2
    assert len(calls) == 1
