"""What a run reports: metrics.jsonl, TensorBoard events, a progress bar, sample grids.

Only the process constructed with ``enabled=True`` (process 0) writes anything.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from diffjax.evaluation import grid

# jax.monitoring's duration events -> CompileTimes' sums
_COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "tracing",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowering",
                   "/jax/core/compile/backend_compile_duration": "backend",
                   "/jax/compilation_cache/cache_retrieval_time_sec": "cache reads"}


class CompileTimes:
    """Seconds JAX spends tracing functions for jit, lowering them to StableHLO, compiling
    them and reading compiled programs from the persistent compilation cache, summed over
    every program while the context is active (``jax.monitoring`` duration events):

        with CompileTimes() as times:
            ...
        times.seconds()  # {"tracing": .., "lowering": .., "compiling": .., "cache reads": ..}

    "compiling" excludes the cache reads (JAX's compile event includes them).
    """

    def __init__(self):
        self._sums = dict.fromkeys(_COMPILE_EVENTS.values(), 0.0)

    def _record(self, event: str, duration: float, **_: Any) -> None:
        name = _COMPILE_EVENTS.get(event)
        if name is not None:
            self._sums[name] += duration

    def __enter__(self) -> CompileTimes:  # noqa: PYI034
        jax.monitoring.register_event_duration_secs_listener(self._record)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)

    def seconds(self) -> dict[str, float]:
        s = self._sums
        return {"tracing": s["tracing"], "lowering": s["lowering"],
                "compiling": max(s["backend"] - s["cache reads"], 0.0),
                "cache reads": s["cache reads"]}


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX's writer module imports torch whenever it is installed (only to accept its
    tensors, which diffjax never passes): on a machine that has it, 1.4 s of this 2-core CPU
    and about 300 MB, on the way to the first step. Unless torch is loaded already, it is
    hidden from that import (``sys.modules[name] = None``: an ImportError) and visible again
    after it.
    """
    if "tensorboardX.writer" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            import tensorboardX.writer  # noqa: F401  (heavy, and only where logs are written)
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter  # imported above, or by the caller's torch code

    return SummaryWriter


class Reporter:
    """Writes ``WORKDIR/metrics.jsonl``, TensorBoard events and PNG grids; shows progress."""

    def __init__(self, workdir: str, *, enabled: bool, total_steps: int, start_step: int,
                 batch_size: int):
        self.workdir, self.enabled = epath.Path(workdir), enabled
        self.total, self.batch_size = total_steps, batch_size
        self._last_step, self._last_time = start_step, time.perf_counter()
        self._tb = self._bar = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._tb = _summary_writer()(str(self.workdir / "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         file=sys.stderr, disable=not sys.stderr.isatty())

    def write_config(self, config: dict[str, Any]) -> None:
        if self.enabled:
            (self.workdir / "config.json").write_text(json.dumps(config, indent=2, default=str))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        rate = steps / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        metrics = dict(metrics, steps_per_sec=rate, examples_per_sec=rate * self.batch_size)
        if not self.enabled:
            return
        with (self.workdir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self._tb.add_scalar(f"train/{name}", value, step)
        self._tb.flush()
        self._bar.n = step
        self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        self._bar.refresh()
        eta = (self.total - step) / rate
        self._bar.write(
            f"step {step}/{self.total} loss {metrics['loss']:.4f} grad_norm "
            f"{metrics.get('grad_norm', float('nan')):.3f} lr {metrics.get('learning_rate', 0):.2e}"
            f" {rate:.2f} steps/s ETA {int(eta) // 60}m{int(eta) % 60:02d}s", file=sys.stderr)

    def startup(self, step: int, seconds: dict[str, float],
                jax_seconds: dict[str, float] | None = None) -> None:
        """One line on how long the run took to its first step: ``seconds["total"]`` and its
        parts (state created or restored; compiling, or reading the persistent compilation
        cache, and the step itself), and ``jax_seconds`` (:class:`CompileTimes`: where JAX's
        share of it went); TensorBoard scalars ``startup/*``."""
        if not self.enabled:
            return
        parts = ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items()
                          if name != "total")
        if jax_seconds:
            parts += "; JAX: " + ", ".join(f"{name} {value:.1f} s"
                                           for name, value in jax_seconds.items())
        print(f"step {step}: first step {seconds['total']:.1f} s after start ({parts})",
              file=sys.stderr, flush=True)
        for name, value in seconds.items():
            self._tb.add_scalar(f"startup/{name.replace(' ', '_')}_s", value, step)
        for name, value in (jax_seconds or {}).items():
            self._tb.add_scalar(f"startup/jax_{name.replace(' ', '_')}_s", value, step)

    def drawing(self, step: int) -> None:
        """A line before the sample grid is drawn (sampling a grid can take a while, e.g.
        half a minute of DDIM-25 for Fashion-MNIST's 100 images on a 2-core CPU)."""
        if self.enabled:
            self._bar.write(f"step {step}: drawing the sample grid", file=sys.stderr)

    def image_grid(self, step: int, images: np.ndarray,
                   rows: int | Sequence[str], seconds: float | None = None) -> str | None:
        """Writes ``samples/step_<7-digit step>.png``; one row per class when class-conditional
        (``rows``: their number), per prompt of a text model (``rows``: the prompts, written
        beside their rows). ``seconds``: how long drawing it took, for the log line that names
        the file."""
        if not self.enabled:
            return None
        path = str(self.workdir / "samples" / f"step_{step:07d}.png")
        labels = None if isinstance(rows, int) else list(rows)
        num_rows = rows if labels is None else len(labels)
        ncol = len(images) // num_rows if num_rows and len(images) % num_rows == 0 else None
        grid.save_grid(np.asarray(images), path, ncol=ncol, scale=2,
                       row_labels=labels if ncol else None)
        self._tb.add_image("samples", grid.make_grid(grid.to_uint8(images), ncol), step,
                           dataformats="HWC")
        took = "" if seconds is None else f" in {seconds:.1f} s"
        self._bar.write(f"step {step}: sample grid {path} ({len(images)} images{took})",
                        file=sys.stderr)
        return path

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
