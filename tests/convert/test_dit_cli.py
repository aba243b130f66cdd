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

from diffjax import checkpoint, configlib, experiment
from diffjax.convert import dit as dit_convert

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
    sample = subprocess.run(
        [sys.executable, "-m", "diffjax.main", "--config", CONFIG, "--workdir", str(workdir),
         "--mode", "sample"], cwd=REPO, capture_output=True, check=False, text=True,
        timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert sample.returncode == 0, sample.stderr[-3000:]
    with np.load(workdir / "samples.npz") as f:
        assert f["images"].shape[1:] == (32, 32, 4) and np.all(np.isfinite(f["images"]))


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
