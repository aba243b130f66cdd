"""model.name = "autoencoder_kl": the AutoencoderTask through the Experiment, the trainer,
--mode eval (reconstruction PSNR), --mode summary and python -m diffjax.convert."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from diffjax import checkpoint, configlib, experiment, parallel
from diffjax.app import evaluate as app_evaluate
from diffjax.app import summary
from diffjax.convert import autoencoder_kl
from diffjax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AE = {"model.name": "autoencoder_kl", "model.class_cond": False, "guidance.type": "none",
      "guidance.label_dropout": 0.0, "model.autoencoder.block_out_channels": (8, 16),
      "model.autoencoder.layers_per_block": 1, "model.autoencoder.norm_num_groups": 4,
      "model.autoencoder.latent_channels": 2, "optim.warmup_steps": 0,
      "eval.metrics": ("psnr",), "eval.batch_size": 16}


def _exp(tiny, tiny_data, **overrides):
    return experiment.build(tiny.config(tiny_data, **{**AE, **overrides}))


def test_sd_vae_config_has_diffusers_count():
    exp = experiment.build(configlib.load_config_file(
        os.path.join(REPO, "experiments", "autoencoder_sd_vae.py")))
    assert summary.param_count(exp) == 83_653_863
    assert exp.task.latent_shape == (32, 32, 4)


def test_loss_is_recon_plus_weighted_kl(tiny, tiny_data):
    """The loss against NumPy: per-pixel L1 (or L2) of decode(mean) plus kl_weight times the
    KL of N(mean, exp(logvar)) from N(0, I) summed over the latent, per pixel."""
    for recon_loss, weight in (("l1", 0.5), ("l2", 1e-3)):
        exp = _exp(tiny, tiny_data, **{"model.autoencoder.sample_posterior": False,
                                       "model.autoencoder.recon_loss": recon_loss,
                                       "model.autoencoder.kl_weight": weight})
        task = exp.task
        params = task.init_params(jax.random.PRNGKey(0))
        x = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
        loss, (terms, _) = task.loss_fn()(params, None, {"image": x}, jax.random.PRNGKey(1))
        recon, mean, logvar = (np.asarray(a, np.float64) for a in task.forward(params, x))
        diff = recon - x
        rec = (np.abs(diff) if recon_loss == "l1" else diff**2).mean(axis=(1, 2, 3))
        kl = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).sum(axis=(1, 2, 3)) / 64
        assert float(np.abs(kl).max()) > 1e-3
        np.testing.assert_allclose(terms["recon"], rec, rtol=1e-5)
        np.testing.assert_allclose(terms["kl"], kl, rtol=1e-4)
        np.testing.assert_allclose(loss, np.mean(rec + weight * kl), rtol=1e-5)


def test_trains_and_evaluates(tiny, tiny_data, tmp_path):
    """Steps of the trainer lower the loss; --mode eval writes the PSNR of decode(mean) over
    the test split and the input | reconstruction grid."""
    exp = _exp(tiny, tiny_data, **{"optim.learning_rate": 3e-3})
    mesh = parallel.make_mesh(jax.devices()[:1])
    trainer = loop.Trainer(exp.task, exp.optim, exp.train, mesh)
    state = trainer.new_state()
    it, _, _ = app_evaluate.references.eval_batches(exp, mesh, 8)
    batch = {"image": np.asarray(next(iter(it))["image"], np.float32),
             "label": np.zeros(8, np.int32)}
    losses = []
    for _ in range(40):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses[::8]
    params = jax.device_get(state.params)
    [record] = app_evaluate.evaluate_reconstruction(exp, str(tmp_path), mesh, params, 12, 0)
    out = tmp_path / "eval"
    assert json.loads((out / "reconstruction.json").read_text()) == record
    assert (out / "reconstruction.png").stat().st_size > 0
    assert record["num_examples"] == tiny.NUM_EXAMPLES and record["split"] == "test"
    it, _, _ = app_evaluate.references.eval_batches(exp, mesh, 64)
    x = np.asarray(next(iter(it))["image"], np.float32)[:tiny.NUM_EXAMPLES]
    mean, _ = exp.task.encode(params, x)
    recon = np.clip(np.asarray(exp.task.decode(params, mean), np.float64), -1, 1)
    psnr = 10 * np.log10(4 / ((recon - x) ** 2).mean(axis=(1, 2, 3)))
    assert record["metrics"]["psnr"] == pytest.approx(psnr.mean(), rel=1e-5)


@pytest.mark.parametrize("overrides, match", [
    ({"guidance.type": "classifier_free", "guidance.label_dropout": 0.1,
      "model.class_cond": True}, "takes no labels, guidance or condition"),
    ({"model.autoencoder.block_out_channels": (8, 16, 16, 16, 16)}, "not divisible"),
    ({"model.autoencoder.block_out_channels": (6, 16)}, "multiples of norm_num_groups"),
    ({"model.autoencoder.recon_loss": "l3"}, "recon_loss='l3' is not a valid choice"),
])
def test_config_errors(tiny, tiny_data, overrides, match):
    with pytest.raises(configlib.ConfigError, match=match) as err:
        _exp(tiny, tiny_data, **overrides)
    assert "\n" not in str(err.value)


def test_eval_metrics_and_sample_mode_errors(tiny, tiny_data):
    c = tiny.config(tiny_data, **{**AE, "eval.metrics": ("fid",)})
    with pytest.raises(configlib.ConfigError, match="an autoencoder is evaluated by the PSNR"):
        experiment.build(c, mode="eval")


def test_convert_cli_writes_a_run_of_diffusers_weights(tiny, tiny_data, tmp_path):
    """A diffusers-named VAE state dict through python -m diffjax.convert: the restored EMA
    params equal the tensors (conv OIHW -> HWIO, Linear [O, I] -> [I, O])."""
    config_path = tmp_path / "ae_config.py"
    overrides = {**AE, "data.path": tiny_data}
    config_path.write_text(
        "import importlib.util, os\n"
        f"spec = importlib.util.spec_from_file_location('tiny', {os.path.join(REPO, 'tests', 'train', 'tiny.py')!r})\n"  # noqa: E501
        "tiny = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(tiny)\n\n\n"
        f"def get_config(arg=None):\n    return tiny.config({tiny_data!r}, **{overrides!r})\n")
    task = experiment.build(configlib.load_config_file(str(config_path))).task
    abstract = task.abstract_params()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)
    state_dict = {}
    for name, path in autoencoder_kl.diffusers_names(abstract).items():
        leaf = params
        for part in path:
            leaf = leaf[part]
        if leaf.ndim == 4:
            leaf = leaf.transpose(3, 2, 0, 1)
        elif leaf.ndim == 2:
            leaf = leaf.T
        state_dict[name] = np.ascontiguousarray(leaf)
    ckpt = str(tmp_path / "vae.safetensors")
    safetensors.numpy.save_file(state_dict, ckpt)
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "diffjax.convert", "--config", str(config_path), "--checkpoint",
         ckpt, "--workdir", str(workdir)], cwd=REPO, capture_output=True, text=True,
        timeout=600, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    restored, step = checkpoint.restore_ema_params(str(workdir), abstract)
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), params)
