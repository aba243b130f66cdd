"""--mode eval of an autoencoder with fd_<domain>: the Frechet distance of its reconstructions
of the eval split to the split itself in a domain classifier's features (rFID-style)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from diffjax import checkpoint, configlib, experiment, parallel
from diffjax.app import common
from diffjax.app import evaluate as app_evaluate
from diffjax.evaluation import features

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_PATH = os.path.join(REPO, "tests", "train", "tiny.py")
AE = {"model.name": "autoencoder_kl", "model.class_cond": False, "guidance.type": "none",
      "guidance.label_dropout": 0.0, "model.autoencoder.block_out_channels": (8, 16),
      "model.autoencoder.layers_per_block": 1, "model.autoencoder.norm_num_groups": 4,
      "model.autoencoder.latent_channels": 2, "optim.warmup_steps": 0,
      "eval.metrics": ("psnr", "fd_idx"), "eval.batch_size": 24}  # 64 = 24 + 24 + 16 (+8 pad)
CLASSIFIER = {"model.name": "classifier", "model.class_cond": False, "guidance.type": "none",
              "guidance.label_dropout": 0.0, "model.classifier_noised": False,
              "model.pool": "attention", "model.num_head_channels": 32}


def _load_tiny():
    spec = importlib.util.spec_from_file_location("diffjax_tests_tiny_recon_fd", TINY_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _load_tiny()


def _config_file(path, data: str, overrides: dict) -> str:
    """A config file of tiny.config(data, **overrides), as --config takes it."""
    path.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('tiny', {TINY_PATH!r})\n"
        "tiny = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(tiny)\n\n\n"
        f"def get_config(arg=None):\n    return tiny.config({data!r}, **{overrides!r})\n")
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny 8x8 data, a feature classifier run and an autoencoder run (random EMA params)."""
    root = tmp_path_factory.mktemp("recon_fd")
    data = TINY.write_dataset(str(root / "data"))
    mesh = parallel.make_mesh()
    features_config = _config_file(root / "features_config.py", data, CLASSIFIER)
    TINY.save_run(configlib.load_config_file(features_config), str(root / "features"), mesh, 1)
    TINY.save_run(ae_config(root, data), str(root / "ae"), mesh, 2)
    return root, data, mesh, features_config


def ae_config(root, data, **overrides):
    c = TINY.config(data, **AE)
    c.eval.features_config = str(root / "features_config.py")
    c.eval.features_workdir = str(root / "features")
    c.update_from_flattened_dict(overrides)
    return c


def build(config, mesh):
    return experiment.build(config, num_devices=parallel.num_data_shards(mesh), mode="eval")


def frechet64(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of two feature sets [N, D] in float64 with SciPy's sqrtm."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b)
                 - 2 * np.trace(covmean))


def test_fd_of_reconstructions_matches_numpy(runs):
    """fd_idx is the Frechet distance between the features of decode(mean) of every test
    image and those of the test images; PSNR as without fd; the reference is cached."""
    root, data, mesh, _ = runs
    exp = build(ae_config(root, data), mesh)
    [record] = app_evaluate.run(exp, str(root / "ae"), mesh)
    out = root / "ae" / "eval"
    assert json.loads((out / "reconstruction.json").read_text()) == record
    assert set(record["metrics"]) == {"psnr", "psnr_stderr", "fd_idx"}
    assert record["num_examples"] == TINY.NUM_EXAMPLES and record["checkpoint_step"] == 2
    assert (out / "reference_fd_idx_test.npz").exists()

    params, _ = common.restore_params(exp.task, mesh, str(root / "ae"))
    ftask = exp.eval.features.task
    fparams, fstep = common.restore_params(ftask, mesh, str(root / "features"))
    net = features.FeatureNet(ftask.model, ftask.image_shape, fparams, mesh, fstep, 8)
    it, _, _ = app_evaluate.references.eval_batches(exp, mesh, 64)
    x = np.asarray(next(iter(it))["image"], np.float32)[:TINY.NUM_EXAMPLES]
    mean, _ = exp.task.encode(params, x)
    recon = np.clip(np.asarray(exp.task.decode(params, mean), np.float32), -1, 1)
    want = frechet64(net(recon)[0], net(x)[0])
    assert want > 1e-3
    assert record["metrics"]["fd_idx"] == pytest.approx(want, rel=1e-3)
    psnr = 10 * np.log10(4 / ((recon.astype(np.float64) - x) ** 2).mean(axis=(1, 2, 3)))
    assert record["metrics"]["psnr"] == pytest.approx(psnr.mean(), rel=1e-5)

    [psnr_only] = app_evaluate.run(build(ae_config(root, data, **{"eval.metrics": ("psnr",),
                                                                  "eval.name": "psnr_only"}),
                                         mesh), str(root / "ae"), mesh)
    assert set(psnr_only["metrics"]) == {"psnr", "psnr_stderr"}
    assert psnr_only["metrics"]["psnr"] == record["metrics"]["psnr"]


@dataclasses.dataclass(frozen=True)
class _Identity:
    """A stand-in autoencoder whose reconstructions are its inputs."""

    def encode(self, params, x):
        return x, jnp.zeros_like(x)

    def decode(self, params, z):
        return z


def test_perfect_reconstruction_has_zero_fd(runs):
    """Through the same code path, reconstructions equal to the inputs give fd ~ 0."""
    root, data, mesh, _ = runs
    exp = build(ae_config(root, data, **{"eval.metrics": ("fd_idx",), "eval.name": "identity"}),
                mesh)
    exp = dataclasses.replace(exp, task=_Identity())
    [record] = app_evaluate.evaluate_reconstruction(exp, str(root / "ae"), mesh, {}, 2, 0)
    assert set(record["metrics"]) == {"fd_idx"}
    assert abs(record["metrics"]["fd_idx"]) < 1e-4


@pytest.mark.parametrize("overrides, match", [
    ({"eval.metrics": ("fid",)}, "PSNR"),
    ({"eval.metrics": ("fd_fashion_mnist",)}, r"\"fd_idx\""),
    ({"eval.metrics": ()}, "PSNR"),
    ({"eval.features_config": ""}, "need eval.features_config"),
    ({"eval.features_config": os.path.join(REPO, "experiments", "fmnist_features.py:smoke")},
     "classifies 28px"),
], ids=["unknown", "other_domain", "empty", "features_config_missing", "features_size"])
def test_config_errors_are_one_line(runs, overrides, match):
    root, data, mesh, _ = runs
    with pytest.raises(configlib.ConfigError, match=match) as err:
        build(ae_config(root, data, **overrides), mesh)
    assert "\n" not in str(err.value)


def test_features_workdir_checked_before_the_autoencoder_checkpoint(runs, tmp_path):
    """A missing feature run is reported first (one line), even with no autoencoder run."""
    root, data, mesh, _ = runs
    exp = build(ae_config(root, data, **{"eval.features_workdir": str(tmp_path / "none")}),
                mesh)
    with pytest.raises(checkpoint.CheckpointError, match="no trained feature classifier") as err:
        app_evaluate.run(exp, str(tmp_path / "no_ae_run"), mesh)
    assert "\n" not in str(err.value)
