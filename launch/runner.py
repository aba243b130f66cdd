"""Executes a sweep: every run in its own workdir ROOT/<run name>, locally or on TPU VMs.

For each run the runner writes ``sweep_run.json`` (name, axis values, commands), runs the
sweep's modes in order (``python -m diffjax.main --config ... --workdir ROOT/<run> --mode
...``) and, once all exit with 0, writes ``sweep_done.json``. Runs that already have the
done marker are skipped, so re-running a sweep resumes it (and a train run resumes from
its own checkpoints). A failing run gets ``sweep_failed.json``, is reported with its log,
and the others go on. On spot TPU VMs a step cut short by a preemption is rerun after the
VM is recreated and set up again (bounded by ``max_restarts``).

Parallelism: locally, N runs at a time share this machine; on TPU VMs, each VM (all of
its hosts, ``--worker=all``) runs one run at a time, pulling from a shared queue.
"""

from __future__ import annotations

import dataclasses
import datetime
import queue
import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from launch import gcloud
from launch.shell import Shell
from launch.spec import Run, Sweep, expand, override_text
from launch.storage import (DONE_MARKER, FAILED_MARKER, RUN_MARKER, is_gcs, join,
                            make_store)
from launch.tpu import Timing, TpuOps

CHECKPOINT_MODES = ("sample", "eval")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """status: 'done', 'failed', 'skipped' or 'planned' (dry run); returncode or 0."""

    name: str
    status: str
    returncode: int = 0
    log: str = ""
    message: str = ""


def main_args(sweep: Sweep, run: Run, workdir: str, mode: str,
              checkpoint: str | None) -> list[str]:
    """Arguments of ``diffjax.main`` for one step of one run."""
    args = ["--config", sweep.config, "--workdir", workdir, "--mode", mode]
    if checkpoint and mode in CHECKPOINT_MODES:
        args += ["--checkpoint", checkpoint]
    values = {**sweep.overrides, **run.assignment}
    return args + [f"--config.{k}={override_text(v)}" for k, v in values.items()]


class LocalExecutor:
    """Runs ``python -m <main>`` (or ``python <main>`` for a .py file) on this machine.

    Args:
      shell: prints and runs the commands.
      main: module run with -m (default diffjax.main), or a path to a .py stand-in.
      parallel: how many runs at a time.
    """

    def __init__(self, shell: Shell, main: str = "diffjax.main", parallel: int = 1,
                 python: str = sys.executable):
        if parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {parallel}")
        self.shell, self.python, self.parallel = shell, python, parallel
        self.prefix = [python, main] if main.endswith(".py") else [python, "-m", main]
        self.slots = [f"local slot {i}" for i in range(parallel)]

    def command(self, slot: str, args: list[str]) -> list[str]:
        return [*self.prefix, *args]

    def execute(self, slot: str, args: list[str], log: Path) -> int:
        return self.shell.run(self.command(slot, args), check=False, log=log).returncode


class TpuExecutor:
    """Runs each step on all hosts of one TPU VM over ``gcloud ... ssh --worker=all``.

    Args:
      shell: prints and runs the commands.
      tpus: the VMs, each already created and set up (``python -m launch.tpu``).
      max_restarts: for spot VMs, how many times a step may be rerun after the VM was
        preempted under it (the VM is recreated and set up again first; training resumes
        from the run's checkpoints on gs://). 0 reports the preempted run as failed.
      setup: keyword arguments of ``TpuOps.setup`` (repo, git_url, git_ref) for recreation.
      timing, sleep: waits of the recovery (see ``launch.tpu.Timing``).
    """

    def __init__(self, shell: Shell, tpus: list[gcloud.Tpu], *, max_restarts: int = 0,
                 setup: dict | None = None, timing: Timing | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        if not tpus:
            raise ValueError("give at least one TPU VM name with --tpu")
        self.shell = shell
        self.slots = list(tpus)
        self.max_restarts = max_restarts
        self.setup = setup or {}
        self.ops = {t.name: TpuOps(t, shell, timing, sleep) for t in tpus}

    def command(self, tpu: gcloud.Tpu, args: list[str]) -> list[str]:
        return gcloud.ssh(tpu, gcloud.main_command(tpu, args), keepalive=True)

    def execute(self, tpu: gcloud.Tpu, args: list[str], log: Path) -> int:
        rc = self.shell.run(self.command(tpu, args), check=False, log=log).returncode
        ops, restarts = self.ops[tpu.name], 0
        while rc != 0 and tpu.spot and restarts < self.max_restarts and ops.preempted():
            delay = min(ops.timing.backoff * 2 ** restarts, ops.timing.max_backoff)
            restarts += 1
            self.shell.say(f"# {tpu.name} was preempted: recreate it and rerun "
                           f"({restarts}/{self.max_restarts}) in {delay:g} s")
            ops.sleep(delay)
            ops.ensure_up()
            ops.setup(**self.setup)
            rc = self.shell.run(self.command(tpu, args), check=False, log=log).returncode
        return rc


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _validate(sweep: Sweep, root: str, executor, checkpoint: str | None,
              shell: Shell) -> None:
    config_file = Path(sweep.config.split(":", 1)[0])
    if not config_file.is_file():
        raise ValueError(f"config {config_file} not found; sweep config paths are relative "
                         "to the repository root, so run from there")
    if isinstance(executor, TpuExecutor):
        if not is_gcs(root):
            raise ValueError(f"--root {root} must be gs://bucket/... for TPU runs: every "
                             "host writes there and it survives the VM")
        if checkpoint and "train" not in sweep.modes and not is_gcs(checkpoint):
            raise ValueError(f"--checkpoint {checkpoint} must be on gs:// for TPU runs")
    elif checkpoint and not is_gcs(checkpoint) and "train" not in sweep.modes:
        if not Path(checkpoint).exists():
            message = (f"checkpoint {checkpoint} does not exist; train it first or pass "
                       "--checkpoint PATH")
            if not shell.dry_run:
                raise ValueError(message)
            shell.say(f"# note: {message}")


class SweepRunner:
    """Runs the runs of one sweep that are not finished yet.

    Args:
      sweep: the loaded sweep.
      root: sweep root (local dir or gs://); run workdirs are ROOT/<run name>.
      executor: LocalExecutor or TpuExecutor.
      shell: prints/runs commands; its dry_run flag makes the whole sweep a printout.
      checkpoint: overrides Sweep.checkpoint.
      log_dir: where logs go when root is on gs:// (default sweep_logs/<sweep name>).
    """

    def __init__(self, sweep: Sweep, root: str, executor, shell: Shell, *,
                 checkpoint: str | None = None, log_dir: str | None = None):
        self.sweep, self.root, self.executor, self.shell = sweep, str(root), executor, shell
        self.checkpoint = checkpoint or sweep.checkpoint
        self.store = make_store(self.root, shell)
        default_logs = Path("sweep_logs") / (sweep.name or "sweep")
        self.log_dir = Path(log_dir) if log_dir else (
            default_logs if is_gcs(self.root) else Path(self.root))
        _validate(sweep, self.root, executor, self.checkpoint, shell)

    def log_path(self, run: Run) -> Path:
        return self.log_dir / run.name / "log.txt"

    def _mark(self, run: Run, filename: str, obj: dict) -> None:
        where = join(self.root, run.name, filename)
        if self.shell.dry_run:
            self.shell.say(f"# would write {where}")
            return
        if not is_gcs(self.root):
            self.shell.say(f"# write {where}")
        self.store.write_json(run.name, filename, obj)

    def run_one(self, run: Run, slot) -> RunResult:
        """Runs all modes of one run on one slot; never raises."""
        workdir = join(self.root, run.name)
        log = self.log_path(run)
        steps = [main_args(self.sweep, run, workdir, m, self.checkpoint)
                 for m in self.sweep.modes]
        start = time.time()
        try:
            self._mark(run, RUN_MARKER, {
                "name": run.name, "sweep": self.sweep.name, "config": self.sweep.config,
                "axes": dict(run.assignment), "labels": dict(run.labels),
                "overrides": dict(self.sweep.overrides), "modes": list(self.sweep.modes),
                "checkpoint": self.checkpoint, "started_at": _now(),
                "commands": [shlex.join(self.executor.command(slot, a)) for a in steps]})
            for mode, args in zip(self.sweep.modes, steps):
                rc = self.executor.execute(slot, args, log)
                if rc != 0:
                    self._mark(run, FAILED_MARKER, {"name": run.name, "mode": mode,
                                                    "returncode": rc, "log": str(log),
                                                    "failed_at": _now()})
                    return RunResult(run.name, "failed", rc, str(log),
                                     f"exit code {rc} in mode {mode}")
            self._mark(run, DONE_MARKER, {"name": run.name, "finished_at": _now(),
                                          "wall_time_s": round(time.time() - start, 3)})
            if self.shell.dry_run:
                return RunResult(run.name, "planned", 0, str(log))
            self.store.remove(run.name, FAILED_MARKER)
            return RunResult(run.name, "done", 0, str(log))
        except Exception as e:  # one broken run must not stop the sweep
            return RunResult(run.name, "failed", -1, str(log), f"{type(e).__name__}: {e}")

    def run(self) -> list[RunResult]:
        """Runs every unfinished run; returns one result per run, in sweep order."""
        runs = expand(self.sweep)
        finished = self.store.finished()
        results: dict[str, RunResult] = {}
        todo: queue.Queue[Run] = queue.Queue()
        for run in runs:
            if run.name in finished:
                self.shell.say(f"# skip {run.name}: finished ({DONE_MARKER} exists)")
                results[run.name] = RunResult(run.name, "skipped")
            else:
                todo.put(run)
        self.shell.say(f"# sweep {self.sweep.name}: {len(runs)} runs, {todo.qsize()} to run, "
                       f"{len(self.executor.slots)} at a time")

        stop = threading.Event()

        def worker(slot) -> None:
            while not stop.is_set():
                try:
                    run = todo.get_nowait()
                except queue.Empty:
                    return
                self.shell.say(f"# start {run.name} on {getattr(slot, 'name', slot)}")
                result = self.run_one(run, slot)
                results[run.name] = result
                if result.status == "failed":
                    self.shell.say(f"# FAILED {run.name}: {result.message}; log: {result.log}")
                else:
                    self.shell.say(f"# {result.status} {run.name}")

        threads = [threading.Thread(target=worker, args=(s,), daemon=True)
                   for s in self.executor.slots]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
        except KeyboardInterrupt:
            stop.set()  # Ctrl-C also reached the running commands (same process group)
            self.shell.say("# interrupted: no further runs start; re-run the sweep to resume")
            raise
        ordered = [results[r.name] for r in runs]
        self._summarize(ordered)
        return ordered

    def _summarize(self, results: list[RunResult]) -> None:
        statuses = ("planned", "skipped") if self.shell.dry_run else ("done", "skipped", "failed")
        counts = {s: sum(r.status == s for r in results) for s in statuses}
        self.shell.say("# summary: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        for r in results:
            if r.status == "failed":
                self.shell.say(f"#   failed {r.name}: {r.message}; log: {r.log}")
