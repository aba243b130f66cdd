"""Launch tooling for diffjax: ablation sweeps and Cloud TPU runs.

Not part of the installed ``diffjax`` package; run it from the repository root:

    python -m launch.sweep run experiments/sweeps/fashion_mnist_samplers.py --root runs/fm
    python -m launch.sweep collect --root runs/fm --metric fd_fashion_mnist
    python -m launch.tpu create my-tpu --zone us-central2-b --accelerator-type v4-8 --dry-run

Modules:
  spec     sweep files: ``Sweep``, ``axis``, ``product``, ``zip_``, run names
  shell    prints every command before running it; ``--dry-run`` only prints
  gcloud   the exact ``gcloud`` command lines (pure functions of a ``Tpu``)
  storage  run markers in a local directory or under gs:// (through ``gcloud storage``)
  runner   executes a sweep locally or on TPU VMs, skips finished runs, reports failures
  collect  gathers every run's eval/*.json into CSV, Markdown and one plot per axis
  sweep    command line for sweeps
  tpu      command line for TPU VMs: create, setup, run, delete, status, watch
"""
