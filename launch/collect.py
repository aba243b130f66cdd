"""Gathers a sweep's results into one table (CSV and Markdown) and one plot per axis.

Reads, under a local sweep root, every ``<run>/sweep_run.json`` (axis values written by
the runner) and every ``<run>/eval/*.json`` written by ``diffjax.main --mode eval``:
``{"name", "metrics": {name: float}, "sampler", "num_steps", "nfe", "guidance": {"type",
"scale"}, "checkpoint_step", "wall_time_s"}``. One row per (run, eval file); a run with
no eval file yet still gets a row with its status (done / failed / incomplete), so
failures show up in the table.

Per run it also reports, where the run wrote them (``--mode train``): ``params`` and
``gflops`` (matmul FLOPs of one forward pass of one image / 1e9, a multiply-add counted as
2; DiT only) of the model in ``<run>/config.json``, computed by diffjax without running
anything (imported only then; launch itself needs no JAX), and ``train_images_per_s``,
the median ``examples_per_sec`` of ``<run>/metrics.jsonl`` (the median, so that the first
log interval, which includes compilation, does not count).
"""

from __future__ import annotations

import collections
import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from launch.storage import DONE_MARKER, FAILED_MARKER, RUN_MARKER

FIXED_COLUMNS = ("run", "status")
RUN_COLUMNS = ("params", "gflops", "train_images_per_s")
EVAL_COLUMNS = ("eval", "checkpoint_step", "sampler", "num_steps", "nfe", "guidance_type",
                "guidance_scale", "wall_time_s")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _status(run_dir: Path) -> str:
    if (run_dir / DONE_MARKER).exists():
        return "done"
    return "failed" if (run_dir / FAILED_MARKER).exists() else "incomplete"


def train_images_per_s(run_dir: Path) -> float | None:
    """Median ``examples_per_sec`` over ``run_dir/metrics.jsonl``; None without a log."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    rates = []
    for line in lines:
        try:
            rate = json.loads(line).get("examples_per_sec")
        except json.JSONDecodeError:  # a line cut short by a preempted run
            continue
        if _is_number(rate):
            rates.append(float(rate))
    return statistics.median(rates) if rates else None


def model_size(config: dict) -> dict[str, Any]:
    """{"params": int, "gflops": float | None} of a resolved config (a run's config.json).

    Builds the experiment's abstract parameters (``jax.eval_shape``; nothing is allocated);
    gflops is ``dit.forward_flops`` / 1e9 for ``model.name="dit"``, None for other models.
    """
    import ml_collections

    from diffjax import experiment
    from diffjax.models import dit, layers

    c = ml_collections.ConfigDict(config)
    params = layers.num_params(experiment.build(c).task.abstract_params())
    module = experiment.build_model(c)
    gflops = dit.forward_flops(module) / 1e9 if isinstance(module, dit.DiT) else None
    return {"params": params, "gflops": gflops}


def _run_columns(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"train_images_per_s": train_images_per_s(run_dir)}
    config = _read_json(run_dir / "config.json")
    if config is not None:
        try:
            out.update(model_size(config))
        except (ImportError, ValueError, KeyError, TypeError, AttributeError) as e:
            print(f"# {run_dir.name}: no params/gflops from config.json ({e})", file=sys.stderr)
    return out


def gather(root: str | Path) -> tuple[list[dict[str, Any]], list[str], dict[str, str]]:
    """Reads all runs under root.

    Returns:
      rows: one dict per (run, eval file), keys from FIXED_COLUMNS, the axis keys,
        RUN_COLUMNS, EVAL_COLUMNS and ``metric/<name>`` per metric.
      axis_keys: swept config keys, in sweep order.
      labels: {axis key: short label}.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"sweep root {root} is not a directory (for gs:// roots, "
                         "`python -m launch.sweep collect` copies the JSON files first)")
    rows, axis_keys, labels = [], [], {}
    for marker in sorted(root.glob(f"*/{RUN_MARKER}")):
        run_dir = marker.parent
        info = _read_json(marker) or {}
        axes = info.get("axes", {})
        for k in axes:
            if k not in axis_keys:
                axis_keys.append(k)
        labels.update(info.get("labels", {}))
        base = {"run": info.get("name", run_dir.name), "status": _status(run_dir), **axes,
                **_run_columns(run_dir)}
        evals = [e for e in map(_read_json, sorted(run_dir.glob("eval/*.json"))) if e]
        for ev in evals:
            guidance = ev.get("guidance") or {}
            row = dict(base, eval=ev.get("name", ""), checkpoint_step=ev.get("checkpoint_step"),
                       sampler=ev.get("sampler"), num_steps=ev.get("num_steps"),
                       nfe=ev.get("nfe"), guidance_type=guidance.get("type"),
                       guidance_scale=guidance.get("scale"), wall_time_s=ev.get("wall_time_s"))
            row.update({f"metric/{k}": v for k, v in (ev.get("metrics") or {}).items()})
            rows.append(row)
        if not evals:
            rows.append(base)
    return rows, axis_keys, labels


def columns(rows: list[dict], axis_keys: list[str]) -> list[str]:
    metrics = sorted({k for r in rows for k in r if k.startswith("metric/")})
    return [*FIXED_COLUMNS, *axis_keys, *RUN_COLUMNS, *EVAL_COLUMNS, *metrics]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def write_csv(rows: list[dict], cols: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        for r in rows:
            writer.writerow([_cell(r.get(c)) for c in cols])


def markdown(rows: list[dict], cols: list[str]) -> str:
    """A GitHub Markdown table; empty eval columns are dropped for readability."""
    cols = [c for c in cols if c in FIXED_COLUMNS or any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(rows: list[dict], axis_keys: list[str], labels: dict[str, str], key: str,
           metric: str) -> tuple[list[Any], dict[str, list[tuple[Any, float]]]]:
    """The metric along one axis: (axis values in sweep order, {line name: [(x, y)]}).

    One line per setting of the other axes (and per eval name when a run has several);
    x is the axis value for numeric axes, else its index in the value list.
    """
    column = f"metric/{metric}"
    have = [r for r in rows if key in r and _is_number(r.get(column))
            and math.isfinite(r[column])]
    values: list[Any] = []
    for r in have:
        if r[key] not in values:
            values.append(r[key])
    numeric = all(_is_number(v) for v in values)
    # Split lines by eval only when a run holds several (an eval sweep inside each run);
    # one eval per run is named after that run's own sampler/scale, so it identifies nothing.
    several_evals = any(n > 1 for n in collections.Counter(r["run"] for r in have).values())
    groups: dict[str, list[tuple[Any, float]]] = {}
    for r in have:
        rest = [f"{labels.get(k, k)}={_cell(r.get(k))}" for k in axis_keys if k != key]
        if several_evals:
            rest.append(f"eval={r.get('eval')}")
        x = r[key] if numeric else values.index(r[key])
        groups.setdefault(", ".join(rest) or metric, []).append((x, r[column]))
    for pts in groups.values():
        pts.sort(key=lambda p: p[0])
    return values, groups


def plot_axes(rows: list[dict], axis_keys: list[str], labels: dict[str, str], metric: str,
              out_dir: Path) -> list[Path]:
    """One PNG per axis, ``<metric>_vs_<label>.png``, drawing ``series`` (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key in axis_keys:
        values, groups = series(rows, axis_keys, labels, key, metric)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, pts in groups.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if not all(_is_number(v) for v in values):
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if 1 < len(groups) <= 12:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_{labels.get(key, key)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def collect(root: str | Path, out_dir: str | Path | None = None,
            metric: str | None = None) -> dict[str, Any]:
    """Writes results.csv, results.md and the per-axis plots; returns what it wrote.

    Args:
      root: local sweep root.
      out_dir: where to write (default: root).
      metric: metric name to plot (default: the first metric found, alphabetically).
    """
    rows, axis_keys, labels = gather(root)
    if not rows:
        raise ValueError(f"no runs under {root} (no */{RUN_MARKER}); run the sweep first")
    cols = columns(rows, axis_keys)
    metrics = sorted(c[len("metric/"):] for c in cols if c.startswith("metric/"))
    if metric is not None and metric not in metrics:
        raise ValueError(f"metric {metric!r} is in no eval file; found {metrics}")
    metric = metric or (metrics[0] if metrics else None)
    out = Path(out_dir) if out_dir else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, cols, out / "results.csv")
    table = markdown(rows, cols)
    (out / "results.md").write_text(table)
    plots = plot_axes(rows, axis_keys, labels, metric, out) if metric else []
    return {"rows": rows, "csv": out / "results.csv", "markdown": out / "results.md",
            "table": table, "metric": metric, "plots": plots}
