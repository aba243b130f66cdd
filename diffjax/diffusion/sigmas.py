"""Sampling sigma sequences in the variance-exploding (Karras) convention.

Every function returns a float64 NumPy array of length ``num_steps + 1``, strictly decreasing
over its first ``num_steps`` entries and ending with an appended ``0.0``: a sampler takes
``num_steps = len(sigmas) - 1`` steps from ``sigmas[0]`` down to exact data at sigma 0.

A discrete (DDPM-style) model is sampled on its own timesteps: ``discrete_sigmas`` takes the
model's per-timestep VE sigmas ``sqrt((1 - abar_t) / abar_t)`` (increasing in t, e.g.
``DiscreteSchedule.sigmas``) and keeps a subset of timesteps chosen as in iDDPM's
``space_timesteps`` (Nichol & Dhariwal 2021). Stepping the VE posterior between two kept
sigmas is exactly iDDPM's respaced process (betas recomputed from the kept alpha-bars).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffjax.diffusion.schedules import space_timesteps

def _append_zero(sigmas: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(sigmas, np.float64), np.zeros([1])])


def _check_range(num_steps: int, sigma_min: float, sigma_max: float) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}."
        )


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
    """Karras et al. (2022) eq. 5, i = 0 .. N-1:
    sigma_i = (max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho.

    Returns: [num_steps + 1] float64, sigma_max ... sigma_min, 0. With num_steps=1 only
    sigma_max is kept.
    """
    _check_range(num_steps, sigma_min, sigma_max)
    ramp = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros([1])
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def loglinear_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0
) -> np.ndarray:
    """Sigmas uniform in log sigma (k-diffusion's "exponential"): [num_steps + 1] float64."""
    _check_range(num_steps, sigma_min, sigma_max)
    if num_steps == 1:
        return _append_zero(np.array([sigma_max]))
    return _append_zero(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_steps)))


def discrete_sigmas(
    model_sigmas: Any, num_steps: int | None = None, spacing: str | Sequence[int] = "uniform"
) -> np.ndarray:
    """A discrete model's own timesteps, respaced, as a decreasing VE sigma sequence.

    model_sigmas: [T] increasing VE sigmas of the model's timesteps (a NumPy array, or any
      object with a ``.sigmas`` attribute such as a DiscreteSchedule).
    num_steps: steps for spacing="uniform" (None = all T timesteps); ignored otherwise.
    spacing: "uniform" (num_steps evenly spaced timesteps including 0 and T-1), "ddimN",
      or per-section counts "10,10,5" / [10, 10, 5] (see ``space_timesteps``).
    Returns: [K + 1] float64, model_sigmas at the kept timesteps from the largest down, then 0.
    """
    table = np.asarray(getattr(model_sigmas, "sigmas", model_sigmas), np.float64)
    if table.ndim != 1 or table.size < 1 or np.any(np.diff(table) <= 0) or table[0] <= 0:
        raise ValueError("model_sigmas must be a 1-D, positive, strictly increasing array.")
    if isinstance(spacing, str) and spacing == "uniform":
        spacing = [table.size if num_steps is None else int(num_steps)]
    kept = list(space_timesteps(table.size, spacing))
    return _append_zero(table[kept][::-1])


def timesteps_of(model_sigmas: Any, sigmas: np.ndarray) -> np.ndarray:
    """Integer timesteps of a discrete model matching the nonzero entries of ``sigmas``.

    Returns: [K] int64 (for logging / respacing bookkeeping). Raises if a sigma is off-grid.
    """
    table = np.asarray(getattr(model_sigmas, "sigmas", model_sigmas), np.float64)
    nonzero = np.asarray(sigmas, np.float64)[:-1]
    idx = np.clip(np.searchsorted(table, nonzero), 0, table.size - 1)
    if not np.allclose(table[idx], nonzero, rtol=1e-12, atol=0.0):
        raise ValueError("sigmas are not on the model's timestep grid; build them with "
                         "discrete_sigmas().")
    return idx


SIGMA_SEQUENCES = {
    "karras": karras_sigmas,
    "loglinear": loglinear_sigmas,
    "discrete": discrete_sigmas,
}
