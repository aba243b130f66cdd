"""A tiny training set-up shared by the trainer tests and their subprocess driver.

Loaded by path (tests run in importlib mode): ``tiny = load_tiny()`` in a test module.
"""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import portpicker

from diffjax import checkpoint, configlib, experiment, parallel
from diffjax.train import loop

IMAGE_SIZE = 8
NUM_EXAMPLES = 64
NUM_CLASSES = 4


def write_idx(path: str, array: np.ndarray) -> None:
    """An IDX file (gzip) of a uint8 array, as Fashion-MNIST's."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_dataset(directory: str) -> str:
    """Smooth random 8x8 images with 4 classes (class = brightness quadrant) as IDX files."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.arange(NUM_EXAMPLES) % NUM_CLASSES
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1)
    phase = rng.uniform(0, 2 * np.pi, (NUM_EXAMPLES, 1, 1))
    images = 0.5 + 0.4 * np.sin(2 * np.pi * (xx + labels[:, None, None] * yy / 2) + phase)
    for prefix in ("train", "t10k"):
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"),
                   np.round(images * 255))
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return directory


def config(data_dir: str, **overrides):
    """A class-conditional, learned-variance, hybrid-loss model small enough for CPU tests."""
    c = configlib.base_config()
    c.data.source = "idx"
    c.data.path = data_dir
    c.data.image_size = IMAGE_SIZE
    c.data.channels = 1
    c.data.num_classes = NUM_CLASSES
    c.data.batch_size = 8
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.model.class_cond = True
    c.model.use_scale_shift_norm = True
    c.model.dropout = 0.1
    c.diffusion.num_timesteps = 50
    c.diffusion.schedule = "cosine"
    c.diffusion.loss = "hybrid"
    c.diffusion.variance_type = "learned_range"
    c.diffusion.timestep_sampler = "loss_second_moment"
    c.guidance.type = "classifier_free"
    c.guidance.label_dropout = 0.2
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 2
    c.optim.ema_decays = (0.9, 0.99)
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 1
    c.train.sample_every = 0
    c.sampler.num_steps = 3
    c.sampler.batch_size = 8
    c.update_from_flattened_dict(overrides)
    return c


def save_run(config, workdir: str, mesh, seed: int) -> str:
    """A run directory as the trainer leaves it at step 2, written by the trainer's checkpoint
    code without compiling anything (a 2-step training run costs ~60 s of compilation on
    shared cores): the trainer's abstract state filled with NumPy zeros, EMA parameters drawn
    at a 1/sqrt(fan-in) scale (norm scales near 1) from ``seed``, so the network's output
    depends on its input and label."""
    exp = experiment.build(config, num_devices=parallel.num_data_shards(mesh))
    abstract = loop.Trainer(exp.task, exp.optim, exp.train, mesh).abstract_state()
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1])
        if "kernel" in name or "embedding" in name:
            std = 1 / np.sqrt(np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1)
            return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        base = 1.0 if "scale" in name else 0.0
        return (base + 0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    state = state.replace(ema_params=jax.tree_util.tree_map_with_path(draw, abstract.ema_params))
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(workdir), async_save=False)
    checkpoint.save(manager, 2, state, None, config.to_dict())
    manager.wait_until_finished()
    return workdir


TEXT_CLASSES = 10  # the fashion_mnist_attributes captioner's


def write_text_dataset(directory: str) -> str:
    """40 8x8 images in 10 classes (4 each) for a text model: a bright square on black whose
    side (2..7 pixels) and value (60..250) vary, so captions differ in brightness and size."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(1)
    n = 4 * TEXT_CLASSES
    labels = np.arange(n) % TEXT_CLASSES
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i in range(n):
        side = int(rng.integers(2, IMAGE_SIZE))
        top, left = rng.integers(0, IMAGE_SIZE - side + 1, 2)
        images[i, top:top + side, left:left + side] = int(rng.integers(60, 251))
    for prefix in ("train", "t10k"):
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return directory


def text_config(data_dir: str, **overrides):
    """A caption-conditioned model (experiments/fashion_mnist_text.py's options) on
    :func:`write_text_dataset`, small enough for CPU tests."""
    c = config(data_dir)
    c.data.num_classes = TEXT_CLASSES
    c.model.class_cond = False
    c.model.context_pool = "mean"
    c.diffusion.loss = "simple"
    c.diffusion.variance_type = "fixed_small"
    c.diffusion.timestep_sampler = "uniform"
    c.text.encoder = "transformer"
    c.text.captions = "fashion_mnist_attributes"
    c.text.context_length = 6
    c.text.vocab_size = 32
    c.text.width, c.text.layers, c.text.heads = 16, 1, 2
    c.update_from_flattened_dict(overrides)
    return c


DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "driver.py")
# python -m diffjax.main, every process writing its own compilation cache (cache_writes.py)
MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "main_cli.py")


def driver_env() -> dict[str, str]:
    """The environment of a driver.py subprocess: the shared test compilation cache, this
    checkout importable, no inherited XLA_FLAGS (the driver sets its device count)."""
    env = dict(os.environ)
    env.setdefault("DIFFJAX_TEST_CACHE", os.path.expanduser("~/.cache/diffjax-jax-tests"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    env.pop("XLA_FLAGS", None)
    return env


def run_driver(args, check: bool = True) -> subprocess.CompletedProcess:
    """``python driver.py *args``; AssertionError with its stderr's tail if it fails and
    ``check``."""
    proc = subprocess.run([sys.executable, DRIVER, *map(str, args)], env=driver_env(),
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"driver {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def start_together(commands, env=None) -> list[subprocess.CompletedProcess]:
    """Runs the commands at once (the processes of one run) and waits for all of them: each
    one's return code, stdout and stderr. ``env``: :func:`driver_env`'s by default."""
    env = driver_env() if env is None else env
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    outs = [p.communicate(timeout=900) for p in procs]
    return [subprocess.CompletedProcess(c, p.returncode, out, err)
            for c, p, (out, err) in zip(commands, procs, outs)]


def run_together(commands, env=None) -> list[str]:
    """:func:`start_together`, each process successfully (else AssertionError with its
    stderr's tail): their stdouts."""
    done = start_together(commands, env)
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return [proc.stdout for proc in done]


def driver_processes(args, processes: int, process_1=()) -> list[list[str]]:
    """The commands of a ``processes``-process driver run: ``python driver.py *args`` with
    each process's id and one coordinator address; ``process_1``: options of process 1's
    alone (e.g. ``--kill-at-batch``)."""
    port = portpicker.pick_unused_port()
    return [[sys.executable, DRIVER, *map(str, args), "--process-id", str(i),
             "--num-processes", str(processes), "--coordinator", f"localhost:{port}",
             *map(str, process_1 if i == 1 else ())] for i in range(processes)]


_CLI_CONFIG = """
import importlib.util

_spec = importlib.util.spec_from_file_location("diffjax_tests_tiny_cli", {tiny!r})
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


def get_config():
    return tiny.config({data_dir!r}, **{overrides!r})
"""


def write_cli_config(path, data_dir: str, overrides: dict) -> str:
    """An experiment file at ``path`` for ``python -m diffjax.main --config``: :func:`config`
    of ``data_dir`` with ``overrides``."""
    with open(path, "w") as f:
        f.write(_CLI_CONFIG.format(tiny=os.path.abspath(__file__), data_dir=data_dir,
                                   overrides=overrides))
    return str(path)


def run_main(config_file: str, workdir: str, mode: str, processes: int, devices: int,
             cache_name: str = "cli") -> list[str]:
    """``python -m diffjax.main --config CONFIG_FILE --workdir WORKDIR --mode MODE`` as
    ``processes`` processes of ``devices`` CPU devices each (through ``jax.distributed`` when
    more than one; run by :data:`MAIN`); their stdouts. Each process keeps and writes its
    compilation cache in the tests' cache directory, under ``cache_name`` and its index."""
    env = {**driver_env(), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    port = portpicker.pick_unused_port()
    cmd = lambda i: [sys.executable, MAIN, "--config", config_file,  # noqa: E731
                     "--workdir", workdir, "--mode", mode, "--compilation_cache_dir",
                     os.path.join(env["DIFFJAX_TEST_CACHE"], f"{cache_name}_process{i}")] + (
        ["--coordinator_address", f"localhost:{port}", "--num_processes", str(processes),
         "--process_id", str(i)] if processes > 1 else [])
    return run_together([cmd(i) for i in range(processes)], env)


def final_params(workdir: str) -> dict[str, np.ndarray]:
    """The parameters driver.py wrote when its run completed (and its "step")."""
    with np.load(os.path.join(workdir, "final_params.npz")) as f:
        return {k: f[k] for k in f.files}
