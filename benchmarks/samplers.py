"""Sampler throughput on the fashion_mnist model and the share of time spent outside the network.

    python benchmarks/samplers.py [--batch 16] [--steps 25] [--repeats 3] [--checkpoint RUN]
                                  [--quick] [--json PATH]

For every sampler in ``diffjax.diffusion.samplers.SAMPLERS``, builds the production sampling
program (``diffjax.generate.make_sample_program``: denoiser wrapper, classifier-free guidance
and thresholding of experiments/fashion_mnist.py, one jitted ``lax.scan``) at ``--steps`` steps
and times it: images/s = batch / median seconds per call.

The network's own time is measured by a second program: a ``lax.scan`` of the same number of
bare ``model.apply`` calls (``num_evals(name, steps)``) with exactly the shapes the sampler
passes to the network (recorded while tracing it; with classifier-free guidance that is one
call on 2 x batch examples), each call's output feeding the next so nothing is hoisted.
Share outside the network = 1 - network time / sampler time (goal: under 5%); it covers the
denoiser wrapper, guidance, thresholding, the solver's arithmetic and the initial noise.
The two programs' timed calls alternate (``common.time_interleaved``) so load changes on a
shared machine hit both alike; still, the share is a difference of two noisy timings and can
come out a few points off (even negative) on a busy machine: the run-to-run spread is printed
beside it, and the share is also given from the fastest run of each.

Speed does not depend on the weights: the model is randomly initialised unless
``--checkpoint RUN_DIR`` (a fashion_mnist run) is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import common


class RecordingModel:
    """Stands in for a Flax module: delegates ``apply`` and records the traced call shapes.

    Put in a task with ``dataclasses.replace(task, model=RecordingModel(task.model))``: the
    task's ``apply`` calls ``model.apply({"params": ...}, x, t, y, train=..., ...)``."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def apply(self, variables, x, t, y=None, **kwargs):
        self.calls.append((tuple(x.shape), tuple(t.shape), None if y is None else tuple(y.shape)))
        return self.model.apply(variables, x, t, y, **kwargs)


def network_only(model, call: tuple, nfe: int):
    """jit of ``(params, x [call x shape], y) -> x`` running ``nfe`` chained network calls."""
    x_shape, t_shape, _ = call

    def run(params, x, y):
        def body(h, t):
            out = model.apply({"params": params}, h, jnp.full(t_shape, t), y, train=False)
            return out[..., :x_shape[-1]], None

        h, _ = lax.scan(body, x, jnp.linspace(999.0, 0.0, nfe))
        return h

    return jax.jit(run)


def load_params(task, mesh, checkpoint: str):
    if checkpoint:
        from diffjax.app import common as app_common

        params, step = app_common.restore_params(task, mesh, checkpoint)
        print(f"restored EMA parameters of step {step} from {checkpoint}")
        return params
    return task.init_params(jax.random.PRNGKey(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="images per sampling call")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (median taken)")
    parser.add_argument("--samplers", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--checkpoint", default="", help="fashion_mnist run dir (default: random)")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, 3 steps, "
                        "two samplers")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps = 4, 3
        args.samplers = args.samplers or "ddim,heun"
    common.setup_jax()

    from diffjax import experiment, generate
    from diffjax.diffusion import samplers

    c = common.experiment_config("fashion_mnist")
    c.sampler.batch_size = args.batch
    task = experiment.build(c, num_devices=1).task
    model = task.model
    mesh = common.cpu_mesh()
    params = load_params(task, mesh, args.checkpoint)
    names = args.samplers.split(",") if args.samplers else list(samplers.SAMPLERS)
    labels = generate.balanced_labels(args.batch, task.num_classes)
    key = jax.random.PRNGKey(0)
    net_cache: dict[tuple, Any] = {}
    results = {}
    for name in names:
        print(f"timing {name} ...", flush=True)
        c.sampler.name, c.sampler.num_steps = name, args.steps
        sampling = experiment.build(c, num_devices=1).sampling
        recorder = RecordingModel(model)
        fn = generate.make_sample_program(dataclasses.replace(task, model=recorder), sampling,
                                          mesh, args.batch, with_inputs=False)
        knobs = sampling.knobs()
        compiled, compile_s = common.compile_jitted(fn, params, None, None, key, labels, None, knobs)
        if len(set(recorder.calls)) != 1:
            raise RuntimeError(f"{name}: network called with several shapes {recorder.calls}")
        call, nfe = recorder.calls[0], samplers.num_evals(name, args.steps)
        if (call, nfe) not in net_cache:
            x = jnp.zeros(call[0], jnp.float32)
            y = jnp.zeros(call[2], jnp.int32) if call[2] else None
            net_c, _ = common.compile_jitted(network_only(model, call, nfe), params, x, y)
            net_cache[(call, nfe)] = functools.partial(net_c, params, x, y)
        t = common.time_interleaved(
            {"sampler": lambda: compiled(params, None, None, key, labels, None, knobs),
             "network": net_cache[(call, nfe)]},
            warmup=args.warmup, repeats=args.repeats)
        sampler_t, net_t = t["sampler"], t["network"]
        results[name] = {
            "nfe": nfe, "network_batch": call[0][0], "compile_s": compile_s,
            "sampler_s": sampler_t.median, "images_per_s": args.batch / sampler_t.median,
            "network_s": net_t.median, "outside_share": 1.0 - net_t.median / sampler_t.median,
            "outside_share_best": 1.0 - net_t.best / sampler_t.best,
            "spread": max(sampler_t.spread, net_t.spread)}

    print(f"\nfashion_mnist model, batch {args.batch}, {args.steps} steps; {common.load_note()} "
          f"({args.repeats} timed after {args.warmup} warm-up)")
    headers = ["sampler", "NFE", "net batch", "compile (s)", "s / call", "images/s",
               "network-only (s)", "outside network", "(from best runs)", "spread"]
    rows = [[n, r["nfe"], r["network_batch"], r["compile_s"], r["sampler_s"], r["images_per_s"],
             r["network_s"], f"{100 * r['outside_share']:.1f}%",
             f"{100 * r['outside_share_best']:.1f}%", f"{100 * r['spread']:.0f}%"]
            for n, r in results.items()]
    common.print_table(headers, rows)
    print("  net batch: examples per network call (2 x batch: classifier-free guidance runs the "
          "conditional and null-label passes as one batch). Goal: outside network < 5%.\n"
          "  Sampler and network-only calls alternate call by call; outside network = 1 - "
          "network/sampler from the medians (and from the fastest runs).\n"
          "  spread: largest (max - min) / median of the sampler and network-only timed runs.")
    common.write_json(args.json, {"benchmark": "samplers", "args": vars(args),
                                  "results": results})


if __name__ == "__main__":
    main()
