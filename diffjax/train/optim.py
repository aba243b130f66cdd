"""The optimiser: AdamW with linear warm-up, constant or cosine decay, global-norm clipping."""

from __future__ import annotations

import functools

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
    """An optax transformation whose ``update(grads, state, params, finite=..., grad_norm=...)``
    returns the state unchanged where the boolean scalar ``finite`` is False (its updates are
    then meaningless: the caller keeps its parameters); without ``finite`` it always updates.
    ``grad_norm``: :func:`global_norm` of ``grads`` where the caller has it already (else the
    update computes it again: the same value, traced a second time)."""

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
    eps, weight_decay=weight_decay))``: its state (checkpoints are interchangeable) and its
    operations in its order, with optax's own formulas (op by op, bit for bit the same
    values). Three differences, for the compiled step's memory and for tracing:

    * ``update`` takes ``finite`` (see :class:`SkipsNonFinite`);
    * the update is computed from Adam's moments as stored. With optax's own, the train
      step selects new or old moments by ``finite`` after the update was computed from the
      new ones; XLA fuses the moments' arithmetic into the fusion that applies the update,
      reading the old moments, while another fusion overwrites those (donated) buffers with
      the selected ones, so it copies both moments first: 2 x the model's size per step
      (2.2 GB for ADM-64). Selected first, they are written in place and read back;
    * each parameter array's arithmetic is one call of a jitted function (:func:`_adamw_leaf`),
      traced once per shape: tracing the update records one equation per array (three
      without ``grad_norm``: its squared norm and the norm's sum too) instead of optax's ~28
      (ADM-64 has 541 arrays of 54 shapes); the cost of tracing and lowering, paid by every
      start, is per equation.

    Compiled, XLA fuses the program differently from optax's, and its CPU kernels can then
    round differently: after two Fashion-MNIST steps, 101 of the 288 values of one array (the
    zero-initialised output convolution's) are 1-3 float32 ulp from optax's, the rest equal.
    """
    if not callable(learning_rate):
        learning_rate = optax.constant_schedule(learning_rate)
    reference = optax.chain(
        *([optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    static = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                  max_norm=grad_clip if grad_clip > 0 else 0.0)

    def update(grads, state, params=None, *, finite=None, grad_norm=None, **extra):
        del extra
        if params is None:
            raise ValueError("make_optimizer's update needs the parameters (weight decay)")
        *clip, (adam, decay, schedule) = state
        finite = jnp.asarray(True) if finite is None else finite
        if grad_clip <= 0:
            grad_norm = jnp.zeros((), jnp.float32)  # unused
        elif grad_norm is None:
            grad_norm = global_norm(grads)
        count = jnp.where(finite, optax.safe_increment(adam.count), adam.count)
        step_size = -1 * learning_rate(schedule.count)  # optax.scale_by_learning_rate
        treedef = jax.tree.structure(params)
        arrays = zip(*(treedef.flatten_up_to(t) for t in (grads, adam.mu, adam.nu, params)))
        leaves = [_adamw_leaf(g, m, v, p, grad_norm, count, step_size, finite, **static)
                  for g, m, v, p in arrays]
        updates, mu, nu = (treedef.unflatten(x) for x in (list(zip(*leaves)) or [()] * 3))
        schedule = type(schedule)(count=jnp.where(
            finite, optax.safe_increment(schedule.count), schedule.count))
        return updates, (*clip, (optax.ScaleByAdamState(count, mu, nu), decay, schedule))

    return SkipsNonFinite(reference.init, update)


def global_norm(tree) -> jax.Array:
    """``optax.tree.norm(tree)`` (the same operations), one jitted call per array."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        total = total + _squared_norm(leaf)
    return jnp.sqrt(total)


@jax.jit
def _squared_norm(leaf: jax.Array) -> jax.Array:
    return optax.tree.norm(leaf, squared=True)


@functools.partial(jax.jit, static_argnames=("b1", "b2", "eps", "weight_decay", "max_norm"))
def _adamw_leaf(g, mu, nu, p, norm, count, step_size, finite, *, b1, b2, eps, weight_decay,
                max_norm):
    """One parameter array through clip_by_global_norm (``max_norm`` > 0, ``norm`` the global
    one), scale_by_adam with ``count`` already advanced, add_decayed_weights and the learning
    rate ``step_size`` (negative), each as optax computes it: (update, mu, nu), the moments
    selected by ``finite`` before the update reads them."""
    if max_norm > 0:
        g = jax.lax.select(jnp.squeeze(norm < max_norm), g,
                           (g / norm.astype(g.dtype)) * max_norm)
    new_mu = optax.tree.update_moment(g, mu, b1, 1)
    new_nu = optax.tree.cast_like(optax.tree.update_moment_per_elem_norm(g, nu, b2, 2), nu)
    mu, nu = jnp.where(finite, new_mu, mu), jnp.where(finite, new_nu, nu)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    update = mu_hat / (jnp.sqrt(nu_hat + 0.0) + eps)  # eps_root 0.0 as optax adds it
    if weight_decay != 0.0:
        update = update + weight_decay * p
    return jnp.array(step_size, dtype=update.dtype) * update, mu, nu
