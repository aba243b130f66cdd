"""On-demand CPU benchmark: native XLA convolution gradients vs diffjax's shifted-GEMM path.

    python benchmarks/unet_ops.py [--batch 64] [--reps 3]

Prints, for a 3x3 conv at 32x32x64 (batch 64) and for a small UNet train step (channels
32/64/64, one res block per level, attention at 8x8, 32x32x3 images), the time of the
native path (`cpu_fast_conv="off"`) and of the fast path ("on"), and their ratio. Timings
are medians over --reps runs after one warm-up (compile time is printed separately).
Not a test: it takes a minute or two on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import parallel
from diffjax.models import layers
from diffjax.models.unet import UNet


def _time(fn: Callable, *args, reps: int) -> tuple[float, float]:
    """(compile + first run seconds, median seconds per run) of a jitted fn."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


def _report(name: str, native: tuple[float, float], fast: tuple[float, float]) -> None:
    print(f"{name:<34} native {native[1] * 1e3:8.1f} ms   fast {fast[1] * 1e3:8.1f} ms   "
          f"ratio {native[1] / fast[1]:5.2f}x   (first call incl. compile: "
          f"{native[0]:.1f} s / {fast[0]:.1f} s)")


def bench_conv(batch: int, reps: int) -> None:
    """3x3 conv, 32x32, 64 -> 64 channels: weight gradient alone and full VJP."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 64)) / 24.0, jnp.float32)
    g = jnp.asarray(rng.standard_normal((batch, 32, 32, 64)), jnp.float32)
    convs = {"native": lambda a, b: layers._conv_native(a, b, 1, 1),
             "fast": lambda a, b: layers.conv_fast_grad(a, b, 1, 1)}

    def wgrad(conv):
        return jax.jit(lambda x, w, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])

    def full(conv):
        return jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g))

    fwd = _time(jax.jit(convs["native"]), x, w, reps=reps)
    print(f"{'conv3x3 32x32x64 forward':<34} {fwd[1] * 1e3:8.1f} ms")
    cases = (("conv3x3 weight gradient", wgrad), ("conv3x3 input+weight gradients", full))
    for label, make in cases:
        _report(label, _time(make(convs["native"]), x, w, g, reps=reps),
                _time(make(convs["fast"]), x, w, g, reps=reps))


def bench_unet_step(batch: int, reps: int) -> None:
    """SGD train step (forward, backward, update) of a small UNet on 32x32x3."""
    kw = dict(out_channels=3, model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
              attention_resolutions=(8,), num_heads=1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 999, (batch,)), jnp.float32)
    results = {}
    for opt in ("off", "on"):
        model = UNet(**kw, cpu_fast_conv=opt)
        params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, t)["params"]

        def step(p, x, t, model=model):
            loss, grads = jax.value_and_grad(
                lambda p: jnp.mean((model.apply({"params": p}, x, t) - x) ** 2))(p)
            return jax.tree.map(lambda a, b: a - 1e-3 * b, p, grads), loss

        results[opt] = _time(jax.jit(step), params, x, t, reps=reps)
    n = layers.num_params(params)
    _report(f"UNet train step ({n / 1e6:.2f}M params)", results["off"], results["on"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    parallel.xla_defaults()  # the XLA options diffjax.main runs with (before JAX starts)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} batch={args.batch}")
    bench_conv(args.batch, args.reps)
    bench_unet_step(args.batch, args.reps)


if __name__ == "__main__":
    main()
