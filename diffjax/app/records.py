"""The files ``--mode eval`` writes: one JSON record and grid per point, sweep plots.

    WORKDIR/eval/<name>.json   {"name", "metrics": {metric: float}, "sampler", "num_steps",
                                "nfe", "guidance": {"type", "scale"}, "checkpoint_step",
                                "wall_time_s"}  (the format ``launch.collect`` reads)
    WORKDIR/eval/<name>.png    a grid of the first samples (one column per class)

``<name>`` reads like ``ddim-50_cfg-3.0`` (``eval.name`` is prefixed when set).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from etils import epath

from diffjax.app.common import say
from diffjax.diffusion import samplers
from diffjax.evaluation import grid

GUIDANCE_TAGS = {"classifier_free": "cfg", "classifier": "cls", "autoguidance": "ag",
                 "gradient": "grad"}


def point_name(sampler: str, num_steps: int, guidance: str, scale: float,
               prefix: str = "") -> str:
    """E.g. "ddim-50_cfg-3.0", "heun-18", "myrun_ddpm-250_cls-1.0" (with eval.name)."""
    name = f"{sampler}-{num_steps}"
    tag = GUIDANCE_TAGS.get(guidance)
    if tag:
        scale = float(scale)
        name += f"_{tag}-{scale:.1f}" if scale == round(scale, 1) else f"_{tag}-{scale:g}"
    return f"{prefix}_{name}" if prefix else name


def make_record(sampler: str, num_steps: int, guidance: str, scale: float, prefix: str,
                values: dict[str, float], checkpoint_step: int,
                wall_time_s: float, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record of one point (the format ``launch.collect`` reads).

    ``settings``: how metrics were computed where a choice changes their values (e.g.
    ``nll_clip_denoised``), stored as the record's ``settings`` when given.

    ``nfe`` is :func:`diffjax.diffusion.samplers.num_evals`: denoiser calls, where the batched
    conditional + unconditional pair of classifier-free guidance counts as one call."""
    return {"name": point_name(sampler, num_steps, guidance, scale, prefix),
            "metrics": {k: float(v) for k, v in values.items()},
            "sampler": sampler, "num_steps": int(num_steps),
            "nfe": samplers.num_evals(sampler, num_steps),
            "guidance": {"type": guidance, "scale": float(scale)},
            "checkpoint_step": int(checkpoint_step), "wall_time_s": float(wall_time_s),
            **({"settings": dict(settings)} if settings else {})}


def write_json(out: epath.Path, record: dict[str, Any]) -> None:
    """``out/<record name>.json`` (process 0 only)."""
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{record['name']}.json").write_text(json.dumps(record, indent=1) + "\n")


def write_split_record(out: epath.Path, name: str, metrics: dict[str, float], split: str,
                       num_examples: int, checkpoint_step: int,
                       wall_time_s: float,
                       settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of a sample-free evaluation on a data split (nll alone, a classifier's
    accuracy), written to ``out/<name>.json``; ``settings`` as in :func:`make_record`."""
    record = {"name": name, "metrics": metrics, "split": split,
              "num_examples": int(num_examples), "checkpoint_step": int(checkpoint_step),
              "wall_time_s": float(wall_time_s),
              **({"settings": dict(settings)} if settings else {})}
    write_json(out, record)
    say(f"wrote {out}/{record['name']}.json")
    return record


def write_point(out: epath.Path, record: dict[str, Any], images: np.ndarray,
                num_classes: int) -> None:
    """WORKDIR/eval/<name>.json and a grid of the first samples, <name>.png (process 0)."""
    if jax.process_index() != 0:
        return
    write_json(out, record)
    ncol = num_classes or 8
    rows = max(1, min(8, len(images) // ncol))
    grid.save_grid(images[:rows * ncol], str(out / f"{record['name']}.png"), ncol=ncol,
                   scale=2)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items())
    say(f"{record['name']}: {shown} (nfe {record['nfe']}, {record['wall_time_s']:.1f}s) -> "
        f"{out}/{record['name']}.json")


def plot_sweep(records: list[dict[str, Any]], out: epath.Path, prefix: str = "") -> list[str]:
    """``<prefix>_sweep_vs_<axis>.png``: each metric against each swept axis (guidance scale,
    steps), one line per value of the other axis."""
    import matplotlib  # heavy: only for sweep plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only for sweep plots

    axes = {"guidance_scale": lambda r: r["guidance"]["scale"], "num_steps":
            lambda r: r["num_steps"]}
    metric_names = [m for m in records[0]["metrics"] if not m.endswith("_stderr")]
    paths = []
    for axis, get in axes.items():
        if len({get(r) for r in records}) < 2:
            continue
        other = [a for a in axes if a != axis][0]
        fig, subplots = plt.subplots(1, len(metric_names), squeeze=False,
                                     figsize=(4 * len(metric_names), 3.2))
        for ax, metric in zip(subplots[0], metric_names):
            for value in sorted({axes[other](r) for r in records}):
                pts = sorted((get(r), r["metrics"][metric]) for r in records
                             if axes[other](r) == value)
                ax.plot(*zip(*pts), marker="o", label=f"{other}={value:g}")
            ax.set_xlabel(axis)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{prefix + '_' if prefix else ''}sweep_vs_{axis}.png"
        with path.open("wb") as f:
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths
