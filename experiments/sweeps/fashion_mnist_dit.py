"""Training sweep: DiT size x patch size on Fashion-MNIST (pixel space, 28x28x1).

The Fashion-MNIST defaults (experiments/fashion_mnist.py: cosine schedule, v-prediction,
classifier-free guidance w=1, DDIM-25, 1000 steps at batch 64, lr 1e-3) with
``model.name="dit"``; each run trains in its own workdir and is then evaluated there
(fd_fashion_mnist and class_accuracy from 500 samples, biased upwards against 10k-sample
values but comparable between runs)::

    python -m launch.sweep run experiments/sweeps/fashion_mnist_dit.py --root runs/fm_dit
    python -m launch.sweep collect --root runs/fm_dit --metric fd_fashion_mnist

Points: two CPU-sized transformers x the patch sizes that divide 28 (196, 49, 16 tokens):

    size                    patch 2           patch 4           patch 7
    depth 4, D 64, 2 heads  329k  0.117 GF    331k  0.022 GF    335k  0.007 GF
    depth 6, D 128, 4 heads 1.87M 0.582 GF    1.87M 0.125 GF    1.88M 0.040 GF

(parameters, matmul Gflops of one forward of one image, ``dit.forward_flops``; the DiT
paper's Gflops count multiply-adds, half these). The paper's DiT-S (depth 12, D 384) would
cost 9.1 GF per forward at patch 2 here, about 1.7 PFLOP for 1000 training steps: hours per
run on 2 CPU cores, against roughly an hour for all six runs above. For the paper's sizes
on an accelerator, sweep ``model.dit.size`` instead.

``collect`` reports per run its parameters, Gflops per forward, train images/s (the median
over metrics.jsonl, so the first log interval's compilation does not count) and the eval
metrics. Runs are named ``depth-4_D-64_heads-2_patch-2``, ...
"""

from launch.spec import Sweep, axis, product, zip_


def get_sweep() -> Sweep:
    return Sweep(
        config="experiments/fashion_mnist.py",
        mode=("train", "eval"),
        overrides={"model.name": "dit", "eval.num_samples": 500},
        axes=product(
            zip_(axis("model.dit.depth", [4, 6], label="depth"),
                 axis("model.dit.hidden_size", [64, 128], label="D"),
                 axis("model.dit.num_heads", [2, 4], label="heads")),
            axis("model.dit.patch_size", [2, 4, 7], label="patch"),
        ),
    )
