"""``--mode posthoc_ema``: the EMA of any profile after training (EDM2's post-hoc EMA).

Solves for ``ema.sigma_rel`` from the run's power-function EMA snapshots
(:mod:`diffjax.train.ema_snapshots`) at the latest snapshot (at or before ``--checkpoint_step``)
and writes, under ``WORKDIR/posthoc_ema/``:

    sigma_rel-<S>_step-<N>/        the parameters (orbax StandardCheckpointer; restore with
                                   ``orbax.checkpoint.StandardCheckpointer().restore(path,
                                   abstract_params)``)
    sigma_rel-<S>_step-<N>.json    the profile, the snapshots used, their coefficients and the
                                   relative L2 residual of the profile fit
    sigma_rel-<S>_step-<N>.png     the target profile and its reconstruction over training

``--mode sample`` and ``--mode eval`` with ``--config.ema.sigma_rel=S`` solve the same way
themselves; this mode is for exporting the parameters and looking at the fit.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffjax.app import common
from diffjax.errors import ConfigError
from diffjax.specs import Experiment
from diffjax.train.ema_snapshots import Reconstruction


def run(experiment: Experiment, workdir: str, mesh, *, checkpoint: str = "",
        step: int | None = None) -> tuple[Any, Reconstruction]:
    """Writes the post-hoc EMA's parameters, JSON and plot; returns (params, solution)."""
    sigma_rel = experiment.ema_sigma_rel
    if not sigma_rel:
        raise ConfigError("--mode posthoc_ema needs --config.ema.sigma_rel=S, the relative "
                          "std of the EMA profile to solve for (e.g. 0.08)")
    params, solution = common.posthoc_params(experiment, mesh, checkpoint or workdir, step)
    out = epath.Path(workdir) / "posthoc_ema"
    name = f"sigma_rel-{sigma_rel:g}_step-{solution.step}"
    path = out / name
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.resolve() if "://" not in str(path) else path, params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        record = {"sigma_rel": sigma_rel, "gamma": solution.gamma, "step": solution.step,
                  "residual": solution.residual,
                  "snapshots": [{"step": s, "profile": i, "gamma": g, "coefficient": c}
                                for (s, i, g), c in zip(solution.snapshots,
                                                        solution.coefficients)]}
        (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        _plot(solution, out / f"{name}.png")
        common.say(f"wrote {path}, {name}.json and {name}.png")
    return params, solution


def _plot(solution: Reconstruction, path: epath.Path) -> None:
    """The target profile p(tau) and sum_i x_i p_i(tau) over training steps tau."""
    import matplotlib  # heavy: only for this plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only for this plot

    last = max(s for s, _, _ in solution.snapshots)
    tau = np.linspace(0.0, last, 2000)[1:]

    def profile(t, gamma):
        return np.where(tau <= t, (gamma + 1.0) * (tau / t) ** gamma / t, 0.0)

    fit = sum(c * profile(s, g) for (s, _, g), c in zip(solution.snapshots,
                                                        solution.coefficients))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(tau, profile(solution.step, solution.gamma), label=f"target sigma_rel="
            f"{solution.sigma_rel:g}")
    ax.plot(tau, fit, "--", label=f"from {len(solution.snapshots)} snapshot profiles "
            f"(residual {solution.residual:.1e})")
    ax.set_xlabel("training step")
    ax.set_ylabel("weight per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=100)
    plt.close(fig)
