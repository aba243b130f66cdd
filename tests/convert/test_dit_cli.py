"""``python -m diffjax.convert`` with a DiT config: a DiT state dict (facebookresearch's tensor
names and layouts) becomes a step-0 run that inference restores exactly and ``--mode
sample`` samples from; the wrong architecture is one line and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import safetensors.numpy

from diffjax import checkpoint, configlib, experiment, parallel
from diffjax.convert import dit as dit_convert
from diffjax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "experiments/dit_xl2_imagenet256.py:smoke"


def _state_dict(abstract, seed=0) -> tuple[dict, dict]:
    """(random diffjax params, the same as a DiT .pt state dict: Linear [O, I], conv OIHW)."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(np.float32),
                          abstract)
    out = {}
    for name, path in dit_convert.torch_names(abstract).items():
        leaf = params
        for part in path:
            leaf = leaf[part]
        out[name] = (leaf.T if leaf.ndim == 2 and path[-1] == "kernel"
                     else leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else leaf)
    return params, {k: np.ascontiguousarray(v) for k, v in out.items()}


def _convert(config: str, ckpt: str, workdir: str):
    return subprocess.run(
        [sys.executable, "-m", "diffjax.convert", "--config", config, "--checkpoint", ckpt,
         "--workdir", workdir], cwd=REPO, capture_output=True, text=True, timeout=600,
        check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_converts_a_dit_and_samples(tmp_path):
    c = configlib.load_config_file(os.path.join(REPO, "experiments/dit_xl2_imagenet256.py"),
                                   "smoke")
    task = experiment.build(c).task
    params, state_dict = _state_dict(task.abstract_params())
    ckpt = str(tmp_path / "dit.safetensors")
    safetensors.numpy.save_file(state_dict, ckpt)
    workdir = tmp_path / "run"
    out = _convert(CONFIG, ckpt, str(workdir))
    assert out.returncode == 0, out.stderr[-3000:]
    restored, step = checkpoint.restore_ema_params(str(workdir), task.abstract_params())
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), params)
    # the VAE (data.latent) in the smoke geometry: 32x32 images <-> 4x4x4 latents, a tiny
    # autoencoder of the same factor 8 and random weights
    vae_config = tmp_path / "vae.py"
    vae_config.write_text(VAE_CONFIG)
    vae = str(tmp_path / "vae")
    _save_vae(configlib.load_config_file(str(vae_config)), vae)
    sample = subprocess.run(
        [sys.executable, "-m", "diffjax.main", "--config", CONFIG, "--workdir", str(workdir),
         "--mode", "sample", f"--config.data.latent.config={vae_config}",
         f"--config.data.latent.workdir={vae}"], cwd=REPO, capture_output=True, check=False,
        text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert sample.returncode == 0, sample.stderr[-3000:]
    with np.load(workdir / "samples.npz") as f:  # decoded: images
        images = f["images"]
    assert images.shape[1:] == (32, 32, 3) and np.all(np.abs(images) <= 1.0)
    assert images.std() > 1e-3


VAE_CONFIG = """
from diffjax import configlib


def get_config(arg=None):
    c = configlib.base_config()
    c.model.name = "autoencoder_kl"
    c.model.class_cond = False
    c.data.image_size, c.data.channels, c.data.num_classes = 32, 3, 0
    c.model.autoencoder.block_out_channels = (8, 8, 8, 8)
    c.model.autoencoder.layers_per_block = 1
    c.model.autoencoder.norm_num_groups = 4
    return c
"""


def _save_vae(c, workdir: str) -> None:
    """A run of ``c`` with random EMA parameters (as the trainer leaves it, not trained)."""
    exp = experiment.build(c)
    mesh = parallel.make_mesh()
    abstract = loop.Trainer(exp.task, exp.optim, exp.train, mesh).abstract_state()
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    ema = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(x.dtype),
                       abstract.ema_params)
    state = state.replace(ema_params=ema)
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(workdir), async_save=False)
    checkpoint.save(manager, 1, state, None, c.to_dict())
    manager.wait_until_finished()


def test_cli_refuses_another_depth_and_writes_nothing(tmp_path):
    c = configlib.load_config_file(os.path.join(REPO, "experiments/dit_xl2_imagenet256.py"),
                                   "smoke")
    c.model.dit.depth = 3
    _, state_dict = _state_dict(experiment.build(c).task.abstract_params())
    ckpt = str(tmp_path / "deeper.safetensors")
    safetensors.numpy.save_file(state_dict, ckpt)
    out = _convert(CONFIG, ckpt, str(tmp_path / "run"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("diffjax: error: ") and "blocks.2" in lines[-1]
    assert "depth" in lines[-1] and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()
