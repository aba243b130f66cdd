"""A run killed with SIGKILL at any moment resumes and ends exactly where an uninterrupted
run ends; several processes reach the same parameters as one process with as many devices."""

import glob
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def data_dir(tiny_data):
    return tiny_data


@pytest.fixture(scope="module")
def straight(tiny, data_dir, built_once):
    """6 steps without interruption on 2 devices."""
    def build(workdir):
        tiny.run_driver([data_dir, workdir, 6, 2])

    return tiny.final_params(built_once("resume_straight", build)[0])


def test_kill_9_and_resume_follows_the_uninterrupted_trajectory(tiny, data_dir, straight,
                                                                tmp_path):
    workdir = str(tmp_path / "killed")
    # The loop reads 2 batches ahead: the 7th request comes after step 4 was dispatched, so
    # step 2 is surely checkpointed and later saves may be half-written.
    killed = tiny.run_driver([data_dir, workdir, 6, 2, "--kill-at-batch", 7], check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not os.path.exists(os.path.join(workdir, "final_params.npz"))
    complete = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                      if d.isdigit())
    assert complete and max(complete) < 6
    tiny.run_driver([data_dir, workdir, 6, 2])
    resumed = tiny.final_params(workdir)
    assert int(resumed.pop("step")) == 6
    want = dict(straight)
    assert int(want.pop("step")) == 6
    assert resumed.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(resumed[name], want[name], err_msg=name)


# Both runs of the comparison use Adam's eps = 1e-4 instead of the config's 1e-8. Adam moves a
# coordinate by lr * g / (|g| + eps), whose sensitivity to g is lr / eps: the zero-initialised
# output convolutions get gradients near 1e-10, at the noise floor of a float32 sum, and the
# 4-device all-reduce adds in another order across processes than within one, so with
# eps = 1e-8 a rounding difference of 1e-11 moves a parameter by lr * 1e-3 = 1e-6 per step
# (seen: 1.2e-5 after 4 steps, on one bias element). With eps = 1e-4 the same difference moves
# it by 1e-10, while a real difference (other batches, another step) still moves every
# parameter by about lr per step.
ADAM_EPS = 1e-4


def _two_processes(tiny, data_dir, workdir, steps, *extra):
    """Runs the driver as processes 0 and 1 of a 2-process run, with sample grids and EMA
    snapshots every 2 steps (``extra``: more of its options); their stdouts."""
    return tiny.run_together(_two_commands(tiny, data_dir, workdir, steps, *extra))


def _two_commands(tiny, data_dir, workdir, steps, *extra, process_1=()):
    """The driver commands of :func:`_two_processes`; ``process_1``: options of process 1's
    alone."""
    return tiny.driver_processes([data_dir, workdir, steps, 2, "--adam-eps", ADAM_EPS,
                                  "--sample-every", 2, "--ema-snapshots", *extra], 2,
                                 process_1)


def _held(out: str) -> tuple[int, int]:
    """(elements of the parameters on the process, in all) from the driver's output."""
    held, total = re.search(r"holds (\d+) of (\d+) parameter elements", out).groups()
    return int(held), int(total)


@pytest.fixture(scope="module")
def one_process(tiny, data_dir, built_once):
    """4 steps in one process with 4 devices, replicated state, sample grids and EMA
    snapshots at steps 2 and 4: the workdir."""
    def build(workdir):
        tiny.run_driver([data_dir, workdir, 4, 4, "--adam-eps", ADAM_EPS, "--sample-every", 2,
                         "--ema-snapshots"])

    return built_once("resume_one_process", build)[0]


def _assert_same_run(tiny, one, two):
    """Run ``two`` ended where ``one`` did: parameters, EMA snapshots, sample grids."""
    a, b = tiny.final_params(one), tiny.final_params(two)
    assert int(a.pop("step")) == int(b.pop("step")) == 4
    assert a.keys() == b.keys()
    # Equal up to the order of the cross-process gradient sum (see ADAM_EPS), at the 1e-5 the
    # issue sets for sharded-vs-single-device steps.
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # The power EMA's snapshots, saved by every process beside the checkpoints (at steps 2 and
    # 4 both), with barriers of their own.
    assert sorted(os.listdir(os.path.join(two, "ema_snapshots"))) == ["2", "4"]
    # The grids, drawn with every process's devices from the EMA parameters: the same images,
    # but for a pixel whose value lies within the parameters' 1e-5 of a rounding boundary.
    for step in (2, 4):
        grid = lambda workdir: np.asarray(Image.open(  # noqa: E731
            os.path.join(workdir, "samples", f"step_{step:07d}.png")), np.int16)
        diff = np.abs(grid(two) - grid(one))
        assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, (step, diff.max(), diff.mean())


def test_two_processes_match_one_process_with_as_many_devices(tiny, data_dir, one_process,
                                                              tmp_path):
    """The multi-host path on one machine: 2 processes x 2 devices through jax.distributed,
    training and drawing the sample grids."""
    one = one_process
    two = str(tmp_path / "two")
    # On a busy machine one process can reach its first collective more than the fixed 30 s
    # gloo waits after the other; parallel.maybe_initialize_distributed connects the groups at
    # start-up, together (the driver passes timeouts sized for shared cores).
    first = _two_processes(tiny, data_dir, two, 2)
    assert ["process 0 starts at step 0" in first[0], "process 1 starts at step 0" in first[1]] \
        == [True, True]
    # Every host resumes and agrees on the step.
    second = _two_processes(tiny, data_dir, two, 4)
    for i, out in enumerate(second):
        assert f"process {i} starts at step 2" in out, out
        held, total = _held(out)
        assert held == total, out  # replicated: whole arrays on every process
    # Each host read its own half of the global batch.
    read = lambda path: json.load(open(path))  # noqa: E731
    want = read(os.path.join(one, "first_batch_p0_s0.json"))
    halves = [read(os.path.join(two, f"first_batch_p{i}_s0.json")) for i in range(2)]
    assert len(want) == 8 and want[:4] != want[4:]  # so a host reading the wrong half fails
    assert halves == [want[:4], want[4:]]
    # Only process 0 writes logs: one line per logged step, not one per process.
    with open(os.path.join(two, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]
    _assert_same_run(tiny, one, two)


@pytest.fixture(scope="module")
def two_fsdp(tiny, data_dir, built_once):
    """A run with parallel.shard_state="fsdp" on 2 processes x 2 devices to step 4 whose
    process 1 is SIGKILLed at its 7th batch, while the processes write a sharded checkpoint;
    the same two commands then resume it: (workdir, the killed processes' return codes and
    stderr tails, the last complete checkpoint's step, the resumed processes' outputs)."""

    def build(workdir):
        # Process 0 stops once the coordination service misses its peer's heartbeats for
        # 30 s (--heartbeat-timeout); its barriers and collectives would wait 600 s.
        commands = _two_commands(tiny, data_dir, workdir, 4, "--shard-state", "fsdp",
                                 "--heartbeat-timeout", 30, process_1=("--kill-at-batch", 7))
        killed = [(p.returncode, p.stderr[-2000:]) for p in tiny.start_together(commands)]
        done = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
        resumed = _two_processes(tiny, data_dir, workdir, 4, "--shard-state", "fsdp")
        return killed, max(done, default=0), resumed

    workdir, (killed, last, resumed) = built_once("resume_two_fsdp", build)
    return workdir, killed, last, resumed


def test_a_process_killed_mid_run_resumes_with_its_peer(tiny, one_process, two_fsdp):
    """parallel.shard_state="fsdp" across 2 processes x 2 devices, process 1 SIGKILLed while
    the two write a sharded checkpoint: process 0 stops too, nothing of the unfinished
    checkpoint is read back, and the same two commands resume from the last complete one,
    each array's shards (and the checkpoint's) on both processes, and end where one process
    with 4 devices ends on the replicated state (parameters, EMA snapshots, grids)."""
    workdir, (first, second), last, resumed = two_fsdp
    assert second[0] == -9, second[1]
    assert first[0] != 0, first[1]  # it did not finish alone
    assert 0 < last < 4, last  # seen: 1 and 2 complete, with 3.orbax-checkpoint-tmp beside them
    for i, out in enumerate(resumed):
        assert f"process {i} starts at step {last}" in out, out
        held, total = _held(out)
        assert held < total, out  # the large arrays' other shards lie on the other process
        # Each process read on from its checkpointed data position (a run started afresh
        # would end alike, but would begin with the same batch as the first run).
        first_batch = lambda start: open(  # noqa: E731
            os.path.join(workdir, f"first_batch_p{i}_s{start}.json")).read()
        assert first_batch(last) != first_batch(0)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["parallel"]["shard_state"] == "fsdp"
    _assert_same_run(tiny, one_process, workdir)


def _cli(tiny, data_dir, workdir, config_dir, shard_state, processes, devices, mode,
         **overrides):
    """``python -m diffjax.main --mode MODE`` on ``workdir`` (the driver's config of its
    4-step run, and ``overrides`` with "__" for ".") as ``processes`` processes of
    ``devices`` CPU devices each."""
    overrides = {"train.num_steps": 4, "train.sample_every": 2, "optim.eps": ADAM_EPS,
                 "parallel.shard_state": shard_state, "ema.sigma_rels": (0.1,),
                 "ema.snapshot_every": 2,
                 **{k.replace("__", "."): v for k, v in overrides.items()}}
    config = tiny.write_cli_config(os.path.join(config_dir, f"tiny_{mode}_{shard_state}.py"),
                                   data_dir, overrides)
    tiny.run_main(config, workdir, mode, processes, devices)


def test_sample_and_eval_modes_on_two_processes_restore_the_sharded_run(
        tiny, data_dir, one_process, two_fsdp, tmp_path):
    """``--mode sample`` and ``--mode eval`` (a sample metric and the test split's NLL)
    through the command line on 2 processes x 2 devices restore the fsdp run's sharded
    checkpoint and give what one process with 4 devices gives on the replicated run (whose
    parameters equal it to 1e-5)."""
    runs = {"one": (one_process, "replicated", 1, 4), "two": (two_fsdp[0], "fsdp", 2, 2)}
    samples, evals = {}, {}
    for name, (workdir, *how) in runs.items():
        _cli(tiny, data_dir, workdir, str(tmp_path), *how, "sample")
        with np.load(os.path.join(workdir, "samples.npz")) as f:
            samples[name] = {k: f[k] for k in f.files}
        _cli(tiny, data_dir, workdir, str(tmp_path), *how, "eval",
             eval__metrics=("brightness", "nll"), eval__num_samples=16)
        evals[name] = {}
        for record in glob.glob(os.path.join(workdir, "eval", "*.json")):
            with open(record) as f:
                evals[name][os.path.basename(record)] = json.load(f)["metrics"]
    one, two = samples["one"], samples["two"]
    assert one.keys() == two.keys() and one["images"].shape == two["images"].shape
    np.testing.assert_array_equal(two["labels"], one["labels"])
    # Seen: 1.4e-6 at most; the bound is 10x the parameters' own 1e-5 (3 sampler steps of a
    # network whose output moves about as its parameters do).
    np.testing.assert_allclose(two["images"], one["images"], atol=1e-4)
    assert sorted(evals["two"]) == sorted(evals["one"]) == ["ddim-3_cfg-0.0.json"]
    assert {"brightness", "nll_bpd"} <= set(evals["one"]["ddim-3_cfg-0.0.json"])
    for record, metrics in evals["one"].items():
        assert evals["two"][record].keys() == metrics.keys()
        for key, value in metrics.items():  # the same images and NLL terms, up to that 1e-5
            np.testing.assert_allclose(evals["two"][record][key], value, rtol=1e-4,
                                       err_msg=f"{record} {key}")


def _posthoc_params(path: str) -> dict[str, np.ndarray]:
    """The parameters ``--mode posthoc_ema`` wrote at ``path``, restored whole on one device
    whatever sharding wrote them, by their path in the tree."""
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata.tree)
    restored = checkpointer.restore(path, target)
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def test_posthoc_ema_on_two_processes_combines_the_sharded_snapshots(
        tiny, data_dir, one_process, two_fsdp, tmp_path):
    """``--mode posthoc_ema`` on 2 processes x 2 devices reads the fsdp run's EMA snapshots
    (each array's shards on both processes), solves for another profile and writes its
    parameters: the same coefficients as one process with 4 devices on the replicated run,
    and the same parameters up to the snapshots' own differences."""
    runs = {"one": (one_process, "replicated", 1, 4), "two": (two_fsdp[0], "fsdp", 2, 2)}
    records, params = {}, {}
    for name, (workdir, *how) in runs.items():
        _cli(tiny, data_dir, workdir, str(tmp_path), *how, "posthoc_ema", ema__sigma_rel=0.13)
        out = os.path.join(workdir, "posthoc_ema", "sigma_rel-0.13_step-4")
        with open(out + ".json") as f:
            records[name] = json.load(f)
        params[name] = _posthoc_params(out)
    assert records["two"] == records["one"]  # the solve uses the snapshots' steps alone
    coefficients = [s["coefficient"] for s in records["one"]["snapshots"]]
    assert [s["step"] for s in records["one"]["snapshots"]] == [2, 4]
    assert params["two"].keys() == params["one"].keys()
    # Each snapshot array matches the other run's to the runs' 1e-5 (_assert_same_run), so
    # their combination to sum |c| times that.
    bound = 1e-5 * sum(abs(c) for c in coefficients)
    assert all(np.abs(v).max() > 0 for k, v in params["one"].items() if "kernel" in k)
    for key, value in params["one"].items():
        np.testing.assert_allclose(params["two"][key], value, rtol=1e-5, atol=bound,
                                   err_msg=key)
