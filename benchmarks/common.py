"""Shared helpers of the on-demand benchmarks: timing protocol, peak memory, configs, output.

Not part of the test suite or the package; the scripts beside it import it by name.
Protocol of every benchmark:
  * compile time: ``jitted.lower(*args).compile()`` wall time, with JAX's persistent
    compilation cache switched off (:func:`setup_jax`), so a warm cache never hides it;
  * steady-state time: ``warmup`` untimed calls, then the median of ``repeats`` timed calls,
    each ending with ``jax.block_until_ready`` (or nothing for eager PyTorch on CPU);
  * peak memory: the process's peak resident set (Linux VmHWM), reset at the start of a
    phase through ``/proc/self/clear_refs`` (after ``gc`` and ``malloc_trim``), reported as
    the increase over the RSS at the start of the phase. XLA:CPU reports no device memory
    statistics and PyTorch's CPU allocator bypasses ``tracemalloc``: RSS treats both alike.
    Without clear_refs it falls back to ``ru_maxrss`` (cumulative, flagged in the output).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def setup_jax() -> None:
    """What ``python -m diffjax.main`` runs with: huge pages for malloc's mappings
    (``hugepages.maybe_reexec``: this process starts over with ``GLIBC_TUNABLES`` set, so call
    this first) and the XLA options (``parallel.xla_defaults``; before any JAX computation);
    and the persistent compilation cache switched off so compile times are real."""
    from diffjax import hugepages

    hugepages.maybe_reexec()
    import jax

    from diffjax import parallel

    parallel.xla_defaults()
    jax.config.update("jax_enable_compilation_cache", False)


@dataclasses.dataclass
class Timing:
    """first: seconds of the first (warm-up) call; runs: seconds of each timed call."""

    first: float
    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    best = property(lambda self: min(self.runs))

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed runs: how noisy the machine was."""
        return (max(self.runs) - min(self.runs)) / self.median


def block(out: Any) -> Any:
    """Waits for JAX arrays in ``out``; a no-op for anything else (NumPy, torch on CPU)."""
    import jax

    return jax.block_until_ready(out)


def time_calls(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3,
               sync: Callable[[Any], Any] = block) -> Timing:
    """Times ``fn()`` (a closure that threads its own state): warm-up calls, then repeats.
    ``first`` is the first warm-up call alone (at least one warm-up call is made)."""
    return time_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, sync=sync)["fn"]


def time_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 3,
                     sync: Callable[[Any], Any] = block) -> dict[str, Timing]:
    """Like :func:`time_calls` for several closures, alternating them call by call, so that
    on a shared machine a load change hits all of them alike (their ratio is what matters)."""
    first, runs = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        sync(fn())
        first[name] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            sync(fn())
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            sync(fn())
            runs[name].append(time.perf_counter() - t0)
    return {name: Timing(first[name], runs[name]) for name in fns}


def compile_jitted(jitted, *args) -> tuple[Any, float]:
    """(compiled executable, seconds to lower and compile) of a ``jax.jit`` function."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0



def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed_memory() -> None:
    from diffjax import hugepages

    gc.collect()
    hugepages.release_freed_memory()


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.increase_mb``: peak RSS over the RSS at entry."""

    def __enter__(self) -> "PeakRSS":
        _release_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = _status_kb("VmHWM") is not None
        except OSError:
            self.exact = False
        self.start_kb = _status_kb("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        self.peak_kb = self._peak_kb()

    def _peak_kb(self) -> int:
        peak = _status_kb("VmHWM") if self.exact else None
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if peak is None else peak

    def restart(self) -> float:
        """Ends a sub-phase: returns its peak increase (MB) and resets the peak, keeping the
        entry RSS as the baseline (so the next figure includes what the first one kept)."""
        increase = (self._peak_kb() - self.start_kb) / 1024.0
        _release_freed_memory()
        if self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return increase

    @property
    def increase_mb(self) -> float:
        return (self.peak_kb - self.start_kb) / 1024.0



def experiment_config(name: str):
    """``experiments/NAME.py``'s config (validated later by whoever builds from it)."""
    from diffjax import configlib

    return configlib.load_config_file(os.path.join(REPO, "experiments", f"{name}.py"))


def imagenet64_cpu_config(width: int, head_channels: int, smoke: bool = False):
    """ADM ImageNet-64 (experiments/imagenet64.py) at ``width`` = model_channels instead of 192.

    Depth, channel multipliers (1, 2, 3, 4), 3 res blocks per level, attention at 32/16/8,
    scale-shift norm, BigGAN up/down, learned variance, hybrid loss and 64x64x3 inputs are
    kept; heads have ``head_channels`` channels. Computed in float32 (the config's bfloat16
    has no fast CPU kernels, and the PyTorch peer runs float32 too); dropout is kept (0.1).
    ``smoke``: the config's ``:smoke`` variant instead (32x32, 3 levels, 1 res block), for
    the seconds-long ``--quick`` runs.
    """
    c = experiment_config("imagenet64")
    if smoke:
        from diffjax import configlib

        c = configlib.smoke(c)
        width, head_channels = 32, 32
    c.model.model_channels = width
    c.model.num_head_channels = head_channels
    c.model.dtype = "float32"
    return c


def random_batch(c, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """{"image": [B, H, W, C] float32 in [-1, 1], "label": [B] int32} of random values."""
    rng = np.random.default_rng(seed)
    shape = (batch, c.data.image_size, c.data.image_size, c.data.channels)
    return {"image": rng.uniform(-1, 1, shape).astype(np.float32),
            "label": rng.integers(0, max(c.data.num_classes, 1), (batch,)).astype(np.int32)}


def time_trainer(c, batch: int, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Compile time, per-step median time and peak RSS of ``loop.Trainer(...).train_step``
    for the Experiment of config ``c`` (``diffjax.experiment.build``).

    The jitted step (forward, loss, backward, AdamW, EMA; state donated and threaded through)
    runs ``steps`` times per timed call on one fixed random batch already on the device.
    """
    import jax

    from diffjax import experiment, parallel
    from diffjax.models import layers
    from diffjax.train import loop

    c.data.batch_size = batch
    mesh = cpu_mesh()
    with PeakRSS() as mem:
        exp = experiment.build(c, num_devices=1)
        trainer = loop.Trainer(exp.task, exp.optim, exp.train, mesh)
        state = trainer.new_state()
        params = layers.num_params(state.params)
        data = jax.device_put(random_batch(c, batch), parallel.data_sharding(mesh))
        compiled, compile_s = compile_jitted(trainer.train_step, state, data)
        compile_mb = mem.restart()
        box = [state, None]  # the latest state and metrics

        def run():
            s = box[0]
            for _ in range(steps):
                s, metrics = compiled(s, data)
            box[:] = [s, metrics]
            return s, metrics

        timing = time_calls(run, warmup=warmup, repeats=repeats)
        loss = float(jax.device_get(box[1]["loss"]))
    step_s = timing.median / steps
    return {"params": params, "batch": batch, "compile_s": compile_s, "step_s": step_s,
            "steps_per_s": 1.0 / step_s, "examples_per_s": batch / step_s,
            "spread": timing.spread, "compile_peak_rss_increase_mb": compile_mb,
            "train_peak_rss_increase_mb": mem.increase_mb, "exact_peak": mem.exact,
            "final_loss": loss}


def cpu_mesh():
    """A one-device ``data`` mesh (CPU benchmarks run on the default single CPU device)."""
    import jax

    from diffjax import parallel

    return parallel.make_mesh(jax.devices()[:1])



def environment() -> dict[str, Any]:
    """Versions, CPU count and load average: what a reader needs to judge the numbers."""
    import jax

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "jax": jax.__version__,
           "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
           "load_average_1m": os.getloadavg()[0], "machine": platform.machine()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "")
    except ImportError:
        pass
    return env


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table; floats get 4 significant digits."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if v != v else f"{v:.4g}"
        return str(v)

    cells = [list(map(str, headers))] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        print(" | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in
                         enumerate(zip(row, widths))))
        if k == 0:
            print("-+-".join("-" * w for w in widths))


def write_json(path: str | None, record: dict[str, Any]) -> None:
    """Writes ``record`` plus :func:`environment` to ``path`` (nothing if path is falsy)."""
    if not path:
        return
    record = {"environment": environment(), **record}
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=float)
    print(f"wrote {path}")


def load_note() -> str:
    """One line on machine load, printed above every table (numbers are noisy when shared)."""
    one, five, _ = os.getloadavg()
    return (f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} CPUs; "
            "medians of the timed runs")
