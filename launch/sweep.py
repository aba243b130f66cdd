"""Command line for sweeps (run from the repository root).

    python -m launch.sweep run SWEEP.py --root DIR [--parallel N] [--dry-run]
    python -m launch.sweep run SWEEP.py --root gs://BUCKET/DIR --tpu NAME [NAME ...] \
        --zone ZONE [--project P]
    python -m launch.sweep collect --root DIR [--metric fd_fashion_mnist] [--out DIR]

``run`` expands the sweep, skips runs whose ``sweep_done.json`` exists, runs the others
(locally N at a time, or one at a time per TPU VM, each VM set up beforehand with
``python -m launch.tpu create/setup``) and exits with 1 if any run failed. ``collect``
writes results.csv, results.md and ``<metric>_vs_<axis>.png`` per axis; for a gs:// root
it first copies the sweep's JSON files (no checkpoints) into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch import collect as collect_lib
from launch import gcloud
from launch.runner import LocalExecutor, SweepRunner, TpuExecutor
from launch.shell import CommandError, Shell
from launch.spec import load_sweep
from launch.storage import is_gcs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every unfinished run of a sweep file")
    run.add_argument("sweep_file")
    run.add_argument("--root", required=True, help="sweep root: local dir or gs://...")
    run.add_argument("--parallel", type=int, default=1, help="local runs at a time")
    run.add_argument("--dry-run", action="store_true", help="print commands, run nothing")
    run.add_argument("--checkpoint", help="trained run to evaluate (overrides the sweep's)")
    run.add_argument("--main-module", default="diffjax.main",
                     help="module run with python -m, or a .py file (for tests)")
    run.add_argument("--log-dir", help="local log dir when --root is on gs://")
    run.add_argument("--tpu", nargs="+", default=[], metavar="NAME",
                     help="run on these TPU VMs (already created and set up)")
    run.add_argument("--zone", help="TPU zone (with --tpu)")
    run.add_argument("--project", default="", help="GCP project (with --tpu)")
    run.add_argument("--accelerator-type", default="v4-8", help="(with --tpu)")
    run.add_argument("--runtime-version", default="", help="(with --tpu)")
    run.add_argument("--remote-dir", default="diffjax", help="code dir on the TPU hosts")
    run.add_argument("--remote-python", default="python3", help="python on the TPU hosts")
    run.add_argument("--spot", action="store_true",
                     help="the TPU VMs are spot queued resources: recreate on preemption")
    run.add_argument("--max-restarts", type=int, default=5,
                     help="with --spot: reruns of one step after preemptions")
    run.add_argument("--repo", default=".", help="with --spot: checkout copied on recreation")
    run.add_argument("--git-url", default="", help="with --spot: clone this instead")
    run.add_argument("--git-ref", default="main")

    col = sub.add_parser("collect", help="gather eval/*.json of all runs into tables/plots")
    col.add_argument("--root", required=True)
    col.add_argument("--metric", help="metric to plot (default: first one found)")
    col.add_argument("--out", help="output dir (default: root; for gs:// roots "
                                   "./sweep_results/<root basename>)")
    col.add_argument("--dry-run", action="store_true", help="print the gs:// copy only")
    return parser


def _run(args) -> int:
    shell = Shell(dry_run=args.dry_run)
    sweep = load_sweep(args.sweep_file)
    if args.tpu:
        if not args.zone:
            raise ValueError("--tpu needs --zone (e.g. --zone us-central2-b)")
        tpus = [gcloud.Tpu(name=n, zone=args.zone, accelerator_type=args.accelerator_type,
                           runtime_version=args.runtime_version, project=args.project,
                           remote_dir=args.remote_dir, python=args.remote_python,
                           spot=args.spot)
                for n in args.tpu]
        setup = {"repo": Path(args.repo), "git_url": args.git_url, "git_ref": args.git_ref}
        executor = TpuExecutor(shell, tpus, max_restarts=args.max_restarts if args.spot else 0,
                               setup=setup)
    else:
        executor = LocalExecutor(shell, main=args.main_module, parallel=args.parallel)
    runner = SweepRunner(sweep, args.root, executor, shell, checkpoint=args.checkpoint,
                         log_dir=args.log_dir)
    results = runner.run()
    return 1 if any(r.status == "failed" for r in results) else 0


def _collect(args) -> int:
    root = args.root
    if is_gcs(root):
        out = Path(args.out or Path("sweep_results") / root.rstrip("/").rsplit("/", 1)[-1])
        shell = Shell(dry_run=args.dry_run)
        shell.say(f"+ mkdir -p {out}")
        if not args.dry_run:
            out.mkdir(parents=True, exist_ok=True)
        shell.run(gcloud.storage_rsync_json(root, str(out)))
        if args.dry_run:
            return 0
        root = out
    elif args.dry_run:
        print(f"# dry run: would collect {root}")
        return 0
    result = collect_lib.collect(root, args.out if not is_gcs(args.root) else root,
                                 metric=args.metric)
    print(result["table"], end="")
    print(f"# wrote {result['csv']} and {result['markdown']}")
    for p in result["plots"]:
        print(f"# wrote {p}")
    if result["metric"] is None:
        print("# no metrics in any eval/*.json yet: no plots")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args) if args.command == "run" else _collect(args)
    except (ValueError, CommandError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
