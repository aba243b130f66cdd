"""Runs the real training loop in a subprocess, for the kill -9 and multi-process tests.

    python driver.py DATA_DIR WORKDIR STEPS DEVICES [--kill-at-batch K] [--text]
        [--adam-eps E] [--shard-state fsdp] [--sample-every N] [--ema-snapshots]
        [--process-id I --num-processes N --coordinator HOST:PORT]

Writes WORKDIR/final_params.npz (process 0) when training completes. With --kill-at-batch K
the process SIGKILLs itself when the training loop asks for its K-th batch (counting from 1
in this process), which with the loop's read-ahead lands while earlier steps and their
asynchronous checkpoint saves are still running.
"""

import argparse
import importlib.util
import json
import os
import signal
import sys

parser = argparse.ArgumentParser()
parser.add_argument("data_dir")
parser.add_argument("workdir")
parser.add_argument("steps", type=int)
parser.add_argument("devices", type=int)
parser.add_argument("--kill-at-batch", type=int, default=0)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("--coordinator", default="")
parser.add_argument("--heartbeat-timeout", type=int, default=600,
                    help="seconds of missed heartbeats after which the coordination service "
                         "declares a process dead and stops the others")
parser.add_argument("--text", action="store_true", help="tiny.text_config (a caption model)")
parser.add_argument("--adam-eps", type=float, default=0.0, help="optim.eps (0: the config's)")
parser.add_argument("--shard-state", default="", help="parallel.shard_state ('': the config's)")
parser.add_argument("--sample-every", type=int, default=0, help="train.sample_every (grids)")
parser.add_argument("--ema-snapshots", action="store_true",
                    help="a power-function EMA (sigma_rel 0.1) and its snapshots every 2 steps")
args = parser.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

# One compilation cache per process, as each host of a pod has its own disk: two processes
# sharing one cache directory were seen to hang in the checkpoint barrier here. Every process
# writes its own (cache_writes: JAX writes only from process 0, and on CPU a program's cache
# key differs between the processes, so process 1 would compile afresh in every run).
cache = os.environ["DIFFJAX_TEST_CACHE"]
if args.num_processes > 1:
    cache = os.path.join(cache, f"process{args.process_id}")
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # as main
import cache_writes  # noqa: E402  (this script's directory is first on sys.path)

cache_writes.enable()

from diffjax import checkpoint, experiment, parallel  # noqa: E402
from diffjax.app import text as text_app  # noqa: E402
from diffjax.app import train as app_train  # noqa: E402

spec = importlib.util.spec_from_file_location("tiny", os.path.join(os.path.dirname(__file__),
                                                                   "tiny.py"))
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)


class Tap:
    """Delegates to a grain iterator (its state too); SIGKILLs the process at the ``kill_at``-th
    request (0 = never) and writes the labels of the first batch it returns to ``path``."""

    def __init__(self, it, kill_at, path):
        self.it, self.kill_at, self.count, self.path = it, kill_at, 0, path

    def __next__(self):
        self.count += 1
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        batch = next(self.it)
        if self.path:
            with open(self.path, "w") as f:
                json.dump(batch["label"].tolist(), f)
            self.path = None
        return batch

    def __iter__(self):
        return self

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def held(x) -> int:
    """Elements of ``x`` on this process's devices, each distinct shard counted once."""
    indices = {tuple((s.start, s.stop, s.step) for s in shard.index)
               for shard in x.addressable_shards}
    return sum(int(np.prod([len(range(*slice(*i).indices(n))) for i, n in zip(index, x.shape)]))
               for index in indices)


# Generous timeouts: the tests share 2 cores between these processes, pytest's workers and
# whatever else runs, so one process can reach a synchronisation point minutes after another
# (compiling with a cold cache); the defaults are set for dedicated hosts. Heartbeats come
# from a thread of their own whatever the process is doing, so a test whose peer is killed on
# purpose shortens only theirs (--heartbeat-timeout).
parallel.maybe_initialize_distributed(
    args.coordinator, args.num_processes, args.process_id, initialization_timeout_s=600,
    heartbeat_timeout_s=args.heartbeat_timeout, shutdown_timeout_s=600,
    barrier_timeout_s=600, collective_timeout_s=600)
mesh = parallel.make_mesh()
make_config = tiny.text_config if args.text else tiny.config
overrides = {"train.num_steps": args.steps, "train.sample_every": args.sample_every}
if args.adam_eps:
    overrides["optim.eps"] = args.adam_eps
if args.shard_state:
    overrides["parallel.shard_state"] = args.shard_state
if args.ema_snapshots:
    overrides.update({"ema.sigma_rels": (0.1,), "ema.snapshot_every": 2})
exp = experiment.build(make_config(args.data_dir, **overrides),
                       num_devices=parallel.num_data_shards(mesh))
if args.text:
    it = text_app.train_iterator(exp, text_app.training_tokenizer(exp, args.workdir),
                                 jax.process_index(), jax.process_count())
else:
    it = app_train.train_iterator(exp.data, exp.train.seed, jax.process_index(),
                                  jax.process_count())
ckpts = checkpoint.checkpoint_dir(args.workdir)
start = max([int(d) for d in os.listdir(ckpts) if d.isdigit()], default=0) \
    if os.path.isdir(ckpts) else 0
it = Tap(it, args.kill_at_batch,
         os.path.join(args.workdir, f"first_batch_p{jax.process_index()}_s{start}.json"))
print(f"process {jax.process_index()} starts at step {start}", flush=True)
state = app_train.run(exp, args.workdir, mesh, data_iterator=it)
leaves = jax.tree.leaves(state.params)
print(f"process {jax.process_index()} holds {sum(map(held, leaves))} of "
      f"{sum(x.size for x in leaves)} parameter elements", flush=True)
# Whole arrays on every process: a sharded (fsdp) array's shards lie on several processes.
params = multihost_utils.process_allgather(state.params, tiled=True)
if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(args.workdir, "final_params.npz"), step=int(state.step), **flat)
sys.exit(0)
