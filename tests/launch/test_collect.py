"""collect: every run's eval/*.json and axis values into CSV, Markdown and per-axis plots."""

import csv
import json

import pytest

from launch import collect, sweep as sweep_cli


def make_run(root, name, axes, labels, *, metrics=None, done=True, failed=False,
             eval_name="fd"):
    d = root / name
    (d / "eval").mkdir(parents=True, exist_ok=True)
    (d / "sweep_run.json").write_text(json.dumps({"name": name, "axes": axes, "labels": labels}))
    if metrics is not None:
        (d / "eval" / f"{eval_name}.json").write_text(json.dumps({
            "name": eval_name, "metrics": metrics, "sampler": axes.get("sampler.name", "ddim"),
            "num_steps": 20, "nfe": 39, "guidance": {"type": "classifier_free",
                                                     "scale": axes.get("guidance.scale", 0)},
            "checkpoint_step": 1500, "wall_time_s": 1.25}))
    if done:
        (d / "sweep_done.json").write_text("{}")
    if failed:
        (d / "sweep_failed.json").write_text("{}")


LABELS = {"sampler.name": "sampler", "guidance.scale": "scale"}
FD = {("ddim", 0.0): 12.5, ("ddim", 3.0): 9.25, ("heun", 0.0): 11.0, ("heun", 3.0): 7.5}


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "sweep"
    for (s, g), fd in FD.items():
        make_run(root, f"sampler-{s}_scale-{g:g}", {"sampler.name": s, "guidance.scale": g},
                 LABELS, metrics={"fd_fashion_mnist": fd, "class_accuracy": 0.75})
    make_run(root, "sampler-bad_scale-0", {"sampler.name": "bad", "guidance.scale": 0.0},
             LABELS, done=False, failed=True)
    return root


def test_table_rows_and_files(root, tmp_path):
    result = collect.collect(root, tmp_path / "out", metric="fd_fashion_mnist")
    with open(result["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["sampler-bad_scale-0", "sampler-ddim_scale-0",
                                         "sampler-ddim_scale-3", "sampler-heun_scale-0",
                                         "sampler-heun_scale-3"]
    assert list(table[0])[:4] == ["run", "status", "sampler.name", "guidance.scale"]
    assert table[0]["status"] == "failed" and table[0]["metric/fd_fashion_mnist"] == ""
    row = table[2]
    assert row["status"] == "done" and row["sampler.name"] == "ddim"
    assert float(row["guidance.scale"]) == 3.0
    assert float(row["metric/fd_fashion_mnist"]) == 9.25
    assert row["nfe"] == "39" and row["checkpoint_step"] == "1500"
    md = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert md[0].startswith("| run | status | sampler.name | guidance.scale |")
    assert len(md) == 2 + 5 and "| sampler-heun_scale-3 | done | heun | 3 |" in md[-1]
    assert [p.name for p in result["plots"]] == ["fd_fashion_mnist_vs_sampler.png",
                                                 "fd_fashion_mnist_vs_scale.png"]
    for p in result["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_series_along_each_axis(root):
    rows, keys, labels = collect.gather(root)
    values, groups = collect.series(rows, keys, labels, "guidance.scale", "fd_fashion_mnist")
    assert values == [0.0, 3.0]
    assert groups == {"sampler=ddim": [(0.0, 12.5), (3.0, 9.25)],
                      "sampler=heun": [(0.0, 11.0), (3.0, 7.5)]}
    values, groups = collect.series(rows, keys, labels, "sampler.name", "fd_fashion_mnist")
    assert values == ["ddim", "heun"]  # the failed run has no metric, so no point
    assert groups == {"scale=0": [(0, 12.5), (1, 11.0)], "scale=3": [(0, 9.25), (1, 7.5)]}


def test_lines_follow_the_other_axes_when_eval_names_differ_per_run(tmp_path):
    """diffjax names each eval after its own sampler and scale (ddim-25_cfg-3.0): with one
    eval per run those names must not split the lines; with several per run they do."""
    root = tmp_path / "sweep"
    for (s, g), fd in FD.items():
        make_run(root, f"sampler-{s}_scale-{g:g}", {"sampler.name": s, "guidance.scale": g},
                 LABELS, metrics={"fd_fashion_mnist": fd}, eval_name=f"{s}-25_cfg-{g}")
    rows, keys, labels = collect.gather(root)
    _, groups = collect.series(rows, keys, labels, "guidance.scale", "fd_fashion_mnist")
    assert groups == {"sampler=ddim": [(0.0, 12.5), (3.0, 9.25)],
                      "sampler=heun": [(0.0, 11.0), (3.0, 7.5)]}
    make_run(root, "sampler-ddim_scale-0", {"sampler.name": "ddim", "guidance.scale": 0.0},
             LABELS, metrics={"fd_fashion_mnist": 20.0}, eval_name="ddim-50_cfg-0.0")
    rows, keys, labels = collect.gather(root)
    _, groups = collect.series(rows, keys, labels, "guidance.scale", "fd_fashion_mnist")
    assert groups["sampler=ddim, eval=ddim-50_cfg-0.0"] == [(0.0, 20.0)]
    assert groups["sampler=heun, eval=heun-25_cfg-3.0"] == [(3.0, 7.5)]


def test_unknown_metric_and_empty_root(root, tmp_path):
    with pytest.raises(ValueError, match="fid.*class_accuracy"):
        collect.collect(root, tmp_path / "o", metric="fid")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no runs"):
        collect.collect(tmp_path / "empty")


def test_run_then_collect_end_to_end(tmp_path, fake_main, capsys):
    config = tmp_path / "exp.py"
    config.write_text("")
    sweep_file = tmp_path / "s.py"
    sweep_file.write_text(
        "from launch.spec import Sweep, axis, product, zip_\n"
        "def get_sweep():\n"
        f"    return Sweep(config={str(config)!r}, mode='eval', axes=product(\n"
        "        zip_(axis('sampler.name', ['ddim', 'dpmpp_2m']),\n"
        "             axis('sampler.num_steps', [50, 25])),\n"
        "        axis('guidance.scale', [1.0, 2.0])))\n")
    root = tmp_path / "root"
    assert sweep_cli.main(["run", str(sweep_file), "--root", str(root),
                           "--main-module", str(fake_main)]) == 0
    assert sweep_cli.main(["collect", "--root", str(root), "--metric", "fd_fashion_mnist"]) == 0
    out = capsys.readouterr().out
    assert "| sampler-dpmpp_2m_num_steps-25_scale-2 | done | dpmpp_2m | 25 | 2 |" in out
    rows, keys, labels = collect.gather(root)
    assert keys == ["sampler.name", "sampler.num_steps", "guidance.scale"]
    by_run = {r["run"]: r["metric/fd_fashion_mnist"] for r in rows}
    # The stand-in's metric: 10 (ddim) or 8 (dpmpp_2m) + (scale - 1.5)^2.
    assert by_run == {"sampler-ddim_num_steps-50_scale-1": 10.25,
                      "sampler-ddim_num_steps-50_scale-2": 10.25,
                      "sampler-dpmpp_2m_num_steps-25_scale-1": 8.25,
                      "sampler-dpmpp_2m_num_steps-25_scale-2": 8.25}
    assert (root / "fd_fashion_mnist_vs_num_steps.png").exists()


def test_collect_gcs_root_copies_only_json_and_jsonl_files(root, tmp_path, fake_gcloud,
                                                          monkeypatch, capsys):
    # The bucket 'bkt' is the local directory tmp_path/gcs/bkt for the fake gcloud.
    bucket = tmp_path / "gcs" / "bkt"
    bucket.mkdir(parents=True)
    root.rename(bucket / "sweep")
    ckpt = bucket / "sweep" / "sampler-ddim_scale-0" / "checkpoints" / "1500"
    ckpt.mkdir(parents=True)
    (ckpt / "_METADATA.json").write_text("{}")
    (bucket / "sweep" / "sampler-ddim_scale-0" / "samples.npz").write_text("big")
    (bucket / "sweep" / "sampler-ddim_scale-0" / "metrics.jsonl").write_text("{}\n")
    monkeypatch.setenv("FAKE_GCS", str(tmp_path / "gcs"))
    fake = fake_gcloud()
    out = tmp_path / "local"
    assert sweep_cli.main(["collect", "--root", "gs://bkt/sweep", "--out", str(out)]) == 0
    assert fake.calls[0][:4] == ["storage", "rsync", "gs://bkt/sweep", str(out)]
    copied = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "sampler-ddim_scale-0/eval/fd.json" in copied
    assert "sampler-ddim_scale-0/sweep_run.json" in copied
    assert "sampler-ddim_scale-0/metrics.jsonl" in copied  # training images/s for collect
    assert not any("checkpoints" in c or c.endswith(".npz") for c in copied)
    assert (out / "results.csv").exists() and (out / "results.md").exists()
    assert "| sampler-heun_scale-3 | done |" in capsys.readouterr().out
