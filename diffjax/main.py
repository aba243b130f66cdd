r"""diffjax's command line: the only module with flags.

    python -m diffjax.main --config experiments/fashion_mnist.py --workdir runs/fmnist
    python -m diffjax.main --config experiments/imagenet64.py --mode summary
    python -m diffjax.main --config experiments/fashion_mnist.py --workdir runs/fmnist \
        --mode sample --seed 3 --config.sampler.name=dpmpp_2m --config.sampler.num_steps=25

Modes: ``train`` (resumes automatically from WORKDIR/checkpoints), ``sample`` (writes
``samples.npz`` and a PNG grid from the latest or ``--checkpoint_step`` checkpoint),
``eval`` (samples and metrics into WORKDIR/eval/), ``summary`` (resolved config, device
mesh and parameter count, nothing allocated), ``encode`` (a latent diffusion config: the
latents of ``data.split`` under ``data.latent.workdir``'s autoencoder into
``data.latent.cache``; needs no ``--workdir``), ``posthoc_ema`` (EDM2's post-hoc EMA of
``ema.sigma_rel`` from the run's EMA snapshots, into WORKDIR/posthoc_ema/; sample and eval take
``--config.ema.sigma_rel`` too). Any config field can be overridden with
``--config.section.field=value``.
"""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import sys
import time
import warnings

from diffjax import hugepages

# the time to the first train step is counted from here (from the first exec of a re-executed
# process)
_STARTED = float(os.environ.pop(hugepages.STARTED_ENV, time.time()))
if __name__ == "__main__":  # before JAX: huge pages for XLA's per-call host buffers
    hugepages.maybe_reexec(_STARTED)

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from diffjax import experiment, parallel
from diffjax.app import common
from diffjax.app import encode as app_encode
from diffjax.app import evaluate as app_evaluate
from diffjax.app import posthoc as app_posthoc
from diffjax.app import sample as app_sample
from diffjax.app import summary as app_summary
from diffjax.app import train as app_train
from diffjax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (path.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "summary", "encode",
                                           "posthoc_ema"], "What to do.")
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
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None, "JAX's persistent compilation cache: compiled programs "
    "are kept here and reused by a restarted or preempted run (use a disk that outlives the "
    "process: the TPU VM's, or gs://BUCKET/DIR; with several hosts one that all of them "
    "read, as JAX writes it from process 0 alone). Default $JAX_COMPILATION_CACHE_DIR, else "
    "~/.cache/diffjax/jax_compilation_cache; '' switches it off.")
_COLLECTIVE_TIMEOUT = flags.DEFINE_integer(
    "collective_timeout_s", 0, "Multi-process on CPU: seconds one collective waits for the "
    "other processes (0 = XLA's default).")


def _fail(message: str) -> None:
    print(f"diffjax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line(error: BaseException) -> str:
    """The user's part of a flag-parsing error, on one line."""
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError)
        error = error.args[0]
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last):" in lines:  # a config file's get_config raised
        return f"{lines[0]} {lines[-1]}"
    return "; ".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, each error one line: a bad flag value, an unknown
    ``--config.field`` (with ml_collections' nearest name) or a config file that fails to load."""
    try:
        rest = flags.FLAGS(argv)
        config = _CONFIG.value
        if config is not None and not isinstance(config, ml_collections.ConfigDict):
            getattr(config, "data")  # ml_collections defers a load failure to first use
    except (AttributeError, KeyError) as e:  # from a --config.a.b=v override
        _fail(f"unknown config field in a --config.* override: {_one_line(e)}")
    except OSError as e:  # its last line names the file and why
        _fail(f"--config cannot be loaded: {_one_line(e).split('; ')[-1]}; pass --config "
              "experiments/NAME.py[:variant]")
    except flags.Error as e:
        _fail(_one_line(e))
    return rest


def _has_gcsfs() -> bool:
    return importlib.util.find_spec("gcsfs") is not None


def check_storage(**paths: str | None) -> None:
    """ConfigError naming the first of ``paths`` (flag name -> value) on Google Cloud Storage
    (gs://) when gcsfs, the package through which etils.epath (orbax, the logs, the grids)
    and JAX's compilation cache reach it, is not installed: before any work, not as an
    ImportError from the first file written."""
    for flag, path in paths.items():
        if path and str(path).startswith("gs://") and not _has_gcsfs():
            raise ConfigError(f"--{flag}={path} is on Google Cloud Storage, which needs the "
                              "gcsfs package; pip install 'diffjax[gcs]' (or gcsfs) on every "
                              "host")


def compilation_cache(directory: str | None) -> str:
    """Switches JAX's persistent compilation cache on in ``directory`` (None: the default
    above; "": off). Every compiled program is kept. Returns the
    directory used ("" when off)."""
    if directory is None:
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "diffjax", "jax_compilation_cache")
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return ""
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program, however quick to compile: a restart then compiles nothing (the checkpoint
    # digests' small per-shape programs took 3.1 s of a Fashion-MNIST resume on 2 CPU cores).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


def run(config, mode: str, workdir: str | None, *, checkpoint: str = "",
        step: int | None = None, seed: int | None = None,
        allow_config_change: bool = False) -> None:
    """One ``--mode`` of the ConfigDict ``config`` (what :func:`main` runs once the flags are
    read and the processes connected); raises the USER_ERRORS."""
    check_storage(workdir=workdir, checkpoint=checkpoint)
    mesh = parallel.make_mesh()
    exp = experiment.build(config, num_devices=parallel.num_data_shards(mesh), mode=mode)
    if mode == "summary":
        print(app_summary.run(exp, mesh))
    elif mode == "encode":
        app_encode.run(exp, workdir, mesh)
    elif mode == "train":
        app_train.run(exp, workdir, mesh, allow_config_change=allow_config_change,
                      started=_STARTED)
    elif mode == "posthoc_ema":
        app_posthoc.run(exp, workdir, mesh, checkpoint=checkpoint, step=step)
    else:
        fn = app_sample.run if mode == "sample" else app_evaluate.run
        fn(exp, workdir, mesh, checkpoint=checkpoint, step=step, seed=seed)


class _OrbaxBackgroundErrors(std_logging.Filter):
    """Drops orbax's ERROR records (a failed background write, logged with its traceback by
    each thread it passes through) and asyncio's "exception was never retrieved" records of
    the writes still in flight when it failed (diffjax itself runs no asyncio code): the same
    failure reaches the main thread, which stops with one ``diffjax: error:`` line
    (checkpoint.save / checkpoint.wait)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno < std_logging.ERROR:
            return True
        if "/orbax/" in record.pathname:
            return False
        return not (record.name == "asyncio" and "never retrieved" in record.getMessage())


def _drop_closed_loop_callbacks(unraisable) -> None:
    """sys.unraisablehook: after a failed write orbax closes its event loop while tensorstore
    still completes the other writes, whose callbacks then fail with "Event loop is closed"
    in tensorstore's threads (reported as unraisable, one traceback each). The failure itself
    reaches the main thread; everything else goes to Python's default hook."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def _quiet_background_failures() -> None:
    """After a failed asynchronous checkpoint write, orbax's and tensorstore's threads report
    it with tracebacks; the main thread reports the failure in one line, so those reports
    are dropped. So is the warning for orbax's write coroutines that the failure left
    unawaited, which Python prints as the process exits (diffjax runs no asyncio code of its
    own)."""
    for logger in (std_logging.getLogger(), std_logging.getLogger("absl"),
                   std_logging.getLogger("asyncio")):
        logger.addFilter(_OrbaxBackgroundErrors())
        for handler in logger.handlers:
            handler.addFilter(_OrbaxBackgroundErrors())
    sys.unraisablehook = _drop_closed_loop_callbacks
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                            category=RuntimeWarning)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags are --config, --workdir, --mode, ...")
    if _CONFIG.value is None:
        _fail("--config is required, e.g. --config experiments/fashion_mnist.py")
    mode = _MODE.value
    if mode not in ("summary", "encode") and not _WORKDIR.value:
        _fail(f"--mode {mode} needs --workdir DIR")

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    _quiet_background_failures()
    parallel.xla_defaults()
    try:
        check_storage(compilation_cache_dir=_CACHE_DIR.value)
    except ConfigError as e:
        _fail(str(e))
    compilation_cache(_CACHE_DIR.value)
    try:
        wait = _COORDINATION_TIMEOUT.value
        parallel.maybe_initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
            initialization_timeout_s=wait, shutdown_timeout_s=wait,
            barrier_timeout_s=wait, collective_timeout_s=_COLLECTIVE_TIMEOUT.value or None)
        run(_CONFIG.value, mode, _WORKDIR.value, checkpoint=_CHECKPOINT.value,
            step=_CHECKPOINT_STEP.value, seed=_SEED.value,
            allow_config_change=_ALLOW_CHANGE.value)
    except common.USER_ERRORS as e:
        _fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
