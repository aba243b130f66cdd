"""Runs external commands, printing each one first; with ``dry_run`` it only prints.

Every command any launch script executes goes through ``Shell.run``, so the printed
``+ ...`` lines are a faithful, copy-pasteable transcript of what happens.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import TextIO


class CommandError(RuntimeError):
    """A command exited with a non-zero code where success was required."""


@dataclasses.dataclass(frozen=True)
class Result:
    """Outcome of one command: exit code and captured stdout ('' when not captured)."""

    returncode: int
    stdout: str = ""


class Shell:
    """Prints and runs commands; thread-safe printing for parallel sweeps.

    Args:
      dry_run: print the commands, run nothing, and report success with empty output.
      out: where the transcript goes (stdout by default).
    """

    def __init__(self, dry_run: bool = False, out: TextIO | None = None):
        self.dry_run = dry_run
        self.out = out if out is not None else sys.stdout
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        """Prints one line of the transcript (comments start with '#')."""
        with self._lock:
            print(text, file=self.out, flush=True)

    def run(self, argv: list[str], *, check: bool = True, capture: bool = False,
            log: Path | None = None, env: dict[str, str] | None = None) -> Result:
        """Prints ``+ argv`` then runs it (unless dry run).

        Args:
          argv: the command; argv[0] is looked up on PATH.
          check: raise CommandError on a non-zero exit code.
          capture: return stdout as text (stderr still goes to the terminal or the log).
          log: append stdout and stderr to this file instead of the terminal.
          env: full environment for the child (default: inherit).
        """
        suffix = f" >> {shlex.quote(str(log))} 2>&1" if log is not None else ""
        self.say("+ " + shlex.join(argv) + suffix)
        if self.dry_run:
            return Result(0, "")
        try:
            if log is not None:
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "ab") as f:
                    proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
                stdout = ""
            else:
                proc = subprocess.run(argv, stdout=subprocess.PIPE if capture else None,
                                      text=True, env=env)
                stdout = proc.stdout or ""
        except FileNotFoundError as e:
            raise CommandError(f"{argv[0]!r} not found on PATH ({e}); install it or fix PATH")
        if check and proc.returncode != 0:
            raise CommandError(f"exit code {proc.returncode} from: {shlex.join(argv)}")
        return Result(proc.returncode, stdout)
