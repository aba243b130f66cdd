"""EDM2's power-function EMA and its post-hoc reconstruction (Karras et al. 2024, sec. 3, App. C).

A power-function EMA of exponent gamma > 0 at step t averages the parameters theta_1 .. theta_t
the steps produced with weights w_k = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1): the
update ema <- beta_t ema + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma+1) gives exactly
these (beta_1 = 0 takes the first step's parameters). The weights are the profile
p(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t] integrated over (k-1, k], so for the
piecewise-constant trajectory theta(tau) = theta_k on (k-1, k] the tracked EMA is exactly the
integral of p theta. The profile's standard deviation relative to t is
sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))) (< sqrt(1/12), the uniform average's),
the length-independent way EDM2 names a profile (0.05 and 0.10 tracked in training).

Post hoc, any profile (t, gamma) is approximated by a combination sum_i x_i p_i of the profiles
of snapshots (t_i, gamma_i) taken during training, x minimising the L2 distance over tau: the
normal equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p> in the closed form
<p_a, p_b> = (g_a+1)(g_b+1) min(t_a, t_b)^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)).
The same x combines the snapshots' parameters. For each parameter, the reconstruction differs
from the EMA that training would have tracked by the integral of the residual profile
r = sum_i x_i p_i - p against theta, so at most ||r||_2 ||theta||_2 (Cauchy-Schwarz; the
relative residual ||r|| / ||p|| is reported by :func:`solve`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the profile with relative std ``sigma_rel`` in (0, sqrt(1/12)):
    the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0,
    i.e. (gamma+2)^2 (gamma+3) s^2 = gamma + 1."""
    if not 0.0 < sigma_rel < (1.0 / 12.0) ** 0.5:
        raise ValueError(f"sigma_rel={sigma_rel} must be in (0, {(1 / 12) ** 0.5:.4f})")
    inv2 = sigma_rel ** -2.0
    roots = np.roots([1.0, 7.0, 16.0 - inv2, 12.0 - inv2])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))."""
    return float(np.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0))))


def power_ema_update(ema: Any, params: Any, step: Array, gamma: float) -> Any:
    """One update at step ``step`` (1 for the first): ema + (1 - beta) (params - ema) with
    1 - beta = -expm1((gamma+1) log1p(-1/step)), accurate in float32 at any step (1 - 1/step
    itself would round away the weight of late steps)."""
    step = jnp.asarray(step, jnp.float32)
    weight = -jnp.expm1((gamma + 1.0) * jnp.log1p(-1.0 / step))
    return jax.tree.map(lambda e, p: e + weight.astype(e.dtype) * (p - e), ema, params)


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b>, the L2 inner product of two profiles over tau (module docstring); float64,
    broadcasting."""
    t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    lo = np.minimum(t_a, t_b)
    # min^(ga+gb+1) / (ta^(ga+1) tb^(gb+1)) = (lo/ta)^(ga+1) (lo/tb)^(gb+1) / lo
    ratio = (lo / t_a) ** (g_a + 1.0) * (lo / t_b) ** (g_b + 1.0) / lo
    return (g_a + 1.0) * (g_b + 1.0) / (g_a + g_b + 1.0) * ratio


@dataclasses.dataclass(frozen=True)
class Solution:
    """coefficients: [N] float64 of the snapshots; residual: ||r|| / ||p|| (module docstring)."""

    coefficients: np.ndarray
    residual: float


def solve(snapshot_steps: Sequence[float], snapshot_gammas: Sequence[float], step: float,
          gamma: float) -> Solution:
    """Least-squares coefficients of the snapshots (t_i, gamma_i) for the profile (step, gamma),
    in float64 (``np.linalg.lstsq``: the Gram matrix of many snapshots is ill-conditioned)."""
    t = np.asarray(snapshot_steps, np.float64)
    g = np.asarray(snapshot_gammas, np.float64)
    if t.ndim != 1 or t.shape != g.shape or not t.size or np.any(t <= 0) or step <= 0:
        raise ValueError(f"need snapshots at steps > 0 with one gamma each, got steps {t}, "
                         f"gammas {g}, target step {step}")
    gram = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = profile_dot(t, g, step, gamma)
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    target = float(profile_dot(step, gamma, step, gamma))
    sq = target - 2.0 * float(x @ rhs) + float(x @ gram @ x)
    return Solution(coefficients=x, residual=float(np.sqrt(max(sq, 0.0) / target)))


def combine(trees: Sequence[Any], coefficients: Sequence[float]) -> Any:
    """sum_i coefficients[i] trees[i], leaf by leaf in each leaf's dtype."""
    if len(trees) != len(coefficients) or not trees:
        raise ValueError(f"{len(trees)} trees for {len(coefficients)} coefficients")

    def mix(*leaves):
        out = float(coefficients[0]) * leaves[0]
        for c, leaf in zip(coefficients[1:], leaves[1:]):
            out = out + float(c) * leaf
        return out

    return jax.tree.map(mix, *trees)
