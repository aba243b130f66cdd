"""Sweep markers (sweep_run.json, sweep_done.json, sweep_failed.json) under a sweep root.

The root is a local directory or a ``gs://`` URL. Local roots are read and written
directly; GCS roots go through ``gcloud storage`` via a ``Shell``, so every access is
printed and a dry run touches nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from launch import gcloud
from launch.shell import Shell

RUN_MARKER = "sweep_run.json"
DONE_MARKER = "sweep_done.json"
FAILED_MARKER = "sweep_failed.json"


def is_gcs(path: str | os.PathLike) -> bool:
    return str(path).startswith("gs://")


def join(root: str, *parts: str) -> str:
    """Joins path parts for local paths and gs:// URLs alike."""
    return "/".join([str(root).rstrip("/"), *parts]) if is_gcs(root) else str(
        Path(root).joinpath(*parts))


class LocalStore:
    """Markers in a local sweep root."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def finished(self) -> set[str]:
        """Names of runs whose done marker exists."""
        if not self.root.is_dir():
            return set()
        return {p.parent.name for p in self.root.glob(f"*/{DONE_MARKER}")}

    def write_json(self, run: str, filename: str, obj: Any) -> None:
        path = self.root / run / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=repr) + "\n")
        os.replace(tmp, path)

    def remove(self, run: str, filename: str) -> None:
        (self.root / run / filename).unlink(missing_ok=True)


class GcsStore:
    """Markers under a gs:// sweep root, through ``gcloud storage``."""

    def __init__(self, root: str, shell: Shell):
        self.root = root.rstrip("/")
        self.shell = shell

    def finished(self) -> set[str]:
        """Names of runs whose done marker exists (one ``gcloud storage ls``)."""
        if self.shell.dry_run:
            self.shell.say("# dry run: finished runs under gs:// are not checked")
        result = self.shell.run(gcloud.storage_ls(f"{self.root}/*/{DONE_MARKER}"),
                                check=False, capture=True)
        if result.returncode != 0 and not self.shell.dry_run:
            self.shell.say(f"# no finished runs under {self.root} (the error above is "
                           "expected for a new sweep)")
        names = set()
        for line in result.stdout.splitlines():
            line = line.strip()
            if line.startswith(self.root + "/") and line.endswith("/" + DONE_MARKER):
                names.add(line[len(self.root) + 1:-len(DONE_MARKER) - 1])
        return names

    def write_json(self, run: str, filename: str, obj: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / filename
            local.write_text(json.dumps(obj, indent=2, default=repr) + "\n")
            self.shell.run(gcloud.storage_cp(str(local), f"{self.root}/{run}/{filename}"))

    def remove(self, run: str, filename: str) -> None:
        """Left in place on GCS: a done marker takes precedence over a failed one."""


def make_store(root: str, shell: Shell) -> LocalStore | GcsStore:
    return GcsStore(root, shell) if is_gcs(root) else LocalStore(root)
