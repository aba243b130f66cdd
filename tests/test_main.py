"""The command line: summary mode, one-line errors before any work, nothing lost."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffjax import configlib, experiment, parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "diffjax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_summary_prints_config_mesh_and_parameter_count():
    out = _main("--config", "experiments/cifar10.py", "--mode", "summary")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "35,746,307 parameters" in out.stdout
    assert "mesh {'data': 8} over 8 cpu devices" in out.stdout
    assert "schedule: linear" in out.stdout


@pytest.mark.parametrize("override, message", [
    ("--config.sampler.name=bogus", "config.sampler.name='bogus' is not a valid choice; valid: "
                                    "ddpm, ddim"),
    ("--config.diffusion.schedule=cosinus", "valid: linear, cosine"),
    ("--config.data.batch_size=12", "data.batch_size=12 is not a positive multiple of the 8 "
                                    "devices"),
    ("--config.guidance.type=cfg", "valid: none, classifier, classifier_free"),
    ("--config.sampler.name=heun --config.sampler.eta=0.5",
     "sampler.eta=0.5 is not an option of sampler 'heun', which takes sampler.s_churn, "
     "sampler.s_tmin, sampler.s_tmax, sampler.s_noise"),
])
def test_bad_config_is_one_line_and_nothing_is_written(tmp_path, override, message):
    workdir = tmp_path / "run"
    out = _main("--config", "experiments/fashion_mnist.py:smoke", "--workdir", str(workdir),
                *override.split())
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("diffjax: error")]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert not workdir.exists()


def test_missing_dataset_is_reported_before_training(tmp_path):
    workdir = tmp_path / "run"
    out = _main("--config", "experiments/fashion_mnist.py:smoke", "--workdir", str(workdir),
                f"--config.data.path={tmp_path / 'nowhere'}")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("diffjax: error:") and "dataset-fashion-mnist" in last, last
    assert not (workdir / "checkpoints").exists()


def test_image_size_not_matching_the_data(tmp_path):
    out = _main("--config", "experiments/fashion_mnist.py:smoke", "--workdir",
                str(tmp_path / "run"), "--config.data.image_size=32",
                "--config.model.attention_resolutions=()")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("diffjax: error:") and "28x28" in last and "32" in last, last


def test_validate_lists_choices_and_checks_shapes():
    c = configlib.base_config()
    configlib.validate(c, num_devices=8)
    c.model.channel_mult = (1, 2, 2, 2)  # 28 is not divisible by 8
    with pytest.raises(configlib.ConfigError, match="not divisible by 2\\*\\*"):
        configlib.validate(c)
    c = configlib.base_config()
    c.diffusion.loss = "hybrid"
    with pytest.raises(configlib.ConfigError, match="variance_type must be"):
        configlib.validate(c)
    assert parallel.DATA_AXIS == "data"


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "experiments"))
                                        if f.endswith(".py")))
def test_every_experiment_loads_validates_and_its_smoke_model_runs(name, monkeypatch):
    import jax
    import jax.numpy as jnp

    path = os.path.join(REPO, "experiments", f"{name}.py")
    # a context-conditioned UNet without a text encoder (issue 13: SD's UNet) builds for
    # --mode summary only
    mode = "summary" if configlib.load_config_file(path).model.context_dim else "train"
    experiment.build(configlib.load_config_file(path), num_devices=1, mode=mode)
    c = configlib.load_config_file(path + ":smoke")
    task = experiment.build(c, num_devices=8, mode=mode).task
    s, _, channels = task.image_shape  # a latent model's: the latent's
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, s, s, channels)), jnp.float32)
    y = jnp.array([0, 1]) if c.model.class_cond or c.model.name == "classifier" else None
    if getattr(task, "samples_from_prompts", False):  # a text model: captions' tokens
        y = jnp.asarray([[1, 2, 0], [-1, -1, -1]], jnp.int32)  # a caption, the null one
    t = jnp.array([3.0, 7.0])
    # The trainer's own init, traced for its parameters' shapes, and its apply (labels,
    # classifier, super-resolution inputs included), compiled whole as the trainer runs it.
    # The parameters are drawn on the host at a 1/sqrt(fan-in) scale instead of by the init,
    # whose zero output layers would make every output 0 whatever the layers before them did;
    # compiling the apply alone keeps the smoke models' cold compile to about a third.
    shapes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        if "kernel" in name and len(leaf.shape) > 1:
            std = 1 / np.sqrt(np.prod(leaf.shape[:-1]))
        else:  # embeddings, biases, norm scales
            std = 1.0 if "embedding" in name else 0.1
        base = 1.0 if "scale" in name else 0.0
        return (base + std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    apply = jax.jit(lambda p, x, t, y, extra: task.apply(p, x, t, y, False, **extra))
    # Tracing the apply reads the parameters without tracing any initializer (Flax's
    # Module.param does, to check shapes, for every parameter of every apply: ~10% of a train
    # step's tracing, paid at every start; layers.ReadsParams).
    traced, eval_shape = [], jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda f, *a, **k: (traced.append(f),
                                                               eval_shape(f, *a, **k))[1])
    apply.trace(params, x, t, y, task.init_inputs(2)[1])
    monkeypatch.undo()
    assert not traced, f"the apply traced {len(traced)} initializers, e.g. {traced[0]}"
    out = apply(params, x, t, y, task.init_inputs(2)[1])
    if c.model.name == "classifier":
        assert out.shape == (2, c.data.num_classes)
    else:
        learned = getattr(task, "learned_variance", False)  # an autoencoder: reconstructions
        assert out.shape == (2, s, s, channels * (2 if learned else 1))
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-3


def test_diverging_run_stops_with_a_clear_message(tmp_path):
    cache = tmp_path / "cache"
    out = _main("--config", "experiments/fashion_mnist.py:smoke", "--workdir",
                str(tmp_path / "run"), "--config.optim.learning_rate=1e30",
                "--config.optim.grad_clip=0.0", "--compilation_cache_dir", str(cache))
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("diffjax: error: loss or gradient became NaN/Inf"), last
    # The time to the first step is reported, and the compiled programs were cached.
    # (with JAX's share: this run's cache starts empty, so it compiles)
    # The step lowered first, then (at once, in the order they ended) the state created, the
    # step compiled and the logs opened; then the first step itself.
    found = re.search(r"step 1: first step [0-9.]+ s after start \(step lowered at [0-9.]+ s, "
                      r"((state created|step compiled|logs opened) at [0-9.]+ s, ){3}"
                      r"first step [0-9.]+ s; JAX: tracing [0-9.]+ s, lowering "
                      r"[0-9.]+ s, compiling ([0-9.]+) s, cache reads [0-9.]+ s\)", out.stderr)
    assert found and float(found.group(3)) > 0, out.stderr[-2000:]
    assert any(cache.iterdir())


def test_compilation_cache_switch(monkeypatch, tmp_path):
    from diffjax import main

    before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        default = str(tmp_path / ".cache" / "diffjax" / "jax_compilation_cache")
        assert main.compilation_cache(None) == default
        assert jax.config.jax_compilation_cache_dir == default
        assert jax.config.jax_enable_compilation_cache
        # every program is kept, however quick to compile (a restart then compiles nothing)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
        assert main.compilation_cache(None) == "/elsewhere"
        assert main.compilation_cache("gs://b/c") == "gs://b/c"
        assert main.compilation_cache("") == "" and not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_enable_compilation_cache", before[0])
        jax.config.update("jax_compilation_cache_dir", before[1])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[2])


def test_xla_defaults_add_what_xla_flags_leaves_unset(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    parallel.xla_defaults()
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=8", "--xla_gpu_enable_triton_gemm=false",
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"]
    parallel.xla_defaults()  # twice: nothing added twice
    assert len(os.environ["XLA_FLAGS"].split()) == 3
    # the user's own settings, with or without a value, are kept and not repeated
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true "
                       "--xla_cpu_experimental_ynn_fusion_type=")
    parallel.xla_defaults()
    assert os.environ["XLA_FLAGS"] == ("--xla_gpu_enable_triton_gemm=true "
                                       "--xla_cpu_experimental_ynn_fusion_type=")
    monkeypatch.delenv("XLA_FLAGS")
    parallel.xla_defaults()
    assert len(os.environ["XLA_FLAGS"].split()) == 2


_CONV_PROGRAM = """
import sys, jax, jax.numpy as jnp
from diffjax import parallel
if sys.argv[1] == "defaults":
    parallel.xla_defaults()
x, w = jnp.ones((16, 28, 28, 64)), jnp.ones((3, 3, 64, 64))  # big enough for YNNPACK
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(jax.jit(conv).lower(x, w).compile().as_text())
"""


@pytest.mark.parametrize("setup", ["defaults", "none"])
def test_cpu_convolutions_leave_ynnpack_with_the_defaults(setup):
    """XLA:CPU runs a YNNPACK convolution on one core; diffjax's default gives it to Eigen's
    threaded kernel (which XLA picks by size: a small one stays with Eigen either way). The
    control (no defaults) shows the compiled text tells them apart."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _CONV_PROGRAM, setup], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "convolution(" in out.stdout
    assert ("ynn" in out.stdout.lower()) == (setup == "none"), out.stdout[-2000:]


def test_null_label_row_follows_training_label_dropout_not_the_sampling_guidance():
    """A CFG-trained model keeps its null-label row when sampled with another guidance."""
    c = configlib.load_config_file(os.path.join(REPO, "experiments", "fashion_mnist.py"))
    assert experiment.build_model(c).class_null_label
    c.guidance.type = "classifier"
    assert experiment.build_model(c).class_null_label
    c.guidance.label_dropout = 0.0
    assert not experiment.build_model(c).class_null_label


def test_orbax_background_failure_reports_are_dropped():
    """After a failed checkpoint write (tests/train/test_checkpoint_integrity.py's disk-full
    run) orbax leaves write coroutines unawaited, and Python warns about each as the process
    exits: the CLI drops those, as orbax's logged tracebacks and the "Event loop is closed"
    callbacks, and keeps every other report."""
    code = ("import gc\n"
            "from diffjax import main\n"
            "main._quiet_background_failures()\n"
            "async def write_fragment():\n    pass\n"
            "pending = write_fragment()\n"
            "del pending\n"
            "gc.collect()\n"
            "class Callback:\n"  # fails when collected: Python reports it as unraisable
            "    def __init__(self, message):\n        self.message = message\n"
            "    def __del__(self):\n        raise RuntimeError(self.message)\n"
            "Callback('Event loop is closed')\n"
            "Callback('kept')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "never awaited" not in out.stderr and "Event loop is closed" not in out.stderr
    assert "RuntimeError: kept" in out.stderr


def test_xla_defaults_leave_out_options_the_installed_xla_does_not_know(tmp_path, monkeypatch):
    """XLA ends the process on an option in XLA_FLAGS that it does not know: on a jaxlib
    release not in parallel.CHECKED_JAXLIB each default is looked up in jaxlib's shared
    libraries first, and one that is in none of them is left out."""
    lib = tmp_path / "jaxlib"
    (lib / "sub").mkdir(parents=True)
    (lib / "sub" / "libxla.so.1").write_bytes(b"\0xla_gpu_enable_triton_gemm\0xla_other\0")
    (lib / "empty.so").write_bytes(b"")
    (lib / "notes.txt").write_bytes(b"xla_cpu_experimental_ynn_fusion_type")  # not a library
    names = list(parallel.XLA_DEFAULTS)
    assert parallel.xla_knows(names, version="99.0", directory=str(lib)) == {
        "xla_gpu_enable_triton_gemm"}
    assert parallel.xla_knows(names, version=parallel.CHECKED_JAXLIB[0],
                              directory=str(lib)) == set(names)
    # The installed jaxlib's binaries hold every default's name (scanned as for a new release).
    assert parallel.xla_knows(names, version="scan") == set(names)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setattr(parallel, "xla_knows", lambda wanted: {"xla_gpu_enable_triton_gemm"})
    parallel.xla_defaults()
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=8", "--xla_gpu_enable_triton_gemm=false"]
