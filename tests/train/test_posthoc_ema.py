"""EDM2's power-function EMA and post-hoc EMA against closed forms (float64 NumPy)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax.train import posthoc_ema as pe
from diffjax.train.step import make_train_step
from diffjax.train.state import TrainState


def _weights(t: int, gamma: float) -> np.ndarray:
    """Closed form: w_k = (k^(g+1) - (k-1)^(g+1)) / t^(g+1), k = 1..t (float64)."""
    k = np.arange(1, t + 1, dtype=np.float64)
    return ((k / t) ** (gamma + 1) - ((k - 1) / t) ** (gamma + 1))


def _track(trajectory: np.ndarray, gammas, snapshot_every: int):
    """Power EMAs of trajectory [T, P] with the library's float32 update, and snapshots."""
    update = jax.jit(pe.power_ema_update, static_argnums=3)
    emas = [jnp.zeros(trajectory.shape[1], jnp.float32) for _ in gammas]
    snaps = []
    for k, theta in enumerate(trajectory, start=1):
        theta = jnp.asarray(theta, jnp.float32)
        emas = [update(e, theta, k, g) for e, g in zip(emas, gammas)]
        if k % snapshot_every == 0:
            snaps += [(k, g, np.asarray(e, np.float64)) for e, g in zip(emas, gammas)]
    return [np.asarray(e, np.float64) for e in emas], snaps


def _trajectory(steps: int, params: int = 6) -> np.ndarray:
    k = np.arange(1, steps + 1, dtype=np.float64)[:, None]
    j = np.arange(params)[None, :]
    return np.sin(k / (40.0 + 25 * j) + j) + 0.3 * np.cos(k / 7.0 * (j + 1)) + 0.001 * k


def test_sigma_rel_and_gamma_are_inverse():
    for gamma in (0.5, 3.0, 6.94, 16.97, 50.0):
        assert pe.sigma_rel_to_gamma(pe.gamma_to_sigma_rel(gamma)) == pytest.approx(gamma,
                                                                                    rel=1e-9)
    # EDM2's pairs (Karras et al. 2024, sec. 3.1): sigma_rel 0.10 <-> gamma 6.94 and
    # 0.05 <-> gamma 16.97
    assert pe.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    assert pe.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    for sigma_rel in (0.05, 0.10, 0.2):
        g = pe.sigma_rel_to_gamma(sigma_rel)
        assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(sigma_rel**2, rel=1e-12)
    with pytest.raises(ValueError, match="sigma_rel"):
        pe.sigma_rel_to_gamma(0.3)


def test_power_ema_is_the_closed_form_average():
    """The float32 update reproduces sum_k w_k theta_k, including the late steps whose weight
    1 - beta = (gamma+1)/t would be lost by computing 1 - (1 - 1/t)^(gamma+1) in float32."""
    steps = 3000
    traj = _trajectory(steps)
    for gamma in (pe.sigma_rel_to_gamma(0.05), pe.sigma_rel_to_gamma(0.2)):
        (ema,), _ = _track(traj, (gamma,), steps)
        want = _weights(steps, gamma) @ traj
        # float32 recursion over 3000 steps: relative rounding ~ 3000 * 6e-8 at most
        np.testing.assert_allclose(ema, want, rtol=0, atol=2e-4 * np.abs(traj).max())


def test_profile_dot_matches_the_discrete_weights():
    """<p_a, p_b> is the limit of the discrete weights' sum_k w_a,k w_b,k * (unit width)."""
    for (ta, ga, tb, gb) in ((4000, 6.94, 4000, 6.94), (3000, 6.94, 4000, 16.97),
                            (4000, 2.0, 1500, 30.0)):
        n = max(ta, tb)
        wa = np.zeros(n)
        wb = np.zeros(n)
        wa[:ta], wb[:tb] = _weights(ta, ga), _weights(tb, gb)
        # w_k ~ p(k) * 1: the sum approximates the integral to O(1/t)
        assert pe.profile_dot(ta, ga, tb, gb) == pytest.approx(float(wa @ wb), rel=2e-2)
        assert pe.profile_dot(ta, ga, tb, gb) == pytest.approx(
            float(pe.profile_dot(tb, gb, ta, ga)), rel=1e-14)
    # closed form of one profile with itself: (g+1)^2 / ((2g+1) t)
    assert pe.profile_dot(100.0, 3.0, 100.0, 3.0) == pytest.approx(16 / 7 / 100, rel=1e-14)


def test_reconstruction_error_within_the_residual_bound():
    """Post-hoc sigma_rel = 0.07 from snapshots of 0.05 and 0.10 against the EMA tracked
    directly: |reconstruction - tracked| <= ||r|| ||theta||_2 per parameter (Cauchy-Schwarz;
    the discrete EMA integrates p against the piecewise-constant trajectory exactly), plus
    float32 rounding; and the fit must be good (residual well under 1%)."""
    steps, every = 2000, 100
    traj = _trajectory(steps)
    g05, g07, g10 = (pe.sigma_rel_to_gamma(s) for s in (0.05, 0.07, 0.10))
    (e07,), _ = _track(traj, (g07,), steps)
    _, snaps = _track(traj, (g05, g10), every)
    sol = pe.solve([s[0] for s in snaps], [s[1] for s in snaps], steps, g07)
    recon = pe.combine([s[2] for s in snaps], sol.coefficients)
    assert sol.residual < 1e-2, sol.residual
    r_norm = sol.residual * np.sqrt(pe.profile_dot(steps, g07, steps, g07))
    bound = r_norm * np.sqrt((traj**2).sum(0)) + 1e-4 * np.abs(sol.coefficients).sum()
    err = np.abs(recon - e07)
    assert np.all(err <= bound), (err, bound)
    # the bound is not vacuous: the closest single snapshot is far worse than it
    nearest = min(np.abs(s[2] - e07).max() for s in snaps)
    assert bound.max() < nearest / 5, (bound.max(), nearest)


def test_a_tracked_profile_is_reconstructed_exactly():
    """Asking for a profile that was snapshotted at the target step: coefficient 1 on it."""
    g05, g10 = pe.sigma_rel_to_gamma(0.05), pe.sigma_rel_to_gamma(0.10)
    steps = [100, 100, 200, 200, 300, 300]
    gammas = [g05, g10] * 3
    sol = pe.solve(steps, gammas, 300, g10)
    want = np.zeros(6)
    want[-1] = 1.0
    np.testing.assert_allclose(sol.coefficients, want, atol=1e-6)
    assert sol.residual < 1e-6


def test_the_train_step_tracks_fixed_and_power_emas():
    """The step's EMA copies: the fixed decay first, then one power profile per gamma, each
    updated with the step's new parameters at t = step + 1 (closed-form weights)."""
    gamma = pe.sigma_rel_to_gamma(0.1)
    tx = optax.sgd(0.1)
    targets = jnp.asarray(np.linspace(-1, 1, 12).reshape(4, 3), jnp.float32)

    def loss_fn(params, state, batch, key):
        loss = jnp.sum((params["w"] - batch["target"]) ** 2)
        return loss, ({"loss": loss[None]}, jnp.zeros((1,), jnp.int32))

    step = jax.jit(make_train_step(loss_fn, tx, (0.9,), optax.constant_schedule(0.1),
                                   ema_gammas=(gamma,)))
    params = {"w": jnp.zeros(3)}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       ema_params=(params, params), opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0), loss_history=jnp.zeros((1, 1)),
                       loss_count=jnp.zeros((1,), jnp.int32))
    history = []
    for k in range(40):
        state, _ = step(state, {"target": targets[k % 4]}, jax.random.PRNGKey(k))
        history.append(np.asarray(state.params["w"], np.float64))
    history = np.stack(history)
    want_power = _weights(40, gamma) @ history
    np.testing.assert_allclose(state.ema_params[1]["w"], want_power, rtol=1e-5, atol=1e-6)
    fixed = np.zeros(3)
    for theta in history:
        fixed = 0.9 * fixed + 0.1 * theta
    np.testing.assert_allclose(state.ema_params[0]["w"], fixed, rtol=1e-5, atol=1e-6)


def test_power_ema_weight_late_in_training():
    """1 - beta at step t = 10^4 .. 10^7 in float32 against float64: (1 - 1/t) rounded to
    float32 would be off by up to 6e-8 t, i.e. the whole weight at t = 10^7."""
    for gamma in (pe.sigma_rel_to_gamma(0.05), pe.sigma_rel_to_gamma(0.10)):
        for t in (1e4, 1e5, 1e6, 1e7):
            got = pe.power_ema_update(jnp.zeros(()), jnp.ones(()), t, gamma)
            want = -np.expm1((gamma + 1) * np.log1p(-1 / t))
            assert float(got) == pytest.approx(want, rel=1e-5), (gamma, t)
    # the first step takes the parameters themselves (beta_1 = 0)
    assert float(pe.power_ema_update(jnp.full((), 5.0), jnp.full((), 2.0), 1, 6.9)) == 2.0


def test_a_nonfinite_step_keeps_the_power_emas():
    """A step whose loss is NaN leaves the fixed and the power-function EMAs as they were."""
    tx = optax.sgd(0.1)

    def loss_fn(params, state, batch, key):
        loss = jnp.sum((params["w"] - batch["target"]) ** 2)
        return loss, ({"loss": loss[None]}, jnp.zeros((1,), jnp.int32))

    step = jax.jit(make_train_step(loss_fn, tx, (0.9,), optax.constant_schedule(0.1),
                                   ema_gammas=(pe.sigma_rel_to_gamma(0.1),)))
    params = {"w": jnp.zeros(3)}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       ema_params=(params, params), opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0), loss_history=jnp.zeros((1, 1)),
                       loss_count=jnp.zeros((1,), jnp.int32))
    for k in range(3):  # the EMAs now lag the parameters, so an update would move them
        state, _ = step(state, {"target": jnp.full(3, k + 1.0)}, jax.random.PRNGKey(k))
    before = jax.device_get(state.ema_params)
    state, metrics = step(state, {"target": jnp.full(3, jnp.nan)}, jax.random.PRNGKey(9))
    assert int(metrics["nonfinite"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.ema_params))):
        np.testing.assert_array_equal(a, b)
