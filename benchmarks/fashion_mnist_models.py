"""Train-step throughput of the Fashion-MNIST models against the pixel UNet default.

    python benchmarks/fashion_mnist_models.py --ae_workdir runs/fmnist_ae [--steps 5]

Builds ``loop.Trainer`` for experiments/fashion_mnist.py (the UNet on 28x28 pixels, the
reference), experiments/dit_fashion_mnist.py (the DiT on the same pixels) and
experiments/fashion_mnist_latent.py (the UNet on the 8x8x4 latents of the autoencoder run
``--ae_workdir``; a fixed random posterior batch and scale factor 1: the network and its step
are what is timed, the latents come from a cache) and times the jitted train steps
alternately, ``--steps`` steps per timed call, so that load on a shared machine hits all alike.
Prints steps/s and images/s of each and its steps per reference step of wall-clock: how many
steps fit the default's budget.
"""

from __future__ import annotations

import argparse

import common
import jax
import numpy as np


def trainer_closure(c, batch_fn, steps: int):
    from diffjax import experiment, parallel
    from diffjax.models import layers
    from diffjax.train import loop

    mesh = common.cpu_mesh()
    exp = experiment.build(c, num_devices=1)
    trainer = loop.Trainer(exp.task, exp.optim, exp.train, mesh)
    state = trainer.new_state()
    data = jax.device_put(batch_fn(exp), parallel.data_sharding(mesh))
    compiled, compile_s = common.compile_jitted(trainer.train_step, state, data)
    box = [state]

    def run():
        s = box[0]
        for _ in range(steps):
            s, metrics = compiled(s, data)
        box[0] = s
        return metrics

    return run, compile_s, layers.num_params(state.params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ae_workdir", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    common.setup_jax()
    pixel = common.experiment_config("fashion_mnist")
    dit = common.experiment_config("dit_fashion_mnist")
    latent = common.experiment_config("fashion_mnist_latent")
    latent.data.latent.workdir = args.ae_workdir
    latent.data.latent.cache = ""
    latent.data.latent.scale_factor = 1.0
    rng = np.random.default_rng(0)

    def posterior(exp):
        b, shape = exp.data.batch_size, exp.task.image_shape
        return {"mean": rng.standard_normal((b, *shape), np.float32),
                "std": np.full((b, *shape), 0.1, np.float32),
                "label": rng.integers(0, 10, (b,)).astype(np.int32)}

    fns, info = {}, {}
    def pixels(exp):
        return common.random_batch(pixel, exp.data.batch_size)

    for name, c, batch_fn in (("unet", pixel, pixels), ("dit", dit, pixels),
                              ("latent_unet", latent, posterior)):
        fns[name], compile_s, params = trainer_closure(c, batch_fn, args.steps)
        info[name] = (compile_s, params, c.data.batch_size)
    t = common.time_interleaved(fns, warmup=1, repeats=args.repeats)
    rows = []
    for name in fns:
        step_s = t[name].median / args.steps
        rows.append([name, f"{info[name][1]:,}", f"{info[name][0]:.1f}", f"{1 / step_s:.2f}",
                     f"{info[name][2] / step_s:.1f}", f"{t['unet'].median / t[name].median:.2f}",
                     f"{t[name].spread:.2f}"])
    common.print_table(["model", "params", "compile s", "steps/s", "images/s",
                        "steps per unet step", "spread"], rows)


if __name__ == "__main__":
    main()
