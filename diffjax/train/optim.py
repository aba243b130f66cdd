"""The optimiser: AdamW with linear warm-up, constant or cosine decay, global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(
    peak: float, warmup_steps: int, total_steps: int, decay: str = "constant",
    min_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then constant or cosine decay.

    The cosine decay reaches ``peak * min_ratio`` at ``total_steps``.
    """
    if decay not in ("constant", "cosine"):
        raise ValueError(f"unknown learning-rate decay {decay!r}; valid: constant, cosine")
    if decay == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(
            peak, max(total_steps - warmup_steps, 1), alpha=min_ratio
        )
    if warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


class SkipsNonFinite(optax.GradientTransformationExtraArgs):
    """An optax transformation whose ``update(grads, state, params, finite=...)`` returns the
    state unchanged where the boolean scalar ``finite`` is False (its updates are then
    meaningless: the caller keeps its parameters). Without ``finite`` it always updates."""

    __slots__ = ()


def make_optimizer(
    learning_rate: optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
) -> SkipsNonFinite:
    """AdamW behind optional global-norm clipping (``grad_clip`` <= 0 turns clipping off).

    ``optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(learning_rate, b1, b2,
    eps, weight_decay=weight_decay))``: the same state (checkpoints are interchangeable) and
    the same operations in the same order (op by op, bit for bit the same values). Two
    differences, both for the compiled step's memory: ``update`` takes ``finite`` (see
    :class:`SkipsNonFinite`), and the update is computed from Adam's moments as stored (see
    :func:`_scale_by_adam_in_place`). Compiled, XLA fuses the two programs differently, and
    its CPU kernels can then round differently: the Fashion-MNIST step's state stays bit for
    bit optax's for 8 steps, then one parameter is one float32 ulp apart.
    """
    adamw = optax.chain(
        _scale_by_adam_in_place(b1, b2, eps),
        _kept_unless_finite(optax.add_decayed_weights(weight_decay)),
        _kept_unless_finite(optax.scale_by_learning_rate(learning_rate)),
    )
    parts = [adamw]
    if grad_clip > 0:
        parts.insert(0, _kept_unless_finite(optax.clip_by_global_norm(grad_clip)))
    return SkipsNonFinite(*optax.chain(*parts))


def _kept_unless_finite(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose new state is selected against the old one by ``finite`` (for the small
    states: counters, nothing the size of the model)."""

    def update(updates, state, params=None, *, finite=None, **extra):
        del extra
        updates, new = tx.update(updates, state, params)
        if finite is not None:
            new = optax.tree.where(finite, new, state)
        return updates, new

    return optax.GradientTransformationExtraArgs(tx.init, update)


def _scale_by_adam_in_place(
    b1: float, b2: float, eps: float
) -> optax.GradientTransformationExtraArgs:
    """``optax.scale_by_adam(b1, b2, eps)`` with its update read from the moments as stored.

    With optax's own, the train step selects new or old moments by ``finite`` after the update
    was computed from the new ones; XLA fuses the moments' arithmetic into the fusion that
    applies the update, reading the old moments, while another fusion overwrites those
    (donated) buffers with the selected ones, so it copies both moments first: 2 x the model's
    size per step (2.2 GB for ADM-64). Here the moments are selected by ``finite`` first and
    the update is computed from the selection, which XLA writes in place and reads back:
    nothing is copied (when ``finite`` is False the update is not used).
    """
    init = optax.scale_by_adam(b1, b2, eps).init

    def update(updates, state, params=None, *, finite=None, **extra):
        del params, extra
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.cast_like(
            optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2), state.nu)
        count = optax.safe_increment(state.count)
        if finite is not None:
            mu, nu, count = optax.tree.where(finite, (mu, nu, count),
                                             (state.mu, state.nu, state.count))
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        # optax's expression, eps_root 0.0 included (adding 0.0 turns -0.0 into 0.0)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + 0.0) + eps), mu_hat, nu_hat)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init, update)
