r"""diffjax's command line: the only module with flags.

    python -m diffjax.main --config experiments/fashion_mnist.py --workdir runs/fmnist
    python -m diffjax.main --config experiments/imagenet64.py --mode summary
    python -m diffjax.main --config experiments/fashion_mnist.py --workdir runs/fmnist \
        --mode sample --seed 3 --config.sampler.name=dpmpp_2m --config.sampler.num_steps=25

Modes: ``train`` (resumes automatically from WORKDIR/checkpoints), ``sample`` (writes
``samples.npz`` and a PNG grid from the latest or ``--checkpoint_step`` checkpoint),
``eval`` (samples and metrics into WORKDIR/eval/), ``summary`` (resolved config, device
mesh and parameter count, nothing allocated). Any config field can be overridden with
``--config.section.field=value``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffjax import experiment, parallel
from diffjax.app import common
from diffjax.app import evaluate as app_evaluate
from diffjax.app import sample as app_sample
from diffjax.app import summary as app_summary
from diffjax.app import train as app_train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (path.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "summary"], "What to do.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "sample/eval: read params from this run's workdir or checkpoints dir "
    "(read-only) instead of WORKDIR's own.")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None, "Step to load; default latest.")
_SEED = flags.DEFINE_integer("seed", None, "sample/eval: sampling seed (default sampler.seed).")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "train: continue a workdir whose config differs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "Multi-process: host:port of "
                                   "process 0 (not needed on Cloud TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index.")
_COORDINATION_TIMEOUT = flags.DEFINE_integer(
    "coordination_timeout_s", 300, "Multi-process: seconds a process waits for the others to "
    "connect, at the start-up and shutdown barriers.")
_COLLECTIVE_TIMEOUT = flags.DEFINE_integer(
    "collective_timeout_s", 0, "Multi-process on CPU: seconds one collective waits for the "
    "other processes (0 = XLA's default).")


def _fail(message: str) -> None:
    print(f"diffjax: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags are --config, --workdir, --mode, ...")
    if _CONFIG.value is None:
        _fail("--config is required, e.g. --config experiments/fashion_mnist.py")
    mode = _MODE.value
    if mode != "summary" and not _WORKDIR.value:
        _fail(f"--mode {mode} needs --workdir DIR")

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        wait = _COORDINATION_TIMEOUT.value
        parallel.maybe_initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
            initialization_timeout_s=wait, shutdown_timeout_s=wait,
            barrier_timeout_s=wait, collective_timeout_s=_COLLECTIVE_TIMEOUT.value or None)
        mesh = parallel.make_mesh()
        exp = experiment.build(_CONFIG.value, num_devices=parallel.num_data_shards(mesh),
                               mode=mode)
        if mode == "summary":
            print(app_summary.run(exp, mesh))
        elif mode == "train":
            app_train.run(exp, _WORKDIR.value, mesh, allow_config_change=_ALLOW_CHANGE.value)
        else:
            run = app_sample.run if mode == "sample" else app_evaluate.run
            run(exp, _WORKDIR.value, mesh, checkpoint=_CHECKPOINT.value,
                step=_CHECKPOINT_STEP.value, seed=_SEED.value)
    except common.USER_ERRORS as e:
        _fail(str(e))


if __name__ == "__main__":
    app.run(main)
