"""Noise schedules: continuous time t in [0, 1] and the discrete T-step DDPM tables.

Time runs from data (t = 0) to noise (t = 1). A variance-preserving (VP) schedule gives
x_t = alpha(t) x0 + sigma(t) eps with alpha^2 + sigma^2 = 1 and
logsnr(t) = log(alpha^2 / sigma^2), strictly decreasing in t. The variance-exploding (VE)
view used by samplers is x = x0 + s n with s = sigma / alpha = exp(-logsnr / 2).

Schedules (all frozen dataclasses; methods take jnp arrays of any shape):

* `LinearSchedule`: Ho et al. (2020). Discrete: betas = linspace(beta_start, beta_end, T)
  scaled by 1000 / T (iDDPM's extension to any T; exactly Ho et al. at T = 1000).
  Continuous: the VP-SDE limit, beta(t) = 1000 (beta_start + t (beta_end - beta_start)),
  alpha(t)^2 = exp(-int_0^t beta).
* `CosineSchedule`: Nichol & Dhariwal (2021), alpha_bar(t) = f(t) / f(0) with
  f(t) = cos^2((t + s) / (1 + s) pi / 2); discrete betas = 1 - abar((i+1)/T) / abar(i/T)
  clipped at `max_beta`.
* `SigmoidSchedule`: Jabri et al. (2022) / Chen (2023), alpha_bar(t) =
  (v_end - sigmoid((t (end - start) + start) / tau)) / (v_end - v_start); discrete as cosine.
* `ScaledLinearSchedule`: latent diffusion; sqrt(beta) linear. Discrete: betas =
  linspace(sqrt(beta_start), sqrt(beta_end), T)^2 scaled by 1000 / T (exactly LDM at T = 1000).
  Continuous: beta(t) = 1000 (sqrt(beta_start) + t (sqrt(beta_end) - sqrt(beta_start)))^2.
* `KarrasSchedule`: Karras et al. (2022) EDM sigmas, a VE schedule: alpha(t) = 1 and
  sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, so the VE
  noise level is sigma(t) itself and logsnr = -2 log sigma. Train on it with
  `q_sample(x0, noise, schedule.alpha(t), schedule.sigma(t))` (x = x0 + sigma n) and
  EDM preconditioning (`prediction="edm"` in process.py). Its `discretize(T)` gives the VP
  table with the same VE sigmas at t = (i + 1) / T: alpha_bar_i = 1 / (1 + sigma_i^2).

`DiscreteSchedule` holds the float64 NumPy tables (index i = 0..T-1 is iDDPM's timestep i,
paper step i + 1) and also behaves as a continuous schedule by interpolating log-sigma over
the table, with index i at t = (i + 1) / T (t outside [1/T, 1] is clamped to the table).

`c_noise(t)` is the time input a network receives (see process.make_denoiser): 1000 t for
continuous VP schedules, the fractional timestep index t T - 1 for a DiscreteSchedule, and
EDM's ln(sigma) / 4 for the Karras schedule.

Methods compute in float32, or in their argument's dtype where it is a wider float: with
`jax_enable_x64` on, float64 t (or logsnr) gives float64 math, a DiscreteSchedule's
float64 tables taken at float64 (Python scalars count as float32).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _as_float(t) -> Array:
    """t as a float array: float32, or its own dtype if that is a wider float (x64)."""
    dtype = jnp.result_type(t, jnp.float32)
    return jnp.asarray(t, dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32)


class _VPSchedule:
    """Shared methods of the VP schedules, defined through `logsnr`."""

    def alpha(self, t: Array) -> Array:
        """alpha(t) = sqrt(sigmoid(logsnr)); t: any shape in [0, 1]."""
        return jnp.sqrt(jax.nn.sigmoid(self.logsnr(t)))

    def sigma(self, t: Array) -> Array:
        """sigma(t) = sqrt(sigmoid(-logsnr)); t: any shape in [0, 1]."""
        return jnp.sqrt(jax.nn.sigmoid(-self.logsnr(t)))

    def c_noise(self, t: Array) -> Array:
        """Network time input for continuous VP schedules: 1000 t."""
        return 1000.0 * _as_float(t)

    def _discrete_from_alpha_bar(self, num_timesteps: int, max_beta: float) -> DiscreteSchedule:
        _check_num_timesteps(num_timesteps)
        grid = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        abar = self._alpha_bar_np(grid)  # alpha-bar up to a constant factor
        betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
        return DiscreteSchedule.from_betas(betas)


def _check_num_timesteps(num_timesteps: int) -> None:
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}.")


def _check_betas_range(schedule) -> None:
    if not 0 < schedule.beta_start < schedule.beta_end < 1:
        raise ValueError(
            f"{type(schedule).__name__} needs 0 < beta_start < beta_end < 1, got "
            f"beta_start={schedule.beta_start}, beta_end={schedule.beta_end}."
        )


def _linear_logsnr(integral: Array) -> Array:
    """logsnr from B(t) = -log alpha_bar(t): log(abar / (1 - abar)) = -log(expm1(B))."""
    return -jnp.log(jnp.expm1(integral))


@dataclasses.dataclass(frozen=True)
class LinearSchedule(_VPSchedule):
    """Ho et al. linear betas; continuous VP-SDE limit (see module docstring)."""

    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        _check_betas_range(self)

    def _b0_d(self) -> tuple[float, float]:
        return 1000.0 * self.beta_start, 1000.0 * (self.beta_end - self.beta_start)

    def logsnr(self, t: Array) -> Array:
        """log SNR of the VP-SDE limit; t: any shape."""
        b0, d = self._b0_d()
        t = _as_float(t)
        return _linear_logsnr(b0 * t + 0.5 * d * t * t)

    def t_from_logsnr(self, logsnr: Array) -> Array:
        """Inverse of `logsnr` (root of the quadratic, in its cancellation-free form)."""
        b0, d = self._b0_d()
        integral = jax.nn.softplus(-_as_float(logsnr))
        return 2.0 * integral / (b0 + jnp.sqrt(b0 * b0 + 2.0 * d * integral))

    def discretize(self, num_timesteps: int) -> DiscreteSchedule:
        """Ho et al. table with iDDPM's 1000 / T scaling."""
        _check_num_timesteps(num_timesteps)
        scale = 1000.0 / num_timesteps
        betas = np.linspace(
            scale * self.beta_start, scale * self.beta_end, num_timesteps, dtype=np.float64
        )
        return DiscreteSchedule.from_betas(betas)


@dataclasses.dataclass(frozen=True)
class ScaledLinearSchedule(_VPSchedule):
    """Latent-diffusion betas, linear in sqrt(beta) (see module docstring)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self):
        _check_betas_range(self)

    def _a_c(self) -> tuple[float, float]:
        a = math.sqrt(self.beta_start)
        return a, math.sqrt(self.beta_end) - a

    def logsnr(self, t: Array) -> Array:
        """log SNR with B(t) = 1000 ((a + c t)^3 - a^3) / (3 c); t: any shape."""
        a, c = self._a_c()
        t = _as_float(t)
        # (a + c t)^3 - a^3 = c t (3 a^2 + 3 a c t + c^2 t^2), free of cancellation.
        integral = 1000.0 * t * (3 * a * a + 3 * a * c * t + c * c * t * t) / 3.0
        return _linear_logsnr(integral)

    def t_from_logsnr(self, logsnr: Array) -> Array:
        """Inverse of `logsnr` (cube root of the cubic)."""
        a, c = self._a_c()
        integral = jax.nn.softplus(-_as_float(logsnr))
        return (jnp.cbrt(a**3 + 3.0 * c * integral / 1000.0) - a) / c

    def discretize(self, num_timesteps: int) -> DiscreteSchedule:
        """LDM table (linspace of sqrt(beta), squared) with the 1000 / T scaling."""
        _check_num_timesteps(num_timesteps)
        scale = 1000.0 / num_timesteps
        root = np.linspace(
            math.sqrt(self.beta_start), math.sqrt(self.beta_end), num_timesteps, dtype=np.float64
        )
        return DiscreteSchedule.from_betas(scale * root**2)


@dataclasses.dataclass(frozen=True)
class CosineSchedule(_VPSchedule):
    """Nichol & Dhariwal cosine alpha-bar; logsnr(1) = -inf (alpha(1) = 0)."""

    s: float = 0.008
    max_beta: float = 0.999

    def __post_init__(self):
        if not self.s >= 0 or not 0 < self.max_beta < 1:
            raise ValueError(
                f"CosineSchedule needs s >= 0 and 0 < max_beta < 1, got s={self.s}, "
                f"max_beta={self.max_beta}."
            )

    def _angle(self, t: Array) -> Array:
        return (t + self.s) / (1.0 + self.s) * (math.pi / 2)

    def _alpha_bar_np(self, t: np.ndarray) -> np.ndarray:
        # Unnormalised f(t), as iDDPM: only ratios are used, and f(0) cancels in them.
        return np.cos(self._angle(t)) ** 2

    def logsnr(self, t: Array) -> Array:
        """log(f(t) / (f(0) - f(t))), f(0) - f(t) = sin(b + a) sin(b - a) with b = angle(t)."""
        t = _as_float(t)
        a, b = self._angle(0.0), self._angle(t)
        scale = math.pi / (2.0 * (1.0 + self.s))
        cos_b = jnp.sin((1.0 - t) * scale)  # = cos(b), exactly 0 at t = 1
        return 2.0 * jnp.log(cos_b) - jnp.log(jnp.sin(b + a) * jnp.sin(t * scale))

    def t_from_logsnr(self, logsnr: Array) -> Array:
        """Inverse of `logsnr` via atan2 (accurate at both ends)."""
        a = self._angle(0.0)
        logsnr = _as_float(logsnr)
        cos2a = math.cos(a) ** 2
        sin_b = jnp.sqrt(math.sin(a) ** 2 + cos2a * jax.nn.sigmoid(-logsnr))
        cos_b = jnp.sqrt(cos2a * jax.nn.sigmoid(logsnr))
        return jnp.arctan2(sin_b, cos_b) * (2.0 / math.pi) * (1.0 + self.s) - self.s

    def discretize(self, num_timesteps: int) -> DiscreteSchedule:
        """iDDPM table: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)."""
        return self._discrete_from_alpha_bar(num_timesteps, self.max_beta)


@dataclasses.dataclass(frozen=True)
class SigmoidSchedule(_VPSchedule):
    """Sigmoid alpha-bar of Jabri et al. / Chen (2023); logsnr(1) = -inf."""

    start: float = -3.0
    end: float = 3.0
    tau: float = 1.0
    max_beta: float = 0.999

    def __post_init__(self):
        if not self.end > self.start or not self.tau > 0 or not 0 < self.max_beta < 1:
            raise ValueError(
                f"SigmoidSchedule needs end > start, tau > 0 and 0 < max_beta < 1, got "
                f"start={self.start}, end={self.end}, tau={self.tau}, max_beta={self.max_beta}."
            )

    def _v(self) -> tuple[float, float]:
        sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
        return sig(self.start / self.tau), sig(self.end / self.tau)

    def _z(self, t):
        return (t * (self.end - self.start) + self.start) / self.tau

    def _alpha_bar_np(self, t: np.ndarray) -> np.ndarray:
        v_start, v_end = self._v()
        return (v_end - 1.0 / (1.0 + np.exp(-self._z(t)))) / (v_end - v_start)

    def logsnr(self, t: Array) -> Array:
        """log((v_end - sigmoid(z)) / (sigmoid(z) - v_start))."""
        v_start, v_end = self._v()
        g = jax.nn.sigmoid(self._z(_as_float(t)))
        return jnp.log(v_end - g) - jnp.log(g - v_start)

    def t_from_logsnr(self, logsnr: Array) -> Array:
        """Inverse of `logsnr`."""
        v_start, v_end = self._v()
        logsnr = _as_float(logsnr)
        g = v_end * jax.nn.sigmoid(-logsnr) + v_start * jax.nn.sigmoid(logsnr)
        z = jnp.log(g) - jnp.log1p(-g)
        return (self.tau * z - self.start) / (self.end - self.start)

    def discretize(self, num_timesteps: int) -> DiscreteSchedule:
        """Betas from the alpha-bar ratios on the grid i / T, clipped at max_beta."""
        return self._discrete_from_alpha_bar(num_timesteps, self.max_beta)


@dataclasses.dataclass(frozen=True)
class KarrasSchedule:
    """Karras et al. (EDM) sigma family, a VE schedule: alpha(t) = 1 (see module docstring)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max or not self.rho > 0:
            raise ValueError(
                "KarrasSchedule needs 0 < sigma_min < sigma_max and rho > 0, got "
                f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho}."
            )

    def _ends(self) -> tuple[float, float]:
        inv = 1.0 / self.rho
        return self.sigma_min**inv, self.sigma_max**inv

    def alpha(self, t: Array) -> Array:
        """Always 1 (VE)."""
        return jnp.ones_like(_as_float(t))

    def sigma(self, t: Array) -> Array:
        """Karras interpolation: sigma(0) = sigma_min, sigma(1) = sigma_max."""
        lo, hi = self._ends()
        return (lo + _as_float(t) * (hi - lo)) ** self.rho

    def logsnr(self, t: Array) -> Array:
        """-2 log sigma(t)."""
        return -2.0 * jnp.log(self.sigma(t))

    def t_from_logsnr(self, logsnr: Array) -> Array:
        """Inverse of `logsnr` (t outside [0, 1] for sigma outside [sigma_min, sigma_max])."""
        lo, hi = self._ends()
        sigma_root = jnp.exp(-_as_float(logsnr) / (2.0 * self.rho))
        return (sigma_root - lo) / (hi - lo)

    def c_noise(self, t: Array) -> Array:
        """EDM's network time input ln(sigma) / 4."""
        return 0.25 * jnp.log(self.sigma(t))

    def discretize(self, num_timesteps: int) -> DiscreteSchedule:
        """VP table with VE sigmas sigma((i + 1) / T): alpha_bar_i = 1 / (1 + sigma_i^2)."""
        _check_num_timesteps(num_timesteps)
        lo, hi = self._ends()
        t = np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps
        sig = (lo + t * (hi - lo)) ** self.rho
        abar = 1.0 / (1.0 + sig**2)
        betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
        return DiscreteSchedule.from_betas(betas)


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The T-step DDPM tables, float64 NumPy arrays of shape [T] (index i = timestep i).

    Built with `DiscreteSchedule.from_betas(betas)`. Hashes by identity, so it can be
    closed over or passed as a static argument to `jax.jit`.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray) -> DiscreteSchedule:
        """All tables from betas [T] (float64), as in Ho et al. / iDDPM."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f"betas must be 1-D with at least 2 entries, got shape {betas.shape}.")
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError(
                "betas must lie in (0, 1); check the schedule's parameters (linear betas "
                "scaled by 1000 / T reach 1 for T <= 20: use more timesteps)."
            )
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        return cls(
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
            posterior_variance=post_var,
            # posterior_variance[0] = 0: iDDPM clips the log by reusing entry 1.
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        )

    @property
    def num_timesteps(self) -> int:
        """T."""
        return int(self.betas.shape[0])

    @property
    def sigmas(self) -> np.ndarray:
        """VE noise level per timestep, sqrt((1 - abar) / abar): [T] float64, increasing."""
        return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    # ---- continuous view (interpolation of log-sigma over the table) ----

    def _log_sigmas(self, dtype) -> Array:
        return jnp.asarray(np.log(self.sigmas), dtype)

    def _index_from_t(self, t: Array) -> Array:
        idx = _as_float(t) * self.num_timesteps - 1.0
        return jnp.clip(idx, 0.0, self.num_timesteps - 1.0)

    def logsnr(self, t: Array) -> Array:
        """-2 log sigma interpolated at index t T - 1 (clamped to [0, T - 1])."""
        idx = self._index_from_t(t)
        grid = jnp.arange(self.num_timesteps, dtype=idx.dtype)
        return -2.0 * jnp.interp(idx, grid, self._log_sigmas(idx.dtype))

    def alpha(self, t: Array) -> Array:
        """VP alpha at continuous t (sqrt(alpha_bar) on the grid t = (i + 1) / T)."""
        return jnp.sqrt(jax.nn.sigmoid(self.logsnr(t)))

    def sigma(self, t: Array) -> Array:
        """VP sigma at continuous t."""
        return jnp.sqrt(jax.nn.sigmoid(-self.logsnr(t)))

    def t_from_logsnr(self, logsnr: Array) -> Array:
        """(idx + 1) / T with idx the fractional index of log-sigma = -logsnr / 2 (clamped)."""
        log_sigma = -0.5 * _as_float(logsnr)
        grid = jnp.arange(self.num_timesteps, dtype=log_sigma.dtype)
        idx = jnp.interp(log_sigma, self._log_sigmas(log_sigma.dtype), grid)
        return (idx + 1.0) / self.num_timesteps

    def c_noise(self, t: Array) -> Array:
        """Network time input: the fractional timestep index t T - 1 in [0, T - 1]."""
        return self._index_from_t(t)

    def respace(self, use_timesteps: Sequence[int]) -> tuple[DiscreteSchedule, np.ndarray]:
        """iDDPM respacing: keep `use_timesteps`, recompute betas from the kept alpha-bars.

        Returns (respaced schedule of length len(use_timesteps), timestep_map [K] int64)
        where timestep_map[k] is the original index of respaced step k (feed the model
        timestep_map[k], the index it was trained with).
        """
        keep = sorted({int(i) for i in use_timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(
                f"use_timesteps must be non-empty indices in [0, {self.num_timesteps}), "
                f"got {list(use_timesteps)[:8]}..."
            )
        abar = self.alphas_cumprod[keep]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return DiscreteSchedule.from_betas(betas), np.asarray(keep, dtype=np.int64)


def space_timesteps(num_timesteps: int, spec: str | Sequence[int]) -> tuple[int, ...]:
    """iDDPM's timestep spacing: sorted indices to keep out of `num_timesteps`.

    spec: "ddimN" (the DDIM paper's integer stride giving exactly N steps) or per-section
    counts ("10,10,5" or [10, 10, 5]): the T steps are cut into equal sections (the first
    T mod len(sections) one step longer) and each is strided to its count, rounding
    fractional strides with Python's round as iDDPM does.
    """
    if isinstance(spec, str):
        if spec.startswith("ddim"):
            desired = int(spec[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return tuple(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot take exactly {desired} of {num_timesteps} steps with an integer "
                "stride; pick another ddimN or use section counts like '10,10,5'."
            )
        spec = [int(x) for x in spec.split(",")]
    counts = [int(c) for c in spec]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 0 < count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps.")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):  # accumulated like iDDPM, so rounding ties match exactly
            steps.append(start + round(position))
            position += stride
        start += size
    return tuple(sorted(set(steps)))


SCHEDULES = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "sigmoid": SigmoidSchedule,
    "scaled_linear": ScaledLinearSchedule,
    "karras": KarrasSchedule,
}
