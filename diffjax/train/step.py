"""The pure train step: ``train_step(state, batch, key) -> (state, metrics)``.

Per example it draws a timestep (uniform, or importance-sampled on the VLB as in iDDPM), the
noise, and (for classifier-free guidance) whether the label is dropped to the null label; it
applies the model, computes the configured loss with :mod:`diffjax.diffusion.losses`, and
takes one AdamW step plus the EMA updates. There is no I/O and nothing about devices: run
under ``jax.jit`` with a batch sharded over the ``data`` axis and replicated parameters, XLA
averages the gradients across devices. A step whose loss or gradient is not finite leaves
the parameters unchanged and counts itself in ``metrics["nonfinite"]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffjax.diffusion import losses, process
from diffjax.diffusion.schedules import DiscreteSchedule
from diffjax.train import optim, posthoc_ema
from diffjax.train.state import HISTORY, TrainState, ema_update

# iDDPM's resampler mixes a little of the uniform distribution into the importance weights.
_UNIFORM_MIX = 1e-3


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the step optimises, resolved from config once."""

    prediction: str = "eps"
    loss_type: str = "simple"
    variance_type: str = "fixed_small"
    weighting: str = "uniform"
    loss_kwargs: tuple[tuple[str, Any], ...] = ()
    timestep_sampler: str = "uniform"
    label_dropout: float = 0.0
    null_label: int = -1  # the extra embedding row used for classifier-free guidance
    # the batch entry the network is conditioned on: "label" [B], or "tokens" [B, L] of a
    # text model (a dropped row becomes all null_label: -1, the learned null caption)
    cond_key: str = "label"
    sigma_data: float = 0.5  # EDM's preconditioning ("edm" prediction)
    # timestep_sampler "lognormal" (EDM): ln sigma ~ N(p_mean, p_std^2), continuous sigma
    p_mean: float = -1.2
    p_std: float = 1.2


def sample_timesteps(
    key: jax.Array, batch: int, state: TrainState, sampler: str
) -> tuple[jax.Array, jax.Array]:
    """Timesteps t: [B] int32 and importance weights w: [B] (1 for uniform sampling).

    ``loss_second_moment`` (Nichol & Dhariwal 2021, sec. 3.3): p_t ∝ sqrt(E[L_t^2]) over the
    last HISTORY losses of each t, uniform until every t has HISTORY of them; w = 1/(T p_t).
    """
    num_t = state.loss_count.shape[0]
    if sampler == "uniform":
        return jax.random.randint(key, (batch,), 0, num_t), jnp.ones((batch,), jnp.float32)
    rms = jnp.sqrt(jnp.mean(state.loss_history**2, axis=-1))
    probs = rms / jnp.sum(rms)
    probs = probs * (1 - _UNIFORM_MIX) + _UNIFORM_MIX / num_t
    warm = jnp.all(state.loss_count >= HISTORY)
    probs = jnp.where(warm, probs, jnp.full_like(probs, 1.0 / num_t))
    t = jax.random.choice(key, num_t, (batch,), p=probs)
    return t, 1.0 / (num_t * probs[t])


def update_loss_history(state: TrainState, t: jax.Array, loss: jax.Array) -> TrainState:
    """Pushes each example's loss into the history of its timestep (oldest dropped), as
    iDDPM's resampler does with the full per-example loss."""

    def push(carry, tl):
        hist, count = carry
        ti, li = tl
        row = jnp.concatenate([hist[ti, 1:], li[None]])
        return (hist.at[ti].set(row), count.at[ti].add(1)), None

    (hist, count), _ = jax.lax.scan(push, (state.loss_history, state.loss_count), (t, loss))
    return state.replace(loss_history=hist, loss_count=jnp.minimum(count, HISTORY))


def make_diffusion_loss(apply_fn, ds: DiscreteSchedule, spec: LossSpec,
                        model_inputs: Callable[[jax.Array, jax.Array], dict] | None = None):
    """``loss_fn(params, state, batch, key) -> (loss, (terms, t))`` of a denoising network.

    Per example: a timestep (uniform or importance-sampled) or, for ``timestep_sampler``
    "lognormal", a continuous EDM noise level (x = x0 + sigma n, no table), the noise, and for
    classifier-free guidance whether the label (a text model's whole token row) is replaced by
    the null label. ``model_inputs(x0, key) ->
    {name: array}`` gives extra network inputs of the batch (a super-resolution model's
    augmented low-resolution images), drawn from fold_in(key, 1) so that every other draw is
    the same as without it.
    """
    loss_kwargs = dict(spec.loss_kwargs)
    continuous = spec.timestep_sampler == "lognormal"

    def loss_fn(params, state, batch, key):
        x0, labels = batch["image"], batch.get(spec.cond_key)
        k_t, k_noise, k_drop, k_label = jax.random.split(key, 4)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        if continuous:  # EDM: x = x0 + sigma n at ln sigma ~ N(P_mean, P_std^2), no table
            ln_sigma = spec.p_mean + spec.p_std * jax.random.normal(k_t, x0.shape[:1])
            sigma = jnp.exp(ln_sigma).astype(process.float_dtype(x0))
            t, weights = jnp.zeros(x0.shape[:1], jnp.int32), jnp.ones(x0.shape[:1])
            x_t = x0 + process.bcast(sigma, x0) * noise
            x_in, c_noise = process.ve_model_input(ds, x_t, sigma, prediction=spec.prediction,
                                                   sigma_data=spec.sigma_data)
        else:
            t, weights = sample_timesteps(k_t, x0.shape[0], state, spec.timestep_sampler)
            x_t = process.q_sample_discrete(ds, x0, noise, t)
            x_in, c_noise = process.discrete_model_input(ds, x_t, t, prediction=spec.prediction,
                                                         sigma_data=spec.sigma_data)
        if labels is not None and spec.label_dropout > 0:
            drop = jax.random.bernoulli(k_label, spec.label_dropout, labels.shape[:1])
            drop = drop.reshape(drop.shape + (1,) * (labels.ndim - 1))  # whole rows
            labels = jnp.where(drop, spec.null_label, labels)
        extra = {} if model_inputs is None else model_inputs(x0, jax.random.fold_in(key, 1))
        out = apply_fn(params, x_in, c_noise, labels, True, {"dropout": k_drop}, **extra)
        if continuous:
            kw = {k: v for k, v in loss_kwargs.items() if k != "vlb_weight"}
            terms = losses.sigma_training_losses(
                out.astype(jnp.float32), x0=x0, noise=noise, sigma=sigma,
                prediction=spec.prediction, weighting=spec.weighting,
                sigma_data=spec.sigma_data, **kw)
        else:
            terms = losses.training_losses(
                out.astype(jnp.float32), x0=x0, x_t=x_t, noise=noise, t=t, ds=ds,
                prediction=spec.prediction, loss_type=spec.loss_type,
                variance_type=spec.variance_type, weighting=spec.weighting,
                sigma_data=spec.sigma_data, **loss_kwargs,
            )
        return jnp.mean(terms["loss"] * weights), (terms, t)

    return loss_fn


def make_classifier_loss(apply_fn, ds: DiscreteSchedule, noised: bool):
    """``loss_fn`` of a classifier: cross-entropy of its logits at the data labels.

    ``noised`` (the noise-aware classifier of classifier guidance, Dhariwal & Nichol 2021):
    inputs are x_t at uniform timesteps t, with t as the classifier's time input. Otherwise
    the clean images at time input 0 (a feature network for Frechet distances / accuracy).
    """
    def loss_fn(params, state, batch, key):
        x0, labels = batch["image"], batch["label"]
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        if noised:
            t = jax.random.randint(k_t, (x0.shape[0],), 0, ds.num_timesteps)
            noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
            x = process.q_sample_discrete(ds, x0, noise, t)
        else:
            t, x = jnp.zeros((x0.shape[0],), jnp.int32), x0
        logits = apply_fn(params, x, t.astype(jnp.float32), None, True, {"dropout": k_drop})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        accuracy = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.mean(ce), ({"loss": ce, "accuracy": accuracy}, t)

    return loss_fn


def _gathered_loss(loss_fn, gather, params, *args):
    return loss_fn(gather(params), *args)


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    ema_decays: tuple[float, ...],
    learning_rate: optax.Schedule,
    timestep_sampler: str = "uniform",
    ema_gammas: tuple[float, ...] = (),
    gather: Callable[[Any], Any] | None = None,
) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """The pure step around ``loss_fn(params, state, batch, key) -> (loss, (terms, t))``:
    gradient, AdamW update, EMA updates, timestep history, NaN/Inf guard, metrics.

    The state's EMA copies are one per ``ema_decays`` (fixed decay), then one per
    ``ema_gammas`` (EDM2's power-function profiles, :mod:`diffjax.train.posthoc_ema`).
    ``gather``: applied to the parameters where the loss uses them (sharded state: a sharding
    constraint to whole arrays, so the network runs data-parallel on gathered weights and
    the gradients are reduced back to the shards; :class:`diffjax.train.loop.Trainer`)."""
    if gather is not None:
        loss_fn = functools.partial(_gathered_loss, loss_fn, gather)

    def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (terms, t)), grads = grad_fn(state.params, state, batch, key)
        grad_norm = optim.global_norm(grads)
        # A non-finite loss or gradient skips the step: every part of the state is kept.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        if isinstance(tx, optim.SkipsNonFinite):  # keeps its state itself, Adam's in place
            updates, opt_state = tx.update(grads, state.opt_state, state.params, finite=finite,
                                           grad_norm=grad_norm)
        else:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            opt_state = keep(opt_state, state.opt_state)
        params = jax.tree.map(functools.partial(_applied_unless, finite), state.params, updates)
        # The EMAs read the parameters as stored: left to itself XLA recomputes the update
        # inside each EMA's fusion, from the old parameters, whose buffer (donated, and
        # overwritten by the new ones) it must then copy first: a copy of the whole model
        # per step (1.1 GB for ADM-64; ~1000 ops fewer in its compiled step), for the same
        # values. (Adam's moments: optim.make_optimizer.)
        stored = jax.lax.optimization_barrier(params)
        fixed = len(ema_decays)
        emas = tuple(jax.tree.map(functools.partial(_ema_unless, finite, decay=d), e, stored)
                     for e, d in zip(state.ema_params, ema_decays))
        emas += tuple(jax.tree.map(functools.partial(_power_ema_unless, finite, state.step + 1,
                                                     gamma=g), e, stored)
                      for e, g in zip(state.ema_params[fixed:], ema_gammas))
        new = state.replace(step=state.step + 1, params=params, ema_params=emas,
                            opt_state=opt_state)
        if timestep_sampler == "loss_second_moment":
            pushed = update_loss_history(state, t, jax.lax.stop_gradient(terms["loss"]))
            history, count = keep((pushed.loss_history, pushed.loss_count),
                                  (state.loss_history, state.loss_count))
            new = new.replace(loss_history=history, loss_count=count)
        metrics = {name: jnp.mean(v) for name, v in terms.items()}
        metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=learning_rate(state.step),
                       nonfinite=(~finite).astype(jnp.int32))
        return new, metrics

    return train_step


# Per parameter array, one jitted call each (traced once per shape: see optim.make_optimizer).
@jax.jit
def _applied_unless(finite: jax.Array, param: jax.Array, update: jax.Array) -> jax.Array:
    """The parameter with its update applied (``optax.apply_updates``), if ``finite``."""
    return jnp.where(finite, optax.apply_updates(param, update), param)


@functools.partial(jax.jit, static_argnames="decay")
def _ema_unless(finite: jax.Array, ema: jax.Array, param: jax.Array, decay: float) -> jax.Array:
    """:func:`ema_update` of one array, if ``finite``."""
    return jnp.where(finite, ema_update(ema, param, decay), ema)


@functools.partial(jax.jit, static_argnames="gamma")
def _power_ema_unless(finite: jax.Array, step: jax.Array, ema: jax.Array, param: jax.Array,
                      gamma: float) -> jax.Array:
    """:func:`posthoc_ema.power_ema_update` of one array, if ``finite``."""
    return jnp.where(finite, posthoc_ema.power_ema_update(ema, param, step, gamma), ema)


def step_key(state: TrainState) -> jax.Array:
    """The step's key, ``fold_in(base_key, step)``: the same on every resume."""
    return jax.random.fold_in(state.rng, state.step)
