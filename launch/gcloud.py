"""The exact ``gcloud`` command lines used by the launch scripts, as pure functions.

A ``Tpu`` names one TPU VM (single host like v4-8 / v5litepod-8, or a pod slice like
v4-32 / v5litepod-16 with several hosts). On-demand VMs use ``gcloud compute tpus tpu-vm
create``; spot capacity uses a queued resource (``gcloud compute tpus queued-resources
create --spot``) whose id and node id are both the TPU's name. Commands on the VM run on
every host (``--worker=all``) from the home directory, where the code lives in
``Tpu.remote_dir``.
"""

from __future__ import annotations

import dataclasses
import shlex

# Runtime (software) versions for JAX per TPU generation, from Google's "TPU software
# versions" page (cloud.google.com/tpu/docs/runtimes); override with --runtime-version.
RUNTIME_VERSIONS = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
# Queued-resource states after which the TPU is gone and must be recreated.
QR_GONE = ("SUSPENDING", "SUSPENDED", "FAILED", "MISSING")
# TPU VM node states after which it must be recreated.
NODE_GONE = ("PREEMPTED", "TERMINATED", "MISSING")


@dataclasses.dataclass(frozen=True)
class Tpu:
    """One TPU VM (or pod slice) and how to reach it.

    Attributes:
      name: TPU VM name (also the queued resource's id with ``spot``).
      zone: e.g. us-central2-b (v4), us-west4-a / us-central1-a (v5e), us-east5-b (v6e).
      accelerator_type: v4-8, v4-32, v5litepod-8, v5litepod-16, v5p-8, v6e-8, ...
      runtime_version: TPU software version; defaults from RUNTIME_VERSIONS.
      project: GCP project (default: gcloud's configured project).
      spot: request spot capacity through a queued resource.
      remote_dir: code directory on every host, relative to the home directory.
      python: Python interpreter on the hosts.
    """

    name: str
    zone: str
    accelerator_type: str = "v4-8"
    runtime_version: str = ""
    project: str = ""
    spot: bool = False
    remote_dir: str = "diffjax"
    python: str = "python3"

    def __post_init__(self):
        for field, value in (("name", self.name), ("zone", self.zone)):
            if not value or any(c.isspace() for c in value):
                raise ValueError(f"TPU {field} {value!r} must be a non-empty word")
        if not self.runtime_version:
            generation = self.accelerator_type.rsplit("-", 1)[0]
            if generation not in RUNTIME_VERSIONS:
                raise ValueError(
                    f"no default runtime version for accelerator type "
                    f"{self.accelerator_type!r}; pass --runtime-version (known: "
                    f"{sorted(RUNTIME_VERSIONS)})")
            object.__setattr__(self, "runtime_version", RUNTIME_VERSIONS[generation])
        if self.remote_dir.startswith(("/", "~")) or " " in self.remote_dir:
            raise ValueError(f"remote_dir {self.remote_dir!r} must be relative to the home "
                             "directory and contain no spaces, e.g. 'diffjax'")


def _where(tpu: Tpu) -> list[str]:
    return [f"--zone={tpu.zone}"] + ([f"--project={tpu.project}"] if tpu.project else [])


def create(tpu: Tpu) -> list[str]:
    """Creates the VM: a spot queued resource, or an on-demand TPU VM (waits until made)."""
    if tpu.spot:
        return ["gcloud", "compute", "tpus", "queued-resources", "create", tpu.name,
                *_where(tpu), f"--accelerator-type={tpu.accelerator_type}",
                f"--runtime-version={tpu.runtime_version}", f"--node-id={tpu.name}", "--spot"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", tpu.name, *_where(tpu),
            f"--accelerator-type={tpu.accelerator_type}", f"--version={tpu.runtime_version}"]


def delete(tpu: Tpu) -> list[str]:
    """Deletes the VM; for spot, the queued resource and its node (``--force``)."""
    if tpu.spot:
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", tpu.name,
                *_where(tpu), "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", tpu.name, *_where(tpu), "--quiet"]


def queued_state(tpu: Tpu) -> list[str]:
    """Prints the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...)."""
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", tpu.name,
            *_where(tpu), "--format=value(state.state)"]


def node_state(tpu: Tpu) -> list[str]:
    """Prints the TPU VM's state (CREATING, READY, PREEMPTED, ...)."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", tpu.name, *_where(tpu),
            "--format=value(state)"]


def ssh(tpu: Tpu, command: str, *, keepalive: bool = False) -> list[str]:
    """Runs a shell command on every host; ``keepalive`` notices a vanished VM within ~3 min."""
    flags = ["--ssh-flag=-oServerAliveInterval=60"] if keepalive else []
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu.name, *_where(tpu),
            "--worker=all", *flags, f"--command={command}"]


def scp(tpu: Tpu, local: str, remote: str) -> list[str]:
    """Copies a local file to ``remote`` (relative to home) on every host."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{tpu.name}:{remote}",
            *_where(tpu), "--worker=all"]


def unpack_command(tpu: Tpu, archive: str) -> str:
    """Shell command on the hosts replacing remote_dir with the archive's contents."""
    d = shlex.quote(tpu.remote_dir)
    return f"rm -rf {d} && mkdir -p {d} && tar -xzf {shlex.quote(archive)} -C {d}"


def clone_command(tpu: Tpu, url: str, ref: str) -> str:
    """Shell command on the hosts replacing remote_dir with a git checkout of url at ref."""
    d = shlex.quote(tpu.remote_dir)
    return (f"rm -rf {d} && git clone {shlex.quote(url)} {d} && "
            f"git -C {d} checkout {shlex.quote(ref)}")


def install_command(tpu: Tpu) -> str:
    """Shell command on the hosts installing JAX for TPU, then diffjax from remote_dir with
    its ``gcs`` extra (gcsfs: the runs' workdirs are on gs://)."""
    py, d = tpu.python, shlex.quote(tpu.remote_dir)
    return (f'{py} -m pip install -U "jax[tpu]" && '
            f'cd {d} && {py} -m pip install -e ".[gcs]"')


CACHE_SUBDIR = "jax_compilation_cache"


def main_command(tpu: Tpu, args: list[str]) -> str:
    """Shell command on the hosts running ``python -m diffjax.main ARGS`` in remote_dir.

    Unless ARGS name one, the compilation cache is ``WORKDIR/jax_compilation_cache`` of a
    gs:// workdir: JAX writes cache entries from process 0 alone and reads them on every
    host, so a cache on each host's disk would leave all hosts but the first compiling
    afresh after a restart, and a preempted spot VM is recreated without its disk."""
    if "--compilation_cache_dir" not in args and "--workdir" in args:
        workdir = args[args.index("--workdir") + 1]
        if workdir.startswith("gs://"):
            args = [*args, "--compilation_cache_dir", f"{workdir.rstrip('/')}/{CACHE_SUBDIR}"]
    return f"cd {shlex.quote(tpu.remote_dir)} && " + shlex.join(
        [tpu.python, "-m", "diffjax.main", *args])


def storage_ls(pattern: str) -> list[str]:
    return ["gcloud", "storage", "ls", pattern]


def storage_cp(src: str, dst: str) -> list[str]:
    return ["gcloud", "storage", "cp", src, dst]


def storage_rsync_json(src: str, dst: str) -> list[str]:
    """Copies only the small *.json / *.jsonl files of a sweep root (records, configs and the
    trainer's metrics.jsonl, whose steps/s collect reports; never checkpoints) to dst."""
    exclude = r"(^|.*/)checkpoints/.*|^(?!.*\.jsonl?$).*"
    return ["gcloud", "storage", "rsync", src, dst, "--recursive", f"--exclude={exclude}"]
