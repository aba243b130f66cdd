r"""Converts a released checkpoint (guided-diffusion, improved-diffusion, DiT, SD's VAE and
UNet) into a diffjax run.

    python -m diffjax.convert --config experiments/imagenet64.py \
        --checkpoint 64x64_diffusion.pt --workdir runs/adm64
    python -m diffjax.main --config experiments/imagenet64.py --workdir runs/adm64 --mode sample

Builds the config's Experiment, reads the file without torch (nothing in it is executed),
converts every tensor (:func:`diffjax.convert.load_checkpoint`: the converter of the
config's network) and writes a step-0
checkpoint into ``WORKDIR/checkpoints`` (the trainer's fresh state with params and every EMA
copy equal to the converted weights, so ``--mode sample`` / ``--mode eval`` read them as is,
and ``--mode train`` fine-tunes from them) and ``WORKDIR/config.json``. Any error is one
line ``diffjax: error: ...`` with exit status 2, and then nothing has been written: the
conversion is complete before the workdir is touched. Like ``diffjax.main`` this is an entry
point: the only places that read flags and config files.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from diffjax import checkpoint, experiment, parallel
from diffjax.convert import load_checkpoint, torch_file
from diffjax.errors import ConfigError
from diffjax.train.loop import Trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file (path.py[:variant]) of the checkpoint's architecture.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Released weight file (.pt, .pth or "
                                  ".safetensors) of the config's architecture.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to create (must hold no "
                               "checkpoints yet).")
_KEY = flags.DEFINE_string("key", None, "Entry of the file holding the state dict, when it "
                           "holds several (e.g. 'ema').")

_ERRORS = (ConfigError, torch_file.WeightFileError, checkpoint.CheckpointError,
           FileNotFoundError)


def _fail(message: str) -> None:
    print(f"diffjax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _check_workdir(workdir: str) -> None:
    ckpt = epath.Path(checkpoint.checkpoint_dir(workdir))
    if ckpt.exists() and any(ckpt.iterdir()):
        raise ConfigError(f"{ckpt} already holds checkpoints; convert into a fresh --workdir")


def convert(config, checkpoint_path: str, workdir: str, key: str | None = None) -> int:
    """Converts ``checkpoint_path`` for ``config`` (a ConfigDict) into ``workdir``; returns
    the number of parameters. Raises the one-line user errors before writing anything."""
    mesh = parallel.make_mesh()
    # mode "convert": the checks of "sample", but a model it cannot sample yet (a
    # context-conditioned UNet) converts too
    exp = experiment.build(config, num_devices=parallel.num_data_shards(mesh), mode="convert")
    _check_workdir(workdir)
    params = load_checkpoint(checkpoint_path, exp, key)
    params = jax.device_put(params, parallel.replicated(mesh))
    state = Trainer(exp.task, exp.optim, exp.train, mesh).new_state()
    state = state.replace(params=params, ema_params=tuple(params for _ in state.ema_params))
    # Everything is converted and placed: only now is the workdir created.
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(workdir), async_save=False)
    try:
        checkpoint.save(manager, 0, state, None, exp.resolved, force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    if jax.process_index() == 0:
        (epath.Path(workdir) / "config.json").write_text(
            json.dumps(exp.resolved, indent=2, default=str))
    return sum(int(x.size) for x in jax.tree.leaves(params))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags are --config, --checkpoint, --workdir")
    for name, flag in (("config", _CONFIG), ("checkpoint", _CHECKPOINT), ("workdir", _WORKDIR)):
        if not flag.value:
            _fail(f"--{name} is required: python -m diffjax.convert --config experiments/X.py "
                  "--checkpoint FILE.pt --workdir DIR")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        count = convert(_CONFIG.value, _CHECKPOINT.value, _WORKDIR.value, _KEY.value)
    except _ERRORS as e:
        _fail(str(e))
    print(f"converted {_CHECKPOINT.value} ({count:,} parameters) into "
          f"{checkpoint.checkpoint_dir(_WORKDIR.value)} (step 0)")


if __name__ == "__main__":
    app.run(main)
