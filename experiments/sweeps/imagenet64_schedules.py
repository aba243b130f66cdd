"""Training ablation on ImageNet 64x64: noise schedule x network prediction target.

Four ADM-64 runs (linear/cosine schedule x eps/v prediction), each trained and then
evaluated in its own workdir, on TPU VMs (see README, "Cloud TPU"); a shortened
schedule keeps the ablation affordable (the full 540k steps of ADM are not needed to
rank the four)::

    python -m launch.sweep run experiments/sweeps/imagenet64_schedules.py \
        --root gs://BUCKET/sweeps/in64_schedules --tpu in64-a in64-b --zone us-central2-b
    python -m launch.sweep collect --root gs://BUCKET/sweeps/in64_schedules --metric fid

The learned variance of ADM is kept for both predictions; 10k samples per FID keep the
evaluation to minutes (expect FID estimates biased upwards against 50k-sample values).
"""

from launch.spec import Sweep, axis, product


def get_sweep() -> Sweep:
    return Sweep(
        config="experiments/imagenet64.py",
        mode=("train", "eval"),
        overrides={"train.num_steps": 100_000, "eval.num_samples": 10_000},
        axes=product(
            axis("diffusion.schedule", ["linear", "cosine"]),
            axis("diffusion.prediction", ["eps", "v"]),
        ),
    )
