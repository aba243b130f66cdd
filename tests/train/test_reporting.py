"""What a run prints about itself: where the time to the first step went, the grids."""

import jax
import numpy as np

from diffjax.train import reporting


def test_compile_times_sums_jax_events_while_active():
    record = jax.monitoring.record_event_duration_secs
    with reporting.CompileTimes() as times:
        record("/jax/core/compile/jaxpr_trace_duration", 0.5)
        record("/jax/core/compile/jaxpr_to_mlir_module_duration", 0.25)
        # JAX's compile event includes the cache read of a hit
        record("/jax/core/compile/backend_compile_duration", 3.0)
        record("/jax/compilation_cache/cache_retrieval_time_sec", 1.0)
        record("/jax/core/compile/jaxpr_trace_duration", 0.125)
        record("/jax/some/other_event", 7.0)
    record("/jax/core/compile/backend_compile_duration", 100.0)  # after: not counted
    assert times.seconds() == {"tracing": 0.625, "lowering": 0.25, "compiling": 2.0,
                               "cache reads": 1.0}


def test_compile_times_of_a_real_program():
    scale = np.float32(np.random.default_rng().uniform(2, 3))  # a program no cache holds
    with reporting.CompileTimes() as times:
        jax.block_until_ready(jax.jit(lambda x: x * scale + 1)(np.ones(3, np.float32)))
    seconds = times.seconds()
    assert seconds["tracing"] > 0 and seconds["lowering"] > 0
    assert seconds["compiling"] + seconds["cache reads"] > 0


def test_startup_and_grid_lines(tmp_path, capsys):
    writer = reporting.Reporter(str(tmp_path), enabled=True, total_steps=10, start_step=0,
                                batch_size=4)
    writer.startup(1, {"total": 9.25, "state created": 2.0, "compile and first step": 7.25},
                   {"tracing": 1.5, "lowering": 0.5, "compiling": 4.0, "cache reads": 0.0})
    writer.drawing(5)
    images = np.zeros((6, 8, 8, 1), np.float32)
    path = writer.image_grid(5, images, 3, seconds=12.34)
    writer.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        ("step 1: first step 9.2 s after start (state created 2.0 s, compile and first step "
         "7.2 s; JAX: tracing 1.5 s, lowering 0.5 s, compiling 4.0 s, cache reads 0.0 s)"),
        "step 5: drawing the sample grid",
        f"step 5: sample grid {path} (6 images in 12.3 s)"]
    assert path == str(tmp_path / "samples" / "step_0000005.png")


_OPEN_LOGS = """
import sys
from diffjax.train import reporting
writer = reporting.Reporter(sys.argv[1], enabled=True, total_steps=1, start_step=0,
                            batch_size=1)
writer.log(1, {"loss": 0.5})
writer.close()
print("torch loaded:", "torch" in sys.modules)
import torch  # the caller's own import still works afterwards
print("torch imports:", hasattr(torch, "Tensor"))
"""


def test_logs_open_without_importing_pytorch(tmp_path):
    """tensorboardX imports torch where it is installed (1.4 s and ~300 MB on the way to the
    first step); the Reporter's writer does not, and leaves torch importable."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("torch") is None:
        import pytest

        pytest.skip("torch is not installed here (the `reference` extra): nothing to hide")
    out = subprocess.run([sys.executable, "-c", _OPEN_LOGS, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch loaded: False" in out.stdout and "torch imports: True" in out.stdout, out.stdout
    assert list((tmp_path / "tensorboard").iterdir())  # the events were written
