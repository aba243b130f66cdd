"""Crash campaign: SIGKILL a real training run at random moments, and fill its disk mid-save.

    python benchmarks/kill_campaign.py [--kills 20] [--during-write 5] [--steps 120] [--seed 0]
                                       [--window 6] [--root DIR] [--skip-disk-full]

The run is ``experiments/fashion_mnist.py:smoke`` through ``python -m diffjax.main`` (the
real command line, Fashion-MNIST data), checkpointing every step, logging every step.

1. A straight run of ``--steps`` steps, never interrupted: the reference.
2. The same run in another workdir, started again and again: each life is SIGKILLed either at
   a random moment of its training (uniform in [0, ``--window``] s after it completed its
   first checkpoint, so every such life makes progress; the moment falls between steps, in a
   step or in an asynchronous save) or, for at least ``--during-write`` lives, the moment a new
   ``*.orbax-checkpoint-tmp`` directory appears (a checkpoint half-written), until ``--kills``
   kills are done; then it runs to the end.
3. Disk full: a third run trains half the steps, then is restarted under
   ``RLIMIT_FSIZE`` (ulimit -f) so that its next checkpoint write fails. It must stop with
   exactly one ``diffjax: error:`` line (exit 2), leave every earlier checkpoint file
   byte-identical, and, restarted without the limit, finish.

Exact means: the final checkpoints of 2 and 3 hold the same arrays as 1's, bit for bit
(parameters, EMA, optimiser state, RNG, step), and every step's logged loss equals the straight
run's (the last line logged for a step, since a killed life can log a step its successor
repeats). Uses a persistent compilation cache in ROOT/jax_cache so restarts are quick.
Prints one line per life and a summary; exit status 1 if anything was not exact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/fashion_mnist.py:smoke"


def command(workdir: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "diffjax.main", "--config", CONFIG, "--workdir", workdir,
            f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=1",
            "--config.train.log_every=1", "--config.train.sample_every=0",
            "--config.train.keep_checkpoints=3"]


def env(root: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=REPO)
    return out


def start(workdir: str, steps: int, root: str, fsize: int = 0) -> subprocess.Popen:
    def limit():
        if fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    log = open(os.path.join(root, os.path.basename(workdir) + ".log"), "a")
    err = open(os.path.join(root, "stderr.txt"), "w+")  # read back by finish()
    proc = subprocess.Popen(command(workdir, steps), cwd=REPO, env=env(root), stdout=log,
                            stderr=err, text=True, preexec_fn=limit)
    proc.err_file = err
    return proc


def finish(proc: subprocess.Popen) -> str:
    """Waits for ``proc``; its stderr."""
    proc.wait()
    proc.err_file.seek(0)
    return proc.err_file.read()


def tmp_dirs(workdir: str) -> list[str]:
    ckpts = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpts):
        return []
    return [d for d in os.listdir(ckpts) if d.endswith(".orbax-checkpoint-tmp")]


def steps_done(workdir: str) -> list[int]:
    ckpts = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(
        ckpts) else []


def final_arrays(workdir: str, step: int) -> dict[str, np.ndarray]:
    """Every array of the ``state`` item of checkpoint ``step``, by path (read as stored)."""
    import jax
    import orbax.checkpoint as ocp

    state = ocp.PyTreeCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state"))
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(state)}


def losses(workdir: str) -> dict[int, float]:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            out[record["step"]] = record["loss"]  # the last line logged for a step
    return out


def compare(name: str, workdir: str, ref: str, steps: int) -> list[str]:
    problems = []
    a, b = final_arrays(workdir, steps), final_arrays(ref, steps)
    if a.keys() != b.keys():
        problems.append(f"{name}: the final state has other arrays")
    for key in sorted(a.keys() & b.keys()):
        if a[key].shape != b[key].shape or not np.array_equal(a[key], b[key]):
            problems.append(f"{name}: {key} differs")
    la, lb = losses(workdir), losses(ref)
    if la != lb:
        bad = sorted(s for s in lb if la.get(s) != lb[s])
        problems.append(f"{name}: logged losses differ at steps {bad[:10]}")
    return problems


def hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def kill_campaign(args, root: str, ref: str) -> list[str]:
    rng = random.Random(args.seed)
    workdir = os.path.join(root, "killed")
    kills = during_write = lives = 0
    while kills < args.kills:
        lives += 1
        want_write = during_write < args.during_write and (
            args.kills - kills <= args.during_write - during_write or rng.random() < 0.5)
        delay = rng.uniform(0.0, args.window)
        before = steps_done(workdir)
        stale = set(tmp_dirs(workdir))  # a killed life's leftovers, not a write of this one
        proc = start(workdir, args.steps, root)
        t0 = time.monotonic()
        trained = None  # when this life completed its first checkpoint
        how = None
        while proc.poll() is None:
            now = time.monotonic()
            if trained is None and steps_done(workdir)[-1:] != before[-1:]:
                trained = now
            if want_write and set(tmp_dirs(workdir)) - stale:
                how = "during a checkpoint write"
            elif not want_write and trained is not None and now - trained >= delay:
                how = f"{now - t0:.1f} s after its start ({now - trained:.1f} s into training)"
            elif now - t0 > 600:
                how = f"at {now - t0:.1f} s (nothing happened)"
            if how:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait()
        if how is None:
            finish(proc)
            print(f"life {lives}: the run finished before its kill (exit {proc.returncode}); "
                  f"use more --steps")
            break
        kills += 1
        during_write += how == "during a checkpoint write"
        print(f"life {lives}: SIGKILL {how}; complete checkpoints {before[-1:] or '[]'} -> "
              f"{steps_done(workdir)[-1:] or '[]'}, leftover tmp dirs {tmp_dirs(workdir)}",
              flush=True)
    proc = start(workdir, args.steps, root)
    err = finish(proc)
    if proc.returncode != 0:
        return [f"the run after the kills failed: {err.strip().splitlines()[-1:]}"]
    print(f"{kills} kills ({during_write} during a checkpoint write) in {lives} lives; "
          "final run completed")
    return compare("killed", workdir, ref, args.steps)


def disk_full(args, root: str, ref: str) -> list[str]:
    workdir = os.path.join(root, "disk_full")
    half = args.steps // 2
    proc = start(workdir, half, root)
    finish(proc)
    if proc.returncode != 0:
        return ["disk full: the first half failed"]
    before = hashes(os.path.join(workdir, "checkpoints"))
    biggest = max(os.path.getsize(os.path.join(workdir, "checkpoints", p)) for p in before)
    proc = start(workdir, args.steps, root, fsize=biggest // 2)
    err = finish(proc)
    lines = [line for line in err.splitlines() if line.startswith("diffjax: error:")]
    print(f"disk full (RLIMIT_FSIZE {biggest // 2} bytes): exit {proc.returncode}; "
          f"{lines[0] if lines else err.strip().splitlines()[-1:]}")
    problems = []
    if proc.returncode != 2 or len(lines) != 1 or "Traceback" in err:
        problems.append(f"disk full: exit {proc.returncode}, {len(lines)} error lines")
    after = hashes(os.path.join(workdir, "checkpoints"))
    changed = [p for p in before if after.get(p) != before[p]]
    if changed:
        problems.append(f"disk full: earlier checkpoint files changed: {changed[:5]}")
    proc = start(workdir, args.steps, root)
    err = finish(proc)
    if proc.returncode != 0:
        return problems + [f"disk full: the resumed run failed: {err.strip().splitlines()[-1:]}"]
    return problems + compare("disk full", workdir, ref, args.steps)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--during-write", type=int, default=5)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--window", type=float, default=6.0,
                        help="a random kill lands uniformly in [0, window] s after the life's "
                        "first completed checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="")
    parser.add_argument("--skip-disk-full", action="store_true")
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="diffjax_kill_")
    os.makedirs(root, exist_ok=True)
    ref = os.path.join(root, "straight")
    if not os.path.exists(os.path.join(ref, "checkpoints", str(args.steps))):
        proc = start(ref, args.steps, root)
        err = finish(proc)
        if proc.returncode != 0:
            print(err[-3000:])
            return 1
    print(f"straight run: {args.steps} steps in {ref}")
    problems = kill_campaign(args, root, ref)
    if not args.skip_disk_full:
        problems += disk_full(args, root, ref)
    for p in problems:
        print("NOT EXACT:", p)
    print("all exact" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
