"""Cloud TPU VMs for diffjax: create, set up, run, watch (spot restarts), status, delete.

    python -m launch.tpu create NAME --zone Z --accelerator-type v4-8 [--spot]
    python -m launch.tpu setup  NAME --zone Z [--git-url URL --git-ref REF]
    python -m launch.tpu run    NAME --zone Z --config experiments/X.py --workdir gs://B/run \
        [--mode train] [--config.a.b=value ...]
    python -m launch.tpu watch  NAME --zone Z --spot --config ... --workdir gs://... \
        [--max-restarts 10] [--delete-when-done]
    python -m launch.tpu status NAME --zone Z [--spot]
    python -m launch.tpu delete NAME --zone Z [--spot]

Every command is printed (``+ gcloud ...``) before it runs; ``--dry-run`` prints only.
``setup`` copies the files git knows of in --repo (tracked and untracked, minus ignored)
to every host, or clones --git-url there, then installs ``jax[tpu]`` and diffjax.
``run`` starts ``python -m diffjax.main`` on every host (``--worker=all``); the workdir
must be on gs:// so all hosts share it and it outlives the VM; training resumes from
its checkpoints. ``watch`` creates the VM if needed, sets it up and runs; when a spot
VM is preempted it deletes and recreates it and runs again (bounded restarts,
exponential backoff), and it stops at the first failure of a VM that is still healthy.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from launch import gcloud
from launch.shell import CommandError, Shell
from launch.storage import is_gcs

REMOTE_ARCHIVE = "diffjax-src.tar.gz"


@dataclasses.dataclass
class Timing:
    """Waits of the watch loop, in seconds (tests set them to 0)."""

    poll: float = 30.0
    wait_timeout: float = 6 * 3600.0
    backoff: float = 60.0
    max_backoff: float = 1800.0
    grace: float = 60.0


class TpuOps:
    """Operations on one TPU VM, all through a printing ``Shell``."""

    def __init__(self, tpu: gcloud.Tpu, shell: Shell, timing: Timing | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.tpu, self.shell = tpu, shell
        self.timing = timing or Timing()
        self.sleep = sleep

    def state(self) -> str:
        """Queued-resource state (spot) or node state; 'MISSING' if it does not exist."""
        cmd = gcloud.queued_state(self.tpu) if self.tpu.spot else gcloud.node_state(self.tpu)
        result = self.shell.run(cmd, check=False, capture=True)
        if result.returncode != 0:
            return "MISSING"
        return result.stdout.strip() or ("UNKNOWN (dry run)" if self.shell.dry_run else "")

    def gone(self, state: str) -> bool:
        return state in (gcloud.QR_GONE if self.tpu.spot else gcloud.NODE_GONE)

    def create(self, wait: bool = True) -> None:
        self.shell.run(gcloud.create(self.tpu))
        if wait and self.tpu.spot:
            self.wait_active()

    def wait_active(self) -> None:
        """Polls the queued resource until ACTIVE; raises on FAILED or timeout."""
        if self.shell.dry_run:
            self.shell.say(f"# dry run: would poll the state of {self.tpu.name} every "
                           f"{self.timing.poll:g} s until ACTIVE")
            return
        start = time.monotonic()
        while True:
            state = self.state()
            self.shell.say(f"# {self.tpu.name}: {state}")
            if state == "ACTIVE":
                return
            if state in ("FAILED", "SUSPENDED", "MISSING"):
                raise CommandError(f"queued resource {self.tpu.name} is {state}; see "
                                   f"`gcloud compute tpus queued-resources describe "
                                   f"{self.tpu.name} --zone={self.tpu.zone}`")
            if time.monotonic() - start > self.timing.wait_timeout:
                raise CommandError(f"{self.tpu.name} not ACTIVE after "
                                   f"{self.timing.wait_timeout:g} s (last state {state})")
            self.sleep(self.timing.poll)

    def delete(self) -> None:
        self.shell.run(gcloud.delete(self.tpu))

    def pack(self, repo: Path) -> Path:
        """Archives the files ``git ls-files`` reports in repo (tracked + untracked, not
        ignored) into a local tar.gz."""
        archive = Path(tempfile.gettempdir()) / f"diffjax-src-{self.tpu.name}.tar.gz"
        listing = self.shell.run(["git", "-C", str(repo), "ls-files", "--cached", "--others",
                                  "--exclude-standard", "-z"], capture=True)
        files = [f for f in listing.stdout.split("\0") if f and (repo / f).is_file()]
        self.shell.say(f"# pack the {len(files) if not self.shell.dry_run else 'listed'} "
                       f"files of {repo} into {archive}")
        if not self.shell.dry_run:
            with tarfile.open(archive, "w:gz") as tar:
                for f in files:
                    tar.add(repo / f, arcname=f)
        return archive

    def setup(self, repo: Path | None = None, git_url: str = "", git_ref: str = "main") -> None:
        """Puts the code on every host (archive of repo, or git clone) and installs it."""
        if git_url:
            self.shell.run(gcloud.ssh(self.tpu, gcloud.clone_command(self.tpu, git_url,
                                                                     git_ref)))
        else:
            archive = self.pack(repo or Path("."))
            self.shell.run(gcloud.scp(self.tpu, str(archive), REMOTE_ARCHIVE))
            self.shell.run(gcloud.ssh(self.tpu, gcloud.unpack_command(self.tpu,
                                                                      REMOTE_ARCHIVE)))
        self.shell.run(gcloud.ssh(self.tpu, gcloud.install_command(self.tpu)))

    def run(self, main_args: list[str]) -> int:
        """Runs diffjax.main with main_args on every host; returns the exit code."""
        cmd = gcloud.ssh(self.tpu, gcloud.main_command(self.tpu, main_args), keepalive=True)
        return self.shell.run(cmd, check=False).returncode

    def preempted(self) -> bool:
        """Whether the VM is gone; a still-healthy state is re-checked after a grace period
        because a preempted slice's state can lag behind its dead ssh sessions."""
        state = self.state()
        if not self.gone(state):
            self.shell.say(f"# {self.tpu.name} is {state}; checking again in "
                           f"{self.timing.grace:g} s")
            self.sleep(self.timing.grace)
            state = self.state()
        self.shell.say(f"# {self.tpu.name} is {state}")
        return self.gone(state)

    def ensure_up(self) -> None:
        """Creates the VM if missing, or deletes and recreates it if preempted."""
        state = self.state()
        if self.gone(state):
            if state != "MISSING":
                self.delete()
            self.create()
        elif self.tpu.spot and state != "ACTIVE":
            self.wait_active()

    def watch(self, main_args: list[str], *, repo: Path | None, git_url: str, git_ref: str,
              max_restarts: int, delete_when_done: bool = False) -> int:
        """Create/setup/run until the run succeeds, restarting after preemptions."""
        if self.shell.dry_run:
            self.shell.say("# dry run: one pass of the watch loop (create if missing, "
                           "setup, run; on preemption: delete, back off, repeat)")
            self.create()
            self.setup(repo, git_url, git_ref)
            self.run(main_args)
            if delete_when_done:
                self.delete()
            return 0
        restarts = 0
        while True:
            self.ensure_up()
            self.setup(repo, git_url, git_ref)
            rc = self.run(main_args)
            if rc == 0:
                self.shell.say(f"# run finished on {self.tpu.name} after {restarts} restarts")
                if delete_when_done:
                    self.delete()
                return 0
            if not self.preempted():
                self.shell.say(f"# run failed with exit code {rc} on a healthy VM; not "
                               "restarting (fix the error, then run watch again: training "
                               "resumes from the last checkpoint)")
                return rc
            if restarts >= max_restarts:
                self.shell.say(f"# preempted after {restarts} restarts; giving up "
                               f"(--max-restarts {max_restarts})")
                return rc
            delay = min(self.timing.backoff * 2 ** restarts, self.timing.max_backoff)
            restarts += 1
            self.shell.say(f"# preempted: restart {restarts}/{max_restarts} in {delay:g} s")
            self.sleep(delay)


def main_args_from(args, extra: list[str]) -> list[str]:
    """diffjax.main arguments from the run/watch flags and --config.* overrides."""
    if not args.config:
        raise ValueError("give --config experiments/X.py[:variant]")
    if not args.workdir or not is_gcs(args.workdir):
        raise ValueError(f"--workdir {args.workdir} must be gs://bucket/path: all hosts "
                         "share it and it survives preemption")
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        raise ValueError(f"unknown arguments {bad}; overrides look like --config.a.b=value")
    out = ["--config", args.config, "--workdir", args.workdir, "--mode", args.mode]
    if args.checkpoint:
        out += ["--checkpoint", args.checkpoint]
    return out + extra


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("create", "setup", "run", "watch", "status", "delete"):
        p = sub.add_parser(name)
        p.add_argument("name", help="TPU VM name")
        p.add_argument("--zone", required=True)
        p.add_argument("--project", default="")
        p.add_argument("--accelerator-type", default="v4-8",
                       help="v4-8, v4-32, v5litepod-8, v5litepod-16, v5p-8, v6e-8, ...")
        p.add_argument("--runtime-version", default="")
        p.add_argument("--spot", action="store_true", help="spot capacity (queued resource)")
        p.add_argument("--dry-run", action="store_true", help="print commands, run nothing")
        p.add_argument("--remote-dir", default="diffjax")
        p.add_argument("--remote-python", default="python3")
        if name == "create":
            p.add_argument("--no-wait", action="store_true",
                           help="do not wait for a queued resource to become ACTIVE")
        if name in ("setup", "watch"):
            p.add_argument("--repo", default=".", help="local checkout to copy")
            p.add_argument("--git-url", default="", help="clone this URL instead of copying")
            p.add_argument("--git-ref", default="main")
        if name in ("run", "watch"):
            p.add_argument("--config")
            p.add_argument("--workdir")
            p.add_argument("--mode", default="train")
            p.add_argument("--checkpoint")
        if name == "watch":
            p.add_argument("--max-restarts", type=int, default=10)
            p.add_argument("--backoff", type=float, default=60.0, help="first wait, seconds")
            p.add_argument("--max-backoff", type=float, default=1800.0)
            p.add_argument("--poll", type=float, default=30.0)
            p.add_argument("--grace", type=float, default=60.0)
            p.add_argument("--delete-when-done", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    try:
        if extra and args.command not in ("run", "watch"):
            raise ValueError(f"unknown arguments {extra}")
        tpu = gcloud.Tpu(name=args.name, zone=args.zone, accelerator_type=args.accelerator_type,
                         runtime_version=args.runtime_version, project=args.project,
                         spot=args.spot, remote_dir=args.remote_dir, python=args.remote_python)
        timing = Timing()
        if args.command == "watch":
            timing = Timing(poll=args.poll, backoff=args.backoff,
                            max_backoff=args.max_backoff, grace=args.grace)
        ops = TpuOps(tpu, Shell(dry_run=args.dry_run), timing)
        if args.command == "create":
            ops.create(wait=not args.no_wait)
        elif args.command == "setup":
            ops.setup(Path(args.repo), args.git_url, args.git_ref)
        elif args.command == "run":
            return ops.run(main_args_from(args, extra))
        elif args.command == "watch":
            return ops.watch(main_args_from(args, extra), repo=Path(args.repo),
                             git_url=args.git_url, git_ref=args.git_ref,
                             max_restarts=args.max_restarts,
                             delete_when_done=args.delete_when_done)
        elif args.command == "status":
            print(f"{tpu.name}: {ops.state()}")
        elif args.command == "delete":
            ops.delete()
        return 0
    except (ValueError, CommandError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
