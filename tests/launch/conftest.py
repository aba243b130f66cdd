"""Launch-test fixtures: stand-ins for diffjax.main and gcloud (no training, no network).

``write_fake_main`` writes a script that parses the diffjax.main command line, records it,
writes ``eval/<name>.json`` in eval mode with a metric computed from the overrides, and
fails when asked to. ``write_fake_gcloud`` puts an executable ``gcloud`` on a directory
that records its argv in a JSON state file and answers from scripted sequences there.
"""

import json
import os
import stat
import sys
from pathlib import Path

import pytest

FAKE_MAIN = r'''
import json, os, sys, time
args = sys.argv[1:]
opts = {args[i]: args[i + 1] for i in range(0, len(args) - 1) if args[i] in
        ("--config", "--workdir", "--mode", "--checkpoint")}
over = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
wd = opts["--workdir"]
os.makedirs(wd, exist_ok=True)
with open(os.path.join(wd, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
print("fake main", opts["--mode"], over)
if over.get("sampler.name") == "broken":
    print("boom: sampler 'broken' is not a sampler", file=sys.stderr)
    sys.exit(3)
if opts["--mode"] == "eval":
    scale = float(over.get("guidance.scale", "0"))
    fd = {"ddim": 10.0, "dpmpp_2m": 8.0}.get(over.get("sampler.name"), 9.0) + (scale - 1.5) ** 2
    os.makedirs(os.path.join(wd, "eval"), exist_ok=True)
    rec = {"name": "fd", "metrics": {"fd_fashion_mnist": fd, "class_accuracy": 0.5},
           "sampler": over.get("sampler.name", "ddim"), "num_steps": 50, "nfe": 50,
           "guidance": {"type": "classifier_free", "scale": scale},
           "checkpoint_step": 1500, "wall_time_s": 0.1}
    with open(os.path.join(wd, "eval", "fd.json"), "w") as f:
        json.dump(rec, f)
'''

FAKE_GCLOUD = r'''
import fcntl, json, os, sys
path = os.environ["FAKE_GCLOUD_STATE"]
lock = open(path + ".lock", "w")
fcntl.flock(lock, fcntl.LOCK_EX)  # parallel sweeps call gcloud concurrently
with open(path) as f:
    st = json.load(f)
args = sys.argv[1:]
st.setdefault("calls", []).append(args)

def pop(key, default):
    seq = st.get(key) or [default]
    return seq.pop(0) if len(seq) > 1 else seq[0]

rc, out = 0, ""
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    out = pop("qr_states", "ACTIVE")
elif args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    out = pop("node_states", "READY")
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and any("diffjax.main" in a for a in args):
    rc = pop("run_codes", 0)
    print("remote run exit", rc)
elif args[:2] == ["storage", "cp"]:
    with open(args[2]) as f:
        st.setdefault("uploads", {})[args[3]] = json.load(f)
elif args[:2] == ["storage", "rsync"]:
    # gs://<path> is the local directory $FAKE_GCS/<path>; apply --exclude like gcloud.
    import re, shutil
    src = os.path.join(os.environ["FAKE_GCS"], args[2][len("gs://"):])
    exclude = re.compile([a for a in args if a.startswith("--exclude=")][0][len("--exclude="):])
    for d, _, files in os.walk(src):
        for name in files:
            rel = os.path.relpath(os.path.join(d, name), src)
            if not exclude.match(rel):
                os.makedirs(os.path.dirname(os.path.join(args[3], rel)), exist_ok=True)
                shutil.copy(os.path.join(d, name), os.path.join(args[3], rel))
elif args[:2] == ["storage", "ls"]:
    out = "\n".join(st.get("ls", []))
    rc = 0 if out else 1
if out == "MISSING":
    out, rc = "", 1
with open(path, "w") as f:
    json.dump(st, f)
if out:
    print(out)
sys.exit(rc)
'''


def _write_exec(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def write_fake_main(directory: Path) -> Path:
    return _write_exec(directory / "fake_main.py", FAKE_MAIN)


class FakeGcloud:
    """A recording ``gcloud`` on PATH; ``calls`` are the argv lists it received."""

    def __init__(self, directory: Path, monkeypatch, **script):
        bin_dir = directory / "bin"
        bin_dir.mkdir()
        _write_exec(bin_dir / "gcloud", FAKE_GCLOUD)
        self.state = directory / "gcloud_state.json"
        self.state.write_text(json.dumps(script))
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_GCLOUD_STATE", str(self.state))

    @property
    def calls(self) -> list[list[str]]:
        return json.loads(self.state.read_text()).get("calls", [])

    def commands(self) -> list[str]:
        """Each call as 'gcloud <args>' text."""
        return ["gcloud " + " ".join(c) for c in self.calls]


@pytest.fixture
def fake_main(tmp_path) -> Path:
    """Path of a stand-in for diffjax.main, passed as --main-module."""
    return write_fake_main(tmp_path)


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """Factory: fake_gcloud(qr_states=[...], run_codes=[...], ...) -> FakeGcloud on PATH."""
    return lambda **script: FakeGcloud(tmp_path, monkeypatch, **script)
