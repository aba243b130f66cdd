"""Local sweep runner with a stand-in for diffjax.main: commands, markers, failures,
skip-finished, parallel runs and dry runs."""

import json
import sys

from launch import sweep as sweep_cli

SWEEP = '''
from launch.spec import Sweep, axis, product
def get_sweep():
    return Sweep(config={config!r}, mode={mode!r}, checkpoint={checkpoint!r},
                 overrides={{"eval.num_samples": 100}},
                 axes=product(axis("sampler.name", {samplers!r}),
                              axis("guidance.scale", [0.0, 3.0])))
'''


def write_sweep(tmp_path, samplers=("ddim", "dpmpp_2m"), mode="eval", checkpoint="ckpt"):
    config = tmp_path / "exp.py"
    config.write_text("def get_config(arg=None):\n    return None\n")
    ckpt = tmp_path / checkpoint
    ckpt.mkdir(exist_ok=True)
    path = tmp_path / "my_sweep.py"
    path.write_text(SWEEP.format(config=str(config), mode=mode, checkpoint=str(ckpt),
                                 samplers=list(samplers)))
    return path, config, ckpt


def run(args) -> int:
    return sweep_cli.main(["run", *map(str, args)])


def test_eval_sweep_runs_every_run_with_its_overrides(tmp_path, fake_main, capsys):
    sweep_file, config, ckpt = write_sweep(tmp_path)
    root = tmp_path / "root"
    assert run([sweep_file, "--root", root, "--main-module", fake_main]) == 0
    names = sorted(p.name for p in root.iterdir())
    assert names == ["sampler-ddim_scale-0", "sampler-ddim_scale-3",
                     "sampler-dpmpp_2m_scale-0", "sampler-dpmpp_2m_scale-3"]
    calls = [json.loads(line) for line in
             (root / "sampler-dpmpp_2m_scale-3" / "calls.jsonl").read_text().splitlines()]
    assert calls == [["--config", str(config), "--workdir",
                      str(root / "sampler-dpmpp_2m_scale-3"), "--mode", "eval",
                      "--checkpoint", str(ckpt), "--config.eval.num_samples=100",
                      "--config.sampler.name=dpmpp_2m", "--config.guidance.scale=3.0"]]
    run_info = json.loads((root / "sampler-dpmpp_2m_scale-3" / "sweep_run.json").read_text())
    assert run_info["axes"] == {"sampler.name": "dpmpp_2m", "guidance.scale": 3.0}
    assert run_info["labels"] == {"sampler.name": "sampler", "guidance.scale": "scale"}
    assert run_info["commands"][0].startswith(f"{sys.executable} {fake_main} --config")
    for n in names:
        assert (root / n / "sweep_done.json").exists()
        assert "fake main eval" in (root / n / "log.txt").read_text()
    out = capsys.readouterr().out
    assert f"+ {sys.executable} {fake_main} --config {config}" in out
    assert "# summary: 4 done, 0 skipped, 0 failed" in out


def test_failed_run_is_reported_others_go_on_and_rerun_skips_finished(tmp_path, fake_main,
                                                                        capsys):
    sweep_file, _, _ = write_sweep(tmp_path, samplers=("ddim", "broken"))
    root = tmp_path / "root"
    args = [sweep_file, "--root", root, "--main-module", fake_main]
    assert run(args) == 1
    out = capsys.readouterr().out
    assert "# summary: 2 done, 0 skipped, 2 failed" in out
    assert "# FAILED sampler-broken_scale-0: exit code 3 in mode eval; log: " in out
    failed = json.loads((root / "sampler-broken_scale-0" / "sweep_failed.json").read_text())
    assert failed["returncode"] == 3 and failed["mode"] == "eval"
    assert "boom" in (root / "sampler-broken_scale-0" / "log.txt").read_text()
    assert not (root / "sampler-broken_scale-0" / "sweep_done.json").exists()

    # Re-run: the two finished runs are skipped, the failing ones are retried (and fail).
    assert run(args) == 1
    out = capsys.readouterr().out
    assert "# skip sampler-ddim_scale-0: finished" in out
    assert "# skip sampler-ddim_scale-3: finished" in out
    assert "# summary: 0 done, 2 skipped, 2 failed" in out
    assert len((root / "sampler-ddim_scale-0" / "calls.jsonl").read_text().splitlines()) == 1
    assert len((root / "sampler-broken_scale-3" / "calls.jsonl").read_text().splitlines()) == 2


def test_train_then_eval_modes_and_parallel(tmp_path, fake_main, capsys):
    sweep_file, _, _ = write_sweep(tmp_path, mode=("train", "eval"))
    root = tmp_path / "root"
    assert run([sweep_file, "--root", root, "--main-module", fake_main, "--parallel", 2]) == 0
    calls = [json.loads(line) for line in
             (root / "sampler-ddim_scale-0" / "calls.jsonl").read_text().splitlines()]
    assert [c[c.index("--mode") + 1] for c in calls] == ["train", "eval"]
    # The shared checkpoint is for sample/eval only: training uses the run's own workdir.
    assert "--checkpoint" not in calls[0] and "--checkpoint" in calls[1]
    assert "4 done" in capsys.readouterr().out


def test_dry_run_prints_commands_and_writes_nothing(tmp_path, fake_main, capsys):
    sweep_file, config, _ = write_sweep(tmp_path)
    root = tmp_path / "root"
    assert run([sweep_file, "--root", root, "--main-module", fake_main, "--dry-run"]) == 0
    assert not root.exists()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("+ ")]
    assert len(lines) == 4
    assert lines[0] == (f"+ {sys.executable} {fake_main} --config {config} --workdir "
                        f"{root}/sampler-ddim_scale-0 --mode eval --checkpoint "
                        f"{tmp_path}/ckpt --config.eval.num_samples=100 "
                        f"--config.sampler.name=ddim --config.guidance.scale=0.0 >> "
                        f"{root}/sampler-ddim_scale-0/log.txt 2>&1")
    assert f"# would write {root}/sampler-ddim_scale-0/sweep_done.json" in out
    assert "# summary: 4 planned, 0 skipped" in out


def test_bad_input_is_one_line_error(tmp_path, fake_main, capsys):
    sweep_file, _, ckpt = write_sweep(tmp_path)
    ckpt.rmdir()
    assert run([sweep_file, "--root", tmp_path / "r", "--main-module", fake_main]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and err.count("\n") == 1
    assert run([sweep_file, "--root", tmp_path / "r", "--tpu", "t1"]) == 2
    assert "--zone" in capsys.readouterr().err
    assert run([sweep_file, "--root", tmp_path / "r", "--tpu", "t1", "--zone", "z"]) == 2
    assert "gs://" in capsys.readouterr().err


def test_parallel_must_be_positive(tmp_path, capsys):
    sweep_file, _, _ = write_sweep(tmp_path)
    assert run([sweep_file, "--root", tmp_path / "r", "--parallel", 0]) == 2
    assert "--parallel" in capsys.readouterr().err
