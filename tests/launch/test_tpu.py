"""TPU VM scripts: exact gcloud command lines of dry runs, and the real code paths (setup,
watch with preemption restarts, sweeps on TPU VMs) against a recording fake ``gcloud``."""

import json
import subprocess
import tarfile
import tempfile

from launch import gcloud
from launch import sweep as sweep_cli
from launch import tpu as tpu_cli
from launch.shell import Shell
from launch.tpu import Timing, TpuOps

Z = "--zone=us-central2-b"
RUN_ARGS = ["--config", "experiments/fashion_mnist.py", "--workdir", "gs://bkt/fm"]
MAIN = ("'--command=cd diffjax && python3 -m diffjax.main --config experiments/fashion_mnist.py"
        " --workdir gs://bkt/fm --mode train --config.guidance.scale=3.0"
        " --compilation_cache_dir gs://bkt/fm/jax_compilation_cache'")
INSTALL = ("'--command=python3 -m pip install -U \"jax[tpu]\" && cd diffjax && "
           "python3 -m pip install -e \".[gcs]\"'")


def printed(capsys, argv) -> list[str]:
    assert tpu_cli.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_create_delete_lines(capsys):
    assert printed(capsys, ["create", "t1", "--zone", "us-central2-b", "--accelerator-type",
                            "v4-32", "--dry-run"]) == [
        f"+ gcloud compute tpus tpu-vm create t1 {Z} --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base"]
    assert printed(capsys, ["create", "t2", "--zone", "us-west4-a", "--accelerator-type",
                            "v5litepod-16", "--spot", "--project", "proj", "--dry-run"])[0] == (
        "+ gcloud compute tpus queued-resources create t2 --zone=us-west4-a --project=proj "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --node-id=t2 "
        "--spot")
    assert printed(capsys, ["delete", "t2", "--zone", "us-west4-a", "--spot", "--dry-run"]) == [
        "+ gcloud compute tpus queued-resources delete t2 --zone=us-west4-a --force --quiet"]
    assert printed(capsys, ["delete", "t1", "--zone", "us-central2-b", "--dry-run"]) == [
        f"+ gcloud compute tpus tpu-vm delete t1 {Z} --quiet"]
    assert printed(capsys, ["status", "t1", "--zone", "us-central2-b", "--dry-run"])[0] == (
        f"+ gcloud compute tpus tpu-vm describe t1 {Z} '--format=value(state)'")


def test_dry_run_setup_and_run_lines(capsys):
    lines = printed(capsys, ["setup", "t1", "--zone", "us-central2-b", "--dry-run"])
    assert lines[0] == "+ git -C . ls-files --cached --others --exclude-standard -z"
    archive = lines[1].rsplit(" into ", 1)[1]
    assert lines[2:] == [
        f"+ gcloud compute tpus tpu-vm scp {archive} t1:diffjax-src.tar.gz {Z} --worker=all",
        f"+ gcloud compute tpus tpu-vm ssh t1 {Z} --worker=all '--command=rm -rf diffjax && "
        "mkdir -p diffjax && tar -xzf diffjax-src.tar.gz -C diffjax'",
        f"+ gcloud compute tpus tpu-vm ssh t1 {Z} --worker=all {INSTALL}"]
    lines = printed(capsys, ["setup", "t1", "--zone", "us-central2-b", "--dry-run",
                             "--git-url", "https://example.org/diffjax.git", "--git-ref", "v1"])
    assert lines[0] == (f"+ gcloud compute tpus tpu-vm ssh t1 {Z} --worker=all '--command=rm -rf "
                        "diffjax && git clone https://example.org/diffjax.git diffjax && "
                        "git -C diffjax checkout v1'")
    assert printed(capsys, ["run", "t1", "--zone", "us-central2-b", "--dry-run", *RUN_ARGS,
                            "--config.guidance.scale=3.0"]) == [
        f"+ gcloud compute tpus tpu-vm ssh t1 {Z} --worker=all "
        f"--ssh-flag=-oServerAliveInterval=60 {MAIN}"]


def test_the_compilation_cache_is_the_workdirs_unless_one_is_given():
    """All hosts read one cache on gs:// (JAX writes it from process 0 alone) that outlives a
    recreated VM; a cache named in the arguments, or a local workdir, is left as it is."""
    tpu = gcloud.Tpu("t1", "z", "v4-32")
    run = ["--config", "c.py", "--workdir", "gs://bkt/run/", "--mode", "train"]
    assert gcloud.main_command(tpu, run).endswith(
        "--compilation_cache_dir gs://bkt/run/jax_compilation_cache")
    mine = [*run, "--compilation_cache_dir", "gs://bkt/cache"]
    assert gcloud.main_command(tpu, mine).endswith("--mode train --compilation_cache_dir "
                                                   "gs://bkt/cache")
    assert "compilation_cache" not in gcloud.main_command(tpu, ["--workdir", "runs/x"])


def test_run_rejects_local_workdir_and_unknown_args(capsys):
    assert tpu_cli.main(["run", "t1", "--zone", "z", "--config", "c.py",
                         "--workdir", "runs/x"]) == 2
    assert "gs://" in capsys.readouterr().err
    assert tpu_cli.main(["run", "t1", "--zone", "z", *RUN_ARGS, "--lr=3"]) == 2
    assert "--config.a.b=value" in capsys.readouterr().err
    assert tpu_cli.main(["create", "t1", "--zone", "z", "--accelerator-type", "x9-8"]) == 2
    assert "--runtime-version" in capsys.readouterr().err


def test_setup_packs_git_files_and_copies_them(tmp_path, fake_gcloud, monkeypatch, capsys):
    repo = tmp_path / "repo"
    (repo / "diffjax").mkdir(parents=True)
    (repo / "diffjax" / "a.py").write_text("A = 1\n")
    (repo / "new_config.py").write_text("untracked but not ignored\n")
    (repo / "runs").mkdir()
    (repo / "runs" / "big.npz").write_text("ignored")
    (repo / ".gitignore").write_text("runs/\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "diffjax/a.py", ".gitignore"], check=True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fake = fake_gcloud()
    assert tpu_cli.main(["setup", "t1", "--zone", "us-central2-b", "--repo", str(repo)]) == 0
    archive = tmp_path / "diffjax-src-t1.tar.gz"
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [".gitignore", "diffjax/a.py", "new_config.py"]
    assert [c[:4] for c in fake.calls] == [["compute", "tpus", "tpu-vm", "scp"]] + [
        ["compute", "tpus", "tpu-vm", "ssh"]] * 2
    assert fake.calls[0][4:6] == [str(archive), "t1:diffjax-src.tar.gz"]


def _kinds(calls):
    """Short names of the fake gcloud calls, in order."""
    out = []
    for c in calls:
        if c[0] == "storage":
            out.append(c[1])
        elif c[3] == "ssh":
            cmd = c[-1]
            out.append("run" if "diffjax.main" in cmd else "install" if "pip" in cmd else "code")
        else:
            out.append(c[3])
    return out


def test_watch_recreates_preempted_spot_vm_and_resumes(fake_gcloud, capsys):
    fake = fake_gcloud(
        qr_states=["MISSING", "WAITING_FOR_RESOURCES", "ACTIVE", "SUSPENDED", "SUSPENDED",
                   "ACTIVE"],
        run_codes=[255, 0])
    rc = tpu_cli.main(["watch", "t1", "--zone", "us-central2-b", "--spot", *RUN_ARGS,
                       "--git-url", "https://example.org/d.git", "--poll", "0", "--backoff",
                       "0", "--grace", "0", "--delete-when-done"])
    assert rc == 0
    assert _kinds(fake.calls) == [
        "describe", "create", "describe", "describe", "code", "install", "run",  # first try
        "describe",  # preempted: SUSPENDED
        "describe", "delete", "create", "describe", "code", "install", "run",  # restart
        "delete"]
    runs = [c for c in fake.calls if "diffjax.main" in c[-1]]
    assert runs[0] == runs[1]  # the same command: diffjax.main resumes from gs:// checkpoints
    assert "--workdir gs://bkt/fm" in runs[0][-1]
    assert "# preempted: restart 1/10 in 0 s" in capsys.readouterr().out


def test_watch_stops_on_failure_of_a_healthy_vm(fake_gcloud, capsys):
    fake = fake_gcloud(qr_states=["ACTIVE"], run_codes=[1])
    rc = tpu_cli.main(["watch", "t1", "--zone", "us-central2-b", "--spot", *RUN_ARGS,
                       "--git-url", "u", "--grace", "0"])
    assert rc == 1
    assert _kinds(fake.calls) == ["describe", "code", "install", "run", "describe", "describe"]
    assert "not restarting" in capsys.readouterr().out


def test_watch_restarts_are_bounded_with_exponential_backoff(fake_gcloud, capsys):
    fake = fake_gcloud(qr_states=["ACTIVE", "SUSPENDED", "SUSPENDED", "ACTIVE", "SUSPENDED",
                                  "SUSPENDED", "ACTIVE", "SUSPENDED"], run_codes=[255])
    sleeps = []
    ops = TpuOps(gcloud.Tpu("t1", "us-central2-b", spot=True), Shell(),
                 Timing(poll=0, backoff=10, max_backoff=15, grace=0), sleep=sleeps.append)
    rc = ops.watch(RUN_ARGS + ["--mode", "train"], repo=None, git_url="u", git_ref="main",
                   max_restarts=2)
    assert rc == 255
    kinds = _kinds(fake.calls)
    assert kinds.count("run") == 3 and kinds.count("create") == 2 and kinds.count("delete") == 2
    assert sleeps == [10, 15]
    assert "giving up (--max-restarts 2)" in capsys.readouterr().out


def test_sweep_on_tpu_vms(tmp_path, fake_gcloud, capsys):
    config = tmp_path / "exp.py"
    config.write_text("")
    sweep_file = tmp_path / "s.py"
    sweep_file.write_text(
        "from launch.spec import Sweep, axis\n"
        f"def get_sweep():\n    return Sweep(config={str(config)!r}, mode='eval', "
        "checkpoint='gs://bkt/fm', axes=axis('guidance.scale', [0.0, 1.0, 2.0]))\n")
    fake = fake_gcloud(ls=["gs://bkt/sw/scale-1/sweep_done.json"])
    rc = sweep_cli.main(["run", str(sweep_file), "--root", "gs://bkt/sw", "--tpu", "a", "b",
                         "--zone", "us-central2-b", "--log-dir", str(tmp_path / "logs")])
    assert rc == 0
    calls = fake.calls
    assert calls[0] == ["storage", "ls", "gs://bkt/sw/*/sweep_done.json"]
    runs = sorted(c[-1] for c in calls if c[3:4] == ["ssh"])
    assert runs == [
        f"--command=cd diffjax && python3 -m diffjax.main --config {config} --workdir "
        f"gs://bkt/sw/scale-{s} --mode eval --checkpoint gs://bkt/fm "
        f"--config.guidance.scale={s}.0 --compilation_cache_dir "
        f"gs://bkt/sw/scale-{s}/jax_compilation_cache" for s in (0, 2)]
    assert {c[4] for c in calls if c[3:4] == ["ssh"]} <= {"a", "b"}
    uploads = json.loads(fake.state.read_text())["uploads"]
    assert sorted(uploads) == [f"gs://bkt/sw/scale-{s}/{m}" for s in (0, 2)
                               for m in ("sweep_done.json", "sweep_run.json")]
    assert uploads["gs://bkt/sw/scale-2/sweep_run.json"]["axes"] == {"guidance.scale": 2.0}
    assert "remote run exit 0" in (tmp_path / "logs" / "scale-0" / "log.txt").read_text()
    assert "# skip scale-1: finished" in capsys.readouterr().out


def test_sweep_on_a_spot_vm_recreates_it_after_preemption(tmp_path, fake_gcloud, capsys):
    from launch.runner import SweepRunner, TpuExecutor
    from launch.spec import Sweep, axis

    config = tmp_path / "exp.py"
    config.write_text("")
    sweep = Sweep(config=str(config), mode="train", axes=axis("diffusion.schedule", ["cosine"]),
                  name="sw")
    fake = fake_gcloud(qr_states=["SUSPENDED", "SUSPENDED", "ACTIVE"], run_codes=[255, 0])
    shell = Shell()
    sleeps = []
    executor = TpuExecutor(shell, [gcloud.Tpu("a", "us-central2-b", spot=True)],
                           max_restarts=2, setup={"git_url": "u"},
                           timing=Timing(poll=0, backoff=7, grace=0), sleep=sleeps.append)
    runner = SweepRunner(sweep, "gs://bkt/sw", executor, shell, log_dir=str(tmp_path / "logs"))
    [result] = runner.run()
    assert result.status == "done"
    assert [k for k in _kinds(fake.calls) if k != "ls"] == [
        "cp", "run", "describe", "describe", "delete", "create", "describe", "code", "install",
        "run", "cp"]
    assert sleeps == [7]
    assert "# a was preempted: recreate it and rerun (1/2) in 7 s" in capsys.readouterr().out
